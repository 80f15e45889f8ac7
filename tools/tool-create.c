/* qcow2-tool create: a new qcow2 image, with qemu-img create's -o
 * options. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
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
  "  -o data_file=NAME             guest data in an external file, created\n"
  "                                relative to IMG's directory\n"
  "  -o data_file_raw=on|off       ... which then is a raw image itself\n"
  "  -o nocow=on|off               no copy-on-write on btrfs\n"
  "  -o encrypt.format=aes|luks    encrypt (legacy AES or LUKS1); needs a\n"
  "                                password (see below)\n"
  "  -o encryption=on              the same as encrypt.format=aes\n"
  "  -o encrypt.cipher-alg=aes-128|aes-192|aes-256   LUKS (default aes-256)\n"
  "                        serpent-128|-192|-256, twofish-128|-192|-256,\n"
  "                        cast5-128\n"
  "  -o encrypt.cipher-mode=xts|cbc|ctr|ecb          LUKS (default xts)\n"
  "  -o encrypt.ivgen-alg=plain64|plain|essiv        LUKS (default plain64)\n"
  "  -o encrypt.ivgen-hash-alg=sha256|md5            LUKS with essiv\n"
  "  -o encrypt.hash-alg=sha1|sha256|sha384|sha512   LUKS (default sha256)\n"
  "                        md5|sha224|ripemd160\n"
  "  -o encrypt.iter-time=MS       LUKS PBKDF2 time (default 2000)\n"
  "  -o encrypt.iter=N             LUKS PBKDF2 iterations (instead)\n"
  "  -o encrypt.key-secret=ID      the password from --object secret,id=ID\n"
  "  --password SECRET             the password of an encrypted image\n"
  "  --password-file FILE          ... read from FILE (trailing newlines\n"
  "                                are dropped)\n"
  "  --object secret,id=ID,data=SECRET|file=FILE   as qemu-img\n"
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

/* Where the password comes from: --password, --password-file or
 * --object secret (selected by encrypt.key-secret). */
struct secrets {
  struct password_opt pw;       /* --password, --password-file */
  const char *key_secret;       /* -o encrypt.key-secret=ID */
  struct {
    char *id, *data;            /* malloc'd */
  } objects[8];
  int nb_objects;
};

static void
free_secrets (struct secrets *sec)
{
  int i;

  password_free (&sec->pw);
  for (i = 0; i < sec->nb_objects; i++) {
    free (sec->objects[i].id);
    free_secret (sec->objects[i].data);
  }
}


/* --object secret,id=ID,data=SECRET or secret,id=ID,file=FILE */
static int
add_object (struct secrets *sec, const char *spec)
{
  char *copy = strdup (spec), *save = NULL, *item, *id = NULL;
  char *data = NULL;
  bool first = true;
  int r = -1;

  if (copy == NULL) {
    tool_error ("out of memory");
    return -1;
  }
  for (item = strtok_r (copy, ",", &save); item;
       item = strtok_r (NULL, ",", &save), first = false) {
    char *eq = strchr (item, '=');
    if (first && eq == NULL) {
      if (strcmp (item, "secret") != 0) {
        tool_error ("--object: only 'secret' objects are supported, not "
                    "'%s'", item);
        goto out;
      }
      continue;
    }
    if (eq == NULL) {
      tool_error ("--object: invalid parameter '%s'", item);
      goto out;
    }
    *eq = '\0';
    if (strcmp (item, "qom-type") == 0 && strcmp (eq + 1, "secret") == 0)
      continue;
    else if (strcmp (item, "id") == 0) {
      free (id);
      id = strdup (eq + 1);
    }
    else if (strcmp (item, "data") == 0 || strcmp (item, "file") == 0) {
      free_secret (data);
      /* Like QEMU, a secret file is used verbatim. */
      data = item[0] == 'd' ? strdup (eq + 1)
        : read_secret_file (eq + 1, false);
      if (data == NULL)
        goto out;
    }
    else if (strcmp (item, "format") == 0 && strcmp (eq + 1, "raw") == 0)
      continue;
    else {
      tool_error ("--object secret: unsupported parameter '%s'", item);
      goto out;
    }
  }
  if (id == NULL || data == NULL) {
    tool_error ("--object secret: both id= and data= (or file=) are "
                "needed");
    goto out;
  }
  if (sec->nb_objects == (int) (sizeof sec->objects / sizeof sec->objects[0])) {
    tool_error ("--object: too many secrets");
    goto out;
  }
  sec->objects[sec->nb_objects].id = id;
  sec->objects[sec->nb_objects].data = data;
  sec->nb_objects++;
  id = data = NULL;
  r = 0;
 out:
  /* copy held the secret too. */
  explicit_bzero (copy, strlen (spec));
  free (copy);
  free (id);
  free_secret (data);
  return r;
}

