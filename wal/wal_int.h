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

/* A frame's length from its header (32 + key_len + body_len); p holds at least 32 bytes. */
static inline size_t wal__frame_len(const uint8_t *p)
{
    return WAL_FRAME_HDR + ((size_t)p[6] | (size_t)p[7] << 8) + cap_get_le32(p + 16);
}

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

/* ---- the journal (journal.c; format at the end of wal_format.h) ---- */
typedef struct wal_journal wal_journal_t;
/* A position in the journal's block stream; 32 bytes in store.ckpt's caller area. */
struct wal_jpos {
    uint64_t epoch;    /* random per journal incarnation (0: no journal) */
    uint64_t lap;      /* times the writer went back to offset 0 in this epoch */
    uint64_t pos;      /* byte offset of the next block (a multiple of 4096) */
    uint64_t next_seq; /* first seq of the next block */
};
struct wal_jframe {
    const uint8_t *p;
    size_t len;
};
typedef int (*wal_jscan_fn)(void *arg, const uint8_t *frames, size_t len, uint64_t first_seq,
                            uint32_t count);
void wal__jpos_put(uint8_t out[32], const struct wal_jpos *p);
void wal__jpos_get(const uint8_t in[32], struct wal_jpos *p);
/* Bytes a block of frame_bytes occupies (header + frames, rounded up to 4096). */
uint64_t wal__jblock_len(size_t frame_bytes);
/* Where a block of blen bytes goes: at p, or at offset 0 of the next lap if it does not fit. */
void wal__journal_place(const wal_journal_t *j, struct wal_jpos *p, uint64_t blen);
/* (Re)creates DIR/wal.journal: size bytes of zeros, fsynced, renamed into place, dir fsynced. */
int wal__journal_create(const char *dir, uint64_t size);
/* Opens DIR/wal.journal (-ENOENT when missing). */
int wal__journal_open(const char *dir, int readonly, wal_journal_t **out);
void wal__journal_close(wal_journal_t *j);
/* Switches j to its writer descriptor: O_DIRECT | O_DSYNC when the file system allows (then
 * every block write is durable when it returns), else unchanged (pwrite + fdatasync). After it,
 * j is only written (no scans). */
int wal__journal_writer(wal_journal_t *j);
uint64_t wal__journal_size(const wal_journal_t *j);
/* Writes one block of nf sealed frames (bytes in all, seqs first_seq..first_seq+count-1) at *at
 * (placed by wal__journal_place), makes it durable when sync (fdatasync, or O_DSYNC on the
 * writer descriptor), and moves *at past it. CAP_ETOOBIG
 * when the block is larger than the file; -errno on I/O errors. Writer thread only. */
int wal__journal_put(wal_journal_t *j, struct wal_jpos *at, uint64_t first_seq, uint32_t count,
                     const struct wal_jframe *f, size_t nf, size_t bytes, int sync);
/* Calls fn for each valid block from *p on (the frames verified, consecutive seqs from
 * p->next_seq), moving *p past it; stops at the first block failing a check (*stop gets the
 * reason) or when fn returns non-zero (returned). *blocks counts the blocks delivered. */
int wal__journal_scan(wal_journal_t *j, struct wal_jpos *p, wal_jscan_fn fn, void *arg,
                      uint64_t *blocks, const char **stop);

#endif /* WAL_INT_H */
