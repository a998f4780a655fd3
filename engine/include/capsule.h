/*
 * capsule.h - the embeddable capsule engine (prefix eng_): durable Python sessions.
 *
 * A session is a Python namespace living in a worker process (pyworker/). Every step of an
 * execution is made durable in the log (promise/ + the engine's own wal records) BEFORE it is
 * acted on, so after a crash (kill -9 of the embedding process, power loss in WAL_SYNC mode) the
 * engine replays the log: every session comes back with its namespace, and executions that were
 * in flight are re-run with the input replies already recorded.
 *
 * The guarantee, plainly: an execution result the engine acknowledged (on_done / eng_execute_sync
 * returned it) and the namespace state it produced are recorded exactly once: after any crash,
 * the result can be fetched by its id and the namespace contains its effects, and it never runs
 * again. An execution interrupted by a crash before it was acknowledged is re-run after the
 * restart; its side effects OUTSIDE the session (files, network, other processes) may therefore
 * happen twice. Input replies already recorded are replayed to the re-run in order; only prompts
 * that were never answered are asked again.
 *
 * Durable ids (see ARCHITECTURE.md, ## engine/):
 *   session promise    "capsule/s/<sid>"          pending = open, resolved = closed
 *   execution promise  "capsule/x/<eid>"          param = code + options; settled with the result
 *   input promise      "capsule/x/<eid>/in/<k>"   param = prompt; resolved with the reply
 *
 * Threads: the engine runs a libuv loop, on its own thread (default) or on the caller's loop
 * (eng_opts_t.loop, then the caller runs it). Every public function may be called from ANY thread:
 * it posts a command to the loop (uv_async) and returns. Callbacks (eng_exec_cb_t) run on the loop
 * thread; they must not block, and may call the public functions. The blocking functions
 * (eng_open, eng_close, eng_session_open, eng_session_close, eng_session_list, eng_execute_sync,
 * eng_result_get, eng_checkpoint, eng_session_fork) must NOT be called on the loop thread.
 *
 * Ownership: inputs are copied during the call. Results handed to callbacks are borrowed for the
 * duration of the callback; results returned by eng_execute_sync / eng_result_get are owned by the
 * caller and freed with eng_result_free.
 */
#ifndef CAPSULE_H
#define CAPSULE_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "cap.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct eng eng_t;

/* Wal record kinds owned by the engine (0x40..0x4F). */
enum {
    ENG_REC_FINISH = 0x40,     /* key: eid. The commit point of an execution: result, output and
                                  the namespace delta, in one record (one transaction). */
    ENG_REC_CHECKPOINT = 0x41, /* key: sid. A full namespace snapshot after delta ordinal n. */
    ENG_REC_SESSION = 0x42,    /* key: sid. A session's base (a fork's parent and ordinal). */
};

/* Transaction policy of an execution. */
typedef enum {
    ENG_TX_DEFAULT = 0,             /* the session's policy (itself defaulting to the next) */
    ENG_TX_ROLLBACK_ON_FAILURE = 1, /* the delta is recorded only if the cell succeeded */
    ENG_TX_COMMIT_ALWAYS = 2,       /* the delta is recorded whatever the outcome */
    ENG_TX_ROLLBACK_ALWAYS = 3,     /* never recorded: the namespace is restored afterwards */
} eng_tx_t;

/* CPU placement of workers. AUTO: while a single cell runs in the whole engine, its worker, the
 * engine's loop thread (its own; a caller's only with eng_opts_t.pin_loop) and the wal writer
 * are pinned to one CPU, the one taking the data disk's interrupts if there is one, else the
 * loop's (a request then goes loop -> worker -> loop without waking another CPU: on a VM an idle
 * vCPU's wake-up costs tens of microseconds); the worker's pin is dropped when a second cell
 * starts or the cell runs longer than 2 ms, the threads' when a second cell starts, so busy
 * sessions and CPU-bound cells use every CPU. NONE: the scheduler places workers. */
typedef enum { ENG_AFFINITY_AUTO = 0, ENG_AFFINITY_NONE = 1 } eng_affinity_t;

