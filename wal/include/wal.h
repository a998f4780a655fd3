/*
 * wal.h - capsule's write-ahead log on LMDB: framed, checksummed records, group commit,
 * iteration by sequence / kind / key, truncation.
 *
 * THE ON-DISK FORMAT (byte by byte) and THE VALIDITY RULE are documented in wal/wal_format.h.
 *
 * Durability contract:
 *   - WAL_SYNC (default): a producer is told a record is done only after its frame is in the
 *     journal (DIR/wal.journal, fdatasynced: one flush per batch) and the LMDB transaction
 *     holding it has committed (unflushed; checkpoints in store.ckpt bound what a power loss
 *     rolls back, and the journal re-applies it at the next open). An acknowledged record
 *     survives kill -9 and power loss (as far as the disk honours fdatasync).
 *   - WAL_NOSYNC: commits do not fsync; a background sync runs every sync_interval_ms (default
 *     100). Acknowledged records survive kill -9 of the process (they are in the OS page cache)
 *     but a machine crash can lose the records acknowledged in the last interval.
 *   - A failed commit or fsync aborts the process with a log line (cap_fatal). It never
 *     continues silently: the log is what makes a crash safe.
 *   - Records appended together in one wal_log_append() call are committed in one transaction:
 *     all or none of them are visible after a crash.
 *
 * Threads: wal_log_append*() may be called from any thread. A single writer thread owns all
 * write transactions: it takes everything pending (bounded by max_batch_records / bytes), writes
 * it in one transaction, commits, then calls each producer's done callback ON THE WRITER THREAD,
 * in sequence order. A callback must be short and must not call wal_log_append_sync() (it may
 * call wal_log_append()); to get back to a libuv loop, queue the result and uv_async_send().
 * Iterators may be used from any one thread at a time.
 */
#ifndef WAL_H
#define WAL_H

#include <stddef.h>
#include <stdint.h>

#include "cap.h"
#include "store.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct wal_log wal_log_t;
typedef struct wal_iter wal_iter_t;

/* One field of a record: a tag chosen by the module that owns the record kind, an integer and a
 * byte string (either may be unused: 0 / NULL,0). */
typedef struct wal_field {
    uint32_t tag;
    uint64_t u;
    const void *data;
    size_t len;
} wal_field_t;

/* A record as a producer gives it. kind: 1..255, assigned per module (see ARCHITECTURE.md,
 * "record kinds"). key: up to WAL_MAX_KEY bytes (a session id, a promise id), indexed so records
 * can be read by key. The wal copies everything during wal_log_append(): the caller's memory may
 * be freed when it returns. */
typedef struct wal_rec {
    uint8_t kind;
    const void *key;
    size_t key_len;
    const wal_field_t *fields;
    size_t nfields;
} wal_rec_t;

#define WAL_MAX_KEY            511
#define WAL_DEFAULT_MAX_RECORD (64u << 20)

/* The names of the log's threads (/proc/PID/task/TID/comm): the writer commits every batch; the
 * checkpoint thread captures and flushes in the background (journal mode only). */
#define WAL_THREAD_WRITER "capsule-wal"
#define WAL_THREAD_CKPT   "capsule-ckpt"

/* A record as read back. Pointers are valid until the next wal_iter_next() or close; inside an
 * apply callback, until the callback returns. fields/nfields are set only when decoding was asked
 * for (wal_iter_opts_t.decode, and always in apply). */
typedef struct wal_entry {
    uint64_t seq;
    uint8_t kind;
    const void *key;
    size_t key_len;
    const wal_field_t *fields;
    size_t nfields;
    size_t frame_len; /* bytes stored for this record (header + key + body) */
} wal_entry_t;

/* Called on the writer thread inside the group-commit transaction, once per record, in sequence
 * order, so a module can keep derived tables (materialised state, indexes) in the same LMDB
 * transaction as the record: they can never disagree. Must only write through `txn`, and must be
 * re-runnable (the batch is re-run after a map growth). A non-zero return is a broken invariant:
 * the wal aborts the process with a log line naming the sequence number. */
