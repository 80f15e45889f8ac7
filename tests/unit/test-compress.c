/* q2_decompress: raw deflate (QEMU's "zlib", windowBits -12) and zstd,
 * with trailing garbage, several zstd frames, and corrupt input. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "internal.h"
#include "unit.h"

static uint64_t rng_state;

static uint32_t
rng (void)
{
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return rng_state >> 33;
}

/* Half text, half noise: compresses to roughly half. */
static void
fill (uint8_t *buf, size_t len, uint64_t seed)
{
  static const char text[] = "qcow2 compressed cluster test data. ";
  size_t i;

  rng_state = seed;
  for (i = 0; i < len; i++) {
    if ((i / 64) % 2 == 0)
      buf[i] = text[(i + seed) % (sizeof text - 1)];
    else
      buf[i] = rng ();
  }
}

static uint8_t *
xmalloc (size_t n)
{
  uint8_t *p = malloc (n ? n : 1);
  if (p == NULL)
    abort ();
  return p;
}

/* Raw deflate as QEMU's qcow2_zlib_compress does it (window_bits -12,
 * Z_DEFAULT_COMPRESSION, memLevel 9).  Returns the compressed size; dst
 * must hold compressBound-ish bytes. */
static size_t
deflate_raw_level (const uint8_t *src, size_t len, uint8_t *dst,
                   size_t dst_len, int window_bits, int level)
{
  z_stream s;
  int r;

  memset (&s, 0, sizeof s);
  r = deflateInit2 (&s, level, Z_DEFLATED, window_bits, 9,
                    Z_DEFAULT_STRATEGY);
  if (r != Z_OK)
    abort ();
  s.next_in = (Bytef *) src;
  s.avail_in = len;
  s.next_out = dst;
  s.avail_out = dst_len;
  r = deflate (&s, Z_FINISH);
  if (r != Z_STREAM_END)
    abort ();
  deflateEnd (&s);
  return dst_len - s.avail_out;
}

static size_t
deflate_raw (const uint8_t *src, size_t len, uint8_t *dst, size_t dst_len,
             int window_bits)
{
  return deflate_raw_level (src, len, dst, dst_len, window_bits,
                            Z_DEFAULT_COMPRESSION);
}

/* The same with the fastest level, for the variants (keeps the 2 MiB
 * case quick). */
static size_t
deflate_fast (const uint8_t *src, size_t len, uint8_t *dst, size_t dst_len,
              int window_bits)
{
  return deflate_raw_level (src, len, dst, dst_len, window_bits,
                            Z_BEST_SPEED);
}

/* One zstd frame, as ZSTD_compress makes it (level 1 and a reused
 * context keep the 2 MiB case fast; the decoder does not care). */
static size_t
zstd (const uint8_t *src, size_t len, uint8_t *dst, size_t dst_len)
{
  static ZSTD_CCtx *cctx;
  size_t r;

  if (cctx == NULL && (cctx = ZSTD_createCCtx ()) == NULL)
    abort ();
  r = ZSTD_compressCCtx (cctx, dst, dst_len, src, len, 1);
  if (ZSTD_isError (r))
    abort ();
  return r;
}

static const size_t cluster_sizes[] = { 512, 4096, 65536, 2u << 20 };
#define NR_SIZES (sizeof cluster_sizes / sizeof cluster_sizes[0])

/* Trailing garbage lengths to try: 0..7 and a few up to 1024, fewer for
 * big clusters to keep the test fast. */
static size_t
next_tail (size_t tail, size_t cs)
{
  if (cs > 65536)
    return tail == 0 ? 1 : tail == 1 ? 511 : tail == 511 ? 1024 : 9999;
  return tail < 8 ? tail + 1 : tail + 337;
}

/* Appends n bytes of garbage after len bytes in buf. */
static void
garbage (uint8_t *buf, size_t len, size_t n)
{
  size_t i;
  for (i = 0; i < n; i++)
    buf[len + i] = rng ();
}

