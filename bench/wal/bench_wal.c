/*
 * bench_wal.c - how fast the durable log is, beside its peers, measured in the same run.
 *
 *   1. durable records/s with 1, 8, 64, 256 producer threads, each appending one ~190-byte record
 *      at a time and waiting until it is durable (WAL_SYNC):
 *        capsule      wal_log_append_sync (frame + XXH3 + tpl, key index, group commit)
 *        raw LMDB     the same group commit (a mutex queue, one writer thread draining everything
 *                     pending into one fsynced transaction) putting the same number of bytes
 *                     under a big-endian seq with MDB_APPEND, and nothing else: the ceiling
 *        SQLite       the same group commit into INSERTs in one transaction, WAL journal,
 *                     synchronous=FULL, with an index on the key (capsule reads by key too)
 *      goals: capsule / raw LMDB >= 0.8, capsule / SQLite > 1 at every size;
 *   2. single-producer append-to-durable latency p50/p99 vs one raw LMDB put+commit
 *      (goal: capsule p50 / raw p50 <= 1.2), and vs the raw flush floor: one 4 KiB pwrite +
 *      fdatasync into a pre-zeroed file (what a durable write costs on this disk at least;
 *      capsule's journal does exactly that plus an unflushed LMDB commit);
 *   3. replay scan with checksum verification (wal_iter decode=0), records/s (goal >= 5M/s),
 *      beside a raw LMDB cursor scan of the same database; also the full decode (tpl) rate.
 *
 * Output: a table on stderr, one JSON object per figure on stdout (see bench/CMakeLists.txt);
 * ratio is always value / peer_value. Throughput figures are the median of the repetitions.
 * Usage: bench_wal [--quick] [--dir DIR] [--only tp|lat|replay]
 *        (DIR: where the databases go; default $TMPDIR or /tmp)
 */
#define _XOPEN_SOURCE 700
#include "wal.h"
#include "bench.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KEY_LEN  16
#define DATA_LEN 100

static int quick;
static char base_dir[1024];

static void die(const char *what, int rc)
{
    fprintf(stderr, "bench_wal: %s failed (%d)\n", what, rc);
    exit(1);
}

static void fresh_dir(char *out, size_t n, const char *tag)
{
    char t[256];
    snprintf(t, sizeof(t), "capsule-bench-wal-%d-%s", (int)getpid(), tag);
    bench_fresh_dir(out, n, base_dir, t);
}

/* the goals of this bench apply to the ratio to the peer */
#define RATIO_HIGHER (BENCH_HIGHER | BENCH_GOAL_RATIO)
#define RATIO_LOWER  (BENCH_LOWER | BENCH_GOAL_RATIO)

/* ---- the record every system writes ---- */

static uint8_t g_data[DATA_LEN];
static size_t g_frame_len; /* capsule's frame size, used as the peers' value size */

static void make_rec(uint64_t i, char key[KEY_LEN + 1], wal_field_t f[2], wal_rec_t *r)
{
    snprintf(key, KEY_LEN + 1, "session-%08llu", (unsigned long long)(i % 1000));
    f[0] = (wal_field_t){.tag = 1, .u = i};
    f[1] = (wal_field_t){.tag = 2, .data = g_data, .len = DATA_LEN};
    *r = (wal_rec_t){.kind = 1, .key = key, .key_len = KEY_LEN, .fields = f, .nfields = 2};
}

/* ---- a generic group commit for the peers: the same shape as capsule's writer ---- */

struct gc_item {
    struct gc_item *next;
    uint64_t seq;
    int done;
    pthread_cond_t cv;
};

struct gc {
    pthread_mutex_t mu;
    pthread_cond_t work;
    struct gc_item *head, *tail;
    uint64_t next_seq;
    int stop;
    pthread_t writer;
    uint64_t commits, records;
    /* the peer's commit of one batch (items in seq order) */
    void (*commit)(void *peer, struct gc_item *items, size_t n);
    void *peer;
};

