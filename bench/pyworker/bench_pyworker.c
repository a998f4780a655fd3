/*
 * bench_pyworker.c - the worker and its client, measured.
 *
 * Figures (peers measured side by side in the same run):
 *   1. execute "2+2" round trip through the C client (send -> on_result), p50 and p99;
 *      peer: a PING/PONG round trip on the same socket (the IPC floor). Goal: p50 <= 100 us.
 *   2. start to READY: zygote fork vs cold fork+exec. Goals: <= 3 ms vs <= 60 ms (p50). The
 *      zygote keeps one pre-forked spare; a burst of spawns (back to back) is also reported.
 *   3. private memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) per idle
 *      worker after one cell: zygote-forked vs cold. Goal: <= 4 MiB with the zygote.
 *   4. print() to chunk arrival (the worker prints time.monotonic_ns(), the client subtracts on
 *      arrival; same CLOCK_MONOTONIC), p50 and p99. Goal: p99 <= 1 ms.
 *   5. namespace delta cost: the round trip of "v17 += 1" in a namespace of 1,000 small values
 *      minus the same cell in an empty namespace (medians), plus the delta size. Goal: <= 200 us.
 * Human table on stderr; one JSON object per figure on stdout. --quick: small sizes.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cap.h"
#include "pyworker.h"

static int quick;

/* ---- latency samples ---- */
typedef struct lat {
    uint64_t *v;
    size_t n, cap;
} lat_t;

static void lat_add(lat_t *l, uint64_t ns)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 1024;
        l->v = cap_realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = ns;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* percentile in microseconds */
static double lat_pct(lat_t *l, double p)
{
    if (!l->n)
        return 0;
    qsort(l->v, l->n, sizeof *l->v, cmp_u64);
    return (double)l->v[(size_t)(p * (double)(l->n - 1))] / 1000.0;
}

static void emit(const char *metric, double value, const char *unit, const char *peer,
                 double peer_value, double goal, int lower_is_better)
{
    double ratio = peer && peer_value > 0 ? value / peer_value : 0;
    char ratio_s[32], peer_s[96], pv_s[32], goal_s[32], met_s[8];
    snprintf(ratio_s, sizeof ratio_s, peer ? "%.3f" : "null", ratio);
    snprintf(peer_s, sizeof peer_s, peer ? "\"%s\"" : "null", peer);
    snprintf(pv_s, sizeof pv_s, peer ? "%.3f" : "null", peer_value);
    snprintf(goal_s, sizeof goal_s, goal > 0 ? "%.3f" : "null", goal);
    snprintf(met_s, sizeof met_s, "%s",
             goal > 0 ? ((lower_is_better ? value <= goal : value >= goal) ? "true" : "false")
                      : "null");
    printf("{\"bench\":\"pyworker\",\"metric\":\"%s\",\"value\":%.3f,\"unit\":\"%s\",\"peer\":%s,"
           "\"peer_value\":%s,\"ratio\":%s,\"goal\":%s,\"met\":%s}\n",
           metric, value, unit, peer_s, pv_s, ratio_s, goal_s, met_s);
    fprintf(stderr, "  %-34s %12.1f %-4s", metric, value, unit);
    if (peer)
        fprintf(stderr, "   %-26s %10.1f   x%.2f", peer, peer_value, ratio);
    if (goal > 0)
        fprintf(stderr, "   goal %s %.0f: %s", lower_is_better ? "<=" : ">=", goal,
                strcmp(met_s, "true") == 0 ? "met" : "NOT met");
    fprintf(stderr, "\n");
    fflush(stdout);
}

/* ---- a worker driven on our loop ---- */
typedef struct bw {
    uv_loop_t *loop;
    pyw_worker_t *w;
    int ready, done, pong, exited;
    pyw_status_t status;
    uint64_t delta_len, in_worker_ns;
    lat_t *chunk_lat; /* print-to-chunk samples, if measuring */
} bw_t;