static void
test_zlib (void)
{
  size_t k;

  for (k = 0; k < NR_SIZES; k++) {
    size_t cs = cluster_sizes[k];
    size_t cap = compressBound (cs) + 4096;
    uint8_t *data = xmalloc (cs), *out = xmalloc (cs), *z = xmalloc (cap);
    size_t zlen, tail;

    unit_context ("zlib cluster %zu", cs);
    fill (data, cs, cs);
    zlen = deflate_raw (data, cs, z, cap, -12);
    CHECK (zlen < cs + 64);

    /* Exact length, then with trailing garbage up to the next sector
     * and beyond (the next compressed cluster may follow). */
    for (tail = 0; tail <= 1024; tail = next_tail (tail, cs)) {
      garbage (z, zlen, tail);
      memset (out, 0xee, cs);
      CHECK_EQ_INT (q2_decompress (0, z, zlen + tail, out, cs), 0);
      CHECK (memcmp (out, data, cs) == 0);
    }
    /* Padded to the sector, as csize gives it. */
    tail = Q2_ROUND_UP (zlen, 512) - zlen;
    garbage (z, zlen, tail);
    CHECK_EQ_INT (q2_decompress (0, z, zlen + tail, out, cs), 0);
    CHECK (memcmp (out, data, cs) == 0);

    /* A foreign encoder with the largest window. */
    zlen = deflate_fast (data, cs, z, cap, -15);
    garbage (z, zlen, 100);
    memset (out, 0, cs);
    CHECK_EQ_INT (q2_decompress (0, z, zlen + 100, out, cs), 0);
    CHECK (memcmp (out, data, cs) == 0);

    /* Truncated: half the stream cannot produce a whole cluster. */
    zlen = deflate_fast (data, cs, z, cap, -12);
    CHECK_EQ_INT (q2_decompress (0, z, zlen / 2, out, cs), -EIO);
    CHECK_STR_CONTAINS (q2_last_error (), "zlib");
    CHECK_EQ_INT (q2_decompress (0, z, 0, out, cs), -EIO);

    /* Too short: a whole stream for half a cluster. */
    zlen = deflate_fast (data, cs / 2, z, cap, -12);
    CHECK_EQ_INT (q2_decompress (0, z, zlen, out, cs), -EIO);

    /* A zlib stream (with its 2-byte header) is not raw deflate: it
     * must not decode to the data. */
    {
      uLongf dl = cap;
      int r;
      if (compress2 (z, &dl, data, cs, Z_BEST_SPEED) != Z_OK)
        abort ();
      memset (out, 0, cs);
      r = q2_decompress (0, z, dl, out, cs);
      CHECK (r == -EIO || memcmp (out, data, cs) != 0);
    }

    free (data);
    free (out);
    free (z);
  }
  unit_context (NULL);
}

static void
test_zlib_garbage (void)
{
  uint8_t src[4096], out[4096];
  int i, n_ok = 0;

  /* 0xff...: first block has BTYPE 11 (reserved). */
  memset (src, 0xff, sizeof src);
  CHECK_EQ_INT (q2_decompress (0, src, sizeof src, out, sizeof out), -EIO);
  CHECK_STR_CONTAINS (q2_last_error (), "corrupt");
  /* Random garbage, many seeds: never a full clean cluster. */
  for (i = 0; i < 200; i++) {
    rng_state = 1000 + i;
    garbage (src, 0, sizeof src);
    if (q2_decompress (0, src, sizeof src, out, sizeof out) == 0)
      n_ok++;
  }
  CHECK_EQ_INT (n_ok, 0);
}

