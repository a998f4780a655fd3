/*
 * bench_engine.c - the engine's speed goals, measured side by side with their peers in one run.
 *
 *   1. durable `2+2` through the C API (eng_execute_sync), p50/p99, WAL_SYNC and WAL_NOSYNC,
 *      beside one raw LMDB put+commit (sync / MDB_NOSYNC) measured interleaved in the same run;
 *      and the same engine on the caller's own libuv loop (eng_execute from a loop callback to
 *      on_done, with eng_opts_t.pin_loop as capsule-engine sets it: what a pipeline embedding
 *      the library on its loop sees, without the two thread hops of the blocking call),
 *      interleaved with them.
 *   2. executions/s across 64 busy sessions (durable, sync): each session resubmits from its
 *      done callback; peer: 1 / the raw LMDB commit p50 (what no group commit would allow). Then
 *      the same with a second cell queued behind each running one (no goal: whether waiting for
 *      the request commit is what limits the rate).
 *   3. session acquire from the warm pool (eng_session_open: no commit waited for; the session's
 *      record is committed with its first execution), p50/p99 over 1000 acquires, each from a
 *      refilled pool; and open + first `2+2` (until its durable result, which makes the open
 *      durable too), p50/p99.
 *   4. private memory (Private_Clean + Private_Dirty from smaps_rollup) of the workers of N idle
 *      sessions, per session, beside one idle plain /usr/bin/python3.11.
 *   5. recovery of a log with S sessions x E executions (built with real executions, sessions'
 *      workers released in waves): time until eng_open returns (serving), and until a restored
 *      session answers its first execution.
 *   6. a CPU-bound cell in a fresh session vs the same code as a script of /usr/bin/python3.11
 *      (CPU time, median of 11 alternating rounds; wall time and the engine's share beside it).
 *
 * Human table on stderr; one JSON object per figure on stdout (bench, metric, value, unit, peer,
 * peer_value, ratio, goal, met). Usage: bench_engine [--quick] [--dir DIR] [--only PART]
 * (PART: lat, lat-sync, lat-nosync, tp, acq, mem, rec, cpu)
 * [--rec-execs N]; --rec-execs runs only 5. on a log of N executions (bench/run's recovery curve).
 */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <lmdb.h>

#include "bench.h"
#include "capsule.h"

static int quick;
static char base_dir[1024];

static void die(const char *what, int rc)
{
    fprintf(stderr, "bench_engine: %s failed: %d %s\n", what, rc, cap_strerror(rc));
    exit(1);
}

static void fresh_dir(char *out, size_t n, const char *tag)
{
    char t[256];
    snprintf(t, sizeof(t), "capsule-bench-eng-%d-%s", (int)getpid(), tag);
    bench_fresh_dir(out, n, base_dir, t);
}

/* ---- the raw LMDB peer ---- */
typedef struct lmdb_peer {
    MDB_env *env;
    MDB_dbi dbi;
    uint64_t seq;
} lmdb_peer_t;

static void lmdb_open(lmdb_peer_t *p, const char *dir, int nosync)
{
    int rc;
    MDB_txn *t;
    memset(p, 0, sizeof(*p));
    if ((rc = mdb_env_create(&p->env)) || (rc = mdb_env_set_mapsize(p->env, 256u << 20)) ||
        (rc = mdb_env_open(p->env, dir, nosync ? MDB_NOSYNC : 0, 0600)) ||
        (rc = mdb_txn_begin(p->env, NULL, 0, &t)) || (rc = mdb_dbi_open(t, NULL, 0, &p->dbi)) ||
        (rc = mdb_txn_commit(t)))
        die("raw lmdb open", rc);
}

static uint64_t lmdb_commit(lmdb_peer_t *p)
{
    uint8_t kb[8], val[160];
    memset(val, 7, sizeof(val));
    cap_put_be64(kb, ++p->seq);
    MDB_val k = {8, kb}, v = {sizeof(val), val};
    MDB_txn *t;
    uint64_t t0 = cap_now_ns();
    int rc;
    if ((rc = mdb_txn_begin(p->env, NULL, 0, &t)) ||
        (rc = mdb_put(t, p->dbi, &k, &v, MDB_APPEND)) || (rc = mdb_txn_commit(t)))
        die("raw lmdb commit", rc);
    return cap_now_ns() - t0;
}

static uint32_t g_checkpoint_every;
static eng_affinity_t g_affinity; /* --affinity (default: the engine's default) */

static eng_t *open_engine_aff(const char *dir, int nosync, uint32_t pool, uint32_t max_sessions,
                              eng_affinity_t aff)
{
    eng_opts_t o = {0};
    o.affinity = aff;
    o.checkpoint_every = g_checkpoint_every;
    o.dir = dir;
    o.nosync = nosync;
    o.pool_idle = pool;
    o.max_sessions = max_sessions;
    eng_t *e = NULL;
    int rc = eng_open(&o, &e);
    if (rc)
        die("eng_open", rc);
    return e;
}

static eng_t *open_engine(const char *dir, int nosync, uint32_t pool, uint32_t max_sessions)
{
    return open_engine_aff(dir, nosync, pool, max_sessions, g_affinity);
}

static void run_ok(eng_t *e, const char *sid, const char *code, char *repr_out, size_t n)
{
    eng_exec_req_t rq = {0};
    rq.sid = sid;
    rq.code = code;
    eng_result_t *r = NULL;
    int rc = eng_execute_sync(e, &rq, NULL, 0, &r);
    if (rc)
        die("execute", rc);
    if (r->status != ENG_ST_OK) {
        fprintf(stderr, "cell failed: %s: %s\n", r->etype ? r->etype : "?", r->emsg ? r->emsg : "");
        exit(1);
    }
    if (repr_out)
        snprintf(repr_out, n, "%s", r->repr ? r->repr : "");
    eng_result_free(r);
}

/* ---- 1. latency ---- */
static double g_raw_sync_p50_us;

/* The same engine API driven from the caller's own libuv loop (eng_opts_t.loop), as a pipeline
 * that embeds the library on its loop would: eng_execute from a callback of that loop, the time
 * from the call to on_done (both on the loop thread), without the two thread hops of
 * eng_execute_sync (the caller's post to the engine's loop, the loop waking the caller). */
typedef struct loop_peer {
    uv_loop_t loop;
    uv_async_t start, stop;
    eng_t *e;
    const char *dir;
    int nosync;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ready, done, failed;
    uint64_t t0, took;
} loop_peer_t;