typedef struct eng_opts {
    const char *dir;           /* data directory (LMDB env); required */
    int nosync;                /* 1: WAL_NOSYNC (acknowledged = survives kill -9, not power loss) */
    uv_loop_t *loop;           /* NULL: the engine runs its own loop thread */
    const char *worker_path;   /* NULL: pyworker's default (see pyworker.h) */
    const char *warmup;        /* Python run once in the zygote; every worker inherits its names */
    uint32_t pool_idle;        /* pre-warmed idle workers kept ready; 0 = 2 */
    uint32_t max_sessions;     /* open sessions at most; 0 = 1024 */
    uint32_t max_queue;        /* queued executions per session at most; 0 = 64 */
    size_t max_output;         /* output bytes kept per execution; beyond: truncated with a marker;
                                  0 = 1 MiB */
    uint32_t dur_threads;      /* unused since promise operations are asynchronous (kept for
                                  source compatibility) */
    int eager_restore;         /* 1: restore every open session at eng_open (default lazy) */
    uint32_t checkpoint_every; /* a checkpoint every N committed executions of a session (a
                                  restore then applies at most N deltas); 0 = only on request */
    uint32_t idle_release_ms;  /* idle expiry: a session unused this long gives its worker back
                                  (restored from the log when next used); 0 = never */
    size_t map_size;           /* initial LMDB map; 0 = 1 GiB */
    eng_affinity_t affinity;   /* where workers run; default ENG_AFFINITY_AUTO */
    int pin_loop;              /* with a caller's loop and ENG_AFFINITY_AUTO: 1 lets the engine
                                  pin that loop's thread (the one that called eng_open) with a
                                  lone execution, as it pins its own loop thread, and restore
                                  the thread's mask from eng_open when it unpins and at eng_close;
                                  0 (default): the caller's thread is never touched */
} eng_opts_t;

typedef struct eng_session_opts {
    eng_tx_t tx;          /* default ENG_TX_ROLLBACK_ON_FAILURE */
    uint32_t timeout_ms;  /* per-execution timeout; 0 = none */
    uint64_t mem_bytes;   /* worker RLIMIT_AS; 0 = none (a limited session gets its own
                             worker instead of a pooled one) */
    uint32_t cpu_seconds; /* worker RLIMIT_CPU; 0 = none */
    int retry_on_death;   /* 1: an execution whose worker died is re-run once */
    const char *warmup;   /* run as the session's first execution (id "<sid>:warmup", recorded,
                             committed whatever happens); NULL = none */
} eng_session_opts_t;

/* How an execution ended. */
typedef enum {
    ENG_ST_OK = 0,
    ENG_ST_ERROR = 1,     /* the cell raised (etype/emsg/traceback) */
    ENG_ST_CANCELLED = 2, /* eng_cancel */
    ENG_ST_TIMEOUT = 3,
    ENG_ST_DIED = 4,   /* the worker died (emsg says why); the namespace was restored */
    ENG_ST_REFUSED = 5 /* never ran: err says why (no such session, queue full, ...) */
} eng_status_t;

typedef struct eng_result {
    char *eid;
    char *sid;
    eng_status_t status;
    int err; /* ENG_ST_REFUSED: CAP_ENOTFOUND, CAP_EBUSY (queue full), CAP_ELIMIT, CAP_ECLOSED */
    char *repr, *json, *etype, *emsg, *traceback; /* NULL when absent */
    char *output; /* stdout+stderr in order, bounded (see truncated) */
    size_t output_len;
    int truncated;        /* output was cut at max_output; a marker line ends it */
    int restarted;        /* the execution was interrupted by a crash and re-run */
    int committed;        /* its namespace delta was recorded */
    uint64_t ordinal;     /* when committed: the session's delta ordinal (for fork/rewind) */
    char *restore_failed; /* the session was restored from the log (a rollback, a worker's death,
                             a lazy restore after idle release or a restart) before this result,
                             and these names it had could not be brought back: "name:reason;..."
                             (a name holds no ':' or ';', a reason no ';'). Told once: a later
                             restore names only what the worker had again since. */
    char *unrecorded;     /* committed: names the execution bound that the log cannot hold (they
                             cannot be pickled: locks, generators, open files...), in the same
                             form; they are lost when the session is restored */
    /* Where this execution's time went, in ns (all 0 when it did not run here: a recorded result,
     * a refusal, or one whose run began before a restart): submit to its request durable, then to
     * the worker's result (waiting for its turn and a restore included), then to its FINISH
     * durable. Filled before on_done. */
    uint64_t t_request_ns, t_run_ns, t_finish_ns;
} eng_result_t;

