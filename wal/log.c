/*
 * log.c - the write-ahead log: open/close, group commit on one writer thread, truncation.
 *
 * Invariants:
 *   - Sequence numbers are assigned under log->mu in the same critical section that enqueues the
 *     append, so the queue is always in sequence order and MDB_APPEND always holds.
 *   - Only the writer thread opens write transactions on the log's databases. It takes a batch
 *     (whole appends only: an append's records share one transaction), writes it through
 *     store_env_write (re-run after map growth), commits (fsync in WAL_SYNC), and only then calls
 *     the done callbacks, in sequence order, without holding log->mu.
 *   - A failed commit or fsync is cap_fatal: the process never acknowledges past a failure.
 *   - The key index (wal.key) lags the log by at most opts.index_lag records: the writer indexes
 *     committed records in sorted chunks when the lag reaches it or after 20 ms without
 *     appends, and records the high-water mark ("indexed" in wal.meta) in the same transaction.
 *     Readers by key use the index up to that mark and scan the (bounded) tail after it.
 *   - Truncation runs on the writer thread, at most WAL_TRUNC_CHUNK records per transaction,
 *     alternating with batches, so appends never wait for a whole truncation.
 *   - committed_seq only grows; "high" in wal.meta is written with every truncation chunk, so a
 *     reopened log never reuses a sequence number that was acknowledged.
 */
#define _GNU_SOURCE /* pthread_setname_np */
#include "wal_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define WAL_DEFAULT_BATCH_RECORDS 4096u
#define WAL_DEFAULT_BATCH_BYTES   ((size_t)64 << 20)
#define WAL_DEFAULT_SYNC_MS       100u
#define WAL_MAX_RECORD_LIMIT      ((size_t)1 << 31)
#define WAL_TRUNC_CHUNK           1024u
#define WAL_DEFAULT_INDEX_LAG     8192u
#define WAL_INDEX_CHUNK           16384u
#define WAL_INDEX_SLICE           512u /* index entries per transaction (wal__index_slice_fn) */
#define WAL_INDEX_IDLE_NS         (20u * 1000000u) /* index the tail after 20 ms without appends */
#define WAL_MAX_LINGER_US         100000u
#define WAL_LINGER_MIN_APPENDS    8u /* a commit acknowledging fewer appends is never lingered on */

struct wal_frame_ref {
    uint8_t *p;
    size_t len;
};

struct wal_append {
    struct wal_append *next;
    uint64_t first_seq;
    wal_done_fn done;
    void *arg;
    size_t bytes;
    size_t n;
    struct wal_frame_ref f[];
};

struct wal_trunc {
    struct wal_trunc *next;
    uint64_t before;
    int done;
    int status;
    pthread_cond_t cv;
};

struct wal_log {
    store_env_t *env;
    struct wal_dbs dbs;
    wal_opts_t opts;
    int readonly;

    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* writer waits here */
    struct wal_append *head, *tail;
    struct wal_trunc *trunc_head, *trunc_tail;
    int writer_waiting;     /* the writer sleeps on work_cv: an append must wake it */
    int inline_run;         /* wal_log_release is committing a batch on its caller's thread */
    int writer_parked;      /* the writer waits for that commit to end (it is woken then) */
    size_t queued;          /* appends in the queue */
    size_t linger_want;     /* lingering: wake the writer when queued reaches it (0: not) */
    uint64_t next_seq;      /* next to assign */
    uint64_t committed_seq; /* highest durable (acknowledged) */
    int closing;
    wal_stats_t st;
    int have_writer;
    pthread_t writer;

    uint64_t indexed_seq; /* every record <= this has its wal.key entry (changed by the writer) */

    /* writer-thread only */
    wal_scratch_t *scratch;
    uint8_t *index_buf;        /* WAL_INDEX_CHUNK 16-byte entries */
    uint64_t last_activity_ns; /* end of the last batch */
    size_t last_acked;         /* appends the last batch acknowledged (0 after an idle sleep) */
    uint64_t last_took_ns;     /* that batch's commit time */
    uint64_t linger_ns;        /* opts.linger_us in ns (0: never linger) */
    int dirty;                 /* commits since the last fsync (WAL_NOSYNC) */
    uint64_t last_sync_ns;

    /* the journal (WAL_SYNC; writer-thread only once open) */
    wal_journal_t *jr;
    struct wal_jpos jpos;  /* where the next block goes */
    struct wal_jframe *jf; /* scratch: the batch's frames */
    size_t jf_cap;

    /* the checkpoint thread (WAL_SYNC): completes the checkpoints the writer captures, so that
     * the flush of data.mdb runs beside the writer's commits */
    pthread_mutex_t ck_mu;
    pthread_cond_t ck_cv;       /* a job posted, a checkpoint durable, quit */
    struct wal_jpos jckpt;      /* the position saved by the last durable checkpoint */
    store_ckpt_t *ck_job;       /* captured, not yet taken by the thread */
    struct wal_jpos ck_job_pos; /* its journal position */
    uint64_t ck_job_t0;         /* when it was captured */
    int ck_busy;                /* a checkpoint captured and not yet durable */
    int ck_quit;
    int have_ck_thread;
    pthread_t ck_thread;
};

struct wal_dbs wal__log_dbs(wal_log_t *log)
{
    return log->dbs;
}

store_env_t *wal_log_env(wal_log_t *log)
{
    return log->env;
}

/* ---- open ---- */

static int wal__meta_check(store_txn_t *txn, store_dbi_t meta, int create)
{
    store_val_t v;
    store_val_t k = {WAL_META_FORMAT, sizeof(WAL_META_FORMAT) - 1};
    int rc = store_get(txn, meta, k, &v);
    if (rc == CAP_ENOTFOUND && create) {
        uint8_t buf[4];
        cap_put_le32(buf, WAL_FORMAT_VERSION);
        store_val_t nv = {buf, 4};
        return store_put(txn, meta, k, nv, 0);
    }
    if (rc == CAP_ENOTFOUND) {
        cap_log(CAP_LOG_ERROR, "wal", "%s: wal.meta has no format version",
                store_env_path(store_txn_env(txn)));
        return CAP_ECORRUPT;
    }
    if (rc)
        return rc;
    if (v.len != 4) {
        cap_log(CAP_LOG_ERROR, "wal", "%s: wal.meta format entry is %zu bytes, expected 4",
                store_env_path(store_txn_env(txn)), v.len);
        return CAP_ECORRUPT;
    }
    uint32_t ver = cap_get_le32(v.data);
    if (ver != WAL_FORMAT_VERSION) {
        cap_log(CAP_LOG_ERROR, "wal", "%s: log format version %u, this build reads %u",
                store_env_path(store_txn_env(txn)), ver, WAL_FORMAT_VERSION);
        return CAP_EVERSION;
    }
    return 0;
}

