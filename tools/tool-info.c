/* qcow2-tool info: what qemu-img info shows, as text or JSON, for the
 * image or its whole backing chain. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "tool.h"

static const char info_help[] =
  "Usage: qcow2-tool info [--json] [--backing-chain] [-U] IMG\n"
  "\n"
  "Shows the format version, virtual and disk size, cluster size, refcount\n"
  "width, features, backing file and snapshots of IMG.  --json prints the\n"
  "keys of 'qemu-img info --output=json'; --backing-chain shows every layer\n"
  "(a JSON array with --json).\n"
  "\n"
  "Encrypted images need no password: the encryption format and the LUKS\n"
  "parameters (cipher, mode, IV generator, hashes, key slots) are read\n"
  "from the headers; key material is never shown.  Their backing files\n"
  "are not opened.\n"
  "\n"
  "-U (--force-share) opens an image that another process is using.\n";

/* One layer, with the name qemu would show for it. */
struct layer {
  struct q2_image *img;
  struct q2_image_info info;
  char *name;
  char *backing_name;           /* full backing file name, or NULL */
  struct q2_encrypt_info enc;
  struct q2_bitmap_info *bitmaps;
  uint32_t nb_bitmaps;
};

static uint64_t
disk_size (const char *path)
{
  struct stat st;

  if (stat (path, &st) == -1)
    return 0;
  return (uint64_t) st.st_blocks * 512;
}

static const char *
compat_name (uint32_t version)
{
  return version >= 3 ? "1.1" : "0.10";
}

static const char *
bool_name (bool b)
{
  return b ? "true" : "false";
}

static void
format_date (uint32_t sec, char *buf, size_t len)
{
  time_t t = sec;
  struct tm tm;

  localtime_r (&t, &tm);
  strftime (buf, len, "%Y-%m-%d %H:%M:%S", &tm);
}

static void
format_clock (uint64_t nsec, char *buf, size_t len)
{
  uint64_t secs = nsec / 1000000000;

  snprintf (buf, len, "%02d:%02d:%02d.%03d", (int) (secs / 3600),
            (int) ((secs / 60) % 60), (int) (secs % 60),
            (int) ((nsec / 1000000) % 1000));
}

/* Shared with 'snapshot -l': qemu's bdrv_snapshot_dump layout. */
void print_snapshot_table (struct q2_image *img);

void
print_snapshot_table (struct q2_image *img)
{
  int n = q2_snapshot_count (img), i;

  if (n <= 0)
    return;
  printf ("Snapshot list:\n");
  printf ("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
          "VM CLOCK", "ICOUNT");
  for (i = 0; i < n; i++) {
    struct q2_snapshot_info s;
    char size[32], date[64], clock[64], icount[32] = "";
    if (q2_snapshot_get (img, i, &s) < 0)
      continue;
    format_size (s.vm_state_size, size, sizeof size);
    format_date (s.date_sec, date, sizeof date);
    format_clock (s.vm_clock_nsec, clock, sizeof clock);
    /* QEMU keeps icount as a signed 64-bit number. */
    if (s.icount != UINT64_MAX)
      snprintf (icount, sizeof icount, "%" PRId64, (int64_t) s.icount);
    printf ("%-9s %-16s %8s%20s%13s%11s\n", s.id, s.name, size, date, clock,
            icount);
  }
}

/* QEMU's QAPI order of the encrypt fields. */
static void
print_encrypt_text (const struct q2_encrypt_info *e)
{
  int i;

  printf ("    encrypt:\n");
  if (e->format != Q2_ENCRYPT_LUKS) {
    printf ("        format: aes\n");
    return;
  }
  printf ("        ivgen alg: %s\n", e->ivgen_alg);
  printf ("        hash alg: %s\n", e->hash_alg);
  printf ("        cipher alg: %s\n", e->cipher_alg);
  printf ("        uuid: %s\n", e->uuid);
  if (e->ivgen_hash_alg[0])
    printf ("        ivgen hash alg: %s\n", e->ivgen_hash_alg);
  printf ("        format: luks\n");
  printf ("        cipher mode: %s\n", e->cipher_mode);
  printf ("        slots:\n");
  for (i = 0; i < 8; i++) {
    printf ("            [%d]:\n", i);
    printf ("                active: %s\n", bool_name (e->slots[i].active));
    if (e->slots[i].active)
      printf ("                iters: %u\n", e->slots[i].iters);
    printf ("                key offset: %" PRIu64 "\n",
            e->slots[i].key_offset);
    if (e->slots[i].active)
      printf ("                stripes: %u\n", e->slots[i].stripes);
  }
  printf ("        payload offset: %" PRIu64 "\n", e->payload_offset);
  printf ("        master key iters: %u\n", e->master_key_iters);
}