/* Is s valid UTF-8?  QEMU refuses other secrets, so an image keyed with
 * one could never be opened there. */
static bool
is_utf8 (const char *s)
{
  const unsigned char *p = (const unsigned char *) s;

  while (*p) {
    unsigned n, i;
    uint32_t c;
    if (*p < 0x80) { p++; continue; }
    else if ((*p & 0xe0) == 0xc0) { n = 1; c = *p & 0x1f; }
    else if ((*p & 0xf0) == 0xe0) { n = 2; c = *p & 0x0f; }
    else if ((*p & 0xf8) == 0xf0) { n = 3; c = *p & 0x07; }
    else
      return false;
    for (i = 1; i <= n; i++) {
      if ((p[i] & 0xc0) != 0x80)
        return false;
      c = (c << 6) | (p[i] & 0x3f);
    }
    /* Overlong forms, surrogates and values past U+10FFFF. */
    if ((n == 1 && c < 0x80) || (n == 2 && c < 0x800) ||
        (n == 3 && c < 0x10000) || c > 0x10ffff ||
        (c >= 0xd800 && c <= 0xdfff))
      return false;
    p += n + 1;
  }
  return true;
}

/* Sets o->password from the secrets; -1 (reported) on failure. */
static int
resolve_password (struct q2_create_opts *o, struct secrets *sec)
{
  int i;

  if (sec->key_secret) {
    for (i = sec->nb_objects - 1; i >= 0; i--)
      if (strcmp (sec->objects[i].id, sec->key_secret) == 0) {
        o->password = sec->objects[i].data;
        break;
      }
    if (i < 0) {
      tool_error ("No secret with id '%s'", sec->key_secret);
      return -1;
    }
    if (sec->pw.password) {
      tool_error ("--password and encrypt.key-secret cannot be used "
                  "together");
      return -1;
    }
  }
  else if (sec->pw.password)
    o->password = sec->pw.password;
  if (o->password && !is_utf8 (o->password)) {
    tool_error ("the password is not valid UTF-8 (QEMU could not use it)");
    return -1;
  }
  return 0;
}

static int
set_uint32_plain (const char *key, const char *v, uint32_t *out)
{
  char *end;
  unsigned long long n;

  errno = 0;
  n = strtoull (v, &end, 10);
  if (errno || end == v || *end || n == 0 || n > UINT32_MAX || v[0] == '-') {
    tool_error ("%s: invalid value '%s' (a number from 1 to %u)", key, v,
                UINT32_MAX);
    return -1;
  }
  *out = n;
  return 0;
}