int wal__meta_u64(store_txn_t *txn, store_dbi_t meta, const char *name, uint64_t *out)
{
    store_val_t k = {name, strlen(name)}, v;
    int rc = store_get(txn, meta, k, &v);
    if (rc == CAP_ENOTFOUND) {
        *out = 0;
        return 0;
    }
    if (rc)
        return rc;
    if (v.len != 8) {
        cap_log(CAP_LOG_ERROR, "wal", "%s: wal.meta %s entry is %zu bytes, expected 8",
                store_env_path(store_txn_env(txn)), name, v.len);
        return CAP_ECORRUPT;
    }
    *out = cap_get_be64(v.data);
    return 0;
}

struct wal_open_ctx {
    struct wal_dbs dbs;
};

static int wal__open_fn(store_txn_t *txn, void *arg)
{
    struct wal_open_ctx *c = arg;
    int rc = store_dbi_open(txn, WAL_DB_LOG, STORE_DB_CREATE, &c->dbs.log);
    if (rc == 0)
        rc = store_dbi_open(txn, WAL_DB_KEY, STORE_DB_CREATE, &c->dbs.key);
    if (rc == 0)
        rc = store_dbi_open(txn, WAL_DB_META, STORE_DB_CREATE, &c->dbs.meta);
    if (rc == 0)
        rc = wal__meta_check(txn, c->dbs.meta, 1);
    return rc;
}

/* Reads first/last stored seq and "high" in a read txn. */
static int wal__scan_bounds(wal_log_t *log, uint64_t *first, uint64_t *last, uint64_t *high,
                            uint64_t *indexed)
{
    store_txn_t *txn = NULL;
    store_cursor_t *cur = NULL;
    store_val_t k, v;
    int rc = store_txn_begin(log->env, 1, &txn);
    if (rc)
        return rc;
    *first = *last = *high = *indexed = 0;
    if (log->readonly) {
        /* Read-only: the databases must already exist. */
        rc = store_dbi_open(txn, WAL_DB_LOG, 0, &log->dbs.log);
        if (rc == 0)
            rc = store_dbi_open(txn, WAL_DB_KEY, 0, &log->dbs.key);
        if (rc == 0)
            rc = store_dbi_open(txn, WAL_DB_META, 0, &log->dbs.meta);
        if (rc == CAP_ENOTFOUND)
            cap_log(CAP_LOG_ERROR, "wal", "%s holds no capsule log", store_env_path(log->env));
        if (rc == 0)
            rc = wal__meta_check(txn, log->dbs.meta, 0);
        if (rc)
            goto out;
    }
    store_val_t hk = {WAL_META_HIGH, sizeof(WAL_META_HIGH) - 1};
    rc = store_get(txn, log->dbs.meta, hk, &v);
    if (rc == 0) {
        if (v.len != 8) {
            cap_log(CAP_LOG_ERROR, "wal", "%s: wal.meta high entry is %zu bytes, expected 8",
                    store_env_path(log->env), v.len);
            rc = CAP_ECORRUPT;
            goto out;
        }
        *high = cap_get_be64(v.data);
    } else if (rc != CAP_ENOTFOUND) {
        goto out;
    }
    rc = wal__meta_u64(txn, log->dbs.meta, WAL_META_INDEXED, indexed);
    if (rc)
        goto out;
    rc = store_cursor_open(txn, log->dbs.log, &cur);
    if (rc)
        goto out;
    rc = store_cursor_get(cur, &k, &v, STORE_FIRST);
    if (rc == CAP_ENOTFOUND) {
        rc = 0;
        goto out;
    }
    if (rc)
        goto out;
    if (k.len != 8)
        goto badkey;
    *first = cap_get_be64(k.data);
    rc = store_cursor_get(cur, &k, &v, STORE_LAST);
    if (rc)
        goto out;
    if (k.len != 8)
        goto badkey;
    *last = cap_get_be64(k.data);
    goto out;
badkey:
    cap_log(CAP_LOG_ERROR, "wal", "%s: wal.log holds a %zu-byte key (sequence keys are 8 bytes)",
            store_env_path(log->env), k.len);
    rc = CAP_ECORRUPT;
out:
    store_cursor_close(cur);
    /* Read-only: the handles were opened in this read txn, and LMDB closes the handles a txn
     * opened when it is aborted, so commit it to keep them for the iterators. */
    if (log->readonly && rc == 0)
        return store_txn_commit(txn);
    store_txn_abort(txn);
    return rc;
}

static void *wal__writer_main(void *arg);
static void *wal__ckpt_main(void *arg);
static int wal__journal_setup(wal_log_t *log);
static void wal__ckpt_stop(wal_log_t *log);

int wal_log_open(store_env_t *env, const wal_opts_t *opts, wal_log_t **out)
{
    wal_log_t *log = NULL;
    int rc;

    if (!env || !out)
        return CAP_EINVAL;
    log = cap_calloc(1, sizeof(*log));
    log->env = env;
    if (opts)
        log->opts = *opts;
    if (log->opts.durability != WAL_SYNC && log->opts.durability != WAL_NOSYNC) {
        rc = CAP_EINVAL;
        goto fail;
    }
    if (!log->opts.sync_interval_ms)
        log->opts.sync_interval_ms = WAL_DEFAULT_SYNC_MS;
    if (!log->opts.max_batch_records)
        log->opts.max_batch_records = WAL_DEFAULT_BATCH_RECORDS;
    if (!log->opts.max_batch_bytes)
        log->opts.max_batch_bytes = WAL_DEFAULT_BATCH_BYTES;
    if (!log->opts.max_record_bytes)
        log->opts.max_record_bytes = WAL_DEFAULT_MAX_RECORD;
    if (log->opts.linger_us > WAL_MAX_LINGER_US) {
        cap_log(CAP_LOG_ERROR, "wal", "linger_us %u over the maximum %u", log->opts.linger_us,
                WAL_MAX_LINGER_US);
        rc = CAP_EINVAL;
        goto fail;
    }
    log->linger_ns = (uint64_t)log->opts.linger_us * 1000u;
    if (log->opts.max_record_bytes > WAL_MAX_RECORD_LIMIT ||
        log->opts.max_record_bytes < WAL_FRAME_HDR + 64) {
        cap_log(CAP_LOG_ERROR, "wal", "max_record_bytes %zu out of range [96, 2 GiB]",
                log->opts.max_record_bytes);
        rc = CAP_EINVAL;
        goto fail;
    }
    log->readonly = store_env_readonly(env);
    if (!log->readonly && (log->opts.durability == WAL_NOSYNC) != store_env_nosync(env)) {
        cap_log(CAP_LOG_ERROR, "wal", "%s: durability %s needs an env opened with nosync=%d",
                store_env_path(env), log->opts.durability == WAL_NOSYNC ? "nosync" : "sync",
                log->opts.durability == WAL_NOSYNC);
        rc = CAP_EINVAL;
        goto fail;
    }
    if (!log->readonly) {
        struct wal_open_ctx c;
        rc = store_env_write(env, wal__open_fn, &c);
        if (rc)
            goto fail;
        log->dbs = c.dbs;
    }
    uint64_t first, last, high, indexed;
    rc = wal__scan_bounds(log, &first, &last, &high, &indexed);
    if (rc)
        goto fail;
    log->committed_seq = last > high ? last : high;
    log->next_seq = log->committed_seq + 1;
    log->st.first_seq = first;
    log->st.last_seq = last;
    log->indexed_seq = indexed;
    log->st.indexed_seq = indexed;
    if (!log->opts.index_lag)
        log->opts.index_lag = WAL_DEFAULT_INDEX_LAG;
    pthread_mutex_init(&log->mu, NULL);
    pthread_cond_init(&log->work_cv, NULL);
    pthread_mutex_init(&log->ck_mu, NULL);
    pthread_cond_init(&log->ck_cv, NULL);
    log->last_sync_ns = cap_now_ns();
    if (!log->readonly) {
        uint64_t jb = log->opts.journal_bytes ? log->opts.journal_bytes : WAL_JOURNAL_DEFAULT;
        if (jb < WAL_JOURNAL_MIN)
            jb = WAL_JOURNAL_MIN;
        log->opts.journal_bytes = (size_t)((jb + WAL_JBLOCK - 1) / WAL_JBLOCK * WAL_JBLOCK);
        rc = wal__journal_setup(log);
        if (rc == 0 && log->st.replayed)
            rc = wal__scan_bounds(log, &first, &last, &high, &indexed);
        if (rc == 0) {
            log->next_seq = log->committed_seq + 1;
            log->st.first_seq = first;
            log->st.last_seq = last;
            /* named for ps/top/perf, and so the engine can tell the writer (on the path of
             * every commit) from the checkpoint thread (background) when it places threads */
            if (log->jr) {
                rc = pthread_create(&log->ck_thread, NULL, wal__ckpt_main, log);
                log->have_ck_thread = rc == 0;
                if (rc == 0)
                    (void)pthread_setname_np(log->ck_thread, WAL_THREAD_CKPT);
            }
            if (rc == 0)
                rc = pthread_create(&log->writer, NULL, wal__writer_main, log);
            if (rc == 0)
                (void)pthread_setname_np(log->writer, WAL_THREAD_WRITER);
            rc = rc ? -rc : 0;
        }
        if (rc) {
            wal__ckpt_stop(log);
            wal__journal_close(log->jr);
            store_env_set_deferred(env, 0); /* no journal: commits flush again */
            pthread_cond_destroy(&log->ck_cv);
            pthread_mutex_destroy(&log->ck_mu);
            pthread_cond_destroy(&log->work_cv);
            pthread_mutex_destroy(&log->mu);
            goto fail;
        }
        log->have_writer = 1;
    }
    *out = log;
    return 0;
fail:
    cap_free(log);
    return rc;
}