static void *gc_writer(void *arg)
{
    struct gc *g = arg;
    pthread_mutex_lock(&g->mu);
    for (;;) {
        while (!g->head && !g->stop)
            pthread_cond_wait(&g->work, &g->mu);
        if (!g->head && g->stop)
            break;
        struct gc_item *batch = g->head;
        size_t n = 0;
        for (struct gc_item *i = batch; i; i = i->next)
            n++;
        g->head = g->tail = NULL;
        pthread_mutex_unlock(&g->mu);
        g->commit(g->peer, batch, n);
        pthread_mutex_lock(&g->mu);
        g->commits++;
        g->records += n;
        for (struct gc_item *i = batch, *nx; i; i = nx) {
            nx = i->next;
            i->done = 1;
            pthread_cond_signal(&i->cv);
        }
    }
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

static void gc_start(struct gc *g)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->work, NULL);
    g->next_seq = 1;
    if (pthread_create(&g->writer, NULL, gc_writer, g) != 0)
        die("pthread_create", 0);
}

static void gc_stop(struct gc *g)
{
    pthread_mutex_lock(&g->mu);
    g->stop = 1;
    pthread_cond_signal(&g->work);
    pthread_mutex_unlock(&g->mu);
    pthread_join(g->writer, NULL);
    pthread_cond_destroy(&g->work);
    pthread_mutex_destroy(&g->mu);
}

static void gc_submit(struct gc *g)
{
    struct gc_item it = {0};
    pthread_cond_init(&it.cv, NULL);
    pthread_mutex_lock(&g->mu);
    it.seq = g->next_seq++;
    if (g->tail)
        g->tail->next = &it;
    else
        g->head = &it;
    g->tail = &it;
    pthread_cond_signal(&g->work);
    while (!it.done)
        pthread_cond_wait(&it.cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    pthread_cond_destroy(&it.cv);
}

/* raw LMDB peer */
struct lmdb_peer {
    MDB_env *env;
    MDB_dbi dbi, idx;
    int with_index; /* 1: also the same 16-byte key index entry capsule writes */
    uint8_t *value;
};

static void lmdb_open(struct lmdb_peer *p, const char *dir)
{
    int rc;
    if ((rc = mdb_env_create(&p->env)) || (rc = mdb_env_set_mapsize(p->env, (size_t)4 << 30)) ||
        (rc = mdb_env_set_maxdbs(p->env, 4)) || (rc = mdb_env_open(p->env, dir, MDB_NOTLS, 0600)))
        die("lmdb open", rc);
    MDB_txn *t;
    if ((rc = mdb_txn_begin(p->env, NULL, 0, &t)) ||
        (rc = mdb_dbi_open(t, "log", MDB_CREATE, &p->dbi)) ||
        (rc = mdb_dbi_open(t, "idx", MDB_CREATE, &p->idx)) || (rc = mdb_txn_commit(t)))
        die("lmdb dbi", rc);
    p->value = calloc(1, g_frame_len);
    memcpy(p->value, g_data, DATA_LEN < g_frame_len ? DATA_LEN : g_frame_len);
}

static void lmdb_close(struct lmdb_peer *p)
{
    mdb_env_close(p->env);
    free(p->value);
}

static void lmdb_commit(void *arg, struct gc_item *items, size_t n)
{
    struct lmdb_peer *p = arg;
    MDB_txn *t;
    int rc = mdb_txn_begin(p->env, NULL, 0, &t);
    if (rc)
        die("mdb_txn_begin", rc);
    (void)n;
    for (struct gc_item *i = items; i; i = i->next) {
        uint8_t kb[8];
        cap_put_be64(kb, i->seq);
        MDB_val k = {8, kb}, v = {g_frame_len, p->value};
        if ((rc = mdb_put(t, p->dbi, &k, &v, MDB_APPEND)))
            die("mdb_put", rc);
        if (p->with_index) {
            char key[KEY_LEN + 1];
            uint8_t ib[16];
            snprintf(key, sizeof(key), "session-%08llu", (unsigned long long)(i->seq % 1000));
            cap_put_be64(ib, cap_hash64(key, KEY_LEN));
            cap_put_be64(ib + 8, i->seq);
            MDB_val ik = {16, ib}, iv = {0, ""};
            if ((rc = mdb_put(t, p->idx, &ik, &iv, 0)))
                die("mdb_put idx", rc);
        }
    }
    if ((rc = mdb_txn_commit(t)))
        die("mdb_txn_commit", rc);
}

/* SQLite peer */
struct sqlite_peer {
    sqlite3 *db;
    sqlite3_stmt *ins;
    uint8_t *value;
};

static void sq_exec(sqlite3 *db, const char *sql)
{
    char *err = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
        fprintf(stderr, "sqlite: %s: %s\n", sql, err);
        exit(1);
    }
}

