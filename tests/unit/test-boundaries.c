/* Boundary values (0, 2^31-1, 2^32-1, 2^63-1, 2^64-1 and friends) in
 * every header field of a real image: each must be refused with a
 * message, or opened and served (reads and block status) without a
 * crash, a hang or an unbounded allocation.  Under make check-sanitize
 * this runs with ASan and UBSan. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "unit.h"

static char dir[] = "/tmp/q2-boundaries-XXXXXX";
static uint8_t base[1 << 20], patched[1 << 20];
static size_t base_len;

struct field {
  const char *name;
  unsigned offset, size;        /* big-endian, 4 or 8 bytes */
};

static const struct field fields[] = {
  { "version", 4, 4 },
  { "backing_file_offset", 8, 8 },
  { "backing_file_size", 16, 4 },
  { "cluster_bits", 20, 4 },
  { "size", 24, 8 },
  { "crypt_method", 32, 4 },
  { "l1_size", 36, 4 },
  { "l1_table_offset", 40, 8 },
  { "refcount_table_offset", 48, 8 },
  { "refcount_table_clusters", 56, 4 },
  { "nb_snapshots", 60, 4 },
  { "snapshots_offset", 64, 8 },
  { "incompatible_features", 72, 8 },
  { "compatible_features", 80, 8 },
  { "autoclear_features", 88, 8 },
  { "refcount_order", 96, 4 },
  { "header_length", 100, 4 },
};

static const uint64_t values[] = {
  0, 1, 0x7fffffffULL, 0x80000000ULL, 0xffffffffULL, 0x100000000ULL,
  0x7fffffffffffffffULL, 0x8000000000000000ULL, 0xffffffffffffffffULL,
};

static int
extent_count (void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  unsigned *n = opaque;

  return ++*n >= 1000;          /* enough: stop the walk */
}

/* Opens the patched image and exercises it; returns the open result. */
static int
exercise (const char *path)
{
  struct q2_open_opts opts = { .readonly = true, .no_backing = true };
  struct q2_image *img;
  static uint8_t buf[1 << 20];
  unsigned n = 0;
  uint64_t size;
  int r = q2_open (path, &opts, &img);

  if (r < 0) {
    CHECK (strlen (q2_last_error ()) > 0);
    return r;
  }
  size = q2_virtual_size (img);
  q2_pread (img, buf, size < sizeof buf ? size : sizeof buf, 0);
  if (size > sizeof buf)
    q2_pread (img, buf, 4096, size - 4096);
  if (size > 0)
    q2_extents (img, 0, size, false, extent_count, &n);
  q2_close (img);
  return 0;
}

static void
test_every_field (void)
{
  char path[64];
  unsigned i, j, opened = 0, refused = 0;

  snprintf (path, sizeof path, "%s/t.qcow2", dir);
  for (i = 0; i < sizeof fields / sizeof fields[0]; i++)
    for (j = 0; j < sizeof values / sizeof values[0]; j++) {
      uint8_t *img = patched;
      FILE *f;
      memcpy (img, base, base_len);
      if (fields[i].size == 4)
        q2_put_be32 (img + fields[i].offset, (uint32_t) values[j]);
      else
        q2_put_be64 (img + fields[i].offset, values[j]);
      f = fopen (path, "wb");
      CHECK (f != NULL);
      if (f == NULL)
        return;
      fwrite (img, 1, base_len, f);
      fclose (f);
      unit_context ("%s = %#llx", fields[i].name,
                    (unsigned long long) values[j]);
      if (exercise (path) == 0)
        opened++;
      else
        refused++;
    }
  unit_context (NULL);
  printf ("     %u variants opened, %u refused\n", opened, refused);
  CHECK (refused > 0);
  unlink (path);
}

int
main (void)
{
  char cmd[512], path[64];
  FILE *f;

  if (mkdtemp (dir) == NULL) {
    perror ("mkdtemp");
    return 1;
  }
  snprintf (path, sizeof path, "%s/base.qcow2", dir);
  /* A small image with data, a zero cluster, a compressed cluster and a
   * snapshot, so the tables the fields point at exist. */
  snprintf (cmd, sizeof cmd,
            "qemu-img create -q -f qcow2 -o cluster_size=4k '%s' 4M && "
            "qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -z 64k 4k' "
            "-c 'write -c -P 2 1M 4k' '%s' >/dev/null && "
            "qemu-img snapshot -c s '%s'", path, path, path);
  if (system (cmd) != 0) {
    printf ("qemu-img is not available: skipped\n0 passed, 0 failed\n");
    return 0;
  }
  f = fopen (path, "rb");
  if (f == NULL) {
    perror (path);
    return 1;
  }
  base_len = fread (base, 1, sizeof base, f);
  CHECK (base_len > 4096 && base_len < sizeof base && feof (f));
  fclose (f);
  unlink (path);

  RUN (test_every_field);
  rmdir (dir);
  return unit_done ();
}
