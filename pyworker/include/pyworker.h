/*
 * pyworker.h - the engine-side client of the capsule Python worker (prefix pyw_).
 *
 * A worker is a capsule-pyworker process embedding Debian's libpython3.11. It runs one session's
 * cells; it talks to this client over one inherited unix stream socket with the framed binary
 * protocol documented in ARCHITECTURE.md (## pyworker/). This client:
 *   - starts workers cold (fork + exec of capsule-pyworker) or through a zygote (a pre-initialised
 *     fork server, pyw_zygote_open), applying per-worker resource limits;
 *   - sends execute / input-reply / cancel / snapshot / apply / ping / shutdown requests;
 *   - delivers output chunks, input requests, results (with the namespace delta), snapshots,
 *     apply results and the worker's death (with the reason) through callbacks.
 *
 * Threads and loops: every function here (except pyw_sync_*, which run their own private loop)
 * must be called on the thread running the uv loop given at spawn; callbacks run on that loop.
 * Deviation from the house style: this header includes uv.h (the loop is part of the contract).
 *
 * Reaping: the client reaps its workers itself (pidfd_open + a uv_poll on the pidfd, then
 * waitpid). Workers forked by a zygote are grandchildren: pyw_zygote_open sets
 * PR_SET_CHILD_SUBREAPER on the calling process and the zygote double-forks, so those workers are
 * reparented to the calling process, which reaps them and sees their exit status. As a
 * subreaper, the process also inherits what a dead worker's processes leave behind: when a
 * worker ends the client kills its process group (each worker leads one) and its cgroup, and
 * reaps those. Do not waitpid(-1) in the same process.
 *
 * Output or input requests from user threads running between cells carry exec_id 0.
 *
 * Strings handed to callbacks are borrowed: valid only during the callback.
 */
#ifndef PYWORKER_H
#define PYWORKER_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The protocol version this client speaks (READY must carry the same). */
#define PYW_PROTOCOL_VERSION 1
/* Default maximum frame size in either direction (bytes after the length field). */
#define PYW_DEFAULT_MAX_FRAME (64u << 20)

typedef struct pyw_worker pyw_worker_t;
typedef struct pyw_zygote pyw_zygote_t;

/* Per-worker resource limits; 0 means "no limit". Applied inside the worker before any user
 * code runs. mem_bytes: RLIMIT_AS. cpu_seconds: RLIMIT_CPU (SIGXCPU). nofile: RLIMIT_NOFILE.
 * fsize_bytes: RLIMIT_FSIZE (writes fail with EFBIG). nproc: processes and threads user code may
 * add to the worker's own (a cgroup pids controller, which also holds for root; without a usable
 * cgroup, RLIMIT_NPROC when not root, else the spawn fails with -ENOTSUP). */
typedef struct pyw_limits {
    uint64_t mem_bytes;
    uint32_t cpu_seconds;
    uint32_t nofile;
    uint64_t fsize_bytes;
    uint32_t nproc;
} pyw_limits_t;

/* How a cell ended. */
typedef enum {
    PYW_STATUS_OK = 0,        /* ran to the end; repr/json may hold the last expression's value */
    PYW_STATUS_ERROR = 1,     /* raised: etype, emsg, traceback are set */
    PYW_STATUS_CANCELLED = 2, /* stopped by pyw_worker_cancel (KeyboardInterrupt/CancelledError) */
    PYW_STATUS_TIMEOUT = 3,   /* stopped because its timeout passed */
    PYW_STATUS_DIED = 4,      /* the worker died before answering (see the exit callback) */
} pyw_status_t;

/* A name and a reason (unpicklable names, failed restores). */
typedef struct pyw_pair {
    const char *name;
    const char *reason;
} pyw_pair_t;

/* A namespace delta or snapshot, as produced by _capsule_ns. blob is opaque to C. */
typedef struct pyw_delta {
    const uint8_t *blob;
    size_t blob_len;
    const char *const *added;
    size_t n_added;
    const char *const *changed;
    size_t n_changed;
    const char *const *mutated;
    size_t n_mutated;
    const char *const *deleted;
    size_t n_deleted;
    const pyw_pair_t *unpicklable;
    size_t n_unpicklable;
} pyw_delta_t;

