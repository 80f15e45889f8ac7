/* libFuzzer target: q2_header_parse on the input, which stands for the
 * first cluster of an image.  The file size is taken both as the input
 * size and as a large value, so the table checks against the file size
 * are exercised in both directions. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static void
parse_once (const uint8_t *data, size_t size, uint64_t file_size)
{
  struct q2_header h;
  volatile size_t sink = 0;
  uint32_t i;
  int bit;

  if (q2_header_parse (data, size, file_size, 0, &h) < 0)
    return;
  /* Touch what was parsed so the sanitizers see every byte. */
  if (h.backing_file)
    sink += strlen (h.backing_file);
  if (h.backing_format)
    sink += strlen (h.backing_format);
  if (h.data_file)
    sink += strlen (h.data_file);
  for (i = 0; i < h.nb_unknown_exts; i++)
    if (h.unknown_exts[i].len)
      sink += h.unknown_exts[i].data[h.unknown_exts[i].len - 1];
  for (i = 0; i < h.unknown_fields_len; i++)
    sink += h.unknown_fields[i];
  for (bit = 0; bit < 64; bit++) {
    const char *name = q2_header_feature_name (&h, bit % 3, bit);
    if (name)
      sink += strlen (name);
  }
  (void) sink;
  q2_header_free (&h);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  parse_once (data, size, size);
  parse_once (data, size, 1ULL << 40);
  return 0;
}