static void sqlite_open(struct sqlite_peer *p, const char *dir)
{
    char path[4200];
    snprintf(path, sizeof(path), "%s/log.db", dir);
    if (sqlite3_open(path, &p->db) != SQLITE_OK)
        die("sqlite3_open", 0);
    sq_exec(p->db, "PRAGMA journal_mode=WAL");
    sq_exec(p->db, "PRAGMA synchronous=FULL");
    sq_exec(p->db, "CREATE TABLE log(seq INTEGER PRIMARY KEY, key BLOB, body BLOB)");
    sq_exec(p->db, "CREATE INDEX log_key ON log(key)"); /* reads by key, as capsule offers */
    if (sqlite3_prepare_v2(p->db, "INSERT INTO log(seq, key, body) VALUES(?, ?, ?)", -1, &p->ins,
                           NULL) != SQLITE_OK)
        die("sqlite3_prepare", 0);
    p->value = calloc(1, g_frame_len);
}

static void sqlite_close(struct sqlite_peer *p)
{
    sqlite3_finalize(p->ins);
    sqlite3_close(p->db);
    free(p->value);
}

static void sqlite_commit(void *arg, struct gc_item *items, size_t n)
{
    struct sqlite_peer *p = arg;
    (void)n;
    sq_exec(p->db, "BEGIN");
    for (struct gc_item *i = items; i; i = i->next) {
        char key[KEY_LEN + 1];
        snprintf(key, sizeof(key), "session-%08llu", (unsigned long long)(i->seq % 1000));
        sqlite3_bind_int64(p->ins, 1, (sqlite3_int64)i->seq);
        sqlite3_bind_blob(p->ins, 2, key, KEY_LEN, SQLITE_STATIC);
        sqlite3_bind_blob(p->ins, 3, p->value, (int)(g_frame_len - KEY_LEN), SQLITE_STATIC);
        if (sqlite3_step(p->ins) != SQLITE_DONE)
            die("sqlite3_step", 0);
        sqlite3_reset(p->ins);
    }
    sq_exec(p->db, "COMMIT");
}

/* ---- producers ---- */

enum { SYS_CAPSULE, SYS_LMDB, SYS_SQLITE };

struct run {
    int sys;
    wal_log_t *log;
    struct gc *gc;
    volatile int go, stop;
    uint64_t *lat; /* per thread latency samples (ns) */
    size_t lat_cap;
};

struct prod {
    struct run *run;
    int id;
    uint64_t n;
    uint64_t *lat;
    size_t nlat;
};

static void *producer(void *arg)
{
    struct prod *p = arg;
    struct run *r = p->run;
    while (!r->go)
        ;
    while (!r->stop) {
        uint64_t t0 = cap_now_ns();
        if (r->sys == SYS_CAPSULE) {
            char key[KEY_LEN + 1];
            wal_field_t f[2];
            wal_rec_t rec;
            make_rec(p->n + (uint64_t)p->id * 1000003u, key, f, &rec);
            int rc = wal_log_append_sync(r->log, &rec, 1, NULL);
            if (rc)
                die("wal_log_append_sync", rc);
        } else {
            gc_submit(r->gc);
        }
        if (p->nlat < r->lat_cap)
            p->lat[p->nlat++] = cap_now_ns() - t0;
        p->n++;
    }
    return NULL;
}

