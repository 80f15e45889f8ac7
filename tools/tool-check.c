/* qcow2-tool check: consistency check and repair, with qemu-img check's
 * messages and exit codes. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "tool.h"

/* qemu-img check's exit codes. */
#define CHECK_CLEAN 0
#define CHECK_FAILED 1
#define CHECK_CORRUPT 2
#define CHECK_LEAKS 3
#define CHECK_UNSUPPORTED 63

static const char check_help[] =
  "Usage: qcow2-tool check [-q] [-r leaks|all] [--json] [-U] IMG\n"
  "\n"
  "Compares the refcount of every cluster with the references to it and\n"
  "checks the COPIED flags of the active L1 and L2 tables.\n"
  "\n"
  "  -r leaks   drop the refcounts of leaked clusters\n"
  "  -r all     also rebuild the refcount structures to fix corruptions\n"
  "  --json     print the result as qemu-img check --output=json does\n"
  "  -q         quiet\n"
  "  -U         open an image that another process is using (no -r)\n"
  "  --password SECRET, --password-file FILE\n"
  "             the password of an encrypted image (never needed: the\n"
  "             check and its repairs touch metadata only)\n"
  "\n"
  "Exit status: 0 no errors, 1 the check could not complete, 2 corruptions,\n"
  "3 leaked clusters only, 63 the image cannot be checked.\n";

static void
report_line (void *opaque, const char *msg)
{
  bool *quiet = opaque;

  if (!*quiet)
    fprintf (stderr, "%s\n", msg);
}

static void
print_human (const struct q2_check_result *r)
{
  if (r->leaks_fixed || r->corruptions_fixed)
    printf ("The following inconsistencies were found and repaired:\n\n"
            "    %" PRIu64 " leaked clusters\n"
            "    %" PRIu64 " corruptions\n\n"
            "Double checking the fixed image now...\n",
            r->leaks_fixed, r->corruptions_fixed);
  if (r->corruptions == 0 && r->leaks == 0 && r->check_errors == 0)
    printf ("No errors were found on the image.\n");
  else {
    if (r->corruptions)
      printf ("\n%" PRIu64 " errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may "
              "corrupt it.\n", r->corruptions);
    if (r->leaks)
      printf ("\n%" PRIu64 " leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data.\n",
              r->leaks);
    if (r->check_errors)
      printf ("\n%" PRIu64 " internal errors have occurred during the "
              "check.\n", r->check_errors);
  }
  if (r->total_clusters && r->allocated_clusters)
    printf ("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% "
            "fragmented, %0.2f%% compressed clusters\n",
            r->allocated_clusters, r->total_clusters,
            r->allocated_clusters * 100.0 / r->total_clusters,
            r->fragmented_clusters * 100.0 / r->allocated_clusters,
            r->compressed_clusters * 100.0 / r->allocated_clusters);
  if (r->image_end_offset)
    printf ("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

static void
print_count (const char *key, uint64_t n)
{
  if (n)
    printf ("    \"%s\": %" PRIu64 ",\n", key, n);
}

static void
print_json (const struct q2_check_result *r, const char *filename)
{
  printf ("{\n");
  if (r->image_end_offset)
    printf ("    \"image-end-offset\": %" PRIu64 ",\n", r->image_end_offset);
  /* As qemu-img: the counters only when not zero. */
  print_count ("total-clusters", r->total_clusters);
  printf ("    \"check-errors\": %" PRIu64 ",\n", r->check_errors);
  print_count ("leaks", r->leaks);
  print_count ("corruptions", r->corruptions);
  print_count ("leaks-fixed", r->leaks_fixed);
  print_count ("corruptions-fixed", r->corruptions_fixed);
  print_count ("allocated-clusters", r->allocated_clusters);
  print_count ("fragmented-clusters", r->fragmented_clusters);
  print_count ("compressed-clusters", r->compressed_clusters);
  printf ("    \"filename\": ");
  json_string (stdout, filename);
  printf (",\n    \"format\": \"qcow2\"\n}\n");
}

static int
parse_repair (const char *s, int *mode)
{
  if (strcmp (s, "leaks") == 0)
    *mode = Q2_REPAIR_LEAKS;
  else if (strcmp (s, "all") == 0)
    *mode = Q2_REPAIR_ALL;
  else {
    tool_error ("-r: unknown repair mode '%s' (use leaks or all)", s);
    return -1;
  }
  return 0;
}

int
cmd_check (int argc, char **argv)
{
  static const struct option long_opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "output", required_argument, NULL, 'O' },
    { "repair", required_argument, NULL, 'r' },
    { "force-share", no_argument, NULL, 'U' },
    { "password", required_argument, NULL, 'P' },
    { "password-file", required_argument, NULL, 'W' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct q2_check_result res;
  struct password_opt pw = { NULL, NULL };
  bool json = false, quiet = false, share = false;
  int mode = Q2_REPAIR_NONE, c, r;
  struct q2_image *img;
  const char *path;

  if (wants_help (argc, argv)) {
    fputs (check_help, stdout);
    return 0;
  }
  optind = 1;
  while ((c = getopt_long (argc, argv, "+qr:f:U", long_opts, NULL)) != -1) {
    if ((r = password_option (&pw, c, optarg)) != 0) {
      if (r < 0)
        return CHECK_FAILED;
      continue;
    }
    switch (c) {
    case 'j': json = true; break;
    case 'U': share = true; break;
    case 'q': quiet = true; break;
    case 'f': break;
    case 'O':
      json = strcmp (optarg, "json") == 0;
      break;
    case 'r':
      if (parse_repair (optarg, &mode) < 0)
        return CHECK_FAILED;
      break;
    default:
      fputs (check_help, stderr);
      return CHECK_FAILED;
    }
  }
  if (argc - optind != 1) {
    tool_error ("check: expecting one image");
    return CHECK_FAILED;
  }
  if (share && mode != Q2_REPAIR_NONE) {
    tool_error ("check: -U (force-share) opens the image read-only; it "
                "cannot be combined with -r");
    return CHECK_FAILED;
  }
  path = argv[optind];
  img = open_image (path, false, share, pw.password, true);
  password_free (&pw);
  if (img == NULL)
    return CHECK_FAILED;

  memset (&res, 0, sizeof res);
  res.report = report_line;
  res.opaque = &quiet;
  r = q2_check (img, mode, &res);
  if (r == -ENOTSUP) {
    tool_core_error ("This image format does not support checks");
    q2_close (img);
    return CHECK_UNSUPPORTED;
  }
  if (r < 0)
    tool_core_error ("Check failed");
  if (q2_close (img) < 0 && r == 0) {
    tool_core_error ("writing the repaired image");
    res.check_errors++;
  }
  /* As qemu-img: a check that failed has no summary. */
  if (r == 0 && json)
    print_json (&res, path);
  else if (r == 0 && !quiet)
    print_human (&res);

  if (res.check_errors)
    return CHECK_FAILED;
  if (res.corruptions)
    return CHECK_CORRUPT;
  if (res.leaks)
    return CHECK_LEAKS;
  return CHECK_CLEAN;
}