static void
print_encrypt_json (const struct q2_encrypt_info *e, const char *indent)
{
  int i;

  printf ("%s            \"encrypt\": {\n", indent);
  if (e->format != Q2_ENCRYPT_LUKS) {
    printf ("%s                \"format\": \"aes\"\n", indent);
    printf ("%s            }", indent);
    return;
  }
  printf ("%s                \"ivgen-alg\": ", indent);
  json_string (stdout, e->ivgen_alg);
  printf (",\n%s                \"hash-alg\": ", indent);
  json_string (stdout, e->hash_alg);
  printf (",\n%s                \"cipher-alg\": ", indent);
  json_string (stdout, e->cipher_alg);
  printf (",\n%s                \"uuid\": ", indent);
  json_string (stdout, e->uuid);
  if (e->ivgen_hash_alg[0]) {
    printf (",\n%s                \"ivgen-hash-alg\": ", indent);
    json_string (stdout, e->ivgen_hash_alg);
  }
  printf (",\n%s                \"format\": \"luks\",\n", indent);
  printf ("%s                \"cipher-mode\": ", indent);
  json_string (stdout, e->cipher_mode);
  printf (",\n%s                \"slots\": [\n", indent);
  for (i = 0; i < 8; i++) {
    printf ("%s                    {\n", indent);
    printf ("%s                        \"active\": %s,\n", indent,
            bool_name (e->slots[i].active));
    if (e->slots[i].active)
      printf ("%s                        \"iters\": %u,\n", indent,
              e->slots[i].iters);
    printf ("%s                        \"key-offset\": %" PRIu64 "%s\n",
            indent, e->slots[i].key_offset, e->slots[i].active ? "," : "");
    if (e->slots[i].active)
      printf ("%s                        \"stripes\": %u\n", indent,
              e->slots[i].stripes);
    printf ("%s                    }%s\n", indent, i < 7 ? "," : "");
  }
  printf ("%s                ],\n", indent);
  printf ("%s                \"payload-offset\": %" PRIu64 ",\n", indent,
          e->payload_offset);
  printf ("%s                \"master-key-iters\": %u\n", indent,
          e->master_key_iters);
  printf ("%s            }", indent);
}

static void
print_bitmaps_text (const struct layer *l)
{
  uint32_t i;

  if (l->nb_bitmaps == 0)
    return;
  printf ("    bitmaps:\n");
  for (i = 0; i < l->nb_bitmaps; i++) {
    const struct q2_bitmap_info *b = &l->bitmaps[i];
    int f = 0;
    printf ("        [%u]:\n", i);
    printf ("            flags:\n");
    if (b->in_use)
      printf ("                [%d]: in-use\n", f++);
    if (b->auto_enabled)
      printf ("                [%d]: auto\n", f++);
    printf ("            name: %s\n", b->name);
    printf ("            granularity: %" PRIu64 "\n", b->granularity);
  }
}

static void
print_bitmaps_json (const struct layer *l, const char *indent)
{
  uint32_t i;

  if (l->nb_bitmaps == 0)
    return;
  printf ("%s            \"bitmaps\": [\n", indent);
  for (i = 0; i < l->nb_bitmaps; i++) {
    const struct q2_bitmap_info *b = &l->bitmaps[i];
    printf ("%s                {\n", indent);
    printf ("%s                    \"flags\": [\n", indent);
    if (b->in_use)
      printf ("%s                        \"in-use\"%s\n", indent,
              b->auto_enabled ? "," : "");
    if (b->auto_enabled)
      printf ("%s                        \"auto\"\n", indent);
    printf ("%s                    ],\n", indent);
    printf ("%s                    \"name\": ", indent);
    json_string (stdout, b->name);
    printf (",\n%s                    \"granularity\": %" PRIu64 "\n",
            indent, b->granularity);
    printf ("%s                }%s\n", indent,
            i + 1 < l->nb_bitmaps ? "," : "");
  }
  printf ("%s            ],\n", indent);
}