/* Runs `threads` producers against one system for `secs`; returns records/s, fills p99 (us). */
static double run_once(struct run *r, int threads, double secs, double *p50_us, double *p99_us)
{
    pthread_t *th = calloc((size_t)threads, sizeof(*th));
    struct prod *ps = calloc((size_t)threads, sizeof(*ps));
    r->go = r->stop = 0;
    r->lat_cap = 200000 / (size_t)threads + 16;
    for (int i = 0; i < threads; i++) {
        ps[i] = (struct prod){.run = r, .id = i};
        ps[i].lat = malloc(r->lat_cap * sizeof(uint64_t));
        if (pthread_create(&th[i], NULL, producer, &ps[i]) != 0)
            die("pthread_create", 0);
    }
    uint64_t t0 = cap_now_ns();
    r->go = 1;
    usleep((useconds_t)(secs * 1e6));
    r->stop = 1;
    uint64_t total = 0;
    size_t nl = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        total += ps[i].n;
        nl += ps[i].nlat;
    }
    double el = (double)(cap_now_ns() - t0) / 1e9;
    uint64_t *all = malloc((nl + 1) * sizeof(uint64_t));
    size_t k = 0;
    for (int i = 0; i < threads; i++) {
        memcpy(all + k, ps[i].lat, ps[i].nlat * sizeof(uint64_t));
        k += ps[i].nlat;
        free(ps[i].lat);
    }
    *p50_us = bench_pct_u64(all, nl, 0.50) / 1000.0;
    *p99_us = bench_pct_u64(all, nl, 0.99) / 1000.0;
    free(all);
    free(ps);
    free(th);
    return (double)total / el;
}

static void bench_throughput(void)
{
    const int sizes[] = {1, 8, 64, 256};
    const int reps = quick ? 1 : 5;
    const double secs = quick ? 0.3 : 1.0;
    enum { NSYS = 3 };
    fprintf(stderr,
            "\n== durable records/s (WAL_SYNC, one %zu-byte record per append, median of %d x "
            "%.1f s; p99 = append-to-durable latency) ==\n",
            g_frame_len, reps, secs);
    fprintf(stderr, "  raw LMDB: the same group commit, log puts only (no frame, checksum, index)\n"
                    "  SQLite:   the same group commit, WAL, synchronous=FULL, index on key\n");
    fprintf(stderr, "%5s | %10s %6s %8s | %10s %8s | %10s %8s | %6s %7s\n", "prod", "capsule/s",
            "batch", "p99 us", "LMDB/s", "p99 us", "SQLite/s", "p99 us", "/LMDB", "/SQLite");
    for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
        int n = sizes[si];
        char d[NSYS][2048];
        for (int k = 0; k < NSYS; k++) {
            char tag[32];
            snprintf(tag, sizeof(tag), "tp%d", k);
            fresh_dir(d[k], sizeof(d[k]), tag);
        }
        store_env_t *env;
        store_env_opts_t eo = {.map_size = (size_t)4 << 30};
        wal_log_t *log;
        int rc;
        if ((rc = store_env_open(d[0], &eo, &env)) || (rc = wal_log_open(env, NULL, &log)))
            die("capsule open", rc);
        struct lmdb_peer lpl = {0};
        lmdb_open(&lpl, d[1]);
        struct sqlite_peer sp;
        sqlite_open(&sp, d[2]);
        struct gc gl = {.commit = lmdb_commit, .peer = &lpl};
        struct gc gs = {.commit = sqlite_commit, .peer = &sp};
        gc_start(&gl);
        gc_start(&gs);
        double rate[NSYS][8], p99[NSYS][8], p50;
        struct run runs[NSYS] = {{.sys = SYS_CAPSULE, .log = log},
                                 {.sys = SYS_LMDB, .gc = &gl},
                                 {.sys = SYS_SQLITE, .gc = &gs}};
        for (int rep = 0; rep < reps; rep++)
            for (int k = 0; k < NSYS; k++) /* interleaved, so drift hits all alike */
                rate[k][rep] = run_once(&runs[k], n, secs, &p50, &p99[k][rep]);
        wal_stats_t st;
        wal_log_stats(log, &st);
        double m[NSYS], mp99[NSYS];
        for (int k = 0; k < NSYS; k++) {
            m[k] = bench_median(rate[k], (size_t)reps, NULL, NULL);
            mp99[k] = bench_median(p99[k], (size_t)reps, NULL, NULL);
        }
        double batch = st.commits ? (double)st.records / (double)st.commits : 0;
        fprintf(stderr, "%5d | %10.0f %6.1f %8.0f | %10.0f %8.0f | %10.0f %8.0f | %6.2f %7.2f\n", n,
                m[0], batch, mp99[0], m[1], mp99[1], m[2], mp99[2], m[0] / m[1], m[0] / m[2]);
        char metric[64];
        snprintf(metric, sizeof(metric), "durable_records_per_s_%dp", n);
        bench_emit(metric, m[0], "records/s", "raw LMDB, same group commit, log puts only", m[1],
                   0.8, RATIO_HIGHER);
        bench_emit(metric, m[0], "records/s",
                   "SQLite WAL synchronous=FULL, key index, same group commit", m[2], 1.0,
                   RATIO_HIGHER);
        snprintf(metric, sizeof(metric), "append_p99_us_%dp", n);
        bench_emit(metric, mp99[0], "us", "raw LMDB, same group commit", mp99[1], 0, RATIO_LOWER);
        gc_stop(&gl);
        gc_stop(&gs);
        wal_log_close(log);
        store_env_close(env);
        lmdb_close(&lpl);
        sqlite_close(&sp);
        for (int k = 0; k < NSYS; k++)
            bench_rmtree(d[k]);
    }
}