static void
test_zstd (void)
{
  size_t k;

  for (k = 0; k < NR_SIZES; k++) {
    size_t cs = cluster_sizes[k];
    size_t cap = ZSTD_compressBound (2 * cs) + 4096;
    uint8_t *data = xmalloc (2 * cs), *out = xmalloc (cs), *z = xmalloc (cap);
    size_t zlen, zlen2, tail;

    unit_context ("zstd cluster %zu", cs);
    fill (data, 2 * cs, cs + 7);
    zlen = zstd (data, cs, z, cap);

    for (tail = 0; tail <= 1024; tail = next_tail (tail, cs)) {
      garbage (z, zlen, tail);
      memset (out, 0xee, cs);
      CHECK_EQ_INT (q2_decompress (1, z, zlen + tail, out, cs), 0);
      CHECK (memcmp (out, data, cs) == 0);
    }
    /* Trailing zeros (a padded sector) and a following zstd frame. */
    memset (z + zlen, 0, 512);
    CHECK_EQ_INT (q2_decompress (1, z, zlen + 512, out, cs), 0);
    CHECK (memcmp (out, data, cs) == 0);
    zlen2 = zstd (data + cs, cs, z + zlen, cap - zlen);
    memset (out, 0, cs);
    CHECK_EQ_INT (q2_decompress (1, z, zlen + zlen2, out, cs), 0);
    CHECK (memcmp (out, data, cs) == 0);

    /* Two frames of half a cluster each make the whole cluster. */
    zlen = zstd (data, cs / 2, z, cap);
    zlen2 = zstd (data + cs / 2, cs - cs / 2, z + zlen, cap - zlen);
    garbage (z, zlen + zlen2, 300);
    memset (out, 0, cs);
    CHECK_EQ_INT (q2_decompress (1, z, zlen + zlen2 + 300, out, cs), 0);
    CHECK (memcmp (out, data, cs) == 0);
    /* ... but the first frame alone is too short. */
    CHECK_EQ_INT (q2_decompress (1, z, zlen, out, cs), -EIO);

    /* Four frames of a quarter each. */
    {
      size_t q = cs / 4, off = 0, i;
      for (i = 0; i < 4; i++)
        off += zstd (data + i * q, q, z + off, cap - off);
      memset (out, 0, cs);
      CHECK_EQ_INT (q2_decompress (1, z, off, out, cs), 0);
      CHECK (memcmp (out, data, cs) == 0);
    }

    /* Truncated. */
    zlen = zstd (data, cs, z, cap);
    CHECK_EQ_INT (q2_decompress (1, z, zlen / 2, out, cs), -EIO);
    CHECK_STR_CONTAINS (q2_last_error (), "zstd");
    CHECK_EQ_INT (q2_decompress (1, z, zlen - 1, out, cs), -EIO);
    CHECK_EQ_INT (q2_decompress (1, z, 4, out, cs), -EIO);
    CHECK_EQ_INT (q2_decompress (1, z, 0, out, cs), -EIO);

    /* One frame of two clusters: more than a cluster of output. */
    zlen = zstd (data, 2 * cs, z, cap);
    CHECK_EQ_INT (q2_decompress (1, z, zlen, out, cs), -EIO);
    CHECK_STR_CONTAINS (q2_last_error (), "more than");
    /* One byte too many. */
    zlen = zstd (data, cs + 1, z, cap);
    CHECK_EQ_INT (q2_decompress (1, z, zlen, out, cs), -EIO);

    /* A frame with a checksum (foreign encoders may add one). */
    {
      ZSTD_CCtx *cctx = ZSTD_createCCtx ();
      ZSTD_CCtx_setParameter (cctx, ZSTD_c_checksumFlag, 1);
      zlen = ZSTD_compress2 (cctx, z, cap, data, cs);
      CHECK (!ZSTD_isError (zlen));
      garbage (z, zlen, 50);
      memset (out, 0, cs);
      CHECK_EQ_INT (q2_decompress (1, z, zlen + 50, out, cs), 0);
      CHECK (memcmp (out, data, cs) == 0);
      /* A wrong checksum is corruption. */
      z[zlen - 1] ^= 1;
      CHECK_EQ_INT (q2_decompress (1, z, zlen, out, cs), -EIO);
      /* A frame that does not declare its content size (streamed). */
      ZSTD_CCtx_reset (cctx, ZSTD_reset_session_and_parameters);
      ZSTD_CCtx_setParameter (cctx, ZSTD_c_contentSizeFlag, 0);
      {
        ZSTD_inBuffer in = { data, cs, 0 };
        ZSTD_outBuffer o = { z, cap, 0 };
        size_t rem = ZSTD_compressStream2 (cctx, &o, &in, ZSTD_e_end);
        CHECK_EQ_U64 (rem, 0);
        zlen = o.pos;
      }
      garbage (z, zlen, 17);
      memset (out, 0, cs);
      CHECK_EQ_INT (q2_decompress (1, z, zlen + 17, out, cs), 0);
      CHECK (memcmp (out, data, cs) == 0);
      /* Flushed, then ended: the last block is an empty one after the
       * output is already complete. */
      ZSTD_CCtx_reset (cctx, ZSTD_reset_session_and_parameters);
      {
        ZSTD_inBuffer in = { data, cs, 0 };
        ZSTD_outBuffer o = { z, cap, 0 };
        CHECK_EQ_U64 (ZSTD_compressStream2 (cctx, &o, &in, ZSTD_e_flush), 0);
        CHECK_EQ_U64 (ZSTD_compressStream2 (cctx, &o, &in, ZSTD_e_end), 0);
        zlen = o.pos;
      }
      memset (out, 0, cs);
      CHECK_EQ_INT (q2_decompress (1, z, zlen, out, cs), 0);
      CHECK (memcmp (out, data, cs) == 0);
      ZSTD_freeCCtx (cctx);
    }

    free (data);
    free (out);
    free (z);
  }
  unit_context (NULL);
}

static void
test_zstd_garbage (void)
{
  uint8_t src[4096], out[4096];
  int i, n_ok = 0;

  memset (src, 0xff, sizeof src);
  CHECK_EQ_INT (q2_decompress (1, src, sizeof src, out, sizeof out), -EIO);
  CHECK_STR_CONTAINS (q2_last_error (), "zstd");
  for (i = 0; i < 200; i++) {
    rng_state = 5000 + i;
    garbage (src, 0, sizeof src);
    if (q2_decompress (1, src, sizeof src, out, sizeof out) == 0)
      n_ok++;
  }
  CHECK_EQ_INT (n_ok, 0);
  /* A valid frame header followed by garbage. */
  {
    uint8_t data[4096];
    size_t zlen;
    fill (data, sizeof data, 3);
    zlen = zstd (data, sizeof data, src, sizeof src);
    CHECK (zlen > 16);
    memset (src + 8, 0xa5, zlen - 8);
    CHECK_EQ_INT (q2_decompress (1, src, zlen, out, sizeof out), -EIO);
  }
}

static void
test_unknown_type (void)
{
  uint8_t src[16] = { 0 }, out[512];

  CHECK_EQ_INT (q2_decompress (2, src, sizeof src, out, sizeof out),
                -ENOTSUP);
  CHECK_STR_CONTAINS (q2_last_error (), "compression type");
  CHECK (q2_have_zstd ());
}

int
main (void)
{
  RUN (test_zlib);
  RUN (test_zlib_garbage);
  RUN (test_zstd);
  RUN (test_zstd_garbage);
  RUN (test_unknown_type);
  return unit_done ();
}