static void b_ready(pyw_worker_t *w)
{
    ((bw_t *)pyw_worker_data(w))->ready = 1;
}
static void b_result(pyw_worker_t *w, const pyw_result_t *r)
{
    bw_t *b = pyw_worker_data(w);
    b->done = 1;
    b->status = r->status;
    b->delta_len = r->delta ? r->delta->blob_len : 0;
    b->in_worker_ns = r->duration_ns;
    if (r->status != PYW_STATUS_OK)
        cap_fatal("bench", "cell failed: %s: %s", r->etype ? r->etype : "?",
                  r->emsg ? r->emsg : "");
}
static void b_pong(pyw_worker_t *w, uint64_t id)
{
    (void)id;
    ((bw_t *)pyw_worker_data(w))->pong = 1;
}
static void b_exit(pyw_worker_t *w, const pyw_exit_t *e)
{
    bw_t *b = pyw_worker_data(w);
    b->exited = 1;
    if (!b->done)
        cap_fatal("bench", "worker exited: %s", e->message);
}
static void b_output(pyw_worker_t *w, uint64_t id, int stream, const char *d, size_t n)
{
    bw_t *b = pyw_worker_data(w);
    uint64_t now = cap_now_ns();
    (void)id;
    (void)stream;
    if (!b->chunk_lat)
        return;
    /* each chunk is one line: "<monotonic ns>\n" */
    char tmp[32];
    if (n >= sizeof tmp)
        return;
    memcpy(tmp, d, n);
    tmp[n] = 0;
    uint64_t t = strtoull(tmp, NULL, 10);
    if (t && now >= t)
        lat_add(b->chunk_lat, now - t);
}

static const pyw_callbacks_t bcb = {.on_ready = b_ready,
                                    .on_result = b_result,
                                    .on_pong = b_pong,
                                    .on_exit = b_exit,
                                    .on_output = b_output};

static void bw_open(bw_t *b, uv_loop_t *loop, pyw_zygote_t *z)
{
    pyw_options_t o = {0};
    memset(b, 0, sizeof *b);
    b->loop = loop;
    o.cb = &bcb;
    o.data = b;
    int rc = z ? pyw_zygote_spawn(z, loop, &o, &b->w) : pyw_worker_spawn(loop, &o, &b->w);
    if (rc)
        cap_fatal("bench", "spawn: %s", cap_strerror(rc));
    while (!b->ready)
        uv_run(loop, UV_RUN_ONCE);
}

static uint64_t bw_exec(bw_t *b, const char *src)
{
    static uint64_t id;
    b->done = 0;
    uint64_t t0 = cap_now_ns();
    int rc = pyw_worker_execute(b->w, ++id, NULL, src, strlen(src), 0);
    if (rc)
        cap_fatal("bench", "execute: %s", cap_strerror(rc));
    while (!b->done)
        uv_run(b->loop, UV_RUN_ONCE);
    return cap_now_ns() - t0;
}

static uint64_t bw_ping(bw_t *b)
{
    b->pong = 0;
    uint64_t t0 = cap_now_ns();
    pyw_worker_ping(b->w, 1);
    while (!b->pong)
        uv_run(b->loop, UV_RUN_ONCE);
    return cap_now_ns() - t0;
}

static void bw_close(bw_t *b)
{
    pyw_worker_close(b->w);
    b->w = NULL;
}

static double uss_kib(int pid)
{
    char path[64], line[256];
    double kib = 0;
    snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long v;
        if (sscanf(line, "Private_Clean: %lu kB", &v) == 1 ||
            sscanf(line, "Private_Dirty: %lu kB", &v) == 1)
            kib += (double)v;
    }
    fclose(f);
    return kib;
}

/* ---- the figures ---- */