/* The raw flush floor: a pre-zeroed, fsynced 16 MiB file; each write overwrites the next 4 KiB
 * block (cycling) and fdatasyncs. */
#define FLOOR_FILE ((size_t)16 << 20)
static int floor_open(const char *dir)
{
    char p[2100];
    snprintf(p, sizeof p, "%s/floor", dir);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        die("floor open", errno);
    static uint8_t z[1 << 16];
    for (size_t off = 0; off < FLOOR_FILE; off += sizeof z)
        if (pwrite(fd, z, sizeof z, (off_t)off) != (ssize_t)sizeof z)
            die("floor prefill", errno);
    if (fsync(fd) != 0)
        die("floor fsync", errno);
    return fd;
}

static uint64_t floor_write(int fd, size_t i)
{
    static uint8_t blk[4096];
    blk[i % 4096] ^= 1;
    uint64_t t0 = cap_now_ns();
    if (pwrite(fd, blk, sizeof blk, (off_t)(i * 4096 % FLOOR_FILE)) != (ssize_t)sizeof blk ||
        fdatasync(fd) != 0)
        die("floor write", errno);
    return cap_now_ns() - t0;
}

static void bench_latency(void)
{
    const size_t n = quick ? 200 : 2000;
    char d[3][2048];
    fresh_dir(d[0], sizeof(d[0]), "lat-capsule");
    fresh_dir(d[1], sizeof(d[1]), "lat-lmdb");
    fresh_dir(d[2], sizeof(d[2]), "lat-floor");
    int ffd = floor_open(d[2]);
    uint64_t *lf = malloc(n * sizeof(uint64_t));
    store_env_t *env;
    wal_log_t *log;
    int rc;
    if ((rc = store_env_open(d[0], NULL, &env)) || (rc = wal_log_open(env, NULL, &log)))
        die("capsule open", rc);
    struct lmdb_peer lp;
    lmdb_open(&lp, d[1]);
    uint64_t *lc = malloc(n * sizeof(uint64_t)), *ll = malloc(n * sizeof(uint64_t));
    for (size_t i = 0; i < n; i++) {
        /* alternate, so both see the same disk conditions */
        char key[KEY_LEN + 1];
        wal_field_t f[2];
        wal_rec_t rec;
        make_rec(i, key, f, &rec);
        uint64_t t0 = cap_now_ns();
        if ((rc = wal_log_append_sync(log, &rec, 1, NULL)))
            die("append", rc);
        lc[i] = cap_now_ns() - t0;

        t0 = cap_now_ns();
        MDB_txn *t;
        uint8_t kb[8];
        cap_put_be64(kb, i + 1);
        MDB_val k = {8, kb}, v = {g_frame_len, lp.value};
        if ((rc = mdb_txn_begin(lp.env, NULL, 0, &t)) ||
            (rc = mdb_put(t, lp.dbi, &k, &v, MDB_APPEND)) || (rc = mdb_txn_commit(t)))
            die("raw lmdb commit", rc);
        ll[i] = cap_now_ns() - t0;
        lf[i] = floor_write(ffd, i);
    }
    double c50 = bench_pct_u64(lc, n, 0.5) / 1000, c99 = bench_pct_u64(lc, n, 0.99) / 1000;
    double l50 = bench_pct_u64(ll, n, 0.5) / 1000, l99 = bench_pct_u64(ll, n, 0.99) / 1000;
    fprintf(stderr, "\n== append-to-durable latency, 1 producer, %zu appends ==\n", n);
    fprintf(stderr, "%28s | %10s %10s\n", "", "p50 us", "p99 us");
    fprintf(stderr, "%28s | %10.1f %10.1f\n", "capsule wal_log_append_sync", c50, c99);
    double f50 = bench_pct_u64(lf, n, 0.5) / 1000, f99 = bench_pct_u64(lf, n, 0.99) / 1000;
    fprintf(stderr, "%28s | %10.1f %10.1f\n", "raw LMDB put+commit", l50, l99);
    fprintf(stderr, "%28s | %10.1f %10.1f\n", "flush floor 4K pwrite+fdatasync", f50, f99);
    fprintf(stderr, "%28s | %10.2f %10.2f   (goal p50 <= 1.2)\n", "ratio to raw LMDB", c50 / l50,
            c99 / l99);
    fprintf(stderr, "%28s | %10.2f %10.2f   (no goal: how close to the disk)\n",
            "ratio to the flush floor", c50 / f50, c99 / f99);
    bench_emit("append_latency_p50", c50, "us", "raw LMDB put+commit", l50, 1.2, RATIO_LOWER);
    bench_emit("append_latency_p99", c99, "us", "raw LMDB put+commit", l99, 0, RATIO_LOWER);
    bench_emit("append_latency_p50", c50, "us", "flush floor: 4 KiB pwrite+fdatasync, pre-zeroed",
               f50, 0, RATIO_LOWER);
    close(ffd);
    free(lf);
    free(lc);
    free(ll);
    wal_log_close(log);
    store_env_close(env);
    lmdb_close(&lp);
    bench_rmtree(d[0]);
    bench_rmtree(d[1]);
    bench_rmtree(d[2]);
}

