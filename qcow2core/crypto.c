/* qcow2 encryption: legacy AES-CBC and LUKS1 (see crypto.h and section
 * 1.12 of the format notes), with the ciphers and modes QEMU writes:
 * AES, Serpent, Twofish and CAST5 in XTS, CBC, CTR or ECB.
 *
 * A context holds the expanded key schedules for both directions (plus
 * the XTS tweak key and the ESSIV key when the mode needs them),
 * prepared once at open.  Per-sector work only derives the IV, so the
 * hot path is one bulk cipher call per 512-byte sector.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <nettle/aes.h>
#include <nettle/cast128.h>
#include <nettle/cbc.h>
#include <nettle/ctr.h>
#include <nettle/hmac.h>
#include <nettle/md5.h>
#include <nettle/memops.h>
#include <nettle/memxor.h>
#include <nettle/nettle-meta.h>
#include <nettle/pbkdf2.h>
#include <nettle/ripemd160.h>
#include <nettle/serpent.h>
#include <nettle/sha1.h>
#include <nettle/sha2.h>
#include <nettle/twofish.h>

#include "internal.h"
#include "crypto.h"

#define SECTOR Q2_CRYPTO_SECTOR_SIZE
#define BLOCK 16                        /* the largest cipher block */
#define MAX_KEY 64                      /* 256-bit keys, XTS */

/* ---- LUKS1 phdr layout (all integers big-endian) ---- */
/* The LUKS1 layout constants are in crypto.h. */
/* QEMU's layout: the phdr gets 4096 bytes, and each slot's key material
 * is rounded up to a multiple of that. */
#define LUKS_ALIGN_SECTORS 8
#define LUKS_MIN_DIGEST_ITER 1000

/* ---- hashes: PBKDF2 PRF, AF diffusion, ESSIV ---- */
typedef void pbkdf2_fn (size_t key_length, const uint8_t *key,
                        unsigned iterations, size_t salt_length,
                        const uint8_t *salt, size_t length, uint8_t *dst);

/* PBKDF2 for the hashes nettle has no shortcut for. */
#define DEFINE_PBKDF2(name, NAME)                                       \
  static void                                                           \
  pbkdf2_##name (size_t key_length, const uint8_t *key,                 \
                 unsigned iterations, size_t salt_length,               \
                 const uint8_t *salt, size_t length, uint8_t *dst)      \
  {                                                                     \
    struct hmac_##name##_ctx ctx;                                       \
    hmac_##name##_set_key (&ctx, key_length, key);                      \
    PBKDF2 (&ctx, hmac_##name##_update, hmac_##name##_digest,           \
            NAME##_DIGEST_SIZE, iterations, salt_length, salt,          \
            length, dst);                                               \
    explicit_bzero (&ctx, sizeof ctx);                                  \
  }
DEFINE_PBKDF2 (md5, MD5)
DEFINE_PBKDF2 (sha224, SHA224)
DEFINE_PBKDF2 (ripemd160, RIPEMD160)

struct hash_info {
  const char *name;
  const struct nettle_hash *hash;
  pbkdf2_fn *pbkdf2;
};

/* Every hash QEMU's LUKS driver takes. */
static const struct hash_info hashes[] = {
  { "md5", &nettle_md5, pbkdf2_md5 },
  { "sha1", &nettle_sha1, pbkdf2_hmac_sha1 },
  { "sha224", &nettle_sha224, pbkdf2_sha224 },
  { "sha256", &nettle_sha256, pbkdf2_hmac_sha256 },
  { "sha384", &nettle_sha384, pbkdf2_hmac_sha384 },
  { "sha512", &nettle_sha512, pbkdf2_hmac_sha512 },
  { "ripemd160", &nettle_ripemd160, pbkdf2_ripemd160 },
};

union hash_ctx {
  struct md5_ctx md5;
  struct sha1_ctx sha1;
  struct sha256_ctx sha256;             /* also sha224 */
  struct sha512_ctx sha512;             /* also sha384 */
  struct ripemd160_ctx ripemd160;
};

static const struct hash_info *
find_hash (const char *name)
{
  size_t i;

  for (i = 0; i < sizeof hashes / sizeof hashes[0]; i++)
    if (strcmp (hashes[i].name, name) == 0)
      return &hashes[i];
  return NULL;
}

static void
wipe (void *p, size_t n)
{
  if (p)
    explicit_bzero (p, n);
}

/* ---- block ciphers, by LUKS cipher_name and key size ---- */
union cipher_ctx {
  struct aes128_ctx aes128;
  struct aes192_ctx aes192;
  struct aes256_ctx aes256;
  struct serpent_ctx serpent;
  struct twofish_ctx twofish;
  struct cast128_ctx cast128;
};

/* The cipher families QEMU's LUKS driver writes; key sizes 16, 24, 32
 * bytes (NULL where the family has no such key). */
struct family {
  const char *name;
  const struct nettle_cipher *by_key[3];
};