void eng_result_free(eng_result_t *r); /* NULL is a no-op */

/* A durable step of an execution (a `capsule` task call, step or sleep inside it; see
 * ARCHITECTURE.md "Durable steps"). */
typedef struct eng_task_info {
    char *id;          /* its promise id: "capsule/x/<eid>.<path>" */
    char *path;        /* "1", "2", "2.1": call order per level */
    char *name;        /* the task's name ("" for a sleep) */
    char *kind;        /* "step" or "sleep" */
    const char *state; /* "completed", "failed", "running" (pending while its execution is
                        * unfinished), "pending" (left pending by an execution that ended) */
    uint32_t attempts; /* attempts made, recorded when it settled; while pending: the failed
                        * attempts recorded + 1 */
    int64_t created_at, settled_at, timeout_at; /* ms since the epoch; 0 = none */
} eng_task_info_t;
/* The steps of execution eid in path order (durable state only). Returns 0, CAP_ENOTFOUND (no
 * such execution) or a store error. Blocking (reads; not on the loop thread). */
int eng_tasks_list(eng_t *e, const char *eid, eng_task_info_t **out, size_t *n);
void eng_tasks_free(eng_task_info_t *v, size_t n); /* NULL is a no-op */
/* Settles the external promise `id` that sessions wait on with capsule.promise(name).wait()
 * ("capsule/p/<id>"; a session whose id is "<principal>:<sid>" waits on "<principal>:<name>", so
 * a server passes "<principal>:<name>"). resolve 1: resolved, 0: rejected; data = its value (the
 * waiting side decodes it as JSON). The waiting executions are woken. Returns 0 and *state (1
 * resolved, 2 rejected: its state afterwards, the earlier one if it was settled already),
 * CAP_ENOTFOUND (nobody created it yet), CAP_EINVAL. Blocking (waits for the commit). */
int eng_promise_settle(eng_t *e, const char *id, int resolve, const void *data, size_t len,
                       int *state);

/* Callbacks of one execution; any may be NULL. All run on the loop thread. arg is the caller's. */
typedef struct eng_exec_cb {
    /* An output chunk (stream 1 stdout, 2 stderr), as the worker wrote it. A listener that
     * attaches to a running execution first gets the output so far (bounded by max_output) as
     * one chunk with stream 0 (stdout and stderr interleaved as written). */
    void (*on_output)(void *arg, const char *eid, int stream, const char *data, size_t len);
    /* The cell asks for input (the request is durable): answer with eng_input_reply. */
    void (*on_input)(void *arg, const char *eid, const char *prompt, int password);
    /* The execution was interrupted by a crash and is being re-run from the start: output
     * already shown will be produced again. */
    void (*on_restarted)(void *arg, const char *eid);
    /* Exactly once: the execution finished and its result is durable (or it was refused). */
    void (*on_done)(void *arg, const eng_result_t *r);
    /* The engine took the execution: its request is durably recorded (it survives kill -9
     * from here on and will run, or re-run after a restart), queued or attached to the running
     * one. Comes before any other callback of this listener; not called when on_done answers
     * without it (a refusal, a request that could not be recorded, or the recorded result of a
     * finished id). */
    void (*on_accepted)(void *arg, const char *eid);
} eng_exec_cb_t;

typedef struct eng_exec_req {
    const char *sid;     /* required */
    const char *eid;     /* NULL: generated. Existing id: the recorded result, or attach */
    const char *code;    /* required */
    size_t len;          /* 0: strlen(code) */
    eng_tx_t tx;         /* ENG_TX_DEFAULT: the session's */
    uint32_t timeout_ms; /* this execution's timeout, recorded with its request (a re-run after
                            a restart keeps it); 0: the session's timeout_ms */
} eng_exec_req_t;