/* ---- appends ---- */

static void wal__append_free(struct wal_append *a)
{
    for (size_t i = 0; i < a->n; i++)
        cap_free(a->f[i].p);
    cap_free(a);
}

/* the log this thread holds (wal_log_hold): its appends do not wake the writer */
static _Thread_local wal_log_t *wal__held;
/* the log whose batch this thread is committing (wal_log_release): its callbacks run here */
static _Thread_local wal_log_t *wal__inline;

/* 1 on a thread that commits log's batches (its writer, or wal_log_release's caller inside the
 * batch): waiting there for a commit would wait for itself. */
static int wal__on_writer(const wal_log_t *log)
{
    return (log->have_writer && pthread_equal(pthread_self(), log->writer)) || wal__inline == log;
}

int wal_log_append(wal_log_t *log, const wal_rec_t *recs, size_t n, wal_done_fn done, void *arg,
                   uint64_t *first_seq)
{
    struct wal_append *a;
    int rc = 0;

    if (!log || !recs || n == 0 || n > UINT32_MAX)
        return CAP_EINVAL;
    if (log->readonly)
        return CAP_EINVAL;
    if (n > log->opts.max_batch_records)
        return CAP_ETOOBIG; /* its records must share one transaction: one batch at most */
    a = cap_calloc(1, sizeof(*a) + n * sizeof(a->f[0]));
    a->done = done;
    a->arg = arg;
    for (size_t i = 0; i < n; i++) {
        rc = wal__frame_build(&recs[i], log->opts.max_record_bytes, &a->f[i].p, &a->f[i].len);
        if (rc)
            goto out;
        a->n++;
        a->bytes += a->f[i].len;
        if (n > 1 && a->bytes > log->opts.max_batch_bytes) {
            rc = CAP_ETOOBIG;
            goto out;
        }
    }
    pthread_mutex_lock(&log->mu);
    if (log->closing) {
        pthread_mutex_unlock(&log->mu);
        rc = CAP_ECLOSED;
        goto out;
    }
    uint64_t first = log->next_seq; /* `a` may be freed by the writer once mu is released */
    a->first_seq = first;
    log->next_seq += n;
    for (size_t i = 0; i < n; i++)
        wal__frame_seal(a->f[i].p, a->first_seq + i);
    if (log->tail)
        log->tail->next = a;
    else
        log->head = a;
    log->tail = a;
    log->st.pending += n;
    log->queued++;
    /* only a sleeping writer needs the signal, or a lingering one once what it waits for is
     * queued: a busy one takes the queue when it is done. Sent after the unlock, so that the
     * woken writer does not block on mu at once. Not while this thread holds the log
     * (wal_log_hold): wal_log_release commits or wakes. */
    int wake = (log->writer_waiting && wal__held != log) ||
               (log->linger_want && log->queued >= log->linger_want);
    if (wake) {
        log->writer_waiting = 0;
        log->linger_want = 0;
    }
    pthread_mutex_unlock(&log->mu);
    if (wake)
        pthread_cond_signal(&log->work_cv);
    if (first_seq)
        *first_seq = first;
    a = NULL;
out:
    if (a)
        wal__append_free(a);
    return rc;
}

struct wal_waiter {
    wal_log_t *log;
    pthread_cond_t cv;
    int done;
    int status;
};

static void wal__waiter_done(void *arg, int status, uint64_t first_seq)
{
    struct wal_waiter *w = arg;
    (void)first_seq;
    pthread_mutex_lock(&w->log->mu);
    w->status = status;
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->log->mu);
}

int wal_log_append_sync(wal_log_t *log, const wal_rec_t *recs, size_t n, uint64_t *first_seq)
{
    struct wal_waiter w = {.log = log};
    if (log && wal__on_writer(log)) {
        cap_log(CAP_LOG_ERROR, "wal",
                "wal_log_append_sync from a done/apply callback would "
                "wait for itself");
        return CAP_EINVAL;
    }
    pthread_cond_init(&w.cv, NULL);
    int rc = wal_log_append(log, recs, n, wal__waiter_done, &w, first_seq);
    if (rc == 0) {
        pthread_mutex_lock(&log->mu);
        while (!w.done)
            pthread_cond_wait(&w.cv, &log->mu);
        pthread_mutex_unlock(&log->mu);
        rc = w.status;
    }
    pthread_cond_destroy(&w.cv);
    return rc;
}

/* ---- the writer ---- */

struct wal_batch {
    wal_log_t *log;
    struct wal_append *head; /* a detached list, in sequence order */
};

