/*
 * promise.h - durable promises and tasks (the Resonate model, protocol 2026-04-01) on the log.
 *
 * The C API is a 1:1 image of the protocol's operations (resonate-protocol.md §2.3): every
 * prom_promise_* / prom_task_* call is one protocol request, and its outcome is a protocol status
 * (200, 300, 400, 404, 409, 422) in prom_result_t, with the records the protocol would send back.
 * The store does no I/O other than the log: no JSON, no HTTP, no sockets. Outgoing messages
 * (`execute`, `unblock`) go to a durable outbox that a transport drains with prom_outbox_take().
 *
 * Durability invariant: every state change is a wal record (kinds PROM_REC_*) appended before the
 * caller is told, and no caller is ever told anything that depends on a record that is not yet
 * durable (a read that sees a not-yet-durable state waits for it). Records carry the new full state
 * of each changed promise document, so they are idempotent. The wal apply callback keeps
 * `prom.outbox` in the same LMDB transaction as the records. `prom.docs` (with prom.live,
 * prom.branch and the seq they cover in `prom.meta`) is by default written by a flusher thread,
 * a sorted batch every checkpoint_ms, behind the log (checkpoint mode); with checkpoint_ms < 0
 * the apply writes it in each record's transaction instead. Open loads the tables and replays the
 * document records after prom.meta's seq; the log must not be truncated past
 * prom_store_checkpoint_seq().
 *
 * Memory: only the live set is resident - pending promises (and their tasks, callbacks,
 * listeners), settled documents whose record is not yet in prom.docs, and a small cache of recently
 * settled ones. Other settled documents are evicted and read back from prom.docs on demand (with
 * the same answers). prom.live (the pending ids) and prom.branch (every promise id by branch) are
 * kept with prom.docs, so open loads only the live set and preload reads its branch from LMDB.
 * The timer heap is derived in memory on open.
 *
 * Sharing the log: prom_store_open() opens THE wal_log_t of the env (the wal takes one apply
 * callback at open, and promise needs it). Other modules (the engine) append their own record
 * kinds (engine: 0x30-0x4F, see ARCHITECTURE.md) through prom_store_wal(), and get their own
 * records applied by passing their apply function in prom_opts_t.wal.apply: promise calls it for
 * every record whose kind is outside PROM_REC_FIRST..PROM_REC_LAST.
 *
 * Threads: every prom_* operation may be called from any thread, concurrently; the state machine
 * is under one mutex, the durable wait is outside it, so concurrent callers share group commits.
 * None may be called from a wal done or apply callback. The *_async forms (below) do not wait.
 *
 * Ownership: inputs are borrowed for the duration of the call. Everything in a prom_result_t is
 * owned by the result and released by prom_result_clear().
 */
#ifndef PROMISE_H
#define PROMISE_H

#include <stddef.h>
#include <stdint.h>

#include "cap.h"
#include "store.h"
#include "wal.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct prom_store prom_store_t;

/* Wal record kinds owned by promise/ (0x10..0x2F reserved; other modules: ARCHITECTURE.md "Record
 * kinds"). */
enum {
    PROM_REC_FIRST = 0x10,
    PROM_REC_DOC = 0x10,     /* key: promise id; field 1: the full encoded document; field 2:
                                PROM_DOC_* flags; field 3 (created, with resonate:branch): branch */
    PROM_REC_MSG_ADD = 0x11, /* key: BE64 message id; fields 1 kind, 2 address, 3 id, 4 version */
    PROM_REC_MSG_DEL = 0x12, /* fields 1: first message id, 2: last message id (inclusive) */
    PROM_REC_LAST = 0x2F
};
/* PROM_REC_DOC field 2 (absent in records written before it existed: then neither is set). */
enum {
    PROM_DOC_LIVE = 1,   /* the promise is pending (prom.live holds its id) */
    PROM_DOC_CREATED = 2 /* the record creates the promise */
};

/* Protocol outcome of an operation (the HTTP status of the Resonate envelope). */
typedef enum {
    PROM_S_OK = 200,
    PROM_S_PRELOAD = 300, /* task.suspend: an awaited promise is already settled */
    PROM_S_BAD = 400,
    PROM_S_NOTFOUND = 404,
    PROM_S_CONFLICT = 409,
    PROM_S_UNPROCESSABLE = 422
} prom_status_t;