static void loop_peer_done(void *arg, const eng_result_t *r)
{
    loop_peer_t *lp = arg;
    uint64_t t1 = cap_now_ns();
    pthread_mutex_lock(&lp->mu);
    lp->took = t1 - lp->t0;
    lp->failed = r->status != ENG_ST_OK || !r->repr || strcmp(r->repr, "4") != 0;
    lp->done = 1;
    pthread_cond_signal(&lp->cv);
    pthread_mutex_unlock(&lp->mu);
}

static void loop_peer_start(uv_async_t *h)
{
    loop_peer_t *lp = h->data;
    eng_exec_req_t rq = {0};
    rq.sid = "lat";
    rq.code = "2+2";
    eng_exec_cb_t cb = {0};
    cb.on_done = loop_peer_done;
    lp->t0 = cap_now_ns();
    int rc = eng_execute(lp->e, &rq, &cb, lp);
    if (rc)
        die("eng_execute on the caller's loop", rc);
}

static void loop_peer_close_cb(uv_handle_t *h)
{
    (void)h;
}

static void loop_peer_stop(uv_async_t *h)
{
    loop_peer_t *lp = h->data;
    uv_close((uv_handle_t *)&lp->start, loop_peer_close_cb);
    uv_close((uv_handle_t *)&lp->stop, loop_peer_close_cb);
}

static void *loop_peer_main(void *arg)
{
    loop_peer_t *lp = arg;
    uv_loop_init(&lp->loop);
    uv_async_init(&lp->loop, &lp->start, loop_peer_start);
    uv_async_init(&lp->loop, &lp->stop, loop_peer_stop);
    lp->start.data = lp->stop.data = lp;
    eng_opts_t o = {0};
    o.affinity = g_affinity;
    o.checkpoint_every = g_checkpoint_every;
    o.dir = lp->dir;
    o.nosync = lp->nosync;
    o.pool_idle = 2;
    o.max_sessions = 16;
    o.loop = &lp->loop;
    o.pin_loop = 1;                /* as capsule-engine runs it */
    int rc = eng_open(&o, &lp->e); /* on the loop's thread, before uv_run */
    if (rc)
        die("eng_open (caller's loop)", rc);
    pthread_mutex_lock(&lp->mu);
    lp->ready = 1;
    pthread_cond_signal(&lp->cv);
    pthread_mutex_unlock(&lp->mu);
    uv_run(&lp->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&lp->loop) != 0)
        die("the caller's loop still holds handles after eng_close", -1);
    return NULL;
}

static void loop_peer_open(loop_peer_t *lp, const char *dir, int nosync)
{
    memset(lp, 0, sizeof(*lp));
    lp->dir = dir;
    lp->nosync = nosync;
    pthread_mutex_init(&lp->mu, NULL);
    pthread_cond_init(&lp->cv, NULL);
    if (pthread_create(&lp->th, NULL, loop_peer_main, lp) != 0)
        die("pthread_create", -1);
    pthread_mutex_lock(&lp->mu);
    while (!lp->ready)
        pthread_cond_wait(&lp->cv, &lp->mu);
    pthread_mutex_unlock(&lp->mu);
    int rc = eng_session_open(lp->e, "lat", NULL, NULL);
    if (rc)
        die("session (caller's loop)", rc);
}

/* One 2+2 started on the loop; returns its time on the loop (call to on_done). */
static uint64_t loop_peer_exec(loop_peer_t *lp)
{
    pthread_mutex_lock(&lp->mu);
    lp->done = 0;
    pthread_mutex_unlock(&lp->mu);
    uv_async_send(&lp->start);
    pthread_mutex_lock(&lp->mu);
    while (!lp->done)
        pthread_cond_wait(&lp->cv, &lp->mu);
    uint64_t took = lp->took;
    int failed = lp->failed;
    pthread_mutex_unlock(&lp->mu);
    if (failed)
        die("2+2 on the caller's loop did not give 4", -1);
    return took;
}

static void loop_peer_close(loop_peer_t *lp)
{
    eng_close(lp->e); /* the loop keeps running meanwhile */
    uv_async_send(&lp->stop);
    pthread_join(lp->th, NULL);
    pthread_mutex_destroy(&lp->mu);
    pthread_cond_destroy(&lp->cv);
}

