/*
 * bench_resonate.c - Resonate protocol operations per second over HTTP (capsule-engine's
 * `POST /`, tools/resonate) beside the same operations in-process (promise/), same run.
 *
 * Figures, from 1 and from 64 concurrent callers, sync durability (every commit fsynced):
 *   - protocol ops/s: promise.create + promise.settle pairs (each one operation) sent as envelopes
 *     over keep-alive HTTP/1.1 connections (one per caller, one request in flight each) to a
 *     capsule-engine child process (bin/capsule-engine next to this executable);
 *   - peer: prom_promise_create + prom_promise_settle called in-process on a promise store of
 *     its own (same payload and tags), from the same number of threads;
 *   - p50 / p99 latency per operation of both.
 * Human table on stderr, one JSON object per figure on stdout. --quick: short runs.
 */
#include <arpa/inet.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "cap.h"
#include "promise.h"

static double run_secs = 4.0;
static char bindir[PATH_MAX];
static char base_dir[PATH_MAX];
static int port;
static const char payload[] = "eyJmdW5jIjoid2YiLCJhcmdzIjpbMTBdLCJ2ZXJzaW9uIjoxfQ==";

typedef struct worker {
    int idx, http;
    prom_store_t *ps;
    atomic_int *stop;
    uint64_t ops;
    bench_lat_t lat;
    int fd;
    char buf[16384];
} worker_t;

/* One request/answer on a keep-alive connection; checks the status line is 200. */
static void http_rpc(worker_t *w, const char *body)
{
    char req[2048];
    int n = snprintf(req, sizeof(req),
                     "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
    if (write(w->fd, req, (size_t)n) != n)
        cap_fatal("bench", "write failed");
    size_t got = 0;
    for (;;) {
        ssize_t k = read(w->fd, w->buf + got, sizeof(w->buf) - 1 - got);
        if (k <= 0)
            cap_fatal("bench", "read failed");
        got += (size_t)k;
        w->buf[got] = 0;
        char *end = strstr(w->buf, "\r\n\r\n");
        if (!end)
            continue;
        char *cl = strstr(w->buf, "Content-Length: ");
        if (!cl)
            cap_fatal("bench", "no content length");
        size_t want = (size_t)(end + 4 - w->buf) + (size_t)atol(cl + 16);
        if (got >= want)
            break;
    }
    if (strncmp(w->buf, "HTTP/1.1 200", 12) != 0)
        cap_fatal("bench", "answer was not 200: %.200s", w->buf);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    char id[64], body[1024];
    prom_value_t val = {NULL, 0, (void *)payload, sizeof(payload) - 1};
    prom_kv_t tags[1] = {{"resonate:scope", "global"}};
    uint64_t n = 0;
    if (w->http) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        w->fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(w->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(w->fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
            cap_fatal("bench", "connect failed");
    }
    while (!atomic_load(w->stop)) {
        snprintf(id, sizeof(id), "bench-%d-%llu", w->idx, (unsigned long long)n++);
        int64_t timeout = cap_wall_ms() + 3600000;
        for (int op = 0; op < 2; op++) {
            uint64_t t0 = cap_now_ns();
            if (w->http) {
                if (op == 0)
                    snprintf(body, sizeof(body),
                             "{\"kind\":\"promise.create\",\"head\":{\"corrId\":\"c%llu\","
                             "\"version\":\"2026-04-01\"},\"data\":{\"id\":\"%s\",\"timeoutAt\":"
                             "%lld,\"param\":{\"headers\":{},\"data\":\"%s\"},\"tags\":{"
                             "\"resonate:scope\":\"global\"}}}",
                             (unsigned long long)n, id, (long long)timeout, payload);
                else
                    snprintf(body, sizeof(body),
                             "{\"kind\":\"promise.settle\",\"head\":{\"corrId\":\"s%llu\","
                             "\"version\":\"2026-04-01\"},\"data\":{\"id\":\"%s\",\"state\":"
                             "\"resolved\",\"value\":{\"headers\":{},\"data\":\"%s\"}}}",
                             (unsigned long long)n, id, payload);
                http_rpc(w, body);
            } else {
                prom_result_t r;
                int rc;
                if (op == 0) {
                    prom_create_t c = {id, timeout, &val, tags, 1};
                    rc = prom_promise_create(w->ps, &c, &r);
                } else {
                    prom_settle_t s = {id, PROM_RESOLVED, &val};
                    rc = prom_promise_settle(w->ps, &s, &r);
                }
                if (rc != 0 || r.status != 200)
                    cap_fatal("bench", "promise op failed");
                prom_result_clear(&r);
            }
            bench_lat_add(&w->lat, cap_now_ns() - t0);
            w->ops++;
        }
    }
    if (w->http)
        close(w->fd);
    return NULL;
}

typedef struct result {
    double ops_s, p50_us, p99_us;
} result_t;

static result_t run(int nthreads, int http, prom_store_t *ps)
{
    atomic_int stop = 0;
    worker_t *ws = cap_calloc((size_t)nthreads, sizeof(*ws));
    pthread_t *th = cap_calloc((size_t)nthreads, sizeof(*th));
    for (int i = 0; i < nthreads; i++) {
        ws[i].idx = i;
        ws[i].http = http;
        ws[i].ps = ps;
        ws[i].stop = &stop;
        pthread_create(&th[i], NULL, worker_main, &ws[i]);
    }
    uint64_t t0 = cap_now_ns();
    usleep((useconds_t)(run_secs * 1e6));
    atomic_store(&stop, 1);
    bench_lat_t all = {0};
    uint64_t ops = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        ops += ws[i].ops;
        bench_lat_merge(&all, &ws[i].lat);
    }
    result_t r = {(double)ops / bench_secs_since(t0), bench_lat_pct(&all, 0.5) / 1e3,
                  bench_lat_pct(&all, 0.99) / 1e3};
    bench_lat_free(&all);
    cap_free(ws);
    cap_free(th);
    return r;
}

static pid_t start_server(const char *data)
{
    int pfd[2];
    if (pipe(pfd) != 0)
        cap_fatal("bench", "pipe");
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pfd[1], 1);
        close(pfd[0]);
        char exe[PATH_MAX + 32];
        snprintf(exe, sizeof(exe), "%s/capsule-engine", bindir);
        execl(exe, exe, "--listen", "127.0.0.1:0", "--data-dir", data, "--durability", "sync",
              "--log-level", "warn", "--pool-idle", "1", "--max-conns", "256", (char *)NULL);
        _exit(127);
    }
    close(pfd[1]);
    char line[256];
    size_t n = 0;
    while (n < sizeof(line) - 1 && read(pfd[0], line + n, 1) == 1 && line[n++] != '\n')
        ;
    line[n] = 0;
    close(pfd[0]);
    char *p = strstr(line, "port ");
    if (!p)
        cap_fatal("bench", "capsule-engine did not start (%s)", line);
    port = atoi(p + 5);
    return pid;
}

