/*
 * bench_promise.c - durable promise operations per second and create latency.
 *
 * Figures (each measured side by side with its peer in the same run, same machine):
 *   1. create+settle from 1 caller and from 64 concurrent callers, WAL_SYNC (every commit
 *      fsynced), as durable promise operations/s (a create and a settle are one operation each);
 *      peer: the raw log, wal_log_append_sync of one record of the same size from as many threads.
 *      64 callers are measured two ways:
 *        - 64 caller threads, each blocked in prom_promise_create/settle (tools/resonate calls the
 *          store so: 64 operation threads);
 *        - 64 asynchronous callers on ONE loop thread (prom_promise_create_async/settle_async, a
 *          caller issues its next op when its completion comes, the completion only queues it and
 *          wakes the loop): how the engine drives the store from its libuv loop.
 *      Goal: >= 50k ops/s with 64 callers, judged on the asynchronous figure: "64 concurrent
 *      callers" of a server are 64 requests in flight on its event loop, not 64 OS threads (on 2
 *      cores, 64 threads spend the machine on wake-ups: the raw log peer itself stays below 50k).
 *   2. single-caller create latency p50 (and p99); peer: one raw LMDB put + commit (fsync) of
 *      the same key/value size. Goal: p50 within 1.3x of the peer.
 * The 64 asynchronous callers are also measured with the wal's group-commit linger
 * (wal_opts_t.linger_us = 250, off by default) as an A/B peer of the default in the same run.
 * Every promise figure is taken in the default mode (prom.docs checkpointed behind the log) and,
 * as its A/B peer in the same run, with the tables written in each commit (checkpoint_ms < 0).
 * The machine is shared and its disk's fsync time drifts several-fold within seconds, so the
 * subjects run interleaved: the throughput ones in slices (8 rounds, 2 with --quick) in a
 * rotating order, each store open for the whole run; the latency ones op by op.
 * Human table on stderr; one JSON object per figure on stdout. --quick: short runs.
 */
#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench.h"
#include "promise.h"

static double run_secs = 4.0;
static char base_dir[256];

static char *fresh_dir(const char *tag)
{
    char path[512];
    bench_fresh_dir(path, sizeof(path), base_dir, tag);
    return cap_strdup(path);
}

/* ---------- promise workers ---------- */
typedef struct worker {
    prom_store_t *ps;
    wal_log_t *wal;
    int idx;
    atomic_int *stop;
    uint64_t ops;
    bench_lat_t lat; /* per-op latency */
    int mode;        /* 0 create+settle, 1 wal append (3: asynchronous, run_async) */
} worker_t;

/* 112 bytes: the wal peer appends a record of a promise create's size (52 + 60) */
static const char payload[112] = "eyJmdW5jIjoid2YiLCJhcmdzIjpbMTBdLCJ2ZXJzaW9uIjoxfQ==";

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    char id[64];
    prom_value_t val = {NULL, 0, (void *)payload, 52};
    prom_kv_t tags[1] = {{"resonate:scope", "global"}};
    uint64_t n = 0;
    while (!atomic_load(w->stop)) {
        snprintf(id, sizeof(id), "bench-%d-%llu", w->idx, (unsigned long long)n++);
        uint64_t t0 = cap_now_ns();
        if (w->mode == 1) {
            wal_field_t f = {1, 0, payload, 52 + 60};
            wal_rec_t rec = {0x7f, id, strlen(id), &f, 1};
            if (wal_log_append_sync(w->wal, &rec, 1, NULL) != 0)
                cap_fatal("bench", "append failed");
            bench_lat_add(&w->lat, cap_now_ns() - t0);
            w->ops++;
            continue;
        }
        prom_result_t r;
        prom_create_t c = {id, cap_wall_ms() + 3600000, &val, tags, 1};
        if (prom_promise_create(w->ps, &c, &r) != 0 || r.status != 200)
            cap_fatal("bench", "create failed");
        prom_result_clear(&r);
        bench_lat_add(&w->lat, cap_now_ns() - t0);
        w->ops++;
        prom_settle_t s = {id, PROM_RESOLVED, &val};
        t0 = cap_now_ns();
        if (prom_promise_settle(w->ps, &s, &r) != 0 || r.status != 200)
            cap_fatal("bench", "settle failed");
        prom_result_clear(&r);
        bench_lat_add(&w->lat, cap_now_ns() - t0);
        w->ops++;
    }
    return NULL;
}

