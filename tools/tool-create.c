/* qcow2-tool create: a new qcow2 image, with qemu-img create's -o
 * options. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tool.h"

static const char create_help[] =
  "Usage: qcow2-tool create [-q] [-u] [-f qcow2] [-o OPTIONS]\n"
  "                         [-b BACKING [-F FMT]] IMG [SIZE]\n"
  "\n"
  "Creates the qcow2 image IMG of SIZE bytes (K, M, G, T suffixes; rounded\n"
  "up to 512).  Without SIZE the backing file's size is used.\n"
  "\n"
  "  -o compat=0.10|1.1            header version 2 or 3 (default 1.1)\n"
  "  -o cluster_size=SIZE          512 to 2M, a power of two (default 64K)\n"
  "  -o refcount_bits=N            1, 2, 4, 8, 16, 32 or 64 (default 16)\n"
  "  -o extended_l2=on|off         subclusters (clusters of at least 16K)\n"
  "  -o compression_type=zlib|zstd\n"
  "  -o lazy_refcounts=on|off\n"
  "  -o preallocation=off|metadata|falloc|full\n"
  "  -o backing_file=NAME,backing_fmt=FMT   the same as -b and -F\n"
  "  -b BACKING   backing file, stored as given (relative to IMG's directory)\n"
  "  -F FMT       backing file format (qcow2 or raw)\n"
  "  -u           do not open the backing file to check it\n"
  "  -q           quiet\n"
  "  -o help      lists the options\n";

static int
set_compat (struct q2_create_opts *o, const char *v)
{
  if (strcmp (v, "0.10") == 0 || strcmp (v, "v2") == 0)
    o->version = 2;
  else if (strcmp (v, "1.1") == 0 || strcmp (v, "v3") == 0)
    o->version = 3;
  else {
    tool_error ("compat: invalid value '%s' (use 0.10 or 1.1)", v);
    return -1;
  }
  return 0;
}

static int
set_preallocation (struct q2_create_opts *o, const char *v)
{
  if (strcmp (v, "off") == 0)
    o->preallocation = Q2_PREALLOC_OFF;
  else if (strcmp (v, "metadata") == 0)
    o->preallocation = Q2_PREALLOC_METADATA;
  else if (strcmp (v, "falloc") == 0)
    o->preallocation = Q2_PREALLOC_FALLOC;
  else if (strcmp (v, "full") == 0)
    o->preallocation = Q2_PREALLOC_FULL;
  else {
    tool_error ("preallocation: invalid value '%s' (use off, metadata, "
                "falloc or full)", v);
    return -1;
  }
  return 0;
}

static int
set_bool_option (const char *key, const char *v, bool *out)
{
  if (!parse_bool (v, out)) {
    tool_error ("%s: invalid value '%s' (use on or off)", key, v);
    return -1;
  }
  return 0;
}

static int
set_number_option (const char *key, const char *v, uint32_t *out)
{
  uint64_t n;

  if (!parse_size (v, &n) || n > UINT32_MAX) {
    tool_error ("%s: invalid value '%s'", key, v);
    return -1;
  }
  *out = n;
  return 0;
}

/* Applies one key=value of -o. */
static int
set_option (struct q2_create_opts *o, const char *key, const char *v)
{
  if (strcmp (key, "compat") == 0)
    return set_compat (o, v);
  if (strcmp (key, "cluster_size") == 0)
    return set_number_option (key, v, &o->cluster_size);
  if (strcmp (key, "refcount_bits") == 0)
    return set_number_option (key, v, &o->refcount_bits);
  if (strcmp (key, "extended_l2") == 0)
    return set_bool_option (key, v, &o->extended_l2);
  if (strcmp (key, "lazy_refcounts") == 0)
    return set_bool_option (key, v, &o->lazy_refcounts);
  if (strcmp (key, "preallocation") == 0)
    return set_preallocation (o, v);
  if (strcmp (key, "compression_type") == 0) {
    if (strcmp (v, "zlib") == 0)
      o->compression_type = 0;
    else if (strcmp (v, "zstd") == 0)
      o->compression_type = 1;
    else {
      tool_error ("compression_type: invalid value '%s' (use zlib or zstd)",
                  v);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backing_file") == 0) {
    o->backing_file = v;
    return 0;
  }
  if (strcmp (key, "backing_fmt") == 0) {
    o->backing_format = v;
    return 0;
  }
  tool_error ("Invalid parameter '%s'", key);
  return -1;
}

/* Splits "a=1,b=2" (the string is modified and must stay alive). */
static int
parse_o_list (struct q2_create_opts *o, char *list, bool *help)
{
  char *save = NULL, *item;

  for (item = strtok_r (list, ",", &save); item;
       item = strtok_r (NULL, ",", &save)) {
    char *eq = strchr (item, '=');
    if (strcmp (item, "help") == 0 || strcmp (item, "?") == 0) {
      *help = true;
      continue;
    }
    if (eq == NULL) {
      tool_error ("Invalid option '%s' (expected key=value)", item);
      return -1;
    }
    *eq = '\0';
    if (set_option (o, item, eq + 1) < 0)
      return -1;
  }
  return 0;
}

static void
print_formatting (const char *path, uint64_t size,
                  const struct q2_create_opts *o)
{
  static const char *const prealloc[] = { "off", "metadata", "falloc",
                                          "full" };

  printf ("Formatting '%s', fmt=qcow2 cluster_size=%u extended_l2=%s",
          path, o->cluster_size, o->extended_l2 ? "on" : "off");
  if (o->preallocation != Q2_PREALLOC_OFF)
    printf (" preallocation=%s", prealloc[o->preallocation]);
  printf (" compression_type=%s", o->compression_type ? "zstd" : "zlib");
  if (size != UINT64_MAX)
    printf (" size=%llu", (unsigned long long) size);
  if (o->backing_file)
    printf (" backing_file=%s", o->backing_file);
  if (o->backing_format)
    printf (" backing_fmt=%s", o->backing_format);
  if (o->version == 2)
    printf (" compat=0.10");
  printf (" lazy_refcounts=%s refcount_bits=%u\n",
          o->lazy_refcounts ? "on" : "off", o->refcount_bits);
}

int
cmd_create (int argc, char **argv)
{
  static const struct option long_opts[] = {
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct q2_create_opts o;
  uint64_t size = UINT64_MAX;
  bool quiet = false, help = false;
  const char *path;
  int c;

  q2_create_opts_init (&o);
  if (wants_help (argc, argv)) {
    fputs (create_help, stdout);
    return 0;
  }
  optind = 1;
  while ((c = getopt_long (argc, argv, "+qub:F:f:o:", long_opts, NULL)) != -1) {
    switch (c) {
    case 'q': quiet = true; break;
    case 'u': o.unsafe = true; break;
    case 'b': o.backing_file = optarg; break;
    case 'F': o.backing_format = optarg; break;
    case 'f':
      if (strcmp (optarg, "qcow2") != 0) {
        tool_error ("only the qcow2 format can be created, not '%s'",
                    optarg);
        return EXIT_FAIL;
      }
      break;
    case 'o':
      if (parse_o_list (&o, optarg, &help) < 0)
        return EXIT_FAIL;
      break;
    default:
      fputs (create_help, stderr);
      return EXIT_FAIL;
    }
  }
  if (help) {
    fputs (create_help, stdout);
    return 0;
  }
  if (argc - optind < 1 || argc - optind > 2) {
    tool_error ("create: expecting IMG [SIZE]");
    fputs (create_help, stderr);
    return EXIT_FAIL;
  }
  path = argv[optind];
  if (argc - optind == 2 && !parse_size (argv[optind + 1], &size)) {
    tool_error ("Invalid image size specified. You may use k, M, G, T, P "
                "or E suffixes for kilobytes, megabytes, gigabytes, "
                "terabytes, petabytes and exabytes.");
    return EXIT_FAIL;
  }
  if (size == UINT64_MAX && o.backing_file == NULL) {
    tool_error ("Image creation needs a size parameter");
    return EXIT_FAIL;
  }
  if (!quiet)
    print_formatting (path, size, &o);
  if (q2_create (path, size, &o) < 0) {
    tool_core_error (NULL);
    return EXIT_FAIL;
  }
  return 0;
}