/* With a caller's loop (opts->loop): call eng_open on the thread that runs that loop, outside
 * uv_run or from one of its callbacks (it adds an async handle and four timers to the loop), then
 * keep running the loop; call the blocking functions from other threads. The engine writes to
 * its workers' sockets on that thread: ignore SIGPIPE in the process, or block it on that thread
 * (a worker that dies as it is written to would otherwise kill the process; the engine's own
 * loop thread blocks it). After eng_close the loop
 * holds no handle of the engine (uv_loop_close succeeds once the loop ran dry).
 *
 * Opens (creating if needed) the engine in opts->dir: opens the store and the log, starts the
 * zygote and the loop, finds the open sessions and the interrupted executions (which are re-run,
 * their sessions restored at once), and serves requests. Blocking. Returns 0 and *out, or
 * CAP_EINVAL, store/wal/promise errors, pyworker errors (zygote). */
int eng_open(const eng_opts_t *opts, eng_t **out);
/* Stops accepting commands, kills the workers (their running executions stay recorded as
 * pending and are re-run at the next open; their callbacks are not called), closes the log (every
 * queued record is written) and frees everything. With a caller's loop, the caller must keep
 * running the loop until this returns (call it from another thread). NULL is a no-op. Blocking. */
void eng_close(eng_t *e);

/* Opens session `sid` (NULL: a generated id); an already open sid is returned as is. The open
 * of a new id without limits of its own waits for neither a commit nor the loop thread: the
 * calling thread appends the session's record, pops a worker from the warm pool and queues the
 * session for the loop, which takes it over before any command posted after the call returns
 * (from any thread). The session's record is appended to the
 * log before any record of its executions, so it is durable by the time anything about the
 * session is acknowledged (an execution's result, a close); a crash before that loses only the
 * empty session (after a restart the id is unknown and may be opened again). With o->warmup the
 * call returns after the warm-up's result, so the open is durable then.
 * *sid_out (optional) gets the id (caller frees with cap_free). Returns 0, CAP_ELIMIT (max
 * sessions), CAP_EINVAL (bad id), CAP_EEXIST (a closed session's id: not reused), CAP_ECLOSED,
 * CAP_EUNPROCESSABLE (o->warmup raised; the session is open). o->warmup is not stored in the
 * session's options. Blocking. */
int eng_session_open(eng_t *e, const char *sid, const eng_session_opts_t *o, char **sid_out);
/* Closes a session durably (its queued executions are refused with CAP_ECLOSED; the running one
 * is cancelled). Returns 0 or CAP_ENOTFOUND. Blocking. */
int eng_session_close(eng_t *e, const char *sid);
/* Open sessions' ids, sorted (caller frees each and the array with cap_free). Blocking. */
int eng_session_list(eng_t *e, char ***sids, size_t *n);
/* Creates session new_sid whose namespace is src's state right after delta ordinal `ordinal`
 * (0 = src's latest): a fork, or, under the same name after closing src, a rewind. Blocking.
 * Returns 0, CAP_ENOTFOUND, CAP_EEXIST, CAP_EINVAL (ordinal beyond src's). */
int eng_session_fork(eng_t *e, const char *src, uint64_t ordinal, const char *new_sid);
/* What a session is: its options as opened (recovered from its durable record after a restart;
 * warmup is not kept: NULL), and its state now. */
typedef struct eng_session_info {
    eng_session_opts_t opts;
    uint64_t ordinal; /* its latest committed delta ordinal (0: none yet) */
    uint32_t queued;  /* executions waiting */
    int running;      /* one is running */
    int live;         /* it has a worker (else its namespace waits in the log: cold) */
} eng_session_info_t;
/* Returns 0 and *out, CAP_ENOTFOUND (no open session), CAP_EINVAL. Blocking (a loop hop). */
int eng_session_info(eng_t *e, const char *sid, eng_session_info_t *out);
/* Releases the worker of an idle session (idle expiry, memory): the session stays open, its
 * namespace stays in the log and is restored (checkpoint + deltas) into a fresh worker when it is
 * next used. Returns 0, CAP_ENOTFOUND, CAP_EBUSY (running, queued or restoring). Blocking. */