static void
print_text (const struct layer *l)
{
  const struct q2_image_info *in = &l->info;
  char buf[64];

  printf ("image: %s\n", l->name);
  printf ("file format: %s\n", in->format);
  format_size (in->virtual_size, buf, sizeof buf);
  printf ("virtual size: %s (%" PRIu64 " bytes)\n", buf, in->virtual_size);
  format_size (disk_size (in->path), buf, sizeof buf);
  printf ("disk size: %s\n", buf);
  if (strcmp (in->format, "qcow2") != 0)
    return;
  if (l->enc.format)
    printf ("encrypted: yes\n");
  printf ("cluster_size: %u\n", in->cluster_size);
  if (in->dirty)
    printf ("cleanly shut down: no\n");
  if (in->backing_file) {
    printf ("backing file: %s", in->backing_file);
    if (l->backing_name && strcmp (l->backing_name, in->backing_file) != 0)
      printf (" (actual path: %s)", l->backing_name);
    printf ("\n");
    if (in->backing_format)
      printf ("backing file format: %s\n", in->backing_format);
  }
  print_snapshot_table (l->img);
  printf ("Format specific information:\n");
  printf ("    compat: %s\n", compat_name (in->version));
  printf ("    compression type: %s\n", in->compression_type ? "zstd" : "zlib");
  /* Version 2 has none of the v3 fields (as in the JSON). */
  if (in->version >= 3) {
    printf ("    lazy refcounts: %s\n", bool_name (in->lazy_refcounts));
    print_bitmaps_text (l);
  }
  printf ("    refcount bits: %u\n", in->refcount_bits);
  /* In qemu-img's order, encrypt between the data file's two lines. */
  if (in->data_file)
    printf ("    data file: %s\n", in->data_file);
  if (l->enc.format)
    print_encrypt_text (&l->enc);
  if (in->data_file)
    printf ("    data file raw: %s\n", bool_name (in->data_file_raw));
  if (in->version >= 3) {
    printf ("    corrupt: %s\n", bool_name (in->corrupt));
    printf ("    extended l2: %s\n", bool_name (in->extended_l2));
  }
}

static void
print_json_snapshots (struct q2_image *img, const char *indent)
{
  int n = q2_snapshot_count (img), i;

  if (n <= 0)
    return;
  printf ("%s    \"snapshots\": [", indent);
  for (i = 0; i < n; i++) {
    struct q2_snapshot_info s;
    if (q2_snapshot_get (img, i, &s) < 0)
      continue;
    printf ("%s\n%s        {\n", i ? "," : "", indent);
    if (s.icount != UINT64_MAX)
      printf ("%s            \"icount\": %" PRId64 ",\n", indent,
              (int64_t) s.icount);
    printf ("%s            \"vm-clock-nsec\": %" PRIu64 ",\n", indent,
            s.vm_clock_nsec % 1000000000);
    printf ("%s            \"name\": ", indent);
    json_string (stdout, s.name);
    printf (",\n%s            \"date-sec\": %u,\n", indent, s.date_sec);
    printf ("%s            \"date-nsec\": %u,\n", indent, s.date_nsec);
    printf ("%s            \"vm-clock-sec\": %" PRIu64 ",\n", indent,
            s.vm_clock_nsec / 1000000000);
    printf ("%s            \"id\": ", indent);
    json_string (stdout, s.id);
    printf (",\n%s            \"vm-state-size\": %" PRIu64 "\n%s        }",
            indent, s.vm_state_size, indent);
  }
  printf ("\n%s    ],\n", indent);
}

