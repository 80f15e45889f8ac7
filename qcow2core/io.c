/* Whole-buffer file I/O: loops over short transfers and names what was
 * being read or written in the error message. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

#ifdef Q2_FAULT_INJECTION
/* Fault injection, compiled only into the unit tests' copy of this
 * file: fail the N-th write, sync or read from now on (0 = never). */
enum { F_WRITE, F_SYNC, F_READ, NR_F };
static uint64_t fail_at[NR_F], nr_calls[NR_F];
static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
/* Until a test calls q2_fault_arm (even with 0, 0, 0, to count), a
 * call pays one load and no lock. */
static bool armed;

void
q2_fault_arm (uint64_t write_n, uint64_t sync_n, uint64_t read_n)
{
  pthread_mutex_lock (&fault_lock);
  fail_at[F_WRITE] = write_n;
  fail_at[F_SYNC] = sync_n;
  fail_at[F_READ] = read_n;
  memset (nr_calls, 0, sizeof nr_calls);
  __atomic_store_n (&armed, true, __ATOMIC_RELEASE);
  pthread_mutex_unlock (&fault_lock);
}

void
q2_fault_counts (uint64_t *writes, uint64_t *syncs, uint64_t *reads)
{
  pthread_mutex_lock (&fault_lock);
  *writes = nr_calls[F_WRITE];
  *syncs = nr_calls[F_SYNC];
  *reads = nr_calls[F_READ];
  pthread_mutex_unlock (&fault_lock);
}

static bool
fault (int kind)
{
  bool hit;

  if (!__atomic_load_n (&armed, __ATOMIC_ACQUIRE))
    return false;
  pthread_mutex_lock (&fault_lock);
  hit = ++nr_calls[kind] == fail_at[kind];
  pthread_mutex_unlock (&fault_lock);
  return hit;
}
#else
#define fault(kind) false
#endif

int
q2_io_pread (int fd, void *buf, size_t count, uint64_t offset,
             bool zero_past_eof, const char *what)
{
  uint8_t *p = buf;

  if (offset > INT64_MAX || count > INT64_MAX - offset)
    return q2_err (EIO, "%s: offset %#llx is out of range",
                   what, (unsigned long long) offset);
  if (fault (F_READ))
    return q2_err (EIO, "%s: injected read failure at offset %#llx", what,
                   (unsigned long long) offset);
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
q2_io_sync (int fd, const char *what)
{
  if (fault (F_SYNC))
    return q2_err (EIO, "%s: injected sync failure", what);
  if (fdatasync (fd) == -1) {
    int e = errno;
    return q2_err (e, "%s: fdatasync: %s", what, strerror (e));
  }
  return 0;
}

int
q2_io_pwritev (int fd, const struct iovec *iov, int n, uint64_t offset,
               const char *what)
{
  size_t total = 0;
  ssize_t w;
  int i, r;

  for (i = 0; i < n; i++)
    total += iov[i].iov_len;
  if (fault (F_WRITE))
    return q2_err (EIO, "%s: injected write failure at offset %#llx", what,
                   (unsigned long long) offset);
  w = pwritev (fd, iov, n, offset);
  if (w == (ssize_t) total)
    return 0;
  /* Short or interrupted: finish piece by piece. */
  for (i = 0; i < n; i++) {
    if ((r = q2_io_pwrite (fd, iov[i].iov_base, iov[i].iov_len, offset,
                           what)) < 0)
      return r;
    offset += iov[i].iov_len;
  }
  return 0;
}

int
q2_io_splice_out (int pipe_fd, int fd, uint64_t count, uint64_t offset,
                  const char *what)
{
  loff_t o = offset;
  uint64_t done = 0;

  if (fault (F_WRITE))
    return q2_err (EIO, "%s: injected write failure at offset %#llx", what,
                   (unsigned long long) offset);
  while (done < count) {
    ssize_t r = splice (pipe_fd, NULL, fd, &o, count - done,
                        SPLICE_F_NONBLOCK);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1 && done == 0 && errno == EINVAL)
      return 0;                 /* this file system cannot splice */
    if (r <= 0) {
      int e = r == 0 ? EIO : errno;
      return q2_err (e, "%s: write at offset %#llx: %s", what,
                     (unsigned long long) (offset + done),
                     r == 0 ? "short splice" : strerror (e));
    }
    done += r;
  }
  return 1;
}

int
q2_io_pwrite (int fd, const void *buf, size_t count, uint64_t offset,
              const char *what)
{
  const uint8_t *p = buf;

  if (fault (F_WRITE))
    return q2_err (EIO, "%s: injected write failure at offset %#llx", what,
                   (unsigned long long) offset);

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