/* The outcome of a cell. All pointers borrowed for the duration of the callback. */
typedef struct pyw_result {
    uint64_t exec_id;
    pyw_status_t status;
    uint32_t cell_no;  /* the worker's cell counter (<cell N> in tracebacks) */
    const char *repr;  /* repr of the last expression value, NULL if none or suppressed by ';' */
    const char *json;  /* the value as JSON text when JSON-able, else NULL */
    const char *etype; /* exception type name (status ERROR/CANCELLED/TIMEOUT), else NULL */
    const char *emsg;  /* exception message; for a hit limit it names the limit */
    const char *traceback;    /* formatted traceback with the cell's source lines, else NULL */
    uint64_t duration_ns;     /* time the cell ran inside the worker */
    const pyw_delta_t *delta; /* namespace delta after the cell; NULL if none was produced */
    const char *delta_error;  /* why no delta was produced (NULL if delta is set or n/a) */
    int not_run; /* the cell's code never ran (it did not compile, or was cancelled before it
                    started): the namespace is exactly as it was before it */
} pyw_result_t;

/* Result of pyw_worker_apply. */
typedef struct pyw_apply_result {
    uint64_t req_id;
    int rc;            /* 0, or CAP_EUNPROCESSABLE when the blob was rejected (see error) */
    const char *error; /* NULL on success */
    const char *const *restored;
    size_t n_restored;
    const char *const *deleted;
    size_t n_deleted;
    const pyw_pair_t *failed;
    size_t n_failed;
} pyw_apply_result_t;

/* Why a worker ended. */
typedef enum {
    PYW_EXIT_CLEAN = 0,     /* exited with status 0 after a shutdown request */
    PYW_EXIT_CRASHED,       /* exited non-zero or died by a signal nobody here sent */
    PYW_EXIT_KILLED,        /* killed by pyw_worker_kill / pyw_worker_close */
    PYW_EXIT_CANCEL_KILLED, /* a cell ignored its cancel/timeout for the grace period: killed */
    PYW_EXIT_LIMIT,         /* a resource limit killed it (CPU time, file size); see message */
    PYW_EXIT_PROTOCOL,      /* it broke the protocol; the client killed it */
    PYW_EXIT_START_FAILED,  /* it never sent a valid READY */
    PYW_EXIT_HUNG,          /* it stopped answering heartbeats (heartbeat_ms): killed */
} pyw_exit_reason_t;

typedef struct pyw_exit {
    pyw_exit_reason_t reason;
    int exit_code;       /* exit status if it exited, else -1 */
    int signal;          /* terminating signal if it was signalled, else 0 */
    const char *message; /* human-readable, e.g. "CPU time limit (2 s) exceeded (SIGXCPU)" */
} pyw_exit_t;

/* A durable step operation of a running cell (PROMISE frame; see pyw_proto.h PYW_PO_* and
 * ARCHITECTURE.md "Durable steps"). Answer with pyw_worker_promise_reply. */
typedef struct pyw_promise_req {
    int op;            /* PYW_PO_*: 1 open, 2 settle, 3 sleep, 4 await an external promise, 5
                        * preload, 6 start (answer NOTHING), 7 a failed attempt, 8 an
                        * attempt in its own session (data = the cell, num = CPU seconds) */
    const char *name;  /* the step's path below the execution ("1", "2.1"): [0-9.]{1,200};
                        * await: the user's promise id, [A-Za-z0-9._-]{1,128} */
    const char *label; /* start/settle/attempt: the task's name (may be empty) */
    uint32_t attempts; /* start: the attempt starting; settle/attempt: attempts made */
    uint64_t num;      /* settle: 1 resolved / 2 rejected; sleep: delay ms */
    const void *data;  /* start: the param (pickle); settle/attempt: {u32 n, param, value} */
    size_t len;
} pyw_promise_req_t;

/* Callbacks; any may be NULL. All run on the worker's loop. */
typedef struct pyw_callbacks {
    /* READY received: the worker accepts requests from now on (requests sent before are queued
     * in the socket and served in order, so waiting for this is optional). */
    void (*on_ready)(pyw_worker_t *w);
    /* An output chunk of a running cell. stream: 1 = stdout, 2 = stderr. Chunks arrive in the
     * order the worker wrote them (fd-level writes are flushed before the next sys.stdout write
     * and before the result). */
    void (*on_output)(pyw_worker_t *w, uint64_t exec_id, int stream, const char *data, size_t len);
    /* The cell called input() (or read sys.stdin); answer with pyw_worker_input_reply. */
    void (*on_input)(pyw_worker_t *w, uint64_t exec_id, const char *prompt, int password);
    /* The cell asked for a durable step operation; without this callback it is answered
     * FAILED ("no durable steps here"). */
    void (*on_promise)(pyw_worker_t *w, uint64_t exec_id, const pyw_promise_req_t *req);
    /* A cell finished (exactly once per pyw_worker_execute that returned 0). */
    void (*on_result)(pyw_worker_t *w, const pyw_result_t *r);
    /* Answer to pyw_worker_snapshot: rc 0 and the snapshot, or rc < 0 and error. */
    void (*on_snapshot)(pyw_worker_t *w, uint64_t req_id, int rc, const pyw_delta_t *snap,
                        const char *error);
    /* Answer to pyw_worker_apply. */
    void (*on_applied)(pyw_worker_t *w, const pyw_apply_result_t *r);
    /* Answer to pyw_worker_ping. */
    void (*on_pong)(pyw_worker_t *w, uint64_t req_id);
    /* The worker reported a protocol error about a frame we sent (ERROR frame). */
    void (*on_error)(pyw_worker_t *w, uint64_t id, int code, const char *message);
    /* The worker is gone (always called exactly once, after every pending result was delivered
     * with PYW_STATUS_DIED). The handle stays valid until pyw_worker_close. */
    void (*on_exit)(pyw_worker_t *w, const pyw_exit_t *e);
} pyw_callbacks_t;