static void
print_json (const struct layer *l, const char *indent)
{
  const struct q2_image_info *in = &l->info;
  bool qcow2 = strcmp (in->format, "qcow2") == 0;

  printf ("%s{\n", indent);
  if (in->backing_format) {
    printf ("%s    \"backing-filename-format\": ", indent);
    json_string (stdout, in->backing_format);
    printf (",\n");
  }
  if (qcow2)
    print_json_snapshots (l->img, indent);
  printf ("%s    \"virtual-size\": %" PRIu64 ",\n", indent, in->virtual_size);
  printf ("%s    \"filename\": ", indent);
  json_string (stdout, l->name);
  printf (",\n");
  if (qcow2)
    printf ("%s    \"cluster-size\": %u,\n", indent, in->cluster_size);
  printf ("%s    \"format\": \"%s\",\n", indent, in->format);
  printf ("%s    \"actual-size\": %" PRIu64 ",\n", indent,
          disk_size (in->path));
  if (qcow2) {
    printf ("%s    \"format-specific\": {\n", indent);
    printf ("%s        \"type\": \"qcow2\",\n", indent);
    printf ("%s        \"data\": {\n", indent);
    printf ("%s            \"compat\": \"%s\",\n", indent,
            compat_name (in->version));
    if (in->version >= 3) {
      printf ("%s            \"compression-type\": \"%s\",\n", indent,
              in->compression_type ? "zstd" : "zlib");
      printf ("%s            \"lazy-refcounts\": %s,\n", indent,
              bool_name (in->lazy_refcounts));
      print_bitmaps_json (l, indent);
      printf ("%s            \"refcount-bits\": %u,\n", indent,
              in->refcount_bits);
      if (in->data_file) {
        printf ("%s            \"data-file\": ", indent);
        json_string (stdout, in->data_file);
        printf (",\n");
      }
      if (l->enc.format) {
        print_encrypt_json (&l->enc, indent);
        printf (",\n");
      }
      if (in->data_file)
        printf ("%s            \"data-file-raw\": %s,\n", indent,
                bool_name (in->data_file_raw));
      printf ("%s            \"corrupt\": %s,\n", indent,
              bool_name (in->corrupt));
      printf ("%s            \"extended-l2\": %s\n", indent,
              bool_name (in->extended_l2));
    }
    else {
      printf ("%s            \"compression-type\": \"zlib\",\n", indent);
      printf ("%s            \"refcount-bits\": %u%s\n", indent,
              in->refcount_bits, l->enc.format ? "," : "");
      if (l->enc.format) {
        print_encrypt_json (&l->enc, indent);
        printf ("\n");
      }
    }
    printf ("%s        }\n%s    },\n", indent, indent);
  }
  if (in->backing_file) {
    printf ("%s    \"full-backing-filename\": ", indent);
    json_string (stdout, l->backing_name ? l->backing_name : in->backing_file);
    printf (",\n%s    \"backing-filename\": ", indent);
    json_string (stdout, in->backing_file);
    printf (",\n");
  }
  if (l->enc.format)
    printf ("%s    \"encrypted\": true,\n", indent);
  printf ("%s    \"dirty-flag\": %s\n", indent, bool_name (in->dirty));
  printf ("%s}", indent);
}

static bool
hdr_is_encrypted (struct q2_image *img, struct q2_encrypt_info *enc)
{
  /* The format is known even when the LUKS header is damaged. */
  q2_encrypt_info_get (img, enc);
  return enc->format != 0;
}

/* Collects the layers of the chain with their display names. */
static int
collect_layers (struct q2_image *top, const char *top_name,
                struct layer *layers, int max)
{
  struct q2_image *img = top;
  const char *name = top_name;
  int n = 0;

  while (img && n < max) {
    struct layer *l = &layers[n++];
    l->img = img;
    q2_image_get_info (img, &l->info);
    l->name = strdup (name);
    l->backing_name = l->info.backing_file ?
      combine_backing_name (name, l->info.backing_file) : NULL;
    if (l->name == NULL || (l->info.backing_file && !l->backing_name)) {
      tool_error ("out of memory");
      return -1;
    }
    if (q2_encrypt_info_get (img, &l->enc) < 0 ||
        q2_bitmap_list (img, &l->bitmaps, &l->nb_bitmaps) < 0) {
      tool_error ("Could not open '%s': %s", name, q2_last_error ());
      return -1;
    }
    name = l->backing_name;
    img = l->info.backing;
  }
  return n;
}

