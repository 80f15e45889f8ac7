/* Whole-buffer file I/O: loops over short transfers and names what was
 * being read or written in the error message. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

int
q2_io_pread (int fd, void *buf, size_t count, uint64_t offset,
             bool zero_past_eof, const char *what)
{
  uint8_t *p = buf;

  if (offset > INT64_MAX || count > INT64_MAX - offset)
    return q2_err (EIO, "%s: offset %#llx is out of range",
                   what, (unsigned long long) offset);
  while (count > 0) {
    ssize_t r = pread (fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      int e = errno;
      return q2_err (e, "%s: read at offset %#llx: %s",
                     what, (unsigned long long) offset, strerror (e));
    }
    if (r == 0) {
      if (zero_past_eof) {
        memset (p, 0, count);
        return 0;
      }
      return q2_err (EIO, "%s: offset %#llx is past the end of the file",
                     what, (unsigned long long) offset);
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

int
q2_io_pwrite (int fd, const void *buf, size_t count, uint64_t offset,
              const char *what)
{
  const uint8_t *p = buf;

  while (count > 0) {
    ssize_t r = pwrite (fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      int e = errno;
      return q2_err (e, "%s: write at offset %#llx: %s",
                     what, (unsigned long long) offset, strerror (e));
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

int
q2_io_file_size (int fd, uint64_t *size)
{
  struct stat st;

  if (fstat (fd, &st) == -1) {
    int e = errno;
    return q2_err (e, "fstat: %s", strerror (e));
  }
  *size = st.st_size;
  return 0;
}
