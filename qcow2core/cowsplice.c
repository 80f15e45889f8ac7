/* Copy-on-write without a bounce buffer.  When the untouched part of a
 * new cluster comes from plain file ranges below (a raw backing file, or
 * normal clusters of an unencrypted qcow2 one), it is spliced through a
 * per-thread pipe into the image together with the guest data: the page
 * cache is copied once, straight into the new cluster, instead of into
 * a buffer and out again.  Anything else (compressed or encrypted
 * clusters below, a backing file shorter than its table says, a file
 * system without splice, a cluster too big for a pipe) falls back to the
 * buffered path by returning 0. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define MAX_PIECES 16

struct piece {
  int fd;                       /* -1: zeros */
  const uint8_t *buf;           /* fd == -1 and buf != NULL: guest data */
  uint64_t off, len;
};

struct pieces {
  struct piece p[MAX_PIECES];
  int n;
};

static bool
add_piece (struct pieces *ps, int fd, const uint8_t *buf, uint64_t off,
           uint64_t len)
{
  struct piece *last = ps->n ? &ps->p[ps->n - 1] : NULL;

  if (len == 0)
    return true;
  /* Contiguous ranges of one file, or runs of zeros, merge. */
  if (last && fd >= 0 && last->fd == fd && last->off + last->len == off) {
    last->len += len;
    return true;
  }
  if (last && fd < 0 && buf == NULL && last->fd < 0 && last->buf == NULL) {
    last->len += len;
    return true;
  }
  if (ps->n == MAX_PIECES)
    return false;
  ps->p[ps->n++] = (struct piece) { fd, buf, off, len };
  return true;
}

/* Describes [off, off+len) of layer b (NULL: no layer, zeros) as file
 * ranges and zeros.  1: done; 0: not expressible; < 0: error. */
static int
resolve (struct q2_image *b, uint64_t off, uint64_t len, struct pieces *ps)
{
  while (len > 0) {
    uint64_t n, end;
    struct q2_map m;
    int r;

    if (b == NULL || off >= b->virtual_size)
      return add_piece (ps, -1, NULL, 0, len);
    n = Q2_MIN (len, b->virtual_size - off);
    if (b->fmt == Q2_FMT_RAW) {
      if (off + n > b->file_size)
        return 0;
      if (!add_piece (ps, b->fd, NULL, off, n))
        return 0;
    }
    else {
      if ((r = q2_map (b, off, n, &m)) < 0)
        return r;
      n = m.length;
      switch (m.type) {
      case Q2_NORMAL:
        if (b->crypto || b->hdr.crypt_method)
          return 0;
        end = b->data_fd == b->fd ? b->file_size : b->data_file_size;
        if (m.host_offset > end || n > end - m.host_offset)
          return 0;             /* reads as zeros past the end: buffered */
        if (!add_piece (ps, b->data_fd, NULL, m.host_offset, n))
          return 0;
        break;
      case Q2_ZERO:
        if (!add_piece (ps, -1, NULL, 0, n))
          return 0;
        break;
      case Q2_UNALLOC:
        if ((r = resolve (b->backing, off, n, ps)) <= 0)
          return r;
        break;
      case Q2_COMPRESSED:
        return 0;
      }
    }
    off += n;
    len -= n;
  }
  return 1;
}

/* Puts one piece into the pipe.  true on success; false when the pipe
 * or the source will not take it (the caller falls back). */
static bool
fill_pipe (int wfd, const struct piece *p)
{
  static const uint8_t zeros[4096];
  uint64_t off = p->off, len = p->len, done = 0;

  while (done < len) {
    ssize_t r;
    if (p->fd >= 0) {
      loff_t o = off + done;
      r = splice (p->fd, &o, wfd, NULL, len - done, SPLICE_F_NONBLOCK);
    }
    else if (p->buf)
      r = write (wfd, p->buf + done, len - done);
    else
      r = write (wfd, zeros, Q2_MIN (len - done, sizeof zeros));
    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;             /* EOF, a full pipe, or no splice here */
    done += r;
  }
  return true;
}

int
q2_cow_splice (struct q2_image *img, const uint8_t *data, uint64_t gc,
               uint64_t ra, uint64_t a, uint64_t b, uint64_t rb,
               uint64_t host)
{
  long page = sysconf (_SC_PAGESIZE);
  struct pieces ps = { .n = 0 };
  size_t slots = 0;
  int i, r, fds[2];

  if ((r = resolve (img->backing, gc + ra, a - ra, &ps)) <= 0)
    return r;
  if (!add_piece (&ps, -1, data, 0, b - a))
    return 0;
  if ((r = resolve (img->backing, gc + b, rb - b, &ps)) <= 0)
    return r;

  /* A pipe slot holds at most a page: size the pipe for every piece's
   * pages plus a partial page at each end. */
  for (i = 0; i < ps.n; i++)
    slots += (ps.p[i].len + page - 1) / page + 1;
  if (q2_scratch_pipe (slots * page, fds) < 0)
    return 0;
  for (i = 0; i < ps.n; i++)
    if (!fill_pipe (fds[1], &ps.p[i])) {
      q2_scratch_pipe_discard ();
      return 0;
    }

  pthread_mutex_lock (&img->fill_lock);
  r = q2_io_splice_out (fds[0], img->data_fd, rb - ra, host + ra,
                        "guest data");
  pthread_mutex_unlock (&img->fill_lock);
  if (r <= 0)
    q2_scratch_pipe_discard ();
  return r;
}
