/*
 * engine.c - the capsule engine: the loop, sessions over pyworker workers, the warm pool, the
 * life of an execution with log-before-act, recovery on open, and the public API (capsule.h).
 *
 * Threads:
 *   - the LOOP thread (own or the caller's) owns every session, execution and worker; nothing
 *     else touches them. Public calls post a message (eng_msg_t) to a mutex-protected queue and
 *     write the engine's eventfd (watched by a uv_poll_t); the loop runs it.
 *   - promise operations are started ON the loop in their asynchronous form (prom_*_async): the
 *     loop never waits for a commit, and many sessions' records share one group commit.
 *   - the WAL writer thread calls their completions and the done callback of the engine's own
 *     records (ENG_REC_*); both only post a message to the loop.
 *
 * The life of an execution (log before act):
 *   1. submit: execution promise "capsule/x/<eid>" created (param: code, session, options); only
 *      when that is durable is the execution eligible to run.
 *   2. input(): input promise ".../in/<k>" created durably before the client is asked; if it is
 *      already resolved (a re-run after a crash) the recorded reply is given to the worker at once.
 *      A client's reply settles it durably before the worker gets it.
 *   3. result: ONE wal record ENG_REC_FINISH (key eid) carries the result, the bounded output and
 *      the namespace delta (when committed, with the session's next ordinal). Its apply writes
 *      eng.results and eng.deltas in the same transaction, which also settles the execution promise
 *      (one append: prom_promise_settle_async with the FINISH as an extra record). Only once it is
 *      durable is the client told. (Older logs may hold a FINISH without the settle: recovery
 *      settles it from eng.results.)
 *   A rolled-back execution (transaction policy) or a dead worker: the worker is replaced and the
 *   namespace restored from the recorded chain (checkpoint + deltas) BEFORE the FINISH record is
 *   written, so the result can report the names that failed to restore.
 *
 * Invariants:
 *   - per session at most one execution runs (s->cur); the queue is bounded (max_queue).
 *   - an execution runs only when its promise is durable; its result is told only when its FINISH
 *     record is durable; FINISH records of a session are appended in execution order and each
 *     after the previous one is durable, so a session's ordinals have no gaps.
 *   - an execution stays in the engine's map (and is attachable) until its FINISH is durable;
 *     from then on eng.results answers for it.
 */
#include <stdatomic.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>

#include "eng_int.h"
#include "promise.h"
#include "pyworker.h"

#define ENG_MAX_OWN_TIDS 4
#define NBUCKET          4096
#define PROM_FOREVER     ((int64_t)1 << 62)

typedef struct eng_msg eng_msg_t;
typedef void (*eng_msg_fn)(eng_t *e, eng_msg_t *m);
struct eng_msg {
    eng_msg_t *next;
    eng_msg_fn fn;
};

typedef struct session session_t;
typedef struct exec exec_t;

/* A worker and what it serves (the pyworker user pointer). */
typedef struct wref {
    eng_t *e;
    pyw_worker_t *w;
    session_t *s;      /* NULL while in the pool or detached */
    struct wref *next; /* pool list */
    int transit;       /* (pool_mu) popped by an opener's thread, not yet adopted by the loop */
    int died;          /* (pool_mu) its exit was handled while in transit */
    int dead_seen;     /* (pool_mu) an acquire found it dead in the pool: counted in pool_dead */
} wref_t;

typedef struct listener {
    eng_exec_cb_t cb;
    void *arg;
    int accepted; /* on_accepted was called (it waits for the execution to be durable) */
} listener_t;

enum { X_CREATING, X_QUEUED, X_RUNNING, X_FINISHING, X_DONE };

struct exec {
    exec_t *hnext; /* map chain */
    exec_t *qnext; /* session queue */
    int refs;
    char *eid;
    session_t *s;
    char *code;
    size_t len;
    eng_tx_t tx;
    uint32_t timeout_ms; /* 0: the session's */
    int st;
    int created;
    int cancel_req;
    int restarted;
    int retries;
    uint64_t wid;
    uint32_t in_k;    /* input requests so far */
    uint32_t in_wait; /* the input request the client must answer (0 none) */
    char *prompt;
    int password;
    int await_exit; /* result DIED: wait for the exit reason */
    listener_t *ls;
    size_t nls;
    char *out;
    size_t out_len, out_dropped;
    uint64_t t_sub, t_req, t_res; /* cap_now_ns(): submitted, request durable, worker's result */
    eng_result_t r;               /* filled at the result */
    uint8_t *delta;               /* kept while a restore precedes the FINISH (uncommitted: NULL) */
    size_t delta_len;
};

enum { S_CREATING, S_COLD, S_RESTORING, S_READY, S_CLOSING };

struct session {
    session_t *hnext;
    int refs;
    char *sid;
    eng_session_opts_t so;
    int st;
    wref_t *w;
    uint64_t last_ord;
    exec_t *qhead, *qtail;
    uint32_t qlen;
    exec_t *cur;
    uint32_t applies;           /* apply requests outstanding during a restore */
    char *rfailed;              /* names a restore lost, not told yet ("name:reason;...") */
    char *rall;                 /* during a restore: the names it could not bring back so far */
    char *gone;                 /* the names the live worker lacks since its restore could not
                                   bring them back (a later restore's loss is only what it had) */
    exec_t *finish_after;       /* execution whose FINISH waits for the restore */
    uint64_t last_used;         /* cap_now_ns() of the last finish or restore */
    struct waiter *snap_waiter; /* eng_checkpoint's caller (NULL for an automatic one) */
    int snapping;               /* a snapshot was asked for: nothing runs until it is back */
    uint64_t snap_ord;          /* the ordinal the snapshot follows */
    int busy;                   /* its worker runs a cell (counted in eng.nbusy) */
};

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    int rc;
    void *p;
    size_t n;
} waiter_t;

struct eng {
    eng_opts_t o;
    char *dir, *worker_path, *warmup;
    store_env_t *env;
    prom_store_t *ps;
    wal_log_t *wal;
    eng_tables_t tb;
    pyw_zygote_t *zy;
    pyw_callbacks_t pcb;

    uv_loop_t own_loop;
    uv_loop_t *loop;
    uv_thread_t thread;
    int own;
    int wake_fd;    /* eventfd: a post writes it, the loop's wake handle reads it and drains */
    uv_poll_t wake; /* watches wake_fd */
    pthread_mutex_t mu;
    eng_msg_t *mhead, *mtail;
    int draining;   /* (under mu) the loop is in drain(): a post needs no wake-up */
    int closing;    /* no more public commands */
    int dead;       /* loop gone: messages only release */
    int async_gone; /* (under mu) the wake handle is closing: post only queues */
    waiter_t *close_waiter;
    int open_handles; /* (loop) handles whose close callback is still due */

    uv_timer_t itimer;   /* idle release */
    uv_timer_t ptimer;   /* CPU placement: unpins a lone cell that runs long */
    uv_timer_t rtimer;   /* the pool's refill, out of the way of running executions */
    uint64_t refill_by;  /* cap_now_ns() by which the refill runs even if executions are running */
    uint64_t busy_ns;    /* (loop) cap_now_ns() when drain() last ran a command or completion */
    uv_poll_t *zpoll;    /* the zygote's control socket: answers to refill requests */
    struct wref *refill; /* the worker a refill request in flight will be (one at a time) */

    /* loop-side */
    session_t *smap[NBUCKET];
    exec_t *xmap[NBUCKET];
    _Atomic uint32_t nsessions; /* sessions open or being opened (reserved: sess_reserve) */
    wref_t *pool;               /* (pool_mu) idle workers: popped by the loop or by an opener */
    _Atomic uint32_t npool;
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv; /* ntransit reached 0 after pool_closed */
    int pool_closed;        /* (pool_mu) shutting down: no more pops by openers */
    int ntransit;           /* (pool_mu) openers between their pop and their post */
    uint64_t wid_next;
    uint64_t ord_next;
    uint64_t gen_ctr;
    uint32_t nbusy;   /* sessions whose worker runs a cell */
    session_t *pin_s; /* the session whose running worker is pinned to the loop's CPU */
    /* the engine's own threads that a lone execution pins with its worker: the wal's (started
     * by prom_store_open) and, with its own loop, the loop thread; their mask at open */
    pid_t eng_tids[ENG_MAX_OWN_TIDS];
    int neng_tids, eng_cpu; /* eng_cpu: where they are pinned, -1 none */
    int io_cpu;             /* the data disk's interrupt CPU (eng__io_cpu), -1 none */
    int pin_loop;           /* a caller's loop thread is pinned like the own one (opts) */
    uint64_t crowd_ns;      /* cap_now_ns() when two executions were last in flight at once */
    /* a zygote restart in progress (zy_restart_start): its thread and, once joined, its result;
     * zr_active is the loop's */
    pthread_t zr_thread;
    int zr_active, zr_rc;
    pyw_zygote_t *zr_new;
    unsigned long mask0[16]; /* CPU mask at eng_open (1024 CPUs) */
    size_t mask0_len;

    /* stats (under mu) */
    eng_stats_t stats;

    /* durable steps: workers waiting on external promises (loop thread), and whether the settle
     * observer may post (set once the wake handle exists) */
    struct pwait *pwaits;
    int observe;
    eng_step_t *marks; /* running marks held (eng__mark_*), written by mtimer when due */
    uv_timer_t mtimer;
};

/* ---------- small helpers ---------- */
static char *xstrdup(const char *s)
{
    return s ? cap_strdup(s) : NULL;
}

static void waiter_init(waiter_t *w)
{
    memset(w, 0, sizeof(*w));
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
}

