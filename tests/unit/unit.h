/* A tiny assertion framework for the qcow2core unit tests.
 *
 *   CHECK (cond)             counts a pass, or prints file:line and the
 *                            expression and counts a failure
 *   CHECK_EQ_U64 (a, b)      the same, printing both values on failure
 *   CHECK_EQ_INT (a, b)      signed variant (errno values, return codes)
 *   CHECK_STR_CONTAINS (s, needle)
 *   unit_context (fmt, ...)  text printed with every failure until it is
 *                            changed or cleared (unit_context (NULL)),
 *                            for checks inside loops
 *   RUN (fn)                 runs a void (void) test function by name
 *   return unit_done ();     prints "N passed, N failed" and gives the
 *                            exit status: 1 if anything failed
 *
 * Checks do not stop the test, so one run reports every failure.
 */
#ifndef QCOW2CORE_TESTS_UNIT_H
#define QCOW2CORE_TESTS_UNIT_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long unit_passed, unit_failed;
static char unit_ctx[256];

static inline void __attribute__ ((format (printf, 1, 2)))
unit_context (const char *fmt, ...)
{
  va_list ap;

  if (fmt == NULL) {
    unit_ctx[0] = '\0';
    return;
  }
  va_start (ap, fmt);
  vsnprintf (unit_ctx, sizeof unit_ctx, fmt, ap);
  va_end (ap);
}

static inline void
unit_fail_where (const char *file, int line)
{
  unit_failed++;
  fflush (stdout);
  fprintf (stderr, "%s:%d: FAIL", file, line);
  if (unit_ctx[0])
    fprintf (stderr, " [%s]", unit_ctx);
  fprintf (stderr, ": ");
}

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (cond)                                                           \
      unit_passed++;                                                    \
    else {                                                              \
      unit_fail_where (__FILE__, __LINE__);                             \
      fprintf (stderr, "CHECK (%s)\n", #cond);                          \
    }                                                                   \
  } while (0)

#define CHECK_EQ_U64(a, b)                                              \
  do {                                                                  \
    uint64_t unit_a_ = (uint64_t) (a), unit_b_ = (uint64_t) (b);        \
    if (unit_a_ == unit_b_)                                             \
      unit_passed++;                                                    \
    else {                                                              \
      unit_fail_where (__FILE__, __LINE__);                             \
      fprintf (stderr, "CHECK_EQ_U64 (%s, %s): %llu (%#llx) != "        \
               "%llu (%#llx)\n", #a, #b,                                \
               (unsigned long long) unit_a_,                            \
               (unsigned long long) unit_a_,                            \
               (unsigned long long) unit_b_,                            \
               (unsigned long long) unit_b_);                           \
    }                                                                   \
  } while (0)

#define CHECK_EQ_INT(a, b)                                              \
  do {                                                                  \
    long long unit_a_ = (long long) (a), unit_b_ = (long long) (b);     \
    if (unit_a_ == unit_b_)                                             \
      unit_passed++;                                                    \
    else {                                                              \
      unit_fail_where (__FILE__, __LINE__);                             \
      fprintf (stderr, "CHECK_EQ_INT (%s, %s): %lld != %lld\n",         \
               #a, #b, unit_a_, unit_b_);                               \
    }                                                                   \
  } while (0)

#define CHECK_STR_CONTAINS(s, needle)                                   \
  do {                                                                  \
    const char *unit_s_ = (s), *unit_n_ = (needle);                     \
    if (unit_s_ != NULL && strstr (unit_s_, unit_n_) != NULL)           \
      unit_passed++;                                                    \
    else {                                                              \
      unit_fail_where (__FILE__, __LINE__);                             \
      fprintf (stderr, "CHECK_STR_CONTAINS (%s, %s): \"%s\" does not "  \
               "contain \"%s\"\n", #s, #needle,                         \
               unit_s_ ? unit_s_ : "(null)", unit_n_);                  \
    }                                                                   \
  } while (0)

#define RUN(fn)                                                         \
  do {                                                                  \
    unsigned long unit_f0_ = unit_failed;                               \
    unit_context (NULL);                                                \
    fn ();                                                              \
    unit_context (NULL);                                                \
    printf ("%s %s\n", unit_failed == unit_f0_ ? "ok  " : "FAIL", #fn); \
    fflush (stdout);                                                    \
  } while (0)

/* Prints the closing line and returns the exit status for main. */
static inline int
unit_done (void)
{
  fflush (stderr);
  printf ("%lu passed, %lu failed\n", unit_passed, unit_failed);
  fflush (stdout);
  return unit_failed ? 1 : 0;
}

#endif /* QCOW2CORE_TESTS_UNIT_H */