int main(int argc, char **argv)
{
    int quick = bench_quick_arg(argc, argv);
    if (quick)
        run_secs = 1.0;
    char exe[PATH_MAX];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (k <= 0)
        cap_fatal("bench", "readlink");
    exe[k] = 0;
    snprintf(bindir, sizeof(bindir), "%s", exe);
    *strrchr(bindir, '/') = 0;
    snprintf(base_dir, sizeof(base_dir), "/tmp/bench_resonate.%d", (int)getpid());
    bench_begin("resonate");
    if (mkdir(base_dir, 0700) != 0)
        cap_fatal("bench", "cannot create %s", base_dir);

    char sdir[PATH_MAX], pdir[PATH_MAX];
    bench_fresh_dir(sdir, sizeof(sdir), base_dir, "server");
    bench_fresh_dir(pdir, sizeof(pdir), base_dir, "peer");
    pid_t pid = start_server(sdir);
    store_env_t *env;
    prom_store_t *ps;
    store_env_opts_t eo = {0};
    eo.map_size = 1ull << 30;
    prom_opts_t po = {0};
    po.checkpoint_ms = -1; /* as the engine opens its store: the tables in each commit */
    if (store_env_open(pdir, &eo, &env) != 0 || prom_store_open(env, &po, &ps) != 0)
        cap_fatal("bench", "peer store open");

    fprintf(stderr, "resonate bench (%s, sync durability, %.1f s per figure)\n",
            quick ? "quick" : "full", run_secs);
    fprintf(stderr, "  %-44s %12s %10s %10s\n", "", "ops/s", "p50 us", "p99 us");
    static const int conc[] = {1, 64};
    for (int i = 0; i < 2; i++) {
        int c = conc[i];
        /* interleaved: peer, HTTP, and the figure is the pair from the same moment */
        result_t rp = run(c, 0, ps);
        result_t rh = run(c, 1, NULL);
        fprintf(stderr, "  %-44s %12.0f %10.1f %10.1f\n",
                c == 1 ? "protocol over HTTP, 1 connection" : "protocol over HTTP, 64 connections",
                rh.ops_s, rh.p50_us, rh.p99_us);
        fprintf(stderr, "  %-44s %12.0f %10.1f %10.1f\n",
                c == 1 ? "promise/ in-process, 1 thread" : "promise/ in-process, 64 threads",
                rp.ops_s, rp.p50_us, rp.p99_us);
        char m[64];
        snprintf(m, sizeof(m), "protocol_ops_per_s_%d", c);
        bench_emit(m, rh.ops_s, "ops/s", "promise/ in-process", rp.ops_s, 0, BENCH_HIGHER);
        snprintf(m, sizeof(m), "protocol_op_p50_us_%d", c);
        bench_emit(m, rh.p50_us, "us", "promise/ in-process", rp.p50_us, 0, BENCH_LOWER);
        snprintf(m, sizeof(m), "protocol_op_p99_us_%d", c);
        bench_emit(m, rh.p99_us, "us", "promise/ in-process", rp.p99_us, 0, BENCH_LOWER);
    }
    prom_store_close(ps);
    store_env_close(env);
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    bench_rmtree(base_dir);
    return 0;
}