static void waiter_wake(waiter_t *w, int rc)
{
    pthread_mutex_lock(&w->mu);
    w->rc = rc;
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int waiter_wait(waiter_t *w)
{
    pthread_mutex_lock(&w->mu);
    while (!w->done)
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    return w->rc;
}

static uint32_t bucket(const char *k)
{
    return (uint32_t)(cap_hash64(k, strlen(k)) % NBUCKET);
}

static session_t *smap_get(eng_t *e, const char *sid)
{
    for (session_t *s = e->smap[bucket(sid)]; s; s = s->hnext)
        if (strcmp(s->sid, sid) == 0)
            return s;
    return NULL;
}

static void smap_del(eng_t *e, session_t *s)
{
    session_t **pp = &e->smap[bucket(s->sid)];
    while (*pp && *pp != s)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = s->hnext;
}

static exec_t *xmap_get(eng_t *e, const char *eid)
{
    for (exec_t *x = e->xmap[bucket(eid)]; x; x = x->hnext)
        if (strcmp(x->eid, eid) == 0)
            return x;
    return NULL;
}

static void xmap_put(eng_t *e, exec_t *x)
{
    uint32_t b = bucket(x->eid);
    x->hnext = e->xmap[b];
    e->xmap[b] = x;
}

static void xmap_del(eng_t *e, exec_t *x)
{
    exec_t **pp = &e->xmap[bucket(x->eid)];
    while (*pp && *pp != x)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = x->hnext;
}

static void session_unref(session_t *s)
{
    if (!s || --s->refs > 0)
        return;
    cap_free(s->sid);
    cap_free(s->rfailed);
    cap_free(s->rall);
    cap_free(s->gone);
    cap_free(s);
}

static void exec_unref(exec_t *x)
{
    if (!x || --x->refs > 0)
        return;
    session_unref(x->s);
    cap_free(x->eid);
    cap_free(x->code);
    cap_free(x->prompt);
    cap_free(x->ls);
    cap_free(x->out);
    cap_free(x->delta);
    eng__result_clear(&x->r);
    cap_free(x);
}

static void stats_add(eng_t *e, eng_stats_t d)
{
    pthread_mutex_lock(&e->mu);
    e->stats.sessions += d.sessions;
    e->stats.restored += d.restored;
    e->stats.running += d.running;
    e->stats.queued += d.queued;
    e->stats.executions += d.executions;
    e->stats.recovered_execs += d.recovered_execs;
    e->stats.worker_deaths += d.worker_deaths;
    e->stats.timed += d.timed;
    e->stats.t_request_ns += d.t_request_ns;
    e->stats.t_run_ns += d.t_run_ns;
    e->stats.t_finish_ns += d.t_finish_ns;
    e->stats.pinned += d.pinned;
    e->stats.unpinned += d.unpinned;
    e->stats.pool_dead += d.pool_dead;
    e->stats.pool_idle = e->npool;
    pthread_mutex_unlock(&e->mu);
}

/* ---------- posting to the loop ---------- */
/* Queues m for the loop. While the loop is draining the queue (e->draining, read under the same
 * mutex that drain() takes to find the queue empty before it stops), the message is run by that
 * drain: no wake-up (an eventfd write, then an extra loop turn) is needed. This is the common case
 * of a callback on the loop submitting the next execution, and of the wal writer's completions
 * arriving while the loop works.
 * The wake-up is a plain write to the engine's eventfd, not uv_async_send: libuv's async handle
 * makes the woken loop spin (997 PAUSEs, then sched_yield) until the sender has left
 * uv_async_send, and a sender on the loop's own CPU (the wal writer or a caller, pinned with it
 * by ENG_AFFINITY_AUTO) is preempted by the loop it wakes inside that window: measured 40-45 us
 * per wake-up, twice per execution. */
static void post(eng_t *e, eng_msg_t *m)
{
    m->next = NULL;
    pthread_mutex_lock(&e->mu);
    if (e->mtail)
        e->mtail->next = m;
    else
        e->mhead = m;
    e->mtail = m;
    int wake = !e->async_gone && !e->draining;
    pthread_mutex_unlock(&e->mu);
    if (wake) {
        uint64_t one = 1;
        while (write(e->wake_fd, &one, sizeof one) < 0 && errno == EINTR)
            ;
    }
}

static void drain(eng_t *e)
{
    for (;;) {
        pthread_mutex_lock(&e->mu);
        eng_msg_t *m = e->mhead;
        e->mhead = e->mtail = NULL;
        e->draining = m != NULL;
        pthread_mutex_unlock(&e->mu);
        if (!m)
            return;
        e->busy_ns = cap_now_ns();
        while (m) {
            eng_msg_t *n = m->next;
            m->fn(e, m);
            m = n;
        }
    }
}

/* The loop: the eventfd is read (reset) BEFORE the queue is drained, so a post that finds the
 * loop not draining after this read wakes it again; nothing is left in the queue unseen. */
static void on_wake(uv_poll_t *h, int status, int events)
{
    eng_t *e = h->data;
    uint64_t n;
    (void)status;
    (void)events;
    while (read(e->wake_fd, &n, sizeof n) < 0 && errno == EINTR)
        ;
    drain(e);
}

/* ---------- promise operations without waiting: prom_*_async from the loop ---------- */
/* A job is one asynchronous promise operation started on the loop. Its completion (wal writer
 * thread, or the loop itself when nothing had to be waited for) only posts j->m back to the loop,
 * where the job's done function runs. */
typedef struct job job_t;
struct job {
    eng_msg_t m; /* the completion, run on the loop */
    eng_t *e;
    int op; /* J_CREATE, J_SETTLE */
    char *id;
    prom_kv_t hdr[8];
    size_t nhdr;
    prom_kv_t tags[3];
    size_t ntags;
    void *data;
    size_t len;
    prom_state_t state;
    int rc;
    prom_result_t res;
    exec_t *x;
    session_t *s;
    waiter_t *w;
    uint32_t k;
    int aux;
    eng_step_t *step; /* a durable step operation (eng_steps.c) instead of op */
};
enum { J_CREATE, J_SETTLE, J_GET /* a step: the op is j->step's */ };

static job_t *job_new(int op, const char *id, eng_msg_fn done)
{
    job_t *j = cap_calloc(1, sizeof(*j));
    j->op = op;
    j->id = cap_strdup(id);
    j->m.fn = done;
    return j;
}

static void job_hdr(job_t *j, const char *k, const char *v)
{
    j->hdr[j->nhdr].key = cap_strdup(k);
    j->hdr[j->nhdr].value = cap_strdup(v);
    j->nhdr++;
}

static void job_tag(job_t *j, const char *k, const char *v)
{
    j->tags[j->ntags].key = cap_strdup(k);
    j->tags[j->ntags].value = cap_strdup(v);
    j->ntags++;
}

static void job_free(job_t *j)
{
    for (size_t i = 0; i < j->nhdr; i++) {
        cap_free(j->hdr[i].key);
        cap_free(j->hdr[i].value);
    }
    for (size_t i = 0; i < j->ntags; i++) {
        cap_free(j->tags[i].key);
        cap_free(j->tags[i].value);
    }
    prom_result_clear(&j->res);
    eng__step_free(j->step);
    exec_unref(j->x);
    session_unref(j->s);
    cap_free(j->id);
    cap_free(j->data);
    cap_free(j);
}

/* prom_done_fn: the job's result is durable (wal writer thread or the loop): hand it to the loop.
 */
/* The engine's code for an operation that returned rc and filled res. */
static int job_res_rc(const job_t *j, int rc)
{
    if (!rc && j->res.status != PROM_S_OK)
        rc = j->res.status == PROM_S_NOTFOUND ? CAP_ENOTFOUND : CAP_ECONFLICT;
    return rc;
}

static void job_durable(void *arg, int rc)
{
    job_t *j = arg;
    j->rc = job_res_rc(j, rc);
    post(j->e, &j->m);
}

/* Loop thread: starts the operation; j's done function runs on the loop once it is durable. */
static void job_submit(eng_t *e, job_t *j)
{
    prom_value_t v = {j->hdr, j->nhdr, j->data, j->len};
    int rc;
    j->e = e;
    if (j->op == J_CREATE) {
        prom_create_t c = {j->id, PROM_FOREVER, &v, j->tags, j->ntags};
        rc = prom_promise_create_async(e->ps, &c, &j->res, job_durable, j);
    } else {
        prom_settle_t st = {j->id, j->state, &v};
        rc = prom_promise_settle_async(e->ps, &st, NULL, 0, &j->res, job_durable, j);
    }
    if (rc) {
        j->rc = rc;
        post(e, &j->m);
    }
}

/* A lone execution's records (nosync: nothing else running or queued) are committed on the loop
 * itself: the loop would only wait for the writer anyway, and the writer's wake-up and the
 * completion's way back are two thread hand-offs per commit (wal_log_hold / wal_log_release; the
 * done callback then posts its job while the loop runs). With more in flight the writer commits
 * as before, in groups and beside the loop. */
static int log_hold(eng_t *e)
{
    if (!e->o.nosync || e->stats.running + e->stats.queued > 1)
        return 0;
    wal_log_hold(e->wal);
    return 1;
}

static void log_release(eng_t *e, int held)
{
    if (held)
        (void)wal_log_release(e->wal, 1);
}

static char *exec_pid(const char *eid)
{
    size_t n = strlen(eid) + 16;
    char *p = cap_malloc(n);
    snprintf(p, n, "capsule/x/%s", eid);
    return p;
}

/* ---------- workers and the pool ---------- */
static void eng_threads_pin(eng_t *e, int cpu);

static void zy_collect(eng_t *e);
static void on_zpoll(uv_poll_t *p, int status, int events);

static void on_zpoll_closed(uv_handle_t *h)
{
    cap_free(h);
}

/* Watches the current zygote's control socket (after a start or a replacement). */
static void zy_watch(eng_t *e)
{
    int fd = pyw_zygote_fd(e->zy);
    if (fd < 0)
        return;
    e->zpoll = cap_calloc(1, sizeof(*e->zpoll));
    e->zpoll->data = e;
    if (uv_poll_init(e->loop, e->zpoll, fd) == 0) {
        if (uv_poll_start(e->zpoll, UV_READABLE | UV_DISCONNECT, on_zpoll) == 0)
            return;
        uv_close((uv_handle_t *)e->zpoll, on_zpoll_closed);
    } else {
        cap_free(e->zpoll);
    }
    cap_log(CAP_LOG_WARN, "engine", "cannot watch the zygote's socket: refills block the loop");
    e->zpoll = NULL;
}

/* Stops watching (before the socket closes); cb frees the handle. */
static void zy_unwatch(eng_t *e, uv_close_cb cb)
{
    if (!e->zpoll)
        return;
    uv_close((uv_handle_t *)e->zpoll, cb);
    e->zpoll = NULL;
}

/*
 * The zygote is gone: a new one starts on a thread of its own (a start takes tens of ms, the
 * warm-up code's time included, and the loop goes on serving the sessions that have workers
 * meanwhile); its completion is posted to the loop, which adopts it (zy_adopt). Whoever needs a
 * worker before that (a session's restore with an empty pool, a blocking spawn) waits for the
 * rest of the start in zy_restart. The thread takes the process's CPU mask from eng_open first,
 * so neither the new zygote nor its workers inherit a lone execution's pin from the loop.
 */
static void zy_restart_done(eng_t *e, eng_msg_t *m);

static void *zy_restart_main(void *arg)
{
    eng_t *e = arg;
    if (e->mask0_len)
        (void)syscall(SYS_sched_setaffinity, 0, e->mask0_len, e->mask0);
    pyw_zygote_options_t zo = {0};
    zo.worker_path = e->worker_path;
    zo.warmup = e->warmup;
    e->zr_new = NULL;
    e->zr_rc = pyw_zygote_open(&zo, &e->zr_new);
    eng_msg_t *m = cap_calloc(1, sizeof(*m));
    m->fn = zy_restart_done;
    post(e, m);
    return NULL;
}

/* Starts the replacement (once). 0, or an error when no thread could be started. */
static int zy_restart_start(eng_t *e)
{
    if (e->zr_active)
        return 0;
    cap_log(CAP_LOG_WARN, "engine", "the zygote (pid %d) is gone: starting a new one",
            pyw_zygote_pid(e->zy));
    int rc = pthread_create(&e->zr_thread, NULL, zy_restart_main, e);
    if (rc) {
        cap_log(CAP_LOG_ERROR, "engine", "cannot start the zygote restart: %s", strerror(rc));
        return -rc;
    }
    e->zr_active = 1;
    pthread_mutex_lock(&e->mu);
    e->stats.zygote_restarting = 1;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* Waits for the replacement and puts it in place of the dead zygote. 0 or its start's error. */
static int zy_adopt(eng_t *e)
{
    if (!e->zr_active)
        return CAP_EWORKER;
    pthread_join(e->zr_thread, NULL);
    e->zr_active = 0;
    pthread_mutex_lock(&e->mu);
    e->stats.zygote_restarting = 0;
    pthread_mutex_unlock(&e->mu);
    if (e->zr_rc) {
        cap_log(CAP_LOG_ERROR, "engine", "zygote restart failed: %s", cap_strerror(e->zr_rc));
        return e->zr_rc;
    }
    if (e->closing) { /* shutdown came first: nothing will use it */
        pyw_zygote_close(e->zr_new);
        e->zr_new = NULL;
        return CAP_ECLOSED;
    }
    zy_unwatch(e, on_zpoll_closed);
    pyw_zygote_close(e->zy); /* also drops the refill request in flight */
    cap_free(e->refill);
    e->refill = NULL;
    pthread_mutex_lock(&e->mu);
    e->zy = e->zr_new;
    e->stats.zygote_restarts++;
    pthread_mutex_unlock(&e->mu);
    e->zr_new = NULL;
    zy_watch(e);
    return 0;
}

static void refill_schedule(eng_t *e);

/* The restart thread is done (run on the loop; nothing to do if a waiter adopted it already). */
static void zy_restart_done(eng_t *e, eng_msg_t *m)
{
    cap_free(m);
    if (e->zr_active && zy_adopt(e) == 0)
        refill_schedule(e);
}

/* A worker is needed now and the zygote is gone: start its replacement if that has not begun,
 * and wait for it. 0 or an error. */
static int zy_restart(eng_t *e)
{
    int rc = zy_restart_start(e);
    return rc ? rc : zy_adopt(e);
}

/* A worker now, blocking the loop until the zygote answers (a session with its own limits, or an
 * empty pool). */
static int worker_spawn(eng_t *e, session_t *s, wref_t **out)
{
    wref_t *r = cap_calloc(1, sizeof(*r));
    pyw_options_t po = {0};
    po.worker_path = e->worker_path;
    po.cb = &e->pcb;
    po.data = r;
    if (s) {
        po.limits.mem_bytes = s->so.mem_bytes;
        po.limits.cpu_seconds = s->so.cpu_seconds;
    }
    r->e = e;
    int rc = pyw_zygote_spawn(e->zy, e->loop, &po, &r->w);
    if (rc == CAP_EWORKER && !e->closing && zy_restart(e) == 0)
        rc = pyw_zygote_spawn(e->zy, e->loop, &po, &r->w);
    /* the refill's answer may have been read meanwhile: its socket will not tell again */
    zy_collect(e);
    if (rc) {
        cap_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

static void worker_drop(wref_t *r)
{
    if (!r)
        return;
    pyw_worker_close(r->w);
    cap_free(r);
}

/* Called with pool_mu held. */
static void pool_remove_locked(eng_t *e, wref_t *r)
{
    wref_t **pp = &e->pool;
    while (*pp && *pp != r)
        pp = &(*pp)->next;
    if (*pp) {
        *pp = r->next;
        e->npool--;
    }
}

/* Called with pool_mu held. Unlinks and returns the first live idle worker, or NULL. A worker
 * that died idle (exited, its exit not handled yet) is never handed out: it stays in the pool
 * for the loop's exit handler to drop, and counts once in *dead (wref_t.dead_seen), however
 * many acquires pass it meanwhile. Any thread. */
static wref_t *pool_pop_live_locked(eng_t *e, int *dead)
{
    for (wref_t **pp = &e->pool; *pp; pp = &(*pp)->next) {
        wref_t *r = *pp;
        if (pyw_worker_exited(r->w)) {
            if (!r->dead_seen) {
                r->dead_seen = 1;
                (*dead)++;
            }
            continue;
        }
        *pp = r->next;
        r->next = NULL;
        e->npool--;
        return r;
    }
    return NULL;
}

static void pool_add(eng_t *e, wref_t *r)
{
    pthread_mutex_lock(&e->pool_mu);
    r->next = e->pool;
    e->pool = r;
    e->npool++;
    pthread_mutex_unlock(&e->pool_mu);
    stats_add(e, (eng_stats_t){0});
}

/* The refill, one worker at a time and never blocking the loop: a FORK request is sent to the
 * zygote (pool_request) and the worker is adopted when the zygote's answer makes its socket
 * readable (zy_collect), which schedules the next request. A request waits until the loop has
 * been quiet for REFILL_QUIET_MS (no execution running, no command or completion handled: the
 * caller that just popped a worker has often not even been scheduled yet, and its first
 * execution follows), checked every REFILL_RECHECK_MS, for at most REFILL_MAX_DEFER_MS (busy
 * sessions never leave a gap): the handed-out worker's start and the zygote's next fork then
 * compete less for the CPU with what a caller waits for. Below half the pool it does not wait. */
#define REFILL_RECHECK_MS   1
#define REFILL_QUIET_MS     5
#define REFILL_MAX_DEFER_MS 50
static void on_rtimer(uv_timer_t *t);

static void refill_schedule(eng_t *e)
{
    if (e->closing || e->refill || e->zr_active || e->npool >= e->o.pool_idle ||
        uv_is_active((uv_handle_t *)&e->rtimer))
        return;
    e->refill_by = cap_now_ns() + (uint64_t)REFILL_MAX_DEFER_MS * 1000000u;
    uv_timer_start(&e->rtimer, on_rtimer, REFILL_RECHECK_MS, 0);
}

/* Sends one refill request (without a watched zygote socket: spawns, blocking). */
static void pool_request(eng_t *e)
{
    if (e->closing || e->refill || e->zr_active || e->npool >= e->o.pool_idle)
        return; /* (a restart in progress schedules the refill when its zygote is adopted) */
    if (pyw_zygote_fd(e->zy) < 0 && zy_restart(e))
        return; /* tried again at the next acquire or pool worker's death */
    wref_t *r;
    int rc;
    if (!e->zpoll) {
        if ((rc = worker_spawn(e, NULL, &r)) == 0)
            pool_add(e, r);
        else
            cap_log(CAP_LOG_WARN, "engine", "pool: spawn failed: %s", cap_strerror(rc));
        refill_schedule(e);
        return;
    }
    r = cap_calloc(1, sizeof(*r));
    r->e = e;
    pyw_options_t po = {0};
    po.worker_path = e->worker_path;
    po.cb = &e->pcb;
    po.data = r;
    rc = pyw_zygote_request(e->zy, &po, NULL);
    if (rc == CAP_EWORKER && zy_restart(e) == 0)
        rc = pyw_zygote_request(e->zy, &po, NULL);
    if (rc) {
        cap_log(CAP_LOG_WARN, "engine", "pool: fork request failed: %s", cap_strerror(rc));
        cap_free(r);
        return;
    }
    e->refill = r;
}

/* Adopts what the zygote answered: the refill's worker into the pool (or notes its failure). A
 * zygote found gone is replaced, and the refill goes on. */
static void zy_collect(eng_t *e)
{
    int gone = 0;
    for (;;) {
        pyw_worker_t *w = NULL;
        int rc = pyw_zygote_collect(e->zy, e->loop, &w, NULL);
        if (rc == -EAGAIN)
            break;
        if (rc == 0) {
            wref_t *r = pyw_worker_data(w);
            r->w = w;
            if (r == e->refill)
                e->refill = NULL;
            pool_add(e, r);
            continue;
        }
        /* the refill's request failed (the only one collected here), or the zygote is gone */
        cap_free(e->refill);
        e->refill = NULL;
        if (pyw_zygote_fd(e->zy) < 0 && pyw_zygote_pending(e->zy) == 0) {
            gone = 1;
            break;
        }
        if (rc != CAP_EWORKER)
            cap_log(CAP_LOG_WARN, "engine", "pool: fork failed: %s", cap_strerror(rc));
    }
    if (gone) {
        zy_unwatch(e, on_zpoll_closed); /* its socket stays readable (EOF) */
        if (!e->closing)
            (void)zy_restart_start(e); /* the refill goes on when it is adopted */
    }
    refill_schedule(e);
}

static void on_zpoll(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    zy_collect(p->data);
}

static void on_rtimer(uv_timer_t *t)
{
    eng_t *e = t->data;
    if (e->closing)
        return;
    uint64_t now = cap_now_ns();
    pthread_mutex_lock(&e->mu);
    /* below half the pool (a burst of acquires) it goes at once: the next acquire would
     * otherwise find the pool empty and spawn, blocking the loop */
    int busy =
        e->npool * 2 >= e->o.pool_idle &&
        (e->stats.running || e->mhead || now - e->busy_ns < (uint64_t)REFILL_QUIET_MS * 1000000u);
    pthread_mutex_unlock(&e->mu);
    if (busy && now < e->refill_by) {
        uv_timer_start(t, on_rtimer, REFILL_RECHECK_MS, 0);
        return;
    }
    pool_request(e);
}

/* A worker for session s: a pooled one (a pop) unless s has its own limits. */
static int worker_acquire(eng_t *e, session_t *s, wref_t **out)
{
    int rc = 0;
    wref_t *r = NULL;
    if (!s->so.mem_bytes && !s->so.cpu_seconds) {
        int dead = 0;
        pthread_mutex_lock(&e->pool_mu);
        r = pool_pop_live_locked(e, &dead);
        pthread_mutex_unlock(&e->pool_mu);
        if (dead)
            stats_add(e, (eng_stats_t){.pool_dead = (uint64_t)dead});
    }
    if (r)
        *out = r;
    else
        rc = worker_spawn(e, s, out);
    if (!rc)
        (*out)->s = s;
    /* refill in the background, after what is being handled now (the caller is told first) */
    refill_schedule(e);
    return rc;
}

/* ---------- executions ---------- */
static void exec_notify_done(eng_t *e, exec_t *x, const eng_result_t *r)
{
    (void)e;
    for (size_t i = 0; i < x->nls; i++)
        if (x->ls[i].cb.on_done)
            x->ls[i].cb.on_done(x->ls[i].arg, r);
    x->nls = 0;
}

/* Refuses a request that never became an execution. */
static void refuse(const eng_exec_cb_t *cb, void *arg, const char *eid, const char *sid, int err)
{
    eng_result_t r = {0};
    r.eid = (char *)eid;
    r.sid = (char *)sid;
    r.status = ENG_ST_REFUSED;
    r.err = err;
    r.emsg = (char *)cap_strerror(err);
    if (cb->on_done)
        cb->on_done(arg, &r);
}

static void session_pump(eng_t *e, session_t *s);
static int session_snapshot(session_t *s, waiter_t *w);
static void session_restore(eng_t *e, session_t *s);

static void output_add(eng_t *e, exec_t *x, const char *d, size_t n)
{
    size_t room = e->o.max_output > x->out_len ? e->o.max_output - x->out_len : 0;
    size_t take = n < room ? n : room;
    if (take) {
        x->out = cap_realloc(x->out, x->out_len + take + 1);
        memcpy(x->out + x->out_len, d, take);
        x->out_len += take;
        x->out[x->out_len] = 0;
    }
    x->out_dropped += n - take;
}

typedef struct finish_msg {
    eng_msg_t m;
    eng_t *e;
    exec_t *x;
    int status;
    prom_result_t res; /* the settle of the execution promise */
} finish_msg_t;

static void finish_done(eng_t *e, eng_msg_t *m);

/* prom_done_fn of the FINISH + settle append (wal writer thread, or the loop). */
static void finish_durable(void *arg, int status)
{
    finish_msg_t *f = arg;
    f->status = status;
    post(f->e, &f->m);
}

/* Appends the FINISH record of x (its result x->r, output, and delta when committed). */
static void finish_append(eng_t *e, exec_t *x)
{
    session_t *s = x->s;
    eng_result_t *r = &x->r;
    x->st = X_FINISHING;
    cap_free(r->eid);
    r->eid = cap_strdup(x->eid);
    cap_free(r->sid);
    r->sid = cap_strdup(s->sid);
    r->restarted = x->restarted;
    if (x->out_dropped) {
        char mk[96];
        int n = snprintf(mk, sizeof(mk), "\n[capsule: output truncated, %zu bytes dropped]\n",
                         x->out_dropped);
        x->out = cap_realloc(x->out, x->out_len + (size_t)n + 1);
        memcpy(x->out + x->out_len, mk, (size_t)n + 1);
        x->out_len += (size_t)n;
        r->truncated = 1;
    }
    cap_free(r->output);
    r->output = x->out ? cap_memdup(x->out, x->out_len + 1) : NULL;
    r->output_len = x->out_len;
    if (r->committed)
        r->ordinal = ++s->last_ord;
    if (s->rfailed && r->status != ENG_ST_REFUSED) {
        cap_free(r->restore_failed);
        r->restore_failed = s->rfailed;
        s->rfailed = NULL;
    }
    uint8_t *enc;
    size_t enclen;
    eng__result_encode(r, &enc, &enclen);
    wal_field_t f[4] = {
        {ENG_F_SID, 0, s->sid, strlen(s->sid)},
        {ENG_F_ORDINAL, r->committed ? r->ordinal : 0, NULL, 0},
        {ENG_F_RESULT, 0, enc, enclen},
        {ENG_F_DELTA, 0, x->delta, r->committed ? x->delta_len : 0},
    };
    wal_rec_t rec = {ENG_REC_FINISH, x->eid, strlen(x->eid), f, 4};
    finish_msg_t *fm = cap_calloc(1, sizeof(*fm));
    fm->m.fn = finish_done;
    fm->e = e;
    fm->x = x;
    x->refs++;
    /* the FINISH and the settle of the execution promise: one append, one commit */
    char *pid = exec_pid(x->eid);
    char st[16];
    snprintf(st, sizeof(st), "%d", (int)r->status);
    prom_kv_t hdr = {"capsule:status", st};
    prom_value_t v = {&hdr, 1, r->repr, r->repr ? strlen(r->repr) : 0};
    prom_settle_t ps = {pid,
                        r->status == ENG_ST_OK ? PROM_RESOLVED
                        : r->status == ENG_ST_CANCELLED || r->status == ENG_ST_REFUSED
                            ? PROM_REJECTED_CANCELED
                            : PROM_REJECTED,
                        &v};
    int held = log_hold(e);
    int rc = prom_promise_settle_async(e->ps, &ps, &rec, 1, &fm->res, finish_durable, fm);
    cap_free(pid);
    cap_free(enc);
    cap_free(x->delta);
    x->delta = NULL;
    if (rc) {
        /* the log is closed (engine closing): the execution stays pending and re-runs later */
        cap_log(CAP_LOG_WARN, "engine", "FINISH of %s not appended: %s", x->eid, cap_strerror(rc));
        fm->status = rc;
        finish_done(e, &fm->m);
    }
    log_release(e, held);
}

static void finish_done(eng_t *e, eng_msg_t *m)
{
    finish_msg_t *f = (finish_msg_t *)m;
    exec_t *x = f->x;
    session_t *s = x->s;
    prom_result_clear(&f->res);
    if (e->dead || f->status) {
        cap_free(f);
        exec_unref(x);
        return;
    }
    x->st = X_DONE;
    xmap_del(e, x);
    eng_stats_t d = {.executions = 1, .running = s->cur == x ? (uint32_t)-1 : 0};
    if (x->t_sub && x->t_req >= x->t_sub && x->t_res >= x->t_req) {
        d.timed = 1;
        d.t_request_ns = x->r.t_request_ns = x->t_req - x->t_sub;
        d.t_run_ns = x->r.t_run_ns = x->t_res - x->t_req;
        d.t_finish_ns = x->r.t_finish_ns = cap_now_ns() - x->t_res;
    }
    exec_notify_done(e, x, &x->r);
    stats_add(e, d);
    if (s->cur == x) {
        s->cur = NULL;
        exec_unref(x); /* the session's reference */
    }
    s->last_used = cap_now_ns();
    /* an automatic checkpoint every checkpoint_every committed executions */
    if (e->o.checkpoint_every && x->r.committed && x->r.ordinal % e->o.checkpoint_every == 0 &&
        s->st == S_READY && !s->cur && !s->snapping)
        session_snapshot(s, NULL);
    cap_free(f);
    exec_unref(x); /* the map's reference */
    exec_unref(x); /* the append's reference */
    session_pump(e, s);
}

/* Finishes an execution that did not run (cancelled in the queue, session closed). */
static void finish_unrun(eng_t *e, exec_t *x, eng_status_t st, int err)
{
    x->r.status = st;
    x->r.err = err;
    cap_free(x->r.emsg);
    x->r.emsg = cap_strdup(cap_strerror(err));
    finish_append(e, x);
}

static void queue_remove(session_t *s, exec_t *x)
{
    exec_t **pp = &s->qhead, *prev = NULL;
    while (*pp && *pp != x) {
        prev = *pp;
        pp = &(*pp)->qnext;
    }
    if (!*pp)
        return;
    *pp = x->qnext;
    if (s->qtail == x)
        s->qtail = prev;
    x->qnext = NULL;
    s->qlen--;
}

/* on_accepted for every listener still waiting for it (the execution is durable now). */
static void exec_notify_accepted(exec_t *x)
{
    for (size_t i = 0; i < x->nls; i++) {
        if (x->ls[i].accepted)
            continue;
        x->ls[i].accepted = 1;
        if (x->ls[i].cb.on_accepted)
            x->ls[i].cb.on_accepted(x->ls[i].arg, x->eid);
    }
}

static void exec_create_done(eng_t *e, eng_msg_t *m)
{
    job_t *j = (job_t *)m;
    exec_t *x = j->x;
    session_t *s = x->s;
    if (e->dead)
        goto out;
    if (j->rc) {
        queue_remove(s, x);
        stats_add(e, (eng_stats_t){.queued = (uint32_t)-1});
        eng_result_t r = {0};
        r.eid = x->eid;
        r.sid = s->sid;
        r.status = ENG_ST_REFUSED;
        r.err = j->rc;
        r.emsg = (char *)cap_strerror(j->rc);
        xmap_del(e, x);
        exec_notify_done(e, x, &r);
        exec_unref(x); /* the queue's */
        exec_unref(x); /* the map's */
        goto out;
    }
    if (j->res.promise && j->res.promise->state != PROM_PENDING) {
        /* settled before: its result is recorded; never run twice */
        eng_result_t *r = NULL;
        queue_remove(s, x);
        stats_add(e, (eng_stats_t){.queued = (uint32_t)-1});
        int rc = eng__result_read(&e->tb, x->eid, &r);
        xmap_del(e, x);
        if (rc == 0) {
            exec_notify_done(e, x, r);
            eng_result_free(r);
        } else {
            for (size_t i = 0; i < x->nls; i++)
                refuse(&x->ls[i].cb, x->ls[i].arg, x->eid, s->sid, CAP_EEXIST);
            x->nls = 0;
        }
        exec_unref(x);
        exec_unref(x);
        goto out;
    }
    x->created = 1;
    x->t_req = cap_now_ns();
    x->st = X_QUEUED;
    exec_notify_accepted(x); /* the execution is durably recorded: now it is accepted */
    if (x->cancel_req || s->st == S_CLOSING) {
        queue_remove(s, x);
        stats_add(e, (eng_stats_t){.queued = (uint32_t)-1});
        exec_unref(x); /* the queue's; the map keeps one until FINISH */
        finish_unrun(e, x, ENG_ST_CANCELLED, x->cancel_req ? CAP_ECANCELED : CAP_ECLOSED);
        goto out;
    }
    session_pump(e, s);
out:
    job_free(j);
}

/* Starts the next execution of s if it can run. */
/* ---------- CPU placement (eng_opts_t.affinity) ----------
 * A lone execution keeps the whole request on one CPU: its worker, the loop thread and the wal's
 * threads are pinned to the CPU the loop runs on, so the hand-offs loop -> wal writer -> loop ->
 * worker protocol thread -> main thread -> loop are switches on a running CPU, never wake-ups of
 * an idle one. As soon as a second execution is in flight (and for CROWD_CALM_NS after), or the
 * lone cell runs longer than PIN_MAX_MS, the pins are dropped so busy sessions use every CPU. */
#define PIN_MAX_MS 2
/* after two executions were in flight at once, nothing is pinned for this long */
#define CROWD_CALM_NS (10u * 1000000u)

static int set_mask(pid_t tid, const unsigned long *mask, size_t len)
{
    return syscall(SYS_sched_setaffinity, tid, len, mask) == 0 || errno == ESRCH ? 0 : -errno;
}

/* The engine's threads (loop, wal) to one CPU, or back to the mask at open (cpu -1). */
static void eng_threads_pin(eng_t *e, int cpu)
{
    if (cpu == e->eng_cpu || !e->mask0_len)
        return;
    unsigned long one[16] = {0};
    if (cpu >= 0)
        one[cpu / 64] = 1ul << (cpu % 64);
    const unsigned long *m = cpu >= 0 ? one : e->mask0;
    size_t len = cpu >= 0 ? sizeof one : e->mask0_len;
    if (e->own || e->pin_loop) /* (always called on the loop thread) */
        (void)set_mask(0, m, len);
    for (int i = 0; i < e->neng_tids; i++)
        (void)set_mask(e->eng_tids[i], m, len);
    e->eng_cpu = cpu;
}

static void unpin(eng_t *e)
{
    session_t *s = e->pin_s;
    e->pin_s = NULL;
    uv_timer_stop(&e->ptimer);
    if (s && s->w)
        (void)pyw_worker_set_cpu(s->w->w, -1);
    stats_add(e, (eng_stats_t){.unpinned = 1});
}

static void on_ptimer(uv_timer_t *t)
{
    unpin(t->data);
}

/* s's worker is about to get a cell */
static void busy_begin(eng_t *e, session_t *s)
{
    s->busy = 1;
    e->nbusy++;
    if (e->o.affinity != ENG_AFFINITY_AUTO)
        return;
    uint64_t now = cap_now_ns();
    /* e->stats.running (only the loop writes it) counts executions from their start on a worker
     * to their FINISH being durable: this one alone means nothing else is in flight */
    if (e->nbusy > 1 || e->stats.running > 1 || now - e->crowd_ns < CROWD_CALM_NS) {
        if (e->nbusy > 1 || e->stats.running > 1)
            e->crowd_ns = now;
        (void)pyw_worker_set_cpu(s->w->w, -1);
        if (e->pin_s)
            unpin(e);
        eng_threads_pin(e, -1);
        return;
    }
    unsigned cpu;
    if (e->io_cpu >= 0) /* where the journal write's completion wakes the writer */
        cpu = (unsigned)e->io_cpu;
    else if (e->eng_cpu >= 0) /* the loop is pinned: it runs there */
        cpu = (unsigned)e->eng_cpu;
    else if (syscall(SYS_getcpu, &cpu, NULL, NULL) != 0)
        return;
    eng_threads_pin(e, (int)cpu); /* (nothing to do when they are there already) */
    if (pyw_worker_set_cpu(s->w->w, (int)cpu) == 0) {
        stats_add(e, (eng_stats_t){.pinned = 1});
        e->pin_s = s;
        uv_timer_start(&e->ptimer, on_ptimer, PIN_MAX_MS, 0);
    }
}

/* s's worker no longer runs a cell (its result came, or the worker went). An idle worker keeps
 * its pin: the next lone cell finds it in place. */
static void busy_end(eng_t *e, session_t *s)
{
    if (!s->busy)
        return;
    s->busy = 0;
    e->nbusy--;
    if (e->nbusy > 0)
        e->crowd_ns = cap_now_ns(); /* two were in flight until now */
    if (e->pin_s == s) {
        e->pin_s = NULL;
        uv_timer_stop(&e->ptimer);
    }
}

static void session_pump(eng_t *e, session_t *s)
{
    if (e->closing || s->st == S_CLOSING || s->st == S_CREATING)
        return;
    if (s->cur || !s->qhead || s->snapping)
        return;
    if (s->st == S_COLD) {
        session_restore(e, s);
        return;
    }
    if (s->st != S_READY || !s->qhead->created)
        return;
    exec_t *x = s->qhead;
    s->qhead = x->qnext;
    if (!s->qhead)
        s->qtail = NULL;
    x->qnext = NULL;
    s->qlen--;
    s->cur = x; /* the queue's reference moves to cur */
    x->st = X_RUNNING;
    x->wid = ++e->wid_next;
    x->in_k = 0;
    stats_add(e, (eng_stats_t){.queued = (uint32_t)-1, .running = 1});
    busy_begin(e, s);
    int rc = pyw_worker_execute(s->w->w, x->wid, x->eid, x->code, x->len,
                                x->timeout_ms ? x->timeout_ms : s->so.timeout_ms);
    if (rc) {
        busy_end(e, s);
        /* the worker is gone: its exit callback restores the session and re-runs x */
        x->st = X_QUEUED;
        s->cur = NULL;
        x->qnext = s->qhead;
        s->qhead = x;
        if (!s->qtail)
            s->qtail = x;
        s->qlen++;
        stats_add(e, (eng_stats_t){.queued = 1, .running = (uint32_t)-1});
    }
}

static exec_t *cur_exec(session_t *s, uint64_t wid)
{
    return s && s->cur && s->cur->wid == wid && s->cur->st == X_RUNNING ? s->cur : NULL;
}

static void pcb_output(pyw_worker_t *w, uint64_t wid, int stream, const char *d, size_t n)
{
    wref_t *r = pyw_worker_data(w);
    exec_t *x = cur_exec(r->s, wid);
    if (!x)
        return;
    output_add(r->e, x, d, n);
    for (size_t i = 0; i < x->nls; i++)
        if (x->ls[i].cb.on_output)
            x->ls[i].cb.on_output(x->ls[i].arg, x->eid, stream, d, n);
}

static char *input_pid(const char *eid, uint32_t k)
{
    size_t n = strlen(eid) + 32;
    char *p = cap_malloc(n);
    snprintf(p, n, "capsule/x/%s/in/%u", eid, k);
    return p;
}

static void input_created(eng_t *e, eng_msg_t *m)
{
    job_t *j = (job_t *)m;
    exec_t *x = j->x;
    if (e->dead || x->st != X_RUNNING || x->wid != (uint64_t)j->aux || !x->s->w)
        goto out;
    if (j->rc) {
        cap_log(CAP_LOG_ERROR, "engine", "input request of %s not recorded: %s", x->eid,
                cap_strerror(j->rc));
        pyw_worker_input_reply(x->s->w->w, x->wid, NULL, 0, 1);
        goto out;
    }
    prom_promise_t *p = j->res.promise;
    if (p && p->state == PROM_RESOLVED) {
        /* answered before a crash: the recorded reply, in order */
        const char *eof = prom_promise_tag(p, "capsule:eof");
        int is_eof = 0;
        for (size_t i = 0; i < p->value.nheaders; i++)
            if (strcmp(p->value.headers[i].key, "capsule:eof") == 0)
                is_eof = 1;
        (void)eof;
        pyw_worker_input_reply(x->s->w->w, x->wid, p->value.data, p->value.len, is_eof);
        goto out;
    }
    x->in_wait = j->k;
    for (size_t i = 0; i < x->nls; i++)
        if (x->ls[i].cb.on_input)
            x->ls[i].cb.on_input(x->ls[i].arg, x->eid, x->prompt ? x->prompt : "", x->password);
out:
    job_free(j);
}

static void pcb_input(pyw_worker_t *w, uint64_t wid, const char *prompt, int password)
{
    wref_t *r = pyw_worker_data(w);
    exec_t *x = cur_exec(r->s, wid);
    if (!x)
        return;
    x->in_k++;
    cap_free(x->prompt);
    x->prompt = cap_strdup(prompt ? prompt : "");
    x->password = password;
    char *pid = input_pid(x->eid, x->in_k);
    job_t *j = job_new(J_CREATE, pid, input_created);
    cap_free(pid);
    job_tag(j, "capsule:kind", "input");
    j->data = cap_strdup(x->prompt);
    j->len = strlen(x->prompt);
    j->x = x;
    x->refs++;
    j->k = x->in_k;
    j->aux = (int)x->wid;
    job_submit(r->e, j);
}

/* A worker blocked on an external promise (capsule.promise(id).wait()). The entry is the token of
 * its one reply: whoever removes it answers. The execution is named by id, not referenced. */
typedef struct pwait {
    struct pwait *next;
    char *pid, *eid;
    uint64_t wid;
} pwait_t;

static void pwait_free(pwait_t *w)
{
    cap_free(w->pid);
    cap_free(w->eid);
    cap_free(w);
}

/* Removes the waiter (pid, eid, wid); 1 if it was there. */
static int pwait_take(eng_t *e, const char *pid, const char *eid, uint64_t wid)
{
    for (pwait_t **pp = &e->pwaits; *pp; pp = &(*pp)->next) {
        pwait_t *w = *pp;
        if (w->wid == wid && strcmp(w->pid, pid) == 0 && strcmp(w->eid, eid) == 0) {
            *pp = w->next;
            pwait_free(w);
            return 1;
        }
    }
    return 0;
}

static void step_done(eng_t *e, eng_msg_t *m);

/* A step's operation (several blocking promise reads and writes: eng__step_run) runs on libuv's
 * thread pool; its after-callback is on the loop. Steps are not on the path of a plain cell. */
static void step_work(uv_work_t *req)
{
    job_t *j = req->data;
    eng__step_run(j->e->ps, j->step);
}

static void step_after(uv_work_t *req, int status)
{
    (void)status;
    job_t *j = req->data;
    cap_free(req);
    j->m.fn(j->e, &j->m);
}

/* The job of step st of execution x (answered by step_done to x's worker of now). */
static job_t *step_job(eng_t *e, exec_t *x, eng_step_t *st)
{
    job_t *j = job_new(J_GET, x->eid, step_done);
    j->e = e;
    j->step = st;
    j->x = x;
    x->refs++;
    j->aux = (int)x->wid;
    return j;
}

static void step_submit(eng_t *e, exec_t *x, eng_step_t *st)
{
    job_t *j = step_job(e, x, st);
    uv_work_t *req = cap_calloc(1, sizeof(*req));
    req->data = j;
    if (uv_queue_work(e->loop, req, step_work, step_after) != 0) {
        cap_free(req);
        st->state = ENG_STEP_FAILED;
        step_done(e, &j->m);
    }
}

/* Re-reads external promise pid for the waiting execution x. */
static void step_recheck(eng_t *e, exec_t *x, const char *pid)
{
    eng_step_t *st = cap_calloc(1, sizeof *st);
    st->op = ENG_STEP_AWAIT;
    st->recheck = 1;
    st->eid = cap_strdup(x->eid);
    st->path = cap_strdup("");
    st->ext = cap_strdup(pid);
    step_submit(e, x, st);
}

/* A durable step's operation is durable: answer the worker (if the cell still runs there). An
 * external promise still pending registers a waiter and is read once more (a settle may have
 * come between the read and the registration); its answer waits for the settle observer. */
static void step_done(eng_t *e, eng_msg_t *m)
{
    job_t *j = (job_t *)m;
    exec_t *x = j->x;
    eng_step_t *st = j->step;
    int live = !e->dead && x->st == X_RUNNING && x->wid == (uint64_t)j->aux && x->s->w;
    if (live && st->op == ENG_STEP_AWAIT && st->state == ENG_STEP_PENDING) {
        if (!st->recheck) {
            pwait_t *w = cap_calloc(1, sizeof *w);
            w->pid = cap_strdup(st->ext);
            w->eid = cap_strdup(x->eid);
            w->wid = x->wid;
            w->next = e->pwaits;
            e->pwaits = w;
            step_recheck(e, x, st->ext);
        }
        goto out;
    }
    if (live && st->op == ENG_STEP_AWAIT && st->recheck && !pwait_take(e, st->ext, x->eid, x->wid))
        goto out; /* answered already */
    if (live && pyw_worker_promise_reply(x->s->w->w, x->wid, st->state, st->out_attempts,
                                         st->out_num, st->out, st->out_len) == CAP_ETOOBIG)
        pyw_worker_promise_reply(x->s->w->w, x->wid, ENG_STEP_FAILED, 0, 0,
                                 "recorded value exceeds the frame limit", 38);
out:
    job_free(j);
}

/* The settle observer's message: wake the executions waiting on that external promise. */
typedef struct settled_msg {
    eng_msg_t m;
    char *id;
} settled_msg_t;

static void do_settled(eng_t *e, eng_msg_t *m)
{
    settled_msg_t *sm = (settled_msg_t *)m;
    for (pwait_t **pp = &e->pwaits; !e->dead && *pp;) {
        pwait_t *w = *pp;
        exec_t *x = strcmp(w->pid, sm->id) == 0 ? xmap_get(e, w->eid) : NULL;
        if (strcmp(w->pid, sm->id) == 0 && (!x || x->st != X_RUNNING || x->wid != w->wid)) {
            *pp = w->next; /* its execution moved on: a stale waiter */
            pwait_free(w);
            continue;
        }
        if (x)
            step_recheck(e, x, sm->id);
        pp = &w->next;
    }
    cap_free(sm->id);
    cap_free(sm);
}

/* prom_opts_t.on_settle (any thread, after the settle is durable). */
static void on_prom_settle(void *arg, const char *id)
{
    eng_t *e = arg;
    if (strncmp(id, ENG_EXT_PREFIX, sizeof(ENG_EXT_PREFIX) - 1) != 0 ||
        !__atomic_load_n(&e->observe, __ATOMIC_ACQUIRE))
        return;
    settled_msg_t *sm = cap_calloc(1, sizeof *sm);
    sm->m.fn = do_settled;
    sm->id = cap_strdup(id);
    post(e, &sm->m);
}

/* ---- a task with its own limits (op CHILD): its attempt runs as the execution "<eid>-t<path>"
 * of the session of the same id, opened with the task's CPU limit (so in a worker of its own). A
 * pool thread opens the session (blocking) and starts the execution; its on_done (loop) answers
 * the parent's worker like any step, then a pool thread closes the session. ---- */
typedef struct child_work {
    eng_t *e;
    job_t *j;
    int started; /* eng_execute took it: child_on_done answers */
    char *sid;   /* closing: the session */
} child_work_t;

static void child_close_work(uv_work_t *req)
{
    child_work_t *cw = req->data;
    eng_session_close(cw->e, cw->sid);
}

static void child_close_after(uv_work_t *req, int status)
{
    (void)status;
    child_work_t *cw = req->data;
    cap_free(cw->sid);
    cap_free(cw);
    cap_free(req);
}

static void child_on_done(void *arg, const eng_result_t *r)
{
    job_t *j = arg;
    eng_t *e = j->e;
    eng__child_answer(j->step, r);
    step_done(e, &j->m); /* answers the parent's worker (if it still waits); frees j */
    if (!r->sid || e->closing)
        return;
    child_work_t *cw = cap_calloc(1, sizeof *cw);
    cw->e = e;
    cw->sid = cap_strdup(r->sid);
    uv_work_t *req = cap_calloc(1, sizeof(*req));
    req->data = cw;
    if (uv_queue_work(e->loop, req, child_close_work, child_close_after) != 0)
        child_close_after(req, 0);
}

static void child_work(uv_work_t *req)
{
    child_work_t *cw = req->data;
    job_t *j = cw->j;
    eng_step_t *st = j->step;
    char *id = eng__child_id(st->eid, st->path);
    int rc = id ? 0 : CAP_EINVAL;
    eng_session_opts_t o = {0};
    o.cpu_seconds = (uint32_t)(st->num > UINT32_MAX ? UINT32_MAX : st->num);
    if (!rc)
        rc = eng_session_open(j->e, id, &o, NULL);
    if (rc == CAP_EEXIST)
        rc = 0;
    if (!rc) {
        eng_exec_req_t rq = {0};
        rq.sid = id;
        rq.eid = id;
        rq.code = (const char *)st->in;
        rq.len = st->in_len;
        eng_exec_cb_t cb = {0};
        cb.on_done = child_on_done;
        cw->started = 1;
        if ((rc = eng_execute(j->e, &rq, &cb, j)))
            cw->started = 0;
    }
    if (rc) {
        char msg[256];
        snprintf(msg, sizeof msg, "its session could not start: %s",
                 id ? cap_strerror(rc) : "the step's id is too long for a session id");
        st->state = ENG_STEP_FAILED;
        st->out = (uint8_t *)cap_strdup(msg);
        st->out_len = strlen(msg);
    }
    cap_free(id);
}

static void child_after(uv_work_t *req, int status)
{
    (void)status;
    child_work_t *cw = req->data;
    if (!cw->started) /* refused: answer now */
        cw->j->m.fn(cw->j->e, &cw->j->m);
    cap_free(cw);
    cap_free(req);
}

static void child_submit(eng_t *e, exec_t *x, eng_step_t *st)
{
    job_t *j = step_job(e, x, st);
    st->in = cap_realloc(st->in, st->in_len + 1); /* the cell's code, 0-terminated */
    st->in[st->in_len] = 0;
    child_work_t *cw = cap_calloc(1, sizeof *cw);
    cw->e = e;
    cw->j = j;
    uv_work_t *req = cap_calloc(1, sizeof(*req));
    req->data = cw;
    if (uv_queue_work(e->loop, req, child_work, child_after) != 0) {
        cap_free(req);
        cap_free(cw);
        st->state = ENG_STEP_FAILED;
        step_done(e, &j->m);
    }
}

/* Writes the running marks that are due and re-arms for the next. */
static void on_mtimer(uv_timer_t *t)
{
    eng_t *e = t->data;
    int64_t now = prom_store_now(e->ps), next = eng__mark_flush(e->ps, &e->marks, now);
    if (next != INT64_MAX)
        uv_timer_start(&e->mtimer, on_mtimer, (uint64_t)(next > now ? next - now : 1), 0);
}

static void pcb_promise(pyw_worker_t *w, uint64_t wid, const pyw_promise_req_t *q)
{
    wref_t *r = pyw_worker_data(w);
    exec_t *x = cur_exec(r->s, wid);
    if (!x && q->op == ENG_STEP_START)
        return;
    if (!x) {
        pyw_worker_promise_reply(w, wid, ENG_STEP_FAILED, 0, 0, "no running execution", 20);
        return;
    }
    eng_t *e = r->e;
    eng_step_t *st = cap_calloc(1, sizeof *st);
    st->op = q->op;
    st->eid = cap_strdup(x->eid);
    st->path = cap_strdup(q->name);
    st->label = cap_strdup(q->label ? q->label : "");
    st->attempts = q->attempts;
    st->num = q->num;
    st->in = q->len ? cap_memdup(q->data, q->len) : NULL;
    st->in_len = q->len;
    if (q->op == ENG_STEP_AWAIT)
        st->ext = eng__ext_pid(x->s->sid, q->name);
    if (q->op == ENG_STEP_START) { /* no reply: held, written only if the step lasts */
        st->due = prom_store_now(e->ps) + ENG_MARK_DELAY_MS;
        if (!e->marks)
            uv_timer_start(&e->mtimer, on_mtimer, ENG_MARK_DELAY_MS, 0);
        eng__mark_hold(&e->marks, st);
        return;
    }
    if (q->op == ENG_STEP_SETTLE || q->op == ENG_STEP_ATTEMPT)
        eng__mark_drop(&e->marks, st->eid, st->path); /* written with the record */
    if (q->op == ENG_STEP_CHILD)
        child_submit(e, x, st);
    else
        step_submit(e, x, st);
}

static eng_tx_t exec_tx(const exec_t *x)
{
    eng_tx_t t = x->tx ? x->tx : x->s->so.tx;
    return t ? t : ENG_TX_ROLLBACK_ON_FAILURE;
}

/* Replaces s's worker by a fresh one restored from the log. */
static void session_detach_worker(session_t *s)
{
    if (s->snapping) {
        s->snapping = 0;
        if (s->snap_waiter)
            waiter_wake(s->snap_waiter, CAP_EWORKER);
        s->snap_waiter = NULL;
    }
    if (s->w) {
        busy_end(s->w->e, s);
        s->w->s = NULL;
        worker_drop(s->w);
        s->w = NULL;
    }
}

/* Appends "name:reason;" to *dst ("name:reason;..." lists: restore_failed, unrecorded), with
 * any ':' or ';' in the name and ';' in the reason made '_' and ',' so the list splits back. */
static void strcat_alloc(char **dst, const char *name, const char *reason)
{
    size_t n0 = *dst ? strlen(*dst) : 0, na = strlen(name), nb = strlen(reason);
    *dst = cap_realloc(*dst, n0 + na + nb + 3);
    char *p = *dst + n0;
    for (size_t i = 0; i < na; i++)
        *p++ = name[i] == ':' || name[i] == ';' ? '_' : name[i];
    *p++ = ':';
    for (size_t i = 0; i < nb; i++)
        *p++ = reason[i] == ';' ? ',' : reason[i];
    *p++ = ';';
    *p = 0;
}

/* The entry of `name` in a "name:reason;..." list (its start), or NULL. */
static char *list_find(char *list, const char *name)
{
    size_t n = strlen(name);
    for (char *p = list; p && *p;) {
        char *end = strchr(p, ';');
        if (!end)
            return NULL;
        size_t k = 0;
        while (k < n && p + k < end &&
               (p[k] == name[k] || ((name[k] == ':' || name[k] == ';') && p[k] == '_')))
            k++;
        if (k == n && p[k] == ':')
            return p;
        p = end + 1;
    }
    return NULL;
}

static void list_remove(char **list, const char *name)
{
    char *p = list_find(*list, name);
    if (p) {
        char *end = strchr(p, ';') + 1;
        memmove(p, end, strlen(end) + 1);
    }
}

static void pcb_result(pyw_worker_t *w, const pyw_result_t *pr)
{
    wref_t *r = pyw_worker_data(w);
    exec_t *x = cur_exec(r->s, pr->exec_id);
    if (!x)
        return;
    eng_t *e = r->e;
    session_t *s = x->s;
    eng_result_t *res = &x->r;
    x->t_res = cap_now_ns();
    busy_end(e, s);
    eng__result_clear(res);
    res->status = (eng_status_t)pr->status;
    res->repr = xstrdup(pr->repr);
    res->json = xstrdup(pr->json);
    res->etype = xstrdup(pr->etype);
    res->emsg = xstrdup(pr->emsg);
    res->traceback = xstrdup(pr->traceback);
    x->in_wait = 0;
    eng_tx_t tx = exec_tx(x);
    int ok = pr->status == PYW_STATUS_OK;
    int commit = pr->delta && pr->status != PYW_STATUS_DIED &&
                 (tx == ENG_TX_COMMIT_ALWAYS || (tx == ENG_TX_ROLLBACK_ON_FAILURE && ok));
    if (pr->status == PYW_STATUS_DIED) {
        x->st = X_FINISHING;
        x->await_exit = 1; /* on_exit has the reason, then the restore */
        return;
    }
    if (commit) {
        res->committed = 1;
        for (size_t i = 0; i < pr->delta->n_unpicklable; i++) {
            strcat_alloc(&res->unrecorded, pr->delta->unpicklable[i].name,
                         pr->delta->unpicklable[i].reason);
            list_remove(&s->gone, pr->delta->unpicklable[i].name); /* the worker has it again */
        }
        x->delta = cap_memdup(pr->delta->blob, pr->delta->blob_len ? pr->delta->blob_len : 1);
        x->delta_len = pr->delta->blob_len;
        finish_append(e, x);
        return;
    }
    const pyw_delta_t *d = pr->delta;
    if (pr->not_run || (tx == ENG_TX_ROLLBACK_ON_FAILURE && d && !d->n_added && !d->n_changed &&
                        !d->n_mutated && !d->n_deleted && !d->n_unpicklable)) {
        /* its code never started (a SyntaxError, a cancel first), or it failed having changed
         * nothing the namespace tracker sees (a NameError, a failed computation): the worker's
         * namespace is the recorded one, as far as the tracker that records every commit can
         * tell, so no restore (which would cost a fresh worker and lose what the log cannot
         * hold: an open file, a connection, a lock) */
        finish_append(e, x);
        return;
    }
    /* not recorded: the namespace goes back to the recorded state before the result is told */
    if (ok && pr->delta_error) {
        size_t n = strlen(pr->delta_error) + 16;
        char *why = cap_malloc(n);
        snprintf(why, n, "no delta (%s)", pr->delta_error);
        strcat_alloc(&s->rfailed, "*", why);
        cap_free(why);
    }
    x->st = X_FINISHING;
    s->finish_after = x;
    session_detach_worker(s);
    s->st = S_COLD;
    session_restore(e, s);
}

static void pcb_exit(pyw_worker_t *w, const pyw_exit_t *ex)
{
    wref_t *r = pyw_worker_data(w);
    eng_t *e = r->e;
    session_t *s = r->s;
    if (!s) {
        /* a pooled (or detached) worker died: replace it */
        pthread_mutex_lock(&e->pool_mu);
        if (r->transit) {
            /* popped by an opener: the adoption drops it (and gives the session another) */
            r->died = 1;
            pthread_mutex_unlock(&e->pool_mu);
            return;
        }
        pool_remove_locked(e, r);
        pthread_mutex_unlock(&e->pool_mu);
        worker_drop(r);
        refill_schedule(e);
        return;
    }
    stats_add(e, (eng_stats_t){.worker_deaths = 1});
    cap_log(CAP_LOG_INFO, "engine", "session %s: worker %d ended: %s", s->sid, pyw_worker_pid(w),
            ex->message ? ex->message : "?");
    exec_t *x = s->cur;
    session_detach_worker(s);
    s->st = S_COLD;
    if (x && (x->await_exit || x->st == X_RUNNING)) {
        if (s->so.retry_on_death && x->retries == 0 && s->st != S_CLOSING) {
            x->retries++;
            x->st = X_QUEUED;
            x->await_exit = 0;
            x->out_len = 0;
            x->out_dropped = 0;
            s->cur = NULL;
            x->qnext = s->qhead;
            s->qhead = x;
            if (!s->qtail)
                s->qtail = x;
            s->qlen++;
            stats_add(e, (eng_stats_t){.queued = 1, .running = (uint32_t)-1});
            for (size_t i = 0; i < x->nls; i++)
                if (x->ls[i].cb.on_restarted)
                    x->ls[i].cb.on_restarted(x->ls[i].arg, x->eid);
            session_restore(e, s);
            return;
        }
        eng__result_clear(&x->r);
        x->r.status = ENG_ST_DIED;
        x->r.err = CAP_EWORKER;
        x->r.etype = cap_strdup("WorkerDied");
        x->r.emsg = cap_strdup(ex->message ? ex->message : "the worker died");
        x->st = X_FINISHING;
        x->await_exit = 0;
        s->finish_after = x;
    }
    if (s->finish_after || s->qhead)
        session_restore(e, s);
}

/* ---------- restore: a fresh worker + the recorded chain ---------- */
static void restore_done(eng_t *e, session_t *s)
{
    s->st = S_READY;
    s->last_used = cap_now_ns();
    stats_add(e, (eng_stats_t){.restored = 1});
    /* told: what this restore could not bring back of what the worker had (not what an earlier
     * restore had lost already); the next result to finish carries it */
    for (char *p = s->rall; p && *p;) {
        char *colon = strchr(p, ':'), *end = strchr(colon, ';');
        *colon = *end = 0;
        if ((strcmp(p, "*") == 0 || !list_find(s->gone, p)) && !list_find(s->rfailed, p))
            strcat_alloc(&s->rfailed, p, colon + 1);
        *colon = ':';
        *end = ';';
        p = end + 1;
    }
    cap_free(s->gone);
    s->gone = s->rall;
    s->rall = NULL;
    exec_t *x = s->finish_after;
    if (x) {
        s->finish_after = NULL;
        finish_append(e, x);
        return;
    }
    session_pump(e, s);
}

static void session_restore(eng_t *e, session_t *s)
{
    if (s->st == S_RESTORING || s->st == S_CLOSING || e->closing)
        return;
    eng_blob_t *b = NULL;
    size_t n = 0;
    wref_t *r = NULL;
    int rc = eng__chain_read(&e->tb, s->sid, 0, &b, &n);
    if (!rc)
        rc = worker_acquire(e, s, &r);
    if (rc) {
        cap_log(CAP_LOG_ERROR, "engine", "session %s: restore failed: %s", s->sid,
                cap_strerror(rc));
        eng__blobs_free(b, n);
        s->st = S_COLD;
        /* fail what waits, so nobody hangs: the finishing one, then the queued ones */
        exec_t *x = s->finish_after;
        if (x) {
            s->finish_after = NULL;
            finish_append(e, x);
            return; /* its FINISH pumps the session again, which lands here for the queue */
        }
        for (exec_t *q = s->qhead, *nx; q; q = nx) {
            nx = q->qnext;
            if (!q->created) {
                q->cancel_req = 1;
                continue;
            }
            queue_remove(s, q);
            stats_add(e, (eng_stats_t){.queued = (uint32_t)-1});
            exec_unref(q);
            finish_unrun(e, q, ENG_ST_REFUSED, rc);
        }
        return;
    }
    s->w = r;
    s->st = S_RESTORING;
    s->applies = 0;
    cap_free(s->rall);
    s->rall = NULL;
    for (size_t i = 0; i < n; i++) {
        if (pyw_worker_apply(r->w, i + 1, b[i].p, b[i].n) == 0)
            s->applies++;
    }
    eng__blobs_free(b, n);
    if (s->applies == 0)
        restore_done(e, s);
}

static void pcb_applied(pyw_worker_t *w, const pyw_apply_result_t *ar)
{
    wref_t *r = pyw_worker_data(w);
    session_t *s = r->s;
    if (!s || s->st != S_RESTORING || s->w != r)
        return;
    /* in chain order: a name a later delta restored or deleted is not lost */
    for (size_t i = 0; i < ar->n_restored; i++)
        list_remove(&s->rall, ar->restored[i]);
    for (size_t i = 0; i < ar->n_deleted; i++)
        list_remove(&s->rall, ar->deleted[i]);
    if (ar->rc)
        strcat_alloc(&s->rall, "*", ar->error ? ar->error : "apply rejected");
    for (size_t i = 0; i < ar->n_failed; i++) {
        list_remove(&s->rall, ar->failed[i].name);
        strcat_alloc(&s->rall, ar->failed[i].name, ar->failed[i].reason);
    }
    if (--s->applies == 0)
        restore_done(r->e, s);
}

static void checkpoint_snapshot(eng_t *e, session_t *s, int rc, const pyw_delta_t *snap,
                                const char *err);

static void pcb_snapshot(pyw_worker_t *w, uint64_t req_id, int rc, const pyw_delta_t *snap,
                         const char *error)
{
    (void)req_id;
    wref_t *r = pyw_worker_data(w);
    if (r->s)
        checkpoint_snapshot(r->e, r->s, rc, snap, error);
}

/* ---------- commands (run on the loop) ---------- */
typedef struct cmd {
    eng_msg_t m;
    eng_exec_req_t req;
    char *sid, *eid, *code, *text, *sid2;
    size_t len;
    int eof, flag;
    uint64_t u;
    eng_exec_cb_t cb;
    void *arg;
    eng_session_opts_t so;
    waiter_t *w;
} cmd_t;

static void cmd_free(cmd_t *c)
{
    cap_free(c->sid);
    cap_free(c->eid);
    cap_free(c->code);
    cap_free(c->text);
    cap_free(c->sid2);
    cap_free(c);
}

static char *gen_id(eng_t *e, const char *prefix)
{
    char b[64];
    snprintf(b, sizeof(b), "%s%llx-%llx", prefix, (unsigned long long)cap_wall_ms(),
             (unsigned long long)++e->gen_ctr);
    return cap_strdup(b);
}

static exec_t *exec_new(eng_t *e, session_t *s, const char *eid, const char *code, size_t len,
                        eng_tx_t tx)
{
    (void)e;
    exec_t *x = cap_calloc(1, sizeof(*x));
    x->eid = cap_strdup(eid);
    x->s = s;
    s->refs++;
    x->code = cap_malloc(len + 1);
    memcpy(x->code, code, len);
    x->code[len] = 0;
    x->len = len;
    x->tx = tx;
    x->st = X_CREATING;
    x->refs = 2; /* the map's and the queue's */
    return x;
}

static void exec_listen(exec_t *x, const eng_exec_cb_t *cb, void *arg)
{
    x->ls = cap_realloc(x->ls, (x->nls + 1) * sizeof(*x->ls));
    x->ls[x->nls].cb = *cb;
    x->ls[x->nls].arg = arg;
    x->ls[x->nls].accepted = 0;
    x->nls++;
}

static void queue_push(session_t *s, exec_t *x)
{
    if (s->qtail)
        s->qtail->qnext = x;
    else
        s->qhead = x;
    s->qtail = x;
    s->qlen++;
}

static void do_execute(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    if (e->dead)
        goto out;
    if (e->closing) {
        refuse(&c->cb, c->arg, c->eid, c->sid, CAP_ECLOSED);
        goto out;
    }
    exec_t *x = xmap_get(e, c->eid);
    if (x) {
        /* the same id again: attach to the running execution */
        exec_listen(x, &c->cb, c->arg);
        if (x->created) /* durable already; otherwise exec_create_done accepts it */
            exec_notify_accepted(x);
        if (x->restarted && c->cb.on_restarted)
            c->cb.on_restarted(c->arg, x->eid);
        /* what this run printed before the listener came, as one chunk (stream 0), so the
         * listener's byte count matches the run's output offsets (a re-run after a crash has
         * usually printed some before its client re-attaches) */
        if (x->out_len && c->cb.on_output)
            c->cb.on_output(c->arg, x->eid, 0, x->out, x->out_len);
        if (x->in_wait && c->cb.on_input) /* a prompt already waiting for its answer */
            c->cb.on_input(c->arg, x->eid, x->prompt ? x->prompt : "", x->password);
        goto out;
    }
    eng_result_t *r = NULL;
    if (!c->flag && eng__result_read(&e->tb, c->eid, &r) == 0) {
        if (c->cb.on_done)
            c->cb.on_done(c->arg, r);
        eng_result_free(r);
        goto out;
    }
    session_t *s = smap_get(e, c->sid);
    if (!s || s->st == S_CLOSING) {
        refuse(&c->cb, c->arg, c->eid, c->sid, s ? CAP_ECLOSED : CAP_ENOTFOUND);
        goto out;
    }
    if (s->qlen >= e->o.max_queue) {
        refuse(&c->cb, c->arg, c->eid, c->sid, CAP_EBUSY);
        goto out;
    }
    x = exec_new(e, s, c->eid, c->code, c->len, c->req.tx);
    x->timeout_ms = c->req.timeout_ms;
    x->t_sub = cap_now_ns();
    exec_listen(x, &c->cb, c->arg);
    xmap_put(e, x);
    queue_push(s, x);
    stats_add(e, (eng_stats_t){.queued = 1});
    /* 1. the request is durable before the worker sees it, and before it is accepted */
    char *pid = exec_pid(x->eid);
    job_t *j = job_new(J_CREATE, pid, exec_create_done);
    cap_free(pid);
    job_tag(j, "capsule:kind", "exec");
    job_tag(j, "capsule:session", s->sid);
    char b[32];
    snprintf(b, sizeof(b), "%llu", (unsigned long long)++e->ord_next);
    job_hdr(j, "capsule:ord", b);
    snprintf(b, sizeof(b), "%d", (int)x->tx);
    job_hdr(j, "capsule:tx", b);
    if (x->timeout_ms) { /* absent in records written before per-execution timeouts: 0 */
        snprintf(b, sizeof(b), "%u", x->timeout_ms);
        job_hdr(j, "capsule:timeout_ms", b);
    }
    j->data = cap_memdup(x->code, x->len + 1);
    j->len = x->len;
    j->x = x;
    x->refs++;
    int held = log_hold(e);
    job_submit(e, j);
    log_release(e, held);
    if (s->st == S_COLD)
        session_restore(e, s); /* lazy restore overlaps the commit */
out:
    cmd_free(c);
}

static void input_settled(eng_t *e, eng_msg_t *m)
{
    job_t *j = (job_t *)m;
    exec_t *x = j->x;
    if (e->dead)
        goto out;
    if (j->rc) {
        cap_log(CAP_LOG_ERROR, "engine", "input reply of %s not recorded: %s", x->eid,
                cap_strerror(j->rc));
        goto out;
    }
    /* durable: now the worker may have it */
    if (x->st == X_RUNNING && x->wid == (uint64_t)j->aux && x->s->w)
        pyw_worker_input_reply(x->s->w->w, x->wid, j->data, j->len, (int)j->k);
out:
    job_free(j);
}

static void do_input(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    exec_t *x = e->dead ? NULL : xmap_get(e, c->eid);
    if (!x || x->st != X_RUNNING || !x->in_wait)
        goto out;
    char *pid = input_pid(x->eid, x->in_wait);
    job_t *j = job_new(J_SETTLE, pid, input_settled);
    cap_free(pid);
    /* an EOF reply is recorded as resolved with header capsule:eof (replayed as EOF) */
    j->state = PROM_RESOLVED;
    if (c->eof)
        job_hdr(j, "capsule:eof", "1");
    j->k = (uint32_t) !!c->eof;
    j->data = c->text ? cap_memdup(c->text, c->len + 1) : NULL;
    j->len = c->text ? c->len : 0;
    j->x = x;
    x->refs++;
    j->aux = (int)x->wid;
    x->in_wait = 0;
    job_submit(e, j);
out:
    cmd_free(c);
}

static void do_cancel(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    exec_t *x = e->dead ? NULL : xmap_get(e, c->eid);
    if (!x)
        goto out;
    session_t *s = x->s;
    if (x->st == X_RUNNING && s->w) {
        pyw_worker_cancel(s->w->w, x->wid);
    } else if (x->st == X_CREATING || x->st == X_QUEUED) {
        if (!x->created) {
            x->cancel_req = 1; /* finished when its promise is durable */
        } else {
            queue_remove(s, x);
            stats_add(e, (eng_stats_t){.queued = (uint32_t)-1});
            exec_unref(x);
            finish_unrun(e, x, ENG_ST_CANCELLED, CAP_ECANCELED);
        }
    }
out:
    cmd_free(c);
}

/* -- sessions -- */
static session_t *session_new(eng_t *e, const char *sid, const eng_session_opts_t *so)
{
    session_t *s = cap_calloc(1, sizeof(*s));
    s->sid = cap_strdup(sid);
    if (so)
        s->so = *so;
    s->refs = 1;
    s->st = S_CREATING;
    uint32_t b = bucket(sid);
    s->hnext = e->smap[b];
    e->smap[b] = s;
    stats_add(e, (eng_stats_t){.sessions = 1});
    return s;
}

/* Counts one more session (open or being opened) unless max_sessions are: 0, or CAP_ELIMIT. Any
 * thread (openers reserve before their pop). */
static int sess_reserve(eng_t *e)
{
    uint32_t n = atomic_load(&e->nsessions);
    do {
        if (n >= e->o.max_sessions)
            return CAP_ELIMIT;
    } while (!atomic_compare_exchange_weak(&e->nsessions, &n, n + 1));
    return 0;
}

/* Takes s (not yet served) out of the engine again: its open failed. */
static void session_unregister(eng_t *e, session_t *s)
{
    smap_del(e, s);
    e->nsessions--;
    stats_add(e, (eng_stats_t){.sessions = (uint32_t)-1});
    session_unref(s);
}

/* s is registered: it serves from now on (with an empty chain, the restore is a pool pop). */
static void session_start(eng_t *e, session_t *s)
{
    s->st = S_COLD;
    eng__last_ordinal(&e->tb, s->sid, &s->last_ord);
    session_restore(e, s);
}

/* The open's answer from the session promise's create: 0, the create's error, or CAP_EEXIST for
 * a closed session (its id is not reused). */
static int session_create_rc(const job_t *j, int rc)
{
    rc = job_res_rc(j, rc);
    if (!rc && j->res.promise && j->res.promise->state != PROM_PENDING)
        rc = CAP_EEXIST;
    return rc;
}

/* The session promise is durable. j->aux: the opener was answered at the append already (the
 * session serves since then), else it waited for this. */
static void session_created(eng_t *e, eng_msg_t *m)
{
    job_t *j = (job_t *)m;
    session_t *s = j->s;
    waiter_t *w = j->w;
    if (j->aux) {
        /* a failed commit after the append: the log is closing (or the store failed, which
         * the wal does not survive); the session's next records fail the same way */
        if (j->rc && !e->dead)
            cap_log(CAP_LOG_ERROR, "engine", "session %s: record not durable: %s", s->sid,
                    cap_strerror(j->rc));
        goto out;
    }
    if (e->dead) {
        waiter_wake(w, CAP_ECLOSED);
        goto out;
    }
    int rc = session_create_rc(j, j->rc);
    if (rc) {
        session_unregister(e, s);
        waiter_wake(w, rc);
        goto out;
    }
    session_start(e, s);
    waiter_wake(w, 0);
out:
    job_free(j);
}

/* Creates s's promise. durable: the opener (w) is answered when it is durable (a fork, whose base
 * record came first). Otherwise the opener is answered at once from the append (a pop from the
 * warm pool, no commit waited for): the promise is appended to the log before any record of the
 * session's executions, input or close, so whatever is acknowledged about the session later
 * implies its open is durable; a crash before that commit loses only the open itself (an empty
 * session nobody was told anything about but its id; nothing leaks, see ARCHITECTURE.md). */
/* The create of session sid's promise "capsule/s/<sid>", with its options as headers. */
static job_t *session_job(const char *sid, const eng_session_opts_t *so, eng_msg_fn done)
{
    size_t n = strlen(sid) + 16;
    char *pid = cap_malloc(n);
    snprintf(pid, n, "capsule/s/%s", sid);
    job_t *j = job_new(J_CREATE, pid, done);
    cap_free(pid);
    job_tag(j, "capsule:kind", "session");
    char b[32];
    snprintf(b, sizeof(b), "%d", (int)so->tx);
    job_hdr(j, "capsule:tx", b);
    snprintf(b, sizeof(b), "%u", so->timeout_ms);
    job_hdr(j, "capsule:timeout_ms", b);
    snprintf(b, sizeof(b), "%llu", (unsigned long long)so->mem_bytes);
    job_hdr(j, "capsule:mem_bytes", b);
    snprintf(b, sizeof(b), "%u", so->cpu_seconds);
    job_hdr(j, "capsule:cpu_seconds", b);
    snprintf(b, sizeof(b), "%d", so->retry_on_death);
    job_hdr(j, "capsule:retry", b);
    return j;
}

static void session_promise_create(eng_t *e, session_t *s, waiter_t *w, int durable)
{
    job_t *j = session_job(s->sid, &s->so, session_created);
    j->s = s;
    s->refs++;
    j->w = w;
    if (durable) {
        job_submit(e, j);
        return;
    }
    /* res is filled by the call; the completion runs on this thread later (posted), so reading
     * res here does not race with it */
    j->e = e;
    prom_value_t v = {j->hdr, j->nhdr, NULL, 0};
    prom_create_t c = {j->id, PROM_FOREVER, &v, j->tags, j->ntags};
    int rc = prom_promise_create_async(e->ps, &c, &j->res, job_durable, j);
    if (rc) {
        /* nothing appended, the completion never comes */
        session_unregister(e, s);
        waiter_wake(w, rc);
        job_free(j);
        return;
    }
    j->aux = 1;
    j->w = NULL;
    rc = session_create_rc(j, 0);
    if (rc) {
        /* a closed session's id (nothing was appended for it: the completion only frees j) */
        session_unregister(e, s);
        waiter_wake(w, rc);
        return;
    }
    session_start(e, s);
    waiter_wake(w, 0);
}

static void do_session_open(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    waiter_t *w = c->w;
    if (e->dead || e->closing) {
        waiter_wake(w, CAP_ECLOSED);
        goto out;
    }
    session_t *s = smap_get(e, c->sid);
    if (s) {
        waiter_wake(w, s->st == S_CLOSING ? CAP_ECLOSED : 0);
        goto out;
    }
    if (sess_reserve(e)) {
        waiter_wake(w, CAP_ELIMIT);
        goto out;
    }
    s = session_new(e, c->sid, &c->so);
    session_promise_create(e, s, w, 0);
out:
    cmd_free(c);
}

static void session_closed(eng_t *e, eng_msg_t *m)
{
    job_t *j = (job_t *)m;
    session_t *s = j->s;
    if (!e->dead) {
        smap_del(e, s);
        e->nsessions--;
        stats_add(e, (eng_stats_t){.sessions = (uint32_t)-1});
        session_unref(s); /* the map's */
    }
    if (j->w)
        waiter_wake(j->w, e->dead ? CAP_ECLOSED : j->rc);
    job_free(j);
}

static void do_session_close(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    session_t *s = e->dead ? NULL : smap_get(e, c->sid);
    if (!s || s->st == S_CLOSING || s->st == S_CREATING) {
        waiter_wake(c->w, s ? CAP_EBUSY : CAP_ENOTFOUND);
        goto out;
    }
    s->st = S_CLOSING;
    session_detach_worker(s);
    /* the running and the queued executions end, recorded as cancelled */
    exec_t *x = s->cur;
    if (x && (x->st == X_RUNNING || x->await_exit)) {
        x->await_exit = 0;
        eng__result_clear(&x->r);
        finish_unrun(e, x, ENG_ST_CANCELLED, CAP_ECLOSED);
    } else if (x && s->finish_after == x) {
        s->finish_after = NULL;
        finish_append(e, x);
    }
    while (s->qhead) {
        x = s->qhead;
        if (!x->created) {
            x->cancel_req = 1;
            break; /* finished when its create completes (the session is closing) */
        }
        queue_remove(s, x);
        stats_add(e, (eng_stats_t){.queued = (uint32_t)-1});
        exec_unref(x);
        finish_unrun(e, x, ENG_ST_CANCELLED, CAP_ECLOSED);
    }
    size_t n = strlen(s->sid) + 16;
    char *pid = cap_malloc(n);
    snprintf(pid, n, "capsule/s/%s", s->sid);
    job_t *j = job_new(J_SETTLE, pid, session_closed);
    cap_free(pid);
    j->state = PROM_RESOLVED;
    j->s = s;
    s->refs++;
    j->w = c->w;
    job_submit(e, j);
out:
    cmd_free(c);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void do_session_list(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    char **v = cap_calloc(e->nsessions + 1, sizeof(char *));
    size_t n = 0;
    for (size_t b = 0; b < NBUCKET && !e->dead; b++)
        for (session_t *s = e->smap[b]; s; s = s->hnext)
            if (s->st != S_CLOSING && s->st != S_CREATING && n < e->nsessions)
                v[n++] = cap_strdup(s->sid);
    qsort(v, n, sizeof(char *), cmp_str);
    c->w->p = v;
    c->w->n = n;
    waiter_wake(c->w, 0);
    cmd_free(c);
}

static void do_session_release(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    session_t *s = e->dead ? NULL : smap_get(e, c->sid);
    int rc = 0;
    if (!s)
        rc = e->dead ? CAP_ECLOSED : CAP_ENOTFOUND;
    else if (s->cur || s->qhead || s->snapping || (s->st != S_READY && s->st != S_COLD))
        rc = CAP_EBUSY;
    else {
        session_detach_worker(s);
        s->st = S_COLD;
    }
    waiter_wake(c->w, rc);
    cmd_free(c);
}

/* -- fork -- */
typedef struct fork_ctx {
    eng_msg_t m;
    eng_t *e;
    session_t *s;
    waiter_t *w;
    int status;
} fork_ctx_t;

static void fork_base_done(eng_t *e, eng_msg_t *m);

static void fork_wal_done(void *arg, int status, uint64_t first_seq)
{
    (void)first_seq;
    fork_ctx_t *f = arg;
    f->status = status;
    post(f->e, &f->m);
}

static void do_fork(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    waiter_t *w = c->w;
    session_t *src = e->dead ? NULL : smap_get(e, c->sid);
    if (!src) {
        waiter_wake(w, e->dead ? CAP_ECLOSED : CAP_ENOTFOUND);
        goto out;
    }
    if (smap_get(e, c->sid2)) {
        waiter_wake(w, CAP_EEXIST);
        goto out;
    }
    uint64_t ord = c->u ? c->u : src->last_ord;
    if (ord > src->last_ord || (src->finish_after && src->finish_after->r.committed)) {
        waiter_wake(w, CAP_EINVAL);
        goto out;
    }
    if (sess_reserve(e)) {
        waiter_wake(w, CAP_ELIMIT);
        goto out;
    }
    session_t *s = session_new(e, c->sid2, &src->so);
    /* the base (parent, ordinal) is durable before the session promise exists */
    wal_field_t f[2] = {{ENG_S_PARENT, 0, src->sid, strlen(src->sid)}, {ENG_S_PORD, ord, NULL, 0}};
    wal_rec_t rec = {ENG_REC_SESSION, s->sid, strlen(s->sid), f, 2};
    fork_ctx_t *fc = cap_calloc(1, sizeof(*fc));
    fc->m.fn = fork_base_done;
    fc->e = e;
    fc->s = s;
    s->refs++;
    fc->w = w;
    int rc = wal_log_append(e->wal, &rec, 1, fork_wal_done, fc, NULL);
    if (rc) {
        fc->status = rc;
        fork_base_done(e, &fc->m);
    }
out:
    cmd_free(c);
}

static void fork_base_done(eng_t *e, eng_msg_t *m)
{
    fork_ctx_t *f = (fork_ctx_t *)m;
    session_t *s = f->s;
    if (e->dead || f->status) {
        if (!e->dead)
            session_unregister(e, s);
        waiter_wake(f->w, f->status ? f->status : CAP_ECLOSED);
    } else {
        session_promise_create(e, s, f->w, 1);
    }
    session_unref(s);
    cap_free(f);
}

/* -- checkpoint -- */
typedef struct ckpt_ctx {
    eng_msg_t m;
    eng_t *e;
    session_t *s;
    waiter_t *w;
    int status;
    uint64_t seq;
    size_t bytes;
    int truncate;
} ckpt_ctx_t;

static void ckpt_done(eng_t *e, eng_msg_t *m);

static void ckpt_wal_done(void *arg, int status, uint64_t first_seq)
{
    ckpt_ctx_t *c = arg;
    c->status = status;
    c->seq = first_seq;
    post(c->e, &c->m);
}

/* Asks s's worker for a full snapshot (a checkpoint after s->last_ord); w may be NULL. */
static int session_snapshot(session_t *s, waiter_t *w)
{
    if (!s->w || pyw_worker_snapshot(s->w->w, 1) != 0)
        return CAP_EWORKER;
    s->snapping = 1;
    s->snap_ord = s->last_ord;
    s->snap_waiter = w;
    return 0;
}

static void do_checkpoint(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    session_t *s = e->dead ? NULL : smap_get(e, c->sid);
    if (!s) {
        waiter_wake(c->w, e->dead ? CAP_ECLOSED : CAP_ENOTFOUND);
        goto out;
    }
    if (s->st != S_READY || s->cur || s->snapping) {
        waiter_wake(c->w, CAP_EBUSY);
        goto out;
    }
    c->w->n = (size_t)c->flag; /* truncate? carried through the waiter */
    if (session_snapshot(s, c->w) != 0)
        waiter_wake(c->w, CAP_EWORKER);
out:
    cmd_free(c);
}

static void checkpoint_snapshot(eng_t *e, session_t *s, int rc, const pyw_delta_t *snap,
                                const char *err)
{
    waiter_t *w = s->snap_waiter;
    if (!s->snapping)
        return;
    s->snapping = 0;
    s->snap_waiter = NULL;
    if (rc || !snap) {
        cap_log(CAP_LOG_WARN, "engine", "session %s: snapshot failed: %s", s->sid, err ? err : "?");
        if (w)
            waiter_wake(w, rc ? rc : CAP_EWORKER);
        session_pump(e, s);
        return;
    }
    wal_field_t f[2] = {{ENG_C_BLOB, 0, snap->blob, snap->blob_len},
                        {ENG_C_ORDINAL, s->snap_ord, NULL, 0}};
    wal_rec_t rec = {ENG_REC_CHECKPOINT, s->sid, strlen(s->sid), f, 2};
    ckpt_ctx_t *c = cap_calloc(1, sizeof(*c));
    c->m.fn = ckpt_done;
    c->e = e;
    c->s = s;
    s->refs++;
    c->w = w;
    c->bytes = snap->blob_len;
    c->truncate = w ? (int)w->n : 0;
    int arc = wal_log_append(e->wal, &rec, 1, ckpt_wal_done, c, NULL);
    if (arc) {
        c->status = arc;
        ckpt_done(e, &c->m);
    }
    session_pump(e, s); /* the snapshot is taken: the next execution may change the namespace */
}

static void ckpt_done(eng_t *e, eng_msg_t *m)
{
    ckpt_ctx_t *c = (ckpt_ctx_t *)m;
    waiter_t *w = c->w;
    if (c->status && !w)
        cap_log(CAP_LOG_WARN, "engine", "automatic checkpoint not recorded: %s",
                cap_strerror(c->status));
    if (w) {
        w->n = c->bytes;
        w->p = (void *)(uintptr_t)(c->truncate ? c->seq : 0);
    }
    session_unref(c->s);
    int st = c->status;
    cap_free(c);
    if (!st && !e->dead) {
        pthread_mutex_lock(&e->mu);
        e->stats.checkpoints++;
        pthread_mutex_unlock(&e->mu);
    }
    if (w)
        waiter_wake(w, st);
}

/* -- close -- */
/* The engine's handles (wake; the idle, mark, placement and refill timers) live inside eng_t:
 * eng_close may free it only after their close callbacks ran (on the caller's loop, nothing else
 * would wait for them). */
static void on_handle_closed(uv_handle_t *h)
{
    eng_t *e = h->data;
    if (--e->open_handles == 0)
        waiter_wake(e->close_waiter, 0);
}
static void on_zpoll_last_closed(uv_handle_t *h)
{
    eng_t *e = h->data;
    cap_free(h);
    if (--e->open_handles == 0)
        waiter_wake(e->close_waiter, 0);
}
static void do_shutdown(eng_t *e, eng_msg_t *m)
{
    cap_free(m);
    e->closing = 1;
    eng_threads_pin(e, -1); /* a caller's loop thread leaves with the mask it came with */
    /* kill every worker; running executions stay pending in the log and re-run at next open */
    for (size_t b = 0; b < NBUCKET; b++)
        for (session_t *s = e->smap[b]; s; s = s->hnext)
            session_detach_worker(s);
    pthread_mutex_lock(&e->pool_mu);
    e->pool_closed = 1;
    while (e->ntransit) /* an opener between its pop and its post (no I/O in between) */
        pthread_cond_wait(&e->pool_cv, &e->pool_mu);
    wref_t *pool = e->pool;
    e->pool = NULL;
    e->npool = 0;
    pthread_mutex_unlock(&e->pool_mu);
    while (pool) {
        wref_t *r = pool;
        pool = r->next;
        worker_drop(r);
    }
    drain(e); /* (adoptions posted before the pool closed drop their worker here) */
    e->open_handles = 5;
    if (e->zpoll) {
        e->open_handles++;
        zy_unwatch(e, on_zpoll_last_closed);
    }
    cap_free(e->refill); /* its request, if answered, is killed by pyw_zygote_close */
    e->refill = NULL;
    if (e->zr_active) /* a replacement starting: wait for it, and close it */
        (void)zy_adopt(e);
    uv_close((uv_handle_t *)&e->itimer, on_handle_closed);
    eng__marks_free(&e->marks);
    uv_close((uv_handle_t *)&e->mtimer, on_handle_closed);
    uv_close((uv_handle_t *)&e->ptimer, on_handle_closed);
    uv_close((uv_handle_t *)&e->rtimer, on_handle_closed);
    e->dead = 1;
    pthread_mutex_lock(&e->mu);
    e->async_gone = 1;
    pthread_mutex_unlock(&e->mu);
    uv_poll_stop(&e->wake);
    uv_close((uv_handle_t *)&e->wake, on_handle_closed);
}

/* Idle expiry: the worker of a session unused for idle_release_ms goes back to the OS. */
static void on_itimer(uv_timer_t *t)
{
    eng_t *e = t->data;
    uint64_t now = cap_now_ns(), idle = (uint64_t)e->o.idle_release_ms * 1000000u;
    for (size_t b = 0; b < NBUCKET; b++)
        for (session_t *s = e->smap[b]; s; s = s->hnext)
            if (s->st == S_READY && s->w && !s->cur && !s->qhead && !s->snapping &&
                now - s->last_used >= idle) {
                session_detach_worker(s);
                s->st = S_COLD;
            }
}

/* ---------- stats ---------- */
struct prom_store *eng_promise_store(eng_t *e)
{
    return e->ps;
}

void eng_stats(eng_t *e, eng_stats_t *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    pthread_mutex_unlock(&e->mu);
    wal_stats_t ws;
    wal_log_stats(e->wal, &ws);
    out->wal_commits = ws.commits;
    pthread_mutex_lock(&e->mu);
    out->zygote_pid = e->zy ? pyw_zygote_pid(e->zy) : 0;
    pthread_mutex_unlock(&e->mu);
    out->wal_records = ws.records;
}

void eng_wal_stats(eng_t *e, wal_stats_t *out)
{
    wal_log_stats(e->wal, out);
}

/* ---------- open / close ---------- */
/* The loop writes to workers' sockets (requests, input replies, cancels, pings) and the zygote
 * thread to the zygote's: a peer that died meanwhile makes the write raise SIGPIPE, whose
 * default action kills the whole process that embeds the engine. Blocked on the engine's own
 * threads, the write fails with EPIPE instead (the death is handled when its exit is seen); the
 * signal stays pending on the thread, and a fork from it starts with none pending. */
static void block_sigpipe(void)
{
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, NULL);
}

static void loop_main(void *arg)
{
    eng_t *e = arg;
    prctl(PR_SET_NAME, "capsule-loop"); /* per-thread CPU figures (bench_engine), ps/top */
    block_sigpipe();
    uv_run(e->loop, UV_RUN_DEFAULT);
}

static int64_t hdr_i64(const prom_value_t *v, const char *k)
{
    for (size_t i = 0; i < v->nheaders; i++)
        if (strcmp(v->headers[i].key, k) == 0)
            return strtoll(v->headers[i].value, NULL, 10);
    return 0;
}

static int cmp_exec_ord(const void *a, const void *b)
{
    const exec_t *x = *(exec_t *const *)a, *y = *(exec_t *const *)b;
    return x->wid < y->wid ? -1 : x->wid > y->wid;
}

/* Finds open sessions and interrupted executions (before the loop runs: no locking needed). */
static int recover(eng_t *e)
{
    /* ONE scan of the pending promises (the documents are read once): sessions are created at
     * once, executions are kept and handled after the scan, when every session exists */
    prom_search_t q = {PROM_PENDING, NULL, 0, 1000, NULL};
    prom_result_t res;
    char *cursor = NULL;
    int rc;
    exec_t **xs = NULL;
    size_t nx = 0, capx = 0;
    prom_promise_t *px = NULL;
    size_t npx = 0, cappx = 0;
    for (;;) {
        q.cursor = cursor;
        rc = prom_promise_search(e->ps, &q, &res);
        cap_free(cursor);
        cursor = NULL;
        if (rc)
            goto out;
        for (size_t i = 0; i < res.npromises; i++) {
            prom_promise_t *p = &res.promises[i];
            const char *kind = prom_promise_tag(p, "capsule:kind");
            if (!kind)
                continue;
            if (strcmp(kind, "exec") == 0 && strncmp(p->id, "capsule/x/", 10) == 0) {
                if (npx == cappx) {
                    cappx = cappx ? cappx * 2 : 64;
                    px = cap_realloc(px, cappx * sizeof(*px));
                }
                prom_promise_copy(&px[npx++], p);
                continue;
            }
            const char *sid = p->id + strlen("capsule/s/");
            if (strcmp(kind, "session") != 0 || strncmp(p->id, "capsule/s/", 10) != 0 ||
                !eng__id_valid(sid))
                continue;
            eng_session_opts_t so = {0};
            so.tx = (eng_tx_t)hdr_i64(&p->param, "capsule:tx");
            so.timeout_ms = (uint32_t)hdr_i64(&p->param, "capsule:timeout_ms");
            so.mem_bytes = (uint64_t)hdr_i64(&p->param, "capsule:mem_bytes");
            so.cpu_seconds = (uint32_t)hdr_i64(&p->param, "capsule:cpu_seconds");
            so.retry_on_death = (int)hdr_i64(&p->param, "capsule:retry");
            e->nsessions++; /* recovered: not limited */
            session_t *s = session_new(e, sid, &so);
            s->st = S_COLD;
            rc = eng__last_ordinal(&e->tb, sid, &s->last_ord);
            if (rc) {
                prom_result_clear(&res);
                goto out;
            }
        }
        cursor = xstrdup(res.cursor);
        prom_result_clear(&res);
        if (!cursor)
            break;
    }
    for (size_t i = 0; i < npx; i++) {
        prom_promise_t *p = &px[i];
        const char *eid = p->id + strlen("capsule/x/");
        const char *sid = prom_promise_tag(p, "capsule:session");
        eng_result_t *r = NULL;
        if (!eng__id_valid(eid))
            continue;
        if (eng__result_read(&e->tb, eid, &r) == 0) {
            /* finished before the crash; only its settle was lost: repair it */
            prom_result_t sr;
            prom_value_t v = {0};
            prom_settle_t st = {p->id, r->status == ENG_ST_OK ? PROM_RESOLVED : PROM_REJECTED, &v};
            prom_promise_settle(e->ps, &st, &sr);
            prom_result_clear(&sr);
            eng_result_free(r);
            continue;
        }
        session_t *s = sid ? smap_get(e, sid) : NULL;
        if (!s) {
            prom_result_t sr;
            prom_settle_t st = {p->id, PROM_REJECTED_CANCELED, NULL};
            prom_promise_settle(e->ps, &st, &sr);
            prom_result_clear(&sr);
            continue;
        }
        exec_t *x = exec_new(e, s, eid, p->param.data ? p->param.data : "", p->param.len,
                             (eng_tx_t)hdr_i64(&p->param, "capsule:tx"));
        int64_t tmo = hdr_i64(&p->param, "capsule:timeout_ms");
        x->timeout_ms = tmo > 0 && tmo <= UINT32_MAX ? (uint32_t)tmo : 0;
        x->created = 1;
        x->restarted = 1;
        x->st = X_QUEUED;
        x->wid = (uint64_t)hdr_i64(&p->param, "capsule:ord"); /* order, reset when run */
        if ((uint64_t)x->wid > e->ord_next)
            e->ord_next = x->wid;
        if (nx == capx) {
            capx = capx ? capx * 2 : 64;
            xs = cap_realloc(xs, capx * sizeof(*xs));
        }
        xs[nx++] = x;
    }
    if (nx)
        qsort(xs, nx, sizeof(*xs), cmp_exec_ord);
    for (size_t i = 0; i < nx; i++) {
        xmap_put(e, xs[i]);
        queue_push(xs[i]->s, xs[i]);
        xs[i]->wid = 0;
    }
    stats_add(e, (eng_stats_t){.recovered_execs = nx, .queued = (uint32_t)nx});
    rc = 0;
out:
    for (size_t i = 0; i < npx; i++)
        prom_promise_clear(&px[i]);
    cap_free(px);
    cap_free(xs);
    cap_free(cursor);
    return rc;
}

static void do_start(eng_t *e, eng_msg_t *m)
{
    cap_free(m);
    zy_watch(e);
    pool_request(e);
    for (size_t b = 0; b < NBUCKET; b++)
        for (session_t *s = e->smap[b]; s; s = s->hnext)
            if (s->qhead || e->o.eager_restore)
                session_restore(e, s);
}

typedef struct zy_start {
    pthread_t thread;
    pyw_zygote_options_t zo;
    pyw_zygote_t *z;
    int rc;
    uint64_t ready_ns;
} zy_start_t;

static void *zygote_main(void *arg);

static void *zygote_thread(void *arg)
{
    block_sigpipe();
    return zygote_main(arg);
}

static void *zygote_main(void *arg)
{
    zy_start_t *zs = arg;
    uint64_t t0 = cap_now_ns();
    zs->rc = pyw_zygote_open(&zs->zo, &zs->z);
    zs->ready_ns = cap_now_ns() - t0;
    return NULL;
}

/* The threads of this process (at most max), from /proc/self/task. */
static int list_tids(pid_t *out, int max)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && n < max) {
        char *end;
        long t = strtol(de->d_name, &end, 10);
        if (!*end && t > 0)
            out[n++] = (pid_t)t;
    }
    closedir(d);
    return n;
}

/* Whether thread tid of this process is named name (/proc/self/task/TID/comm). */
static int tid_named(pid_t tid, const char *name)
{
    char path[64], comm[32] = "";
    snprintf(path, sizeof(path), "/proc/self/task/%d/comm", (int)tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    int ok = fgets(comm, sizeof(comm), f) != NULL;
    fclose(f);
    comm[strcspn(comm, "\n")] = 0;
    return ok && strcmp(comm, name) == 0;
}

/* Of the threads prom_store_open started, the one a lone execution's commits run on (the wal
 * writer; not the checkpoint thread nor the document flusher, which work in the background and,
 * pinned, would take the loop's CPU while the other idles), and the mask to return it to, for
 * CPU placement. */
static void note_new_tids(eng_t *e, const pid_t *before, int nbefore)
{
    pid_t now[64];
    int n = list_tids(now, 64);
    long len = syscall(SYS_sched_getaffinity, 0, sizeof e->mask0, e->mask0);
    e->mask0_len = len > 0 ? (size_t)len : 0;
    int io = eng__io_cpu(e->dir);
    if (io >= 0 && (size_t)io / 8 < e->mask0_len && (e->mask0[io / 64] >> (io % 64) & 1))
        e->io_cpu = io; /* only a CPU this process may run on */
    for (int i = 0; i < n && e->neng_tids < ENG_MAX_OWN_TIDS; i++) {
        int old = 0;
        for (int k = 0; k < nbefore && !old; k++)
            old = now[i] == before[k];
        if (!old && tid_named(now[i], WAL_THREAD_WRITER))
            e->eng_tids[e->neng_tids++] = now[i];
    }
}

int eng_open(const eng_opts_t *opts, eng_t **out)
{
    if (!opts || !opts->dir || !out)
        return CAP_EINVAL;
    int wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd < 0) {
        int rc = -errno;
        cap_log(CAP_LOG_ERROR, "engine", "open %s: eventfd: %s", opts->dir, cap_strerror(rc));
        return rc;
    }
    eng_t *e = cap_calloc(1, sizeof(*e));
    int rc;
    e->wake_fd = wake_fd; /* posts before the loop watches it only count up: nothing is lost */
    e->o = *opts;
    e->dir = cap_strdup(opts->dir);
    e->worker_path = xstrdup(opts->worker_path);
    e->warmup = xstrdup(opts->warmup);
    if (!e->o.pool_idle)
        e->o.pool_idle = 2;
    if (!e->o.max_sessions)
        e->o.max_sessions = 1024;
    if (!e->o.max_queue)
        e->o.max_queue = 64;
    if (!e->o.max_output)
        e->o.max_output = 1u << 20;
    e->ord_next = (uint64_t)cap_wall_ms() * 1000;
    e->eng_cpu = -1;
    e->io_cpu = -1;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->pool_mu, NULL);
    pthread_cond_init(&e->pool_cv, NULL);
    e->pcb.on_output = pcb_output;
    e->pcb.on_input = pcb_input;
    e->pcb.on_promise = pcb_promise;
    e->pcb.on_result = pcb_result;
    e->pcb.on_applied = pcb_applied;
    e->pcb.on_snapshot = pcb_snapshot;
    e->pcb.on_exit = pcb_exit;

    /* the zygote starts (a fork + exec, waiting for its READY) while the store loads */
    zy_start_t zs = {0};
    zs.zo.worker_path = e->worker_path;
    zs.zo.warmup = e->warmup;
    uint64_t t0 = cap_now_ns();
    int zy_thread = pthread_create(&zs.thread, NULL, zygote_thread, &zs) == 0;
    if (!zy_thread)
        zygote_main(&zs);
    store_env_opts_t so = {0};
    so.nosync = opts->nosync;
    so.map_size = opts->map_size;
    rc = store_env_open(e->dir, &so, &e->env);
    if (!rc)
        rc = eng__tables_open(e->env, &e->tb);
    prom_opts_t po = {0};
    po.wal.durability = opts->nosync ? WAL_NOSYNC : WAL_SYNC;
    po.wal.apply = eng__apply;
    po.wal.apply_arg = &e->tb;
    po.on_settle = on_prom_settle;
    po.on_settle_arg = e;
    /* prom.docs in each commit, not checkpointed behind the log (promise/'s default):
     * capsule-replay's listings read prom.docs as the state of a live or killed engine's
     * directory and do not overlay the log's tail yet */
    po.checkpoint_ms = -1;
    pid_t before[64];
    int nbefore = list_tids(before, 64);
    if (!rc)
        rc = prom_store_open(e->env, &po, &e->ps);
    if (!rc)
        note_new_tids(e, before, nbefore);
    if (!rc)
        e->wal = prom_store_wal(e->ps);
    uint64_t t1 = cap_now_ns();
    if (!rc)
        rc = recover(e);
    uint64_t t2 = cap_now_ns();
    if (zy_thread)
        pthread_join(zs.thread, NULL);
    e->zy = zs.z;
    if (!rc)
        rc = zs.rc;
    if (rc)
        goto fail;
    cap_log(CAP_LOG_INFO, "engine",
            "open %s: store %.1f ms, recovery scan %.1f ms, zygote ready at %.1f ms; %u open "
            "sessions, %llu interrupted executions",
            e->dir, (double)(t1 - t0) / 1e6, (double)(t2 - t1) / 1e6, (double)zs.ready_ns / 1e6,
            e->nsessions, (unsigned long long)e->stats.recovered_execs);
    if (!e->o.nosync && eng__halt_poll_ns() == 0)
        cap_log(CAP_LOG_INFO, "engine",
                "this VM's vCPUs halt at once when idle (cpuidle haltpoll, guest_halt_poll_ns = "
                "0): each durable step waits for a halted vCPU to run again; raising it (e.g. "
                "200000) made a lone sync execution about 1.3x faster here (README, Tuning)");

    if (opts->loop) {
        e->loop = opts->loop;
        e->pin_loop = opts->pin_loop && opts->affinity == ENG_AFFINITY_AUTO;
    } else {
        rc = uv_loop_init(&e->own_loop);
        if (rc)
            goto fail;
        e->loop = &e->own_loop;
        e->own = 1;
    }
    rc = uv_poll_init(e->loop, &e->wake, e->wake_fd);
    if (rc == 0)
        rc = uv_poll_start(&e->wake, UV_READABLE, on_wake);
    if (rc) /* a libuv code is -errno */
        goto fail;
    e->wake.data = e;
    __atomic_store_n(&e->observe, 1, __ATOMIC_RELEASE);
    uv_timer_init(e->loop, &e->itimer);
    e->itimer.data = e;
    uv_timer_init(e->loop, &e->mtimer);
    e->mtimer.data = e;
    uv_timer_init(e->loop, &e->ptimer);
    e->ptimer.data = e;
    uv_timer_init(e->loop, &e->rtimer);
    e->rtimer.data = e;
    if (e->o.idle_release_ms) {
        uint64_t every = e->o.idle_release_ms / 4 ? e->o.idle_release_ms / 4 : 1;
        uv_timer_start(&e->itimer, on_itimer, every, every);
    }
    eng_msg_t *start = cap_calloc(1, sizeof(*start));
    start->fn = do_start;
    post(e, start);
    if (e->own && uv_thread_create(&e->thread, loop_main, e) != 0)
        cap_fatal("engine", "cannot start the loop thread");
    *out = e;
    return 0;
fail:
    cap_log(CAP_LOG_ERROR, "engine", "open %s failed: %s", opts->dir, cap_strerror(rc));
    for (size_t b = 0; b < NBUCKET; b++) {
        while (e->xmap[b]) {
            exec_t *x = e->xmap[b];
            e->xmap[b] = x->hnext;
            exec_unref(x);
            exec_unref(x);
        }
        while (e->smap[b]) {
            session_t *s = e->smap[b];
            e->smap[b] = s->hnext;
            session_unref(s);
        }
    }
    if (e->own)
        uv_loop_close(&e->own_loop);
    pyw_zygote_close(e->zy);
    prom_store_close(e->ps);
    store_env_close(e->env);
    while (e->pwaits) {
        pwait_t *w = e->pwaits;
        e->pwaits = w->next;
        pwait_free(w);
    }
    close(e->wake_fd);
    cap_free(e->dir);
    cap_free(e->worker_path);
    cap_free(e->warmup);
    cap_free(e);
    return rc;
}

void eng_close(eng_t *e)
{
    if (!e)
        return;
    waiter_t w;
    waiter_init(&w);
    pthread_mutex_lock(&e->mu);
    e->close_waiter = &w;
    pthread_mutex_unlock(&e->mu);
    eng_msg_t *m = cap_calloc(1, sizeof(*m));
    m->fn = do_shutdown;
    post(e, m);
    waiter_wait(&w);
    if (e->own) {
        uv_thread_join(&e->thread);
        /* the workers' handles close in later loop turns */
        uv_run(e->loop, UV_RUN_DEFAULT);
    }
    prom_store_close(e->ps); /* acknowledges queued records: their callbacks post */
    drain(e);
    for (size_t b = 0; b < NBUCKET; b++) {
        while (e->xmap[b]) {
            exec_t *x = e->xmap[b];
            e->xmap[b] = x->hnext;
            exec_t *q = x;
            (void)q;
            x->nls = 0;
            exec_unref(x); /* the map's */
        }
    }
    for (size_t b = 0; b < NBUCKET; b++) {
        while (e->smap[b]) {
            session_t *s = e->smap[b];
            e->smap[b] = s->hnext;
            while (s->qhead) {
                exec_t *x = s->qhead;
                s->qhead = x->qnext;
                exec_unref(x);
            }
            if (s->cur)
                exec_unref(s->cur);
            session_unref(s);
        }
    }
    if (e->own)
        uv_loop_close(&e->own_loop);
    pyw_reap_wait(); /* closed workers are gone before eng_close returns */
    pyw_zygote_close(e->zy);
    store_env_close(e->env);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->pool_mu);
    pthread_cond_destroy(&e->pool_cv);
    close(e->wake_fd); /* every poster is gone: the loop, the wal writer (store closed) */
    cap_free(e->dir);
    cap_free(e->worker_path);
    cap_free(e->warmup);
    cap_free(e);
}

