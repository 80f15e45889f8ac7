/* LD_PRELOAD write logger for tests/crash.bats: logs every modification and sync of the target files.
 * CRASHLOG=/abs/log  CRASHFILES=/abs/a:/abs/b (matched by dev/inode).
 * Each intercepted call runs under one global mutex, so the log order is
 * the order in which the kernel saw them. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

enum { R_WRITE = 1, R_SYNC = 2, R_TRUNC = 3, R_PUNCH = 4, R_ZERORANGE = 5,
       R_MARK = 6, R_FALLOC = 7 };

struct rec {
  uint32_t magic, type, file, pad;
  uint64_t off, len, extra;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int logfd = -1;
static int nfiles;
static dev_t devs[4];
static ino_t inos[4];
static int inited;

static ssize_t (*r_pwritev) (int, const struct iovec *, int, off_t);
static ssize_t (*r_pwritev64) (int, const struct iovec *, int, off_t);
static ssize_t (*r_write) (int, const void *, size_t);
static int (*r_fallocate) (int, int, off_t, off_t);
static int (*r_fallocate64) (int, int, off_t, off_t);
static int (*r_ftruncate) (int, off_t);
static int (*r_ftruncate64) (int, off_t);
static int (*r_fsync) (int);
static int (*r_fdatasync) (int);
static ssize_t (*r_splice) (int, loff_t *, int, loff_t *, size_t, unsigned);
static int (*r_sync_file_range) (int, off_t, off_t, unsigned);

static void
init (void)
{
  if (inited)
    return;
  inited = 1;
  r_pwritev = dlsym (RTLD_NEXT, "pwritev");
  r_pwritev64 = dlsym (RTLD_NEXT, "pwritev64");
  r_write = dlsym (RTLD_NEXT, "write");
  r_fallocate = dlsym (RTLD_NEXT, "fallocate");
  r_fallocate64 = dlsym (RTLD_NEXT, "fallocate64");
  r_ftruncate = dlsym (RTLD_NEXT, "ftruncate");
  r_ftruncate64 = dlsym (RTLD_NEXT, "ftruncate64");
  r_fsync = dlsym (RTLD_NEXT, "fsync");
  r_fdatasync = dlsym (RTLD_NEXT, "fdatasync");
  r_splice = dlsym (RTLD_NEXT, "splice");
  r_sync_file_range = dlsym (RTLD_NEXT, "sync_file_range");
  const char *l = getenv ("CRASHLOG"), *f = getenv ("CRASHFILES");
  if (!l || !f)
    return;
  logfd = open (l, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  char *s = strdup (f), *save, *t;
  for (t = strtok_r (s, ":", &save); t && nfiles < 4;
       t = strtok_r (NULL, ":", &save)) {
    struct stat st;
    if (stat (t, &st) == 0) {
      devs[nfiles] = st.st_dev;
      inos[nfiles] = st.st_ino;
      nfiles++;
    }
  }
  free (s);
}

static int
target (int fd)
{
  struct stat st;
  int i;
  if (logfd < 0 || fd < 0 || fd == logfd)
    return -1;
  if (fstat (fd, &st) == -1 || !S_ISREG (st.st_mode))
    return -1;
  for (i = 0; i < nfiles; i++)
    if (st.st_dev == devs[i] && st.st_ino == inos[i])
      return i;
  return -1;
}

static void
emit (uint32_t type, int file, uint64_t off, uint64_t len, uint64_t extra,
      const struct iovec *iov, int n)
{
  struct rec h = { 0x43525348, type, file, 0, off, len, extra };
  struct iovec v[1 + 64];
  int k = 0, i;
  v[k++] = (struct iovec) { &h, sizeof h };
  for (i = 0; i < n && k < 65; i++)
    v[k++] = iov[i];
  /* one writev: atomic with O_APPEND */
  ssize_t want = 0, done;
  for (i = 0; i < k; i++)
    want += v[i].iov_len;
  done = syscall (SYS_writev, logfd, v, k);
  if (done != want) {
    static const char m[] = "crashshim: short log write\n";
    syscall (SYS_write, 2, m, sizeof m - 1);
    abort ();
  }
}

/* Write len bytes that ended at off (the real call succeeded with n). */
static void
log_iov (int file, uint64_t off, const struct iovec *iov, int cnt, size_t n)
{
  struct iovec v[64];
  int k = 0;
  size_t left = n;
  for (int i = 0; i < cnt && left > 0 && k < 64; i++) {
    size_t l = iov[i].iov_len < left ? iov[i].iov_len : left;
    v[k++] = (struct iovec) { iov[i].iov_base, l };
    left -= l;
  }
  emit (R_WRITE, file, off, n, 0, v, k);
}