static void bench_replay(void)
{
    const uint64_t n = quick ? 200000 : 2000000;
    char d[2048];
    fresh_dir(d, sizeof(d), "replay");
    store_env_t *env;
    store_env_opts_t eo = {.nosync = 1, .map_size = (size_t)4 << 30};
    wal_opts_t wo = {.durability = WAL_NOSYNC};
    wal_log_t *log;
    int rc;
    if ((rc = store_env_open(d, &eo, &env)) || (rc = wal_log_open(env, &wo, &log)))
        die("capsule open", rc);
    enum { B = 1000 };
    static char keys[B][KEY_LEN + 1];
    static wal_field_t f[B][2];
    static wal_rec_t recs[B];
    for (uint64_t i = 0; i < n; i += B) {
        for (int j = 0; j < B; j++)
            make_rec(i + (uint64_t)j, keys[j], f[j], &recs[j]);
        if ((rc = wal_log_append(log, recs, B, NULL, NULL, NULL)))
            die("append", rc);
    }
    wal_log_close(log); /* flushes */
    if ((rc = wal_log_open(env, &wo, &log)))
        die("reopen", rc);

    const int reps = quick ? 1 : 3;
    double verify[3], decode[3], raw[3];
    for (int rep = 0; rep < reps; rep++) {
        for (int mode = 0; mode < 2; mode++) {
            wal_iter_t *it;
            wal_entry_t e;
            wal_iter_opts_t o = {.decode = mode};
            uint64_t cnt = 0, t0 = cap_now_ns();
            if ((rc = wal_iter_open(log, &o, &it)))
                die("iter", rc);
            while ((rc = wal_iter_next(it, &e)) == 0)
                cnt++;
            if (rc != CAP_ENOTFOUND || cnt != n)
                die("replay scan", rc);
            wal_iter_close(it);
            double r = (double)cnt / ((double)(cap_now_ns() - t0) / 1e9);
            if (mode)
                decode[rep] = r;
            else
                verify[rep] = r;
        }
        /* the peer: a raw cursor scan over the same data, no verification */
        store_txn_t *txn;
        store_cursor_t *cur;
        store_dbi_t dbi;
        store_val_t k, v;
        uint64_t cnt = 0, sum = 0, t0 = cap_now_ns();
        if ((rc = store_txn_begin(env, 1, &txn)) ||
            (rc = store_dbi_open(txn, "wal.log", 0, &dbi)) ||
            (rc = store_cursor_open(txn, dbi, &cur)))
            die("raw scan", rc);
        for (rc = store_cursor_get(cur, &k, &v, STORE_FIRST); rc == 0;
             rc = store_cursor_get(cur, &k, &v, STORE_NEXT)) {
            sum += v.len;
            cnt++;
        }
        store_cursor_close(cur);
        store_txn_abort(txn);
        raw[rep] = (double)cnt / ((double)(cap_now_ns() - t0) / 1e9);
        if (cnt != n || sum == 0)
            die("raw scan count", 0);
    }
    double mv = bench_median(verify, (size_t)reps, NULL, NULL),
           md = bench_median(decode, (size_t)reps, NULL, NULL),
           mr = bench_median(raw, (size_t)reps, NULL, NULL);
    fprintf(stderr, "\n== replay scan of %llu records (median of %d) ==\n", (unsigned long long)n,
            reps);
    fprintf(stderr, "%36s | %14.0f records/s   (goal >= 5,000,000)\n",
            "wal_iter, checksum verified", mv);
    fprintf(stderr, "%36s | %14.0f records/s\n", "wal_iter, verified + tpl decode", md);
    fprintf(stderr, "%36s | %14.0f records/s\n", "raw cursor scan, no verification", mr);
    bench_emit("replay_verify_records_per_s", mv, "records/s", "raw LMDB cursor scan", mr, 5e6,
               BENCH_HIGHER);
    bench_emit("replay_decode_records_per_s", md, "records/s", "raw LMDB cursor scan", mr, 0,
               BENCH_HIGHER);
    wal_log_close(log);
    store_env_close(env);
    bench_rmtree(d);
}