static const struct family families[] = {
  { "aes", { &nettle_aes128, &nettle_aes192, &nettle_aes256 } },
  { "serpent", { &nettle_serpent128, &nettle_serpent192,
                 &nettle_serpent256 } },
  { "twofish", { &nettle_twofish128, &nettle_twofish192,
                 &nettle_twofish256 } },
  { "cast5", { &nettle_cast128, NULL, NULL } },
};

static const struct family *
find_family (const char *name)
{
  size_t i;

  for (i = 0; i < sizeof families / sizeof families[0]; i++)
    if (strcmp (families[i].name, name) == 0)
      return &families[i];
  return NULL;
}

static const struct nettle_cipher *
family_cipher (const struct family *f, size_t key_len)
{
  if (key_len != 16 && key_len != 24 && key_len != 32)
    return NULL;
  return f->by_key[(key_len - 16) / 8];
}

/* ---- a prepared sector cipher ---- */
enum mode { MODE_ECB, MODE_CBC, MODE_CTR, MODE_XTS };
enum ivgen { IVGEN_PLAIN, IVGEN_PLAIN64, IVGEN_ESSIV };

struct cipher {
  enum mode mode;
  enum ivgen ivgen;
  const struct nettle_cipher *alg;      /* the data cipher */
  const struct nettle_cipher *essiv_alg;
  union cipher_ctx ek, dk;              /* data key, both directions */
  union cipher_ctx tk;                  /* XTS tweak key (encrypt) */
  union cipher_ctx essiv;               /* ESSIV key (encrypt) */
};

/* What a LUKS cipher_mode string such as "cbc-essiv:sha256" means. */
struct mode_spec {
  enum mode mode;
  enum ivgen ivgen;
  const struct hash_info *essiv_hash;   /* IVGEN_ESSIV only */
};

/* The data cipher for a family, mode and full key length (twice the
 * cipher's key for XTS).  XTS needs 16-byte blocks, as in QEMU. */
static int
mode_cipher (const struct family *f, const struct mode_spec *m,
             size_t key_len, const struct nettle_cipher **alg)
{
  *alg = NULL;
  if (m->mode != MODE_XTS || key_len % 2 == 0)
    *alg = family_cipher (f, m->mode == MODE_XTS ? key_len / 2 : key_len);
  if (*alg == NULL)
    return q2_err (EINVAL, "a key of %zu bytes is invalid for %s", key_len,
                   f->name);
  if (m->mode == MODE_XTS && (*alg)->block_size != BLOCK)
    return q2_err (ENOTSUP, "%s: XTS needs a cipher with 16-byte blocks",
                   f->name);
  return 0;
}

/* key_len is the full key: twice the cipher's key for XTS. */
static int
cipher_init (struct cipher *c, const struct family *f,
             const struct mode_spec *m, const uint8_t *key, size_t key_len)
{
  size_t n;
  int r;

  memset (c, 0, sizeof *c);
  c->mode = m->mode;
  c->ivgen = m->ivgen;
  if ((r = mode_cipher (f, m, key_len, &c->alg)) < 0)
    return r;
  n = c->alg->key_size;
  c->alg->set_encrypt_key (&c->ek, key);
  c->alg->set_decrypt_key (&c->dk, key);
  if (m->mode == MODE_XTS)
    c->alg->set_encrypt_key (&c->tk, key + n);
  if (m->mode != MODE_ECB && m->ivgen == IVGEN_ESSIV) {
    /* The ESSIV key is the hash of the whole (possibly doubled) key; the
     * digest length picks the key size of the same family, as QEMU
     * does. */
    const struct nettle_hash *h = m->essiv_hash->hash;
    union hash_ctx hc;
    uint8_t digest[64];

    c->essiv_alg = family_cipher (f, h->digest_size);
    if (c->essiv_alg == NULL)
      return q2_err (ENOTSUP, "ESSIV hash %s: no %s key of %u bytes",
                     m->essiv_hash->name, f->name, h->digest_size);
    h->init (&hc);
    h->update (&hc, key_len, key);
    h->digest (&hc, h->digest_size, digest);
    c->essiv_alg->set_encrypt_key (&c->essiv, digest);
    wipe (&hc, sizeof hc);
    wipe (digest, sizeof digest);
  }
  return 0;
}

static inline void
put_le64 (uint8_t *p, uint64_t v)
{
  v = htole64 (v);
  memcpy (p, &v, sizeof v);
}

static inline uint64_t
get_le64 (const uint8_t *p)
{
  uint64_t v;

  memcpy (&v, p, sizeof v);
  return le64toh (v);
}

/* The IV of a sector: one cipher block (8 or 16 bytes). */
static inline void
make_iv (const struct cipher *c, uint64_t sector, uint8_t iv[BLOCK])
{
  memset (iv, 0, BLOCK);
  if (c->ivgen == IVGEN_PLAIN)
    put_le64 (iv, sector & 0xffffffffU);
  else
    put_le64 (iv, sector);
  /* ESSIV ciphers (AES, Serpent, Twofish) have 16-byte blocks, as does
   * every data cipher they go with: CAST5 takes no ESSIV. */
  if (c->ivgen == IVGEN_ESSIV)
    c->essiv_alg->encrypt (&c->essiv, BLOCK, iv, iv);
}