static void bench_latency(int nosync)
{
    size_t n = quick ? 200 : 2000;
    char d[4][1100];
    fresh_dir(d[0], sizeof(d[0]), nosync ? "lat-ns" : "lat");
    fresh_dir(d[3], sizeof(d[3]), nosync ? "lat-ns-loop" : "lat-loop");
    fresh_dir(d[1], sizeof(d[1]), nosync ? "lat-ns-lmdb" : "lat-lmdb");
    fresh_dir(d[2], sizeof(d[2]), nosync ? "lat-ns-sched" : "lat-sched");
    eng_t *e = open_engine(d[0], nosync, 2, 16);
    /* the same beside it with the other worker placement (ENG_AFFINITY_NONE vs the default) */
    eng_affinity_t other = g_affinity == ENG_AFFINITY_NONE ? ENG_AFFINITY_AUTO : ENG_AFFINITY_NONE;
    eng_t *eo = open_engine_aff(d[2], nosync, 2, 16, other);
    lmdb_peer_t lp;
    lmdb_open(&lp, d[1], nosync);
    loop_peer_t lpe;
    loop_peer_open(&lpe, d[3], nosync);
    int rc = eng_session_open(e, "lat", NULL, NULL);
    if (rc || (rc = eng_session_open(eo, "lat", NULL, NULL)))
        die("session", rc);
    for (int i = 0; i < 20; i++) {
        run_ok(e, "lat", "2+2", NULL, 0);
        run_ok(eo, "lat", "2+2", NULL, 0);
        loop_peer_exec(&lpe);
    }
    uint64_t *le = malloc(n * sizeof(uint64_t)), *ll = malloc(n * sizeof(uint64_t));
    uint64_t *lo = malloc(n * sizeof(uint64_t)), *lc = malloc(n * sizeof(uint64_t));
    char repr[32];
    eng_stats_t s0, s1;
    eng_stats(e, &s0);
    for (size_t i = 0; i < n; i++) {
        uint64_t t0 = cap_now_ns();
        run_ok(e, "lat", "2+2", repr, sizeof(repr));
        le[i] = cap_now_ns() - t0;
        if (strcmp(repr, "4") != 0)
            die("2+2 != 4", -1);
        ll[i] = lmdb_commit(&lp);
        t0 = cap_now_ns();
        run_ok(eo, "lat", "2+2", NULL, 0);
        lo[i] = cap_now_ns() - t0;
        lc[i] = loop_peer_exec(&lpe);
    }
    eng_stats(e, &s1);
    double cpe = (double)(s1.wal_commits - s0.wal_commits) / (double)n;
    double e50 = bench_pct_u64(le, n, 0.5) / 1e3, e99 = bench_pct_u64(le, n, 0.99) / 1e3;
    double l50 = bench_pct_u64(ll, n, 0.5) / 1e3, l99 = bench_pct_u64(ll, n, 0.99) / 1e3;
    if (!nosync)
        g_raw_sync_p50_us = l50;
    const char *mode = nosync ? "nosync" : "sync";
    fprintf(stderr, "\n== durable 2+2 through the C API, %s, %zu executions ==\n", mode, n);
    fprintf(stderr, "%34s | %10s %10s\n", "", "p50 us", "p99 us");
    fprintf(stderr, "%34s | %10.1f %10.1f   (goal p50 <= %s)\n", "eng_execute_sync 2+2", e50, e99,
            nosync ? "150" : "700");
    fprintf(stderr, "%34s | %10.1f %10.1f\n", "raw LMDB put+commit", l50, l99);
    fprintf(stderr, "%34s | %10.2f %10.2f\n", "ratio", e50 / l50, e99 / l99);
    fprintf(stderr, "%34s | %10.2f\n", "log commits per execution", cpe);
    /* where the time goes (eng_stats_t stage sums, means over the measured executions) */
    double tn = (double)(s1.timed - s0.timed);
    double st_req = tn ? (double)(s1.t_request_ns - s0.t_request_ns) / tn / 1e3 : 0;
    double st_run = tn ? (double)(s1.t_run_ns - s0.t_run_ns) / tn / 1e3 : 0;
    double st_fin = tn ? (double)(s1.t_finish_ns - s0.t_finish_ns) / tn / 1e3 : 0;
    fprintf(stderr, "%34s | %10.1f\n", "mean: request record durable", st_req);
    fprintf(stderr, "%34s | %10.1f\n", "mean: worker runs the cell", st_run);
    fprintf(stderr, "%34s | %10.1f\n", "mean: FINISH record durable", st_fin);
    char m[64];
    snprintf(m, sizeof(m), "exec_2plus2_stage_request_mean_us_%s", nosync ? "nosync" : "sync");
    bench_emit(m, st_req, "us", NULL, 0, 0, BENCH_LOWER);
    snprintf(m, sizeof(m), "exec_2plus2_stage_run_mean_us_%s", nosync ? "nosync" : "sync");
    bench_emit(m, st_run, "us", NULL, 0, 0, BENCH_LOWER);
    snprintf(m, sizeof(m), "exec_2plus2_stage_finish_mean_us_%s", nosync ? "nosync" : "sync");
    bench_emit(m, st_fin, "us", NULL, 0, 0, BENCH_LOWER);
    snprintf(m, sizeof(m), "exec_2plus2_p50_us_%s", mode);
    bench_emit(m, e50, "us", nosync ? "raw_lmdb_commit_nosync_p50" : "raw_lmdb_commit_sync_p50",
               l50, nosync ? 150 : 700, 1);
    snprintf(m, sizeof(m), "exec_2plus2_p99_us_%s", mode);
    bench_emit(m, e99, "us", nosync ? "raw_lmdb_commit_nosync_p99" : "raw_lmdb_commit_sync_p99",
               l99, 0, 1);
    snprintf(m, sizeof(m), "exec_2plus2_commits_per_exec_%s", mode);
    bench_emit(m, cpe, "commits", "floor", 2, 0, 1);
    double o50 = bench_pct_u64(lo, n, 0.5) / 1e3;
    const char *oname = other == ENG_AFFINITY_NONE ? "affinity_none" : "affinity_auto";
    fprintf(stderr, "%34s | %10.1f %10.1f\n",
            other == ENG_AFFINITY_NONE ? "2+2, workers placed by the scheduler"
                                       : "2+2, workers pinned when alone (auto)",
            o50, bench_pct_u64(lo, n, 0.99) / 1e3);
    char peer[64];
    snprintf(m, sizeof(m), "exec_2plus2_p50_us_%s_%s", mode, oname);
    snprintf(peer, sizeof(peer), "exec_2plus2_p50_us_%s", mode);
    bench_emit(m, o50, "us", peer, e50, 0, 1);
    double c50 = bench_pct_u64(lc, n, 0.5) / 1e3, c99 = bench_pct_u64(lc, n, 0.99) / 1e3;
    fprintf(stderr, "%34s | %10.1f %10.1f   (goal p50 <= %s)\n", "eng_execute on the caller's loop",
            c50, c99, nosync ? "150" : "700");
    snprintf(m, sizeof(m), "exec_2plus2_p50_us_%s_caller_loop", mode);
    bench_emit(m, c50, "us", peer, e50, nosync ? 150 : 700, BENCH_LOWER);
    snprintf(m, sizeof(m), "exec_2plus2_p99_us_%s_caller_loop", mode);
    snprintf(peer, sizeof(peer), "exec_2plus2_p99_us_%s", mode);
    bench_emit(m, c99, "us", peer, e99, 0, 1);
    free(le);
    free(ll);
    free(lo);
    free(lc);
    eng_close(e);
    eng_close(eo);
    loop_peer_close(&lpe);
    mdb_env_close(lp.env);
    bench_rmtree(d[0]);
    bench_rmtree(d[1]);
    bench_rmtree(d[2]);
    bench_rmtree(d[3]);
}

/* ---- 2. 64 busy sessions ---- */
typedef struct driver {
    eng_t *e;
    char sid[32];
    atomic_int *stop;
    atomic_long *done;
    atomic_int *inflight;
    long budget; /* 0 = until stop */
    long sent;
    const char *code;
    int failed;
} driver_t;

static void drv_submit(driver_t *d);

static void drv_done(void *arg, const eng_result_t *r)
{
    driver_t *d = arg;
    if (r->status != ENG_ST_OK)
        d->failed++;
    atomic_fetch_add(d->done, 1);
    if (!atomic_load(d->stop) && (!d->budget || d->sent < d->budget))
        drv_submit(d);
    else
        atomic_fetch_sub(d->inflight, 1);
}

