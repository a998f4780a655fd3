/*
 * bench_server.c - capsule-engine over the network, measured from a real client:
 *   - "2+2" over one WebSocket, sync durability: send {"type":"execute"} until the "result"
 *     message arrives (the result is durable when it is sent); p50 / p99. Goal: p50 <= 0.8 ms.
 *     Peer, in the same run: the same cell through the engine's C API in-process
 *     (eng_execute_sync, sync durability, its own data directory), in blocks alternating with
 *     the WebSocket's, so the ratio is what the HTTP/WebSocket layer and the process hop cost. And
 * Jupyter: ipykernel driven by jupyter_client (bench/server/jupyter_peer.py), timed to
 * execute_reply; goal: capsule at least 6x faster at p50 while durable.
 *     The same pair once more with nosync durability, on a server of its own (and an in-process
 *     engine of its own): without the journal's write the server's own share (HTTP/WebSocket,
 *     JSON, the process hop) is a larger part of the whole and shows in the ratio.
 *     --only ws: just the two pairs, sync then nosync, each on a fresh server (for A/B runs).
 *   - session create over REST (POST /v1/sessions, served from the warm pool): p50 / p99.
 * The server is started as a child process (bin/capsule-engine next to this executable) on a
 * fresh data directory; the client is a minimal blocking HTTP/WebSocket client written here.
 *
 * Human table on stderr, one JSON object per figure on stdout. --quick: small counts.
 *   - 200 WebSocket clients (20 with --quick), each on its own session, each offering one "2+2"
 *     every 500 ms (CAPSULE_SOAK_GAP_MS; 400/s in all, a fixed rate well under what the machine
 *     can do) for 60 s (6 s): errors (goal 0), p50/p99 from when each cell was due (goal p99 <=
 *     10 ms), throughput, and the server's anonymous RSS growth from the end of warm-up (the
 *     first third) to the end (goal <= 10%; the LMDB map's file pages not counted), with malloc's
 *     own account beside it (in use / free in its arenas, from /v1/metrics: a leak grows the
 *     first, fragmentation the second). Every 250 ms: RssAnon / RssFile and the log's
 *     checkpoints; from them the RssAnon slope after warm-up and over the last third (a plateau
 *     shows as a last-third slope near 0), the growth per log record, and the latencies split
 *     by whether a checkpoint was in flight during them (is the tail the checkpoints' flush?);
 *     the CPU the server and this client used and the load average (is the tail the machine?).
 *     Then the same clients back to back for 15 s (3 s): the most this machine does (its
 *     latency is then queueing: clients / throughput).
 */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "capsule.h"
#include "bench.h"
#include "cap.h"

static char bindir[PATH_MAX];

typedef struct cli {
    int fd;
    char buf[1 << 16];
    size_t len;
} cli_t;

static void die(const char *what)
{
    fprintf(stderr, "bench_server: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int cli_connect(cli_t *c, int port)
{
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    c->len = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(0x7f000001);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return connect(c->fd, (struct sockaddr *)&a, sizeof(a));
}

/* A fresh connection for a REST client that sat idle (the server closes idle connections). */
static void cli_reconnect(cli_t *c, int port)
{
    close(c->fd);
    if (cli_connect(c, port) != 0)
        die("connect");
}

static void cli_send(cli_t *c, const void *d, size_t n)
{
    const char *p = d;
    while (n) {
        ssize_t k = write(c->fd, p, n);
        if (k < 0)
            die("write");
        p += k;
        n -= (size_t)k;
    }
}

static void cli_fill(cli_t *c)
{
    if (c->len == sizeof(c->buf))
        die("response too big");
    ssize_t k = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);
    if (k <= 0) {
        errno = k == 0 ? ECONNRESET : errno;
        die("read");
    }
    c->len += (size_t)k;
}

static void cli_consume(cli_t *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

/* One HTTP request on a keep-alive connection; returns the status; body copied to out. */
static int http_do(cli_t *c, const char *method, const char *path, const char *body, char *out,
                   size_t outn)
{
    char req[1024];
    int n = snprintf(req, sizeof(req),
                     "%s %s HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     method, path, body ? strlen(body) : 0, body ? body : "");
    cli_send(c, req, (size_t)n);
    char *end;
    while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4)))
        cli_fill(c);
    size_t head = (size_t)(end - c->buf) + 4;
    int status = atoi(c->buf + 9);
    char *cl = memmem(c->buf, head, "Content-Length: ", 16);
    size_t blen = cl ? (size_t)atol(cl + 16) : 0;
    while (c->len < head + blen)
        cli_fill(c);
    if (out) {
        size_t k = blen < outn - 1 ? blen : outn - 1;
        memcpy(out, c->buf + head, k);
        out[k] = 0;
    }
    cli_consume(c, head + blen);
    return status;
}

static void ws_upgrade(cli_t *c, const char *path)
{
    char req[512];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path);
    cli_send(c, req, (size_t)n);
    char *end;
    while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4)))
        cli_fill(c);
    if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "bench_server: upgrade refused: %.*s\n", (int)c->len, c->buf);
        exit(1);
    }
    cli_consume(c, (size_t)(end - c->buf) + 4);
}

static void ws_send_text(cli_t *c, const char *s)
{
    size_t n = strlen(s), k = 0;
    uint8_t f[1024];
    f[k++] = 0x81;
    if (n < 126) {
        f[k++] = (uint8_t)(0x80 | n);
    } else {
        f[k++] = 0x80 | 126;
        f[k++] = (uint8_t)(n >> 8);
        f[k++] = (uint8_t)n;
    }
    uint8_t m[4] = {0x11, 0x22, 0x33, 0x44};
    memcpy(f + k, m, 4);
    k += 4;
    for (size_t i = 0; i < n; i++)
        f[k + i] = (uint8_t)s[i] ^ m[i % 4];
    cli_send(c, f, k + n);
}

/* Takes one text message (unfragmented server frames) from the buffer if complete: 1, else 0. */
static int ws_try_text(cli_t *c, char *out, size_t outn)
{
    for (;;) {
        if (c->len < 2)
            return 0;
        uint8_t *p = (uint8_t *)c->buf;
        size_t hl = 2, len = p[1] & 0x7f;
        if (len == 126) {
            if (c->len < 4)
                return 0;
            len = (size_t)p[2] << 8 | p[3];
            hl = 4;
        } else if (len == 127) {
            if (c->len < 10)
                return 0;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = len << 8 | p[2 + i];
            hl = 10;
        }
        if (c->len < hl + len)
            return 0;
        int op = p[0] & 0x0f;
        if (op == 8) {
            fprintf(stderr, "bench_server: server closed the WebSocket\n");
            exit(1);
        }
        if (op == 1) {
            size_t k = len < outn - 1 ? len : outn - 1;
            memcpy(out, c->buf + hl, k);
            out[k] = 0;
            cli_consume(c, hl + len);
            return 1;
        }
        cli_consume(c, hl + len); /* ping etc. */
    }
}