typedef int (*wal_apply_fn)(void *arg, store_txn_t *txn, const wal_entry_t *e);
/* (Implementation notes: CAP_EMAPFULL from apply is not a broken invariant but the store asking
 * for room: the batch is aborted, the map grown and the whole batch re-run. Open the databases
 * apply writes to before wal_log_open(): a handle opened inside a batch that is re-run is lost.) */

/* Called once per append, on the writer thread, after the records are durable (status 0) or
 * when the log is closed before they could be written (CAP_ECLOSED). first_seq is the sequence
 * number of the first record of the append; the others follow it consecutively. */
typedef void (*wal_done_fn)(void *arg, int status, uint64_t first_seq);

typedef enum { WAL_SYNC = 0, WAL_NOSYNC = 1 } wal_durability_t;

typedef struct wal_opts {
    wal_durability_t durability; /* default WAL_SYNC; the env must be opened with nosync to match */
    uint32_t sync_interval_ms;   /* WAL_NOSYNC: background fsync period; 0 = 100 */
    uint32_t max_batch_records;  /* records per transaction at most; 0 = 4096 */
    size_t max_batch_bytes;      /* bytes per transaction at most (one record always fits);
                                    0 = 64 MiB */
    size_t max_record_bytes;     /* one record's encoded size at most; 0 = 64 MiB */
    wal_apply_fn apply;          /* optional, see above */
    void *apply_arg;
    uint32_t index_lag;   /* (added) the key index may lag the log by this many records, written
                             in sorted chunks off the commit path; reads by key scan the lagging
                             tail. 0 = 8192; 1 = index after every batch */
    size_t journal_bytes; /* (added) WAL_SYNC: size of wal.journal, rounded up to 4 KiB; 0 =
                             16 MiB, at least 64 KiB. A checkpoint runs every half of it; a
                             batch larger than half of it is made durable by a checkpoint. */
    uint32_t linger_us;   /* (added) group-commit linger, off by default (0): right after a
                             commit that acknowledged at least 8 appends, the writer waits up to
                             this long (and at most half that commit's time) until as many
                             appends as it acknowledged have been queued on top of those already
                             waiting, so that callers re-issuing on their acknowledgement share
                             one commit instead of alternating in two half batches. Ends as soon
                             as they are queued. Never after a smaller commit, nor once the
                             writer went idle: a lone or occasional caller is not delayed. Off by
                             default because on this 2-core machine it did not pay (see
                             ARCHITECTURE.md, wal/). At most 100000 (CAP_EINVAL above). */
} wal_opts_t;

/* Opens the log inside an open env (borrowed: it must outlive the log). Creates the log's
 * databases if missing, checks the log's format version, finds the last sequence number, and
 * starts the writer thread (none when the env is read-only). Errors: CAP_EVERSION (a log written
 * by another format version), CAP_ECORRUPT (the log's metadata is damaged; message says what),
 * store errors. */
int wal_log_open(store_env_t *env, const wal_opts_t *opts, wal_log_t **out);
/* Stops accepting appends, writes and acknowledges everything already queued, stops the writer
 * and frees the log. NULL is a no-op. */
void wal_log_close(wal_log_t *log);

/* Queues records [recs, recs+n) to be committed together. On 0, done(arg, status, first_seq)
 * will be called exactly once; *first_seq (optional) gets the sequence number assigned to
 * recs[0] at once. On error nothing was queued and done is not called: CAP_EINVAL (n == 0, kind
 * 0, key too long), CAP_ETOOBIG (a record over max_record_bytes), CAP_ECLOSED. */
int wal_log_append(wal_log_t *log, const wal_rec_t *recs, size_t n, wal_done_fn done, void *arg,
                   uint64_t *first_seq);
/* The same, then waits until the records are durable. Not from a done or apply callback. */
int wal_log_append_sync(wal_log_t *log, const wal_rec_t *recs, size_t n, uint64_t *first_seq);