/* ---------- public commands ---------- */
static cmd_t *cmd_new(eng_msg_fn fn)
{
    cmd_t *c = cap_calloc(1, sizeof(*c));
    c->m.fn = fn;
    return c;
}

/* ---------- the acquire on the opener's thread ----------
 * eng_session_open of a new session with pooled workers does not wait for the loop: the opener's
 * thread checks that the id is unknown, reserves a session (max_sessions), appends the session
 * promise (prom_* may be called from any thread: the record precedes every record of the
 * session's executions, which are appended on the loop after the opener posts them), pops an
 * idle worker under pool_mu and posts the adoption; the loop builds the session from it before
 * any later command of that thread. What the acquire waited for before (the loop thread getting
 * a CPU, twice) moves into the first execution, which waits for the loop anyway. Anything else
 * (an id already known, its own limits, the limit reached, a closing engine) goes to the loop as
 * before. */
typedef struct fastopen {
    job_t *j;          /* the promise create: headers, tags, res (valid until durable) */
    _Atomic int holds; /* the opener's and the completion's */
} fastopen_t;

static void fastopen_release(fastopen_t *f)
{
    if (atomic_fetch_sub(&f->holds, 1) == 1) {
        job_free(f->j);
        cap_free(f);
    }
}

/* prom_done_fn (the wal writer, or the opener before the create returns) */
static void fastopen_durable(void *arg, int rc)
{
    fastopen_t *f = arg;
    if (rc) /* the log failed or closed after the append: the session's next records fail too */
        cap_log(CAP_LOG_ERROR, "engine", "%s: record not durable: %s", f->j->id, cap_strerror(rc));
    fastopen_release(f);
}