/* Reads one text message into out (blocking). */
static void ws_recv_text(cli_t *c, char *out, size_t outn)
{
    while (!ws_try_text(c, out, outn))
        cli_fill(c);
}

/* A resident-memory line of /proc/PID/status in KiB: RssAnon (heap, stacks, LMDB's malloc'ed
 * dirty pages: what a leak grows) or RssFile (file pages mapped: the LMDB map, which grows with
 * the log, and the executable's own). */
static long rss_kib(pid_t pid, const char *key)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long v = -1;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof(line), f))
        if (strncmp(line, key, kl) == 0)
            v = atol(line + kl);
    if (f)
        fclose(f);
    return v;
}

#define SOAK_TREND 64

/* The server's /v1/metrics text (a static buffer), or "" when the scrape failed. */
static const char *metrics_text(cli_t *rest)
{
    static char m[1 << 16];
    if (http_do(rest, "GET", "/v1/metrics", NULL, m, sizeof(m)) != 200)
        m[0] = 0;
    return m;
}

/* One series' value in a metrics text (name with its labels, as printed); -1 when absent. */
static double metric_val(const char *m, const char *name)
{
    char key[160];
    snprintf(key, sizeof(key), "\n%s ", name);
    const char *p = strstr(m, key);
    return p ? atof(p + strlen(key)) : -1;
}

/* Cumulative counts of a histogram at the bounds asked (le as printed by the server). */
#define HIST_LE 3
typedef struct hist_snap {
    double le[HIST_LE], count;
} hist_snap_t;

static hist_snap_t hist_take(const char *m, const char *name, const char *label,
                             const char *const le[HIST_LE])
{
    /* label: "" or one `key="value"` of a labelled series */
    hist_snap_t h;
    char key[200];
    const char *sep = *label ? "," : "";
    for (int i = 0; i < HIST_LE; i++) {
        snprintf(key, sizeof(key), "%s_bucket{%s%sle=\"%s\"}", name, label, sep, le[i]);
        h.le[i] = metric_val(m, key);
    }
    if (*label)
        snprintf(key, sizeof(key), "%s_count{%s}", name, label);
    else
        snprintf(key, sizeof(key), "%s_count", name);
    h.count = metric_val(m, key);
    return h;
}

static const char *const stage_names[3] = {"request", "run", "finish"};

typedef struct mem_sample {
    long rss, rss_file;       /* KiB: RssAnon (heap, stacks, LMDB's malloc'ed pages), RssFile */
    long heap_use, heap_free; /* KiB: malloc'ed, free inside malloc's arenas */
    hist_snap_t exec, busy;   /* capsule_execution_seconds, capsule_loop_busy_seconds */
    hist_snap_t commit;       /* capsule_wal_commit_seconds */
    double commit_sum, ckpts, ckpt_sum; /* the log writer's time in commits; checkpoints and
                                         * their time (on the log's checkpoint thread) */
    double busy_max, busy_max_cpu;      /* the longest loop iteration since the previous scrape, and
                                         * the loop thread's CPU time in it */
    double busy_sum, cpu_sum;           /* the loop's busy time and its thread's CPU time, totals */
    double ckpt_stall;                  /* the log writer's time on checkpoints */
    double records;                     /* the log's records (capsule_wal_records_total) */
    hist_snap_t stage[3];               /* capsule_execution_stage_seconds, by stage_names */
    double stage_sum[3];
} mem_sample_t;

static const char *const exec_le[HIST_LE] = {"0.005", "0.01", "0.05"};
static const char *const busy_le[HIST_LE] = {"0.005", "0.01", "0.05"};
static const char *const commit_le[HIST_LE] = {"0.01", "0.05", "0.1"};

static mem_sample_t mem_sample(cli_t *rest, pid_t pid)
{
    const char *m = metrics_text(rest);
    mem_sample_t s = {rss_kib(pid, "RssAnon:"),
                      rss_kib(pid, "RssFile:"),
                      (long)(metric_val(m, "capsule_heap_in_use_bytes") / 1024),
                      (long)(metric_val(m, "capsule_heap_free_bytes") / 1024),
                      hist_take(m, "capsule_execution_seconds", "", exec_le),
                      hist_take(m, "capsule_loop_busy_seconds", "", busy_le),
                      hist_take(m, "capsule_wal_commit_seconds", "", commit_le),
                      metric_val(m, "capsule_wal_commit_seconds_sum"),
                      metric_val(m, "capsule_wal_checkpoints_total"),
                      metric_val(m, "capsule_wal_checkpoint_seconds_total"),
                      metric_val(m, "capsule_loop_busy_max_seconds"),
                      metric_val(m, "capsule_loop_busy_max_cpu_seconds"),
                      metric_val(m, "capsule_loop_busy_seconds_sum"),
                      metric_val(m, "capsule_loop_cpu_seconds_total"),
                      metric_val(m, "capsule_wal_checkpoint_stall_seconds_total"),
                      metric_val(m, "capsule_wal_records_total"),
                      {{{0}, 0}},
                      {0}};
    for (int i = 0; i < 3; i++) {
        char label[32], key[96];
        snprintf(label, sizeof(label), "stage=\"%s\"", stage_names[i]);
        s.stage[i] = hist_take(m, "capsule_execution_stage_seconds", label, exec_le);
        snprintf(key, sizeof(key), "capsule_execution_stage_seconds_sum{%s}", label);
        s.stage_sum[i] = metric_val(m, key);
    }
    return s;
}

typedef struct soak_res {
    uint64_t *lat;
    uint64_t *lag; /* this client's own lateness: a free client's send after its due time */
    uint64_t *acc; /* from when due to the "accepted" message (durably recorded) */
    size_t n, nlag, nacc, errors, done;
    double busy_max, busy_max_cpu; /* the server loop's longest iteration after warm-up, and
                                    * the loop thread's CPU time in it, seconds */
    long rss_warm, rss_end;
    mem_sample_t warm, last;
    mem_sample_t trend[SOAK_TREND]; /* every 5 s from the start */
    size_t ntrend;
    double secs;       /* the measured part (after warm-up) */
    uint64_t *lat_end; /* when each kept latency ended (beside lat) */
    /* every 250 ms from the start: seconds since it, the server's RssAnon / RssFile (KiB), its
     * checkpoints and their seconds (capsule_wal_checkpoint*_total) */
    double *tick_t, *tick_ckpts, *tick_ckpt_s;
    long *tick_rss, *tick_rss_file;
    size_t nticks;
    uint64_t t0;
    double cpu_server, cpu_client; /* CPU seconds over the run: the server process, this one */
    double load0, load1;           /* the 1-min load average at the start and the end */
    double wall;                   /* seconds from the start to the last answer */
} soak_res_t;

/* utime + stime of a process in seconds (clock ticks of /proc/PID/stat) */
static double proc_cpu_s(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
    if (f)
        fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    unsigned long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return 0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double load_1min(void)
{
    double l = 0;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1)
            l = 0;
        fclose(f);
    }
    return l;
}