/* For a producer that appends and then waits on the same thread's loop anyway (the engine with
 * one execution in flight): wal_log_hold(log) makes this thread's appends leave a sleeping writer
 * asleep until wal_log_release(log, here). With here != 0, WAL_NOSYNC and the writer asleep,
 * release commits the queued records ON THE CALLING THREAD (one batch, exactly as the writer
 * would: same transaction, apply callbacks, done callbacks, which then run on this thread before
 * it returns 1) and saves the two thread hand-offs of a commit (writer wake-up, completion back);
 * otherwise it wakes the writer if an append needs it, and returns 0. The writer does not run
 * while such a batch is committed (sequence order is kept). Not from a done or apply callback,
 * and not while holding a lock a done callback takes. */
void wal_log_hold(wal_log_t *log);
int wal_log_release(wal_log_t *log, int here);

/* Deletes every record with seq < before_seq (and its index entries), in bounded transactions on
 * the writer thread, interleaved with appends (writers are never stopped). Returns once done.
 * The sequence never goes backwards: later appends continue after the highest ever assigned. */
int wal_log_truncate(wal_log_t *log, uint64_t before_seq);
/* (Notes: not from a done or apply callback. It deletes what is committed while it runs; a record
 * with seq < before_seq still queued when it finishes is kept. CAP_EINVAL on a read-only log,
 * CAP_ECLOSED once closing. wal_log_append on a read-only log: CAP_EINVAL; an append of more
 * than max_batch_records records, or of several records over max_batch_bytes in all:
 * CAP_ETOOBIG, since an append's records always share one transaction. wal_log_open on a
 * read-only env that holds no log: CAP_ENOTFOUND.) */

#define WAL_HIST_N 12 /* buckets of the stats histograms (the last one is unbounded) */

typedef struct wal_stats {
    uint64_t first_seq;   /* lowest stored sequence number (0 when empty) */
    uint64_t last_seq;    /* highest acknowledged sequence number (0 when empty) */
    uint64_t records;     /* records committed since open */
    uint64_t commits;     /* transactions committed since open */
    uint64_t bytes;       /* frame bytes committed since open */
    uint64_t max_batch;   /* the largest batch since open, in records */
    uint64_t pending;     /* records queued and not yet durable */
    uint64_t indexed_seq; /* (added) the key index covers every record <= this */
    /* Histograms since open (counts per bucket, not cumulative; the last bucket is "more"):
     * batch_hist by records per commit, bucket i holds <= wal_batch_bounds[i];
     * commit_hist by the time of one commit (in WAL_SYNC it includes the journal's fdatasync),
     * bucket i holds <= wal_commit_bounds_us[i] microseconds. */
    uint64_t batch_hist[WAL_HIST_N];
    uint64_t commit_hist[WAL_HIST_N];
    uint64_t commit_ns;      /* total time in commit transactions */
    uint64_t syncs, sync_ns; /* explicit fsyncs of the env (WAL_NOSYNC's background sync) */
    uint64_t checkpoints, checkpoint_ns; /* (added) WAL_SYNC: store checkpoints since open and
                                          * their time from capture to durable (most of it on
                                          * the checkpoint thread, beside the commits) */
    uint64_t checkpoint_overlap;         /* (added) commits made while a checkpoint was in
                                          * flight (not a stall: they went on beside it) */
    uint64_t checkpoint_wait_ns;         /* (added) time the writer waited for a checkpoint in
                                          * flight (journal space, a batch too large for it) */
    uint64_t checkpoint_stall_ns;        /* (added) time the writer spent on checkpoints: the
                                          * captures, the waits above, synchronous ones (before
                                          * the checkpoint thread: all of checkpoint_ns) */
    uint64_t checkpoint_in_flight;       /* (added) 1 while a checkpoint is captured and not yet
                                          * durable, else 0 */
    uint64_t replayed; /* (added) records re-applied from the journal when the log opened */
    uint64_t checkpoints_skipped; /* (added) checkpoint captures that failed and were retried
                                   * after the next batch (the previous checkpoint stayed) */
    uint64_t inline_commits;      /* (added) batches committed on a producer's thread by
                                   * wal_log_release (included in commits) */
    uint64_t lingers, linger_ns;  /* (added) group-commit lingers (opts.linger_us) and their time */
    uint64_t linger_joined;       /* (added) appends queued during them */
    uint64_t linger_full;         /* (added) lingers ended because the awaited appends came */
} wal_stats_t;
extern const uint32_t wal_batch_bounds[WAL_HIST_N - 1];
extern const uint32_t wal_commit_bounds_us[WAL_HIST_N - 1];
void wal_log_stats(wal_log_t *log, wal_stats_t *out);
/* (added) For tools on a directory opened read-only: how many records the journal holds past the
 * last checkpoint with seq > after_seq (the log's highest), i.e. acknowledged records the next
 * read-write open re-applies. 0 and *records = 0 when there is no checkpoint or journal;
 * CAP_ECORRUPT when store.ckpt names a journal that is missing. Reads files only. */
