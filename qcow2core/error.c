/* Per-thread error messages: the core returns -errno and leaves the
 * reason here for the caller (the plugin or the tool) to print. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

static __thread char last_error[1024];

const char *
q2_last_error (void)
{
  return last_error[0] ? last_error : "unknown error";
}

int
q2_err (int errnum, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (last_error, sizeof last_error, fmt, ap);
  va_end (ap);
  return -errnum;
}

int
q2_err_prefix (int r, const char *fmt, ...)
{
  char old[sizeof last_error];
  size_t n;
  va_list ap;

  memcpy (old, last_error, sizeof old);
  va_start (ap, fmt);
  n = vsnprintf (last_error, sizeof last_error, fmt, ap);
  va_end (ap);
  if (n + 2 < sizeof last_error) {
    memcpy (last_error + n, ": ", 2);
    n += 2;
    memcpy (last_error + n, old, sizeof last_error - n - 1);
    last_error[sizeof last_error - 1] = '\0';
  }
  return r;
}