/*
 * n clients, each with its own session and WebSocket, each executing "2+2" for `secs`.
 *
 * gap_ms > 0: each client offers one execution every gap_ms (a fixed rate: think time between
 * its cells, phases spread at random); when an answer comes after the next one was due, the next
 * is sent at once, and its latency counts from when it was due (so a slow server is not hidden
 * by clients that wait for it: no coordinated omission). gap_ms == 0: back to back (closed loop),
 * which measures what the machine can do at most, at the price of queueing: the latency is then
 * n / throughput whatever the server does.
 *
 * The first third of the run is warm-up (sessions get workers, pages get touched); latencies
 * after it are kept. Errors: an error message, a result that is not ok/4, a connection lost. The
 * server's RssAnon is sampled every 5 s; the growth is from the end of warm-up to the end.
 */
static void soak(cli_t *rest, int port, pid_t pid, const char *prefix, size_t n, double secs,
                 uint32_t gap_ms, soak_res_t *out)
{
    char body[8192], msg[8192];
    cli_t *cl = cap_calloc(n, sizeof(cli_t));
    uint64_t *due = cap_calloc(n, sizeof(uint64_t));   /* when its current/next cell is due */
    unsigned char *busy = cap_calloc(n, 1);            /* an execution outstanding */
    uint64_t *freed = cap_calloc(n, sizeof(uint64_t)); /* when its last answer was read */
    struct pollfd *pf = cap_calloc(n, sizeof(struct pollfd));
    size_t cap = 1 << 16, lagcap = 1 << 16, acccap = 1 << 16;
    uint64_t gap = (uint64_t)gap_ms * 1000000ull;
    memset(out, 0, sizeof(*out));
    out->lat = cap_malloc(cap * sizeof(uint64_t));
    out->lag = cap_malloc(cap * sizeof(uint64_t));
    out->acc = cap_malloc(acccap * sizeof(uint64_t));
    out->lat_end = cap_malloc(cap * sizeof(uint64_t));
    size_t tickcap = (size_t)(secs * 4) + 8;
    out->tick_t = cap_calloc(tickcap, sizeof(double));
    out->tick_ckpts = cap_calloc(tickcap, sizeof(double));
    out->tick_ckpt_s = cap_calloc(tickcap, sizeof(double));
    out->tick_rss = cap_calloc(tickcap, sizeof(long));
    out->tick_rss_file = cap_calloc(tickcap, sizeof(long));
    cli_reconnect(rest, port);
    for (size_t i = 0; i < n; i++) {
        char b[64], path[64];
        snprintf(b, sizeof(b), "{\"id\":\"%s%zu\"}", prefix, i);
        if (http_do(rest, "POST", "/v1/sessions", b, body, sizeof(body)) != 201) {
            fprintf(stderr, "bench_server: soak session %zu: %s\n", i, body);
            exit(1);
        }
        if (cli_connect(&cl[i], port) != 0)
            die("connect");
        snprintf(path, sizeof(path), "/v1/sessions/%s%zu/ws", prefix, i);
        ws_upgrade(&cl[i], path);
        pf[i].fd = cl[i].fd;
        pf[i].events = POLLIN;
    }
    static const char ex[] = "{\"type\":\"execute\",\"code\":\"2+2\"}";
    uint64_t t0 = cap_now_ns(), warm_end = t0 + (uint64_t)(secs * 1e9 / 3),
             end = t0 + (uint64_t)(secs * 1e9), drain_end = end + 10000000000ull;
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < n; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        due[i] = t0 + (gap ? rng % gap : 0);
    }
    int warmed = 0;
    size_t active = n; /* clients not finished */
    uint64_t next_sample = t0, next_tick = t0;
    out->t0 = t0;
    out->cpu_server = proc_cpu_s(pid);
    out->cpu_client = proc_cpu_s(getpid());
    out->load0 = load_1min();
    while (active > 0) {
        uint64_t now = cap_now_ns();
        if (now > drain_end) {
            for (size_t i = 0; i < n; i++)
                out->errors += busy[i]; /* never answered */
            break;
        }
        if (!warmed && now >= warm_end) {
            warmed = 1;
            out->warm = mem_sample(rest, pid);
            out->rss_warm = out->warm.rss;
        }
        if (now >= next_sample && now < end && out->ntrend < SOAK_TREND) {
            mem_sample_t m = mem_sample(rest, pid);
            out->trend[out->ntrend++] = m;
            if (warmed && m.busy_max > out->busy_max) {
                out->busy_max = m.busy_max;
                out->busy_max_cpu = m.busy_max_cpu;
            }
            next_sample += 5000000000ull;
        }
        if (now >= next_tick && now < end && out->nticks < tickcap) {
            const char *m = metrics_text(rest);
            size_t k = out->nticks++;
            out->tick_t[k] = (double)(now - t0) / 1e9;
            out->tick_ckpts[k] = metric_val(m, "capsule_wal_checkpoints_total");
            out->tick_ckpt_s[k] = metric_val(m, "capsule_wal_checkpoint_seconds_total");
            out->tick_rss[k] = rss_kib(pid, "RssAnon:");
            out->tick_rss_file[k] = rss_kib(pid, "RssFile:");
            next_tick += 250000000ull;
        }
        /* send what is due; the earliest future due time bounds the wait */
        uint64_t wake = now + 100000000ull;
        for (size_t i = 0; i < n; i++) {
            if (busy[i] || pf[i].fd < 0)
                continue;
            if (due[i] >= end) {
                pf[i].fd = -1;
                active--;
                continue;
            }
            if (due[i] <= now) {
                ws_send_text(&cl[i], ex);
                busy[i] = 1;
                /* late through this client alone (it was free when the cell was due) */
                uint64_t from = freed[i] > due[i] ? freed[i] : due[i];
                if (due[i] >= warm_end) {
                    if (out->nlag == lagcap)
                        out->lag = cap_realloc(out->lag, (lagcap *= 2) * sizeof(uint64_t));
                    out->lag[out->nlag++] = now - from;
                }
            } else if (due[i] < wake) {
                wake = due[i];
            }
        }
        int wait_ms = (int)((wake - now + 999999) / 1000000);
        if (poll(pf, (nfds_t)n, wait_ms) < 0 && errno != EINTR)
            die("poll");
        for (size_t i = 0; i < n; i++) {
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t k = read(cl[i].fd, cl[i].buf + cl[i].len, sizeof(cl[i].buf) - cl[i].len);
            if (k <= 0) {
                out->errors++;
                busy[i] = 0;
                pf[i].fd = -1;
                active--;
                continue;
            }
            cl[i].len += (size_t)k;
            while (ws_try_text(&cl[i], msg, sizeof(msg))) {
                if (strstr(msg, "\"type\":\"error\"")) {
                    out->errors++;
                    continue;
                }
                if (strstr(msg, "\"type\":\"accepted\"")) {
                    uint64_t t = cap_now_ns();
                    if (due[i] >= warm_end && t <= end) {
                        if (out->nacc == acccap)
                            out->acc = cap_realloc(out->acc, (acccap *= 2) * sizeof(uint64_t));
                        out->acc[out->nacc++] = t - due[i];
                    }
                    continue;
                }
                if (!strstr(msg, "\"type\":\"result\""))
                    continue;
                uint64_t t = cap_now_ns();
                if (!strstr(msg, "\"status\":\"ok\"") || !strstr(msg, "\"value\":4"))
                    out->errors++;
                out->done++;
                if (due[i] >= warm_end && t <= end) {
                    if (out->n == cap) {
                        cap *= 2;
                        out->lat = cap_realloc(out->lat, cap * sizeof(uint64_t));
                        out->lat_end = cap_realloc(out->lat_end, cap * sizeof(uint64_t));
                    }
                    out->lat_end[out->n] = t;
                    out->lat[out->n++] = t - due[i];
                }
                busy[i] = 0;
                freed[i] = t;
                due[i] = gap ? due[i] + gap : t; /* late: due already, sent at once */
            }
        }
    }
    out->cpu_server = proc_cpu_s(pid) - out->cpu_server;
    out->cpu_client = proc_cpu_s(getpid()) - out->cpu_client;
    out->load1 = load_1min();
    out->wall = (double)(cap_now_ns() - t0) / 1e9;
    cli_reconnect(rest, port);
    out->last = mem_sample(rest, pid);
    if (out->last.busy_max > out->busy_max) {
        out->busy_max = out->last.busy_max;
        out->busy_max_cpu = out->last.busy_max_cpu;
    }
    out->rss_end = out->last.rss;
    out->secs = secs * 2 / 3;
    for (size_t i = 0; i < n; i++) {
        char path[64];
        close(cl[i].fd);
        snprintf(path, sizeof(path), "/v1/sessions/%s%zu", prefix, i);
        http_do(rest, "DELETE", path, NULL, body, sizeof(body)); /* its worker goes back */
    }
    cap_free(cl);
    cap_free(due);
    cap_free(busy);
    cap_free(freed);
    cap_free(pf);
}