typedef struct pyw_options {
    /* NULL: $CAPSULE_PYWORKER, else the build's bin/capsule-pyworker (which runs on
     * /usr/bin/python3.11 when capsule-pyworker-host.so is next to it, unless the environment has
     * CAPSULE_PYWORKER_HOST=0) */
    const char *worker_path;
    pyw_limits_t limits;
    uint32_t max_frame;        /* 0: PYW_DEFAULT_MAX_FRAME; else >= 1024 (CAP_EINVAL) */
    uint32_t cancel_grace_ms;  /* after cancel/timeout, kill the worker if no result (0: 1000) */
    uint32_t start_timeout_ms; /* kill if no READY within this (0: 10000) */
    const pyw_callbacks_t *cb; /* borrowed; must outlive the worker */
    void *data;                /* user pointer, see pyw_worker_data */
    /* 0: no automatic heartbeat. Else the client pings every heartbeat_ms (answered by the
     * worker's protocol thread, even while a cell runs) and kills a worker that has not
     * answered for 4 intervals (PYW_EXIT_HUNG: stopped, frozen, or its process wedged).
     * These pings use ids with the top bit set and are not reported to on_pong. */
    uint32_t heartbeat_ms;
} pyw_options_t;

/* ---- workers ---- */

/* Starts a cold worker (fork + exec). Returns 0 and *out, or -errno (e.g. -ENOENT when the
 * executable is missing, -ENOTSUP when a process limit cannot be enforced). on_ready follows. */
int pyw_worker_spawn(uv_loop_t *loop, const pyw_options_t *opt, pyw_worker_t **out);

/* Runs `source` as one cell. exec_id is the caller's id (echoed in every callback about it);
 * cell_id names the cell for the namespace module (NULL: the worker's counter). timeout_ms 0 =
 * none; it runs from when the cell starts (cells run in order: when the previous one ended); on
 * timeout the cell is interrupted (status TIMEOUT) and killed after the grace period.
 * Returns 0, CAP_ECLOSED if the worker is gone, CAP_ETOOBIG if the frame exceeds max_frame. */
int pyw_worker_execute(pyw_worker_t *w, uint64_t exec_id, const char *cell_id, const char *source,
                       size_t len, uint32_t timeout_ms);
/* Answers an input request: text (without newline), or eof != 0 for EOF (EOFError). */
int pyw_worker_input_reply(pyw_worker_t *w, uint64_t exec_id, const char *text, size_t len,
                           int eof);
/* Answers a step operation: state 0 pending, 1 resolved, 2 rejected, 3 failed (data = message);
 * attempts and num as recorded (sleep pending: num = ms that remain), data = the value. */
int pyw_worker_promise_reply(pyw_worker_t *w, uint64_t exec_id, int state, uint32_t attempts,
                             uint64_t num, const void *data, size_t len);
/* Interrupts the cell exec_id (queued or running). Its result is CANCELLED; if the worker does
 * not answer within cancel_grace_ms it is killed (PYW_EXIT_CANCEL_KILLED). */
int pyw_worker_cancel(pyw_worker_t *w, uint64_t exec_id);
/* Asks for a full namespace snapshot (on_snapshot). */
int pyw_worker_snapshot(pyw_worker_t *w, uint64_t req_id);
/* Applies a snapshot or delta blob (copied) into the namespace (on_applied). */
int pyw_worker_apply(pyw_worker_t *w, uint64_t req_id, const void *blob, size_t len);
/* Heartbeat: the worker's protocol thread answers even while a cell runs (on_pong). */
int pyw_worker_ping(pyw_worker_t *w, uint64_t req_id);
/* Asks for a clean exit after the queued cells; on_exit follows (PYW_EXIT_CLEAN). */
int pyw_worker_shutdown(pyw_worker_t *w);
/* SIGKILLs the worker (and, with a cgroup, every process it started); on_exit follows. */
int pyw_worker_kill(pyw_worker_t *w);
/* Testing aid: writes raw bytes to the worker's socket as they are (malformed-frame tests). */
int pyw_worker_send_raw(pyw_worker_t *w, const void *data, size_t len);