typedef struct result {
    double ops_s, p50_us, p99_us;
} result_t;

/* One figure's subject: a promise store (threads or asynchronous callers) or the raw log, open
 * for the whole run; its slices of run time accumulate here. */
typedef struct cfg {
    const char *name;
    int ncallers, mode, checkpoint_ms; /* mode: 0 create+settle threads, 1 wal, 3 async */
    unsigned linger_us;                /* wal_opts_t.linger_us (0: off, the default) */
    char *dir;
    store_env_t *env;
    prom_store_t *ps;
    wal_log_t *wal;
    uint64_t ops, ns, wakeups;
    bench_lat_t lat;
} cfg_t;

/* Runs c's threads for secs, adding their ops, time and latencies to c. */
static void slice_threads(cfg_t *c, double secs)
{
    atomic_int stop = 0;
    int n = c->ncallers;
    worker_t *w = cap_calloc((size_t)n, sizeof(*w));
    pthread_t *th = cap_calloc((size_t)n, sizeof(*th));
    static atomic_uint base; /* ids stay unique across slices */
    unsigned b = atomic_fetch_add(&base, (unsigned)n);
    for (int i = 0; i < n; i++) {
        w[i] = (worker_t){c->ps, c->wal, (int)b + i, &stop, 0, {0}, c->mode};
        pthread_create(&th[i], NULL, worker_main, &w[i]);
    }
    uint64_t t0 = cap_now_ns();
    usleep((useconds_t)(secs * 1e6));
    atomic_store(&stop, 1);
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        c->ops += w[i].ops;
        bench_lat_merge(&c->lat, &w[i].lat);
    }
    c->ns += cap_now_ns() - t0;
    cap_free(w);
    cap_free(th);
}

/* ---------- asynchronous callers ----------
 * ncallers operations in flight on ONE thread, the way a server's event loop drives the store
 * (the engine runs promise ops on its libuv loop with the _async forms): each caller issues its
 * next op when its completion comes. The completion (wal writer thread) only queues the caller
 * and wakes the loop thread when it sleeps (as uv_async_send), never calls prom_* itself. */
typedef struct aloop aloop_t;
typedef struct acaller {
    aloop_t *L;
    int idx, settle; /* next op: 0 create, 1 settle */
    uint64_t n, t0;
    char id[64];
    prom_result_t res;
    struct acaller *next;
} acaller_t;
struct aloop {
    prom_store_t *ps;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    acaller_t *ready; /* completed, waiting for the loop */
    int sleeping;
    uint64_t wakeups;
};

static void async_done(void *arg, int rc)
{
    acaller_t *c = arg;
    aloop_t *L = c->L;
    if (rc != 0)
        cap_fatal("bench", "async op failed: %s", cap_strerror(rc));
    pthread_mutex_lock(&L->mu);
    c->next = L->ready;
    L->ready = c;
    if (L->sleeping) {
        L->sleeping = 0;
        L->wakeups++;
        pthread_cond_signal(&L->cv);
    }
    pthread_mutex_unlock(&L->mu);
}

static const prom_value_t aval = {NULL, 0, (void *)payload, 52};
static const prom_kv_t atags[1] = {{"resonate:scope", "global"}};

static void async_issue(acaller_t *c)
{
    c->t0 = cap_now_ns();
    int rc;
    if (!c->settle) {
        snprintf(c->id, sizeof(c->id), "bench-%d-%llu", c->idx, (unsigned long long)c->n++);
        prom_create_t cr = {c->id, cap_wall_ms() + 3600000, &aval, atags, 1};
        rc = prom_promise_create_async(c->L->ps, &cr, &c->res, async_done, c);
    } else {
        prom_settle_t st = {c->id, PROM_RESOLVED, &aval};
        rc = prom_promise_settle_async(c->L->ps, &st, NULL, 0, &c->res, async_done, c);
    }
    if (rc != 0)
        cap_fatal("bench", "async op refused: %s", cap_strerror(rc));
}