/* XTS (IEEE 1619) on one sector of n bytes, a multiple of 16 and at most
 * 512, so no ciphertext stealing.  Same result as nettle's
 * xts_{en,de}crypt_message, but all tweaks are computed first and the
 * sector goes through the cipher in one bulk call (which lets AES-NI
 * pipeline). */
static void
xts_sector (const struct cipher *c, const uint8_t iv[BLOCK], uint8_t *buf,
            size_t n, bool encrypt)
{
  uint8_t t[SECTOR];
  uint64_t lo, hi;
  size_t i;

  c->alg->encrypt (&c->tk, BLOCK, t, iv);
  lo = get_le64 (t);
  hi = get_le64 (t + 8);
  for (i = BLOCK; i < n; i += BLOCK) {
    /* Multiply by x in GF(2^128), little-endian convention. */
    uint64_t carry = hi >> 63;
    hi = hi << 1 | lo >> 63;
    lo = lo << 1 ^ (0x87 & -carry);
    put_le64 (t + i, lo);
    put_le64 (t + i + 8, hi);
  }
  memxor (buf, t, n);
  if (encrypt)
    c->alg->encrypt (&c->ek, n, buf, buf);
  else
    c->alg->decrypt (&c->dk, n, buf, buf);
  memxor (buf, t, n);
  wipe (t, n);
}

/* len is a multiple of the block size; a short last sector is allowed
 * (LUKS key material need not be a whole number of sectors).  Each
 * sector starts from its own IV, as QEMU sets it per sector; CTR's
 * counter is the whole IV block, big-endian, as nettle counts it. */
static void
cipher_run (const struct cipher *c, uint64_t sector, uint8_t *buf,
            size_t len, bool encrypt)
{
  size_t bs = c->alg->block_size;
  uint8_t iv[BLOCK];

  while (len > 0) {
    size_t n = len < SECTOR ? len : SECTOR;

    if (c->mode != MODE_ECB)
      make_iv (c, sector, iv);
    switch (c->mode) {
    case MODE_ECB:
      if (encrypt)
        c->alg->encrypt (&c->ek, n, buf, buf);
      else
        c->alg->decrypt (&c->dk, n, buf, buf);
      break;
    case MODE_CBC:
      if (encrypt)
        cbc_encrypt (&c->ek, c->alg->encrypt, bs, iv, n, buf, buf);
      else
        cbc_decrypt (&c->dk, c->alg->decrypt, bs, iv, n, buf, buf);
      break;
    case MODE_CTR:
      ctr_crypt (&c->ek, c->alg->encrypt, bs, iv, n, buf, buf);
      break;
    case MODE_XTS:
      xts_sector (c, iv, buf, n, encrypt);
      break;
    }
    buf += n;
    len -= n;
    sector++;
  }
}

/* ---- the public context ---- */
struct q2_crypto {
  int method;                           /* 1 AES, 2 LUKS */
  struct cipher cipher;
  char desc[128];
};

static int
crypto_new (int method, const struct family *f, const struct mode_spec *m,
            const uint8_t *key, size_t key_len, struct q2_crypto **out)
{
  struct q2_crypto *c;
  int r;

  c = calloc (1, sizeof *c);
  if (c == NULL)
    return q2_err (ENOMEM, "allocating the encryption context");
  c->method = method;
  r = cipher_init (&c->cipher, f, m, key, key_len);
  if (r < 0) {
    q2_crypto_free (c);
    return r;
  }
  *out = c;
  return 0;
}

void
q2_crypto_free (struct q2_crypto *c)
{
  if (c == NULL)
    return;
  wipe (c, sizeof *c);
  free (c);
}

const char *
q2_crypto_describe (const struct q2_crypto *c)
{
  return c ? c->desc : "none";
}

int
q2_crypto_method (const struct q2_crypto *c)
{
  return c ? c->method : 0;
}

static int
check_args (const struct q2_crypto *c, const uint8_t *buf, size_t len,
            const char *what)
{
  if (c == NULL || (buf == NULL && len > 0))
    return q2_err (EINVAL, "%s: no context or buffer", what);
  if (len % SECTOR != 0)
    return q2_err (EINVAL, "%s: length %zu is not a multiple of %d",
                   what, len, SECTOR);
  return 0;
}

int
q2_crypto_encrypt (const struct q2_crypto *c, uint64_t sector,
                   uint8_t *buf, size_t len)
{
  int r = check_args (c, buf, len, "encrypt");

  if (r == 0)
    cipher_run (&c->cipher, sector, buf, len, true);
  return r;
}

int
q2_crypto_decrypt (const struct q2_crypto *c, uint64_t sector,
                   uint8_t *buf, size_t len)
{
  int r = check_args (c, buf, len, "decrypt");

  if (r == 0)
    cipher_run (&c->cipher, sector, buf, len, false);
  return r;
}

