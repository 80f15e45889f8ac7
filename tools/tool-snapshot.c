/* qcow2-tool snapshot: list, create, apply and delete internal
 * snapshots, as qemu-img snapshot does. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "tool.h"

static const char snapshot_help[] =
  "Usage: qcow2-tool snapshot [-q] -l | -c NAME | -a NAME | -d NAME IMG\n"
  "\n"
  "  -l        list the snapshots\n"
  "  -c NAME   create a snapshot of the current state\n"
  "  -a NAME   apply (revert to) the snapshot with this ID or name\n"
  "  -d NAME   delete the snapshot with this name (or else ID)\n"
  "  -q        quiet\n"
  "  --password SECRET, --password-file FILE\n"
  "            the password of an encrypted image (not needed by -l)\n";

void print_snapshot_table (struct q2_image *img);

enum action { ACT_NONE, ACT_LIST, ACT_CREATE, ACT_APPLY, ACT_DELETE };

static int
run_action (struct q2_image *img, enum action act, const char *name)
{
  const char *verb;
  int r;

  switch (act) {
  case ACT_CREATE:
    verb = "create";
    r = q2_snapshot_create (img, name);
    break;
  case ACT_APPLY:
    verb = "apply";
    r = q2_snapshot_apply (img, name);
    break;
  case ACT_DELETE:
    verb = "delete";
    r = q2_snapshot_delete (img, name);
    break;
  default:
    return 0;
  }
  if (r == -ENOSYS)
    tool_error ("Could not %s snapshot '%s': internal snapshot operations "
                "are not implemented in this build", verb, name);
  else if (r < 0)
    tool_error ("Could not %s snapshot '%s': %s", verb, name,
                q2_last_error ());
  return r < 0 ? -1 : 0;
}

int
cmd_snapshot (int argc, char **argv)
{
  static const struct option long_opts[] = {
    { "password", required_argument, NULL, 'P' },
    { "password-file", required_argument, NULL, 'W' },
    { NULL, 0, NULL, 0 },
  };
  struct password_opt pw = { NULL, NULL };
  enum action act = ACT_NONE;
  const char *name = NULL;
  struct q2_image *img;
  int c, r;

  if (wants_help (argc, argv)) {
    fputs (snapshot_help, stdout);
    return 0;
  }
  optind = 1;
  while ((c = getopt_long (argc, argv, "+lqc:a:d:f:", long_opts,
                           NULL)) != -1) {
    enum action a = ACT_NONE;
    if ((r = password_option (&pw, c, optarg)) != 0) {
      if (r < 0)
        return EXIT_FAIL;
      continue;
    }
    switch (c) {
    case 'l': a = ACT_LIST; break;
    case 'c': a = ACT_CREATE; break;
    case 'a': a = ACT_APPLY; break;
    case 'd': a = ACT_DELETE; break;
    case 'q': case 'f': continue;
    default:
      fputs (snapshot_help, stderr);
      password_free (&pw);
      return EXIT_FAIL;
    }
    if (act != ACT_NONE) {
      tool_error ("Cannot mix '-l', '-a', '-c', '-d'");
      return EXIT_FAIL;
    }
    act = a;
    name = a == ACT_LIST ? NULL : optarg;
  }
  if (act == ACT_NONE || argc - optind != 1) {
    tool_error ("snapshot: expecting one of -l, -c, -a, -d and one image");
    fputs (snapshot_help, stderr);
    return EXIT_FAIL;
  }
  img = open_image (argv[optind], act != ACT_LIST, false, pw.password,
                    false);
  password_free (&pw);
  if (img == NULL)
    return EXIT_FAIL;
  if (act == ACT_LIST) {
    r = q2_snapshot_count (img);
    if (r < 0)
      tool_core_error ("Could not list the snapshots");
    else
      print_snapshot_table (img);
  }
  else
    r = run_action (img, act, name);
  if (q2_close (img) < 0 && r >= 0) {
    tool_core_error ("closing the image");
    r = -1;
  }
  return r < 0 ? EXIT_FAIL : 0;
}