static int
set_encrypt_option (struct q2_create_opts *o, struct secrets *sec,
                    const char *key, const char *v)
{
  const char *k = key + strlen ("encrypt.");

  if (strcmp (k, "format") == 0) {
    if (strcmp (v, "aes") == 0)
      o->encrypt_format = Q2_ENCRYPT_AES;
    else if (strcmp (v, "luks") == 0)
      o->encrypt_format = Q2_ENCRYPT_LUKS;
    else {
      tool_error ("Parameter 'format' does not accept value '%s'", v);
      return -1;
    }
  }
  else if (strcmp (k, "key-secret") == 0)
    sec->key_secret = v;
  else if (strcmp (k, "cipher-alg") == 0)
    o->cipher_alg = v;
  else if (strcmp (k, "cipher-mode") == 0)
    o->cipher_mode = v;
  else if (strcmp (k, "ivgen-alg") == 0)
    o->ivgen_alg = v;
  else if (strcmp (k, "ivgen-hash-alg") == 0)
    o->ivgen_hash_alg = v;
  else if (strcmp (k, "hash-alg") == 0)
    o->hash_alg = v;
  else if (strcmp (k, "iter-time") == 0)
    return set_uint32_plain (key, v, &o->iter_time_ms);
  else if (strcmp (k, "iter") == 0)
    return set_uint32_plain (key, v, &o->iterations);
  else {
    tool_error ("Invalid parameter '%s'", key);
    return -1;
  }
  return 0;
}

/* Options that qemu-img prints back whenever they are given, even
 * with their default value. */
struct given {
  bool compat, preallocation, data_file_raw, nocow;
};

/* Applies one key=value of -o. */
static int
set_option (struct q2_create_opts *o, struct secrets *sec, struct given *g,
            const char *key, const char *v)
{
  if (strncmp (key, "encrypt.", 8) == 0)
    return set_encrypt_option (o, sec, key, v);
  if (strcmp (key, "encryption") == 0) {
    bool on;
    if (set_bool_option (key, v, &on) < 0)
      return -1;
    if (on)
      o->encrypt_format = Q2_ENCRYPT_AES;
    return 0;
  }
  if (strcmp (key, "compat") == 0) {
    g->compat = true;
    return set_compat (o, v);
  }
  if (strcmp (key, "cluster_size") == 0)
    return set_number_option (key, v, &o->cluster_size);
  if (strcmp (key, "refcount_bits") == 0)
    return set_number_option (key, v, &o->refcount_bits);
  if (strcmp (key, "extended_l2") == 0)
    return set_bool_option (key, v, &o->extended_l2);
  if (strcmp (key, "lazy_refcounts") == 0)
    return set_bool_option (key, v, &o->lazy_refcounts);
  if (strcmp (key, "preallocation") == 0) {
    g->preallocation = true;
    return set_preallocation (o, v);
  }
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
  if (strcmp (key, "data_file") == 0) {
    o->data_file = v;
    return 0;
  }
  if (strcmp (key, "data_file_raw") == 0) {
    g->data_file_raw = true;
    return set_bool_option (key, v, &o->data_file_raw);
  }
  if (strcmp (key, "nocow") == 0) {
    g->nocow = true;
    return set_bool_option (key, v, &o->nocow);
  }
  tool_error ("Invalid parameter '%s'", key);
  return -1;
}

/* Splits "a=1,b=2" (the string is modified and must stay alive). */
static int
parse_o_list (struct q2_create_opts *o, struct secrets *sec, struct given *g,
              char *list, bool *help)
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
    if (set_option (o, sec, g, item, eq + 1) < 0)
      return -1;
  }
  return 0;
}

