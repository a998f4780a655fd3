/*
 * wal_int.h - internals shared between the files of wal/ (codec.c, log.c, iter.c).
 * Invariant: only codec.c includes tpl.h and xxhash.h; everything else goes through these.
 */
#ifndef WAL_INT_H
#define WAL_INT_H

#include <pthread.h>

#include "wal.h"
#include "wal_format.h"

/* Builds the frame of one record with seq 0 and, in the checksum slot, the hash of key and body
 * (not yet a valid frame: wal__frame_seal finishes it). CAP_EINVAL / CAP_ETOOBIG (encoded size
 * over max_bytes). *frame is cap_malloc'd. Any thread. */
int wal__frame_build(const wal_rec_t *rec, size_t max_bytes, uint8_t **frame, size_t *len);
/* Writes seq and the final checksum into a built frame. Call exactly once per built frame. */
void wal__frame_seal(uint8_t *frame, uint64_t seq);
/* Verifies a frame (the validity rule) and, with decode, unpacks its fields into *scratch
 * (allocated on first use). On CAP_ECORRUPT *why (if given) gets a static reason. */
int wal__frame_decode(const void *frame, size_t len, int decode, wal_scratch_t **scratch,
                      wal_entry_t *e, const char **why);
/* Reads the key of a frame without verifying it, bounded by len (for truncation of damaged
 * frames). 0 and key/len set, or CAP_ECORRUPT. */
int wal__frame_peek_key(const void *frame, size_t len, const void **key, size_t *key_len);

/* The wal.key index entry of a record: XXH3-64(key) big-endian, then seq big-endian (16 bytes
 * into buf; see wal_format.h). */
store_val_t wal__index_key(uint8_t buf[16], const void *key, size_t key_len, uint64_t seq);

/* Reads a big-endian u64 from wal.meta (0 when absent; CAP_ECORRUPT when not 8 bytes). */
int wal__meta_u64(store_txn_t *txn, store_dbi_t meta, const char *name, uint64_t *out);

/* The log's databases (shared with iter.c). */
struct wal_dbs {
    store_dbi_t log, key, meta;
};
struct wal_dbs wal__log_dbs(wal_log_t *log);

#endif /* WAL_INT_H */