/* Runs c's asynchronous callers on this thread (the loop) for secs, into c. */
static void slice_async(cfg_t *c, double secs)
{
    aloop_t L = {.ps = c->ps};
    pthread_mutex_init(&L.mu, NULL);
    pthread_cond_init(&L.cv, NULL);
    acaller_t *cs = cap_calloc((size_t)c->ncallers, sizeof(*cs));
    static int base; /* ids stay unique across slices */
    uint64_t t0 = cap_now_ns(), end = t0 + (uint64_t)(secs * 1e9);
    int inflight = c->ncallers;
    for (int i = 0; i < c->ncallers; i++) {
        cs[i] = (acaller_t){.L = &L, .idx = base++};
        async_issue(&cs[i]);
    }
    while (inflight) {
        pthread_mutex_lock(&L.mu);
        while (!L.ready) {
            L.sleeping = 1;
            pthread_cond_wait(&L.cv, &L.mu);
        }
        acaller_t *list = L.ready;
        L.ready = NULL;
        pthread_mutex_unlock(&L.mu);
        uint64_t now = cap_now_ns();
        while (list) {
            acaller_t *a = list;
            list = a->next;
            if (a->res.status != 200)
                cap_fatal("bench", "async op status %d", a->res.status);
            prom_result_clear(&a->res);
            bench_lat_add(&c->lat, now - a->t0);
            c->ops++;
            a->settle = !a->settle;
            if (now < end)
                async_issue(a);
            else
                inflight--;
        }
    }
    c->ns += cap_now_ns() - t0;
    c->wakeups += L.wakeups;
    cap_free(cs);
    pthread_cond_destroy(&L.cv);
    pthread_mutex_destroy(&L.mu);
}

static void cfg_open(cfg_t *c)
{
    char tag[64];
    snprintf(tag, sizeof(tag), "cfg-%d-%d-%d-%u", c->ncallers, c->mode, c->checkpoint_ms,
             c->linger_us);
    c->dir = fresh_dir(tag);
    store_env_opts_t eo = {0};
    eo.map_size = 1ull << 30;
    if (store_env_open(c->dir, &eo, &c->env) != 0)
        cap_fatal("bench", "env");
    if (c->mode == 1) {
        wal_opts_t wo = {0};
        wo.linger_us = c->linger_us;
        if (wal_log_open(c->env, &wo, &c->wal) != 0)
            cap_fatal("bench", "wal open");
        return;
    }
    prom_opts_t po = {0};
    po.checkpoint_ms = c->checkpoint_ms;
    po.wal.linger_us = c->linger_us;
    if (prom_store_open(c->env, &po, &c->ps) != 0)
        cap_fatal("bench", "prom open");
}

/* Closes c and returns its figure. */
static result_t cfg_close(cfg_t *c)
{
    wal_stats_t ws;
    wal_log_stats(c->wal ? c->wal : prom_store_wal(c->ps), &ws);
    fprintf(stderr,
            "  [%s: %llu records in %llu commits (%.1f per commit, %.0f us each), max batch %llu",
            c->name, (unsigned long long)ws.records, (unsigned long long)ws.commits,
            ws.commits ? (double)ws.records / (double)ws.commits : 0.0,
            ws.commits ? (double)ws.commit_ns / 1e3 / (double)ws.commits : 0.0,
            (unsigned long long)ws.max_batch);
    if (c->mode == 3)
        fprintf(stderr, "; %llu wake-ups of the loop thread", (unsigned long long)c->wakeups);
    if (ws.lingers)
        fprintf(stderr,
                "; %llu lingers of %.0f us on average, %.1f appends joined each, %.0f%% full",
                (unsigned long long)ws.lingers, (double)ws.linger_ns / 1e3 / (double)ws.lingers,
                (double)ws.linger_joined / (double)ws.lingers,
                100.0 * (double)ws.linger_full / (double)ws.lingers);
    if (ws.checkpoints)
        fprintf(stderr, "; %llu checkpoints of %.1f ms, the writer held %.2f ms by them",
                (unsigned long long)ws.checkpoints,
                (double)ws.checkpoint_ns / 1e6 / (double)ws.checkpoints,
                (double)ws.checkpoint_stall_ns / 1e6);
    fprintf(stderr, "]\n");
    if (c->wal)
        wal_log_close(c->wal);
    else
        prom_store_close(c->ps);
    store_env_close(c->env);
    bench_rmtree(c->dir);
    cap_free(c->dir);
    result_t r = {(double)c->ops / ((double)c->ns / 1e9), bench_lat_pct(&c->lat, 0.5) / 1e3,
                  bench_lat_pct(&c->lat, 0.99) / 1e3};
    bench_lat_free(&c->lat);
    return r;
}