/* Loop: the session an opener created and popped a worker for (c->arg: the worker, or NULL
 * when the pool was empty). */
static void do_session_adopt(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    wref_t *r = c->arg;
    if (r) {
        pthread_mutex_lock(&e->pool_mu);
        r->transit = 0;
        int died = r->died;
        pthread_mutex_unlock(&e->pool_mu);
        if (died || pyw_worker_exited(r->w)) {
            /* died after the pop: never handed out (an exit not handled yet drops it then) */
            cap_log(CAP_LOG_INFO, "engine", "pool: worker %d died idle; taking another",
                    pyw_worker_pid(r->w));
            stats_add(e, (eng_stats_t){.pool_dead = 1});
            if (died)
                worker_drop(r);
            r = NULL;
        }
    }
    if (e->dead || e->closing) {
        if (r && !e->dead)
            worker_drop(r);
        e->nsessions--;
        goto out;
    }
    session_t *s = smap_get(e, c->sid);
    if (s) {
        /* another opener of the same id came first: it is that session */
        if (r && e->npool < e->o.pool_idle)
            pool_add(e, r);
        else if (r)
            worker_drop(r);
        e->nsessions--;
        goto out;
    }
    s = session_new(e, c->sid, &c->so);
    s->st = S_COLD; /* new: no ordinal, nothing to restore */
    if (r) {
        r->s = s;
        s->w = r;
        s->st = S_RESTORING;
        s->applies = 0;
        restore_done(e, s);
    } else {
        session_start(e, s); /* the pool was empty: a worker from the zygote */
    }
    refill_schedule(e);
out:
    cmd_free(c);
}