/* a percentile of samples in nanoseconds, in milliseconds */
static double pct(uint64_t *v, size_t n, double p)
{
    return bench_pct_u64(v, n, p) / 1e6;
}

/* The server's RssAnon over the run, from the ticks: at the start, at the end of the warm-up (a
 * third), half-way through the measured part and at the end; the least-squares slope over the
 * measured part and over its second half, KiB per minute. A plateau after warm-up shows as a
 * second-half slope near 0; a leak as a slope that does not fall. */
typedef struct mem_trend {
    long start, warm, mid, end;
    double slope, slope_late; /* KiB/min */
} mem_trend_t;

static double kib_slope(const soak_res_t *r, double from_s, double to_s)
{
    double n = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (size_t k = 0; k < r->nticks; k++) {
        double x = r->tick_t[k] / 60, y = (double)r->tick_rss[k];
        if (r->tick_t[k] < from_s || r->tick_t[k] > to_s || r->tick_rss[k] < 0)
            continue;
        n++, sx += x, sy += y, sxx += x * x, sxy += x * y;
    }
    double d = n * sxx - sx * sx;
    return n >= 2 && d > 0 ? (n * sxy - sx * sy) / d : 0;
}

static long rss_at(const soak_res_t *r, double t_s)
{
    long v = r->nticks ? r->tick_rss[0] : -1;
    for (size_t k = 0; k < r->nticks && r->tick_t[k] <= t_s; k++)
        v = r->tick_rss[k];
    return v;
}

static mem_trend_t mem_trend(const soak_res_t *r, double secs)
{
    mem_trend_t m = {
        rss_at(r, 0),    rss_at(r, secs / 3),          rss_at(r, secs * 2 / 3),
        rss_at(r, secs), kib_slope(r, secs / 3, secs), kib_slope(r, secs * 2 / 3, secs)};
    return m;
}

/* The kept latencies split by whether they overlap a checkpoint: a checkpoint that completed
 * between two ticks, taking d seconds (capture to durable), was in flight somewhere in
 * [previous tick - d, this tick], a window at most 250 ms wider than it. */
typedef struct ckpt_split {
    size_t n_in, n_out, slow_in, slow_out; /* executions; those over 10 ms */
    double p99_in, p99_out, time_in;       /* ms, ms; share of the measured time in windows */
} ckpt_split_t;

static ckpt_split_t ckpt_split(const soak_res_t *r, double warm_s, double end_s)
{
    ckpt_split_t c = {0};
    size_t nw = 0;
    double *w0 = cap_calloc(r->nticks + 1, sizeof(double)),
           *w1 = cap_calloc(r->nticks + 1, sizeof(double));
    for (size_t k = 1; k < r->nticks; k++) {
        if (r->tick_ckpts[k] <= r->tick_ckpts[k - 1])
            continue;
        w0[nw] = r->tick_t[k - 1] - (r->tick_ckpt_s[k] - r->tick_ckpt_s[k - 1]);
        w1[nw++] = r->tick_t[k];
    }
    for (size_t i = 0; i < nw; i++) { /* the windows' part of the measured time */
        double a = w0[i] > warm_s ? w0[i] : warm_s, b = w1[i] < end_s ? w1[i] : end_s;
        if (i + 1 < nw && b > w0[i + 1])
            b = w0[i + 1]; /* overlapping windows count once */
        c.time_in += b > a ? b - a : 0;
    }
    c.time_in /= end_s - warm_s;
    uint64_t *in = cap_malloc((r->n + 1) * sizeof(uint64_t)),
             *out = cap_malloc((r->n + 1) * sizeof(uint64_t));
    for (size_t j = 0; j < r->n; j++) {
        double e = (double)(r->lat_end[j] - r->t0) / 1e9, b = e - (double)r->lat[j] / 1e9;
        int hit = 0;
        for (size_t i = 0; i < nw && !hit; i++)
            hit = b < w1[i] && e > w0[i];
        int slow = r->lat[j] > 10000000ull;
        if (hit) {
            in[c.n_in++] = r->lat[j];
            c.slow_in += (size_t)slow;
        } else {
            out[c.n_out++] = r->lat[j];
            c.slow_out += (size_t)slow;
        }
    }
    c.p99_in = c.n_in ? pct(in, c.n_in, 0.99) : 0;
    c.p99_out = c.n_out ? pct(out, c.n_out, 0.99) : 0;
    cap_free(in);
    cap_free(out);
    cap_free(w0);
    cap_free(w1);
    return c;
}

