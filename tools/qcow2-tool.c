/* qcow2-tool: create, inspect, check, map and snapshot qcow2 images
 * with the qcow2core engine.  Options and output follow qemu-img. */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tool.h"

static const char usage_text[] =
  "Usage: qcow2-tool COMMAND [OPTIONS] ...\n"
  "\n"
  "Commands:\n"
  "  create [-q] [-u] [-f qcow2] [-o OPTIONS] [-b BACKING [-F FMT]] IMG [SIZE]\n"
  "  info [--json] [--backing-chain] IMG\n"
  "  check [-q] [-r leaks|all] [--json] IMG\n"
  "  map [--json] IMG\n"
  "  snapshot -l | -c NAME | -a NAME | -d NAME IMG\n"
  "\n"
  "Run 'qcow2-tool COMMAND --help' for the options of a command.\n";

void
tool_error (const char *fmt, ...)
{
  va_list ap;

  fputs ("qcow2-tool: ", stderr);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fputc ('\n', stderr);
}

void
tool_core_error (const char *what)
{
  if (what)
    tool_error ("%s: %s", what, q2_last_error ());
  else
    tool_error ("%s", q2_last_error ());
}

bool
wants_help (int argc, char **argv)
{
  int i;

  for (i = 1; i < argc; i++) {
    if (strcmp (argv[i], "--") == 0)
      break;
    if (strcmp (argv[i], "--help") == 0 || strcmp (argv[i], "-h") == 0)
      return true;
  }
  return false;
}

bool
parse_size (const char *s, uint64_t *out)
{
  static const char suffixes[] = "BKMGTPE";
  const char *p;
  char *end, *f;
  double frac = 0;
  uint64_t whole, mult = 1, extra;
  int i;

  /* As QEMU's size parser: decimal, or hex after 0x (no fraction);
   * a fraction needs a suffix; one suffix letter, nothing after it. */
  errno = 0;
  whole = strtoull (s, &end, 10);
  if (errno || end == s || memchr (s, '-', end - s))
    return false;
  if (whole == 0 && (*end == 'x' || *end == 'X')) {
    whole = strtoull (s, &end, 16);
    if (errno || *end == '.')
      return false;
  }
  else if (*end == '.') {
    frac = strtod (end, &f);
    if (frac != frac || memchr (end, 'e', f - end) ||
        memchr (end, 'E', f - end))
      return false;
    end = f == end ? end + 1 : f;       /* "5." is 5 */
  }
  if (*end && (p = strchr (suffixes, toupper ((unsigned char) *end)))) {
    for (i = 0; i < p - suffixes; i++)
      mult *= 1024;
    end++;
  }
  if (*end || (mult == 1 && frac != 0) || whole > UINT64_MAX / mult)
    return false;
  /* The fraction's bytes round half up, as in QEMU; the sum must not
   * wrap (15.99999999999999999999E reads a fraction of 1). */
  extra = (uint64_t) (frac * (double) mult + 0.5);
  if (whole * mult > UINT64_MAX - extra)
    return false;
  *out = whole * mult + extra;
  return true;
}

bool
parse_bool (const char *s, bool *out)
{
  if (strcmp (s, "on") == 0 || strcmp (s, "yes") == 0 ||
      strcmp (s, "true") == 0) {
    *out = true;
    return true;
  }
  if (strcmp (s, "off") == 0 || strcmp (s, "no") == 0 ||
      strcmp (s, "false") == 0) {
    *out = false;
    return true;
  }
  return false;
}

void
format_size (uint64_t v, char *buf, size_t len)
{
  static const char *const units[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi",
                                       "Ei" };
  unsigned i = 0;

  /* The unit is the largest whose value is at least 1000 of the one
   * below (what qemu computes with frexp). */
  while (i < 6 && (double) v >= 1000.0 * (double) (1ULL << (10 * i)))
    i++;
  snprintf (buf, len, "%0.3g %sB", (double) v / (double) (1ULL << (10 * i)),
            units[i]);
}

void
json_string (FILE *f, const char *s)
{
  fputc ('"', f);
  for (; *s; s++) {
    unsigned char c = *s;
    if (c == '"' || c == '\\')
      fprintf (f, "\\%c", c);
    else if (c == '\n')
      fputs ("\\n", f);
    else if (c == '\t')
      fputs ("\\t", f);
    else if (c < 0x20)
      fprintf (f, "\\u%04x", c);
    else
      fputc (c, f);
  }
  fputc ('"', f);
}

