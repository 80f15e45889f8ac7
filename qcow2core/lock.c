/* QEMU-compatible image locking with OFD byte-range locks.
 *
 * QEMU takes a shared lock on byte 100+N for each permission N it holds
 * and on byte 200+N for each permission it does not let others have;
 * before that it checks that nobody else holds a byte that conflicts.
 * Doing the same makes qemu-img and qemu-nbd refuse an image we write,
 * and us refuse one they write. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define PERM_BASE 100
#define SHARED_BASE 200

/* QEMU's permission bits. */
enum { P_READ = 0, P_WRITE = 1, P_WRITE_UNCHANGED = 2, P_RESIZE = 3,
       P_MAX = 4 };

static const char *const perm_names[P_MAX] = {
  "consistent read", "write", "write unchanged", "resize"
};

static int
set_lock (int fd, short type, off_t off)
{
  struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = off,
                      .l_len = 1 };

  return fcntl (fd, F_OFD_SETLK, &fl);
}

/* Does another open file hold a lock on this byte? */
static bool
locked_by_other (int fd, off_t off)
{
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = off,
                      .l_len = 1 };

  if (fcntl (fd, F_OFD_GETLK, &fl) == -1)
    return false;
  return fl.l_type != F_UNLCK;
}

void
q2_unlock_image (int fd)
{
  int i;

  /* Another process (a forked child) may still share this file
   * description, so its locks would outlive our close. */
  for (i = 0; i < P_MAX; i++) {
    set_lock (fd, F_UNLCK, PERM_BASE + i);
    set_lock (fd, F_UNLCK, SHARED_BASE + i);
  }
}

int
q2_lock_image (int fd, const char *path, bool write)
{
  /* A writer holds read, write and resize and shares only reads; a
   * reader holds read and shares everything but write and resize. */
  unsigned perm = (1u << P_READ) | (write ? (1u << P_WRITE) |
                                    (1u << P_RESIZE) : 0);
  unsigned shared = (1u << P_READ) | (1u << P_WRITE_UNCHANGED);
  int i;

  for (i = 0; i < P_MAX; i++) {
    short t = F_UNLCK;
    if (perm & (1u << i))
      t = F_RDLCK;
    if (set_lock (fd, t, PERM_BASE + i) == -1 && t != F_UNLCK)
      goto failed;
    t = (shared & (1u << i)) ? F_UNLCK : F_RDLCK;
    if (set_lock (fd, t, SHARED_BASE + i) == -1 && t != F_UNLCK)
      goto failed;
  }
  for (i = 0; i < P_MAX; i++) {
    if ((perm & (1u << i)) && locked_by_other (fd, SHARED_BASE + i))
      return q2_err (EBUSY, "%s%sfailed to get the \"%s\" lock: is "
                     "another process (qemu?) using the image?", path,
                     *path ? ": " : "", perm_names[i]);
    if (!(shared & (1u << i)) && locked_by_other (fd, PERM_BASE + i))
      return q2_err (EBUSY, "%s%sfailed to get the shared \"%s\" lock: "
                     "is another process (qemu?) using the image?", path,
                     *path ? ": " : "", perm_names[i]);
  }
  return 0;

 failed:
  if (errno == EINVAL || errno == ENOTSUP || errno == ENOLCK)
    return 0;                   /* no OFD locks here: run unlocked */
  {
    int e = errno;
    return q2_err (e == EAGAIN || e == EACCES ? EBUSY : e,
                   "%s%scannot lock the image: %s", path, *path ? ": " : "",
                   strerror (e));
  }
}