/* Kills the worker if still alive and releases everything; callbacks stop at once (on_exit is
 * not called). The memory is freed once the loop has run the handles' close callbacks.
 * pyw_worker_close(NULL) is a no-op. */
void pyw_worker_close(pyw_worker_t *w);
/* A worker that pyw_worker_close had to kill is waited for, its cgroup removed and its process
 * group swept on a short-lived thread, not on the caller's: this waits until every such reap
 * is done (before a process that owns workers checks its children or exits). Any thread.
 * pyw_zygote_close and pyw_sync_close call it. */
void pyw_reap_wait(void);

int pyw_worker_pid(const pyw_worker_t *w);
/* 1 when the worker is known gone or has exited without the loop having handled it yet (its
 * pidfd is readable; one poll(2) with no wait), else 0. A worker that is only being killed (a
 * signal on its way) still counts alive. For a caller about to hand out an idle worker. */
int pyw_worker_exited(const pyw_worker_t *w);
void *pyw_worker_data(const pyw_worker_t *w);
/* The worker's Python version from READY ("3.11.2"), or NULL before READY. Borrowed. */
const char *pyw_worker_python_version(const pyw_worker_t *w);
/* 1 once READY was received and until the worker exits. */
int pyw_worker_is_ready(const pyw_worker_t *w);

/* CPU affinity of a ready worker. cpu >= 0: the worker's own threads (protocol, output reader,
 * and the main thread that runs cells) run only on that CPU, so a request handed from a loop
 * on that CPU to the worker and back never wakes the other, idle, CPU (on a VM that wake-up costs
 * tens of microseconds each way). Threads a cell starts meanwhile inherit the pin. cpu = -1: every
 * thread the worker has now goes to the CPUs of the client process's main thread (where the
 * process is placed; a worker forked from a pinned thread inherited its pin until this). Repeating
 * the current setting costs nothing. Returns 0, CAP_EINVAL (cpu out of range, or not allowed by the
 * process's cpuset: the worker then stays unpinned), CAP_ECLOSED (not ready or exited), -errno. */
int pyw_worker_set_cpu(pyw_worker_t *w, int cpu);
/* The CPU the worker is pinned to, or -1. */
int pyw_worker_cpu(const pyw_worker_t *w);

/* ---- zygote (fork server) ---- */

typedef struct pyw_zygote_options {
    const char *worker_path;   /* as in pyw_options_t */
    const char *warmup;        /* Python code run in the zygote's __main__ before gc.freeze(), or
                                * NULL. Its names are inherited by every worker. */
    uint32_t start_timeout_ms; /* 0: 10000 */
} pyw_zygote_options_t;

/* Starts a zygote and waits (blocking, up to start_timeout_ms) for its READY. Sets
 * PR_SET_CHILD_SUBREAPER on the calling process (see the top of this file). Returns 0 and *out,
 * -errno, CAP_ETIMEDOUT, CAP_EWORKER (it died or the warm-up failed), CAP_EVERSION. Not tied to
 * a loop; use it from one thread at a time. */
int pyw_zygote_open(const pyw_zygote_options_t *opt, pyw_zygote_t **out);
/* Forks a new worker from the zygote; otherwise like pyw_worker_spawn (opt->worker_path is
 * ignored). Returns CAP_EWORKER if the zygote is gone. */
int pyw_zygote_spawn(pyw_zygote_t *z, uv_loop_t *loop, const pyw_options_t *opt,
                     pyw_worker_t **out);
/* Sends a FORK without waiting for its answer; *req (if not NULL) receives the request's id.
 * opt is copied shallowly (what it points to must outlive the worker, as for spawn). The answer
 * makes pyw_zygote_fd readable; collect it with pyw_zygote_collect. Returns 0, CAP_EWORKER (the
 * zygote is gone), or an error of the options (as pyw_worker_spawn). */
int pyw_zygote_request(pyw_zygote_t *z, const pyw_options_t *opt, uint64_t *req);
/* Collects one answered request, never blocking: 0 with *out (the worker, attached to loop as by
 * pyw_zygote_spawn) and *req; the request's error with *out NULL and *req (e.g. a failed fork);
 * -EAGAIN when no answer is there yet; CAP_EWORKER when the zygote is gone, once every request
 * has been collected (each failed with CAP_EWORKER). Call it until -EAGAIN when the fd is
 * readable, and after a pyw_zygote_spawn (which may read other requests' answers). */