static int wal__batch_fn(store_txn_t *txn, void *arg)
{
    struct wal_batch *b = arg;
    wal_log_t *log = b->log;
    uint8_t kbuf[8];
    int rc = 0;

    for (struct wal_append *a = b->head; a; a = a->next) {
        for (size_t i = 0; i < a->n; i++) {
            uint64_t seq = a->first_seq + i;
            store_val_t fv = {a->f[i].p, a->f[i].len};
            rc = store_put(txn, log->dbs.log, store_key_u64(kbuf, seq), fv, STORE_PUT_APPEND);
            if (rc)
                return rc;
            if (log->opts.apply) {
                wal_entry_t e;
                const char *why = NULL;
                rc = wal__frame_decode(a->f[i].p, a->f[i].len, 1, &log->scratch, &e, &why);
                if (rc)
                    cap_fatal("wal", "seq %llu: own frame does not decode: %s",
                              (unsigned long long)seq, why ? why : cap_strerror(rc));
                rc = log->opts.apply(log->opts.apply_arg, txn, &e);
                if (rc == CAP_EMAPFULL)
                    return rc;
                if (rc)
                    cap_fatal("wal", "seq %llu: apply callback failed: %s (%d)",
                              (unsigned long long)seq, cap_strerror(rc), rc);
            }
        }
    }
    return 0;
}

struct wal_trunc_ctx {
    wal_log_t *log;
    uint64_t before;
    uint64_t high;
    uint64_t first_left; /* out: first seq left (0 when empty) */
    int finished;        /* out */
    uint64_t deleted;    /* out */
};

static int wal__trunc_fn(store_txn_t *txn, void *arg)
{
    struct wal_trunc_ctx *c = arg;
    wal_log_t *log = c->log;
    store_cursor_t *cur = NULL;
    store_val_t k, v;
    uint8_t hb[8];
    int rc;

    c->first_left = 0;
    c->finished = 0;
    c->deleted = 0;
    rc = store_cursor_open(txn, log->dbs.log, &cur);
    if (rc)
        return rc;
    for (;;) {
        rc = store_cursor_get(cur, &k, &v, STORE_FIRST);
        if (rc == CAP_ENOTFOUND) {
            c->finished = 1;
            rc = 0;
            break;
        }
        if (rc)
            break;
        uint64_t seq = k.len == 8 ? cap_get_be64(k.data) : 0;
        if (k.len == 8 && seq >= c->before) {
            c->first_left = seq;
            c->finished = 1;
            break;
        }
        if (c->deleted == WAL_TRUNC_CHUNK) {
            c->first_left = seq;
            break;
        }
        const void *key;
        size_t key_len;
        if (k.len == 8 && wal__frame_peek_key(v.data, v.len, &key, &key_len) == 0 && key_len) {
            uint8_t ib[16];
            rc = store_del(txn, log->dbs.key, wal__index_key(ib, key, key_len, seq), NULL);
            if (rc && rc != CAP_ENOTFOUND)
                break;
        }
        rc = store_cursor_del(cur);
        if (rc)
            break;
        c->deleted++;
    }
    store_cursor_close(cur);
    if (rc)
        return rc;
    store_val_t hk = {WAL_META_HIGH, sizeof(WAL_META_HIGH) - 1}, hv = {hb, 8};
    cap_put_be64(hb, c->high);
    return store_put(txn, log->dbs.meta, hk, hv, 0);
}

const uint32_t wal_batch_bounds[WAL_HIST_N - 1] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
const uint32_t wal_commit_bounds_us[WAL_HIST_N - 1] = {50,   100,   250,   500,   1000,  2500,
                                                       5000, 10000, 25000, 50000, 100000};

static size_t wal__bucket(const uint32_t *bounds, uint64_t v)
{
    size_t i = 0;
    while (i < WAL_HIST_N - 1 && v > bounds[i])
        i++;
    return i;
}

static void wal__sync(wal_log_t *log)
{
    uint64_t t0 = cap_now_ns();
    int rc = store_env_sync(log->env);
    if (rc)
        cap_fatal("wal", "%s: fsync failed: %s; the log cannot promise durability, stopping",
                  store_env_path(log->env), cap_strerror(rc));
    log->dirty = 0;
    log->last_sync_ns = cap_now_ns();
    pthread_mutex_lock(&log->mu);
    log->st.syncs++;
    log->st.sync_ns += log->last_sync_ns - t0;
    pthread_mutex_unlock(&log->mu);
}

/* ---- the journal (WAL_SYNC) ---- */

/* A journal position as one number: bytes written since the epoch began. */
static uint64_t wal__jabs(const wal_log_t *log, const struct wal_jpos *p)
{
    return p->lap * wal__journal_size(log->jr) + p->pos;
}

/* The position of the last durable checkpoint (the journal space from it on is still needed). */
static struct wal_jpos wal__jckpt(wal_log_t *log, int *busy)
{
    pthread_mutex_lock(&log->ck_mu);
    struct wal_jpos p = log->jckpt;
    if (busy)
        *busy = log->ck_busy;
    pthread_mutex_unlock(&log->ck_mu);
    return p;
}

static void wal__ckpt_count(wal_log_t *log, uint64_t t0)
{
    pthread_mutex_lock(&log->mu);
    log->st.checkpoints++;
    log->st.checkpoint_ns += cap_now_ns() - t0;
    pthread_mutex_unlock(&log->mu);
}

/* Checkpoints the store at the current journal position, synchronously: everything before it is
 * in a snapshot known to be on disk, so that journal space may be reused. No checkpoint may be
 * in flight (open, close, or the writer after wal__ckpt_wait). */
static int wal__checkpoint_try(wal_log_t *log, int clean)
{
    uint8_t user[STORE_CKPT_USER] = {0};
    uint64_t t0 = cap_now_ns();
    wal__jpos_put(user, &log->jpos);
    int rc = store_env_checkpoint(log->env, user, clean);
    if (rc)
        return rc;
    pthread_mutex_lock(&log->ck_mu);
    log->jckpt = log->jpos;
    pthread_mutex_unlock(&log->ck_mu);
    wal__ckpt_count(log, t0);
    return 0;
}

static void wal__ckpt_fatal(wal_log_t *log, int rc)
{
    cap_fatal("wal",
              "%s: checkpoint failed: %s (%d); the log cannot promise durability, "
              "stopping",
              store_env_path(log->env), cap_strerror(rc), rc);
}

/* Writer thread: waits until no checkpoint is in flight. */
static void wal__ckpt_wait(wal_log_t *log)
{
    uint64_t t0 = 0;
    pthread_mutex_lock(&log->ck_mu);
    if (log->ck_busy)
        t0 = cap_now_ns();
    while (log->ck_busy)
        pthread_cond_wait(&log->ck_cv, &log->ck_mu);
    pthread_mutex_unlock(&log->ck_mu);
    if (t0) {
        uint64_t d = cap_now_ns() - t0;
        pthread_mutex_lock(&log->mu);
        log->st.checkpoint_wait_ns += d;
        log->st.checkpoint_stall_ns += d;
        pthread_mutex_unlock(&log->mu);
    }
}

static void wal__ckpt_stall(wal_log_t *log, uint64_t t0)
{
    pthread_mutex_lock(&log->mu);
    log->st.checkpoint_stall_ns += cap_now_ns() - t0;
    pthread_mutex_unlock(&log->mu);
}

