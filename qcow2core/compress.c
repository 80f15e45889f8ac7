/* Decompression of compressed clusters: raw deflate ("zlib" in qcow2
 * terms) and zstd.  Output is always exactly one cluster; the input
 * length is only known to 512-byte precision, so trailing input bytes
 * are ignored. */
#include <errno.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "internal.h"

bool
q2_have_zstd (void)
{
  return true;
}

static int
inflate_raw (const uint8_t *src, size_t src_len, uint8_t *out, size_t out_len)
{
  z_stream *s = q2_scratch_inflate ();
  int r;

  if (s == NULL)
    return q2_err (ENOMEM, "zlib: cannot initialise the decompressor");
  s->next_in = (Bytef *) src;
  s->avail_in = src_len;
  s->next_out = out;
  s->avail_out = out_len;
  r = inflate (s, Z_FINISH);
  /* A full output buffer is success even if the stream did not end,
   * because the input may be cut at a sector boundary. */
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) &&
      s->avail_out == 0)
    return 0;
  return q2_err (EIO, "zlib: corrupt compressed cluster (inflate returned "
                 "%d with %u of %zu bytes missing)", r, s->avail_out, out_len);
}

static int
unzstd (const uint8_t *src, size_t src_len, uint8_t *out, size_t out_len)
{
  ZSTD_inBuffer in = { src, src_len, 0 };
  ZSTD_outBuffer o = { out, out_len, 0 };
  size_t ret = 0;
  ZSTD_DCtx *zstd_ctx = q2_scratch_zstd_dctx ();

  if (zstd_ctx == NULL)
    return q2_err (ENOMEM, "zstd: cannot create a decompression context");
  ZSTD_DCtx_reset (zstd_ctx, ZSTD_reset_session_only);
  while (o.pos < o.size) {
    size_t last_in = in.pos, last_out = o.pos;
    ret = ZSTD_decompressStream (zstd_ctx, &o, &in);
    if (ZSTD_isError (ret))
      return q2_err (EIO, "zstd: corrupt compressed cluster: %s",
                     ZSTD_getErrorName (ret));
    if (in.pos <= last_in && o.pos <= last_out)
      return q2_err (EIO, "zstd: corrupt compressed cluster: no progress "
                     "after %zu of %zu bytes", o.pos, out_len);
  }
  /* Output full but the frame still wants more: the data is too long. */
  if (ret > 0)
    return q2_err (EIO, "zstd: compressed cluster decompresses to more than "
                   "one cluster");
  return 0;
}

int
q2_decompress (uint8_t compression_type, const uint8_t *src, size_t src_len,
               uint8_t *out, size_t out_len)
{
  switch (compression_type) {
  case 0: return inflate_raw (src, src_len, out, out_len);
  case 1: return unzstd (src, src_len, out, out_len);
  default:
    return q2_err (ENOTSUP, "unknown compression type %u", compression_type);
  }
}