static void
print_formatting (const char *path, uint64_t size,
                  const struct q2_create_opts *o, const struct secrets *sec,
                  const struct given *g)
{
  static const char *const prealloc[] = { "off", "metadata", "falloc",
                                          "full" };

  printf ("Formatting '%s', fmt=qcow2", path);
  /* The encrypt.* options as given (never the password). */
  if (o->encrypt_format) {
    printf (" encrypt.format=%s",
            o->encrypt_format == Q2_ENCRYPT_AES ? "aes" : "luks");
    if (sec->key_secret)
      printf (" encrypt.key-secret=%s", sec->key_secret);
    if (o->cipher_alg)
      printf (" encrypt.cipher-alg=%s", o->cipher_alg);
    if (o->cipher_mode)
      printf (" encrypt.cipher-mode=%s", o->cipher_mode);
    if (o->ivgen_alg)
      printf (" encrypt.ivgen-alg=%s", o->ivgen_alg);
    if (o->ivgen_hash_alg)
      printf (" encrypt.ivgen-hash-alg=%s", o->ivgen_hash_alg);
    if (o->hash_alg)
      printf (" encrypt.hash-alg=%s", o->hash_alg);
    if (o->iter_time_ms)
      printf (" encrypt.iter-time=%u", o->iter_time_ms);
    if (o->iterations)
      printf (" encrypt.iter=%u", o->iterations);
  }
  printf (" cluster_size=%u extended_l2=%s", o->cluster_size,
          o->extended_l2 ? "on" : "off");
  if (g->preallocation)
    printf (" preallocation=%s", prealloc[o->preallocation]);
  printf (" compression_type=%s", o->compression_type ? "zstd" : "zlib");
  if (size != UINT64_MAX)
    printf (" size=%llu", (unsigned long long) size);
  if (g->compat)
    printf (" compat=%s", o->version == 2 ? "0.10" : "1.1");
  if (o->backing_file)
    printf (" backing_file=%s", o->backing_file);
  if (o->backing_format)
    printf (" backing_fmt=%s", o->backing_format);
  if (o->data_file)
    printf (" data_file=%s", o->data_file);
  if (g->data_file_raw)
    printf (" data_file_raw=%s", o->data_file_raw ? "on" : "off");
  printf (" lazy_refcounts=%s refcount_bits=%u",
          o->lazy_refcounts ? "on" : "off", o->refcount_bits);
  if (g->nocow)
    printf (" nocow=%s", o->nocow ? "on" : "off");
  putchar ('\n');
}

int
cmd_create (int argc, char **argv)
{
  static const struct option long_opts[] = {
    { "help", no_argument, NULL, 'h' },
    { "password", required_argument, NULL, 'P' },
    { "password-file", required_argument, NULL, 'W' },
    { "object", required_argument, NULL, 'J' },
    { NULL, 0, NULL, 0 },
  };
  struct q2_create_opts o;
  struct secrets sec;
  struct given given = { false };
  uint64_t size = UINT64_MAX;
  bool quiet = false, help = false;
  const char *path;
  int c, ret = EXIT_FAIL;

  q2_create_opts_init (&o);
  memset (&sec, 0, sizeof sec);
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
        goto out;
      }
      break;
    case 'o':
      if (parse_o_list (&o, &sec, &given, optarg, &help) < 0)
        goto out;
      break;
    case 'P':
    case 'W':
      if (password_option (&sec.pw, c, optarg) < 0)
        goto out;
      break;
    case 'J':
      if (add_object (&sec, optarg) < 0)
        goto out;
      break;
    default:
      fputs (create_help, stderr);
      goto out;
    }
  }
  if (help) {
    fputs (create_help, stdout);
    ret = 0;
    goto out;
  }
  if (argc - optind < 1 || argc - optind > 2) {
    tool_error ("create: expecting IMG [SIZE]");
    fputs (create_help, stderr);
    goto out;
  }
  path = argv[optind];
  if (argc - optind == 2 && !parse_size (argv[optind + 1], &size)) {
    tool_error ("Invalid image size specified. You may use k, M, G, T, P "
                "or E suffixes for kilobytes, megabytes, gigabytes, "
                "terabytes, petabytes and exabytes.");
    goto out;
  }
  /* UINT64_MAX means "no size given" below: QEMU's limit is INT64_MAX. */
  if (argc - optind == 2 && size > INT64_MAX) {
    tool_error ("Invalid image size specified. Must be between 0 and "
                "%" PRId64 ".", INT64_MAX);
    goto out;
  }
  if (size == UINT64_MAX && o.backing_file == NULL) {
    tool_error ("Image creation needs a size parameter");
    goto out;
  }
  if (resolve_password (&o, &sec) < 0)
    goto out;
  if (!quiet)
    print_formatting (path, size, &o, &sec, &given);
  if (q2_create (path, size, &o) < 0) {
    tool_core_error (NULL);
    goto out;
  }
  ret = 0;
 out:
  free_secrets (&sec);
  return ret;
}