typedef enum {
    PROM_PENDING = 0,
    PROM_RESOLVED,
    PROM_REJECTED,
    PROM_REJECTED_CANCELED,
    PROM_REJECTED_TIMEDOUT
} prom_state_t;

typedef enum {
    PROM_TASK_PENDING = 0,
    PROM_TASK_ACQUIRED,
    PROM_TASK_SUSPENDED,
    PROM_TASK_HALTED,
    PROM_TASK_FULFILLED
} prom_task_state_t;

/* Id lineage check (resonate-protocol.md §2.7): off, the v0.9.8 dot rule, or the newest colon
 * rule. */
typedef enum { PROM_LINEAGE_OFF = 0, PROM_LINEAGE_DOT, PROM_LINEAGE_COLON } prom_lineage_t;

typedef struct prom_kv {
    char *key;
    char *value;
} prom_kv_t;

/* param / value: headers + opaque data (the SDKs send base64 text; the store does not care). */
typedef struct prom_value {
    prom_kv_t *headers;
    size_t nheaders;
    void *data;
    size_t len;
} prom_value_t;

typedef struct prom_promise {
    char *id;
    prom_state_t state;
    prom_value_t param;
    prom_value_t value;
    prom_kv_t *tags;
    size_t ntags;
    int64_t timeout_at;
    int64_t created_at;
    int64_t settled_at; /* meaningful only when state != PROM_PENDING */
} prom_promise_t;

typedef struct prom_task {
    char *id; /* == the promise id */
    prom_task_state_t state;
    int64_t version;
    int64_t resumes; /* count of awaited promises settled since the last acquire */
    char *pid;       /* set only when acquired */
    int64_t ttl;     /* set only when acquired */
} prom_task_t;

typedef struct prom_result {
    int status;          /* prom_status_t */
    const char *message; /* static; set when status is not 200 (the error text of the envelope) */
    int action_status;   /* task.fence: the inner action's status */
    prom_promise_t *promise;  /* owned; NULL when the outcome carries none */
    prom_task_t *task;        /* owned; NULL when the outcome carries none */
    prom_promise_t *promises; /* owned array: preload (acquire/create/fence/300) or search hits */
    size_t npromises;
    char *cursor; /* search: the next cursor, NULL at the end */
} prom_result_t;
/* Releases everything a result owns and zeroes it. */
void prom_result_clear(prom_result_t *res);

/* promise.create / the action of task.create / fenced create. */
typedef struct prom_create {
    const char *id;
    int64_t timeout_at;
    const prom_value_t *param; /* NULL = {} */
    const prom_kv_t *tags;
    size_t ntags;
} prom_create_t;

/* promise.settle / the action of task.fulfill / fenced settle. state: resolved, rejected or
 * rejected_canceled. */
typedef struct prom_settle {
    const char *id;
    prom_state_t state;
    const prom_value_t *value; /* NULL = {} */
} prom_settle_t;

typedef struct prom_search {
    int state;             /* -1 = any; PROM_REJECTED matches every rejected_* state */
    const prom_kv_t *tags; /* subset match */
    size_t ntags;
    int limit;          /* 0 = 100; 1..1000 */
    const char *cursor; /* NULL = from the start; else the cursor a previous search gave */
} prom_search_t;

typedef struct prom_task_ref {
    const char *id;
    int64_t version;
} prom_task_ref_t;

typedef int64_t (*prom_clock_fn)(void *arg);

#define PROM_CHECKPOINT_MS_DEFAULT 50