#define WRAP_PWRITEV(name, real)                                          \
  ssize_t name (int fd, const struct iovec *iov, int cnt, off_t off)     \
  {                                                                       \
    init ();                                                              \
    int t = target (fd);                                                  \
    if (t < 0)                                                            \
      return real (fd, iov, cnt, off);                                    \
    pthread_mutex_lock (&mu);                                             \
    ssize_t r = real (fd, iov, cnt, off);                                 \
    int e = errno;                                                        \
    if (r > 0)                                                            \
      log_iov (t, off, iov, cnt, r);                                      \
    pthread_mutex_unlock (&mu);                                           \
    errno = e;                                                            \
    return r;                                                             \
  }
WRAP_PWRITEV (pwritev, r_pwritev)
WRAP_PWRITEV (pwritev64, r_pwritev64)

/* pwrite is logged as the one-element pwritev it is. */
#define WRAP_PWRITE(name)                                             \
  ssize_t name (int fd, const void *buf, size_t count, off_t off)    \
  {                                                                   \
    struct iovec v = { (void *) buf, count };                         \
    return pwritev (fd, &v, 1, off);                                  \
  }
WRAP_PWRITE (pwrite)
WRAP_PWRITE (pwrite64)

ssize_t
write (int fd, const void *buf, size_t count)
{
  init ();
  int t = target (fd);
  if (t < 0)
    return r_write (fd, buf, count);
  pthread_mutex_lock (&mu);
  off_t off = lseek (fd, 0, SEEK_CUR);
  ssize_t r = r_write (fd, buf, count);
  int e = errno;
  if (r > 0) {
    struct iovec v = { (void *) buf, r };
    log_iov (t, off, &v, 1, r);
  }
  pthread_mutex_unlock (&mu);
  errno = e;
  return r;
}

static int
do_fallocate (int (*real) (int, int, off_t, off_t), int fd, int mode,
              off_t off, off_t len)
{
  init ();
  int t = target (fd);
  if (t < 0)
    return real (fd, mode, off, len);
  pthread_mutex_lock (&mu);
  int r = real (fd, mode, off, len);
  int e = errno;
  if (r == 0) {
    uint32_t type = R_FALLOC;
    if (mode & FALLOC_FL_PUNCH_HOLE) type = R_PUNCH;
    else if (mode & FALLOC_FL_ZERO_RANGE) type = R_ZERORANGE;
    emit (type, t, off, len, mode, NULL, 0);
  }
  pthread_mutex_unlock (&mu);
  errno = e;
  return r;
}
int fallocate (int fd, int mode, off_t off, off_t len)
{ init (); return do_fallocate (r_fallocate, fd, mode, off, len); }
int fallocate64 (int fd, int mode, off_t off, off_t len)
{ init (); return do_fallocate (r_fallocate64, fd, mode, off, len); }

static int
do_trunc (int (*real) (int, off_t), int fd, off_t len)
{
  int t = target (fd);
  if (t < 0)
    return real (fd, len);
  pthread_mutex_lock (&mu);
  int r = real (fd, len);
  int e = errno;
  if (r == 0)
    emit (R_TRUNC, t, len, 0, 0, NULL, 0);
  pthread_mutex_unlock (&mu);
  errno = e;
  return r;
}
int ftruncate (int fd, off_t len) { init (); return do_trunc (r_ftruncate, fd, len); }
int ftruncate64 (int fd, off_t len) { init (); return do_trunc (r_ftruncate64, fd, len); }

static int
do_sync (int (*real) (int), int fd)
{
  int t = target (fd);
  if (t < 0)
    return real (fd);
  /* The sync itself runs outside the mutex (it may take long), but it
   * covers only what was logged before it started: log it at its start
   * as SYNC-begin is not enough; we log at completion with the sequence
   * of the last record logged before it started.  Simplest correct
   * approach: hold the mutex. */
  pthread_mutex_lock (&mu);
  int r = real (fd);
  int e = errno;
  if (r == 0)
    emit (R_SYNC, t, 0, 0, 0, NULL, 0);
  pthread_mutex_unlock (&mu);
  errno = e;
  return r;
}
int fsync (int fd) { init (); return do_sync (r_fsync, fd); }
int fdatasync (int fd) { init (); return do_sync (r_fdatasync, fd); }

int
sync_file_range (int fd, off_t off, off_t n, unsigned flags)
{
  init ();
  int t = target (fd);
  if (t >= 0) {
    static const char m[] = "crashshim: sync_file_range on target\n";
    syscall (SYS_write, 2, m, sizeof m - 1);
  }
  return r_sync_file_range (fd, off, n, flags);
}

ssize_t
splice (int in, loff_t *ino, int out, loff_t *outo, size_t len,
        unsigned flags)
{
  init ();
  int t = target (out);
  if (t < 0 || outo == NULL)
    return r_splice (in, ino, out, outo, len, flags);
  pthread_mutex_lock (&mu);
  loff_t start = *outo;
  ssize_t r = r_splice (in, ino, out, outo, len, flags);
  int e = errno;
  if (r > 0) {
    void *b = malloc (r);
    if (pread (out, b, r, start) != r)
      abort ();
    struct iovec v = { b, r };
    log_iov (t, start, &v, 1, r);
    free (b);
  }
  pthread_mutex_unlock (&mu);
  errno = e;
  return r;
}
