/*
 * bench_pyworker.c - the worker and its client, measured.
 *
 * Figures (peers measured side by side in the same run):
 *   1. execute "2+2" round trip through the C client (send -> on_result), p50 and p99;
 *      peer: a PING/PONG round trip on the same socket (the IPC floor). Goal: p50 <= 100 us.
 *      The same with the client thread and the worker pinned to one CPU (pyw_worker_set_cpu,
 *      as the engine does for a lone execution), in blocks alternating with the unpinned runs.
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
#include <sys/syscall.h>
#include <unistd.h>

#include "cap.h"
#include "bench.h"
#include "pyworker.h"

static int quick;

/* a percentile of samples in nanoseconds, in microseconds */
static double lat_us(bench_lat_t *l, double p)
{
    return bench_lat_pct(l, p) / 1000.0;
}

/* ---- a worker driven on our loop ---- */
typedef struct bw {
    uv_loop_t *loop;
    pyw_worker_t *w;
    int ready, done, pong, exited;
    pyw_status_t status;
    uint64_t delta_len, in_worker_ns;
    bench_lat_t *chunk_lat; /* print-to-chunk samples, if measuring */
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
        bench_lat_add(b->chunk_lat, now - t);
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

/* The calling thread's affinity: one CPU (cpu >= 0) or the mask in `all`. */
static void pin_self(int cpu, const unsigned long *all, size_t all_len)
{
    unsigned long one[16] = {0};
    if (cpu >= 0)
        one[cpu / 64] = 1ul << (cpu % 64);
    if (syscall(SYS_sched_setaffinity, 0, cpu >= 0 ? sizeof one : all_len, cpu >= 0 ? one : all))
        cap_fatal("bench", "sched_setaffinity failed");
}

static void bench_roundtrip(uv_loop_t *loop)
{
    bw_t b, bp;
    bench_lat_t ex = {0}, ping = {0}, inw = {0}, exp = {0}, pingp = {0};
    int n = quick ? 500 : 5000, block = 50;
    unsigned long all[16];
    long all_len = syscall(SYS_sched_getaffinity, 0, sizeof all, all);
    unsigned cpu = 0;
    if (all_len <= 0 || syscall(SYS_getcpu, &cpu, NULL, NULL) != 0)
        cap_fatal("bench", "sched_getaffinity/getcpu failed");
    bw_open(&b, loop, NULL);
    bw_open(&bp, loop, NULL);
    int rc = pyw_worker_set_cpu(bp.w, (int)cpu);
    if (rc)
        cap_fatal("bench", "pyw_worker_set_cpu: %s", cap_strerror(rc));
    for (int i = 0; i < 200; i++) { /* warm-up */
        bw_exec(&b, "2+2");
        bw_ping(&b);
        bw_exec(&bp, "2+2");
    }
    /* interleaved (blocks of `block`: unpinned, then pinned), so both see the same machine */
    for (int i = 0; i < n; i += block) {
        for (int k = 0; k < block; k++) {
            bench_lat_add(&ex, bw_exec(&b, "2+2"));
            bench_lat_add(&inw, b.in_worker_ns);
            bench_lat_add(&ping, bw_ping(&b));
        }
        pin_self((int)cpu, all, (size_t)all_len);
        for (int k = 0; k < block; k++) {
            bench_lat_add(&exp, bw_exec(&bp, "2+2"));
            bench_lat_add(&pingp, bw_ping(&bp));
        }
        pin_self(-1, all, (size_t)all_len);
    }
    double e50 = lat_us(&ex, 0.5), e99 = lat_us(&ex, 0.99);
    double p50 = lat_us(&ping, 0.5), p99 = lat_us(&ping, 0.99);
    bench_emit("execute_2plus2_p50", e50, "us", "ping_roundtrip_p50", p50, 100, 1);
    bench_emit("execute_2plus2_p99", e99, "us", "ping_roundtrip_p99", p99, 0, 1);
    /* where the time goes: the part spent inside the worker's run_cell (compile, run, repr,
     * JSON, namespace delta) */
    bench_emit("execute_2plus2_in_run_cell_p50", lat_us(&inw, 0.5), "us", NULL, 0, 0, 1);
    bench_emit("execute_2plus2_pinned_p50", lat_us(&exp, 0.5), "us", "execute_2plus2_p50", e50, 100,
               1);
    bench_emit("execute_2plus2_pinned_p99", lat_us(&exp, 0.99), "us", "execute_2plus2_p99", e99, 0,
               1);
    bench_emit("ping_roundtrip_pinned_p50", lat_us(&pingp, 0.5), "us", "ping_roundtrip_p50", p50, 0,
               1);
    bench_lat_free(&inw);
    bw_close(&b);
    bw_close(&bp);
    bench_lat_free(&ex);
    bench_lat_free(&ping);
    bench_lat_free(&exp);
    bench_lat_free(&pingp);
}

static void bench_start_and_memory(uv_loop_t *loop)
{
    pyw_zygote_t *z;
    int rc = pyw_zygote_open(NULL, &z);
    if (rc)
        cap_fatal("bench", "zygote: %s", cap_strerror(rc));
    int n = quick ? 5 : 30;
    bench_lat_t zs = {0}, cs = {0};
    for (int i = 0; i < n; i++) {
        bw_t b;
        uint64_t t0 = cap_now_ns();
        bw_open(&b, loop, z); /* spaced out by the cold start below: the spare is ready */
        bench_lat_add(&zs, cap_now_ns() - t0);
        bw_close(&b);
        t0 = cap_now_ns();
        bw_open(&b, loop, NULL);
        bench_lat_add(&cs, cap_now_ns() - t0);
        bw_close(&b);
    }
    /* a burst: spawns back to back (the spare is used once, then direct forks) */
    int nb = quick ? 4 : 8;
    bench_lat_t bs = {0};
    bw_t *burst = cap_calloc((size_t)nb, sizeof *burst);
    usleep(20000);
    for (int i = 0; i < nb; i++) {
        uint64_t t0 = cap_now_ns();
        bw_open(&burst[i], loop, z);
        bench_lat_add(&bs, cap_now_ns() - t0);
    }
    for (int i = 0; i < nb; i++)
        bw_close(&burst[i]);
    cap_free(burst);
    double z50 = lat_us(&zs, 0.5) / 1000, c50 = lat_us(&cs, 0.5) / 1000;
    double z99 = lat_us(&zs, 0.99) / 1000, c99 = lat_us(&cs, 0.99) / 1000;
    bench_emit("zygote_fork_to_ready_p50", z50, "ms", "cold_start_to_ready_p50", c50, 3, 1);
    bench_emit("zygote_fork_to_ready_p99", z99, "ms", "cold_start_to_ready_p99", c99, 0, 1);
    bench_emit("cold_start_to_ready_p50", c50, "ms", NULL, 0, 60, 1);
    bench_emit("zygote_burst_fork_to_ready_p50", lat_us(&bs, 0.5) / 1000, "ms",
               "cold_start_to_ready_p50", c50, 0, 1);
    bench_lat_free(&bs);

    /* memory: m idle workers of each kind, each after one trivial cell */
    int m = quick ? 4 : 16;
    bw_t *zw = cap_calloc((size_t)m, sizeof *zw), *cw = cap_calloc((size_t)m, sizeof *cw);
    for (int i = 0; i < m; i++) {
        bw_open(&zw[i], loop, z);
        bw_exec(&zw[i], "x = 1");
        bw_open(&cw[i], loop, NULL);
        bw_exec(&cw[i], "x = 1");
    }
    bench_lat_t zm = {0}, cm = {0}; /* KiB, stored as integers */
    for (int i = 0; i < m; i++) {
        bench_lat_add(&zm, (uint64_t)uss_kib(pyw_worker_pid(zw[i].w)));
        bench_lat_add(&cm, (uint64_t)uss_kib(pyw_worker_pid(cw[i].w)));
    }
    double zmed = lat_us(&zm, 0.5) * 1000 / 1024, cmed = lat_us(&cm, 0.5) * 1000 / 1024; /* MiB */
    bench_emit("uss_per_idle_worker_zygote", zmed, "MiB", "uss_per_idle_worker_cold", cmed, 4, 1);
    for (int i = 0; i < m; i++) {
        bw_close(&zw[i]);
        bw_close(&cw[i]);
    }
    cap_free(zw);
    cap_free(cw);
    pyw_zygote_close(z);
    bench_lat_free(&zs);
    bench_lat_free(&cs);
    bench_lat_free(&zm);
    bench_lat_free(&cm);
}

static void bench_print_latency(uv_loop_t *loop)
{
    bw_t b;
    bench_lat_t cl = {0};
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
    bench_emit("print_to_chunk_p50", lat_us(&cl, 0.5), "us", NULL, 0, 0, 1);
    bench_emit("print_to_chunk_p99", lat_us(&cl, 0.99), "us", NULL, 0, 1000, 1);
    bw_close(&b);
    bench_lat_free(&cl);
}

static void bench_delta(uv_loop_t *loop)
{
    bw_t big, empty;
    bench_lat_t lb = {0}, le = {0};
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
        bench_lat_add(&lb, bw_exec(&big, "v17 += 1"));
        dlen = big.delta_len;
        bench_lat_add(&le, bw_exec(&empty, "v17 += 1"));
    }
    double b50 = lat_us(&lb, 0.5), e50 = lat_us(&le, 0.5);
    bench_emit("cell_roundtrip_1000_names_p50", b50, "us", "cell_roundtrip_empty_ns_p50", e50, 0,
               1);
    bench_emit("cell_roundtrip_1000_names_p99", lat_us(&lb, 0.99), "us",
               "cell_roundtrip_empty_ns_p99", lat_us(&le, 0.99), 0, 1);
    bench_emit("delta_cost_1000_names_one_changed", b50 - e50, "us", NULL, 0, 200, 1);
    bench_emit("delta_size_one_changed", (double)dlen, "B", NULL, 0, 0, 1);
    bw_close(&big);
    bw_close(&empty);
    bench_lat_free(&lb);
    bench_lat_free(&le);
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
    bench_begin("pyworker");
    fprintf(stderr, "bench_pyworker%s: capsule-pyworker through the C client\n",
            quick ? " (--quick)" : "");
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