/* Opener's thread. 0: opened (the loop adopts it); 1: for the loop to answer; or an error. */
static int session_open_fast(eng_t *e, const char *sid, const eng_session_opts_t *o)
{
    eng_session_opts_t so = {0};
    if (o)
        so = *o;
    so.warmup = NULL;
    if (so.mem_bytes || so.cpu_seconds)
        return 1; /* a worker with its own limits (spawned on the loop) */
    pthread_mutex_lock(&e->pool_mu);
    int closed = e->pool_closed;
    pthread_mutex_unlock(&e->pool_mu);
    if (closed)
        return 1;
    job_t *j = session_job(sid, &so, NULL);
    prom_result_t g = {0};
    int rc = prom_promise_get(e->ps, j->id, &g);
    int known = rc != 0 || g.status != PROM_S_NOTFOUND;
    prom_result_clear(&g);
    if (known || sess_reserve(e)) {
        /* open already, closed (its id is not reused) or unreadable; or at the limit (an open
         * id would still be answered as open): the loop answers */
        job_free(j);
        return 1;
    }
    fastopen_t *f = cap_calloc(1, sizeof(*f));
    f->j = j;
    atomic_init(&f->holds, 2);
    prom_value_t v = {f->j->hdr, f->j->nhdr, NULL, 0};
    prom_create_t cr = {f->j->id, PROM_FOREVER, &v, f->j->tags, f->j->ntags};
    rc = prom_promise_create_async(e->ps, &cr, &f->j->res, fastopen_durable, f);
    if (rc) {
        /* nothing appended, no completion */
        e->nsessions--;
        job_free(f->j);
        cap_free(f);
        return rc;
    }
    rc = session_create_rc(f->j, 0); /* CAP_EEXIST: closed since the get */
    fastopen_release(f);
    if (rc) {
        e->nsessions--;
        return rc;
    }
    wref_t *r = NULL;
    int dead = 0;
    pthread_mutex_lock(&e->pool_mu);
    closed = e->pool_closed;
    if (!closed && (r = pool_pop_live_locked(e, &dead)) != NULL) {
        r->transit = 1;
        e->ntransit++;
    }
    pthread_mutex_unlock(&e->pool_mu);
    if (dead)
        stats_add(e, (eng_stats_t){.pool_dead = (uint64_t)dead});
    if (closed) {
        /* closing: the session's record stays (after a restart it is an empty open session) */
        e->nsessions--;
        return CAP_ECLOSED;
    }
    cmd_t *c = cmd_new(do_session_adopt);
    c->sid = cap_strdup(sid);
    c->so = so;
    c->arg = r;
    post(e, &c->m);
    if (r) {
        pthread_mutex_lock(&e->pool_mu);
        if (--e->ntransit == 0 && e->pool_closed)
            pthread_cond_broadcast(&e->pool_cv);
        pthread_mutex_unlock(&e->pool_mu);
    }
    return 0;
}