/* Writer thread: a synchronous checkpoint, after the one in flight (if any). */
static void wal__checkpoint(wal_log_t *log)
{
    wal__ckpt_wait(log);
    uint64_t t0 = cap_now_ns();
    int rc = wal__checkpoint_try(log, 0);
    if (rc)
        wal__ckpt_fatal(log, rc);
    wal__ckpt_stall(log, t0);
}

/* Writer thread, between batches (every journal block before log->jpos is committed in LMDB):
 * captures the snapshot committed now and hands it to the checkpoint thread, which makes it
 * durable while the writer goes on. Until then the previous checkpoint stays in force, with its
 * journal position (jckpt) and its pin: the journal space after it is not reused. A capture
 * that fails changed nothing (the previous checkpoint is still in force): it is logged, counted
 * (checkpoints_skipped) and tried again after the next batch; should the journal fill up
 * meanwhile, the synchronous checkpoint before the block that needs the space decides
 * (wal__journal_batch: a failure there stops the log). */
static void wal__checkpoint_start(wal_log_t *log)
{
    uint8_t user[STORE_CKPT_USER] = {0};
    store_ckpt_t *ck = NULL;
    uint64_t t0 = cap_now_ns();
    wal__jpos_put(user, &log->jpos);
    int rc = store_env_ckpt_begin(log->env, user, &ck);
    if (rc) {
        cap_log(CAP_LOG_WARN, "wal",
                "%s: capturing a checkpoint failed: %s (%d); the previous one stays in force, "
                "retried after the next batch",
                store_env_path(log->env), cap_strerror(rc), rc);
        pthread_mutex_lock(&log->mu);
        log->st.checkpoints_skipped++;
        pthread_mutex_unlock(&log->mu);
        wal__ckpt_stall(log, t0);
        return;
    }
    pthread_mutex_lock(&log->ck_mu);
    log->ck_job = ck;
    log->ck_job_pos = log->jpos;
    log->ck_job_t0 = t0;
    log->ck_busy = 1;
    pthread_cond_broadcast(&log->ck_cv);
    pthread_mutex_unlock(&log->ck_mu);
    wal__ckpt_stall(log, t0);
}

static void *wal__ckpt_main(void *arg)
{
    wal_log_t *log = arg;
    pthread_mutex_lock(&log->ck_mu);
    for (;;) {
        while (!log->ck_job && !log->ck_quit)
            pthread_cond_wait(&log->ck_cv, &log->ck_mu);
        if (!log->ck_job)
            break;
        store_ckpt_t *ck = log->ck_job;
        struct wal_jpos pos = log->ck_job_pos;
        uint64_t t0 = log->ck_job_t0;
        log->ck_job = NULL;
        pthread_mutex_unlock(&log->ck_mu);
        int rc = store_env_ckpt_finish(ck);
        if (rc)
            wal__ckpt_fatal(log, rc);
        wal__ckpt_count(log, t0);
        pthread_mutex_lock(&log->ck_mu);
        log->jckpt = pos;
        log->ck_busy = 0;
        pthread_cond_broadcast(&log->ck_cv);
    }
    pthread_mutex_unlock(&log->ck_mu);
    return NULL;
}

/* Lets the checkpoint thread finish what it was given, and joins it. */
static void wal__ckpt_stop(wal_log_t *log)
{
    if (!log->have_ck_thread)
        return;
    pthread_mutex_lock(&log->ck_mu);
    log->ck_quit = 1;
    pthread_cond_broadcast(&log->ck_cv);
    pthread_mutex_unlock(&log->ck_mu);
    pthread_join(log->ck_thread, NULL);
    log->have_ck_thread = 0;
}

/* Writes a batch's frames as one journal block and flushes it (checkpointing first when the
 * block would reach journal space the last checkpoint still needs). */
static void wal__journal_batch(wal_log_t *log, struct wal_append *head, size_t recs, size_t bytes)
{
    uint64_t blen = wal__jblock_len(bytes), size = wal__journal_size(log->jr);
    struct wal_jpos at = log->jpos, ck = wal__jckpt(log, NULL);
    wal__journal_place(log->jr, &at, blen);
    if (wal__jabs(log, &at) + blen - wal__jabs(log, &ck) > size) {
        wal__ckpt_wait(log); /* the checkpoint in flight may free enough */
        ck = wal__jckpt(log, NULL);
        if (wal__jabs(log, &at) + blen - wal__jabs(log, &ck) > size)
            wal__checkpoint(log);
    }
    if (log->jf_cap < recs) {
        cap_free(log->jf);
        log->jf_cap = recs;
        log->jf = cap_malloc(recs * sizeof(*log->jf));
    }
    size_t n = 0;
    for (struct wal_append *a = head; a; a = a->next)
        for (size_t i = 0; i < a->n; i++)
            log->jf[n++] = (struct wal_jframe){a->f[i].p, a->f[i].len};
    int rc = wal__journal_put(log->jr, &log->jpos, head->first_seq, (uint32_t)recs, log->jf, n,
                              bytes, 1);
    if (rc)
        cap_fatal("wal",
                  "%s: writing or flushing the journal failed: %s; the log cannot promise "
                  "durability, stopping",
                  store_env_path(log->env), cap_strerror(rc));
}

/* Called with mu held; returns with mu held. */
static void wal__run_batch(wal_log_t *log)
{
    struct wal_append *head = log->head, *last = head, *a;
    size_t recs = head->n, bytes = head->bytes, appends = 1;
    while (last->next && recs + last->next->n <= log->opts.max_batch_records &&
           bytes + last->next->bytes <= log->opts.max_batch_bytes) {
        last = last->next;
        recs += last->n;
        bytes += last->bytes;
        appends++;
    }
    log->queued -= appends;
    log->head = last->next;
    if (!log->head)
        log->tail = NULL;
    last->next = NULL;
    pthread_mutex_unlock(&log->mu);

    struct wal_batch b = {log, head};
    uint64_t top = last->first_seq + last->n - 1;
    int overlap = 0; /* committed while a checkpoint was in flight */
    uint64_t t0 = cap_now_ns();
    int big = log->jr && wal__jblock_len(bytes) > wal__journal_size(log->jr) / 2;
    if (log->jr && !big)
        wal__journal_batch(log, head, recs, bytes);
    int rc = store_env_write(log->env, wal__batch_fn, &b);
    if (rc)
        cap_fatal("wal", "%s: committing %zu record(s) from seq %llu failed: %s (%d)",
                  store_env_path(log->env), recs, (unsigned long long)head->first_seq,
                  cap_strerror(rc), rc);
    if (big) {
        /* too large for the journal: durable by a checkpoint (LMDB's own two flushes) */
        log->jpos.next_seq = top + 1;
        wal__checkpoint(log);
    }
    uint64_t took = cap_now_ns() - t0;
    if (log->opts.durability == WAL_NOSYNC)
        log->dirty = 1;

    pthread_mutex_lock(&log->mu);
    log->committed_seq = top;
    log->st.last_seq = top;
    if (!log->st.first_seq)
        log->st.first_seq = head->first_seq;
    log->st.records += recs;
    log->st.commits++;
    log->st.bytes += bytes;
    if (recs > log->st.max_batch)
        log->st.max_batch = recs;
    log->st.batch_hist[wal__bucket(wal_batch_bounds, recs)]++;
    log->st.commit_hist[wal__bucket(wal_commit_bounds_us, took / 1000)]++;
    log->st.commit_ns += took;
    log->st.pending -= recs;
    pthread_mutex_unlock(&log->mu);
    log->last_activity_ns = cap_now_ns();
    log->last_acked = appends;
    log->last_took_ns = took;

    while (head) {
        a = head;
        head = a->next;
        if (a->done)
            a->done(a->arg, 0, a->first_seq);
        wal__append_free(a);
    }
    if (log->jr) {
        int busy;
        struct wal_jpos ck = wal__jckpt(log, &busy);
        if (busy)
            overlap = 1;
        else if (wal__jabs(log, &log->jpos) - wal__jabs(log, &ck) >= wal__journal_size(log->jr) / 2)
            wal__checkpoint_start(log);
    }
    pthread_mutex_lock(&log->mu);
    log->st.checkpoint_overlap += (uint64_t)overlap;
}