/* ---- legacy AES ---- */
int
q2_crypto_open_aes (const char *password, struct q2_crypto **out)
{
  static const struct mode_spec cbc_plain64 = { MODE_CBC, IVGEN_PLAIN64,
                                                NULL };
  uint8_t key[16] = { 0 };
  size_t n;
  int r;

  if (out == NULL)
    return q2_err (EINVAL, "q2_crypto_open_aes: no output pointer");
  *out = NULL;
  if (password == NULL)
    return q2_err (EINVAL, "the AES-encrypted image needs a password");
  n = strlen (password);
  memcpy (key, password, n < sizeof key ? n : sizeof key);
  r = crypto_new (1, find_family ("aes"), &cbc_plain64, key, sizeof key,
                  out);
  wipe (key, sizeof key);
  if (r == 0)
    snprintf ((*out)->desc, sizeof (*out)->desc, "aes aes-128 cbc-plain64");
  return r;
}

/* ---- LUKS helpers ---- */

/* Copies a NUL-terminated string field of the phdr. */
/* A damaged header must not make opening take hours: QEMU's default
 * (2 s of PBKDF2) is a few million iterations on current machines. */
#define MAX_PBKDF2_ITER (32u << 20)

static int
get_str (const uint8_t *hdr, size_t off, char out[LH_FIELD_LEN],
         const char *field)
{
  if (memchr (hdr + off, '\0', LH_FIELD_LEN) == NULL)
    return q2_err (EINVAL, "LUKS header: %s is not NUL-terminated", field);
  memcpy (out, hdr + off, LH_FIELD_LEN);
  return 0;
}

/* Parses "cbc-plain64", "xts-plain", "cbc-essiv:sha256", "ecb", ...
 * (ECB takes no IV: QEMU still writes one, "ecb-plain64"). */
static int
parse_mode (const char *s, struct mode_spec *m)
{
  static const char *const names[] = { "ecb", "cbc", "ctr", "xts" };
  static const enum mode modes[] = { MODE_ECB, MODE_CBC, MODE_CTR, MODE_XTS };
  const char *dash = strchr (s, '-');
  const char *iv;
  size_t i, mlen = dash ? (size_t) (dash - s) : strlen (s);

  memset (m, 0, sizeof *m);
  for (i = 0; i < 4; i++)
    if (mlen == 3 && strncmp (s, names[i], 3) == 0)
      break;
  if (i == 4)
    return q2_err (ENOTSUP, "cipher mode \"%s\" is not supported (ecb, "
                   "cbc, ctr or xts)", s);
  m->mode = modes[i];
  m->ivgen = IVGEN_PLAIN64;
  if (dash == NULL) {
    if (m->mode == MODE_ECB)
      return 0;
    return q2_err (ENOTSUP, "cipher mode \"%s\" is not supported (no IV "
                   "generator)", s);
  }
  iv = dash + 1;
  /* QEMU writes "plain64:HASH" when a hash is given for a plain IV; the
   * hash means nothing there. */
  if (strcmp (iv, "plain64") == 0 || strncmp (iv, "plain64:", 8) == 0)
    m->ivgen = IVGEN_PLAIN64;
  else if (strcmp (iv, "plain") == 0 || strncmp (iv, "plain:", 6) == 0)
    m->ivgen = IVGEN_PLAIN;
  else if (strncmp (iv, "essiv:", 6) == 0) {
    m->ivgen = IVGEN_ESSIV;
    m->essiv_hash = find_hash (iv + 6);
    if (m->essiv_hash == NULL)
      return q2_err (ENOTSUP, "cipher mode \"%s\": ESSIV hash \"%s\" is "
                     "not supported", s, iv + 6);
    if (m->essiv_hash->hash->digest_size != 16 &&
        m->essiv_hash->hash->digest_size != 24 &&
        m->essiv_hash->hash->digest_size != 32)
      return q2_err (ENOTSUP, "cipher mode \"%s\": the ESSIV hash must give "
                     "a cipher key (16, 24 or 32 bytes)", s);
  }
  else
    return q2_err (ENOTSUP, "cipher mode \"%s\": IV generator \"%s\" is "
                   "not supported", s, iv);
  return 0;
}

/* AF diffusion: each digest-sized block i of d becomes
 * H(be32(i) || block), the last block truncated. */
static void
af_diffuse (const struct hash_info *hi, uint8_t *d, size_t n)
{
  const struct nettle_hash *h = hi->hash;
  union hash_ctx hc;
  uint8_t out[64], ctr[4];
  size_t off;
  uint32_t i;

  for (i = 0, off = 0; off < n; i++, off += h->digest_size) {
    size_t m = Q2_MIN ((size_t) h->digest_size, n - off);

    q2_put_be32 (ctr, i);
    h->init (&hc);
    h->update (&hc, sizeof ctr, ctr);
    h->update (&hc, m, d + off);
    h->digest (&hc, h->digest_size, out);
    memcpy (d + off, out, m);
  }
  wipe (&hc, sizeof hc);
  wipe (out, sizeof out);
}