typedef struct prom_opts {
    prom_clock_fn clock; /* milliseconds; NULL = cap_wall_ms() */
    void *clock_arg;
    int64_t retry_ms;       /* pending task re-sends execute after this; 0 = 30000 */
    prom_lineage_t lineage; /* default PROM_LINEAGE_OFF */
    size_t preload_limit;   /* at most this many promises in a preload; 0 = 1000 */
    /* > 0, or 0 = PROM_CHECKPOINT_MS_DEFAULT: checkpoint mode - a flusher thread writes the
     * changed documents (prom.docs, prom.live, prom.branch) every checkpoint_ms in one sorted
     * transaction, behind the log, and open replays the records after that checkpoint; no
     * random-key put inside the group commit. The log must not be truncated past
     * prom_store_checkpoint_seq(). < 0: every document is written by the wal apply in its
     * record's own transaction (the tables never lag; slower: see ARCHITECTURE.md). */
    int checkpoint_ms;
    /* The settle observer (NULL: none): called with the id of every promise an operation
     * settled (promise.settle, task.fulfill, a timeout materialised by any op or by
     * prom_store_tick), once that settle is durable, on the thread that ran the operation,
     * outside the store's lock. It must not block (post to a loop); it may call operations. */
    void (*on_settle)(void *arg, const char *id);
    void *on_settle_arg;
    /* Settled documents are evicted from memory once their record is in prom.docs (lookups that
     * miss memory read prom.docs). This many of the most recently settled ones stay resident as a
     * cache: 0 = 1024; < 0 = none (evict as soon as durable; the tests use it to force eviction).
     */
    int settled_cache;
    /* Options of the shared log. durability/sync/batch are passed through; apply (if set) is
     * called for records of kinds outside 0x10..0x2F (see the top of this file). */
    wal_opts_t wal;
} prom_opts_t;

/* Opens the promise store in `env` (borrowed; must outlive the store): creates the tables if
 * missing (a store written before prom.live/prom.branch existed gets them built once), loads the
 * live documents (prom.live) and the outbox, rebuilds the timer heap, then opens the env's wal with
 * promise's apply callback. Errors: CAP_ECORRUPT (a stored document does not decode), wal and store
 * errors. Call once per env. */
int prom_store_open(store_env_t *env, const prom_opts_t *opts, prom_store_t **out);
/* Closes the wal (acknowledging everything queued) and frees the store. NULL is a no-op. No
 * operation may be in flight. */
void prom_store_close(prom_store_t *s);
/* The log sequence number up to which prom.docs holds every document; open replays the records
 * after it, so the log must not be truncated past it (wal_log_truncate(log, seq + 1) at most).
 * With checkpoint_ms < 0: the last durable seq. */
uint64_t prom_store_checkpoint_seq(prom_store_t *s);
/* Writes the checkpoint now: returns once prom.docs holds every document changed by operations
 * that returned before the call (checkpoint mode), or once their records are durable (< 0). Not
 * from a wal callback. 0, or a store error (then the next checkpoint retries). */
int prom_store_checkpoint(prom_store_t *s);
/* Memory of the store (the engine exposes these as metrics). Resident documents are the pending
 * promises (with their tasks, callbacks and listeners: everything a timer or an awaiter needs),
 * settled ones whose record is not yet in prom.docs, and the settled cache
 * (prom_opts_t.settled_cache). */
typedef struct prom_store_stats {
    uint64_t resident_docs;  /* documents in memory */
    uint64_t resident_bytes; /* bytes those documents hold (structs, strings, buffers) */
    uint64_t evictions;      /* documents dropped from memory since open */
    uint64_t misses;         /* lookups that missed memory and were served from prom.docs */
    uint64_t records;        /* promise records appended to the wal since open */
    /* checkpoint mode (0 otherwise): */
    uint64_t unflushed_docs;  /* resident because changed since prom.docs last covered them */
    uint64_t checkpoints;     /* checkpoints of prom.docs written since open */
    uint64_t checkpoint_docs; /* documents they wrote */
} prom_store_stats_t;
/* A snapshot of the counters (any thread). */
void prom_store_stats(prom_store_t *s, prom_store_stats_t *out);

/* The shared log (borrowed, valid until close): for other modules' record kinds. */
wal_log_t *prom_store_wal(prom_store_t *s);
/* The store's clock reading (ms). */
int64_t prom_store_now(prom_store_t *s);

/* ---- operations. Each returns 0 with res->status set (and records in res), or a negative
 * CAP_E* / -errno for a system failure (nothing was changed then). res is zeroed first. ---- */

/* promise.get: 200 {promise} (projected: a pending promise past its deadline reads as timed
 * out) | 404. */
int prom_promise_get(prom_store_t *s, const char *id, prom_result_t *res);
/* promise.create: idempotent by id (an existing promise comes back unchanged, 200). Created after
 * its deadline: settled at once (rejected_timedout, or resolved with resonate:timer=true),
 * createdAt = settledAt = timeoutAt. A resonate:target tag creates a task (pending v0, execute
 * queued unless resonate:delay). 400: empty id, timeoutAt < 0, bad target address, bad delay,
 * lineage violation. */