static void drv_submit(driver_t *d)
{
    char code[96];
    const char *c = d->code;
    if (!c) {
        snprintf(code, sizeof(code), "v%ld = %ld", d->sent % 50, d->sent);
        c = code;
    }
    d->sent++;
    eng_exec_req_t rq = {0};
    rq.sid = d->sid;
    rq.code = c;
    eng_exec_cb_t cb = {0};
    cb.on_done = drv_done;
    int rc = eng_execute(d->e, &rq, &cb, d);
    if (rc)
        die("eng_execute", rc);
}

static void wait_zero(atomic_int *v)
{
    while (atomic_load(v) > 0)
        usleep(1000);
}

/* CPU time (ticks) of the engine's loop thread, of this process's other threads (the wal writer
 * is the busy one; the driver's main thread sleeps), and of the worker processes (children). */
typedef struct cpu_ticks {
    long loop, rest, workers;
} cpu_ticks_t;

static long stat_ticks(const char *path, char *comm, size_t n)
{
    char buf[1024];
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t got = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[got] = 0;
    char *lp = strchr(buf, '('), *rp = strrchr(buf, ')');
    if (!lp || !rp || rp < lp)
        return -1;
    if (comm)
        snprintf(comm, n, "%.*s", (int)(rp - lp - 1), lp + 1);
    long ut = 0, st = 0;
    /* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
     */
    if (sscanf(rp + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %ld %ld", &ut, &st) != 2)
        return -1;
    return ut + st;
}

static void for_each_worker(void (*fn)(int pid, void *arg), void *arg);

static void add_ticks(int pid, void *arg)
{
    char p[64];
    snprintf(p, sizeof(p), "/proc/%d/stat", pid);
    long t = stat_ticks(p, NULL, 0);
    if (t > 0)
        *(long *)arg += t;
}

/* Calls fn(tid, comm, CPU ticks, arg) for each thread of this process. */
static void for_each_thread(void (*fn)(int tid, const char *comm, long ticks, void *arg), void *arg)
{
    char p[300], comm[64];
    DIR *d = opendir("/proc/self/task");
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        snprintf(p, sizeof(p), "/proc/self/task/%s/stat", de->d_name);
        long t = stat_ticks(p, comm, sizeof(comm));
        if (t >= 0)
            fn(atoi(de->d_name), comm, t, arg);
    }
    if (d)
        closedir(d);
}

static void add_thread_ticks(int tid, const char *comm, long ticks, void *arg)
{
    cpu_ticks_t *c = arg;
    (void)tid;
    if (strcmp(comm, "capsule-loop") == 0)
        c->loop += ticks;
    else
        c->rest += ticks;
}

static void cpu_sample(cpu_ticks_t *c)
{
    memset(c, 0, sizeof(*c));
    for_each_thread(add_thread_ticks, c);
    for_each_worker(add_ticks, &c->workers);
}

static void bench_throughput(void)
{
    char d[1100];
    fresh_dir(d, sizeof(d), "tp");
    const int ns = 64;
    eng_t *e = open_engine(d, 0, 8, 128);
    driver_t *dr = calloc((size_t)ns, sizeof(*dr));
    atomic_int stop = 0, inflight = 0;
    atomic_long done = 0;
    for (int i = 0; i < ns; i++) {
        dr[i].e = e;
        snprintf(dr[i].sid, sizeof(dr[i].sid), "tp%d", i);
        dr[i].stop = &stop;
        dr[i].done = &done;
        dr[i].inflight = &inflight;
        dr[i].code = "2+2";
        int rc = eng_session_open(e, dr[i].sid, NULL, NULL);
        if (rc)
            die("session", rc);
        run_ok(e, dr[i].sid, "1", NULL, 0);
    }
    double secs = quick ? 2.0 : 10.0;
    eng_stats_t s0, s1;
    eng_stats(e, &s0);
    cpu_ticks_t c0, c1;
    cpu_sample(&c0);
    uint64_t t0 = cap_now_ns();
    for (int i = 0; i < ns; i++) {
        atomic_fetch_add(&inflight, 1);
        drv_submit(&dr[i]);
    }
    usleep((useconds_t)(secs * 1e6));
    long at_stop = atomic_load(&done);
    double el = (double)(cap_now_ns() - t0) / 1e9;
    cpu_sample(&c1);
    eng_stats(e, &s1);
    double per_commit =
        s1.wal_commits > s0.wal_commits
            ? (double)(s1.wal_records - s0.wal_records) / (double)(s1.wal_commits - s0.wal_commits)
            : 0;
    atomic_store(&stop, 1);
    wait_zero(&inflight);
    double rate = (double)at_stop / el;
    /* beside it: the same sessions with one more cell queued behind each running one (a "run
     * all" of a notebook): the queued cell's request is made durable while the one before it
     * runs, so a session waits for one commit per cell instead of two. No goal of its own. */
    double el_q = 0;
    long done_q = 0;
    {
        atomic_store(&stop, 0);
        long d0 = atomic_load(&done);
        uint64_t tq = cap_now_ns();
        for (int i = 0; i < ns; i++)
            for (int k = 0; k < 2; k++) {
                atomic_fetch_add(&inflight, 1);
                drv_submit(&dr[i]);
            }
        usleep((useconds_t)(secs * 1e6));
        done_q = atomic_load(&done) - d0;
        el_q = (double)(cap_now_ns() - tq) / 1e9;
    }
    atomic_store(&stop, 1);
    wait_zero(&inflight);
    int failed = 0;
    for (int i = 0; i < ns; i++)
        failed += dr[i].failed;
    double peer = g_raw_sync_p50_us > 0 ? 1e6 / g_raw_sync_p50_us : 0;
    fprintf(stderr, "\n== durable executions/s, %d busy sessions, %.0f s ==\n", ns, el);
    fprintf(stderr, "%34s | %10.0f /s  (goal >= 20000; %d failed)\n", "eng_execute 2+2 (sync)",
            rate, failed);
    fprintf(stderr, "%34s | %10.0f /s  (2 cells per session in flight, one queued)\n",
            "the same, a cell queued behind", done_q / el_q);
    fprintf(stderr, "%34s | %10.0f /s\n", "raw LMDB sync commits, 1 writer", peer);
    fprintf(stderr, "%34s | %10.1f\n", "log records per group commit", per_commit);
    /* CPU per execution (us), where it goes: the goal needs <= 100 us in all on 2 cores */
    double tick_us = 1e6 / (double)sysconf(_SC_CLK_TCK), nx = at_stop > 0 ? (double)at_stop : 1;
    double cl = (double)(c1.loop - c0.loop) * tick_us / nx;
    double cr = (double)(c1.rest - c0.rest) * tick_us / nx;
    double cw = (double)(c1.workers - c0.workers) * tick_us / nx;
    fprintf(stderr, "%34s | %10.1f us  (engine loop thread)\n", "CPU per execution", cl);
    fprintf(stderr, "%34s | %10.1f us  (wal writer + other threads)\n", "", cr);
    fprintf(stderr, "%34s | %10.1f us  (the 64 workers)\n", "", cw);
    fprintf(stderr, "%34s | %10llu / %llu\n", "executions pinned / pins dropped",
            (unsigned long long)(s1.pinned - s0.pinned),
            (unsigned long long)(s1.unpinned - s0.unpinned));
    bench_emit("execs_per_s_64_sessions_sync", rate, "1/s", "raw_lmdb_sync_commits_per_s", peer,
               20000, 0);
    bench_emit("execs_per_s_64_sessions_sync_queued", done_q / el_q, "1/s", NULL, 0, 0, 0);
    bench_emit("tp_cpu_us_per_exec_loop", cl, "us", NULL, 0, 0, BENCH_LOWER);
    bench_emit("tp_cpu_us_per_exec_writer", cr, "us", NULL, 0, 0, BENCH_LOWER);
    bench_emit("tp_cpu_us_per_exec_workers", cw, "us", NULL, 0, 0, BENCH_LOWER);
    free(dr);
    eng_close(e);
    bench_rmtree(d);
}

/* ---- 3. acquire from the warm pool ----
 * One round: the pool is full again, as a user's pool is between acquires (stats.pool_idle back
 * to its size, then 20 ms: the zygote forks its next spare once idle), then one acquire, its
 * first durable 2+2 and a close. The first warm-up rounds are not counted (first touches of the
 * engine's and the LMDB peer's paths); n are, so the p99 is the 1% tail of 1000 acquires, not
 * the third slowest of 300. */
static void wait_pool_full(eng_t *e, uint32_t want)
{
    for (int i = 0; i < 2000; i++) {
        eng_stats_t st;
        eng_stats(e, &st);
        if (st.pool_idle >= want)
            return;
        usleep(1000);
    }
    fprintf(stderr, "bench_engine: the pool did not refill to %u in 2 s\n", want);
}

static void find_loop_thread(int tid, const char *comm, long ticks, void *arg)
{
    (void)ticks;
    if (strcmp(comm, "capsule-loop") == 0)
        *(int *)arg = tid;
}

/* A thread's scheduler figures (/proc/self/task/TID/schedstat): ns on a CPU, ns runnable waiting
 * for one. */
typedef struct {
    uint64_t run, wait;
} sched_ns_t;
static sched_ns_t sched_ns(int tid)
{
    char p[96];
    unsigned long long a = 0, b = 0;
    snprintf(p, sizeof(p), "/proc/self/task/%d/schedstat", tid);
    FILE *f = fopen(p, "r");
    if (f) {
        if (fscanf(f, "%llu %llu", &a, &b) != 2)
            a = b = 0;
        fclose(f);
    }
    return (sched_ns_t){a, b};
}

/* Session acquire from the warm pool. For the acquires over 1 ms it also says where their time
 * went, from the schedstat of the loop thread and of the calling thread read around each open:
 * waiting in a run queue (runnable, no CPU: other processes, or the vCPU taken by the host) or
 * running. */
static void bench_acquire(int nosync)
{
    char d[2][1100];
    fresh_dir(d[0], sizeof(d[0]), nosync ? "acq-ns" : "acq");
    fresh_dir(d[1], sizeof(d[1]), nosync ? "acq-ns-lmdb" : "acq-lmdb");
    const uint32_t pool = 4;
    size_t n = quick ? 50 : 1000, warm = quick ? 5 : 20;
    eng_t *e = open_engine(d[0], nosync, pool, 4096);
    lmdb_peer_t lp;
    lmdb_open(&lp, d[1], nosync);
    uint64_t *v = malloc(n * sizeof(uint64_t)), *l = malloc(n * sizeof(uint64_t));
    uint64_t *fx = malloc(n * sizeof(uint64_t));
    size_t over_1ms = 0;
    int ltid = 0, ctid = (int)syscall(SYS_gettid);
    uint64_t slow_ns = 0, slow_lwait = 0, slow_cwait = 0, slow_lrun = 0;
    for (size_t k = 0; k < warm + n; k++) {
        wait_pool_full(e, pool);
        usleep(20000);
        char sid[32];
        snprintf(sid, sizeof(sid), "acq%zu", k);
        if (!ltid) /* named by the loop itself once it runs */
            for_each_thread(find_loop_thread, &ltid);
        sched_ns_t l0 = sched_ns(ltid), c0 = sched_ns(ctid);
        uint64_t t0 = cap_now_ns();
        int rc = eng_session_open(e, sid, NULL, NULL);
        uint64_t ta = cap_now_ns() - t0;
        sched_ns_t l1 = sched_ns(ltid), c1 = sched_ns(ctid);
        if (rc)
            die("session open", rc);
        run_ok(e, sid, "2+2", NULL, 0);
        uint64_t tf = cap_now_ns() - t0;
        uint64_t tl = lmdb_commit(&lp);
        if ((rc = eng_session_close(e, sid)))
            die("session close", rc);
        if (k < warm)
            continue;
        size_t i = k - warm;
        v[i] = ta;
        fx[i] = tf;
        l[i] = tl;
        if (ta > 1000000u) {
            over_1ms++;
            slow_ns += ta;
            slow_lwait += l1.wait - l0.wait;
            slow_cwait += c1.wait - c0.wait;
            slow_lrun += l1.run - l0.run;
        }
    }
    double p50 = bench_pct_u64(v, n, 0.5) / 1e3, p99 = bench_pct_u64(v, n, 0.99) / 1e3;
    double l50 = bench_pct_u64(l, n, 0.5) / 1e3, l99 = bench_pct_u64(l, n, 0.99) / 1e3;
    double f50 = bench_pct_u64(fx, n, 0.5) / 1e3, f99 = bench_pct_u64(fx, n, 0.99) / 1e3;
    const char *mode = nosync ? "nosync" : "sync";
    fprintf(stderr,
            "\n== session acquire from the warm pool (%s), %zu acquires (+%zu warm-up), pool %u "
            "==\n",
            mode, n, warm, pool);
    fprintf(stderr, "%34s | %10s %10s\n", "", "p50 us", "p99 us");
    fprintf(stderr, "%34s | %10.1f %10.1f   (goal p99 <= 1000)\n", "eng_session_open", p50, p99);
    fprintf(stderr, "%34s | %10.1f %10.1f\n", "open + first 2+2, durable", f50, f99);
    fprintf(stderr, "%34s | %10.1f %10.1f\n", "raw LMDB put+commit", l50, l99);
    fprintf(stderr, "%34s | %10zu of %zu\n", "acquires over 1 ms", over_1ms, n);
    if (over_1ms && ltid)
        fprintf(stderr,
                "%34s | loop waiting for a CPU %.0f%%, caller waiting for a CPU %.0f%%, loop "
                "running %.0f%%\n",
                "their time (schedstat)", 100.0 * (double)slow_lwait / (double)slow_ns,
                100.0 * (double)slow_cwait / (double)slow_ns,
                100.0 * (double)slow_lrun / (double)slow_ns);
    char m[64];
    snprintf(m, sizeof(m), "session_open_first_exec_p50_us_%s", mode);
    bench_emit(m, f50, "us", nosync ? "raw_lmdb_commit_nosync_p50" : "raw_lmdb_commit_sync_p50",
               l50, 0, 1);
    snprintf(m, sizeof(m), "session_open_first_exec_p99_us_%s", mode);
    bench_emit(m, f99, "us", nosync ? "raw_lmdb_commit_nosync_p99" : "raw_lmdb_commit_sync_p99",
               l99, 0, 1);
    snprintf(m, sizeof(m), "session_acquire_p99_us_%s", mode);
    bench_emit(m, p99, "us", nosync ? "raw_lmdb_commit_nosync_p99" : "raw_lmdb_commit_sync_p99",
               l99, 1000, 1);
    snprintf(m, sizeof(m), "session_acquire_p50_us_%s", mode);
    bench_emit(m, p50, "us", nosync ? "raw_lmdb_commit_nosync_p50" : "raw_lmdb_commit_sync_p50",
               l50, 0, 1);
    free(v);
    free(l);
    free(fx);
    eng_close(e);
    mdb_env_close(lp.env);
    bench_rmtree(d[0]);
    bench_rmtree(d[1]);
}

/* ---- 4. memory of idle sessions ---- */
static long private_kb(int pid)
{
    char p[64], line[256];
    snprintf(p, sizeof(p), "/proc/%d/smaps_rollup", pid);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    long kb = 0, v;
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "Private_Clean: %ld", &v) == 1 ||
            sscanf(line, "Private_Dirty: %ld", &v) == 1)
            kb += v;
    }
    fclose(f);
    return kb;
}

