/* Preloaded with ASan into nbdkit by `make check-sanitize` only.
 *
 * With the ASan runtime preloaded, nbdkit 1.32 hangs in exit() after a
 * startup error: p11-kit's destructor calls freelocale() while glibc's
 * locale lock is held.  Freeing a locale at exit serves no purpose, so
 * this no-op lets nbdkit exit and the tests see its real exit status. */
#include <locale.h>

void
freelocale (locale_t l)
{
  (void) l;
}
