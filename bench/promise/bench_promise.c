/*
 * bench_promise.c - durable promise operations per second and create latency.
 *
 * Figures (each measured side by side with its peer in the same run, same machine):
 *   1. create+settle pairs from 1 and from 64 concurrent callers, WAL_SYNC (every commit
 *      fsynced), as durable promise operations/s (a create and a settle are one operation each);
 *      peer: the raw log, wal_log_append_sync of one record of the same size from the same
 *      number of threads. Goal: >= 50k ops/s with 64 callers.
 *   2. single-caller create latency p50 (and p99); peer: one raw LMDB put + commit (fsync) of
 *      the same key/value size. Goal: p50 within 1.3x of the peer.
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
    int mode;        /* 0 create+settle, 1 wal append, 2 create only */
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
        if (w->mode == 2)
            continue;
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

static result_t run_workers(prom_store_t *ps, wal_log_t *wal, int nthreads, int mode)
{
    atomic_int stop = 0;
    worker_t *w = cap_calloc((size_t)nthreads, sizeof(*w));
    pthread_t *th = cap_calloc((size_t)nthreads, sizeof(*th));
    for (int i = 0; i < nthreads; i++) {
        w[i] = (worker_t){ps, wal, i, &stop, 0, {0}, mode};
        pthread_create(&th[i], NULL, worker_main, &w[i]);
    }
    uint64_t t0 = cap_now_ns();
    usleep((useconds_t)(run_secs * 1e6));
    atomic_store(&stop, 1);
    bench_lat_t all = {0};
    uint64_t ops = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        ops += w[i].ops;
        bench_lat_merge(&all, &w[i].lat);
    }
    double secs = (double)(cap_now_ns() - t0) / 1e9;
    result_t r = {(double)ops / secs, bench_lat_pct(&all, 0.5) / 1e3,
                  bench_lat_pct(&all, 0.99) / 1e3};
    bench_lat_free(&all);
    cap_free(w);
    cap_free(th);
    return r;
}

static result_t bench_promise(int nthreads, int mode, int checkpoint_ms)
{
    char tag[64];
    snprintf(tag, sizeof(tag), "prom-%d-%d-%d", nthreads, mode, checkpoint_ms);
    char *dir = fresh_dir(tag);
    store_env_t *env;
    prom_store_t *ps;
    store_env_opts_t eo = {0};
    eo.map_size = 1ull << 30;
    if (store_env_open(dir, &eo, &env) != 0)
        cap_fatal("bench", "env");
    prom_opts_t po = {0};
    po.checkpoint_ms = checkpoint_ms;
    if (prom_store_open(env, &po, &ps) != 0)
        cap_fatal("bench", "prom open");
    result_t r = run_workers(ps, NULL, nthreads, mode);
    wal_stats_t ws;
    wal_log_stats(prom_store_wal(ps), &ws);
    fprintf(stderr, "  [promise %d callers%s: %llu records in %llu commits, max batch %llu]\n",
            nthreads, checkpoint_ms ? " (checkpoint mode)" : "", (unsigned long long)ws.records,
            (unsigned long long)ws.commits, (unsigned long long)ws.max_batch);
    prom_store_close(ps);
    store_env_close(env);
    bench_rmtree(dir);
    cap_free(dir);
    return r;
}

static result_t bench_wal(int nthreads)
{
    char tag[64];
    snprintf(tag, sizeof(tag), "wal-%d", nthreads);
    char *dir = fresh_dir(tag);
    store_env_t *env;
    wal_log_t *wal;
    store_env_opts_t eo = {0};
    eo.map_size = 1ull << 30;
    if (store_env_open(dir, &eo, &env) != 0)
        cap_fatal("bench", "env");
    wal_opts_t wo = {0};
    if (wal_log_open(env, &wo, &wal) != 0)
        cap_fatal("bench", "wal open");
    result_t r = run_workers(NULL, wal, nthreads, 1);
    wal_stats_t ws;
    wal_log_stats(wal, &ws);
    fprintf(stderr, "  [wal %d threads: %llu records in %llu commits, max batch %llu]\n", nthreads,
            (unsigned long long)ws.records, (unsigned long long)ws.commits,
            (unsigned long long)ws.max_batch);
    wal_log_close(wal);
    store_env_close(env);
    bench_rmtree(dir);
    cap_free(dir);
    return r;
}