/* One truncation chunk. Called with mu held; returns with mu held. */
static void wal__run_trunc(wal_log_t *log)
{
    struct wal_trunc *t = log->trunc_head;
    struct wal_trunc_ctx c = {.log = log, .before = t->before, .high = log->committed_seq};
    pthread_mutex_unlock(&log->mu);
    int rc = store_env_write(log->env, wal__trunc_fn, &c);
    if (rc)
        cap_fatal("wal", "%s: truncation transaction failed: %s (%d)", store_env_path(log->env),
                  cap_strerror(rc), rc);
    if (log->opts.durability == WAL_NOSYNC)
        log->dirty = 1;
    pthread_mutex_lock(&log->mu);
    log->st.first_seq = c.first_left;
    if (c.finished) {
        log->trunc_head = t->next;
        if (!log->trunc_head)
            log->trunc_tail = NULL;
        t->status = 0;
        t->done = 1;
        pthread_cond_signal(&t->cv);
    }
}

struct wal_index_ctx {
    wal_log_t *log;
    uint64_t from, target; /* index records in [from, target] */
    uint64_t upto;         /* out: indexed through here */
    size_t n;              /* entries gathered in log->index_buf, sorted */
    size_t at;             /* entries before this are committed */
};

static int wal__index_cmp(const void *a, const void *b)
{
    return memcmp(a, b, 16);
}

/* Puts the sorted entries [c->at, c->at + WAL_INDEX_SLICE) of the chunk; with the last of them,
 * moves "indexed" to c->upto. A slice covers a contiguous range of the key space, so it dirties
 * at most about WAL_INDEX_SLICE leaves of wal.key whatever the table's size: LMDB keeps a
 * transaction's dirty pages (malloc'ed) for reuse by later ones, so the largest transaction sets
 * the process's memory for good. One transaction for a whole chunk touched nearly every leaf
 * (random keys): its dirty pages, and the server's RssAnon, grew with the table (~100-130 bytes
 * per execution, up to 64 MiB). Entries committed before "indexed" moves are harmless: readers
 * ignore index entries past the mark (the tail scan has them), and a crash between slices
 * re-puts them (the same keys) from the old mark. Re-run safe (store_env_write). */
static int wal__index_slice_fn(store_txn_t *txn, void *arg)
{
    struct wal_index_ctx *c = arg;
    wal_log_t *log = c->log;
    store_val_t empty = {"", 0};
    uint8_t kb[8];
    size_t end = c->n - c->at > WAL_INDEX_SLICE ? c->at + WAL_INDEX_SLICE : c->n;
    for (size_t i = c->at; i < end; i++) {
        store_val_t ik = {log->index_buf + 16 * i, 16};
        int rc = store_put(txn, log->dbs.key, ik, empty, 0);
        if (rc)
            return rc;
    }
    if (end < c->n)
        return 0;
    store_val_t mk = {WAL_META_INDEXED, sizeof(WAL_META_INDEXED) - 1}, mv = {kb, 8};
    cap_put_be64(kb, c->upto);
    return store_put(txn, log->dbs.meta, mk, mv, 0);
}

/* Gathers the wal.key entries of the next chunk of committed, not yet indexed records, sorted (so
 * each index leaf is dirtied once per chunk, not once per batch), and puts the first slice of
 * them (wal__index_slice_fn; wal__run_index commits the others, each in its own transaction). */
static int wal__index_fn(store_txn_t *txn, void *arg)
{
    struct wal_index_ctx *c = arg;
    wal_log_t *log = c->log;
    store_cursor_t *cur = NULL;
    store_val_t k, v;
    uint8_t kb[8];
    size_t n = 0;
    int rc;

    c->upto = c->target;
    rc = store_cursor_open(txn, log->dbs.log, &cur);
    if (rc)
        return rc;
    k = store_key_u64(kb, c->from);
    for (rc = store_cursor_get(cur, &k, &v, STORE_SET_RANGE); rc == 0;
         rc = store_cursor_get(cur, &k, &v, STORE_NEXT)) {
        if (k.len != 8)
            continue; /* readers report it */
        uint64_t seq = cap_get_be64(k.data);
        if (seq > c->target)
            break;
        if (n == WAL_INDEX_CHUNK) {
            c->upto = seq - 1;
            break;
        }
        const void *key;
        size_t key_len;
        /* unverified on purpose: a damaged frame is still indexed under the key it claims, so
         * a read by that key reports the damage instead of missing the record */
        if (wal__frame_peek_key(v.data, v.len, &key, &key_len) == 0 && key_len)
            wal__index_key(log->index_buf + 16 * n++, key, key_len, seq);
    }
    store_cursor_close(cur);
    if (rc && rc != CAP_ENOTFOUND)
        return rc;
    qsort(log->index_buf, n, 16, wal__index_cmp);
    c->n = n;
    c->at = 0;
    return wal__index_slice_fn(txn, c);
}

/* One index chunk. Called with mu held; returns with mu held. */
static void wal__run_index(wal_log_t *log)
{
    struct wal_index_ctx c = {
        .log = log, .from = log->indexed_seq + 1, .target = log->committed_seq};
    pthread_mutex_unlock(&log->mu);
    if (!log->index_buf)
        log->index_buf = cap_malloc((size_t)WAL_INDEX_CHUNK * 16);
    int rc = store_env_write(log->env, wal__index_fn, &c);
    while (rc == 0 && c.n - c.at > WAL_INDEX_SLICE) {
        c.at += WAL_INDEX_SLICE;
        rc = store_env_write(log->env, wal__index_slice_fn, &c);
    }
    if (rc)
        cap_fatal("wal", "%s: key index transaction failed: %s (%d)", store_env_path(log->env),
                  cap_strerror(rc), rc);
    if (log->opts.durability == WAL_NOSYNC)
        log->dirty = 1;
    pthread_mutex_lock(&log->mu);
    log->indexed_seq = c.upto;
    log->st.indexed_seq = c.upto;
}