int wal_journal_pending(store_env_t *env, uint64_t after_seq, uint64_t *records);

/* The env the log lives in (borrowed). */
store_env_t *wal_log_env(wal_log_t *log);

/* Iteration. Filters combine: from_seq and then kind and/or key. With a key the key index is
 * used (no full scan). */
typedef struct wal_iter_opts {
    uint64_t from_seq; /* first sequence number to return (0 = the first stored) */
    uint64_t to_seq;   /* last one to return (0 = no limit) */
    int kind;          /* 0 = any kind */
    const void *key;   /* NULL = any key */
    size_t key_len;
    int decode; /* 1: decode fields (tpl); 0: verify the checksum only (fast replay / verify) */
} wal_iter_opts_t;
/* Opens a read transaction (a snapshot: appends after open are not seen). The transaction holds
 * the store's map-growth lock shared until wal_iter_close: keep iterators short while writers
 * run, and never wait for an append or a truncation (wal_log_append_sync, wal_log_truncate)
 * while holding one open, since a map growth would wait for the iterator. A kind filter scans
 * (and verifies) every record in the sequence range; a key uses the index. */
int wal_iter_open(wal_log_t *log, const wal_iter_opts_t *opts, wal_iter_t **out);
/* 0 and *e filled; CAP_ENOTFOUND at the end; CAP_ECORRUPT when a stored frame fails its checks
 * (e->seq is then the damaged record's sequence number, and the iterator may be stepped past it
 * with another call). Never crashes on damaged data, and never hands tpl unverified bytes. */
int wal_iter_next(wal_iter_t *it, wal_entry_t *e);
/* A human-readable reason for the last CAP_ECORRUPT (borrowed, valid until the next call). */
const char *wal_iter_error(const wal_iter_t *it);
void wal_iter_close(wal_iter_t *it); /* NULL is a no-op */

/* Codec, exposed for tools and tests: encode one record to a frame (caller frees with cap_free),
 * and verify + decode a frame. wal_frame_decode's fields point into `frame` and into *scratch
 * (freed with wal_scratch_free); both must outlive their use. */
typedef struct wal_scratch wal_scratch_t;
int wal_frame_encode(const wal_rec_t *rec, uint64_t seq, uint8_t **frame, size_t *len);
int wal_frame_decode(const void *frame, size_t len, int decode, wal_scratch_t **scratch,
                     wal_entry_t *e);
void wal_scratch_free(wal_scratch_t *s); /* NULL is a no-op */
/* (wal_frame_decode: scratch may be NULL when decode is 0; *scratch NULL is allocated on first
 * use and may be reused across calls. Errors: CAP_ECORRUPT for any frame that fails the validity
 * rule of wal_format.h. wal_frame_encode: CAP_EINVAL, CAP_ETOOBIG over WAL_DEFAULT_MAX_RECORD.) */
/* Finds a field by tag in a decoded entry; NULL if absent. */
const wal_field_t *wal_entry_field(const wal_entry_t *e, uint32_t tag);

#ifdef __cplusplus
}
#endif
#endif /* WAL_H */