static pid_t start_server(const char *data, const char *durability, int *port)
{
    int pfd[2];
    if (pipe(pfd) != 0)
        die("pipe");
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pfd[1], 1);
        close(pfd[0]);
        char exe[PATH_MAX + 32];
        snprintf(exe, sizeof(exe), "%s/capsule-engine", bindir);
        execl(exe, exe, "--listen", "127.0.0.1:0", "--data-dir", data, "--durability", durability,
              "--log-level", "warn", "--pool-idle", "4", (char *)NULL);
        _exit(127);
    }
    close(pfd[1]);
    char line[256];
    size_t n = 0;
    while (n < sizeof(line) - 1) {
        ssize_t k = read(pfd[0], line + n, 1);
        if (k <= 0)
            break;
        if (line[n++] == '\n')
            break;
    }
    line[n] = 0;
    close(pfd[0]);
    char *p = strstr(line, "port ");
    if (!p) {
        fprintf(stderr, "bench_server: capsule-engine did not start (%s)\n", line);
        exit(1);
    }
    *port = atoi(p + 5);
    return pid;
}

/* Starts a server on data with the given durability, connects c (a REST client) to it and creates
 * the session "bench"; returns the server's pid. */
static pid_t start_server_with_session(const char *data, const char *durability, int *port,
                                       cli_t *c)
{
    pid_t pid = start_server(data, durability, port);
    if (cli_connect(c, *port) != 0)
        die("connect");
    char body[8192];
    if (http_do(c, "POST", "/v1/sessions", "{\"id\":\"bench\"}", body, sizeof(body)) != 201) {
        fprintf(stderr, "bench_server: session create failed: %s\n", body);
        exit(1);
    }
    return pid;
}

/* The p50 / p99 (ms) of 2+2 over a WebSocket and through the in-process C API, measured side by
 * side. */
typedef struct pair_res {
    double w50, w99, p50, p99;
} pair_res_t;

/*
 * 2+2 over the WebSocket of session "bench" on the server at port, interleaved with the peer: the
 * engine's C API in this process (same cell, same durability, its own data directory edata), in
 * alternating blocks of 1/10th, so both see the same moments of a shared machine and their ratio
 * is the HTTP/WebSocket layer plus the process hop, not the load of the minute. The WebSocket's
 * samples go to samples (ws_2plus2_ms) when that is not NULL.
 */
static pair_res_t ws_vs_inproc(int port, const char *edata, int nosync, size_t n_ws, size_t warm,
                               const char *samples)
{
    eng_opts_t eo = {.dir = edata, .pool_idle = 4, .nosync = nosync};
    eng_t *e;
    if (eng_open(&eo, &e) != 0) {
        fprintf(stderr, "bench_server: eng_open failed\n");
        exit(1);
    }
    char *sid = NULL;
    eng_session_open(e, "peer", NULL, &sid);
    cli_t *w = cap_calloc(1, sizeof(*w));
    if (cli_connect(w, port) != 0)
        die("connect");
    ws_upgrade(w, "/v1/sessions/bench/ws");
    char msg[8192];
    uint64_t *t = cap_calloc(n_ws, sizeof(uint64_t)), *tp = cap_calloc(n_ws, sizeof(uint64_t));
    size_t nw = 0, np = 0, block = n_ws / 10;
    for (size_t b = 0; b < 10; b++) {
        for (int side = 0; side < 2; side++) {
            int ws_side = (side == 0) == (b % 2 == 0);
            size_t count = block + (b == 0 ? warm : 0);
            for (size_t i = 0; i < count; i++) {
                int timed = b > 0 || i >= warm;
                uint64_t t0 = cap_now_ns();
                if (ws_side) {
                    ws_send_text(w, "{\"type\":\"execute\",\"code\":\"2+2\"}");
                    do
                        ws_recv_text(w, msg, sizeof(msg));
                    while (!strstr(msg, "\"type\":\"result\""));
                    if (timed)
                        t[nw++] = cap_now_ns() - t0;
                    if (!strstr(msg, "\"value\":4")) {
                        fprintf(stderr, "bench_server: unexpected result %s\n", msg);
                        exit(1);
                    }
                } else {
                    eng_exec_req_t rq = {.sid = "peer", .code = "2+2"};
                    eng_result_t *r = NULL;
                    if (eng_execute_sync(e, &rq, NULL, 0, &r) != 0 || r->status != ENG_ST_OK) {
                        fprintf(stderr, "bench_server: peer execution failed\n");
                        exit(1);
                    }
                    if (timed)
                        tp[np++] = cap_now_ns() - t0;
                    eng_result_free(r);
                }
            }
        }
    }
    if (samples && bench_samples_save(samples, t, nw, 1e6) != 0)
        fprintf(stderr, "bench_server: could not write the samples file\n");
    pair_res_t pr = {pct(t, nw, 0.5), pct(t, nw, 0.99), pct(tp, np, 0.5), pct(tp, np, 0.99)};
    close(w->fd);
    cap_free(w);
    cap_free(t);
    cap_free(tp);
    cap_free(sid);
    eng_close(e);
    return pr;
}

/* A server of its own with the given durability and its session "bench": the pair above, then the
 * server is stopped. */
static pair_res_t ws_pair_own_server(const char *tmpl, int nosync, size_t n_ws, size_t warm)
{
    char sdata[PATH_MAX], edata[PATH_MAX];
    snprintf(sdata, sizeof(sdata), "%s/server-%s", tmpl, nosync ? "nosync" : "sync");
    snprintf(edata, sizeof(edata), "%s/engine-%s", tmpl, nosync ? "nosync" : "sync");
    int port;
    cli_t *c = cap_calloc(1, sizeof(*c));
    pid_t pid = start_server_with_session(sdata, nosync ? "nosync" : "sync", &port, c);
    pair_res_t pr = ws_vs_inproc(port, edata, nosync, n_ws, warm, NULL);
    close(c->fd);
    cap_free(c);
    kill(pid, SIGTERM);
    int status;
    waitpid(pid, &status, 0);
    return pr;
}

/* The pairs' figures: the WebSocket beside the in-process C API, sync and nosync. */
static void ws_emit_pairs(const pair_res_t *sy, const pair_res_t *ns)
{
    bench_emit("ws_2plus2_vs_engine_inprocess_p50", sy->w50, "ms", "engine C API in-process (sync)",
               sy->p50, 0, 1);
    bench_emit("ws_2plus2_vs_engine_inprocess_p99", sy->w99, "ms", "engine C API in-process (sync)",
               sy->p99, 0, 1);
    bench_emit("ws_2plus2_nosync_vs_engine_inprocess_p50", ns->w50, "ms",
               "engine C API in-process (nosync)", ns->p50, 0, 1);
    bench_emit("ws_2plus2_nosync_vs_engine_inprocess_p99", ns->w99, "ms",
               "engine C API in-process (nosync)", ns->p99, 0, 1);
}