/* The whole content of a file; with chomp, trailing newlines are
 * dropped (as nbdkit's password=+FILE does). */
char *
read_secret_file (const char *path, bool chomp)
{
  FILE *f = fopen (path, "re");
  char *buf = NULL;
  size_t len = 0, cap = 0, n;

  if (f == NULL) {
    tool_error ("%s: %s", path, strerror (errno));
    return NULL;
  }
  for (;;) {
    if (cap - len < 4096) {
      char *nb;
      cap = cap ? cap * 2 : 4096;
      nb = realloc (buf, cap);
      if (nb == NULL) {
        free (buf);
        fclose (f);
        tool_error ("out of memory");
        return NULL;
      }
      buf = nb;
    }
    n = fread (buf + len, 1, cap - len - 1, f);
    len += n;
    if (n == 0)
      break;
  }
  if (ferror (f)) {
    tool_error ("%s: %s", path, strerror (errno));
    fclose (f);
    free (buf);
    return NULL;
  }
  fclose (f);
  buf[len] = '\0';
  if (strlen (buf) != len) {
    tool_error ("%s: the password contains a NUL byte", path);
    free (buf);
    return NULL;
  }
  while (chomp && len > 0 && buf[len - 1] == '\n')
    buf[--len] = '\0';
  return buf;
}

const char *
open_hint (int r)
{
  return r == -EBUSY ? " (-U opens it anyway)" : "";
}

int
password_option (struct password_opt *p, int c, const char *arg)
{
  if (c != 'P' && c != 'W')
    return 0;
  password_free (p);
  if (c == 'P')
    p->password = arg;
  else if ((p->password = p->buf = read_secret_file (arg, true)) == NULL)
    return -1;
  return 1;
}

void
free_secret (char *s)
{
  if (s) {
    explicit_bzero (s, strlen (s));
    free (s);
  }
}

void
password_free (struct password_opt *p)
{
  free_secret (p->buf);
  p->buf = NULL;
  p->password = NULL;
}

struct q2_image *
open_image (const char *path, bool writable, bool force_share,
            const char *password, bool for_check)
{
  /* Reading metadata (check, map, snapshot -l) needs no key; changing
   * it does: the core makes an image writable only with its key. */
  struct q2_open_opts opts = { .readonly = true, .locking = !force_share,
                               .no_key = !writable && !password,
                               .password = password,
                               .for_check = for_check };
  struct q2_image *img;
  int r;

  if ((r = q2_open (path, &opts, &img)) < 0) {
    tool_error ("Could not open '%s': %s%s", path, q2_last_error (),
                writable ? "" : open_hint (r));
    return NULL;
  }
  if (writable && q2_make_writable (img) < 0) {
    tool_error ("Could not open '%s' read-write: %s", path,
                q2_last_error ());
    q2_close (img);
    return NULL;
  }
  return img;
}

char *
combine_backing_name (const char *parent, const char *backing)
{
  const char *slash = strrchr (parent, '/');
  size_t dir_len;
  char *s;

  if (backing[0] == '/' || slash == NULL)
    return strdup (backing);
  dir_len = slash - parent + 1;
  s = malloc (dir_len + strlen (backing) + 1);
  if (s) {
    memcpy (s, parent, dir_len);
    strcpy (s + dir_len, backing);
  }
  return s;
}

static const struct {
  const char *name;
  int (*fn) (int argc, char **argv);
} commands[] = {
  { "create", cmd_create },
  { "info", cmd_info },
  { "check", cmd_check },
  { "map", cmd_map },
  { "snapshot", cmd_snapshot },
};

int
main (int argc, char **argv)
{
  size_t i;

  if (argc < 2) {
    fputs (usage_text, stderr);
    return EXIT_FAIL;
  }
  if (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0 ||
      strcmp (argv[1], "help") == 0) {
    fputs (usage_text, stdout);
    return 0;
  }
  if (strcmp (argv[1], "--version") == 0 || strcmp (argv[1], "-V") == 0) {
    printf ("qcow2-tool (nbdkit-qcow2)\n");
    return 0;
  }
  for (i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp (argv[1], commands[i].name) == 0)
      return commands[i].fn (argc - 1, argv + 1);
  tool_error ("unknown command '%s'", argv[1]);
  fputs (usage_text, stderr);
  return EXIT_FAIL;
}