/* Waits on work_cv for at most wait_ns. Called with mu held. */
static void wal__timed_wait(wal_log_t *log, uint64_t wait_ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(wait_ns / 1000000000u);
    ts.tv_nsec += (long)(wait_ns % 1000000000u);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&log->work_cv, &log->mu, &ts);
}

/* Sleeps on work_cv until an append, truncate or close signals it, or (due_ns != UINT64_MAX)
 * until cap_now_ns() reaches due_ns; now is cap_now_ns() of the caller. Called with mu held. */
static void wal__writer_wait(wal_log_t *log, uint64_t now, uint64_t due_ns)
{
    log->writer_waiting = 1;
    log->last_acked = 0; /* idle: the next batch is not lingered on */
    if (due_ns == UINT64_MAX)
        pthread_cond_wait(&log->work_cv, &log->mu);
    else
        wal__timed_wait(log, due_ns > now ? due_ns - now : 0);
    log->writer_waiting = 0;
}

/* The group-commit linger (opts.linger_us), before taking a batch right after one that
 * acknowledged K >= WAL_LINGER_MIN_APPENDS appends: those callers are likely to append again at
 * once, so the writer waits (bounded by linger_us and half the last commit's time) until K more
 * appends than were queued are queued, and they all share the next commit. Without it, callers
 * that re-issue on their acknowledgement settle into two halves that alternate, each commit
 * carrying half of them. Called with mu held; returns with mu held. */
static void wal__linger(wal_log_t *log)
{
    size_t k = log->last_acked;
    log->last_acked = 0;
    if (!log->linger_ns || k < WAL_LINGER_MIN_APPENDS || log->closing || log->trunc_head)
        return;
    size_t want = log->queued + k, before = log->queued;
    if (want > log->opts.max_batch_records)
        want = log->opts.max_batch_records;
    if (log->queued >= want)
        return;
    uint64_t wait = log->last_took_ns / 2 < log->linger_ns ? log->last_took_ns / 2 : log->linger_ns;
    uint64_t t0 = cap_now_ns(), now = t0;
    log->linger_want = want;
    while (log->queued < want && !log->closing && !log->trunc_head && now - t0 < wait) {
        wal__timed_wait(log, wait - (now - t0));
        now = cap_now_ns();
    }
    log->linger_want = 0;
    log->st.lingers++;
    log->st.linger_ns += now - t0;
    log->st.linger_joined += log->queued - before;
    log->st.linger_full += log->queued >= want;
}

static void *wal__writer_main(void *arg)
{
    wal_log_t *log = arg;
    pthread_mutex_lock(&log->mu);
    for (;;) {
        if (log->inline_run) { /* a batch is being committed by wal_log_release: wait for it */
            log->writer_parked = 1;
            pthread_cond_wait(&log->work_cv, &log->mu);
            log->writer_parked = 0;
            continue;
        }
        if (log->head) {
            wal__linger(log);
            wal__run_batch(log);
        }
        if (log->trunc_head) {
            wal__run_trunc(log);
            continue;
        }
        if (log->committed_seq - log->indexed_seq >= log->opts.index_lag) {
            wal__run_index(log);
            continue;
        }
        if (log->head)
            continue;
        /* idle: a background fsync (nosync), indexing the tail, or sleep */
        uint64_t now = cap_now_ns(), due = UINT64_MAX;
        if (log->opts.durability == WAL_NOSYNC && log->dirty) {
            uint64_t sync_due = log->last_sync_ns + (uint64_t)log->opts.sync_interval_ms * 1000000u;
            if (now >= sync_due || log->closing) {
                pthread_mutex_unlock(&log->mu);
                wal__sync(log);
                pthread_mutex_lock(&log->mu);
                continue;
            }
            due = sync_due;
        }
        if (log->closing)
            break;
        if (log->committed_seq > log->indexed_seq) {
            uint64_t idx_due = log->last_activity_ns + WAL_INDEX_IDLE_NS;
            if (now >= idx_due) {
                wal__run_index(log);
                continue;
            }
            if (idx_due < due)
                due = idx_due;
        }
        wal__writer_wait(log, now, due);
    }
    pthread_mutex_unlock(&log->mu);
    return NULL;
}

/* Re-applies one journal block's records that wal.log does not hold yet (open only). */
static int wal__replay_block(void *arg, const uint8_t *frames, size_t len, uint64_t first,
                             uint32_t count)
{
    wal_log_t *log = arg;
    if (first + count - 1 <= log->committed_seq)
        return 0;
    struct wal_append *a = cap_calloc(1, sizeof(*a) + count * sizeof(a->f[0]));
    size_t off = 0;
    for (uint32_t i = 0; i < count && off < len; i++) {
        size_t fl = wal__frame_len(frames + off); /* verified by the scan */
        if (first + i > log->committed_seq) {
            if (!a->n)
                a->first_seq = first + i;
            a->f[a->n].p = cap_malloc(fl);
            memcpy(a->f[a->n].p, frames + off, fl);
            a->f[a->n++].len = fl;
            a->bytes += fl;
        }
        off += fl;
    }
    struct wal_batch b = {log, a};
    int rc = store_env_write(log->env, wal__batch_fn, &b);
    if (rc == 0) {
        log->committed_seq = a->first_seq + a->n - 1;
        log->st.replayed += a->n;
    }
    wal__append_free(a);
    return rc;
}

/* At open (not read-only): re-applies what the journal holds past the checkpoint, then
 * (WAL_SYNC) starts a new journal epoch with a checkpoint, or (WAL_NOSYNC) removes store.ckpt.
 * log->mu is initialised; the writer is not running. */