int eng_session_open(eng_t *e, const char *sid, const eng_session_opts_t *o, char **sid_out)
{
    if (!e || (sid && !eng__id_valid(sid)) ||
        (o && (o->tx < ENG_TX_DEFAULT || o->tx > ENG_TX_ROLLBACK_ALWAYS)))
        return CAP_EINVAL;
    char *id = sid ? cap_strdup(sid) : NULL;
    if (!id) {
        char b[64];
        pthread_mutex_lock(&e->mu);
        snprintf(b, sizeof(b), "s%llx-%llx", (unsigned long long)cap_wall_ms(),
                 (unsigned long long)++e->gen_ctr);
        pthread_mutex_unlock(&e->mu);
        id = cap_strdup(b);
    }
    int rc = session_open_fast(e, id, o);
    if (rc > 0) {
        waiter_t w;
        waiter_init(&w);
        cmd_t *c = cmd_new(do_session_open);
        c->sid = cap_strdup(id);
        if (o)
            c->so = *o;
        c->w = &w;
        post(e, &c->m);
        rc = waiter_wait(&w);
    }
    if (rc == 0 && o && o->warmup) {
        /* the session's warm-up is its first execution, recorded like any other (so a restore
         * brings its names back); its id makes it run once even if the open is repeated */
        char wid[ENG_MAX_ID + 16];
        snprintf(wid, sizeof(wid), "%.*s:warmup", ENG_MAX_ID - 8, id);
        eng_exec_req_t rq = {0};
        rq.sid = id;
        rq.eid = wid;
        rq.code = o->warmup;
        rq.tx = ENG_TX_COMMIT_ALWAYS;
        eng_result_t *r = NULL;
        rc = eng_execute_sync(e, &rq, NULL, 0, &r);
        if (rc == 0 && r->status != ENG_ST_OK) {
            cap_log(CAP_LOG_WARN, "engine", "session %s: warm-up failed: %s: %s", id,
                    r->etype ? r->etype : "?", r->emsg ? r->emsg : "");
            rc = CAP_EUNPROCESSABLE;
        }
        eng_result_free(r);
    }
    if (rc == 0 && sid_out)
        *sid_out = id;
    else
        cap_free(id);
    return rc;
}