/* Calls fn(pid, arg) for each child of this process whose command is capsule-pyworker (the
 * zygote and the workers it forked: they are reparented to the engine). */
static void for_each_worker(void (*fn)(int pid, void *arg), void *arg)
{
    DIR *d = opendir("/proc");
    struct dirent *de;
    int me = getpid();
    while (d && (de = readdir(d))) {
        int pid = atoi(de->d_name);
        if (pid <= 0)
            continue;
        char p[64], buf[512];
        snprintf(p, sizeof(p), "/proc/%d/stat", pid);
        FILE *f = fopen(p, "r");
        if (!f)
            continue;
        size_t n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = 0;
        char *rp = strrchr(buf, ')');
        int ppid = 0;
        char st;
        if (!rp || sscanf(rp + 2, "%c %d", &st, &ppid) != 2 || ppid != me)
            continue;
        if (strstr(buf, "capsule-pywork"))
            fn(pid, arg);
    }
    if (d)
        closedir(d);
}

typedef struct kb_sum {
    long total;
    int count;
} kb_sum_t;

static void add_private_kb(int pid, void *arg)
{
    kb_sum_t *k = arg;
    long kb = private_kb(pid);
    if (kb > 0) {
        k->total += kb;
        k->count++;
    }
}

/* Sums private memory of this process's children whose command is capsule-pyworker. */
static long children_private_kb(int *count)
{
    kb_sum_t k = {0, 0};
    for_each_worker(add_private_kb, &k);
    *count = k.count;
    return k.total;
}

