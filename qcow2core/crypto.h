/* qcow2 encryption primitives: legacy AES (crypt_method 1) and LUKS1
 * (crypt_method 2), built on nettle.
 *
 * Only guest data is encrypted, in independent 512-byte sectors.  The
 * caller chooses the sector number of the first sector of a buffer:
 *
 *   legacy AES   guest (virtual) offset / 512
 *   LUKS         host (file) offset / 512
 *
 * Every function returns 0 or -errno and leaves a message for
 * q2_last_error().  A context is immutable after it is opened, so
 * q2_crypto_encrypt / q2_crypto_decrypt may run concurrently on it.
 */
#ifndef QCOW2CORE_CRYPTO_H
#define QCOW2CORE_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

#define Q2_CRYPTO_SECTOR_SIZE 512

/* The LUKS1 on-disk constants, for callers that lay out images. */
#define Q2_LUKS_PHDR_SIZE 592
#define Q2_LUKS_NUM_SLOTS 8
#define Q2_LUKS_STRIPES 4000

/* LUKS1 on-disk layout: offsets into the phdr and into a key slot. */
#define LUKS_MAGIC "LUKS\xba\xbe"
#define LUKS_MAGIC_LEN 6
#define LH_VERSION 6
#define LH_CIPHER_NAME 8
#define LH_CIPHER_MODE 40
#define LH_HASH_SPEC 72
#define LH_FIELD_LEN 32
#define LH_PAYLOAD_OFFSET 104
#define LH_KEY_BYTES 108
#define LH_MK_DIGEST 112
#define LH_MK_DIGEST_SALT 132
#define LH_MK_DIGEST_ITER 164
#define LH_UUID 168
#define LH_UUID_LEN 40
#define LH_SLOTS 208
#define LS_SIZE 48
#define LS_ACTIVE 0
#define LS_ITERATIONS 4
#define LS_SALT 8
#define LS_KM_OFFSET 40
#define LS_STRIPES 44
#define LUKS_DIGEST_LEN 20
#define LUKS_SALT_LEN 32
#define LUKS_SLOT_ENABLED 0x00ac71f3U
#define LUKS_SLOT_DISABLED 0x0000deadU

struct q2_crypto;

/* Legacy qcow AES: AES-128-CBC, key = the first 16 bytes of the password
 * zero-padded, IV = plain64 (sector number, little-endian).  There is no
 * way to detect a wrong password. */
int q2_crypto_open_aes (const char *password, struct q2_crypto **out);

/* LUKS1.  hdr/len is the whole LUKS area (phdr plus key material) as
 * read from the image at the offset of the full disk encryption header
 * extension; key material offsets are relative to hdr.  Tries every
 * active key slot.  Errors: -EINVAL malformed header (the message names
 * the field), -ENOTSUP unsupported cipher/mode/hash, -EPERM no key slot
 * accepts the password ("invalid password for the encrypted image"),
 * -ENOMEM. */
int q2_crypto_open_luks (const uint8_t *hdr, size_t len,
                         const char *password, struct q2_crypto **out);

/* Encrypt / decrypt len bytes in place; len must be a multiple of 512
 * and sector is the number of the first sector (see above). */
int q2_crypto_encrypt (const struct q2_crypto *c, uint64_t sector,
                       uint8_t *buf, size_t len);
int q2_crypto_decrypt (const struct q2_crypto *c, uint64_t sector,
                       uint8_t *buf, size_t len);

/* Wipes all key material and frees; NULL is allowed. */
void q2_crypto_free (struct q2_crypto *c);

/* E.g. "luks aes-256 xts-plain64 sha256" or "aes aes-128 cbc-plain64";
 * never contains key material.  Valid until q2_crypto_free. */
const char *q2_crypto_describe (const struct q2_crypto *c);

/* 1 for legacy AES, 2 for LUKS: the qcow2 crypt_method value. */
int q2_crypto_method (const struct q2_crypto *c);

/* A LUKS-style context straight from a master key, for callers that
 * already hold one (and for tests): cipher_mode is a LUKS mode string
 * such as "xts-plain64" or "cbc-essiv:sha256"; key_len is the LUKS
 * key_bytes (16/24/32, doubled for xts). */
int q2_crypto_open_key (const char *cipher_mode, const uint8_t *key,
                        size_t key_len, struct q2_crypto **out);

/* Builds a new LUKS1 area the way QEMU lays it out: the phdr in a
 * 4096-byte header, 8 key slots of stripes * key_bytes bytes each,
 * rounded up to 4096 bytes, slot i at sector 8 + i * slot_sectors, only
 * slot 0 active; payload_offset (in sectors) = the area length.
 *
 *   cipher_alg   "aes-128", "aes-192", "aes-256"            (NULL: aes-256)
 *                (aes-192 only with xts: with cbc its 96000 bytes of key
 *                material are not whole sectors, and QEMU 7.2 aborts on
 *                such a header, so that is -ENOTSUP)
 *   cipher_mode  "xts", "cbc"                                (NULL: xts)
 *   ivgen        "plain64", "plain", "essiv" / "essiv:sha256"
 *                (NULL: plain64; or NULL with a full LUKS mode string
 *                such as "cbc-essiv:sha256" in cipher_mode)
 *   hash         "sha1", "sha256", "sha384", "sha512"
 *                (NULL: sha256), for PBKDF2 and the AF diffusion
 *   iterations   PBKDF2 iterations of key slot 0 (> 0); the master key
 *                digest uses max (1000, iterations / 8)
 *
 * On success *hdr_out is a malloc'd area of *hdr_len bytes (a multiple
 * of 4096) and *out an open context for the new master key. */
int q2_crypto_create_luks (const char *cipher_alg, const char *cipher_mode,
                           const char *ivgen, const char *hash,
                           const char *password, uint32_t iterations,
                           uint8_t **hdr_out, size_t *hdr_len,
                           struct q2_crypto **out);

#endif /* QCOW2CORE_CRYPTO_H */