static void bench_roundtrip(uv_loop_t *loop)
{
    bw_t b;
    lat_t ex = {0}, ping = {0}, inw = {0};
    int n = quick ? 500 : 5000;
    bw_open(&b, loop, NULL);
    for (int i = 0; i < 200; i++) { /* warm-up */
        bw_exec(&b, "2+2");
        bw_ping(&b);
    }
    for (int i = 0; i < n; i++) { /* interleaved, so both see the same machine state */
        lat_add(&ex, bw_exec(&b, "2+2"));
        lat_add(&inw, b.in_worker_ns);
        lat_add(&ping, bw_ping(&b));
    }
    double e50 = lat_pct(&ex, 0.5), e99 = lat_pct(&ex, 0.99);
    double p50 = lat_pct(&ping, 0.5), p99 = lat_pct(&ping, 0.99);
    emit("execute_2plus2_p50", e50, "us", "ping_roundtrip_p50", p50, 100, 1);
    emit("execute_2plus2_p99", e99, "us", "ping_roundtrip_p99", p99, 0, 1);
    /* where the time goes: the part spent inside the worker's run_cell (compile, run, repr,
     * JSON, namespace delta) */
    emit("execute_2plus2_in_run_cell_p50", lat_pct(&inw, 0.5), "us", NULL, 0, 0, 1);
    cap_free(inw.v);
    bw_close(&b);
    cap_free(ex.v);
    cap_free(ping.v);
}

static void bench_start_and_memory(uv_loop_t *loop)
{
    pyw_zygote_t *z;
    int rc = pyw_zygote_open(NULL, &z);
    if (rc)
        cap_fatal("bench", "zygote: %s", cap_strerror(rc));
    int n = quick ? 5 : 30;
    lat_t zs = {0}, cs = {0};
    for (int i = 0; i < n; i++) {
        bw_t b;
        uint64_t t0 = cap_now_ns();
        bw_open(&b, loop, z); /* spaced out by the cold start below: the spare is ready */
        lat_add(&zs, cap_now_ns() - t0);
        bw_close(&b);
        t0 = cap_now_ns();
        bw_open(&b, loop, NULL);
        lat_add(&cs, cap_now_ns() - t0);
        bw_close(&b);
    }
    /* a burst: spawns back to back (the spare is used once, then direct forks) */
    int nb = quick ? 4 : 8;
    lat_t bs = {0};
    bw_t *burst = cap_calloc((size_t)nb, sizeof *burst);
    usleep(20000);
    for (int i = 0; i < nb; i++) {
        uint64_t t0 = cap_now_ns();
        bw_open(&burst[i], loop, z);
        lat_add(&bs, cap_now_ns() - t0);
    }
    for (int i = 0; i < nb; i++)
        bw_close(&burst[i]);
    cap_free(burst);
    double z50 = lat_pct(&zs, 0.5) / 1000, c50 = lat_pct(&cs, 0.5) / 1000;
    double z99 = lat_pct(&zs, 0.99) / 1000, c99 = lat_pct(&cs, 0.99) / 1000;
    emit("zygote_fork_to_ready_p50", z50, "ms", "cold_start_to_ready_p50", c50, 3, 1);
    emit("zygote_fork_to_ready_p99", z99, "ms", "cold_start_to_ready_p99", c99, 0, 1);
    emit("cold_start_to_ready_p50", c50, "ms", NULL, 0, 60, 1);
    emit("zygote_burst_fork_to_ready_p50", lat_pct(&bs, 0.5) / 1000, "ms",
         "cold_start_to_ready_p50", c50, 0, 1);
    cap_free(bs.v);

    /* memory: m idle workers of each kind, each after one trivial cell */
    int m = quick ? 4 : 16;
    bw_t *zw = cap_calloc((size_t)m, sizeof *zw), *cw = cap_calloc((size_t)m, sizeof *cw);
    for (int i = 0; i < m; i++) {
        bw_open(&zw[i], loop, z);
        bw_exec(&zw[i], "x = 1");
        bw_open(&cw[i], loop, NULL);
        bw_exec(&cw[i], "x = 1");
    }
    lat_t zm = {0}, cm = {0}; /* KiB, stored as integers */
    for (int i = 0; i < m; i++) {
        lat_add(&zm, (uint64_t)uss_kib(pyw_worker_pid(zw[i].w)));
        lat_add(&cm, (uint64_t)uss_kib(pyw_worker_pid(cw[i].w)));
    }
    double zmed = lat_pct(&zm, 0.5) * 1000 / 1024, cmed = lat_pct(&cm, 0.5) * 1000 / 1024; /* MiB */
    emit("uss_per_idle_worker_zygote", zmed, "MiB", "uss_per_idle_worker_cold", cmed, 4, 1);
    for (int i = 0; i < m; i++) {
        bw_close(&zw[i]);
        bw_close(&cw[i]);
    }
    cap_free(zw);
    cap_free(cw);
    pyw_zygote_close(z);
    cap_free(zs.v);
    cap_free(cs.v);
    cap_free(zm.v);
    cap_free(cm.v);
}