int main(int argc, char **argv)
{
    int quick = 0, only_ws = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc &&
                   strcmp(argv[i + 1], "ws") == 0) {
            only_ws = 1;
            i++;
        } else {
            int help = strcmp(argv[i], "--help") == 0;
            fprintf(help ? stdout : stderr,
                    "usage: %s [--quick] [--only ws]\n  --only ws: only 2+2 over the WebSocket "
                    "beside the in-process C API, sync then nosync (each on a server of its own)"
                    "%s%s\n",
                    argv[0], help ? "" : "; unknown argument: ", help ? "" : argv[i]);
            return help ? 0 : 64;
        }
    }
    bench_begin("server");
    size_t n_ws = quick ? 300 : 3000, n_create = quick ? 30 : 200, warm = quick ? 30 : 200;
    char exe[PATH_MAX];
    ssize_t el = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (el < 0)
        die("readlink");
    exe[el] = 0;
    snprintf(bindir, sizeof(bindir), "%s", exe);
    *strrchr(bindir, '/') = 0;
    char tmpl[] = "/tmp/capsule-bench-server-XXXXXX";
    if (!mkdtemp(tmpl))
        die("mkdtemp");
    if (only_ws) {
        pair_res_t sy = ws_pair_own_server(tmpl, 0, n_ws, warm);
        pair_res_t ns = ws_pair_own_server(tmpl, 1, n_ws, warm);
        fprintf(stderr,
                "\nbench_server --only ws (%s; %zu executions each)\n  %-52s %10s %10s\n"
                "  %-52s %10.3f %10.3f\n  %-52s %10.3f %10.3f\n  %-52s %10.3f %10.3f\n"
                "  %-52s %10.3f %10.3f\n  WebSocket / in-process p50: sync %.3fx, nosync %.3fx\n",
                quick ? "quick" : "full", n_ws, "", "p50 ms", "p99 ms", "2+2 over WebSocket, sync",
                sy.w50, sy.w99, "2+2 in-process C API, sync", sy.p50, sy.p99,
                "2+2 over WebSocket, nosync", ns.w50, ns.w99, "2+2 in-process C API, nosync",
                ns.p50, ns.p99, sy.w50 / sy.p50, ns.w50 / ns.p50);
        ws_emit_pairs(&sy, &ns);
        bench_rmtree(tmpl);
        return 0;
    }
    char sdata[PATH_MAX], edata[PATH_MAX];
    snprintf(sdata, sizeof(sdata), "%s/server", tmpl);
    snprintf(edata, sizeof(edata), "%s/engine", tmpl);

    /* ---- the server ---- */
    int port;
    cli_t *c = cap_calloc(1, sizeof(*c));
    pid_t pid = start_server_with_session(sdata, "sync", &port, c);
    char body[8192];
    /* session create over REST, from the warm pool */
    uint64_t *t = cap_calloc(n_ws > n_create ? n_ws : n_create, sizeof(uint64_t));
    for (size_t i = 0; i < n_create; i++) {
        char b[64];
        snprintf(b, sizeof(b), "{\"id\":\"c%zu\"}", i);
        uint64_t t0 = cap_now_ns();
        int st = http_do(c, "POST", "/v1/sessions", b, body, sizeof(body));
        t[i] = cap_now_ns() - t0;
        if (st != 201) {
            fprintf(stderr, "bench_server: create %zu: %d %s\n", i, st, body);
            return 1;
        }
        snprintf(b, sizeof(b), "/v1/sessions/c%zu", i);
        http_do(c, "DELETE", b, NULL, body, sizeof(body));
    }
    double c50 = pct(t, n_create, 0.5), c99 = pct(t, n_create, 0.99);

    /* 2+2 over the WebSocket, interleaved with the peer: the engine's C API in this process
     * (same cell, same durability, its own data directory), in alternating blocks of 1/10th, so
     * both see the same moments of a shared machine and their ratio is the HTTP/WebSocket layer
     * plus the process hop, not the load of the minute */
    pair_res_t sp = ws_vs_inproc(port, edata, 0, n_ws, warm, "ws_2plus2_ms");
    double w50 = sp.w50, w99 = sp.w99, p50 = sp.p50, p99 = sp.p99; /* its workers went */
    /* the server's own share shows best without the journal's write: the same pair, nosync */
    pair_res_t np = ws_pair_own_server(tmpl, 1, n_ws, warm);

    /* many clients at once: each at a fixed rate (one cell every gap_ms), then back to back */
    size_t n_soak = quick ? 20 : 200;
    double soak_secs = quick ? 6 : 60, cap_secs = quick ? 3 : 15;
    uint32_t gap_ms = 500;
    if (getenv("CAPSULE_SOAK_CLIENTS")) /* for longer or smaller manual runs */
        n_soak = (size_t)atol(getenv("CAPSULE_SOAK_CLIENTS"));
    if (getenv("CAPSULE_SOAK_SECS"))
        soak_secs = atof(getenv("CAPSULE_SOAK_SECS"));
    if (getenv("CAPSULE_SOAK_GAP_MS"))
        gap_ms = (uint32_t)atol(getenv("CAPSULE_SOAK_GAP_MS"));
    soak_res_t sk, cp;
    soak(c, port, pid, "soak", n_soak, soak_secs, gap_ms, &sk);
    soak(c, port, pid, "cap", n_soak, cap_secs, 0, &cp);
    /* before the percentiles below sort sk.lat */
    ckpt_split_t cs = ckpt_split(&sk, soak_secs / 3, soak_secs);
    mem_trend_t mt = mem_trend(&sk, soak_secs);
    double s50 = sk.n ? pct(sk.lat, sk.n, 0.5) : 0, s99 = sk.n ? pct(sk.lat, sk.n, 0.99) : 0;
    double k50 = cp.n ? pct(cp.lat, cp.n, 0.5) : 0, k99 = cp.n ? pct(cp.lat, cp.n, 0.99) : 0;
    double offered = gap_ms ? (double)n_soak * 1000.0 / gap_ms : 0;
    double growth =
        sk.rss_warm > 0 ? 100.0 * (double)(sk.rss_end - sk.rss_warm) / (double)sk.rss_warm : 0;
    double file_growth =
        sk.warm.rss_file > 0
            ? 100.0 * (double)(sk.last.rss_file - sk.warm.rss_file) / (double)sk.warm.rss_file
            : 0;
    double lag99 = sk.nlag ? pct(sk.lag, sk.nlag, 0.99) : 0;
    double acc50 = sk.nacc ? pct(sk.acc, sk.nacc, 0.5) : 0,
           acc99 = sk.nacc ? pct(sk.acc, sk.nacc, 0.99) : 0;
    double cm_n = sk.last.commit.count - sk.warm.commit.count,
           cm_over10 = cm_n - (sk.last.commit.le[0] - sk.warm.commit.le[0]),
           cm_over50 = cm_n - (sk.last.commit.le[1] - sk.warm.commit.le[1]);
    /* the server's own view over the measured part: executions over 10 ms (submit to durable
     * result, capsule_execution_seconds) and loop iterations busy over 10 ms */
    double sx_n = sk.last.exec.count - sk.warm.exec.count,
           sx_over = sx_n - (sk.last.exec.le[1] - sk.warm.exec.le[1]);
    double lb_n = sk.last.busy.count - sk.warm.busy.count,
           lb_over = lb_n - (sk.last.busy.le[1] - sk.warm.busy.le[1]),
           lb_over50 = lb_n - (sk.last.busy.le[2] - sk.warm.busy.le[2]);
    close(c->fd);
    kill(pid, SIGTERM);
    int status;
    waitpid(pid, &status, 0);

    /* ---- the Jupyter peer: ipykernel + jupyter_client, same cell, same run ---- */
    double j50 = 0, j99 = 0;
    char cmd[PATH_MAX + 128];
    snprintf(cmd, sizeof(cmd),
             "PYDEVD_DISABLE_FILE_VALIDATION=1 /usr/bin/python3.11 '%s' %zu %zu 2>/dev/null",
             JUPYTER_PEER, quick ? (size_t)100 : (size_t)1000, quick ? (size_t)10 : (size_t)50);
    FILE *jp = popen(cmd, "r");
    char jline[512] = "";
    if (jp) {
        if (!fgets(jline, sizeof(jline), jp))
            jline[0] = 0;
        pclose(jp);
    }
    char *q50 = strstr(jline, "\"p50_ms\": "), *q99 = strstr(jline, "\"p99_ms\": ");
    if (q50 && q99) {
        j50 = atof(q50 + 10);
        j99 = atof(q99 + 10);
    } else {
        fprintf(stderr, "bench_server: the Jupyter peer did not run (python3-ipykernel and "
                        "python3-jupyter-client installed?)\n");
    }

    fprintf(stderr, "\nbench_server (%s; sync durability; %zu executions, %zu creates)\n",
            quick ? "quick" : "full", n_ws, n_create);
    fprintf(stderr, "  %-52s %10s %10s\n", "", "p50 ms", "p99 ms");
    fprintf(stderr, "  %-52s %10.3f %10.3f\n", "2+2 over WebSocket (capsule-engine, durable)", w50,
            w99);
    fprintf(stderr, "  %-52s %10.3f %10.3f\n", "2+2 via eng_execute_sync (in-process, durable)",
            p50, p99);
    if (j50 > 0)
        fprintf(stderr, "  %-52s %10.3f %10.3f\n",
                "2+2 via jupyter_client + ipykernel (not durable)", j50, j99);
    fprintf(stderr, "  %-52s %10.3f %10.3f\n", "session create over REST (warm pool)", c50, c99);
    fprintf(stderr,
            "  %zu WebSocket clients, one 2+2 each every %u ms (%.0f/s offered), %.0f s:\n"
            "    %-48s %10.3f %10.3f\n"
            "    %zu results (%.0f/s after warm-up), %zu errors, server RssAnon %ld -> %ld KiB "
            "(%+.1f%% from the end of warm-up, %.0f s, to the end)\n",
            n_soak, gap_ms, offered, soak_secs, "latency from when due", s50, s99, sk.done,
            (double)sk.n / sk.secs, sk.errors, sk.rss_warm, sk.rss_end, growth, soak_secs / 3);
    fprintf(stderr, "    %-48s %10.3f %10.3f\n", "the \"accepted\" message (durably recorded)",
            acc50, acc99);
    double ck_n = sk.last.ckpts - sk.warm.ckpts, ck_s = sk.last.ckpt_sum - sk.warm.ckpt_sum;
    fprintf(stderr,
            "    log commits over 10 ms: %.0f, over 50 ms: %.0f (of %.0f, %.1f s in all); "
            "checkpoints %.0f (%.1f ms each on average, the writer held %.2f ms by them)\n",
            cm_over10, cm_over50, cm_n, sk.last.commit_sum - sk.warm.commit_sum, ck_n,
            ck_n > 0 ? 1e3 * ck_s / ck_n : 0, 1e3 * (sk.last.ckpt_stall - sk.warm.ckpt_stall));
    /* the server's executions by stage: mean, and how many spent over 5 / 10 ms in it */
    double st_n[3], st_o5[3];
    fprintf(stderr, "    by stage (mean, over 5 ms, over 10 ms):");
    for (int i = 0; i < 3; i++) {
        double n = st_n[i] = sk.last.stage[i].count - sk.warm.stage[i].count;
        double o5 = st_o5[i] = n - (sk.last.stage[i].le[0] - sk.warm.stage[i].le[0]);
        double o10 = n - (sk.last.stage[i].le[1] - sk.warm.stage[i].le[1]);
        double mean = n > 0 ? 1e3 * (sk.last.stage_sum[i] - sk.warm.stage_sum[i]) / n : 0;
        fprintf(stderr, "%s %s %.3f ms, %.0f, %.0f", i ? ";" : "", stage_names[i], mean, o5, o10);
    }
    fprintf(stderr, "\n");
    for (int i = 0; i < 3; i++) {
        char met[64];
        snprintf(met, sizeof(met), "soak_stage_%s_over_5ms", stage_names[i]);
        bench_emit(met, st_n[i] > 0 ? 100.0 * st_o5[i] / st_n[i] : 0, "%", NULL, 0, 0, BENCH_LOWER);
    }
    fprintf(stderr,
            "    this client's own lateness (a free client's send after its due time) p99 %.3f ms;"
            "\n    the server's view: %.0f of %.0f executions over 10 ms (%.2f%%, submit to "
            "durable result);\n    loop iterations busy over 10 ms: %.0f, over 50 ms: %.0f (of "
            "%.0f), longest %.1f ms (%.1f ms of it on a CPU);\n    the loop thread was on a CPU "
            "%.0f%% of its busy time (the rest: runnable, waiting for a CPU)\n",
            lag99, sx_over, sx_n, sx_n > 0 ? 100.0 * sx_over / sx_n : 0, lb_over, lb_over50, lb_n,
            sk.busy_max * 1e3, sk.busy_max_cpu * 1e3,
            sk.last.busy_sum > sk.warm.busy_sum ? 100.0 * (sk.last.cpu_sum - sk.warm.cpu_sum) /
                                                      (sk.last.busy_sum - sk.warm.busy_sum)
                                                : 0);
    fprintf(stderr,
            "    server RssFile %ld -> %ld KiB (%+.1f%%; the LMDB map's pages, not counted "
            "above)\n",
            sk.warm.rss_file, sk.last.rss_file, file_growth);
    fprintf(stderr,
            "    server RssAnon KiB, sampled every 250 ms: start %ld, warm-up end %ld, half-way "
            "%ld, end %ld;\n    slope after warm-up %+.0f KiB/min, over the last third %+.0f "
            "KiB/min; %.0f bytes per log record written after warm-up\n",
            mt.start, mt.warm, mt.mid, mt.end, mt.slope, mt.slope_late,
            sk.last.records > sk.warm.records
                ? 1024.0 * (double)(sk.rss_end - sk.rss_warm) / (sk.last.records - sk.warm.records)
                : 0);
    fprintf(stderr,
            "    checkpoints in flight (windows of +-250 ms) over %.0f%% of the measured time: "
            "%zu executions overlapped one, p99 %.3f ms, %zu over 10 ms;\n    %zu did not, p99 "
            "%.3f ms, %zu over 10 ms\n",
            100 * cs.time_in, cs.n_in, cs.p99_in, cs.slow_in, cs.n_out, cs.p99_out, cs.slow_out);
    fprintf(stderr,
            "    CPU during the soak (%.0f s): the server %.1f s (%.0f%% of the 2 cores), this "
            "client %.1f s (%.0f%%); load average %.1f -> %.1f\n",
            sk.wall, sk.cpu_server, 100 * sk.cpu_server / sk.wall / 2, sk.cpu_client,
            100 * sk.cpu_client / sk.wall / 2, sk.load0, sk.load1);
    fprintf(stderr, "    server KiB every 5 s, RssAnon / RssFile / malloc'ed in use / free in "
                    "malloc's arenas:\n     ");
    for (size_t i = 0; i < sk.ntrend; i++)
        fprintf(stderr, " %ld/%ld/%ld/%ld", sk.trend[i].rss, sk.trend[i].rss_file,
                sk.trend[i].heap_use, sk.trend[i].heap_free);
    fprintf(stderr,
            "\n    from the end of warm-up to the end: malloc'ed in use %ld -> %ld KiB, free in "
            "arenas %ld -> %ld KiB\n",
            sk.warm.heap_use, sk.last.heap_use, sk.warm.heap_free, sk.last.heap_free);
    fprintf(stderr,
            "  the same clients back to back (closed loop, %.0f s): %.0f/s at most on this "
            "machine;\n    %-48s %10.3f %10.3f\n    (%zu errors; queueing: latency ~ clients / "
            "throughput = %.1f ms)\n",
            cap_secs, (double)cp.n / cp.secs, "latency", k50, k99, cp.errors,
            cp.n ? 1000.0 * (double)n_soak / ((double)cp.n / cp.secs) : 0);
    fprintf(stderr, "  %-52s %10.3f %10.3f\n  %-52s %10.3f %10.3f\n",
            "2+2 over WebSocket, nosync (a server of its own)", np.w50, np.w99,
            "2+2 in-process C API, nosync (beside it)", np.p50, np.p99);
    fprintf(stderr,
            "  WebSocket vs in-process engine p50: %.3fx (nosync %.3fx); goal p50 <= 0.8 ms",
            w50 / p50, np.w50 / np.p50);
    if (j50 > 0)
        fprintf(stderr, "; Jupyter / capsule p50: %.2fx (goal >= 6x)", j50 / w50);
    fprintf(stderr, "\n");
    const char *jpeer = "jupyter_client 7.4 + ipykernel 6.17, execute_reply, not durable";
    bench_emit("ws_2plus2_sync_p50", w50, "ms", j50 > 0 ? jpeer : NULL, j50, 0.8, 1);
    bench_emit("ws_2plus2_sync_p99", w99, "ms", j50 > 0 ? jpeer : NULL, j99, 0, 1);
    if (j50 > 0)
        bench_emit("ws_2plus2_speedup_vs_jupyter_p50", j50 / w50, "x", NULL, 0, 6.0, 0);
    ws_emit_pairs(&sp, &np);
    printf("{\"bench\":\"server\",\"metric\":\"soak_errors\",\"value\":%zu,\"unit\":\"count\","
           "\"peer\":null,\"peer_value\":null,\"ratio\":null,\"goal\":0,\"met\":%s,"
           "\"better\":\"lower\",\"goal_on\":\"value\"}\n",
           sk.errors + cp.errors, sk.errors + cp.errors == 0 ? "true" : "false");
    bench_emit("soak_2plus2_p50", s50, "ms", NULL, 0, 0, 1);
    bench_emit("soak_2plus2_p99", s99, "ms", NULL, 0, 10.0, 1);
    bench_emit("soak_offered_rate", offered, "exec/s", NULL, 0, 0, 0);
    bench_emit("soak_throughput", (double)sk.n / sk.secs, "exec/s", NULL, 0, 0, 0);
    bench_emit("soak_server_rss_growth", growth, "%", NULL, 0, 10.0, 1);
    bench_emit("soak_server_heap_in_use_growth",
               sk.warm.heap_use > 0 ? 100.0 * (double)(sk.last.heap_use - sk.warm.heap_use) /
                                          (double)sk.warm.heap_use
                                    : 0,
               "%", NULL, 0, 0, 1);
    bench_emit("soak_server_rss_file_growth", file_growth, "%", NULL, 0, 0, 1);
    bench_emit("soak_server_rss_slope_after_warmup", mt.slope, "KiB/min", NULL, 0, 0, 1);
    bench_emit("soak_server_rss_slope_last_third", mt.slope_late, "KiB/min", NULL, 0, 0, 1);
    bench_emit("soak_p99_overlapping_checkpoint", cs.p99_in, "ms", NULL, 0, 0, 1);
    bench_emit("soak_p99_outside_checkpoints", cs.p99_out, "ms", NULL, 0, 0, 1);
    bench_emit("soak_server_cpu_share", 100 * sk.cpu_server / sk.wall / 2, "%", NULL, 0, 0, 1);
    bench_emit("soak_client_cpu_share", 100 * sk.cpu_client / sk.wall / 2, "%", NULL, 0, 0, 1);
    bench_emit("soak_load_average", (sk.load0 + sk.load1) / 2, "load", NULL, 0, 0, 1);
    bench_emit("soak_client_lateness_p99", lag99, "ms", NULL, 0, 0, 1);
    bench_emit("soak_accepted_p99", acc99, "ms", NULL, 0, 0, 1);
    bench_emit("soak_server_exec_over_10ms", sx_n > 0 ? 100.0 * sx_over / sx_n : 0, "%", NULL, 0, 0,
               1);
    bench_emit("soak_server_loop_busy_max", sk.busy_max * 1e3, "ms", NULL, 0, 0, 1);
    bench_emit("soak_capacity_throughput", (double)cp.n / cp.secs, "exec/s", NULL, 0, 0, 0);
    bench_emit("soak_capacity_p50", k50, "ms", NULL, 0, 0, 1);
    bench_emit("soak_capacity_p99", k99, "ms", NULL, 0, 0, 1);
    bench_emit("rest_session_create_p50", c50, "ms", NULL, 0, 0, 1);
    bench_emit("rest_session_create_p99", c99, "ms", NULL, 0, 0, 1);
    cap_free(sk.lat);
    cap_free(cp.lat);
    cap_free(sk.lag);
    cap_free(cp.lag);
    cap_free(sk.acc);
    cap_free(cp.acc);
    soak_res_t *rs[2] = {&sk, &cp};
    for (int i = 0; i < 2; i++) {
        cap_free(rs[i]->lat_end);
        cap_free(rs[i]->tick_t);
        cap_free(rs[i]->tick_ckpts);
        cap_free(rs[i]->tick_ckpt_s);
        cap_free(rs[i]->tick_rss);
        cap_free(rs[i]->tick_rss_file);
    }
    cap_free(t);
    cap_free(c);
    bench_rmtree(tmpl);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