/* One raw LMDB put + commit (fsync) per operation, key/value sized like a promise create. */
static result_t bench_lmdb(void)
{
    char *dir = fresh_dir("lmdb");
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
    uint64_t t0 = cap_now_ns(), n = 0;
    char key[64], val[256];
    memset(val, 'v', sizeof(val));
    while ((double)(cap_now_ns() - t0) < run_secs * 1e9) {
        snprintf(key, sizeof(key), "bench-0-%llu", (unsigned long long)n++);
        uint64_t s = cap_now_ns();
        MDB_val k = {strlen(key), key}, v = {200, val};
        if (mdb_txn_begin(env, NULL, 0, &txn) || mdb_put(txn, dbi, &k, &v, 0) ||
            mdb_txn_commit(txn))
            cap_fatal("bench", "lmdb put");
        bench_lat_add(&l, cap_now_ns() - s);
    }
    result_t r = {(double)n / ((double)(cap_now_ns() - t0) / 1e9), bench_lat_pct(&l, 0.5) / 1e3,
                  bench_lat_pct(&l, 0.99) / 1e3};
    bench_lat_free(&l);
    mdb_env_close(env);
    bench_rmtree(dir);
    cap_free(dir);
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

    result_t p1 = bench_promise(1, 0, 0), w1 = bench_wal(1);
    result_t p64 = bench_promise(64, 0, 0), w64 = bench_wal(64);
    result_t k64 = bench_promise(64, 0, 50);
    result_t c1 = bench_promise(1, 2, 0), lm = bench_lmdb();

    fprintf(stderr, "promise bench (%s, WAL_SYNC, %.1f s per figure)\n", quick ? "quick" : "full",
            run_secs);
    fprintf(stderr, "%-40s %12s %10s %10s | %-28s %12s %10s\n", "figure", "value", "p50 us",
            "p99 us", "peer", "peer value", "ratio");
    fprintf(stderr, "%-40s %12.0f %10.1f %10.1f | %-28s %12.0f %10.3f\n",
            "create+settle ops/s, 1 caller", p1.ops_s, p1.p50_us, p1.p99_us,
            "wal_log_append_sync rec/s", w1.ops_s, p1.ops_s / w1.ops_s);
    fprintf(stderr, "%-40s %12.0f %10.1f %10.1f | %-28s %12.0f %10.3f\n",
            "create+settle ops/s, 64 callers", p64.ops_s, p64.p50_us, p64.p99_us,
            "wal_log_append_sync rec/s", w64.ops_s, p64.ops_s / w64.ops_s);
    fprintf(stderr, "%-40s %12.0f %10.1f %10.1f | %-28s %12.0f %10.3f\n",
            "same, checkpoint mode (50 ms)", k64.ops_s, k64.p50_us, k64.p99_us,
            "wal_log_append_sync rec/s", w64.ops_s, k64.ops_s / w64.ops_s);
    fprintf(stderr, "%-40s %12.1f %10.1f %10.1f | %-28s %12.1f %10.3f\n",
            "create latency p50 us, 1 caller", c1.p50_us, c1.p50_us, c1.p99_us,
            "LMDB put+commit p50 us", lm.p50_us, c1.p50_us / lm.p50_us);
    fprintf(stderr, "(peer latencies: wal 1 caller p50 %.1f p99 %.1f us; LMDB p99 %.1f us)\n",
            w1.p50_us, w1.p99_us, lm.p99_us);

    bench_emit("create_settle_ops_per_s_1", p1.ops_s, "ops/s", "wal_append_sync_records_per_s_1",
               w1.ops_s, 0, BENCH_HIGHER);
    bench_emit("create_settle_ops_per_s_64", p64.ops_s, "ops/s", "wal_append_sync_records_per_s_64",
               w64.ops_s, 50000, BENCH_HIGHER);
    bench_emit("create_settle_ops_per_s_64_checkpoint", k64.ops_s, "ops/s",
               "wal_append_sync_records_per_s_64", w64.ops_s, 50000, BENCH_HIGHER);
    bench_emit("create_settle_p50_us_64", p64.p50_us, "us", "wal_append_sync_p50_us_64", w64.p50_us,
               0, BENCH_LOWER);
    bench_emit("create_settle_p99_us_64", p64.p99_us, "us", "wal_append_sync_p99_us_64", w64.p99_us,
               0, BENCH_LOWER);
    bench_emit("create_p50_us_1", c1.p50_us, "us", "lmdb_put_commit_p50_us", lm.p50_us, 1.3,
               BENCH_LOWER | BENCH_GOAL_RATIO);
    bench_emit("create_p99_us_1", c1.p99_us, "us", "lmdb_put_commit_p99_us", lm.p99_us, 0,
               BENCH_LOWER);
    rmdir(base_dir);
    return 0;
}
