/* Shared helpers for the qcow2core libFuzzer targets.
 *
 * The core does all its file I/O on file descriptors it opens itself
 * from a path, so the fuzz input has to live in a file.  The plan was a
 * memfd (memfd_create) opened as /proc/self/fd/N, our "memory buffer";
 * but q2_open_layer calls realpath () on the path, and realpath of a
 * memfd's /proc/self/fd/N link ("/memfd:... (deleted)") fails with
 * ENOENT.  So the buffer is a file on tmpfs instead (/dev/shm, else
 * $TMPDIR or /tmp), which is just as much memory and never touches a
 * disk.  It is created once per process, rewritten for every input, and
 * removed at exit.
 */
#ifndef QCOW2CORE_FUZZ_COMMON_H
#define QCOW2CORE_FUZZ_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static char fuzz_path[256];
static int fuzz_fd = -1;

static inline void
fuzz_cleanup (void)
{
  if (fuzz_path[0])
    unlink (fuzz_path);
}

static inline void
fuzz_die (const char *what)
{
  perror (what);
  abort ();
}

/* Creates the per-process backing file on first use. */
static inline void
fuzz_file_init (void)
{
  const char *dir = "/dev/shm";
  struct stat st;

  if (fuzz_fd >= 0)
    return;
  if (stat (dir, &st) == -1 || !S_ISDIR (st.st_mode) ||
      access (dir, W_OK) == -1) {
    dir = getenv ("TMPDIR");
    if (dir == NULL || dir[0] == '\0')
      dir = "/tmp";
  }
  snprintf (fuzz_path, sizeof fuzz_path, "%s/q2fuzz-%ld.qcow2", dir,
            (long) getpid ());
  fuzz_fd = open (fuzz_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fuzz_fd == -1)
    fuzz_die (fuzz_path);
  atexit (fuzz_cleanup);
}

/* Replaces the file's contents with data; returns its path. */
static inline const char *
fuzz_file_set (const uint8_t *data, size_t size)
{
  size_t done = 0;

  fuzz_file_init ();
  if (ftruncate (fuzz_fd, 0) == -1)
    fuzz_die ("ftruncate");
  while (done < size) {
    ssize_t r = pwrite (fuzz_fd, data + done, size - done, done);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      fuzz_die ("pwrite");
    }
    done += r;
  }
  return fuzz_path;
}

/* Copies the input so that it can be patched. */
static inline uint8_t *
fuzz_dup (const uint8_t *data, size_t size)
{
  uint8_t *p = malloc (size ? size : 1);

  if (p == NULL)
    fuzz_die ("malloc");
  memcpy (p, data, size);
  return p;
}

/* An image naming an external data file would make the core open (and,
 * for the write target, reopen read-write and write to) a file the
 * input chooses relative to our directory: any file on the machine.  So
 * clear the incompatible "external data file" bit of version 3 headers;
 * the extension itself is still parsed. */
static inline void
fuzz_defuse_data_file (uint8_t *buf, size_t size)
{
  if (size >= 80 && q2_be32 (buf) == QCOW2_MAGIC && q2_be32 (buf + 4) == 3)
    buf[79] &= ~(uint8_t) QCOW2_INCOMPAT_DATA_FILE;
}

/* A simple deterministic hash of the input for derived offsets. */
static inline uint64_t
fuzz_hash (const uint8_t *data, size_t size)
{
  uint64_t h = 0xcbf29ce484222325ULL;
  size_t i, step = size > 4096 ? size / 4096 : 1;

  for (i = 0; i < size; i += step)
    h = (h ^ data[i]) * 0x100000001b3ULL;
  return h ^ size;
}

#endif /* QCOW2CORE_FUZZ_COMMON_H */
