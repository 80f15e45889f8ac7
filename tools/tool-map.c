/* qcow2-tool map: the allocation map of the image and its backing
 * chain, as qemu-img map prints it. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tool.h"

static const char map_help[] =
  "Usage: qcow2-tool map [--json] [-U] IMG\n"
  "\n"
  "Shows where each range of the guest disk comes from.  The default\n"
  "output lists the ranges with data (Offset, Length, Mapped to, File);\n"
  "--json lists every range with start, length, depth (the layer of the\n"
  "backing chain), present, zero, data and the host offset.\n"
  "-U (--force-share) opens an image that another process is using.\n";

/* Display names of the layers, by depth. */
struct names {
  char *name[Q2_MAX_CHAIN_DEPTH + 2];
  const char *path[Q2_MAX_CHAIN_DEPTH + 2];
  char *data_name[Q2_MAX_CHAIN_DEPTH + 2];      /* external data files */
  const char *data_path[Q2_MAX_CHAIN_DEPTH + 2];
  int n;
};

static int
collect_names (struct q2_image *top, const char *top_name, struct names *nm)
{
  struct q2_image *img = top;

  memset (nm, 0, sizeof *nm);
  nm->name[0] = strdup (top_name);
  while (img && nm->n < Q2_MAX_CHAIN_DEPTH + 2 && nm->name[nm->n]) {
    struct q2_image_info in;
    q2_image_get_info (img, &in);
    nm->path[nm->n] = in.path;
    /* Named like a backing file: relative to the image's name. */
    if (in.data_file && in.data_path) {
      nm->data_name[nm->n] = combine_backing_name (nm->name[nm->n],
                                                   in.data_file);
      nm->data_path[nm->n] = in.data_path;
    }
    nm->n++;
    if (in.backing_file && nm->n < Q2_MAX_CHAIN_DEPTH + 2)
      nm->name[nm->n] = combine_backing_name (nm->name[nm->n - 1],
                                              in.backing_file);
    img = in.backing;
  }
  return nm->n;
}

static const char *
display_name (const struct names *nm, const struct q2_map_info *m)
{
  if (m->depth >= 0 && m->depth < nm->n && m->filename &&
      strcmp (m->filename, nm->path[m->depth]) == 0)
    return nm->name[m->depth];
  if (m->depth >= 0 && m->depth < nm->n && m->filename &&
      nm->data_path[m->depth] && nm->data_name[m->depth] &&
      strcmp (m->filename, nm->data_path[m->depth]) == 0)
    return nm->data_name[m->depth];
  return m->filename ? m->filename : "";
}

/* Adjacent ranges print as one when everything but the length (and
 * a contiguous offset) is the same, as qemu-img merges them. */
static bool
mergeable (const struct q2_map_info *a, const struct q2_map_info *b)
{
  if (a->depth != b->depth || a->present != b->present ||
      a->zero != b->zero || a->data != b->data ||
      a->compressed != b->compressed || a->has_offset != b->has_offset)
    return false;
  if (a->filename != b->filename &&
      (a->filename == NULL || b->filename == NULL ||
       strcmp (a->filename, b->filename) != 0))
    return false;
  return !a->has_offset || a->offset + a->length == b->offset;
}

static void
print_json_entry (uint64_t start, const struct q2_map_info *m, bool first)
{
  printf ("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
          ", \"depth\": %d, \"present\": %s, \"zero\": %s, \"data\": %s",
          first ? "[" : ",\n", start, m->length, m->depth,
          m->present ? "true" : "false", m->zero ? "true" : "false",
          m->data ? "true" : "false");
  if (m->has_offset)
    printf (", \"offset\": %" PRIu64, m->offset);
  printf ("}");
}

static int
print_human_entry (uint64_t start, const struct q2_map_info *m,
                   const struct names *nm)
{
  /* Data without a host offset: compressed or encrypted. */
  if (m->data && !m->has_offset) {
    tool_error ("File contains external, encrypted or compressed "
                "clusters.");
    return -1;
  }
  /* As qemu-img: data that reads as zeros (holes in a preallocated
   * file) is not listed. */
  if (m->data && !m->zero && m->has_offset)
    printf ("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", start,
            m->length, m->offset, display_name (nm, m));
  return 0;
}

int
cmd_map (int argc, char **argv)
{
  static const struct option long_opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "output", required_argument, NULL, 'O' },
    { "force-share", no_argument, NULL, 'U' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  struct q2_map_info cur, next;
  uint64_t pos, size, cur_start = 0;
  bool json = false, have = false, first = true, share = false;
  struct q2_image *img;
  struct names nm;
  int c, i, ret = 0;

  if (wants_help (argc, argv)) {
    fputs (map_help, stdout);
    return 0;
  }
  optind = 1;
  while ((c = getopt_long (argc, argv, "+f:U", long_opts, NULL)) != -1) {
    switch (c) {
    case 'j': json = true; break;
    case 'U': share = true; break;
    case 'f': break;
    case 'O': json = strcmp (optarg, "json") == 0; break;
    default:
      fputs (map_help, stderr);
      return EXIT_FAIL;
    }
  }
  if (argc - optind != 1) {
    tool_error ("map: expecting one image");
    return EXIT_FAIL;
  }
  img = open_image (argv[optind], false, share, NULL, false);
  if (img == NULL)
    return EXIT_FAIL;
  collect_names (img, argv[optind], &nm);
  size = q2_virtual_size (img);
  if (!json)
    printf ("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");

  memset (&cur, 0, sizeof cur);
  for (pos = 0; pos < size; pos += next.length) {
    if (q2_map_range (img, pos, size - pos, &next) < 0) {
      tool_core_error ("map");
      ret = EXIT_FAIL;
      break;
    }
    if (have && mergeable (&cur, &next)) {
      cur.length += next.length;
      continue;
    }
    if (have) {
      if (json)
        print_json_entry (cur_start, &cur, first);
      else if (print_human_entry (cur_start, &cur, &nm) < 0) {
        ret = EXIT_FAIL;
        break;
      }
      first = false;
    }
    cur = next;
    cur_start = pos;
    have = true;
  }
  if (ret == 0 && have) {
    if (json)
      print_json_entry (cur_start, &cur, first);
    else if (print_human_entry (cur_start, &cur, &nm) < 0)
      ret = EXIT_FAIL;
  }
  if (json)
    printf ("%s\n", first && !have ? "[]" : "]");
  for (i = 0; i < Q2_MAX_CHAIN_DEPTH + 2; i++) {
    free (nm.name[i]);
    free (nm.data_name[i]);
  }
  q2_close (img);
  return ret;
}