static void bench_memory(void)
{
    char d[1100];
    fresh_dir(d, sizeof(d), "mem");
    int n = quick ? 50 : 1000;
    eng_t *e = open_engine(d, 1, 2, (uint32_t)n + 8);
    for (int i = 0; i < n; i++) {
        char sid[32];
        snprintf(sid, sizeof(sid), "m%d", i);
        int rc = eng_session_open(e, sid, NULL, NULL);
        if (rc)
            die("session open", rc);
        run_ok(e, sid, "x = list(range(100))\ny = {'k': 'v' * 100}", NULL, 0);
    }
    usleep(200000);
    int count = 0;
    long kb = children_private_kb(&count);
    /* the peer: one idle plain interpreter */
    FILE *p =
        popen("/usr/bin/python3.11 -c \"import os,time\nx=list(range(100))\nprint(os.getpid(),"
              " flush=True)\ntime.sleep(3)\"",
              "r");
    int ppid = 0;
    long peer_kb = -1;
    if (p && fscanf(p, "%d", &ppid) == 1) {
        usleep(100000);
        peer_kb = private_kb(ppid);
    }
    if (p)
        pclose(p);
    double per = count ? (double)kb / 1024.0 / count : 0;
    fprintf(stderr, "\n== private memory of %d idle sessions (%d worker processes incl. pool) ==\n",
            n, count);
    fprintf(stderr, "%34s | %10.1f MiB total, %.2f MiB per worker\n", "capsule workers",
            (double)kb / 1024.0, per);
    fprintf(stderr, "%34s | %10.2f MiB\n", "one idle /usr/bin/python3.11",
            (double)peer_kb / 1024.0);
    char m[64];
    snprintf(m, sizeof(m), "private_mib_%d_idle_sessions", n);
    bench_emit(m, (double)kb / 1024.0, "MiB", "plain_python3.11_x_n_mib",
               (double)peer_kb / 1024.0 * n, 0, 1);
    bench_emit("private_mib_per_idle_session", per, "MiB", "plain_python3.11_idle_mib",
               (double)peer_kb / 1024.0, 0, 1);
    eng_close(e);
    bench_rmtree(d);
}