/* The 1-minute load average, printed with the results: on a shared machine the peers and capsule
 * are measured side by side, but absolute figures move with the load. */
static double loadavg(void)
{
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1)
            l = -1;
        fclose(f);
    }
    return l;
}

int main(int argc, char **argv)
{
    const char *only = NULL;
    const char *t = getenv("TMPDIR");
    snprintf(base_dir, sizeof(base_dir), "%s", t && *t ? t : "/tmp");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = 1;
        else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc)
            snprintf(base_dir, sizeof(base_dir), "%s", argv[++i]);
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc &&
                 (strcmp(argv[i + 1], "tp") == 0 || strcmp(argv[i + 1], "lat") == 0 ||
                  strcmp(argv[i + 1], "replay") == 0))
            only = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--quick] [--dir DIR] [--only tp|lat|replay]\n", argv[0]);
            return 2;
        }
    }
    bench_begin("wal");
    for (int i = 0; i < DATA_LEN; i++)
        g_data[i] = (uint8_t)(i * 7 + 3);
    char key[KEY_LEN + 1];
    wal_field_t f[2];
    wal_rec_t rec;
    uint8_t *fr;
    make_rec(0, key, f, &rec);
    if (wal_frame_encode(&rec, 1, &fr, &g_frame_len) != 0)
        die("encode", 0);
    cap_free(fr);
    fprintf(stderr, "bench_wal%s: databases under %s, record frame %zu bytes, load average %.2f\n",
            quick ? " --quick" : "", base_dir, g_frame_len, loadavg());
    if (!only || strcmp(only, "tp") == 0)
        bench_throughput();
    if (!only || strcmp(only, "lat") == 0)
        bench_latency();
    if (!only || strcmp(only, "replay") == 0)
        bench_replay();
    fprintf(stderr, "\nload average at the end: %.2f (%ld CPUs)\n", loadavg(),
            sysconf(_SC_NPROCESSORS_ONLN));
    return 0;
}