static void bench_print_latency(uv_loop_t *loop)
{
    bw_t b;
    lat_t cl = {0};
    char src[256];
    bw_open(&b, loop, NULL);
    b.chunk_lat = &cl;
    /* one line every 2 ms (not a flood: the figure is the latency of a line, not throughput) */
    snprintf(src, sizeof src,
             "import time\nfor i in range(%d):\n    print(time.monotonic_ns())\n"
             "    time.sleep(0.002)\n",
             quick ? 300 : 2000);
    bw_exec(&b, src);
    b.chunk_lat = NULL;
    emit("print_to_chunk_p50", lat_pct(&cl, 0.5), "us", NULL, 0, 0, 1);
    emit("print_to_chunk_p99", lat_pct(&cl, 0.99), "us", NULL, 0, 1000, 1);
    bw_close(&b);
    cap_free(cl.v);
}

static void bench_delta(uv_loop_t *loop)
{
    bw_t big, empty;
    lat_t lb = {0}, le = {0};
    int n = quick ? 300 : 2000;
    bw_open(&big, loop, NULL);
    bw_open(&empty, loop, NULL);
    bw_exec(&big, "for i in range(1000):\n    globals()['v%d' % i] = i\n");
    bw_exec(&empty, "v17 = 0");
    for (int i = 0; i < 100; i++) {
        bw_exec(&big, "v17 += 1");
        bw_exec(&empty, "v17 += 1");
    }
    uint64_t dlen = 0;
    for (int i = 0; i < n; i++) {
        lat_add(&lb, bw_exec(&big, "v17 += 1"));
        dlen = big.delta_len;
        lat_add(&le, bw_exec(&empty, "v17 += 1"));
    }
    double b50 = lat_pct(&lb, 0.5), e50 = lat_pct(&le, 0.5);
    emit("cell_roundtrip_1000_names_p50", b50, "us", "cell_roundtrip_empty_ns_p50", e50, 0, 1);
    emit("cell_roundtrip_1000_names_p99", lat_pct(&lb, 0.99), "us", "cell_roundtrip_empty_ns_p99",
         lat_pct(&le, 0.99), 0, 1);
    emit("delta_cost_1000_names_one_changed", b50 - e50, "us", NULL, 0, 200, 1);
    emit("delta_size_one_changed", (double)dlen, "B", NULL, 0, 0, 1);
    bw_close(&big);
    bw_close(&empty);
    cap_free(lb.v);
    cap_free(le.v);
}

int main(int argc, char **argv)
{
    uv_loop_t loop;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else {
            fprintf(stderr, "usage: bench_pyworker [--quick]\n");
            return 2;
        }
    }
    uv_loop_init(&loop);
    fprintf(stderr, "bench_pyworker%s: capsule-pyworker through the C client\n",
            quick ? " (--quick)" : "");
    fprintf(stderr, "  %-34s %12s %-4s   %-26s %10s\n", "metric", "value", "", "peer",
            "peer value");
    bench_roundtrip(&loop);
    bench_start_and_memory(&loop);
    bench_print_latency(&loop);
    bench_delta(&loop);
    while (uv_run(&loop, UV_RUN_DEFAULT))
        ;
    if (uv_loop_close(&loop) != 0)
        cap_log(CAP_LOG_WARN, "bench", "loop did not close cleanly");
    return 0;
}