/* Runs every subject of c[0..n) for run_secs in all, in `rounds` slices each, in a rotating
 * order: on a shared machine whose disk drifts by several times within seconds, each figure
 * and its peer then see the same conditions. */
static void run_interleaved(cfg_t *c, size_t n, int rounds)
{
    for (size_t i = 0; i < n; i++)
        cfg_open(&c[i]);
    for (int r = 0; r < rounds; r++)
        for (size_t k = 0; k < n; k++) {
            cfg_t *x = &c[((size_t)r + k) % n];
            if (x->mode == 3)
                slice_async(x, run_secs / rounds);
            else
                slice_threads(x, run_secs / rounds);
        }
}

/* Single-caller create latency, interleaved op by op so that the three see the same disk: a
 * create on a store in the default mode, one on a store with the tables in each commit, and one
 * raw LMDB put + commit (fsync) of a promise create's key/value size, in a rotating order. On a
 * shared machine the disk's fsync time drifts by several times within seconds; figures taken one
 * after the other would compare different disks. */
typedef struct lat_ab {
    result_t def, incommit, lmdb;
} lat_ab_t;

typedef struct pstore {
    char *dir;
    store_env_t *env;
    prom_store_t *ps;
    bench_lat_t lat;
} pstore_t;

static void pstore_open(pstore_t *p, const char *tag, int checkpoint_ms)
{
    p->dir = fresh_dir(tag);
    store_env_opts_t eo = {0};
    eo.map_size = 1ull << 30;
    prom_opts_t po = {0};
    po.checkpoint_ms = checkpoint_ms;
    if (store_env_open(p->dir, &eo, &p->env) != 0 || prom_store_open(p->env, &po, &p->ps) != 0)
        cap_fatal("bench", "prom open");
}

static void pstore_close(pstore_t *p)
{
    prom_store_close(p->ps);
    store_env_close(p->env);
    bench_rmtree(p->dir);
    cap_free(p->dir);
}

static void pstore_create(pstore_t *p, uint64_t n)
{
    char id[64];
    prom_value_t val = {NULL, 0, (void *)payload, 52};
    prom_kv_t tags[1] = {{"resonate:scope", "global"}};
    snprintf(id, sizeof(id), "bench-0-%llu", (unsigned long long)n);
    prom_result_t r;
    prom_create_t c = {id, cap_wall_ms() + 3600000, &val, tags, 1};
    uint64_t t0 = cap_now_ns();
    if (prom_promise_create(p->ps, &c, &r) != 0 || r.status != 200)
        cap_fatal("bench", "create failed");
    bench_lat_add(&p->lat, cap_now_ns() - t0);
    prom_result_clear(&r);
}

static result_t lat_result(bench_lat_t *l, double secs)
{
    result_t r = {(double)l->n / secs, bench_lat_pct(l, 0.5) / 1e3, bench_lat_pct(l, 0.99) / 1e3};
    bench_lat_free(l);
    return r;
}