int prom_promise_create(prom_store_t *s, const prom_create_t *req, prom_result_t *res);
/* promise.settle: 200 {promise} (idempotent: a settled promise returns its stored state) | 404 |
 * 400 (state not resolved/rejected/rejected_canceled). Settling fulfils the task, resumes
 * suspended awaiters and queues `unblock` for listeners. */
int prom_promise_settle(prom_store_t *s, const prom_settle_t *req, prom_result_t *res);
/* Several creates and settles as one operation: run in order under one lock, their records in
 * ONE wal append (one transaction, one durable wait), so a promise created and settled here is a
 * single record and a reader never sees the first ops without the last. Each op sets exactly one
 * of create/settle. res is the last op's outcome; the batch stops at the first op that does not
 * answer 200 (400 for an empty batch or an op with neither or both): the ops before it are still
 * written. The engine records a durable step (its promise created and settled) this way. */
typedef struct prom_op {
    const prom_create_t *create;
    const prom_settle_t *settle;
} prom_op_t;
int prom_promise_batch(prom_store_t *s, const prom_op_t *ops, size_t n, prom_result_t *res);
/* ---- asynchronous forms (for an event loop that must not wait for a commit). ----
 * The op runs at once in the calling thread (state machine, records appended to the group
 * commit, res filled exactly as the blocking form fills it), but the call does not wait: done(arg,
 * rc) is called exactly once when what res reports is durable - the op's own records, or, for an
 * op that wrote nothing (an idempotent repeat), every record appended before it. rc is 0, or a
 * negative code if the log failed or closed first (res must then not be trusted).
 * Which thread calls done: the wal writer thread (usually), or the calling thread before the call
 * returns when nothing needed waiting. done must be short and must not call prom_* or wal_*
 * functions (post to your loop instead, e.g. uv_async_send). res must stay valid until done.
 * Returns 0 (done will be or was called), or a negative code for a failure before anything was
 * appended (done is NOT called; res is cleared). */
typedef void (*prom_done_fn)(void *arg, int rc);
int prom_promise_create_async(prom_store_t *s, const prom_create_t *req, prom_result_t *res,
                              prom_done_fn done, void *arg);
/* settle, plus `extra` records of another module (kinds outside PROM_REC_FIRST..LAST, else
 * CAP_EINVAL) appended FIRST in the same wal append: one transaction, all or nothing, whatever the
 * settle's status (a 404 or an already settled promise still appends them). Records are borrowed
 * for the call. This is how the engine makes an execution's FINISH and its promise's settle one
 * commit. */
int prom_promise_settle_async(prom_store_t *s, const prom_settle_t *req, const wal_rec_t *extra,
                              size_t nextra, prom_result_t *res, prom_done_fn done, void *arg);
/* promise.register_callback: 200 {promise: awaited} | 400 (same id; origins differ when lineage
 * is checked) | 404 (awaited missing) | 422 (awaiter missing or without a task; awaited
 * internal). Stored only while both are pending; if awaited is settled and awaiter's task is
 * suspended, the task is resumed at once. */
int prom_promise_register_callback(prom_store_t *s, const char *awaited, const char *awaiter,
                                   prom_result_t *res);
/* promise.register_listener: 200 {promise} | 400 (bad address) | 404 | 422 (internal). Stored
 * only while pending; on settle an `unblock` goes to address. */
int prom_promise_register_listener(prom_store_t *s, const char *awaited, const char *address,
                                   prom_result_t *res);
/* promise.search: 200 {promises, cursor} ordered by id | 400 (limit outside 1..1000). cursor is
 * set only when more matches follow. */
int prom_promise_search(prom_store_t *s, const prom_search_t *req, prom_result_t *res);

/* task.get: 200 {task} | 404. */
int prom_task_get(prom_store_t *s, const char *id, prom_result_t *res);
/* task.create: 200 {task, promise, preload} | 400 (ttl <= 0, empty pid, no resonate:target, has
 * resonate:delay, create validation) | 409 (task acquired, suspended or halted) | 422 (promise
 * exists without a task). New: task acquired v1. Existing pending: acquired v+1. Fulfilled:
 * returned as is. */
int prom_task_create(prom_store_t *s, const char *pid, int64_t ttl, const prom_create_t *create,
                     prom_result_t *res);