int pyw_zygote_collect(pyw_zygote_t *z, uv_loop_t *loop, pyw_worker_t **out, uint64_t *req);
/* The zygote's control socket (to watch for readability), or -1 once it is known to be gone. */
int pyw_zygote_fd(const pyw_zygote_t *z);
/* Requests sent and not collected yet. */
size_t pyw_zygote_pending(const pyw_zygote_t *z);
int pyw_zygote_pid(const pyw_zygote_t *z);
/* The pid of the unused spare the zygote last named (SPARE, as read by pyw_zygote_collect): the
 * one pyw_zygote_close reaps should the zygote die holding it; 0 when none is known. */
int pyw_zygote_spare(const pyw_zygote_t *z);
/* Stops the zygote (its workers live on; those of requests not collected are killed and
 * reaped). pyw_zygote_close(NULL) is a no-op. */
void pyw_zygote_close(pyw_zygote_t *z);

/* ---- a blocking convenience layer (tests, tools): runs its own private loop ---- */

typedef struct pyw_sync pyw_sync_t;

/* What one blocking run collected. Owned by the caller: free with pyw_sync_run_free. */
typedef struct pyw_sync_run {
    pyw_status_t status;
    uint32_t cell_no;
    char *repr, *json, *etype, *emsg, *traceback, *delta_error; /* NULL when absent */
    int not_run;                                                /* pyw_result_t.not_run */
    /* The transcript of output and input events in arrival order: "[1]text" for stdout chunks,
     * "[2]text" for stderr chunks, "[in:prompt]" for input requests (one per chunk/request,
     * concatenated). Also the plain concatenations of each stream. */
    char *transcript, *out, *err;
    uint32_t n_chunks;
    /* The delta, if any: its blob and names, each list as "a,b,c" (sorted as received). */
    uint8_t *delta_blob;
    size_t delta_len;
    char *added, *changed, *mutated, *deleted, *unpicklable; /* unpicklable: "name:reason;..." */
    /* Set when the worker died during the run. */
    int died;
    pyw_exit_t exit;
    char *exit_message;
} pyw_sync_run_t;

/* Opens a worker on a private loop: cold when z is NULL, else forked from the zygote z. Waits for
 * READY. opt may be NULL (defaults); opt->cb is ignored (the sync layer uses its own). */
int pyw_sync_open(pyw_zygote_t *z, const pyw_options_t *opt, pyw_sync_t **out);
/* Runs one cell and waits for its result. inputs: replies for successive input requests (a NULL
 * entry or running out of entries = EOF). cancel_after_ms: if > 0, cancel the cell that long
 * after sending it. timeout_ms: the cell's timeout (0 none). Returns 0 and *out (even when the
 * cell failed or the worker died: see (*out)->status), or CAP_ECLOSED if the worker was gone
 * before the run. */
/* An inputs[] entry that leaves its input request unanswered (to test cancelling a waiting
 * input()). */
extern const char pyw_sync_hold[];
int pyw_sync_execute(pyw_sync_t *s, const char *source, const char *const *inputs, size_t n_inputs,
                     uint32_t cancel_after_ms, uint32_t timeout_ms, pyw_sync_run_t **out);
/* Snapshot into *out (blob and names as in a run). */
int pyw_sync_snapshot(pyw_sync_t *s, pyw_sync_run_t **out);
/* Applies a blob; *out holds restored/deleted as "added"/"deleted" and failures as
 * "unpicklable" ("name:reason;..."); status ERROR and emsg when rejected. */
int pyw_sync_apply(pyw_sync_t *s, const void *blob, size_t len, pyw_sync_run_t **out);
/* Round trip a ping; returns 0 or CAP_ECLOSED. */
int pyw_sync_ping(pyw_sync_t *s);
/* Runs the private loop until the worker exits or timeout_ms passes (for death tests). Returns 0
 * and fills *exit_out (message borrowed until the next call), or CAP_ETIMEDOUT. */
int pyw_sync_wait_exit(pyw_sync_t *s, uint32_t timeout_ms, pyw_exit_t *exit_out);
pyw_worker_t *pyw_sync_worker(pyw_sync_t *s);
/* Shuts the worker down cleanly (or kills it after 2 s) and frees everything. NULL: no-op. */
void pyw_sync_close(pyw_sync_t *s);
void pyw_sync_run_free(pyw_sync_run_t *r);

#ifdef __cplusplus
}
#endif
#endif /* PYWORKER_H */
