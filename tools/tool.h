/* qcow2-tool: shared declarations of the subcommands and helpers. */
#ifndef QCOW2_TOOL_H
#define QCOW2_TOOL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "qcow2.h"

/* Exit status for a failed command (qemu-img uses 1). */
#define EXIT_FAIL 1

/* Every subcommand: argv[0] is the subcommand name. */
int cmd_create (int argc, char **argv);
int cmd_info (int argc, char **argv);
int cmd_check (int argc, char **argv);
int cmd_map (int argc, char **argv);
int cmd_snapshot (int argc, char **argv);

/* Prints "qcow2-tool: MESSAGE" to stderr. */
void tool_error (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
/* Prints the last qcow2core error with a prefix. */
void tool_core_error (const char *what);

/* Parses a size with an optional K/M/G/T/P/E suffix (powers of 1024, a
 * trailing B allowed).  Returns false on a syntax error. */
bool parse_size (const char *s, uint64_t *out);
/* on/off, yes/no, true/false. */
bool parse_bool (const char *s, bool *out);
/* Like qemu's size_to_str: "1 GiB", "324 KiB", "1.5 MiB". */
void format_size (uint64_t v, char *buf, size_t len);
/* Writes s as a JSON string (with the quotes). */
void json_string (FILE *f, const char *s);

/* Opens an image read-only (or writable), reporting errors. */
/* force_share (-U): open read-only without taking QEMU's image locks,
 * to look at an image another process is using.  password: of an
 * encrypted image, or NULL (enough to read its metadata).  for_check:
 * see q2_open_opts. */
struct q2_image *open_image (const char *path, bool writable,
                             bool force_share, const char *password,
                             bool for_check);
/* The whole content of a file (a password); with chomp, trailing
 * newlines are dropped.  malloc'd; NULL (reported) on failure. */
char *read_secret_file (const char *path, bool chomp);
/* The --password and --password-file options of check and snapshot. */
struct password_opt {
  const char *password;
  char *buf;                    /* --password-file, malloc'd */
};
/* Takes option c ('P' --password, 'W' --password-file): 1 if it was
 * one of them, 0 if not, -1 (reported) on failure. */
int password_option (struct password_opt *p, int c, const char *arg);
void password_free (struct password_opt *p);
/* Wipes and frees a string holding a secret (NULL is fine). */
void free_secret (char *s);
/* What to add to a failed read-only open's message: the -U hint when
 * the failure (r) was another process's lock. */
const char *open_hint (int r);

/* Name of a layer as qemu shows it: a relative backing name is joined
 * with the directory part of the name of the image that refers to it.
 * Returns a malloc'd string. */
char *combine_backing_name (const char *parent, const char *backing);

/* Checks for "--help" among the arguments of a subcommand. */
bool wants_help (int argc, char **argv);

#endif /* QCOW2_TOOL_H */