static lat_ab_t bench_latency(void)
{
    pstore_t a = {0}, b = {0};
    pstore_open(&a, "lat-default", 0);
    pstore_open(&b, "lat-incommit", -1);
    char *dir = fresh_dir("lat-lmdb");
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;
    if (mdb_env_create(&env) || mdb_env_set_mapsize(env, 1ull << 30) ||
        mdb_env_open(env, dir, 0, 0600))
        cap_fatal("bench", "lmdb open");
    mdb_txn_begin(env, NULL, 0, &txn);
    mdb_dbi_open(txn, NULL, 0, &dbi);
    mdb_txn_commit(txn);
    bench_lat_t l = {0};
    char key[64], val[256];
    memset(val, 'v', sizeof(val));
    uint64_t t0 = cap_now_ns(), n = 0;
    while ((double)(cap_now_ns() - t0) < 3 * run_secs * 1e9) {
        for (int k = 0; k < 3; k++) {
            switch ((n + (uint64_t)k) % 3) {
            case 0:
                pstore_create(&a, n);
                break;
            case 1:
                pstore_create(&b, n);
                break;
            default: {
                snprintf(key, sizeof(key), "bench-0-%llu", (unsigned long long)n);
                MDB_val mk = {strlen(key), key}, mv = {200, val};
                uint64_t s = cap_now_ns();
                if (mdb_txn_begin(env, NULL, 0, &txn) || mdb_put(txn, dbi, &mk, &mv, 0) ||
                    mdb_txn_commit(txn))
                    cap_fatal("bench", "lmdb put");
                bench_lat_add(&l, cap_now_ns() - s);
            }
            }
        }
        n++;
    }
    double secs = (double)(cap_now_ns() - t0) / 1e9;
    lat_ab_t r = {lat_result(&a.lat, secs), lat_result(&b.lat, secs), lat_result(&l, secs)};
    mdb_env_close(env);
    bench_rmtree(dir);
    cap_free(dir);
    pstore_close(&a);
    pstore_close(&b);
    return r;
}