int eng_session_release(eng_t *e, const char *sid);
/* Records a full snapshot of the session's namespace, taken from its live worker, as the state
 * after its latest ordinal (a restore starts from the latest checkpoint). *bytes (optional) gets
 * the snapshot's size. With truncate != 0 the log is then truncated before the checkpoint record
 * (the engine's and promise/'s derived tables keep every fact, so nothing is lost). Returns 0,
 * CAP_ENOTFOUND, CAP_EBUSY (the session is running, queued, restoring or has no live worker: run
 * something first), CAP_EWORKER (the snapshot failed). Blocking. */
int eng_checkpoint(eng_t *e, const char *sid, int truncate, size_t *bytes);

/* Submits an execution. Returns 0 (the outcome, including refusals, comes through cb->on_done
 * exactly once) or CAP_EINVAL / CAP_ECLOSED (then no callback). cb is copied. */
int eng_execute(eng_t *e, const eng_exec_req_t *req, const eng_exec_cb_t *cb, void *arg);
/* Answers the pending input request of execution eid (text without newline, or eof). The reply
 * is durable before the worker gets it. Returns 0 (posted) or CAP_EINVAL. */
int eng_input_reply(eng_t *e, const char *eid, const char *text, size_t len, int eof);
/* Cancels execution eid (queued: refused with CAP_ECANCELED; running: interrupted). */
int eng_cancel(eng_t *e, const char *eid);

/* Runs one execution and waits for its durable result. inputs: replies to successive input
 * requests (running out = EOF). Returns 0 and *out (see (*out)->status), or CAP_EINVAL. */
int eng_execute_sync(eng_t *e, const eng_exec_req_t *req, const char *const *inputs,
                     size_t n_inputs, eng_result_t **out);
/* The recorded result of execution eid. Returns 0 and *out, CAP_ENOTFOUND (unknown id) or
 * CAP_EBUSY (known, not finished yet). Blocking (a read). */
int eng_result_get(eng_t *e, const char *eid, eng_result_t **out);
/* The session of execution eid while it has no result (queued, running, or re-running after a
 * restart): 0 and *sid (the engine's session id; cap_free it), CAP_ENOTFOUND (unknown id, or
 * finished: eng_result_get has it). With it a caller that did not start eid (a server after a
 * restart) attaches to it: eng_execute with the same eid and session. Blocking (a read). */
int eng_exec_session(eng_t *e, const char *eid, char **sid);

typedef struct eng_stats {
    uint32_t sessions, restored, pool_idle, running, queued;
    uint64_t executions, recovered_execs, worker_deaths;
    uint64_t wal_commits, wal_records; /* the shared log's, since open */
    uint64_t checkpoints;              /* checkpoints recorded since open */
    uint64_t zygote_restarts;          /* the fork server died and was started again */
    uint32_t zygote_restarting;        /* 1 while its replacement starts (off the loop) */
    uint64_t pool_dead; /* pooled workers found dead (exited, not yet reaped) by an acquire */
    int zygote_pid;
    /* where an execution's time goes, summed over the `timed` executions finished since open
     * (each run from submission to its durable FINISH): submission -> request record durable
     * (includes waiting in the session's queue) -> result from the worker -> FINISH durable */
    uint64_t timed, t_request_ns, t_run_ns, t_finish_ns;
    /* CPU placement (eng_opts_t.affinity): executions started with their worker pinned, and
     * pins dropped (a second execution in flight, or a lone cell past 2 ms) */
    uint64_t pinned, unpinned;
} eng_stats_t;
void eng_stats(eng_t *e, eng_stats_t *out); /* any thread; a consistent-enough snapshot */
/* The shared log's statistics (wal.h's wal_log_stats: commits, records, batch-size and
 * commit-time histograms, fsync time). Any thread. */
struct wal_stats;
void eng_wal_stats(eng_t *e, struct wal_stats *out);

/* The engine's promise store (promise.h; the Resonate model), for front ends that serve the
 * protocol on it (tools/resonate). Borrowed, valid until eng_close. Its prom_* operations block
 * until durable: call them from any thread but the loop's. Ids beginning "capsule/" and tags
 * beginning "capsule:" are the engine's own (sessions, executions, inputs): leave them alone. */
struct prom_store *eng_promise_store(eng_t *e);

#ifdef __cplusplus
}
#endif
#endif /* CAPSULE_H */