static void
af_merge (const struct hash_info *hi, const uint8_t *src, size_t key_bytes,
          uint32_t stripes, uint8_t *mk)
{
  uint32_t i;

  memset (mk, 0, key_bytes);
  for (i = 0; i + 1 < stripes; i++) {
    memxor (mk, src + (size_t) i * key_bytes, key_bytes);
    af_diffuse (hi, mk, key_bytes);
  }
  memxor (mk, src + (size_t) (stripes - 1) * key_bytes, key_bytes);
}

/* dst gets stripes * key_bytes bytes; the first stripes - 1 blocks must
 * already be random. */
static void
af_split_finish (const struct hash_info *hi, uint8_t *dst, size_t key_bytes,
                 uint32_t stripes, const uint8_t *mk)
{
  uint8_t d[MAX_KEY] = { 0 };
  uint32_t i;

  for (i = 0; i + 1 < stripes; i++) {
    memxor (d, dst + (size_t) i * key_bytes, key_bytes);
    af_diffuse (hi, d, key_bytes);
  }
  memxor3 (dst + (size_t) (stripes - 1) * key_bytes, d, mk, key_bytes);
  wipe (d, sizeof d);
}

/* Everything open needs from the phdr, validated. */
struct luks_hdr {
  char cipher_name[LH_FIELD_LEN], cipher_mode[LH_FIELD_LEN];
  char hash_spec[LH_FIELD_LEN];
  const struct family *family;
  struct mode_spec mode;
  const struct hash_info *hash;
  uint32_t key_bytes, mk_digest_iter;
  const uint8_t *mk_digest, *mk_digest_salt;
  struct {
    bool active;
    uint32_t iterations, stripes;
    uint64_t km_offset, km_len;         /* bytes into the area */
    const uint8_t *salt;
  } slot[Q2_LUKS_NUM_SLOTS];
};

static int
parse_luks (const uint8_t *hdr, size_t len, struct luks_hdr *h)
{
  const struct nettle_cipher *alg;
  int i, r;

  memset (h, 0, sizeof *h);
  if (hdr == NULL || len < Q2_LUKS_PHDR_SIZE)
    return q2_err (EINVAL, "LUKS header: the area (%zu bytes) is smaller "
                   "than the %d-byte phdr", hdr ? len : 0,
                   Q2_LUKS_PHDR_SIZE);
  if (memcmp (hdr, LUKS_MAGIC, LUKS_MAGIC_LEN) != 0)
    return q2_err (EINVAL, "LUKS header: bad magic");
  if (q2_be16 (hdr + LH_VERSION) != 1)
    return q2_err (EINVAL, "LUKS header: version %u is not 1 (only LUKS1 "
                   "is used in qcow2)", q2_be16 (hdr + LH_VERSION));
  if ((r = get_str (hdr, LH_CIPHER_NAME, h->cipher_name, "cipher_name")) < 0 ||
      (r = get_str (hdr, LH_CIPHER_MODE, h->cipher_mode, "cipher_mode")) < 0 ||
      (r = get_str (hdr, LH_HASH_SPEC, h->hash_spec, "hash_spec")) < 0)
    return r;
  h->family = find_family (h->cipher_name);
  if (h->family == NULL)
    return q2_err (ENOTSUP, "LUKS header: cipher_name \"%s\" is not "
                   "supported (aes, serpent, twofish or cast5)",
                   h->cipher_name);
  r = parse_mode (h->cipher_mode, &h->mode);
  if (r < 0)
    return q2_err_prefix (r, "LUKS header: cipher_mode");
  h->hash = find_hash (h->hash_spec);
  if (h->hash == NULL)
    return q2_err (ENOTSUP, "LUKS header: hash_spec \"%s\" is not supported",
                   h->hash_spec);
  h->key_bytes = q2_be32 (hdr + LH_KEY_BYTES);
  if ((r = mode_cipher (h->family, &h->mode, h->key_bytes, &alg)) < 0)
    return q2_err_prefix (r, "LUKS header: key_bytes %u with %s", 
                          h->key_bytes, h->cipher_mode);
  h->mk_digest = hdr + LH_MK_DIGEST;
  h->mk_digest_salt = hdr + LH_MK_DIGEST_SALT;
  h->mk_digest_iter = q2_be32 (hdr + LH_MK_DIGEST_ITER);
  if (h->mk_digest_iter == 0 || h->mk_digest_iter > MAX_PBKDF2_ITER)
    return q2_err (EINVAL, "LUKS header: mk_digest_iter %u is out of range "
                   "(1..%u)", h->mk_digest_iter, MAX_PBKDF2_ITER);

  for (i = 0; i < Q2_LUKS_NUM_SLOTS; i++) {
    const uint8_t *s = hdr + LH_SLOTS + i * LS_SIZE;
    uint32_t active = q2_be32 (s + LS_ACTIVE);
    uint64_t off;

    if (active == LUKS_SLOT_DISABLED)
      continue;
    if (active != LUKS_SLOT_ENABLED)
      return q2_err (EINVAL, "LUKS header: key slot %d: active field %#x is "
                     "neither enabled nor disabled", i, active);
    h->slot[i].active = true;
    h->slot[i].iterations = q2_be32 (s + LS_ITERATIONS);
    h->slot[i].salt = s + LS_SALT;
    h->slot[i].stripes = q2_be32 (s + LS_STRIPES);
    off = (uint64_t) q2_be32 (s + LS_KM_OFFSET) * SECTOR;
    h->slot[i].km_offset = off;
    h->slot[i].km_len = (uint64_t) h->slot[i].stripes * h->key_bytes;
    if (h->slot[i].iterations == 0 ||
        h->slot[i].iterations > MAX_PBKDF2_ITER)
      return q2_err (EINVAL, "LUKS header: key slot %d: iterations %u is out "
                     "of range (1..%u)", i, h->slot[i].iterations,
                     MAX_PBKDF2_ITER);
    if (h->slot[i].stripes == 0)
      return q2_err (EINVAL, "LUKS header: key slot %d: stripes is 0", i);
    if (h->slot[i].km_len % alg->block_size != 0)
      return q2_err (EINVAL, "LUKS header: key slot %d: key material of "
                     "%llu bytes is not a whole number of cipher blocks", i,
                     (unsigned long long) h->slot[i].km_len);
    if (off < Q2_LUKS_PHDR_SIZE)
      return q2_err (EINVAL, "LUKS header: key slot %d: key_material_offset "
                     "%llu overlaps the phdr", i, (unsigned long long) off);
    if (off > len || h->slot[i].km_len > len - off)
      return q2_err (EINVAL, "LUKS header: key slot %d: key material "
                     "(key_material_offset %llu, %llu bytes) lies outside "
                     "the %zu-byte LUKS area", i, (unsigned long long) off,
                     (unsigned long long) h->slot[i].km_len, len);
  }
  return 0;
}