/* task.acquire: 200 {task (v+1, acquired), promise, preload} | 400 | 404 | 409 (not pending,
 * version mismatch). Lease until now+ttl; resumes cleared. */
int prom_task_acquire(prom_store_t *s, const char *id, int64_t version, const char *pid,
                      int64_t ttl, prom_result_t *res);
/* task.release: 200 | 404 | 409. acquired -> pending; execute re-queued at the same version. */
int prom_task_release(prom_store_t *s, const char *id, int64_t version, prom_result_t *res);
/* task.fulfill: 200 {promise} | 400 (settle id != task id, bad state) | 404 | 409. */
int prom_task_fulfill(prom_store_t *s, const char *id, int64_t version, const prom_settle_t *settle,
                      prom_result_t *res);
/* task.suspend with callbacks on `awaited`: 200 (acquired -> suspended) | 300 {preload} (some
 * awaited already settled; the task stays acquired) | 400 (empty; awaited == id; duplicates;
 * origins differ when checked) | 404 | 409 | 422 (awaited missing or internal). */
int prom_task_suspend(prom_store_t *s, const char *id, int64_t version, const char *const *awaited,
                      size_t nawaited, prom_result_t *res);
/* task.fence: runs the inner create (or settle) only while the task is acquired at version.
 * 200 {action_status, promise, preload} | 400 (action id == task id) | 404 | 409. */
int prom_task_fence_create(prom_store_t *s, const char *id, int64_t version,
                           const prom_create_t *create, prom_result_t *res);
int prom_task_fence_settle(prom_store_t *s, const char *id, int64_t version,
                           const prom_settle_t *settle, prom_result_t *res);
/* task.heartbeat: always 200 (400 when empty or pid empty). Extends the lease of each task
 * acquired by pid at that version. */
int prom_task_heartbeat(prom_store_t *s, const char *pid, const prom_task_ref_t *tasks, size_t n,
                        prom_result_t *res);
/* task.halt: 200 | 404 | 409 (fulfilled). task.continue: 200 | 404 | 409 (not halted). */
int prom_task_halt(prom_store_t *s, const char *id, prom_result_t *res);
int prom_task_continue(prom_store_t *s, const char *id, prom_result_t *res);

/* ---- timers ---- */
/* Fires every timer due at `now` (promise deadlines, task retry and lease timers), durably, and
 * returns once they are durable; *fired (optional) gets how many fired. The engine calls it from
 * its loop; tests call it with a fake clock. */
int prom_store_tick(prom_store_t *s, int64_t now, size_t *fired);
/* The earliest armed deadline (ms), or INT64_MAX when none. */
int64_t prom_store_next_deadline(prom_store_t *s);

/* ---- outbox ---- */
typedef enum { PROM_MSG_EXECUTE = 1, PROM_MSG_UNBLOCK = 2 } prom_msg_kind_t;
typedef struct prom_msg {
    uint64_t mid;
    prom_msg_kind_t kind;
    char *address;
    char *id;                /* execute: task id; unblock: promise id */
    int64_t version;         /* execute: task version */
    prom_promise_t *promise; /* unblock: the settled record (owned) */
} prom_msg_t;
/* Takes (durably removes) up to `max` of the oldest messages, at most once, as the Resonate
 * server does (a lost execute is recovered by the retry timer). *msgs is owned by the caller:
 * prom_msgs_free(*msgs, *n). */
int prom_outbox_take(prom_store_t *s, size_t max, prom_msg_t **msgs, size_t *n);
void prom_msgs_free(prom_msg_t *msgs, size_t n);
/* Messages waiting in the outbox. */
size_t prom_outbox_len(prom_store_t *s);

/* ---- helpers ---- */
const char *prom_state_name(prom_state_t st); /* "pending", "rejected_timedout", ... */
const char *prom_task_state_name(prom_task_state_t st);
void prom_promise_clear(prom_promise_t *p); /* frees what a prom_promise_t owns */
/* Copies src into dst (deep). */
void prom_promise_copy(prom_promise_t *dst, const prom_promise_t *src);
/* A tag's value, or NULL (borrowed from p). */
const char *prom_promise_tag(const prom_promise_t *p, const char *key);

#ifdef __cplusplus
}
#endif
#endif /* PROMISE_H */