static int wal__journal_setup(wal_log_t *log)
{
    const char *dir = store_env_path(log->env);
    uint8_t user[STORE_CKPT_USER];
    struct wal_jpos from = {0};
    wal_journal_t *j = NULL;
    int have_ckpt = 0;
    int rc = store_env_ckpt_user(log->env, user);
    if (rc == 0) {
        have_ckpt = 1;
        wal__jpos_get(user, &from);
    } else if (rc != CAP_ENOTFOUND) {
        return rc;
    }
    rc = 0;
    if (from.epoch) {
        rc = wal__journal_open(dir, 0, &j);
        if (rc) {
            cap_log(CAP_LOG_ERROR, "wal",
                    "%s/store.ckpt refers to the journal %s/%s, which cannot be opened (%s): "
                    "acknowledged records may be missing; not opening the log",
                    dir, dir, WAL_JOURNAL_FILE, cap_strerror(rc));
            return rc == -ENOENT ? CAP_ECORRUPT : rc;
        }
        rc = store_env_set_deferred(log->env, 1); /* the checkpoint below makes it durable */
        uint64_t before = log->committed_seq, blocks = 0;
        const char *stop = "end";
        if (rc == 0)
            rc = wal__journal_scan(j, &from, wal__replay_block, log, &blocks, &stop);
        if (rc)
            goto out;
        if (log->committed_seq > before)
            cap_log(CAP_LOG_INFO, "wal",
                    "%s: re-applied %llu record(s), seq %llu..%llu, from the journal (%llu "
                    "block(s) after the checkpoint; the scan stopped at: %s)",
                    dir, (unsigned long long)(log->committed_seq - before),
                    (unsigned long long)before + 1, (unsigned long long)log->committed_seq,
                    (unsigned long long)blocks, stop);
    }
    if (log->opts.durability == WAL_NOSYNC) {
        if (have_ckpt)
            rc = store_env_ckpt_remove(log->env); /* syncs first */
        goto out;
    }
    uint64_t want = log->opts.journal_bytes;
    if (j && wal__journal_size(j) != want) {
        /* the journal is about to be replaced: first a checkpoint that needs none of it */
        struct wal_jpos none = {0};
        wal__jpos_put(user, &none);
        rc = store_env_checkpoint(log->env, user, 0);
        if (rc)
            goto out;
        wal__journal_close(j);
        j = NULL;
    }
    if (!j) {
        rc = wal__journal_open(dir, 0, &j);
        if (rc == 0 && wal__journal_size(j) != want) {
            wal__journal_close(j);
            j = NULL;
            rc = -ENOENT;
        }
        if (rc == -ENOENT) {
            rc = wal__journal_create(dir, want);
            if (rc == 0)
                rc = wal__journal_open(dir, 0, &j);
        }
        if (rc)
            goto out;
    }
    uint64_t epoch = 0;
    while (!epoch)
        if (getrandom(&epoch, sizeof epoch, 0) != (ssize_t)sizeof epoch)
            epoch = cap_now_ns() ^ ((uint64_t)getpid() << 32);
    rc = wal__journal_writer(j);
    if (rc)
        goto out;
    log->jr = j;
    j = NULL;
    log->jpos = (struct wal_jpos){epoch, 0, 0, log->committed_seq + 1};
    rc = store_env_set_deferred(log->env, 1);
    if (rc == 0)
        rc = wal__checkpoint_try(log, 0);
out:
    wal__journal_close(j);
    return rc;
}

struct wal_jcount {
    uint64_t after, n;
};

static int wal__jcount_block(void *arg, const uint8_t *frames, size_t len, uint64_t first,
                             uint32_t count)
{
    struct wal_jcount *c = arg;
    (void)frames;
    (void)len;
    for (uint32_t i = 0; i < count; i++)
        c->n += first + i > c->after;
    return 0;
}

int wal_journal_pending(store_env_t *env, uint64_t after_seq, uint64_t *records)
{
    uint8_t user[STORE_CKPT_USER];
    struct wal_jpos from;
    wal_journal_t *j = NULL;
    struct wal_jcount c = {after_seq, 0};
    *records = 0;
    if (store_env_ckpt_user(env, user) != 0)
        return 0;
    wal__jpos_get(user, &from);
    if (!from.epoch)
        return 0;
    int rc = wal__journal_open(store_env_path(env), 1, &j);
    if (rc)
        return rc == -ENOENT ? CAP_ECORRUPT : rc;
    rc = wal__journal_scan(j, &from, wal__jcount_block, &c, NULL, NULL);
    wal__journal_close(j);
    if (rc == 0)
        *records = c.n;
    return rc;
}

/* ---- truncate, stats, close ---- */

void wal_log_hold(wal_log_t *log)
{
    wal__held = log;
}

int wal_log_release(wal_log_t *log, int here)
{
    wal__held = NULL;
    pthread_mutex_lock(&log->mu);
    /* nothing queued, or the writer is busy (it takes the queue when it is done) */
    if (!log->head || !log->writer_waiting) {
        pthread_mutex_unlock(&log->mu);
        return 0;
    }
    int wake = 1, ran = 0;
    if (here && log->opts.durability == WAL_NOSYNC && !log->trunc_head && !log->closing) {
        /* the writer sleeps and stays asleep (parked if it wakes): this thread is the writer for
         * one batch, which keeps the sequence order (no other batch runs meanwhile) */
        log->inline_run = 1;
        wal__inline = log;
        wal__run_batch(log);
        wal__inline = NULL;
        log->inline_run = 0;
        log->last_acked = 0; /* the writer was idle: its next batch is not lingered on */
        log->st.inline_commits++;
        ran = 1;
        /* a parked writer, or one asleep with appends that came meanwhile from threads that did
         * not wake it (another holder), or a rest over the batch bounds */
        wake = log->writer_parked || (log->head && log->writer_waiting);
    }
    if (wake)
        log->writer_waiting = 0;
    pthread_mutex_unlock(&log->mu);
    if (wake)
        pthread_cond_signal(&log->work_cv);
    return ran;
}

int wal_log_truncate(wal_log_t *log, uint64_t before_seq)
{
    if (!log)
        return CAP_EINVAL;
    if (log->readonly)
        return CAP_EINVAL;
    if (wal__on_writer(log)) {
        cap_log(CAP_LOG_ERROR, "wal",
                "wal_log_truncate from a done/apply callback would wait "
                "for itself");
        return CAP_EINVAL;
    }
    struct wal_trunc t = {.before = before_seq};
    pthread_cond_init(&t.cv, NULL);
    pthread_mutex_lock(&log->mu);
    if (log->closing) {
        pthread_mutex_unlock(&log->mu);
        pthread_cond_destroy(&t.cv);
        return CAP_ECLOSED;
    }
    if (log->trunc_tail)
        log->trunc_tail->next = &t;
    else
        log->trunc_head = &t;
    log->trunc_tail = &t;
    pthread_cond_signal(&log->work_cv);
    while (!t.done)
        pthread_cond_wait(&t.cv, &log->mu);
    pthread_mutex_unlock(&log->mu);
    pthread_cond_destroy(&t.cv);
    return t.status;
}

void wal_log_stats(wal_log_t *log, wal_stats_t *out)
{
    if (log->readonly) {
        *out = log->st;
        return;
    }
    pthread_mutex_lock(&log->mu);
    *out = log->st;
    pthread_mutex_unlock(&log->mu);
    pthread_mutex_lock(&log->ck_mu);
    out->checkpoint_in_flight = (uint64_t)log->ck_busy;
    pthread_mutex_unlock(&log->ck_mu);
}

void wal_log_close(wal_log_t *log)
{
    if (!log)
        return;
    if (log->have_writer) {
        pthread_mutex_lock(&log->mu);
        log->closing = 1;
        pthread_cond_signal(&log->work_cv);
        pthread_mutex_unlock(&log->mu);
        pthread_join(log->writer, NULL);
    }
    wal__ckpt_stop(log);
    if (log->jr) {
        /* back to flushed commits, then a clean checkpoint: the next open restores nothing */
        int rc = store_env_set_deferred(log->env, 0);
        if (rc == 0)
            rc = wal__checkpoint_try(log, 1);
        if (rc)
            cap_log(CAP_LOG_ERROR, "wal", "%s: the final checkpoint failed: %s",
                    store_env_path(log->env), cap_strerror(rc));
        wal__journal_close(log->jr);
        cap_free(log->jf);
    }
    pthread_cond_destroy(&log->ck_cv);
    pthread_mutex_destroy(&log->ck_mu);
    pthread_cond_destroy(&log->work_cv);
    pthread_mutex_destroy(&log->mu);
    wal_scratch_free(log->scratch);
    cap_free(log->index_buf);
    cap_free(log);
}