int eng_session_close(eng_t *e, const char *sid)
{
    if (!e || !sid || !eng__id_valid(sid))
        return CAP_EINVAL;
    waiter_t w;
    waiter_init(&w);
    cmd_t *c = cmd_new(do_session_close);
    c->sid = cap_strdup(sid);
    c->w = &w;
    post(e, &c->m);
    return waiter_wait(&w);
}

static void do_session_info(eng_t *e, eng_msg_t *m)
{
    cmd_t *c = (cmd_t *)m;
    session_t *s = e->dead ? NULL : smap_get(e, c->sid);
    int rc = 0;
    if (!s || s->st == S_CLOSING || s->st == S_CREATING) {
        rc = e->dead ? CAP_ECLOSED : CAP_ENOTFOUND;
    } else {
        eng_session_info_t *out = c->arg;
        out->opts = s->so;
        out->opts.warmup = NULL;
        out->ordinal = s->last_ord;
        out->queued = s->qlen;
        out->running = s->cur != NULL;
        out->live = s->w != NULL;
    }
    waiter_wake(c->w, rc);
    cmd_free(c);
}

int eng_session_info(eng_t *e, const char *sid, eng_session_info_t *out)
{
    if (!e || !sid || !eng__id_valid(sid) || !out)
        return CAP_EINVAL;
    memset(out, 0, sizeof(*out));
    waiter_t w;
    waiter_init(&w);
    cmd_t *c = cmd_new(do_session_info);
    c->sid = cap_strdup(sid);
    c->arg = out;
    c->w = &w;
    post(e, &c->m);
    return waiter_wait(&w);
}