/* ---- 5. recovery ---- */
/* S sessions x E executions; metric names end with suffix ("" for the standard size) */
static void bench_recovery(uint32_t ckpt_every, int S, int E, const char *suffix)
{
    g_checkpoint_every = ckpt_every;
    char d[1100];
    fresh_dir(d, sizeof(d), "rec");
    int wave = 50;
    eng_t *e = open_engine(d, 1, 8, (uint32_t)S + 8);
    uint64_t t0 = cap_now_ns();
    driver_t *dr = calloc((size_t)wave, sizeof(*dr));
    atomic_int stop = 0, inflight = 0;
    atomic_long done = 0;
    for (int w0 = 0; w0 < S; w0 += wave) {
        int nw = S - w0 < wave ? S - w0 : wave;
        for (int i = 0; i < nw; i++) {
            memset(&dr[i], 0, sizeof(dr[i]));
            dr[i].e = e;
            snprintf(dr[i].sid, sizeof(dr[i].sid), "r%d", w0 + i);
            dr[i].stop = &stop;
            dr[i].done = &done;
            dr[i].inflight = &inflight;
            dr[i].budget = E;
            int rc = eng_session_open(e, dr[i].sid, NULL, NULL);
            if (rc)
                die("session open", rc);
        }
        for (int i = 0; i < nw; i++) {
            atomic_fetch_add(&inflight, 1);
            drv_submit(&dr[i]);
        }
        wait_zero(&inflight);
        for (int i = 0; i < nw; i++) {
            if (dr[i].failed)
                die("recovery build: a cell failed", -1);
            int rc;
            while ((rc = eng_session_release(e, dr[i].sid)) == CAP_EBUSY)
                usleep(1000);
            if (rc)
                die("release", rc);
        }
    }
    double build_s = (double)(cap_now_ns() - t0) / 1e9;
    eng_close(e);
    free(dr);

    cap_log_set_level(CAP_LOG_INFO); /* the engine's open breakdown */
    t0 = cap_now_ns();
    e = open_engine(d, 1, 8, (uint32_t)S + 8);
    double serving_ms = (double)(cap_now_ns() - t0) / 1e6;
    cap_log_set_level(CAP_LOG_WARN);
    char repr[64], code[64];
    snprintf(code, sizeof(code), "(v%d, v0)", (E - 1) % 50);
    t0 = cap_now_ns();
    run_ok(e, "r7", code, repr, sizeof(repr));
    double first_ms = (double)(cap_now_ns() - t0) / 1e6;
    /* a warm second one, for scale */
    t0 = cap_now_ns();
    run_ok(e, "r7", "2+2", NULL, 0);
    double warm_ms = (double)(cap_now_ns() - t0) / 1e6;
    char want[64];
    snprintf(want, sizeof(want), "(%d, %d)", E - 1, (E - 1) / 50 * 50);
    if (strcmp(repr, want) != 0) {
        fprintf(stderr, "restored session answered %s, expected %s\n", repr, want);
        exit(1);
    }
    fprintf(stderr,
            "\n== recovery of %d sessions x %d executions, checkpoint every %u (log built in %.1f "
            "s) ==\n",
            S, E, ckpt_every, build_s);
    fprintf(stderr, "%34s | %10.1f ms   (goal <= 1000)\n", "eng_open until serving", serving_ms);
    fprintf(stderr, "%34s | %10.1f ms   (goal <= 50)\n", "first answer of a restored session",
            first_ms);
    fprintf(stderr, "%34s | %10.1f ms\n", "next execution (warm)", warm_ms);
    char m[64];
    snprintf(m, sizeof(m), "recovery_until_serving_ms%s%s", ckpt_every ? "_ckpt" : "", suffix);
    bench_emit(m, serving_ms, "ms", NULL, 0, 1000, 1);
    snprintf(m, sizeof(m), "recovery_first_answer_ms%s%s", ckpt_every ? "_ckpt" : "", suffix);
    bench_emit(m, first_ms, "ms", "warm_execution_ms", warm_ms, 50, 1);
    g_checkpoint_every = 0;
    eng_close(e);
    bench_rmtree(d);
}

/* ---- 6. CPU-bound cell ---- */
/* The loop runs in a session and in /usr/bin/python3.11, alternating, CPU_ROUNDS rounds each.
 * Each times its own loop by CPU time (time.process_time) and by wall time (time.perf_counter);
 * the goal figure is the CPU-time ratio (this machine is shared: wall time swings by 2x between
 * runs while the CPU time of a single-threaded loop does not). The engine's share is the
 * session's request to durable result (wall) against the loop's own wall time in the worker.
 * Each round opens a fresh engine, so each session's worker is a new process from a new zygote
 * (its own hash seed and heap), as each python3.11 run is. The loop's names are module-level
 * globals: each iteration makes three lookups (`s` once, `i` twice) and two stores in the
 * namespace dict, and a name whose slot is taken by another key costs ~17 more instructions per
 * extra probe (callgrind: 1194 instructions per iteration without a collision, 1245 with `i`
 * one slot off). Where the names land depends on the hash seed and on what the dict held before
 * they were inserted, so both sides start from the same namespace: the peer runs the code as a
 * script (`-c`: globals are __main__'s, with the same seven dunder names a session's __main__
 * has) and the session is warmed up with `None` (a value like `1` would add the output history
 * `_`, `__`, `___`: three more keys). Before 2026-11-24 the peer ran exec(code, {}) (6 keys in
 * 16 slots) against a session that held 15 keys in 32 slots: 2.0 vs 3.7 expected extra probes per
 * iteration (a model of 3.11's probing over 100k seeds), +2.4 % instructions for the session by
 * layout alone. */
#define CPU_ROUNDS 11
#define CPU_BODY                                                                                   \
    "import time\nt = time.perf_counter()\nc = time.process_time()\ns = 0\n"                       \
    "for i in range(%ld):\n    s += i * i\n"
#define CPU_VALUE                                                                                  \
    "'%%.3f %%.3f' %% ((time.process_time() - c) * 1e3, (time.perf_counter() - t) * 1e3)"