int main(int argc, char **argv)
{
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = 1;
        else {
            fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
            return 2;
        }
    }
    bench_begin("promise");
    run_secs = quick ? 0.7 : 4.0;
    const char *tmp = getenv("TMPDIR");
    snprintf(base_dir, sizeof(base_dir), "%s/capsule-bench-promise-%d", tmp && *tmp ? tmp : "/tmp",
             (int)getpid());
    mkdir(base_dir, 0700);

    /* default mode (checkpoint of prom.docs every PROM_CHECKPOINT_MS_DEFAULT) and, as its A/B
     * peer in the same run, the tables written in each commit (checkpoint_ms < 0) */
    int rounds = quick ? 2 : 8;
    cfg_t one[] = {{.name = "promise, 1 caller", .ncallers = 1},
                   {.name = "wal, 1 thread", .ncallers = 1, .mode = 1}};
    run_interleaved(one, 2, rounds);
    cfg_t many[] = {
        {.name = "promise, 64 threads", .ncallers = 64},
        {.name = "promise, 64 threads, in each commit", .ncallers = 64, .checkpoint_ms = -1},
        {.name = "promise, 64 async", .ncallers = 64, .mode = 3},
        {.name = "promise, 64 async, in each commit",
         .ncallers = 64,
         .mode = 3,
         .checkpoint_ms = -1},
        {.name = "wal, 64 threads", .ncallers = 64, .mode = 1},
        {.name = "promise, 64 async, linger 250 us", .ncallers = 64, .mode = 3, .linger_us = 250},
    };
    run_interleaved(many, 6, rounds);
    result_t p1 = cfg_close(&one[0]), w1 = cfg_close(&one[1]);
    result_t p64 = cfg_close(&many[0]), i64 = cfg_close(&many[1]), a64 = cfg_close(&many[2]),
             ia64 = cfg_close(&many[3]), w64 = cfg_close(&many[4]), la64 = cfg_close(&many[5]);
    lat_ab_t lab = bench_latency();
    result_t c1 = lab.def, ic1 = lab.incommit, lm = lab.lmdb;

    fprintf(stderr, "promise bench (%s, WAL_SYNC, %.1f s per figure)\n", quick ? "quick" : "full",
            run_secs);
    fprintf(stderr, "%-44s %10s %10s %10s | %-26s %10s %8s\n", "figure", "value", "p50 us",
            "p99 us", "peer", "peer value", "ratio");
    const struct {
        const char *name;
        result_t r;
        const char *peer;
        double pv;
    } rows[] = {
        {"create+settle ops/s, 1 caller", p1, "wal_log_append_sync rec/s", w1.ops_s},
        {"create+settle ops/s, 64 caller threads", p64, "same, 64 threads", w64.ops_s},
        {"  same, tables in each commit", i64, "same, 64 threads", w64.ops_s},
        {"create+settle ops/s, 64 async on 1 loop *", a64, "same, 64 threads", w64.ops_s},
        {"  same, tables in each commit", ia64, "same, 64 threads", w64.ops_s},
        {"  same, group-commit linger 250 us", la64, "same, 64 async, no linger", a64.ops_s},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        fprintf(stderr, "%-44s %10.0f %10.1f %10.1f | %-26s %10.0f %8.3f\n", rows[i].name,
                rows[i].r.ops_s, rows[i].r.p50_us, rows[i].r.p99_us, rows[i].peer, rows[i].pv,
                rows[i].r.ops_s / rows[i].pv);
    fprintf(stderr, "%-44s %10.1f %10.1f %10.1f | %-26s %10.1f %8.3f\n",
            "create latency p50 us, 1 caller (interleaved)", c1.p50_us, c1.p50_us, c1.p99_us,
            "LMDB put+commit p50 us", lm.p50_us, c1.p50_us / lm.p50_us);
    fprintf(stderr, "%-44s %10.1f %10.1f %10.1f | %-26s %10.1f %8.3f\n",
            "  same, tables in each commit", ic1.p50_us, ic1.p50_us, ic1.p99_us,
            "LMDB put+commit p50 us", lm.p50_us, ic1.p50_us / lm.p50_us);
    fprintf(stderr,
            "(* the goal's figure: 64 in-flight requests of a server; peer latencies: wal 1 "
            "caller p50 %.1f p99 %.1f us; LMDB p99 %.1f us)\n",
            w1.p50_us, w1.p99_us, lm.p99_us);

    bench_emit("create_settle_ops_per_s_1", p1.ops_s, "ops/s", "wal_append_sync_records_per_s_1",
               w1.ops_s, 0, BENCH_HIGHER);
    bench_emit("create_settle_ops_per_s_64_async", a64.ops_s, "ops/s",
               "wal_append_sync_records_per_s_64", w64.ops_s, 50000, BENCH_HIGHER);
    bench_emit("create_settle_ops_per_s_64_async_incommit", ia64.ops_s, "ops/s",
               "wal_append_sync_records_per_s_64", w64.ops_s, 0, BENCH_HIGHER);
    bench_emit("create_settle_ops_per_s_64_async_linger", la64.ops_s, "ops/s",
               "create_settle_ops_per_s_64_async", a64.ops_s, 0, BENCH_HIGHER);
    bench_emit("create_settle_ops_per_s_64", p64.ops_s, "ops/s", "wal_append_sync_records_per_s_64",
               w64.ops_s, 0, BENCH_HIGHER);
    bench_emit("create_settle_ops_per_s_64_incommit", i64.ops_s, "ops/s",
               "wal_append_sync_records_per_s_64", w64.ops_s, 0, BENCH_HIGHER);
    bench_emit("create_settle_p50_us_64_async", a64.p50_us, "us", "wal_append_sync_p50_us_64",
               w64.p50_us, 0, BENCH_LOWER);
    bench_emit("create_settle_p50_us_64", p64.p50_us, "us", "wal_append_sync_p50_us_64", w64.p50_us,
               0, BENCH_LOWER);
    bench_emit("create_settle_p99_us_64", p64.p99_us, "us", "wal_append_sync_p99_us_64", w64.p99_us,
               0, BENCH_LOWER);
    bench_emit("create_p50_us_1", c1.p50_us, "us", "lmdb_put_commit_p50_us", lm.p50_us, 1.3,
               BENCH_LOWER | BENCH_GOAL_RATIO);
    bench_emit("create_p50_us_1_incommit", ic1.p50_us, "us", "lmdb_put_commit_p50_us", lm.p50_us, 0,
               BENCH_LOWER);
    bench_emit("create_p99_us_1", c1.p99_us, "us", "lmdb_put_commit_p99_us", lm.p99_us, 0,
               BENCH_LOWER);
    rmdir(base_dir);
    return 0;
}