int eng_session_release(eng_t *e, const char *sid)
{
    if (!e || !sid || !eng__id_valid(sid))
        return CAP_EINVAL;
    waiter_t w;
    waiter_init(&w);
    cmd_t *c = cmd_new(do_session_release);
    c->sid = cap_strdup(sid);
    c->w = &w;
    post(e, &c->m);
    return waiter_wait(&w);
}

int eng_session_list(eng_t *e, char ***sids, size_t *n)
{
    if (!e || !sids || !n)
        return CAP_EINVAL;
    waiter_t w;
    waiter_init(&w);
    cmd_t *c = cmd_new(do_session_list);
    c->w = &w;
    post(e, &c->m);
    int rc = waiter_wait(&w);
    if (rc == 0) {
        *sids = w.p;
        *n = w.n;
    }
    return rc;
}

int eng_session_fork(eng_t *e, const char *src, uint64_t ordinal, const char *new_sid)
{
    if (!e || !eng__id_valid(src) || !eng__id_valid(new_sid) || strcmp(src, new_sid) == 0)
        return CAP_EINVAL;
    waiter_t w;
    waiter_init(&w);
    cmd_t *c = cmd_new(do_fork);
    c->sid = cap_strdup(src);
    c->sid2 = cap_strdup(new_sid);
    c->u = ordinal;
    c->w = &w;
    post(e, &c->m);
    return waiter_wait(&w);
}

int eng_checkpoint(eng_t *e, const char *sid, int truncate, size_t *bytes)
{
    if (!e || !eng__id_valid(sid))
        return CAP_EINVAL;
    waiter_t w;
    waiter_init(&w);
    cmd_t *c = cmd_new(do_checkpoint);
    c->sid = cap_strdup(sid);
    c->flag = truncate;
    c->w = &w;
    post(e, &c->m);
    int rc = waiter_wait(&w);
    if (rc == 0) {
        if (bytes)
            *bytes = w.n;
        uint64_t seq = (uint64_t)(uintptr_t)w.p;
        /* every engine fact lives in tables the log's apply keeps, every promise document in
         * prom.docs up to prom_store_checkpoint_seq (its checkpoint lags the log: written now):
         * records before both are no longer needed to rebuild anything */
        if (truncate && seq) {
            rc = prom_store_checkpoint(e->ps);
            uint64_t pseq = prom_store_checkpoint_seq(e->ps) + 1;
            if (pseq < seq)
                seq = pseq;
        }
        if (rc == 0 && truncate && seq)
            rc = wal_log_truncate(e->wal, seq);
    }
    return rc;
}

int eng_execute(eng_t *e, const eng_exec_req_t *req, const eng_exec_cb_t *cb, void *arg)
{
    if (!e || !req || !req->sid || !req->code || !eng__id_valid(req->sid) ||
        (req->eid && !eng__id_valid(req->eid)) || req->tx < ENG_TX_DEFAULT ||
        req->tx > ENG_TX_ROLLBACK_ALWAYS)
        return CAP_EINVAL;
    cmd_t *c = cmd_new(do_execute);
    c->req = *req;
    c->sid = cap_strdup(req->sid);
    pthread_mutex_lock(&e->mu);
    int closing = e->closing;
    c->eid = req->eid ? cap_strdup(req->eid) : gen_id(e, "x");
    c->flag = !req->eid; /* a generated id has no recorded result to look up */
    pthread_mutex_unlock(&e->mu);
    if (closing) {
        cmd_free(c);
        return CAP_ECLOSED;
    }
    c->len = req->len ? req->len : strlen(req->code);
    c->code = cap_malloc(c->len + 1);
    memcpy(c->code, req->code, c->len);
    c->code[c->len] = 0;
    if (cb)
        c->cb = *cb;
    c->arg = arg;
    post(e, &c->m);
    return 0;
}

int eng_input_reply(eng_t *e, const char *eid, const char *text, size_t len, int eof)
{
    if (!e || !eid || !eng__id_valid(eid))
        return CAP_EINVAL;
    cmd_t *c = cmd_new(do_input);
    c->eid = cap_strdup(eid);
    if (text && !eof) {
        c->text = cap_malloc(len + 1);
        memcpy(c->text, text, len);
        c->text[len] = 0;
        c->len = len;
    }
    c->eof = eof;
    post(e, &c->m);
    return 0;
}

int eng_cancel(eng_t *e, const char *eid)
{
    if (!e || !eid || !eng__id_valid(eid))
        return CAP_EINVAL;
    cmd_t *c = cmd_new(do_cancel);
    c->eid = cap_strdup(eid);
    post(e, &c->m);
    return 0;
}

/* -- the blocking execute -- */
typedef struct sync_ctx {
    eng_t *e;
    waiter_t w;
    const char *const *inputs;
    size_t n_inputs, next_input;
    eng_result_t *r;
} sync_ctx_t;

static void sync_on_input(void *arg, const char *eid, const char *prompt, int password)
{
    (void)prompt;
    (void)password;
    sync_ctx_t *c = arg;
    const char *t = c->next_input < c->n_inputs ? c->inputs[c->next_input] : NULL;
    c->next_input++;
    eng_input_reply(c->e, eid, t, t ? strlen(t) : 0, t == NULL);
}

static void sync_on_restarted(void *arg, const char *eid)
{
    (void)eid;
    sync_ctx_t *c = arg;
    c->next_input = 0;
}

static void sync_on_done(void *arg, const eng_result_t *r)
{
    sync_ctx_t *c = arg;
    c->r = eng__result_dup(r);
    waiter_wake(&c->w, 0);
}

int eng_execute_sync(eng_t *e, const eng_exec_req_t *req, const char *const *inputs,
                     size_t n_inputs, eng_result_t **out)
{
    if (!out)
        return CAP_EINVAL;
    sync_ctx_t c = {0};
    c.e = e;
    c.inputs = inputs;
    c.n_inputs = n_inputs;
    waiter_init(&c.w);
    eng_exec_cb_t cb = {0};
    cb.on_input = sync_on_input;
    cb.on_restarted = sync_on_restarted;
    cb.on_done = sync_on_done;
    int rc = eng_execute(e, req, &cb, &c);
    if (rc) {
        pthread_mutex_destroy(&c.w.mu);
        pthread_cond_destroy(&c.w.cv);
        return rc;
    }
    waiter_wait(&c.w);
    *out = c.r;
    return 0;
}

int eng_promise_settle(eng_t *e, const char *id, int resolve, const void *data, size_t len,
                       int *state)
{
    if (!e || !id || !*id || strlen(id) > ENG_MAX_ID)
        return CAP_EINVAL;
    char *pid = eng__ext_pid(NULL, id);
    prom_value_t v = {NULL, 0, (void *)data, data ? len : 0};
    prom_settle_t st = {pid, resolve ? PROM_RESOLVED : PROM_REJECTED, &v};
    prom_result_t res = {0};
    int rc = prom_promise_settle(e->ps, &st, &res);
    cap_free(pid);
    if (!rc && res.status == PROM_S_NOTFOUND)
        rc = CAP_ENOTFOUND;
    else if (!rc && (res.status != PROM_S_OK || !res.promise))
        rc = CAP_EINVAL;
    if (!rc && state)
        *state = res.promise->state == PROM_RESOLVED ? 1 : 2;
    prom_result_clear(&res);
    return rc;
}

int eng_tasks_list(eng_t *e, const char *eid, eng_task_info_t **out, size_t *n)
{
    if (!e || !eid || !out || !n)
        return CAP_EINVAL;
    return eng__tasks_list(e->ps, eid, out, n);
}

int eng_exec_session(eng_t *e, const char *eid, char **sid)
{
    if (!e || !eid || !eng__id_valid(eid) || !sid)
        return CAP_EINVAL;
    *sid = NULL;
    char *pid = exec_pid(eid);
    prom_result_t res;
    int rc = prom_promise_get(e->ps, pid, &res);
    cap_free(pid);
    if (rc)
        return rc;
    const char *s = NULL;
    if (res.status == PROM_S_OK && res.promise && res.promise->state == PROM_PENDING)
        s = prom_promise_tag(res.promise, "capsule:session");
    if (s)
        *sid = cap_strdup(s);
    prom_result_clear(&res);
    return *sid ? 0 : CAP_ENOTFOUND;
}

int eng_result_get(eng_t *e, const char *eid, eng_result_t **out)
{
    if (!e || !eid || !eng__id_valid(eid) || !out)
        return CAP_EINVAL;
    int rc = eng__result_read(&e->tb, eid, out);
    if (rc != CAP_ENOTFOUND)
        return rc;
    char *pid = exec_pid(eid);
    prom_result_t res;
    rc = prom_promise_get(e->ps, pid, &res);
    cap_free(pid);
    if (rc == 0)
        rc = res.status == PROM_S_OK ? CAP_EBUSY : CAP_ENOTFOUND;
    prom_result_clear(&res);
    /* finished between the two reads */
    if (rc == CAP_EBUSY && eng__result_read(&e->tb, eid, out) == 0)
        rc = 0;
    return rc;
}
