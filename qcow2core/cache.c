/* A bounded LRU cache of metadata slices (L2 tables, refcount blocks),
 * keyed by host offset.  Slots are handed out in order as they are first
 * needed, their slices allocated then, and the hash grows with them: a
 * generous limit costs only untouched address space until it is used,
 * and flushes scan only the slots ever used.  The caller serialises
 * access with its own lock. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define NIL UINT32_MAX
#define MIN_HASH 64u            /* buckets; doubled to stay >= 2 * used */

struct slot {
  uint64_t key;
  uint8_t *data;
  bool valid;
  bool dirty;
  uint32_t prev, next;          /* LRU list, head = most recent */
  uint32_t hnext;               /* hash chain: index + 1, 0 ends it */
};

struct q2_cache {
  uint32_t slice_size;
  uint32_t nb_slots;
  uint32_t used;                /* slots [0, used) are on the LRU list */
  struct slot *slots;
  uint32_t *hash;               /* bucket heads: index + 1, 0 if empty */
  uint32_t hash_mask;
  uint32_t head, tail;
  q2_cache_writeback_fn writeback;
  void *opaque;
};

struct q2_cache *
q2_cache_new (uint32_t slice_size, uint32_t nb_slots,
              q2_cache_writeback_fn writeback, void *opaque)
{
  struct q2_cache *c;

  if (nb_slots < 2)
    nb_slots = 2;
  c = calloc (1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->slice_size = slice_size;
  c->nb_slots = nb_slots;
  c->writeback = writeback;
  c->opaque = opaque;
  /* calloc: pages of slots never used are never touched. */
  c->slots = calloc (nb_slots, sizeof *c->slots);
  c->hash_mask = MIN_HASH - 1;
  c->hash = calloc (MIN_HASH, sizeof *c->hash);
  if (c->slots == NULL || c->hash == NULL) {
    q2_cache_free (c);
    return NULL;
  }
  c->head = c->tail = NIL;
  return c;
}

void
q2_cache_free (struct q2_cache *c)
{
  uint32_t i;

  if (c == NULL)
    return;
  if (c->slots)
    for (i = 0; i < c->used; i++)
      free (c->slots[i].data);
  free (c->slots);
  free (c->hash);
  free (c);
}

void
q2_cache_set_writeback (struct q2_cache *c, q2_cache_writeback_fn fn,
                        void *opaque)
{
  c->writeback = fn;
  c->opaque = opaque;
}

uint32_t
q2_cache_slice_size (const struct q2_cache *c)
{
  return c->slice_size;
}

static uint32_t
bucket (const struct q2_cache *c, uint64_t key)
{
  uint64_t k = key / c->slice_size;
  return (uint32_t) ((k * 0x9e3779b97f4a7c15ULL) >> 32) & c->hash_mask;
}

static void
lru_unlink (struct q2_cache *c, uint32_t i)
{
  struct slot *s = &c->slots[i];

  if (s->prev != NIL) c->slots[s->prev].next = s->next; else c->head = s->next;
  if (s->next != NIL) c->slots[s->next].prev = s->prev; else c->tail = s->prev;
}

static void
lru_push_front (struct q2_cache *c, uint32_t i)
{
  struct slot *s = &c->slots[i];

  s->prev = NIL;
  s->next = c->head;
  if (c->head != NIL)
    c->slots[c->head].prev = i;
  c->head = i;
  if (c->tail == NIL)
    c->tail = i;
}

/* Free slots go to the tail so they are reused before live ones. */
static void
lru_push_back (struct q2_cache *c, uint32_t i)
{
  struct slot *s = &c->slots[i];

  s->next = NIL;
  s->prev = c->tail;
  if (c->tail != NIL)
    c->slots[c->tail].next = i;
  c->tail = i;
  if (c->head == NIL)
    c->head = i;
}

static uint32_t
lookup (const struct q2_cache *c, uint64_t key)
{
  uint32_t h;

  for (h = c->hash[bucket (c, key)]; h != 0; h = c->slots[h - 1].hnext)
    if (c->slots[h - 1].key == key)
      return h - 1;
  return NIL;
}

static void
hash_insert (struct q2_cache *c, uint32_t i)
{
  uint32_t b = bucket (c, c->slots[i].key);

  c->slots[i].hnext = c->hash[b];
  c->hash[b] = i + 1;
}

static void
hash_remove (struct q2_cache *c, uint32_t i)
{
  uint32_t *p = &c->hash[bucket (c, c->slots[i].key)];

  while (*p != 0 && *p != i + 1)
    p = &c->slots[*p - 1].hnext;
  if (*p == i + 1)
    *p = c->slots[i].hnext;
  c->slots[i].hnext = 0;
}

/* Keeps at least two buckets per slot in use; rehashes when doubling. */
static int
hash_grow (struct q2_cache *c)
{
  uint32_t n = c->hash_mask + 1, i, *h;

  if (c->used * 2ULL <= n)
    return 0;
  h = calloc ((size_t) n * 2, sizeof *h);
  if (h == NULL)
    return q2_err (ENOMEM, "out of memory for a metadata cache hash");
  free (c->hash);
  c->hash = h;
  c->hash_mask = n * 2 - 1;
  for (i = 0; i < c->used; i++)
    if (c->slots[i].valid)
      hash_insert (c, i);
  return 0;
}

static int
write_back_slot (struct q2_cache *c, uint32_t i)
{
  struct slot *s = &c->slots[i];
  int r;

  if (!s->valid || !s->dirty)
    return 0;
  r = c->writeback (c->opaque, s->key, s->data, c->slice_size);
  if (r < 0)
    return r;
  s->dirty = false;
  return 0;
}

/* A slot for a new slice: a free one at the LRU tail, else one never
 * used, else the least recently used (written back first). */
static uint32_t
take_slot (struct q2_cache *c, int *err)
{
  uint32_t i = c->tail;

  if ((i == NIL || c->slots[i].valid) && c->used < c->nb_slots) {
    i = c->used++;
    if ((*err = hash_grow (c)) < 0) {
      c->used--;
      return NIL;
    }
    lru_push_front (c, i);
    return i;
  }
  if ((*err = write_back_slot (c, i)) < 0)
    return NIL;
  if (c->slots[i].valid)
    hash_remove (c, i);
  c->slots[i].valid = false;
  return i;
}

static uint32_t
find_or_evict (struct q2_cache *c, uint64_t key, bool *hit, int *err)
{
  uint32_t i = lookup (c, key);

  *err = 0;
  *hit = i != NIL;
  if (i == NIL) {
    if ((i = take_slot (c, err)) == NIL)
      return NIL;
    if (c->slots[i].data == NULL &&
        (c->slots[i].data = malloc (c->slice_size)) == NULL) {
      *err = q2_err (ENOMEM, "out of memory for a metadata cache slice");
      return NIL;
    }
  }
  lru_unlink (c, i);
  lru_push_front (c, i);
  return i;
}

static void
install (struct q2_cache *c, uint32_t i, uint64_t key)
{
  c->slots[i].key = key;
  c->slots[i].valid = true;
  c->slots[i].dirty = false;
  hash_insert (c, i);
}

int
q2_cache_get (struct q2_cache *c, int fd, uint64_t offset, const char *what,
              uint8_t **data)
{
  bool hit;
  int r;
  uint32_t i = find_or_evict (c, offset, &hit, &r);

  if (i == NIL)
    return r;
  if (!hit) {
    r = q2_io_pread (fd, c->slots[i].data, c->slice_size, offset, false,
                     what);
    if (r < 0)
      return r;
    install (c, i, offset);
  }
  *data = c->slots[i].data;
  return 0;
}

int
q2_cache_get_empty (struct q2_cache *c, uint64_t offset, uint8_t **data)
{
  bool hit;
  int r;
  uint32_t i = find_or_evict (c, offset, &hit, &r);

  if (i == NIL)
    return r;
  if (!hit)
    install (c, i, offset);
  memset (c->slots[i].data, 0, c->slice_size);
  c->slots[i].dirty = true;
  *data = c->slots[i].data;
  return 0;
}

void
q2_cache_mark_dirty (struct q2_cache *c, uint64_t offset)
{
  uint32_t i = lookup (c, offset);

  if (i != NIL)
    c->slots[i].dirty = true;
}

bool
q2_cache_has_dirty (const struct q2_cache *c)
{
  uint32_t i;

  for (i = 0; i < c->used; i++)
    if (c->slots[i].valid && c->slots[i].dirty)
      return true;
  return false;
}

int
q2_cache_flush (struct q2_cache *c)
{
  uint32_t i;
  int r;

  for (i = 0; i < c->used; i++)
    if ((r = write_back_slot (c, i)) < 0)
      return r;
  return 0;
}

static void
discard_slot (struct q2_cache *c, uint32_t i)
{
  hash_remove (c, i);
  c->slots[i].valid = false;
  c->slots[i].dirty = false;
  lru_unlink (c, i);
  lru_push_back (c, i);
}

void
q2_cache_discard (struct q2_cache *c, uint64_t offset, uint64_t length)
{
  uint64_t k, end = offset + length;
  uint32_t i;

  /* A short range (a freed cluster, a new table) is looked up slice by
   * slice, since keys are slice-aligned: scanning every slot of a big
   * cache per freed cluster made trims crawl.  A long one is scanned. */
  if (length / c->slice_size < c->used && end > offset) {
    for (k = Q2_ROUND_UP (offset, c->slice_size); k < end;
         k += c->slice_size)
      if ((i = lookup (c, k)) != NIL)
        discard_slot (c, i);
    return;
  }
  for (i = 0; i < c->used; i++) {
    struct slot *s = &c->slots[i];
    if (s->valid && s->key >= offset && s->key - offset < length)
      discard_slot (c, i);
  }
}