/* Tries one slot: 1 and *mk set if the password opens it, 0 if not,
 * or -errno.  km is scratch of at least km_len bytes. */
static int
try_slot (const uint8_t *hdr, const struct luks_hdr *h, int i,
          const char *password, uint8_t *km, uint8_t mk[MAX_KEY])
{
  struct cipher kc;
  uint8_t slot_key[MAX_KEY], digest[LUKS_DIGEST_LEN];
  int r, match;

  h->hash->pbkdf2 (strlen (password), (const uint8_t *) password,
                   h->slot[i].iterations, LUKS_SALT_LEN, h->slot[i].salt,
                   h->key_bytes, slot_key);
  r = cipher_init (&kc, h->family, &h->mode, slot_key, h->key_bytes);
  wipe (slot_key, sizeof slot_key);
  if (r < 0) {
    wipe (&kc, sizeof kc);
    return r;
  }
  memcpy (km, hdr + h->slot[i].km_offset, h->slot[i].km_len);
  cipher_run (&kc, 0, km, h->slot[i].km_len, false);
  wipe (&kc, sizeof kc);
  af_merge (h->hash, km, h->key_bytes, h->slot[i].stripes, mk);
  wipe (km, h->slot[i].km_len);
  h->hash->pbkdf2 (h->key_bytes, mk, h->mk_digest_iter, LUKS_SALT_LEN,
                   h->mk_digest_salt, sizeof digest, digest);
  match = memeql_sec (digest, h->mk_digest, sizeof digest);
  wipe (digest, sizeof digest);
  if (!match)
    wipe (mk, MAX_KEY);
  return match ? 1 : 0;
}

static void
describe_luks (struct q2_crypto *c, const struct luks_hdr *h)
{
  snprintf (c->desc, sizeof c->desc, "luks %s-%u %s %s", h->family->name,
            c->cipher.alg->key_size * 8, h->cipher_mode, h->hash_spec);
}

int
q2_crypto_open_luks (const uint8_t *hdr, size_t len, const char *password,
                     struct q2_crypto **out)
{
  struct luks_hdr h;
  uint8_t mk[MAX_KEY], *km = NULL;
  uint64_t km_max = 0;
  int i, r, nactive = 0;

  if (out == NULL)
    return q2_err (EINVAL, "q2_crypto_open_luks: no output pointer");
  *out = NULL;
  r = parse_luks (hdr, len, &h);
  if (r < 0)
    return r;
  if (password == NULL)
    return q2_err (EINVAL, "the LUKS-encrypted image needs a password");
  for (i = 0; i < Q2_LUKS_NUM_SLOTS; i++)
    if (h.slot[i].active) {
      nactive++;
      km_max = Q2_MAX (km_max, h.slot[i].km_len);
    }
  if (nactive == 0)
    return q2_err (EPERM, "invalid password for the encrypted image (the "
                   "LUKS header has no active key slot)");

  km = malloc (km_max);                 /* km_max <= len */
  if (km == NULL)
    return q2_err (ENOMEM, "allocating %llu bytes of LUKS key material",
                   (unsigned long long) km_max);
  r = 0;
  for (i = 0; i < Q2_LUKS_NUM_SLOTS && r == 0; i++)
    if (h.slot[i].active)
      r = try_slot (hdr, &h, i, password, km, mk);
  free (km);                            /* wiped by try_slot */
  if (r < 0)
    return r;
  if (r == 0)
    return q2_err (EPERM, "invalid password for the encrypted image");

