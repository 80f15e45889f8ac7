/* Shared state of the nbdkit-qcow2 plugin's source files. */
#ifndef NBDKIT_QCOW2_PLUGIN_H
#define NBDKIT_QCOW2_PLUGIN_H

#include "qcow2.h"

extern char *filename;                  /* file=, absolute */
extern uint64_t l2_cache_size;          /* l2-cache-size=, 0 = default */
extern struct q2_image *image;          /* the active image, shared */
extern const char *snapshot;            /* snapshot=, or NULL */
/* How the active image was opened: backing policy, caches, locking. */
extern struct q2_open_opts open_opts;

/* exports.c: internal snapshots served as read-only exports. */
/* The image a client asking for export 'name' gets, or NULL (with an
 * nbdkit error) when the name is neither "" nor a snapshot.  *view is
 * what the connection hands to exports_release when it closes. */
struct q2_image *exports_image_for (const char *name, bool *readonly,
                                    int *view);
void exports_release (int view);
int exports_list (struct nbdkit_exports *exports);
void exports_close_all (void);

#endif /* NBDKIT_QCOW2_PLUGIN_H */