/* Is any layer of the chain encrypted? */
static bool
chain_is_encrypted (struct q2_image *img)
{
  struct q2_encrypt_info enc;
  struct q2_image_info in;

  for (; img; img = in.backing) {
    if (hdr_is_encrypted (img, &enc))
      return true;
    q2_image_get_info (img, &in);
  }
  return false;
}

/* Opens the image (and with chain, its backing chain: without it, like
 * qemu-img, a missing backing file is no error); a chain with an
 * encrypted layer, which needs a key to be opened for I/O, is opened
 * header-only: info needs no password. */
static struct q2_image *
open_for_info (const char *path, bool share, bool chain)
{
  struct q2_open_opts opts = { .readonly = true, .locking = !share,
                               .no_backing = !chain };
  struct q2_open_opts hdr_opts = { .readonly = true, .no_key = true,
                                   .no_backing = !chain };
  struct q2_image *img, *hdr;
  char *msg;
  int r;

  if ((r = q2_open (path, &opts, &img)) == 0)
    return img;
  msg = strdup (q2_last_error ());
  if (q2_open (path, &hdr_opts, &hdr) == 0) {
    /* Only for encrypted layers; for anything else the first error
     * stands.  A damaged LUKS header is reported by the caller. */
    if (chain_is_encrypted (hdr)) {
      free (msg);
      return hdr;
    }
    q2_close (hdr);
  }
  tool_error ("Could not open '%s': %s%s", path, msg ? msg : "out of memory",
              open_hint (r));
  free (msg);
  return NULL;
}

int
cmd_info (int argc, char **argv)
{
  static const struct option long_opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "output", required_argument, NULL, 'O' },
    { "backing-chain", no_argument, NULL, 'c' },
    { "force-share", no_argument, NULL, 'U' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct layer layers[Q2_MAX_CHAIN_DEPTH + 2];
  bool json = false, chain = false, share = false;
  struct q2_image *img;
  int c, n, i;

  if (wants_help (argc, argv)) {
    fputs (info_help, stdout);
    return 0;
  }
  optind = 1;
  while ((c = getopt_long (argc, argv, "+f:U", long_opts, NULL)) != -1) {
    switch (c) {
    case 'j': json = true; break;
    case 'c': chain = true; break;
    case 'U': share = true; break;
    case 'f': break;
    case 'O':
      if (strcmp (optarg, "json") == 0)
        json = true;
      else if (strcmp (optarg, "human") == 0)
        json = false;
      else {
        tool_error ("--output: unknown format '%s'", optarg);
        return EXIT_FAIL;
      }
      break;
    default:
      fputs (info_help, stderr);
      return EXIT_FAIL;
    }
  }
  if (argc - optind != 1) {
    tool_error ("info: expecting one image");
    return EXIT_FAIL;
  }
  img = open_for_info (argv[optind], share, chain);
  if (img == NULL)
    return EXIT_FAIL;
  memset (layers, 0, sizeof layers);
  n = collect_layers (img, argv[optind], layers, chain ?
                      Q2_MAX_CHAIN_DEPTH + 2 : 1);
  if (n < 0) {
    for (i = 0; i < Q2_MAX_CHAIN_DEPTH + 2; i++) {
      free (layers[i].name);
      free (layers[i].backing_name);
    }
    q2_close (img);
    return EXIT_FAIL;
  }
  if (json && chain)
    printf ("[\n");
  for (i = 0; i < n; i++) {
    if (json) {
      print_json (&layers[i], chain ? "    " : "");
      printf ("%s\n", chain && i + 1 < n ? "," : "");
    }
    else {
      if (i)
        printf ("\n");
      print_text (&layers[i]);
    }
  }
  if (json && chain)
    printf ("]\n");
  for (i = 0; i < n; i++) {
    free (layers[i].name);
    free (layers[i].backing_name);
    free (layers[i].bitmaps);
  }
  q2_close (img);
  return 0;
}