  r = crypto_new (2, h.family, &h.mode, mk, h.key_bytes, out);
  wipe (mk, sizeof mk);
  if (r == 0)
    describe_luks (*out, &h);
  return r;
}

int
q2_crypto_open_key (const char *cipher_mode, const uint8_t *key,
                    size_t key_len, struct q2_crypto **out)
{
  struct mode_spec m;
  int r;

  if (out == NULL)
    return q2_err (EINVAL, "q2_crypto_open_key: no output pointer");
  *out = NULL;
  if (cipher_mode == NULL || key == NULL)
    return q2_err (EINVAL, "q2_crypto_open_key: no cipher mode or key");
  r = parse_mode (cipher_mode, &m);
  if (r < 0)
    return r;
  r = crypto_new (2, find_family ("aes"), &m, key, key_len, out);
  if (r == 0)
    snprintf ((*out)->desc, sizeof (*out)->desc, "luks aes-%u %s",
              (*out)->cipher.alg->key_size * 8, cipher_mode);
  return r;
}

/* ---- creating a LUKS area ---- */
static int
random_bytes (void *buf, size_t n)
{
  uint8_t *p = buf;

  while (n > 0) {
    ssize_t r = getrandom (p, n, 0);

    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0 && errno == ENOSYS) {
      /* Old kernel: fall back to the device. */
      int fd = open ("/dev/urandom", O_RDONLY | O_CLOEXEC);

      if (fd < 0)
        return q2_err (errno, "/dev/urandom: %m");
      while (n > 0) {
        r = read (fd, p, n);
        if (r < 0 && errno == EINTR)
          continue;
        if (r <= 0) {
          int e = r < 0 ? errno : EIO;
          close (fd);
          return q2_err (e, "reading /dev/urandom: %s", strerror (e));
        }
        p += r;
        n -= r;
      }
      close (fd);
      return 0;
    }
    if (r < 0)
      return q2_err (errno, "getrandom: %m");
    p += r;
    n -= r;
  }
  return 0;
}

int
q2_crypto_create_luks (const char *cipher_alg, const char *cipher_mode,
                       const char *ivgen, const char *hash,
                       const char *password, uint32_t iterations,
                       uint8_t **hdr_out, size_t *hdr_len,
                       struct q2_crypto **out)
{
  char mode_str[LH_FIELD_LEN];
  struct mode_spec m;
  const struct hash_info *hi;
  struct cipher kc;
  const struct family *f;
  const struct nettle_cipher *alg;
  char name[16];
  unsigned bits;
  int end = 0;
  size_t key_bytes, km_len, slot_sectors, area_sectors, area_len;
  uint8_t mk[MAX_KEY], slot_key[MAX_KEY], u[16];
  uint8_t *a = NULL, *km;
  uint32_t digest_iter;
  int i, r, n;

  if (hdr_out == NULL || hdr_len == NULL || out == NULL)
    return q2_err (EINVAL, "q2_crypto_create_luks: no output pointer");
  *hdr_out = NULL;
  *hdr_len = 0;
  *out = NULL;
  if (password == NULL)
    return q2_err (EINVAL, "creating a LUKS header needs a password");
  if (iterations == 0)
    return q2_err (EINVAL, "LUKS key slot iterations must be > 0");

  /* "aes-256", "serpent-128", "cast5-128", ... */
  if (cipher_alg == NULL)
    cipher_alg = "aes-256";
  if (sscanf (cipher_alg, "%15[a-z0-9]-%u%n", name, &bits, &end) != 2 ||
      cipher_alg[end] != '\0' ||
      (f = find_family (name)) == NULL || bits % 8 != 0 ||
      family_cipher (f, bits / 8) == NULL)
    return q2_err (ENOTSUP, "cipher algorithm \"%s\" is not supported "
                   "(aes-128, aes-192, aes-256, serpent-128, serpent-192, "
                   "serpent-256, twofish-128, twofish-192, twofish-256, "
                   "cast5-128)", cipher_alg);

  if (cipher_mode == NULL)
    cipher_mode = "xts";
  if (ivgen == NULL && strchr (cipher_mode, '-') != NULL)
    n = snprintf (mode_str, sizeof mode_str, "%s", cipher_mode);
  else {
    if (ivgen == NULL)
      ivgen = "plain64";
    if (strcmp (ivgen, "essiv") == 0)
      ivgen = "essiv:sha256";
    n = snprintf (mode_str, sizeof mode_str, "%s-%s", cipher_mode, ivgen);
  }
  if (n < 0 || (size_t) n >= sizeof mode_str)
    return q2_err (EINVAL, "cipher mode \"%s\" is too long", cipher_mode);
  r = parse_mode (mode_str, &m);
  if (r < 0)
    return r;
  key_bytes = m.mode == MODE_XTS ? bits / 4 : bits / 8;
  if ((r = mode_cipher (f, &m, key_bytes, &alg)) < 0)
    return q2_err_prefix (r, "%s with %s", cipher_alg, mode_str);
  if (key_bytes * Q2_LUKS_STRIPES % SECTOR != 0)
    return q2_err (ENOTSUP, "%s with %s: the key material (%zu bytes) is "
                   "not a whole number of sectors, which QEMU cannot open",
                   cipher_alg, mode_str, key_bytes * Q2_LUKS_STRIPES);