static void bench_cpu(void)
{
    char d[1100];
    fresh_dir(d, sizeof(d), "cpu");
    long iters = quick ? 2000000 : 10000000;
    char code[400], cmd[600];
    snprintf(code, sizeof(code), CPU_BODY CPU_VALUE, iters);
    snprintf(cmd, sizeof(cmd), "/usr/bin/python3.11 -I -S -c \"" CPU_BODY "print(" CPU_VALUE ")\"",
             iters);
    double ve[CPU_ROUNDS], vc[CPU_ROUNDS], vw[CPU_ROUNDS], pc[CPU_ROUNDS], pw[CPU_ROUNDS];
    for (int k = 0; k < CPU_ROUNDS; k++) {
        char repr[96];
        eng_t *e = open_engine(d, 0, 1, 16);
        char sid[32];
        snprintf(sid, sizeof(sid), "cpu%d", k);
        int rc = eng_session_open(e, sid, NULL, NULL);
        if (rc)
            die("session", rc);
        run_ok(e, sid, "None", NULL, 0); /* the worker is up; no name added */
        uint64_t t0 = cap_now_ns();
        run_ok(e, sid, code, repr, sizeof(repr));
        ve[k] = (double)(cap_now_ns() - t0) / 1e6;
        eng_close(e);
        if (sscanf(repr, "'%lf %lf'", &vc[k], &vw[k]) != 2)
            die("cpu cell result", -1);
        FILE *p = popen(cmd, "r");
        if (!p || fscanf(p, " %lf %lf", &pc[k], &pw[k]) != 2)
            die("python3.11 peer", -1);
        pclose(p);
    }
    double me = bench_median(ve, CPU_ROUNDS, NULL, NULL),
           mc = bench_median(vc, CPU_ROUNDS, NULL, NULL);
    double mw = bench_median(vw, CPU_ROUNDS, NULL, NULL),
           mpc = bench_median(pc, CPU_ROUNDS, NULL, NULL);
    double mpw = bench_median(pw, CPU_ROUNDS, NULL, NULL);
    double over = (mc / mpc - 1) * 100, over_wall = (me / mpw - 1) * 100;
    double eng_over = (me / mw - 1) * 100;
    fprintf(stderr, "\n== CPU-bound cell (%ld iterations), median of %d alternating rounds ==\n",
            iters, CPU_ROUNDS);
    fprintf(stderr, "%34s | %8.1f ms CPU %8.1f ms wall (the loop, timed in the cell)\n",
            "capsule session", mc, mw);
    fprintf(stderr, "%34s | %8.1f ms CPU %8.1f ms wall (the same code as a script)\n",
            "/usr/bin/python3.11", mpc, mpw);
    fprintf(stderr, "%34s | %8.1f ms wall (request to durable result)\n", "session execution", me);
    fprintf(stderr, "%34s | %8.1f %%   (goal <= 5)\n", "CPU-time overhead vs python3.11", over);
    fprintf(stderr, "%34s | %8.1f %%\n", "wall overhead vs python3.11", over_wall);
    fprintf(stderr, "%34s | %8.1f %%\n", "engine share (total vs cell)", eng_over);
    bench_emit("cpu_cell_overhead_pct", over, "%", "python3.11_loop_cpu_ms", mpc, 5, 1);
    bench_emit("cpu_cell_overhead_wall_pct", over_wall, "%", "python3.11_loop_wall_ms", mpw, 0, 1);
    bench_emit("cpu_cell_engine_share_pct", eng_over, "%", "cell_wall_ms_inside_worker", mw, 0, 1);
    bench_rmtree(d);
}

int main(int argc, char **argv)
{
    const char *t = getenv("TMPDIR");
    snprintf(base_dir, sizeof(base_dir), "%s", t && *t ? t : "/tmp");
    const char *only = NULL;
    long rec_execs = 0;
    for (int i = 1; i < argc; i++) {
        char *end = NULL;
        if (strcmp(argv[i], "--quick") == 0)
            quick = 1;
        else if (strcmp(argv[i], "--rec-execs") == 0 && i + 1 < argc) {
            rec_execs = strtol(argv[++i], &end, 10);
            if (*end || rec_execs < 10 || rec_execs > 1000000) {
                fprintf(stderr, "%s: --rec-execs wants a count of executions, 10 to 1000000\n",
                        argv[0]);
                return 2;
            }
        } else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc)
            snprintf(base_dir, sizeof(base_dir), "%s", argv[++i]);
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc)
            only = argv[++i];
        else if (strcmp(argv[i], "--affinity") == 0 && i + 1 < argc &&
                 (strcmp(argv[i + 1], "auto") == 0 || strcmp(argv[i + 1], "none") == 0))
            g_affinity = strcmp(argv[++i], "none") == 0 ? ENG_AFFINITY_NONE : ENG_AFFINITY_AUTO;
        else {
            fprintf(stderr,
                    "usage: %s [--quick] [--dir DIR] [--only "
                    "lat|lat-sync|lat-nosync|tp|acq|mem|rec|cpu] "
                    "[--rec-execs N] [--affinity auto|none]\n",
                    argv[0]);
            return 2;
        }
    }
    cap_log_set_level(CAP_LOG_WARN);
    bench_begin("engine");
    fprintf(stderr, "bench_engine%s: databases under %s\n", quick ? " --quick" : "", base_dir);
    if (rec_execs) { /* one point of bench/run's recovery curve: N executions in all */
        int E = rec_execs >= 500 ? 50 : 10;
        char suffix[32];
        snprintf(suffix, sizeof(suffix), "_at_%ld", rec_execs);
        bench_recovery(0, (int)((rec_execs + E - 1) / E), E, suffix);
        return 0;
    }
    if (!only || strcmp(only, "lat") == 0 || strcmp(only, "lat-sync") == 0)
        bench_latency(0);
    if (!only || strcmp(only, "lat") == 0 || strcmp(only, "lat-nosync") == 0)
        bench_latency(1);
    if (!only || strcmp(only, "tp") == 0)
        bench_throughput();
    if (!only || strcmp(only, "acq") == 0) {
        bench_acquire(0);
        bench_acquire(1);
    }
    if (!only || strcmp(only, "cpu") == 0)
        bench_cpu();
    if (!only || strcmp(only, "rec") == 0) {
        int S = quick ? 100 : 1000, E = quick ? 10 : 50;
        bench_recovery(0, S, E, "");              /* every delta replayed */
        bench_recovery(quick ? 4 : 20, S, E, ""); /* with automatic checkpoints */
    }
    if (!only || strcmp(only, "mem") == 0)
        bench_memory();
    return 0;
}