  if (hash == NULL)
    hash = "sha256";
  hi = find_hash (hash);
  if (hi == NULL)
    return q2_err (ENOTSUP, "hash \"%s\" is not supported (md5, sha1, "
                   "sha224, sha256, sha384, sha512, ripemd160)", hash);

  /* QEMU's layout. */
  km_len = key_bytes * Q2_LUKS_STRIPES;
  slot_sectors = Q2_ROUND_UP ((km_len + SECTOR - 1) / SECTOR,
                              LUKS_ALIGN_SECTORS);
  area_sectors = LUKS_ALIGN_SECTORS + Q2_LUKS_NUM_SLOTS * slot_sectors;
  area_len = area_sectors * SECTOR;
  a = calloc (1, area_len);
  if (a == NULL)
    return q2_err (ENOMEM, "allocating a %zu-byte LUKS header", area_len);

  memcpy (a, LUKS_MAGIC, LUKS_MAGIC_LEN);
  q2_put_be16 (a + LH_VERSION, 1);
  strcpy ((char *) a + LH_CIPHER_NAME, f->name);
  strcpy ((char *) a + LH_CIPHER_MODE, mode_str);
  snprintf ((char *) a + LH_HASH_SPEC, LH_FIELD_LEN, "%s", hi->name);
  q2_put_be32 (a + LH_PAYLOAD_OFFSET, area_sectors);
  q2_put_be32 (a + LH_KEY_BYTES, key_bytes);
  digest_iter = Q2_MAX (iterations / 8, LUKS_MIN_DIGEST_ITER);
  q2_put_be32 (a + LH_MK_DIGEST_ITER, digest_iter);

  r = random_bytes (mk, key_bytes);
  if (r == 0)
    r = random_bytes (a + LH_MK_DIGEST_SALT, LUKS_SALT_LEN);
  if (r == 0)
    r = random_bytes (a + LH_SLOTS + LS_SALT, LUKS_SALT_LEN);
  if (r == 0)
    r = random_bytes (u, sizeof u);
  if (r < 0)
    goto out;
  hi->pbkdf2 (key_bytes, mk, digest_iter, LUKS_SALT_LEN,
              a + LH_MK_DIGEST_SALT, LUKS_DIGEST_LEN, a + LH_MK_DIGEST);

  /* A version 4 UUID. */
  u[6] = (u[6] & 0x0f) | 0x40;
  u[8] = (u[8] & 0x3f) | 0x80;
  snprintf ((char *) a + LH_UUID, LH_UUID_LEN,
            "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
            "%02x%02x%02x%02x%02x%02x",
            u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7],
            u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);

  for (i = 0; i < Q2_LUKS_NUM_SLOTS; i++) {
    uint8_t *s = a + LH_SLOTS + i * LS_SIZE;

    q2_put_be32 (s + LS_ACTIVE, i == 0 ? LUKS_SLOT_ENABLED
                                       : LUKS_SLOT_DISABLED);
    q2_put_be32 (s + LS_ITERATIONS, i == 0 ? iterations : 0);
    q2_put_be32 (s + LS_KM_OFFSET, LUKS_ALIGN_SECTORS + i * slot_sectors);
    q2_put_be32 (s + LS_STRIPES, Q2_LUKS_STRIPES);
  }

  /* Slot 0: AF-split the master key, encrypt it with the slot key. */
  km = a + LUKS_ALIGN_SECTORS * SECTOR;
  r = random_bytes (km, km_len - key_bytes);
  if (r < 0)
    goto out;
  af_split_finish (hi, km, key_bytes, Q2_LUKS_STRIPES, mk);
  hi->pbkdf2 (strlen (password), (const uint8_t *) password, iterations,
              LUKS_SALT_LEN, a + LH_SLOTS + LS_SALT, key_bytes, slot_key);
  r = cipher_init (&kc, f, &m, slot_key, key_bytes);
  if (r == 0)
    cipher_run (&kc, 0, km, km_len, true);
  wipe (&kc, sizeof kc);
  wipe (slot_key, sizeof slot_key);
  if (r < 0)
    goto out;

  r = crypto_new (2, f, &m, mk, key_bytes, out);
  if (r < 0)
    goto out;
  snprintf ((*out)->desc, sizeof (*out)->desc, "luks %s %s %s", cipher_alg,
            mode_str, hi->name);
  *hdr_out = a;
  *hdr_len = area_len;
  a = NULL;

 out:
  wipe (mk, sizeof mk);
  if (a) {
    wipe (a, area_len);
    free (a);
  }
  return r;
}
