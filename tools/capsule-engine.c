/*
 * capsule-engine.c - the capsule server: the engine library (engine/, eng_) behind a REST +
 * WebSocket API (tools/http/, srv_), on one libuv loop shared by both.
 *
 * Invariants:
 *   - ownership is structural: every session and execution id a client names is stored in the
 *     engine as "<principal>:<id>" (a principal is derived from the bearer token, never the token).
 *     Another token therefore cannot even address someone else's objects: it gets 404, the same
 *     as for an id that never existed. Client ids are 1..128 of [A-Za-z0-9._-] (no ':').
 *   - the engine's blocking calls (session open/close/list/fork, checkpoint, result lookup) run
 *     on the libuv thread pool, never on the loop thread; their answers come back on the loop.
 *   - each execution this process knows about has one record (xs_t) that is the engine's
 *     listener for it until on_done; HTTP requests and WebSocket sessions subscribe to it. The
 *     record keeps the output so far, so a client that reconnects resumes from the output offset
 *     it had seen; once done, the durable result (with the whole output) answers instead.
 *   - an execution outlives its clients: a disconnect never cancels (cancel is explicit).
 *   - SIGTERM: stop accepting, let running executions finish within the grace period, close the
 *     engine (every queued log record written), exit 0. A second signal exits at once; the log
 *     recovers at the next start.
 */
#include <errno.h>
#include <malloc.h> /* mallinfo2, for /v1/metrics */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "capsule.h"
#include "cap.h"
#include "engine_tasks.h"
#include "promise.h"
#include "rsn.h"
#include "srv.h"
#include "wal.h"
#include "wsmsg.h"

#define NBUCKET 1024
#define API     "/v1"

/* ------------------------------------------------------------------------------------------ */
/* configuration: every option is a flag and a CAPSULE_* environment variable                  */

typedef struct opt {
    const char *flag, *env, *def, *help;
    char *val;
} opt_t;

static opt_t opts[] = {
    {"--listen", "CAPSULE_LISTEN", "127.0.0.1:8765",
     "host:port to listen on; tokens are required beyond loopback", NULL},
    {"--data-dir", "CAPSULE_DATA_DIR", "capsule-data", "the engine's data directory (LMDB)", NULL},
    {"--tokens-file", "CAPSULE_TOKENS_FILE", "",
     "bearer tokens, one per line (CAPSULE_TOKENS: a comma-separated list, env only)", NULL},
    {"--durability", "CAPSULE_DURABILITY", "sync",
     "sync (fsync before acknowledging) or nosync (survives kill -9, not power loss)", NULL},
    {"--warmup-file", "CAPSULE_WARMUP_FILE", "", "Python run once in the zygote before forking",
     NULL},
    {"--worker-path", "CAPSULE_PYWORKER", "", "the capsule-pyworker executable (default: built)",
     NULL},
    {"--pool-idle", "CAPSULE_POOL_IDLE", "2", "pre-warmed idle workers", NULL},
    {"--max-sessions", "CAPSULE_MAX_SESSIONS", "1024", "open sessions at most", NULL},
    {"--max-queue", "CAPSULE_MAX_QUEUE", "64", "queued executions per session at most", NULL},
    {"--max-output", "CAPSULE_MAX_OUTPUT", "1048576", "output bytes kept per execution", NULL},
    {"--idle-release-ms", "CAPSULE_IDLE_RELEASE_MS", "0",
     "a session unused this long gives its worker back (restored when next used); 0 = never", NULL},
    {"--grace-ms", "CAPSULE_GRACE_MS", "30000",
     "on SIGTERM, how long running executions may take to finish", NULL},
    {"--max-conns", "CAPSULE_MAX_CONNS", "1024", "open connections at most (503 beyond)", NULL},
    {"--max-url-bytes", "CAPSULE_MAX_URL_BYTES", "8192", "request target size (414 beyond)", NULL},
    {"--max-header-bytes", "CAPSULE_MAX_HEADER_BYTES", "16384", "header bytes (431 beyond)", NULL},
    {"--max-headers", "CAPSULE_MAX_HEADERS", "64", "header count (431 beyond)", NULL},
    {"--max-body-bytes", "CAPSULE_MAX_BODY_BYTES", "1048576", "request body (413 beyond)", NULL},
    {"--read-timeout-ms", "CAPSULE_READ_TIMEOUT_MS", "10000",
     "time to receive a whole request (408 beyond)", NULL},
    {"--idle-timeout-ms", "CAPSULE_IDLE_TIMEOUT_MS", "60000",
     "keep-alive idle time; WebSocket silence allowed is 10x", NULL},
    {"--ws-max-frame", "CAPSULE_WS_MAX_FRAME", "262144", "WebSocket frame payload (1009 beyond)",
     NULL},
    {"--ws-max-msg", "CAPSULE_WS_MAX_MSG", "1048576", "WebSocket message (1009 beyond)", NULL},
    {"--json-max-depth", "CAPSULE_JSON_MAX_DEPTH", "32", "JSON nesting (400 beyond)", NULL},
    {"--max-out-bytes", "CAPSULE_MAX_OUT_BYTES", "16777216",
     "bytes queued to a client that does not read before it is dropped", NULL},
    {"--log-level", "CAPSULE_LOG_LEVEL", "info", "debug, info, warn or error", NULL},
    {"--affinity", "CAPSULE_AFFINITY", "auto",
     "auto (a lone execution runs on one CPU with the engine's threads) or none (the scheduler "
     "places everything)",
     NULL},
};
enum {
    O_LISTEN,
    O_DATA,
    O_TOKFILE,
    O_DUR,
    O_WARMUP,
    O_WORKER,
    O_POOL,
    O_MAXSESS,
    O_MAXQ,
    O_MAXOUT,
    O_IDLEREL,
    O_GRACE,
    O_MAXCONNS,
    O_URL,
    O_HDRB,
    O_HDRN,
    O_BODY,
    O_READTO,
    O_IDLETO,
    O_WSFRAME,
    O_WSMSG,
    O_DEPTH,
    O_OUTB,
    O_LOG,
    O_AFFINITY,
    O_COUNT
};

static void usage(FILE *f)
{
    fprintf(f, "usage: capsule-engine [options]\n\nEvery option is also an environment "
               "variable; a flag wins over the variable.\n\n");
    for (int i = 0; i < O_COUNT; i++)
        fprintf(f, "  %-20s %-26s %s (default: %s)\n", opts[i].flag, opts[i].env, opts[i].help,
                opts[i].def[0] ? opts[i].def : "none");
    fprintf(f, "  %-20s %-26s %s\n", "", "CAPSULE_TOKENS", "comma-separated bearer tokens");
    fprintf(f, "  %-20s %-26s %s\n", "--help", "", "this text");
}

static const char *optv(int i)
{
    return opts[i].val ? opts[i].val : opts[i].def;
}

static int opt_u32(int i, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(optv(i), &end, 10);
    if (errno || *end || !*optv(i) || v > UINT32_MAX) {
        fprintf(stderr, "capsule-engine: %s / %s: \"%s\" is not a number in 0..%u\n", opts[i].flag,
                opts[i].env, optv(i), UINT32_MAX);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* state                                                                                       */

typedef struct xs xs_t;
typedef struct wsc wsc_t;

/* SUB_ACCEPT: wait=false, until taken. SUB_PEEK: a GET, input or cancel of an execution this
 * process did not start (re-running after a restart), answered once attached (peek_*). */
enum { SUB_WS, SUB_WAIT, SUB_STREAM, SUB_ACCEPT, SUB_PEEK };
enum { PEEK_GET, PEEK_INPUT, PEEK_CANCEL };

typedef struct sub {
    int kind;
    xs_t *x;
    wsc_t *wc;       /* SUB_WS */
    int acked;       /* SUB_WS / SUB_STREAM: the "accepted" event was sent */
    int acc_pending; /* SUB_WS: accepted, its event deferred (acc_defer); acc_seq its seq */
    uint64_t acc_seq;
    srv_req_t *req;   /* SUB_WAIT / SUB_STREAM / SUB_ACCEPT / SUB_PEEK */
    struct sub *next; /* in x->subs, or (SUB_PEEK, attached) in G.peeks */
    int op;           /* SUB_PEEK: PEEK_* */
    char *text;       /* PEEK_INPUT: the reply (NULL with eof) */
    int eof;
} sub_t;

/* One execution known to this process: the engine's listener until on_done. */
struct xs {
    char *eid;  /* engine id "<principal>:<ceid>" */
    char *ceid; /* the client's id */
    char *csid;
    char *out; /* output so far (bounded by max_output) */
    size_t out_len;
    uint64_t seq;
    int in_wait, password;
    int accepted; /* the engine took it (on_accepted) */
    char *prompt;
    json_t *inputs; /* REST: replies to give in order (array), or NULL */
    size_t next_input;
    uint64_t t0;
    sub_t *subs;
    xs_t *hnext;
};

/* One WebSocket session (bound to one engine session). */
struct wsc {
    uint64_t id; /* thread-pool jobs find their session again by id (it may be gone) */
    srv_ws_t *ws;
    char *esid, *csid, *principal;
    wsc_t *next, *prev;
};

static struct {
    uv_loop_t *loop;
    eng_t *eng;
    srv_server_t *srv;
    srv_limits_t lim;
    size_t max_output;
    xs_t *xmap[NBUCKET];
    uint32_t nlive;
    wsc_t *wscs;
    uint64_t wsc_ids;
    int draining;
    uint64_t grace_ms;
    uv_signal_t sigterm, sigint;
    uv_timer_t grace;
    uv_async_t closed;
    uv_thread_t closer;
    int signals;
    /* metrics */
    uint64_t ex_status[6];
    uint64_t hist[16];
    double hist_sum;
    uint64_t hist_n;
    /* the same time by stage (request durable, worker's result, FINISH durable), see capsule.h */
    uint64_t stage_hist[3][16];
    double stage_sum[3];
    /* the loop's busy time per iteration (everything but the wait in epoll), see loop_watch */
    uv_prepare_t lw_prep;
    /* SUB_PEEKs whose execution is attached: answered after the loop's I/O callbacks, once the
     * attach has delivered what the run printed and the prompt it waits on */
    uv_check_t peek_check;
    sub_t *peeks;
    /* executions whose WebSocket "accepted" waits (engine ids), see acc_defer */
    uv_timer_t acc_timer;
    char **acc_eids;
    size_t acc_n, acc_cap;
    uint64_t lw_t, lw_idle, lw_cpu; /* at the previous prepare: hrtime, idle, thread CPU time */
    uint64_t lw_hist[16];
    double lw_sum, lw_cpu_sum;
    uint64_t lw_max_ns, lw_max_cpu_ns; /* the longest since the last scrape, its CPU time */
} G;

static const double hist_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                     0.25,   0.5,   1,      2.5,   5,    10,    60};
#define NHIST (sizeof(hist_bounds) / sizeof(hist_bounds[0]))
static const double lw_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                   0.025,  0.05,    0.1,    0.25,  0.5,    1};
#define NLW (sizeof(lw_bounds) / sizeof(lw_bounds[0]))

/*
 * Loop stalls. Everything the server does for a client (HTTP and WebSocket I/O, JSON, the
 * engine's callbacks, its hand-offs to workers and to the log) runs on this one loop, so an
 * iteration that keeps the loop busy delays every client by that much. At each prepare (just
 * before the loop blocks in epoll) the time since the previous prepare, minus what libuv counted
 * as idle (blocked in epoll) in between, is the busy time of that iteration:
 * capsule_loop_busy_seconds, and its maximum since the last scrape. The thread's CPU time over
 * the same iteration tells work from waiting for a CPU: an iteration long in wall time but short
 * in CPU time was the loop thread runnable and not running (other threads or processes on its
 * CPU), not the server doing something slow.
 */
static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void loop_watch(uv_prepare_t *p)
{
    uint64_t t = uv_hrtime(), idle = uv_metrics_idle_time(p->loop), cpu = thread_cpu_ns();
    if (G.lw_t) {
        uint64_t d = t - G.lw_t, id = idle - G.lw_idle, busy = d > id ? d - id : 0;
        size_t b = 0;
        while (b < NLW && (double)busy / 1e9 > lw_bounds[b])
            b++;
        G.lw_hist[b]++;
        G.lw_sum += (double)busy / 1e9;
        G.lw_cpu_sum += (double)(cpu - G.lw_cpu) / 1e9;
        if (busy > G.lw_max_ns) {
            G.lw_max_ns = busy;
            G.lw_max_cpu_ns = cpu - G.lw_cpu;
        }
    }
    G.lw_t = t;
    G.lw_idle = idle;
    G.lw_cpu = cpu;
}

static uint32_t bucket(const char *k)
{
    return (uint32_t)(cap_hash64(k, strlen(k)) % NBUCKET);
}

static xs_t *xs_get(const char *eid)
{
    for (xs_t *x = G.xmap[bucket(eid)]; x; x = x->hnext)
        if (strcmp(x->eid, eid) == 0)
            return x;
    return NULL;
}

static void xs_unlink(xs_t *x)
{
    xs_t **p = &G.xmap[bucket(x->eid)];
    while (*p && *p != x)
        p = &(*p)->hnext;
    if (*p) {
        *p = x->hnext;
        G.nlive--;
    }
}

static void sub_free(sub_t *s)
{
    cap_free(s->text);
    cap_free(s);
}

static void xs_free(xs_t *x)
{
    while (x->subs) {
        sub_t *s = x->subs;
        x->subs = s->next;
        sub_free(s);
    }
    cap_free(x->eid);
    cap_free(x->ceid);
    cap_free(x->csid);
    cap_free(x->out);
    cap_free(x->prompt);
    json_decref(x->inputs);
    cap_free(x);
}

/* ---- ids (client_id_ok: wsmsg.c) ---- */
char *eng_id(const char *principal, const char *cid)
{
    size_t n = strlen(principal) + strlen(cid) + 2;
    char *s = cap_malloc(n);
    snprintf(s, n, "%s:%s", principal, cid);
    return s;
}

static const char *strip_ns(const char *eid)
{
    const char *c = eid ? strchr(eid, ':') : NULL;
    return c ? c + 1 : eid;
}

/*
 * A generated id: prefix + 16 hex digits. The 64 bits are a key drawn at random once per process
 * plus a counter times an odd constant, mixed by splitmix64's finalizer: each step is a bijection
 * of 64-bit words, so ids never repeat within a process, and across restarts they are as unlikely
 * to meet as random ones. (It used to be a getrandom(2) per execution without an id.)
 */
static void gen_id(char prefix, char *out, size_t n)
{
    static uint64_t key, ctr;
    static int keyed;
    if (!keyed) {
        uv_random(NULL, NULL, &key, sizeof(key), 0, NULL);
        keyed = 1;
    }
    uint64_t z = key + 0x9e3779b97f4a7c15ull * ++ctr;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    snprintf(out, n, "%c%016llx", prefix, (unsigned long long)z);
}

/* JSON string from bytes that may not be valid UTF-8 (output): invalid bytes become U+FFFD. */
static json_t *jstr(const char *p, size_t n)
{
    json_t *s = json_stringn(p, n);
    if (s)
        return s;
    char *o = cap_malloc(n * 3 + 1);
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)p[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        int ok = len > 0 && i + len <= n && c != 0;
        for (size_t j = 1; ok && j < len; j++)
            ok = ((unsigned char)p[i + j] >> 6) == 2;
        if (ok) {
            json_t *t = json_stringn(p + i, len); /* rejects overlongs and surrogates */
            ok = t != NULL;
            json_decref(t);
        }
        if (ok) {
            memcpy(o + k, p + i, len);
            k += len;
            i += len;
        } else {
            memcpy(o + k, "\xef\xbf\xbd", 3);
            k += 3;
            i++;
        }
    }
    s = json_stringn(o, k);
    cap_free(o);
    return s ? s : json_string("");
}

static const char *status_name(eng_status_t st)
{
    static const char *n[] = {"ok", "error", "cancelled", "timeout", "died", "refused"};
    return (unsigned)st < 6 ? n[st] : "unknown";
}

static const char *refuse_code(int err)
{
    switch (err) {
    case CAP_ENOTFOUND:
        return "session_not_found";
    case CAP_EBUSY:
        return "queue_full";
    case CAP_ELIMIT:
        return "limit";
    case CAP_ECLOSED:
        return "session_closed";
    case CAP_ECANCELED:
        return "cancelled";
    default:
        return "refused";
    }
}

/* A "name:reason;..." list of the engine's (restore_failed, unrecorded) as {"name": "reason"}. */
static json_t *names_json(const char *s)
{
    json_t *o = json_object();
    while (*s) {
        const char *end = strchr(s, ';');
        size_t n = end ? (size_t)(end - s) : strlen(s);
        const char *colon = memchr(s, ':', n);
        if (colon) {
            char *k = cap_malloc((size_t)(colon - s) + 1);
            memcpy(k, s, (size_t)(colon - s));
            k[colon - s] = 0;
            json_object_set_new(o, k, jstr(colon + 1, n - (size_t)(colon - s) - 1));
            cap_free(k);
        }
        s += n + (end ? 1 : 0);
    }
    return o;
}

/* Sets r's fields in the object j (the REST answer, the "result" event). */
static void result_fill(json_t *j, const eng_result_t *r)
{
    json_object_set_new(j, "id", json_string(strip_ns(r->eid)));
    if (r->sid)
        json_object_set_new(j, "session", json_string(strip_ns(r->sid)));
    json_object_set_new(j, "status", json_string(status_name(r->status)));
    if (r->repr)
        json_object_set_new(j, "repr", jstr(r->repr, strlen(r->repr)));
    if (r->json) {
        json_t *v = json_loads(r->json, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (v) /* else JSON that jansson cannot hold (an integer beyond 64 bits, a lone
                * surrogate): the text itself, for the client's own parser */
            json_object_set_new(j, "value", v);
        else
            json_object_set_new(j, "value_json", jstr(r->json, strlen(r->json)));
    }
    if (r->status == ENG_ST_REFUSED) {
        json_object_set_new(
            j, "error",
            json_pack("{s:s,s:s}", "code", refuse_code(r->err), "message", cap_strerror(r->err)));
    } else if (r->etype || r->emsg) {
        json_t *e = json_object();
        if (r->etype)
            json_object_set_new(e, "type", jstr(r->etype, strlen(r->etype)));
        if (r->emsg)
            json_object_set_new(e, "message", jstr(r->emsg, strlen(r->emsg)));
        if (r->traceback)
            json_object_set_new(e, "traceback", jstr(r->traceback, strlen(r->traceback)));
        json_object_set_new(j, "error", e);
    }
    json_object_set_new(j, "output", jstr(r->output ? r->output : "", r->output_len));
    json_object_set_new(j, "truncated", json_boolean(r->truncated));
    json_object_set_new(j, "restarted", json_boolean(r->restarted));
    json_object_set_new(j, "committed", json_boolean(r->committed));
    if (r->committed)
        json_object_set_new(j, "ordinal", json_integer((json_int_t)r->ordinal));
    if (r->restore_failed)
        json_object_set_new(j, "restore_failed", names_json(r->restore_failed));
    if (r->unrecorded)
        json_object_set_new(j, "not_recorded", names_json(r->unrecorded));
}

static json_t *result_json(const eng_result_t *r)
{
    json_t *j = json_object();
    result_fill(j, r);
    return j;
}

/* ------------------------------------------------------------------------------------------ */
/* events to subscribers                                                                       */

/* Unlinks s from the list at *head; 1 if it was there. */
static int sub_unlink(sub_t **head, sub_t *s)
{
    for (sub_t **p = head; *p; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            return 1;
        }
    return 0;
}

static void sub_remove(xs_t *x, sub_t *s)
{
    if (sub_unlink(&x->subs, s))
        sub_free(s);
}

static void req_abort_sub(srv_req_t *req, void *arg)
{
    (void)req;
    sub_t *s = arg;
    sub_remove(s->x, s);
}

static void sub_send_accepted(sub_t *s);

/* A WebSocket subscriber's "accepted" waits (on_accepted) until another event of the execution
 * is sent, which it precedes, or ACC_DEFER_MS: written at once, it cost a write(2) and the
 * client's wake-up between the request's commit and the cell's start on its worker, which a
 * lone execution shares a CPU with; a short cell's "accepted" now leaves with its result. */
#define ACC_DEFER_MS 5

static void acc_flush_x(xs_t *x)
{
    for (sub_t *s = x->subs; s; s = s->next)
        if (s->acc_pending)
            sub_send_accepted(s);
}

static void acc_timer_cb(uv_timer_t *t)
{
    (void)t;
    for (size_t i = 0; i < G.acc_n; i++) {
        xs_t *x = xs_get(G.acc_eids[i]);
        if (x)
            acc_flush_x(x);
        cap_free(G.acc_eids[i]);
    }
    G.acc_n = 0;
}

static void acc_defer(xs_t *x)
{
    if (G.acc_n == G.acc_cap) {
        G.acc_cap = G.acc_cap ? 2 * G.acc_cap : 64;
        G.acc_eids = cap_realloc(G.acc_eids, G.acc_cap * sizeof(*G.acc_eids));
    }
    G.acc_eids[G.acc_n++] = cap_strdup(x->eid);
    if (!uv_is_active((uv_handle_t *)&G.acc_timer) && !uv_is_closing((uv_handle_t *)&G.acc_timer))
        uv_timer_start(&G.acc_timer, acc_timer_cb, ACC_DEFER_MS, 0);
}

/* Sends an event (borrowed) to every subscriber that follows events (WS, streams), after any
 * "accepted" that waits. */
static void xs_broadcast(xs_t *x, json_t *ev, const char *sse_event)
{
    char id[32];
    acc_flush_x(x);
    snprintf(id, sizeof(id), "%llu", (unsigned long long)x->seq);
    for (sub_t *s = x->subs, *next; s; s = next) {
        next = s->next;
        if (s->kind == SUB_WS)
            srv_ws_send(s->wc->ws, json_incref(ev));
        else if (s->kind == SUB_STREAM)
            srv_stream_send(s->req, json_incref(ev), sse_event, id);
    }
}

static json_t *ev_new(xs_t *x, const char *type)
{
    return json_pack("{s:s,s:s,s:s,s:I}", "type", type, "eid", x->ceid, "session", x->csid, "seq",
                     (json_int_t)++x->seq);
}

static void on_output(void *arg, const char *eid, int stream, const char *data, size_t len)
{
    (void)eid;
    xs_t *x = arg;
    size_t off = x->out_len;
    if (x->out_len < G.max_output) {
        size_t keep = len < G.max_output - x->out_len ? len : G.max_output - x->out_len;
        x->out = cap_realloc(x->out, x->out_len + keep + 1);
        memcpy(x->out + x->out_len, data, keep);
        x->out_len += keep;
        x->out[x->out_len] = 0;
    }
    if (!x->subs)
        return;
    json_t *ev = ev_new(x, "output");
    /* stream 0: the engine's output so far, given to a listener that attached mid-run */
    json_object_set_new(ev, "stream",
                        json_string(stream == 2   ? "stderr"
                                    : stream == 0 ? "replay"
                                                  : "stdout"));
    json_object_set_new(ev, "offset", json_integer((json_int_t)off));
    json_object_set_new(ev, "data", jstr(data, len));
    xs_broadcast(x, ev, "output");
    json_decref(ev);
}

static void on_input(void *arg, const char *eid, const char *prompt, int password)
{
    xs_t *x = arg;
    cap_free(x->prompt);
    x->prompt = cap_strdup(prompt ? prompt : "");
    x->password = password;
    x->in_wait = 1;
    if (x->inputs) { /* REST: the caller gave the answers up front; running out means EOF */
        json_t *v = json_array_get(x->inputs, x->next_input++);
        const char *t = json_string_value(v);
        x->in_wait = 0;
        eng_input_reply(G.eng, eid, t ? t : "", t ? strlen(t) : 0, t == NULL);
        return;
    }
    json_t *ev = ev_new(x, "input_request");
    json_object_set_new(ev, "prompt", json_string(x->prompt));
    json_object_set_new(ev, "password", json_boolean(password));
    xs_broadcast(x, ev, "input_request");
    json_decref(ev);
}

static void reply_accepted(srv_req_t *req, xs_t *x)
{
    srv_reply_json(
        req, 202,
        json_pack("{s:s,s:s,s:s}", "id", x->ceid, "session", x->csid, "status", "accepted"));
}

/* A WebSocket or stream subscriber's "accepted" event, once. It goes out while the engine is
 * about to hand the cell to its worker, so on a WebSocket it is printed directly: both ids are
 * client ids ([A-Za-z0-9._-], nothing to escape; checked again here), the same document as the
 * json_pack below in a fraction of its time. */
static void sub_send_accepted(sub_t *s)
{
    xs_t *x = s->x;
    if (s->acked)
        return;
    s->acked = 1;
    uint64_t seq = s->acc_pending ? s->acc_seq : x->seq;
    s->acc_pending = 0;
    if (s->kind == SUB_WS && client_id_ok(x->ceid) && client_id_ok(x->csid)) {
        char t[96 + 2 * WSMSG_ID_MAX];
        int n = snprintf(t, sizeof(t),
                         "{\"type\":\"accepted\",\"eid\":\"%s\",\"session\":\"%s\",\"seq\":%llu}",
                         x->ceid, x->csid, (unsigned long long)seq);
        srv_ws_send_text(s->wc->ws, t, (size_t)n);
        return;
    }
    json_t *ev = json_pack("{s:s,s:s,s:s,s:I}", "type", "accepted", "eid", x->ceid, "session",
                           x->csid, "seq", (json_int_t)seq);
    if (s->kind == SUB_WS)
        srv_ws_send(s->wc->ws, ev);
    else
        srv_stream_send(s->req, ev, "accepted", NULL);
}

/* ---- SUB_PEEK: GET, input and cancel of an execution this process did not start ----
 * After a restart the engine re-runs an interrupted execution, but this process has no record of
 * it until a client attaches. A GET, an input reply or a cancel by its id attaches then (the
 * engine's listener, as a re-sent execute would) and is answered once the attach has delivered
 * the run's state: the "accepted" comes first, then the output so far and the waiting prompt, in
 * the same loop callback; so the answer waits for the loop's check phase. A result that comes
 * first answers it instead. */

/* A running execution as GET /executions/{eid} shows it. */
static json_t *running_json(const xs_t *x)
{
    json_t *j = json_pack("{s:s,s:s,s:s,s:o}", "id", x->ceid, "session", x->csid, "status",
                          "running", "output", jstr(x->out ? x->out : "", x->out_len));
    if (x->in_wait)
        json_object_set_new(j, "input_request",
                            json_pack("{s:s,s:b}", "prompt", x->prompt, "password", x->password));
    return j;
}

/* An input reply for x: given to its waiting prompt (202), or 409 when none waits. */
static void reply_input(srv_req_t *req, xs_t *x, const char *text, int eof)
{
    if (!x->in_wait) {
        srv_reply_error(req, 409, "no_input_request", "execution \"%s\" is not waiting for input",
                        x->ceid);
        return;
    }
    x->in_wait = 0;
    int rc = eng_input_reply(G.eng, x->eid, text ? text : "", text ? strlen(text) : 0, eof);
    if (rc)
        srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(rc));
    else
        srv_reply_json(req, 202, json_pack("{s:s,s:s}", "id", x->ceid, "status", "accepted"));
}

/* A cancel of x (queued: refused; running: interrupted). */
static void reply_cancel(srv_req_t *req, xs_t *x)
{
    if (eng_cancel(G.eng, x->eid) != 0)
        srv_reply_error(req, 503, "engine_error", "cancel failed");
    else
        srv_reply_json(req, 202, json_pack("{s:s,s:s}", "id", x->ceid, "status", "cancelling"));
}

static void peek_check_cb(uv_check_t *h)
{
    sub_t *list = G.peeks;
    G.peeks = NULL;
    uv_check_stop(h);
    while (list) {
        sub_t *s = list;
        list = s->next;
        srv_req_on_abort(s->req, NULL, NULL);
        if (s->op == PEEK_GET)
            srv_reply_json(s->req, 200, running_json(s->x));
        else if (s->op == PEEK_INPUT)
            reply_input(s->req, s->x, s->text, s->eof);
        else
            reply_cancel(s->req, s->x);
        sub_free(s);
    }
}

/* The execution is attached: s leaves x's subscribers for the check phase's answer. */
static void peek_ready(sub_t *s)
{
    sub_unlink(&s->x->subs, s);
    s->next = G.peeks;
    G.peeks = s;
    if (!uv_is_closing((uv_handle_t *)&G.peek_check)) /* shut down: the connection goes too */
        uv_check_start(&G.peek_check, peek_check_cb);
}

/* The execution finished (or the attach was refused) before s was answered: answers and frees
 * s, which is in no list any more. */
static void peek_done(sub_t *s, const eng_result_t *r)
{
    srv_req_on_abort(s->req, NULL, NULL);
    if (r->status == ENG_ST_REFUSED)
        srv_reply_error(s->req, 404, "execution_not_found", "no running execution \"%s\"",
                        s->x->ceid);
    else if (s->op == PEEK_GET)
        srv_reply_json(s->req, 200, result_json(r));
    else if (s->op == PEEK_INPUT)
        srv_reply_error(s->req, 409, "no_input_request", "execution \"%s\" has finished",
                        s->x->ceid);
    else
        srv_reply_error(s->req, 404, "execution_not_found", "no running execution \"%s\"",
                        s->x->ceid);
    sub_free(s);
}

/* The client left before the answer. */
static void peek_abort(srv_req_t *req, void *arg)
{
    (void)req;
    sub_t *s = arg;
    if (sub_unlink(&s->x->subs, s) || sub_unlink(&G.peeks, s))
        sub_free(s);
}

/* The engine recorded it durably (queued, or attached to the running one): a wait=false request
 * gets its 202 and WebSocket subscribers their "accepted" now. */
static void on_accepted(void *arg, const char *eid)
{
    (void)eid;
    xs_t *x = arg;
    x->accepted = 1;
    int deferred = 0;
    for (sub_t *s = x->subs, *next; s; s = next) {
        next = s->next;
        if (s->kind == SUB_WS && !s->acked) {
            s->acc_pending = 1; /* see acc_defer */
            s->acc_seq = x->seq;
            deferred = 1;
        } else if (s->kind == SUB_WS || s->kind == SUB_STREAM) {
            sub_send_accepted(s);
        } else if (s->kind == SUB_ACCEPT) {
            srv_req_on_abort(s->req, NULL, NULL);
            reply_accepted(s->req, x);
            sub_remove(x, s);
        } else if (s->kind == SUB_PEEK) {
            peek_ready(s);
        }
    }
    if (deferred)
        acc_defer(x);
}

static void on_restarted(void *arg, const char *eid)
{
    (void)eid;
    xs_t *x = arg;
    x->out_len = 0; /* the re-run produces its output again, from offset 0 */
    json_t *ev = ev_new(x, "restarted");
    xs_broadcast(x, ev, "restarted");
    json_decref(ev);
}

static void on_done(void *arg, const eng_result_t *r)
{
    xs_t *x = arg;
    xs_unlink(x);
    double secs = (double)(cap_now_ns() - x->t0) / 1e9;
    if (r->status != ENG_ST_REFUSED) {
        size_t b = 0;
        while (b < NHIST && secs > hist_bounds[b])
            b++;
        G.hist[b]++;
        G.hist_sum += secs;
        G.hist_n++;
    }
    if (r->t_request_ns || r->t_run_ns || r->t_finish_ns) {
        const uint64_t st[3] = {r->t_request_ns, r->t_run_ns, r->t_finish_ns};
        for (int i = 0; i < 3; i++) {
            double v = (double)st[i] / 1e9;
            size_t b = 0;
            while (b < NHIST && v > hist_bounds[b])
                b++;
            G.stage_hist[i][b]++;
            G.stage_sum[i] += v;
        }
    }
    if ((unsigned)r->status < 6)
        G.ex_status[r->status]++;
    /* the event: type, eid, session, seq, then the result's fields (the REST answer's), built
     * once and, for WebSocket sessions, encoded once; the REST answer only when one waits */
    json_t *ev = ev_new(x, "result"), *res = NULL;
    result_fill(ev, r);
    char *evtext = NULL;
    size_t evlen = 0;
    char id[32];
    snprintf(id, sizeof(id), "%llu", (unsigned long long)x->seq);
    for (sub_t **p = &G.peeks; *p;) { /* attached, not answered yet: the result answers them */
        sub_t *s = *p;
        if (s->x != x) {
            p = &s->next;
            continue;
        }
        *p = s->next;
        peek_done(s, r);
    }
    while (x->subs) {
        sub_t *s = x->subs;
        x->subs = s->next;
        if (s->kind == SUB_PEEK) {
            peek_done(s, r);
            continue;
        }
        if (s->kind == SUB_WS) {
            if (r->status != ENG_ST_REFUSED)
                sub_send_accepted(s); /* a finished id: its recorded result is there */
            if (!evtext) {
                evtext = json_dumps(ev, JSON_COMPACT);
                evlen = evtext ? strlen(evtext) : 0;
            }
            if (evtext)
                srv_ws_send_text(s->wc->ws, evtext, evlen);
        } else if (s->kind == SUB_STREAM) {
            srv_req_on_abort(s->req, NULL, NULL);
            if (r->status != ENG_ST_REFUSED)
                sub_send_accepted(s);
            srv_stream_send(s->req, json_incref(ev), "result", id);
            srv_stream_end(s->req);
        } else if (s->kind == SUB_ACCEPT && r->status != ENG_ST_REFUSED) {
            srv_req_on_abort(s->req, NULL, NULL);
            reply_accepted(s->req, x); /* a finished id: its recorded result is there */
        } else {
            srv_req_on_abort(s->req, NULL, NULL);
            int st = 200;
            if (r->status == ENG_ST_REFUSED)
                st = r->err == CAP_ENOTFOUND ? 404
                     : r->err == CAP_EBUSY   ? 429
                     : r->err == CAP_ECLOSED ? 409
                                             : 422;
            if (st == 404)
                srv_reply_error(s->req, 404, "session_not_found", "no session \"%s\"", x->csid);
            else if (st != 200)
                srv_reply_error(s->req, st, refuse_code(r->err), "%s", cap_strerror(r->err));
            else {
                if (!res)
                    res = result_json(r);
                srv_reply_json(s->req, 200, json_incref(res));
            }
        }
        cap_free(s);
    }
    free(evtext);
    json_decref(ev);
    json_decref(res);
    xs_free(x);
}

static const eng_exec_cb_t exec_cb = {on_output, on_input, on_restarted, on_done, on_accepted};

static sub_t *sub_add(xs_t *x, int kind)
{
    sub_t *s = cap_calloc(1, sizeof(*s));
    s->kind = kind;
    s->x = x;
    s->next = x->subs;
    x->subs = s;
    return s;
}

/*
 * Starts (or attaches to) execution ceid in session csid for principal. *created says whether a
 * new record was made (then the engine was asked: for a known id it attaches or answers with the
 * recorded result). Returns the record, or NULL with *err (CAP_EINVAL, CAP_ECLOSED).
 */
static xs_t *xs_start(const char *principal, const char *csid, const char *ceid, const char *code,
                      eng_tx_t tx, uint32_t timeout_ms, json_t *inputs, int *err)
{
    char *eid = eng_id(principal, ceid);
    xs_t *x = xs_get(eid);
    if (x) {
        cap_free(eid);
        return x;
    }
    x = cap_calloc(1, sizeof(*x));
    x->eid = eid;
    x->ceid = cap_strdup(ceid);
    x->csid = cap_strdup(csid);
    x->t0 = cap_now_ns();
    if (inputs)
        x->inputs = json_incref(inputs);
    uint32_t b = bucket(eid);
    x->hnext = G.xmap[b];
    G.xmap[b] = x;
    G.nlive++;
    char *esid = eng_id(principal, csid);
    eng_exec_req_t rq = {
        .sid = esid, .eid = eid, .code = code ? code : "", .tx = tx, .timeout_ms = timeout_ms};
    int rc = eng_execute(G.eng, &rq, &exec_cb, x);
    cap_free(esid);
    if (rc) {
        xs_unlink(x);
        xs_free(x);
        *err = rc;
        return NULL;
    }
    return x;
}

/* Replays what a (re)subscriber missed: output from `offset`, a waiting prompt. */
static void xs_replay_ws(xs_t *x, wsc_t *wc, uint64_t offset)
{
    acc_flush_x(x);
    if (offset < x->out_len) {
        json_t *ev =
            json_pack("{s:s,s:s,s:s,s:I,s:s,s:I,s:o}", "type", "output", "eid", x->ceid, "session",
                      x->csid, "seq", (json_int_t)x->seq, "stream", "replay", "offset",
                      (json_int_t)offset, "data", jstr(x->out + offset, x->out_len - offset));
        srv_ws_send(wc->ws, ev);
    }
    if (x->in_wait) {
        json_t *ev = json_pack("{s:s,s:s,s:s,s:I,s:s,s:b}", "type", "input_request", "eid", x->ceid,
                               "session", x->csid, "seq", (json_int_t)x->seq, "prompt", x->prompt,
                               "password", x->password);
        srv_ws_send(wc->ws, ev);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* blocking engine calls on the thread pool                                                    */

enum { B_OPEN, B_CLOSE, B_LIST, B_GET, B_CKPT, B_RESULT, B_WSCHECK, B_RESUME, B_RELEASE, B_PEEK };

typedef struct bjob {
    uv_work_t w;
    int op;
    srv_req_t *req; /* NULL once the client has gone */
    char *principal;
    char *a, *b; /* engine ids */
    eng_session_opts_t so;
    char *warmup; /* so.warmup points here */
    uint64_t ordinal;
    int truncate;
    int rc;
    char **list;
    size_t n;
    size_t bytes;
    eng_result_t *res;
    eng_session_info_t info; /* B_GET, B_WSCHECK */
    uint64_t wsid; /* B_RESUME: the WebSocket session, its execution id and output offset */
    char *ceid;
    uint64_t offset;
    int peek;   /* B_RESULT from GET /executions/{eid}, B_PEEK: 1 + PEEK_*; b gets the session of
                   a pending execution (eng_exec_session) */
    char *text; /* B_PEEK, PEEK_INPUT: the reply (NULL with eof) */
    int eof;
} bjob_t;

static void bjob_abort(srv_req_t *req, void *arg)
{
    (void)req;
    ((bjob_t *)arg)->req = NULL;
}

static void bjob_work(uv_work_t *w)
{
    bjob_t *j = w->data;
    switch (j->op) {
    case B_OPEN:
        if (j->b) /* fork */
            j->rc = eng_session_fork(G.eng, j->b, j->ordinal, j->a);
        else
            j->rc = eng_session_open(G.eng, j->a, &j->so, NULL);
        break;
    case B_CLOSE:
        j->rc = eng_session_close(G.eng, j->a);
        break;
    case B_RELEASE:
        j->rc = eng_session_release(G.eng, j->a);
        break;
    case B_LIST:
        j->rc = eng_session_list(G.eng, &j->list, &j->n);
        break;
    case B_GET:
    case B_WSCHECK:
        j->rc = eng_session_info(G.eng, j->a, &j->info);
        break;
    case B_CKPT:
        j->rc = eng_checkpoint(G.eng, j->a, j->truncate, &j->bytes);
        break;
    case B_RESULT:
    case B_RESUME:
        j->rc = eng_result_get(G.eng, j->a, &j->res);
        if (j->rc == CAP_EBUSY && j->peek)
            (void)eng_exec_session(G.eng, j->a, &j->b); /* b stays NULL if it just finished */
        break;
    case B_PEEK:
        j->rc = eng_exec_session(G.eng, j->a, &j->b);
        if (j->rc == CAP_ENOTFOUND && j->peek == 1 + PEEK_INPUT &&
            eng_result_get(G.eng, j->a, &j->res) == 0)
            j->rc = CAP_EEXIST; /* finished: it waits for no input (409, as while it runs) */
        break;
    }
}

static json_t *session_json(const char *esid)
{
    return json_pack("{s:s,s:s}", "id", strip_ns(esid), "state", "open");
}

/* GET /sessions/{sid}: its options as opened, and what it is doing */
static json_t *session_info_json(const char *esid, const eng_session_info_t *in)
{
    const eng_session_opts_t *o = &in->opts;
    unsigned tx = o->tx <= ENG_TX_ROLLBACK_ALWAYS ? (unsigned)o->tx : 0;
    return json_pack("{s:s,s:s,s:{s:s,s:I,s:I,s:I,s:b},s:I,s:I,s:b,s:b}", "id", strip_ns(esid),
                     "state", "open", "options", "tx",
                     tx_name(tx ? tx : ENG_TX_ROLLBACK_ON_FAILURE), "timeout_ms",
                     (json_int_t)o->timeout_ms, "mem_bytes", (json_int_t)o->mem_bytes,
                     "cpu_seconds", (json_int_t)o->cpu_seconds, "retry_on_death", o->retry_on_death,
                     "ordinal", (json_int_t)in->ordinal, "queued", (json_int_t)in->queued,
                     "running", in->running, "live", in->live);
}

static void ws_open_accept(srv_req_t *req, bjob_t *j);
static void ws_resume_done(bjob_t *j);

/* A pending execution this process did not start (j->a, in session j->b): attach to it and
 * answer req (j->peek - 1: PEEK_*) once attached (SUB_PEEK above). */
static void peek_attach(srv_req_t *req, bjob_t *j)
{
    int rc = 0;
    xs_t *x =
        xs_start(j->principal, strip_ns(j->b), strip_ns(j->a), "", ENG_TX_DEFAULT, 0, NULL, &rc);
    if (!x) {
        srv_reply_error(req, rc == CAP_ECLOSED ? 503 : 400,
                        rc == CAP_ECLOSED ? "shutting_down" : "invalid_request", "%s",
                        cap_strerror(rc));
        return;
    }
    sub_t *s = sub_add(x, SUB_PEEK);
    s->op = j->peek - 1;
    s->req = req;
    s->text = j->text;
    j->text = NULL;
    s->eof = j->eof;
    srv_req_on_abort(req, peek_abort, s);
    if (x->accepted)
        peek_ready(s);
}

static void bjob_done(uv_work_t *w, int status)
{
    (void)status;
    bjob_t *j = w->data;
    srv_req_t *req = j->req;
    if (j->op == B_RESUME) {
        ws_resume_done(j);
        goto out;
    }
    if (req)
        srv_req_on_abort(req, NULL, NULL);
    if (!req)
        goto out;
    switch (j->op) {
    case B_OPEN:
        if (j->rc == 0)
            srv_reply_json(req, 201, session_json(j->a));
        else if (j->rc == CAP_EUNPROCESSABLE)
            srv_reply_error(req, 422, "warmup_failed",
                            "the session is open but its warm-up raised: GET "
                            "/v1/sessions/%s/warmup has the error",
                            strip_ns(j->a));
        else if (j->rc == CAP_ENOTFOUND)
            srv_reply_error(req, 404, "session_not_found", "no session \"%s\" to fork",
                            strip_ns(j->b));
        else if (j->rc == CAP_EEXIST && j->b)
            srv_reply_error(req, 409, "session_exists", "session \"%s\" already exists",
                            strip_ns(j->a));
        else if (j->rc == CAP_EEXIST) /* an open one would have been answered as is */
            srv_reply_error(req, 409, "session_exists",
                            "session \"%s\" was closed, and a closed session's id is not used "
                            "again (its executions stay readable by id): choose another id",
                            strip_ns(j->a));
        else if (j->rc == CAP_ELIMIT)
            srv_reply_error(req, 429, "too_many_sessions", "the server's session limit is reached");
        else if (j->rc == CAP_EINVAL)
            srv_reply_error(req, 400, "invalid_request", "%s",
                            !j->b ? "invalid session options"
                            : strcmp(j->a, j->b) == 0
                                ? "fork_of must name another session"
                                : "ordinal beyond the source session's history");
        else
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
        break;
    case B_RELEASE:
        if (j->rc == 0)
            srv_reply_json(req, 200,
                           json_pack("{s:s,s:s}", "id", strip_ns(j->a), "state", "released"));
        else if (j->rc == CAP_ENOTFOUND)
            srv_reply_error(req, 404, "session_not_found", "no session \"%s\"", strip_ns(j->a));
        else if (j->rc == CAP_EBUSY)
            srv_reply_error(req, 409, "session_busy",
                            "the session is running, queued or restoring; release it when idle");
        else
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
        break;
    case B_CLOSE:
        if (j->rc == 0)
            srv_reply_json(req, 204, NULL);
        else if (j->rc == CAP_ENOTFOUND)
            srv_reply_error(req, 404, "session_not_found", "no session \"%s\"", strip_ns(j->a));
        else
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
        break;
    case B_LIST: {
        if (j->rc) {
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
            break;
        }
        json_t *arr = json_array();
        size_t pl = strlen(j->principal);
        for (size_t i = 0; i < j->n; i++)
            if (strncmp(j->list[i], j->principal, pl) == 0 && j->list[i][pl] == ':')
                json_array_append_new(arr, session_json(j->list[i]));
        srv_reply_json(req, 200, json_pack("{s:o}", "sessions", arr));
        break;
    }
    case B_GET:
    case B_WSCHECK:
        if (j->rc == CAP_ENOTFOUND)
            srv_reply_error(req, 404, "session_not_found", "no session \"%s\"", strip_ns(j->a));
        else if (j->rc)
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
        else if (j->op == B_WSCHECK)
            ws_open_accept(req, j);
        else
            srv_reply_json(req, 200, session_info_json(j->a, &j->info));
        break;
    case B_CKPT:
        if (j->rc == 0)
            srv_reply_json(req, 200,
                           json_pack("{s:s,s:I,s:b}", "session", strip_ns(j->a), "bytes",
                                     (json_int_t)j->bytes, "truncated", j->truncate));
        else if (j->rc == CAP_ENOTFOUND)
            srv_reply_error(req, 404, "session_not_found", "no session \"%s\"", strip_ns(j->a));
        else
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
        break;
    case B_RESULT:
        if (j->rc == 0)
            srv_reply_json(req, 200, result_json(j->res));
        else if (j->rc == CAP_EBUSY && j->b)
            peek_attach(req, j);
        else if (j->rc == CAP_EBUSY)
            srv_reply_json(req, 200,
                           json_pack("{s:s,s:s}", "id", strip_ns(j->a), "status", "pending"));
        else if (j->rc == CAP_ENOTFOUND)
            srv_reply_error(req, 404, "execution_not_found", "no execution \"%s\"", strip_ns(j->a));
        else
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
        break;
    case B_PEEK:
        if (j->rc == 0)
            peek_attach(req, j);
        else if (j->rc == CAP_EEXIST)
            srv_reply_error(req, 409, "no_input_request", "execution \"%s\" has finished",
                            strip_ns(j->a));
        else if (j->rc == CAP_ENOTFOUND)
            srv_reply_error(req, 404, "execution_not_found", "no running execution \"%s\"",
                            strip_ns(j->a));
        else
            srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
        break;
    }
out:
    for (size_t i = 0; i < j->n; i++)
        cap_free(j->list[i]);
    cap_free(j->list);
    eng_result_free(j->res);
    cap_free(j->principal);
    cap_free(j->warmup);
    cap_free(j->ceid);
    cap_free(j->text);
    cap_free(j->a);
    cap_free(j->b);
    cap_free(j);
}

static bjob_t *bjob_new(srv_req_t *req, int op)
{
    bjob_t *j = cap_calloc(1, sizeof(*j));
    j->op = op;
    j->req = req;
    j->principal = cap_strdup(srv_req_principal(req));
    j->w.data = j;
    return j;
}

static void bjob_submit(bjob_t *j)
{
    srv_req_on_abort(j->req, bjob_abort, j);
    int rc = uv_queue_work(G.loop, &j->w, bjob_work, bjob_done);
    if (rc) {
        srv_req_on_abort(j->req, NULL, NULL);
        srv_reply_error(j->req, 503, "busy", "cannot queue work: %s", uv_strerror(rc));
        j->req = NULL;
        bjob_done(&j->w, 0);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* REST handlers                                                                               */

static int draining_refuse(srv_req_t *req)
{
    if (!G.draining)
        return 0;
    srv_reply_error(req, 503, "shutting_down", "the server is shutting down");
    return 1;
}

/* The session id of the path, checked; replies 404 itself for an invalid one. */
static const char *path_sid(srv_req_t *req)
{
    const char *sid = srv_req_param(req, "sid");
    if (!client_id_ok(sid)) {
        srv_reply_error(req, 404, "session_not_found", "no session \"%.64s\"", sid ? sid : "");
        return NULL;
    }
    return sid;
}

static const char *path_eid(srv_req_t *req)
{
    const char *eid = srv_req_param(req, "eid");
    if (!client_id_ok(eid)) {
        srv_reply_error(req, 404, "execution_not_found", "no execution \"%.64s\"", eid ? eid : "");
        return NULL;
    }
    return eid;
}

static int parse_tx(srv_req_t *req, json_t *body, eng_tx_t *tx)
{
    int t = tx_from_name(json_string_value(json_object_get(body, "tx")));
    *tx = t < 0 ? ENG_TX_DEFAULT : (eng_tx_t)t;
    if (t < 0) {
        srv_reply_error(req, 400, "invalid_request",
                        "tx must be rollback_on_failure, commit_always or rollback_always");
        return -1;
    }
    return 0;
}

static void h_healthz(srv_req_t *req, void *arg)
{
    (void)arg;
    srv_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

static void h_readyz(srv_req_t *req, void *arg)
{
    (void)arg;
    if (G.draining)
        srv_reply_error(req, 503, "shutting_down", "the server is shutting down");
    else
        srv_reply_json(req, 200, json_pack("{s:s}", "status", "ready"));
}

static const srv_field_t session_fields[] = {
    {"id", SRV_JSTRING, 0},       {"tx", SRV_JSTRING, 0},
    {"timeout_ms", SRV_JINT, 0},  {"mem_bytes", SRV_JINT, 0},
    {"cpu_seconds", SRV_JINT, 0}, {"retry_on_death", SRV_JBOOL, 0},
    {"fork_of", SRV_JSTRING, 0},  {"fork_ordinal", SRV_JINT, 0},
    {"warmup", SRV_JSTRING, 0},   {NULL, 0, 0},
};

static void h_session_create(srv_req_t *req, void *arg)
{
    (void)arg;
    json_t *b;
    if (draining_refuse(req) || srv_req_json(req, session_fields, &b) != 0)
        return;
    char gen[24];
    const char *sid = json_string_value(json_object_get(b, "id"));
    const char *fork_of = json_string_value(json_object_get(b, "fork_of"));
    json_int_t tmo = json_integer_value(json_object_get(b, "timeout_ms"));
    json_int_t mem = json_integer_value(json_object_get(b, "mem_bytes"));
    json_int_t cpu = json_integer_value(json_object_get(b, "cpu_seconds"));
    json_int_t ord = json_integer_value(json_object_get(b, "fork_ordinal"));
    eng_tx_t tx;
    if (parse_tx(req, b, &tx) != 0)
        goto out;
    if (sid && !client_id_ok(sid)) {
        srv_reply_error(req, 400, "invalid_request",
                        "id must be 1..%d characters of [A-Za-z0-9._-]", WSMSG_ID_MAX);
        goto out;
    }
    if (fork_of && !client_id_ok(fork_of)) {
        srv_reply_error(req, 404, "session_not_found", "no session \"%.64s\" to fork", fork_of);
        goto out;
    }
    if (tmo < 0 || tmo > UINT32_MAX || mem < 0 || cpu < 0 || cpu > UINT32_MAX || ord < 0) {
        srv_reply_error(req, 400, "invalid_request", "limits and ordinals must be >= 0");
        goto out;
    }
    if (fork_of && (tx || tmo || mem || cpu || json_object_get(b, "retry_on_death") ||
                    json_object_get(b, "warmup"))) {
        srv_reply_error(req, 400, "invalid_request",
                        "a fork takes the source session's options; give only id, fork_of and "
                        "fork_ordinal");
        goto out;
    }
    if (!fork_of && json_object_get(b, "fork_ordinal")) {
        srv_reply_error(req, 400, "invalid_request", "fork_ordinal needs fork_of");
        goto out;
    }
    if (!sid) {
        gen_id('s', gen, sizeof(gen));
        sid = gen;
    }
    bjob_t *j = bjob_new(req, B_OPEN);
    j->a = eng_id(j->principal, sid);
    if (fork_of)
        j->b = eng_id(j->principal, fork_of);
    j->ordinal = (uint64_t)ord;
    j->so.tx = tx;
    j->so.timeout_ms = (uint32_t)tmo;
    j->so.mem_bytes = (uint64_t)mem;
    j->so.cpu_seconds = (uint32_t)cpu;
    j->so.retry_on_death = json_is_true(json_object_get(b, "retry_on_death"));
    const char *wu = json_string_value(json_object_get(b, "warmup"));
    if (wu) {
        j->warmup = cap_strdup(wu);
        j->so.warmup = j->warmup;
    }
    bjob_submit(j);
out:
    json_decref(b);
}

static void h_session_list(srv_req_t *req, void *arg)
{
    (void)arg;
    static const char *const none[] = {NULL};
    if (srv_req_query_check(req, none) == 0)
        bjob_submit(bjob_new(req, B_LIST));
}

static void h_session_get(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *sid = path_sid(req);
    if (!sid)
        return;
    bjob_t *j = bjob_new(req, B_GET);
    j->a = eng_id(j->principal, sid);
    bjob_submit(j);
}

static void h_session_close(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *sid = path_sid(req);
    if (!sid)
        return;
    bjob_t *j = bjob_new(req, B_CLOSE);
    j->a = eng_id(j->principal, sid);
    bjob_submit(j);
}

static void h_session_release(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *sid = path_sid(req);
    if (!sid || srv_req_query_check(req, (const char *const[]){NULL}) != 0)
        return;
    bjob_t *j = bjob_new(req, B_RELEASE);
    j->a = eng_id(j->principal, sid);
    bjob_submit(j);
}

/* The session's warm-up execution (engine id "<engine sid>:warmup"). */
static void h_session_warmup(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *sid = path_sid(req);
    if (!sid)
        return;
    bjob_t *j = bjob_new(req, B_RESULT);
    char *esid = eng_id(j->principal, sid);
    j->a = eng_id(esid, "warmup");
    cap_free(esid);
    bjob_submit(j);
}

static const srv_field_t ckpt_fields[] = {{"truncate", SRV_JBOOL, 0}, {NULL, 0, 0}};

static void h_checkpoint(srv_req_t *req, void *arg)
{
    (void)arg;
    json_t *b;
    const char *sid = path_sid(req);
    if (!sid || srv_req_json(req, ckpt_fields, &b) != 0)
        return;
    bjob_t *j = bjob_new(req, B_CKPT);
    j->a = eng_id(j->principal, sid);
    j->truncate = json_is_true(json_object_get(b, "truncate"));
    json_decref(b);
    bjob_submit(j);
}

static const srv_field_t exec_fields[] = {
    {"code", SRV_JSTRING, 1},    {"id", SRV_JSTRING, 0}, {"tx", SRV_JSTRING, 0},
    {"timeout_ms", SRV_JINT, 0}, {"wait", SRV_JBOOL, 0}, {"stream", SRV_JSTRING, 0},
    {"inputs", SRV_JARRAY, 0},   {NULL, 0, 0},
};

static void h_execute(srv_req_t *req, void *arg)
{
    (void)arg;
    json_t *b;
    const char *sid = path_sid(req);
    if (!sid || draining_refuse(req) || srv_req_json(req, exec_fields, &b) != 0)
        return;
    char gen[24];
    const char *eid = json_string_value(json_object_get(b, "id"));
    const char *stream = json_string_value(json_object_get(b, "stream"));
    json_t *inputs = json_object_get(b, "inputs");
    int wait = !json_is_false(json_object_get(b, "wait"));
    uint32_t tmo = 0;
    int kind = 0, err = 0;
    eng_tx_t tx;
    if (parse_tx(req, b, &tx) != 0)
        goto out;
    if (exec_timeout_ms(b, &tmo) != 0) {
        srv_reply_error(req, 400, "invalid_request", EXEC_TIMEOUT_ERR);
        goto out;
    }
    if (eid && !client_id_ok(eid)) {
        srv_reply_error(req, 400, "invalid_request",
                        "id must be 1..%d characters of [A-Za-z0-9._-]", WSMSG_ID_MAX);
        goto out;
    }
    if (stream && strcmp(stream, "ndjson") == 0)
        kind = SRV_STREAM_NDJSON;
    else if (stream && strcmp(stream, "sse") == 0)
        kind = SRV_STREAM_SSE;
    else if (stream && strcmp(stream, "none") != 0) {
        srv_reply_error(req, 400, "invalid_request", "stream must be none, ndjson or sse");
        goto out;
    }
    if (kind && !wait) {
        srv_reply_error(req, 400, "invalid_request", "a stream always waits; drop \"wait\"");
        goto out;
    }
    for (size_t i = 0; i < json_array_size(inputs); i++) {
        if (!json_is_string(json_array_get(inputs, i))) {
            srv_reply_error(req, 400, "invalid_request", "inputs must be strings");
            goto out;
        }
    }
    if (!eid) {
        gen_id('x', gen, sizeof(gen));
        eid = gen;
    }
    xs_t *x = xs_start(srv_req_principal(req), sid, eid,
                       json_string_value(json_object_get(b, "code")), tx, tmo, inputs, &err);
    if (!x) {
        srv_reply_error(req, err == CAP_ECLOSED ? 503 : 400,
                        err == CAP_ECLOSED ? "shutting_down" : "invalid_request", "%s",
                        cap_strerror(err));
        goto out;
    }
    if (!wait && x->accepted) {
        reply_accepted(req, x);
        goto out;
    }
    /* wait=false: 202 once the engine has taken it (a full queue is 429, as for a waited one) */
    sub_t *s = sub_add(x, !wait ? SUB_ACCEPT : kind ? SUB_STREAM : SUB_WAIT);
    s->req = req;
    srv_req_on_abort(req, req_abort_sub, s);
    if (kind) {
        srv_stream_start(req, (srv_stream_kind_t)kind);
        if (x->accepted) /* otherwise on_accepted sends it, once the execution is durable */
            sub_send_accepted(s);
        if (x->out_len) /* attached to a running execution: what it printed so far */
            srv_stream_send(req,
                            json_pack("{s:s,s:s,s:s,s:I,s:s,s:i,s:o}", "type", "output", "eid",
                                      x->ceid, "session", x->csid, "seq", (json_int_t)x->seq,
                                      "stream", "replay", "offset", 0, "data",
                                      jstr(x->out, x->out_len)),
                            "output", NULL);
        if (x->in_wait)
            srv_stream_send(req,
                            json_pack("{s:s,s:s,s:s,s:I,s:s,s:b}", "type", "input_request", "eid",
                                      x->ceid, "session", x->csid, "seq", (json_int_t)x->seq,
                                      "prompt", x->prompt, "password", x->password),
                            "input_request", NULL);
    }
out:
    json_decref(b);
}

static void h_exec_get(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *eid = path_eid(req);
    if (!eid)
        return;
    char *e = eng_id(srv_req_principal(req), eid);
    xs_t *x = xs_get(e);
    if (x) {
        srv_reply_json(req, 200, running_json(x));
        cap_free(e);
        return;
    }
    bjob_t *j = bjob_new(req, B_RESULT);
    j->a = e;
    j->peek = 1 + PEEK_GET; /* pending (re-running after a restart): attach and show it */
    bjob_submit(j);
}

static const srv_field_t input_fields[] = {
    {"text", SRV_JSTRING, 0}, {"eof", SRV_JBOOL, 0}, {NULL, 0, 0}};

static void h_exec_input(srv_req_t *req, void *arg)
{
    (void)arg;
    json_t *b;
    const char *eid = path_eid(req);
    if (!eid || srv_req_json(req, input_fields, &b) != 0)
        return;
    char *e = eng_id(srv_req_principal(req), eid);
    xs_t *x = xs_get(e);
    const char *text = json_string_value(json_object_get(b, "text"));
    int eof = json_is_true(json_object_get(b, "eof"));
    if (!x && !text && !eof) {
        srv_reply_error(req, 400, "invalid_request", "give \"text\" or \"eof\": true");
    } else if (!x) { /* not started here (a restart): attach if it is pending, then answer */
        bjob_t *j = bjob_new(req, B_PEEK);
        j->a = e;
        e = NULL;
        j->peek = 1 + PEEK_INPUT;
        j->text = text ? cap_strdup(text) : NULL;
        j->eof = eof;
        bjob_submit(j);
    } else if (x->in_wait && !text && !eof) {
        srv_reply_error(req, 400, "invalid_request", "give \"text\" or \"eof\": true");
    } else {
        reply_input(req, x, text, eof);
    }
    cap_free(e);
    json_decref(b);
}

static void h_exec_cancel(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *eid = path_eid(req);
    if (!eid)
        return;
    char *e = eng_id(srv_req_principal(req), eid);
    xs_t *x = xs_get(e);
    if (!x) { /* not started here (a restart): attach if it is pending, then cancel */
        bjob_t *j = bjob_new(req, B_PEEK);
        j->a = e;
        e = NULL;
        j->peek = 1 + PEEK_CANCEL;
        bjob_submit(j);
    } else {
        reply_cancel(req, x);
    }
    cap_free(e);
}

static void h_pool(srv_req_t *req, void *arg)
{
    (void)arg;
    eng_stats_t st;
    eng_stats(G.eng, &st);
    srv_reply_json(
        req, 200,
        json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "sessions", (json_int_t)st.sessions,
                  "restored", (json_int_t)st.restored, "pool_idle", (json_int_t)st.pool_idle,
                  "running", (json_int_t)st.running, "queued", (json_int_t)st.queued, "executions",
                  (json_int_t)st.executions, "recovered_executions", (json_int_t)st.recovered_execs,
                  "worker_deaths", (json_int_t)st.worker_deaths));
}

#define PH(...)                                                                                    \
    *n += (size_t)snprintf(b + (*n < cap ? *n : cap), *n < cap ? cap - *n : 0, __VA_ARGS__)

/* One histogram series: cumulative buckets, +Inf, sum and count; label is "" or `key="value"`
 * (one label, put before `le`). Returns the count. */
static uint64_t prom_hist_series(char *b, size_t cap, size_t *n, const char *name,
                                 const char *label, const double *le, size_t nb,
                                 const uint64_t *counts, double sum)
{
    const char *sep = *label ? "," : "", *open = *label ? "{" : "", *close = *label ? "}" : "";
    uint64_t cum = 0;
    for (size_t i = 0; i <= nb; i++) {
        cum += counts[i];
        if (i < nb)
            PH("%s_bucket{%s%sle=\"%g\"} %llu\n", name, label, sep, le[i], (unsigned long long)cum);
    }
    PH("%s_bucket{%s%sle=\"+Inf\"} %llu\n%s_sum%s%s%s %.6f\n%s_count%s%s%s %llu\n", name, label,
       sep, (unsigned long long)cum, name, open, label, close, sum, name, open, label, close,
       (unsigned long long)cum);
    return cum;
}

/* One Prometheus histogram: nb bounds, nb + 1 per-bucket counts (the last: above every bound),
 * appended to b at *n (never past cap). Returns the count. */
static uint64_t prom_hist(char *b, size_t cap, size_t *n, const char *name, const char *help,
                          const double *le, size_t nb, const uint64_t *counts, double sum)
{
    PH("# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    return prom_hist_series(b, cap, n, name, "", le, nb, counts, sum);
}

/* capsule_execution_stage_seconds{stage}: one histogram with a series per stage. */
static void prom_stage_hist(char *b, size_t cap, size_t *n)
{
    static const char *const names[3] = {"request", "run", "finish"};
    const char *name = "capsule_execution_stage_seconds";
    PH("# HELP %s Where executions' time went: request (submit to the request durable), run (to "
       "the worker's result, waiting for its turn included), finish (to the result durable).\n"
       "# TYPE %s histogram\n",
       name, name);
    for (int i = 0; i < 3; i++) {
        char label[32];
        snprintf(label, sizeof label, "stage=\"%s\"", names[i]);
        prom_hist_series(b, cap, n, name, label, hist_bounds, NHIST, G.stage_hist[i],
                         G.stage_sum[i]);
    }
}
#undef PH

static void h_metrics(srv_req_t *req, void *arg)
{
    (void)arg;
    eng_stats_t es;
    srv_stats_t hs;
    wal_stats_t ws;
    prom_store_stats_t ps;
    eng_stats(G.eng, &es);
    eng_wal_stats(G.eng, &ws);
    prom_store_stats(eng_promise_store(G.eng), &ps);
    srv_server_stats(G.srv, &hs);
    struct mallinfo2 mi = mallinfo2(); /* walks every arena: a scrape's cost, not a hot path */
    size_t cap = 32768, n = 0;
    char *b = cap_malloc(cap);
/* never past the end: once full, the rest is measured, not written (and cut below) */
#define P(...) n += (size_t)snprintf(b + (n < cap ? n : cap), n < cap ? cap - n : 0, __VA_ARGS__)
    /* the single-valued series: name, type, help (may be ""), value */
    const struct {
        const char *name, *type, *help;
        double v;
    } one[] = {
        {"capsule_sessions_open", "gauge", "Open sessions.", es.sessions},
        {"capsule_sessions_restored", "gauge", "Sessions restored since start.", es.restored},
        {"capsule_pool_idle_workers", "gauge", "Pre-warmed idle workers.", es.pool_idle},
        {"capsule_executions_running", "gauge", "", es.running},
        {"capsule_executions_queued", "gauge", "", es.queued},
        {"capsule_engine_executions_total", "counter", "Executions run by the engine.",
         (double)es.executions},
        {"capsule_recovered_executions_total", "counter", "Executions re-run after a crash.",
         (double)es.recovered_execs},
        {"capsule_worker_deaths_total", "counter",
         "Workers that died (killed, crashed, over a limit).", (double)es.worker_deaths},
        {"capsule_checkpoints_total", "counter", "", (double)es.checkpoints},
        {"capsule_zygote_restarts_total", "counter", "", (double)es.zygote_restarts},
        {"capsule_zygote_restarting", "gauge",
         "1 while a dead fork server's replacement starts (sessions with workers run on; new "
         "workers wait for it).",
         (double)es.zygote_restarting},
        {"capsule_wal_commits_total", "counter", "Log transactions committed since start.",
         (double)ws.commits},
        {"capsule_wal_records_total", "counter", "", (double)ws.records},
        {"capsule_wal_bytes_total", "counter", "", (double)ws.bytes},
        {"capsule_wal_pending_records", "gauge", "", (double)ws.pending},
        {"capsule_wal_fsyncs_total", "counter",
         "Explicit fsyncs of the log (nosync durability's background sync).", (double)ws.syncs},
        {"capsule_wal_fsync_seconds_total", "counter", "", (double)ws.sync_ns / 1e9},
        {"capsule_wal_checkpoints_total", "counter",
         "Store checkpoints of the log (sync durability), flushed on its checkpoint thread "
         "beside the commits.",
         (double)ws.checkpoints},
        {"capsule_wal_checkpoint_seconds_total", "counter", "", (double)ws.checkpoint_ns / 1e9},
        {"capsule_wal_checkpoint_stall_seconds_total", "counter",
         "Time the log's writer spent on checkpoints (captures, waits for journal space).",
         (double)ws.checkpoint_stall_ns / 1e9},
        {"capsule_wal_checkpoints_skipped_total", "counter",
         "Checkpoint captures that failed and were retried after the next commit (see the log).",
         (double)ws.checkpoints_skipped},
        /* the promise store (prom_store_stats) */
        {"capsule_promise_resident_docs", "gauge",
         "Promise documents in memory (pending, not yet checkpointed, settled cache).",
         (double)ps.resident_docs},
        {"capsule_promise_resident_bytes", "gauge", "", (double)ps.resident_bytes},
        {"capsule_promise_evictions_total", "counter",
         "Settled promise documents dropped from memory.", (double)ps.evictions},
        {"capsule_promise_misses_total", "counter",
         "Promise lookups served from prom.docs (not in memory).", (double)ps.misses},
        {"capsule_promise_records_total", "counter", "Promise records appended to the log.",
         (double)ps.records},
        {"capsule_promise_unflushed_docs", "gauge",
         "Promise documents changed since the last checkpoint of prom.docs.",
         (double)ps.unflushed_docs},
        {"capsule_promise_checkpoints_total", "counter", "Checkpoints of prom.docs written.",
         (double)ps.checkpoints},
        {"capsule_promise_checkpoint_docs_total", "counter", "Documents those checkpoints wrote.",
         (double)ps.checkpoint_docs},
        {"capsule_server_executions_followed", "gauge",
         "Executions this server holds a record for (running or queued).", (double)G.nlive},
        {"capsule_heap_in_use_bytes", "gauge",
         "malloc'ed and not freed (glibc mallinfo2: arenas + mmapped chunks; 0 under ASan).",
         (double)(mi.uordblks + mi.hblkhd)},
        {"capsule_heap_free_bytes", "gauge",
         "Free memory kept inside malloc's arenas (fragmentation when it grows).",
         (double)mi.fordblks},
        {"capsule_heap_arena_bytes", "gauge", "Memory malloc's arenas took from the system.",
         (double)mi.arena},
    };
    for (size_t i = 0; i < sizeof(one) / sizeof(one[0]); i++) {
        if (*one[i].help)
            P("# HELP %s %s\n", one[i].name, one[i].help);
        P("# TYPE %s %s\n%s %.17g\n", one[i].name, one[i].type, one[i].name, one[i].v);
    }
    double le[WAL_HIST_N - 1], le_s[WAL_HIST_N - 1];
    for (size_t i = 0; i < WAL_HIST_N - 1; i++) {
        le[i] = wal_batch_bounds[i];
        le_s[i] = wal_commit_bounds_us[i] / 1e6;
    }
    prom_hist(b, cap, &n, "capsule_wal_batch_records",
              "Records per log commit (group commit size).", le, WAL_HIST_N - 1, ws.batch_hist,
              (double)ws.records);
    prom_hist(b, cap, &n, "capsule_wal_commit_seconds",
              "Time of one log commit transaction (with its fsync under sync durability).", le_s,
              WAL_HIST_N - 1, ws.commit_hist, (double)ws.commit_ns / 1e9);
    P("# HELP capsule_executions_total Executions finished through this server, by status.\n"
      "# TYPE capsule_executions_total counter\n");
    for (int i = 0; i < 6; i++)
        P("capsule_executions_total{status=\"%s\"} %llu\n", status_name((eng_status_t)i),
          (unsigned long long)G.ex_status[i]);
    prom_hist(b, cap, &n, "capsule_execution_seconds",
              "Submit to durable result, as seen by the server.", hist_bounds, NHIST, G.hist,
              G.hist_sum);
    prom_stage_hist(b, cap, &n);
    prom_hist(b, cap, &n, "capsule_loop_busy_seconds",
              "Busy time of one iteration of the server's event loop (a stall delays every "
              "client).",
              lw_bounds, NLW, G.lw_hist, G.lw_sum);
    P("# HELP capsule_loop_cpu_seconds_total CPU time of the loop thread over those iterations "
      "(far under their busy time: the thread waited for a CPU).\n"
      "# TYPE capsule_loop_cpu_seconds_total counter\ncapsule_loop_cpu_seconds_total %.6f\n"
      "# HELP capsule_loop_busy_max_seconds The longest loop iteration since the last scrape.\n"
      "# TYPE capsule_loop_busy_max_seconds gauge\ncapsule_loop_busy_max_seconds %.6f\n"
      "# HELP capsule_loop_busy_max_cpu_seconds The loop thread's CPU time in that iteration.\n"
      "# TYPE capsule_loop_busy_max_cpu_seconds gauge\ncapsule_loop_busy_max_cpu_seconds %.6f\n",
      G.lw_cpu_sum, (double)G.lw_max_ns / 1e9, (double)G.lw_max_cpu_ns / 1e9);
    G.lw_max_ns = G.lw_max_cpu_ns = 0;
    P("# TYPE capsule_http_connections_open gauge\ncapsule_http_connections_open %u\n",
      hs.conns_open);
    P("# TYPE capsule_http_connections_rejected_total counter\n"
      "capsule_http_connections_rejected_total %llu\n",
      (unsigned long long)hs.conns_rejected);
    P("# TYPE capsule_http_requests_total counter\ncapsule_http_requests_total %llu\n",
      (unsigned long long)hs.requests);
    P("# TYPE capsule_http_responses_total counter\n"
      "capsule_http_responses_total{class=\"2xx\"} %llu\n"
      "capsule_http_responses_total{class=\"4xx\"} %llu\n"
      "capsule_http_responses_total{class=\"5xx\"} %llu\n",
      (unsigned long long)hs.responses_2xx, (unsigned long long)hs.responses_4xx,
      (unsigned long long)hs.responses_5xx);
    P("# TYPE capsule_ws_sessions_open gauge\ncapsule_ws_sessions_open %u\n", hs.ws_open);
    P("# TYPE capsule_ws_messages_total counter\ncapsule_ws_messages_total{dir=\"in\"} %llu\n"
      "capsule_ws_messages_total{dir=\"out\"} %llu\n",
      (unsigned long long)hs.ws_msgs_in, (unsigned long long)hs.ws_msgs_out);
#undef P
    srv_reply_raw(req, 200, "text/plain; version=0.0.4", b, n < cap ? n : cap - 1);
    cap_free(b);
}

extern const char capsule_openapi_json[];

static void h_openapi(srv_req_t *req, void *arg)
{
    (void)arg;
    srv_reply_raw(req, 200, "application/json", capsule_openapi_json, strlen(capsule_openapi_json));
}

/* ------------------------------------------------------------------------------------------ */
/* WebSocket                                                                                   */

static void ws_err(wsc_t *wc, const char *eid, const char *code, const char *msg)
{
    json_t *e =
        json_pack("{s:s,s:{s:s,s:s}}", "type", "error", "error", "code", code, "message", msg);
    if (eid)
        json_object_set_new(e, "eid", json_string(eid));
    srv_ws_send(wc->ws, e);
}

static sub_t *ws_subscribed(xs_t *x, wsc_t *wc)
{
    for (sub_t *s = x->subs; s; s = s->next)
        if (s->kind == SUB_WS && s->wc == wc)
            return s;
    return NULL;
}

/* A resuming client follows the execution's events; it gets no "accepted" (it did not ask). */
static void ws_sub_resume(xs_t *x, wsc_t *wc)
{
    sub_t *s = sub_add(x, SUB_WS);
    s->wc = wc;
    s->acked = 1;
}

static void ws_message(srv_ws_t *ws, json_t *m, void *arg)
{
    wsc_t *wc = arg;
    char err[256];
    char gen[24];
    wsmsg_t q;
    (void)ws;
    if (wsmsg_parse(m, &q, err, sizeof(err)) != 0) {
        ws_err(wc, q.eid, "invalid_message", err);
        goto out;
    }
    const char *eid = q.eid;
    switch (q.type) {
    case WSMSG_EXECUTE: {
        if (G.draining) {
            ws_err(wc, eid, "shutting_down", "the server is shutting down");
            goto out;
        }
        if (!eid) {
            gen_id('x', gen, sizeof(gen));
            eid = gen;
        }
        int rc = 0;
        xs_t *x =
            xs_start(wc->principal, wc->csid, eid, q.code, (eng_tx_t)q.tx, q.timeout_ms, NULL, &rc);
        if (!x) {
            ws_err(wc, eid, "refused", cap_strerror(rc));
            goto out;
        }
        /* "accepted" once the engine has recorded it durably (on_accepted); a refusal (full
         * queue, unknown session) comes as a "result" with status "refused" instead */
        sub_t *sub = ws_subscribed(x, wc);
        if (!sub) {
            sub = sub_add(x, SUB_WS);
            sub->wc = wc;
            if (x->accepted)
                sub_send_accepted(sub);
            xs_replay_ws(x, wc, 0); /* attached to a running one: what it printed so far */
        } else if (x->accepted) {
            sub->acked = 0; /* the same id again on this socket: answered again */
            sub_send_accepted(sub);
        }
        break;
    }
    case WSMSG_RESUME: {
        char *e = eng_id(wc->principal, eid);
        xs_t *x = xs_get(e);
        if (x) {
            cap_free(e);
            if (!ws_subscribed(x, wc))
                ws_sub_resume(x, wc);
            xs_replay_ws(x, wc, q.offset);
            goto out;
        }
        /* Not running in this process: ask the log (on the thread pool) whether it finished. */
        bjob_t *j = cap_calloc(1, sizeof(*j));
        j->op = B_RESUME;
        j->w.data = j;
        j->a = e;
        j->ceid = cap_strdup(eid);
        j->wsid = wc->id;
        j->offset = q.offset;
        j->principal = cap_strdup(wc->principal);
        if (uv_queue_work(G.loop, &j->w, bjob_work, bjob_done) != 0) {
            ws_err(wc, eid, "busy", "cannot queue work");
            cap_free(j->a);
            cap_free(j->ceid);
            cap_free(j->principal);
            cap_free(j);
        }
        break;
    }
    case WSMSG_INPUT_REPLY: {
        char *e = eng_id(wc->principal, eid);
        xs_t *x = xs_get(e);
        if (!x)
            ws_err(wc, eid, "execution_not_found", "no running execution with this id");
        else if (!x->in_wait)
            ws_err(wc, eid, "no_input_request", "the execution is not waiting for input");
        else {
            x->in_wait = 0;
            eng_input_reply(G.eng, e, q.text ? q.text : "", q.text ? strlen(q.text) : 0, q.eof);
        }
        cap_free(e);
        break;
    }
    case WSMSG_CANCEL: {
        char *e = eng_id(wc->principal, eid);
        if (!xs_get(e))
            ws_err(wc, eid, "execution_not_found", "no running execution with this id");
        else
            eng_cancel(G.eng, e);
        cap_free(e);
        break;
    }
    }
out:
    json_decref(m);
}

/* A resume of an execution this process does not run: the recorded result (output from the
 * client's offset, then the result), or attach to one the engine re-runs after a restart. */
static void ws_resume_done(bjob_t *j)
{
    wsc_t *wc = G.wscs;
    while (wc && wc->id != j->wsid)
        wc = wc->next;
    if (!wc)
        return; /* the client left meanwhile */
    if (j->rc == 0) {
        const eng_result_t *r = j->res;
        if (j->offset < r->output_len)
            srv_ws_send(wc->ws, json_pack("{s:s,s:s,s:s,s:s,s:I,s:o}", "type", "output", "eid",
                                          j->ceid, "session", strip_ns(r->sid), "stream", "replay",
                                          "offset", (json_int_t)j->offset, "data",
                                          jstr(r->output + j->offset, r->output_len - j->offset)));
        json_t *ev = result_json(r);
        json_object_set_new(ev, "type", json_string("result"));
        json_object_set_new(ev, "eid", json_string(j->ceid));
        srv_ws_send(wc->ws, ev);
    } else if (j->rc == CAP_EBUSY) {
        int rc = 0;
        xs_t *x = xs_get(j->a);
        if (!x)
            x = xs_start(wc->principal, wc->csid, j->ceid, "", ENG_TX_DEFAULT, 0, NULL, &rc);
        if (!x) {
            ws_err(wc, j->ceid, "refused", cap_strerror(rc));
            return;
        }
        if (!ws_subscribed(x, wc))
            ws_sub_resume(x, wc);
        xs_replay_ws(x, wc, j->offset);
    } else if (j->rc == CAP_ENOTFOUND) {
        ws_err(wc, j->ceid, "execution_not_found", "no execution with this id");
    } else {
        ws_err(wc, j->ceid, "engine_error", cap_strerror(j->rc));
    }
}

static void ws_closed(srv_ws_t *ws, void *arg)
{
    (void)ws;
    wsc_t *wc = arg;
    for (size_t b = 0; b < NBUCKET; b++)
        for (xs_t *x = G.xmap[b]; x; x = x->hnext)
            for (sub_t *s = x->subs, *next; s; s = next) {
                next = s->next;
                if (s->kind == SUB_WS && s->wc == wc)
                    sub_remove(x, s);
            }
    if (wc->prev)
        wc->prev->next = wc->next;
    else
        G.wscs = wc->next;
    if (wc->next)
        wc->next->prev = wc->prev;
    cap_free(wc->esid);
    cap_free(wc->csid);
    cap_free(wc->principal);
    cap_free(wc);
}

static void ws_open_accept(srv_req_t *req, bjob_t *j)
{
    static const srv_ws_callbacks_t cb = {ws_message, ws_closed};
    wsc_t *wc = cap_calloc(1, sizeof(*wc));
    wc->esid = cap_strdup(j->a);
    wc->csid = cap_strdup(strip_ns(j->a));
    wc->principal = cap_strdup(j->principal);
    wc->id = ++G.wsc_ids;
    /* Linked first: frames that came with the handshake are handled inside srv_ws_accept. */
    wc->next = G.wscs;
    if (G.wscs)
        G.wscs->prev = wc;
    G.wscs = wc;
    if (srv_ws_accept(req, &cb, wc, &wc->ws) != 0) {
        G.wscs = wc->next;
        if (G.wscs)
            G.wscs->prev = NULL;
        cap_free(wc->esid);
        cap_free(wc->csid);
        cap_free(wc->principal);
        cap_free(wc);
    }
}

static void h_ws(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *sid = path_sid(req);
    if (!sid || draining_refuse(req))
        return;
    bjob_t *j = bjob_new(req, B_WSCHECK);
    j->a = eng_id(j->principal, sid);
    bjob_submit(j);
}

/* ------------------------------------------------------------------------------------------ */
/* lifecycle                                                                                   */

static rsn_t *resonate; /* the Resonate protocol front end (tools/resonate) */

static void closer_main(void *arg)
{
    (void)arg;
    eng_close(G.eng); /* needs the loop running: it is, on the main thread */
    G.eng = NULL;
    uv_async_send(&G.closed);
}

static void on_engine_closed(uv_async_t *a)
{
    uv_thread_join(&G.closer);
    uv_close((uv_handle_t *)a, NULL);
    /* Executions still running at the end of the grace period never got on_done: they stay
     * recorded as pending in the log (re-run at the next start); their records here go. */
    for (size_t b = 0; b < NBUCKET; b++)
        while (G.xmap[b]) {
            xs_t *x = G.xmap[b];
            G.xmap[b] = x->hnext;
            xs_free(x);
        }
    cap_log(CAP_LOG_INFO, "server", "engine closed; exiting");
}

static void finish_shutdown(void)
{
    uv_timer_stop(&G.grace);
    uv_close((uv_handle_t *)&G.grace, NULL);
    uv_close((uv_handle_t *)&G.peek_check, NULL);
    uv_close((uv_handle_t *)&G.acc_timer, NULL);
    acc_timer_cb(&G.acc_timer); /* what still waits goes out before the sockets close */
    cap_free(G.acc_eids);
    G.acc_eids = NULL;
    G.acc_cap = 0;
    uv_close((uv_handle_t *)&G.lw_prep, NULL);
    for (wsc_t *wc = G.wscs; wc; wc = wc->next)
        srv_ws_close(wc->ws, 1001, "server shutting down");
    rsn_close(resonate); /* resonate: before the server (it ends its poll streams) */
    resonate = NULL;
    srv_server_close(G.srv);
    G.srv = NULL;
    uv_signal_stop(&G.sigterm);
    uv_signal_stop(&G.sigint);
    uv_close((uv_handle_t *)&G.sigterm, NULL);
    uv_close((uv_handle_t *)&G.sigint, NULL);
    uv_async_init(G.loop, &G.closed, on_engine_closed);
    uv_thread_create(&G.closer, closer_main, NULL);
}

static uint64_t grace_left_ms;

static void on_grace_tick(uv_timer_t *t)
{
    (void)t;
    if (G.nlive == 0 || grace_left_ms == 0) {
        if (G.nlive)
            cap_log(CAP_LOG_WARN, "server",
                    "grace period over with %u executions running: they stay recorded and are "
                    "re-run at the next start",
                    G.nlive);
        finish_shutdown();
        return;
    }
    grace_left_ms = grace_left_ms > 50 ? grace_left_ms - 50 : 0;
}

static void on_signal(uv_signal_t *s, int signum)
{
    (void)s;
    if (++G.signals > 1) {
        cap_log(CAP_LOG_WARN, "server", "second signal: exiting now (the log recovers at start)");
        _exit(130);
    }
    cap_log(CAP_LOG_INFO, "server",
            "signal %d: no new connections or executions; waiting up to %llu ms for %u running",
            signum, (unsigned long long)G.grace_ms, G.nlive);
    G.draining = 1;
    srv_server_stop_accepting(G.srv);
    grace_left_ms = G.grace_ms;
    uv_timer_start(&G.grace, on_grace_tick, 0, 50);
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *b = cap_malloc(cap);
    size_t k;
    while ((k = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += k;
        if (cap - n < 2)
            b = cap_realloc(b, cap *= 2);
    }
    fclose(f);
    b[n] = 0;
    return b;
}

int main(int argc, char **argv)
{
    int rc = 1;
    char *warmup = NULL;
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < O_COUNT; i++) {
        const char *e = getenv(opts[i].env);
        if (e)
            opts[i].val = (char *)e;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        int k;
        const char *a = argv[i], *v = NULL;
        const char *eq = strchr(a, '=');
        for (k = 0; k < O_COUNT; k++) {
            size_t fl = strlen(opts[k].flag);
            if (strncmp(a, opts[k].flag, fl) == 0 && (a[fl] == 0 || a + fl == eq))
                break;
        }
        if (k == O_COUNT) {
            fprintf(stderr, "capsule-engine: unknown option %s (see --help)\n", a);
            return 2;
        }
        if (eq)
            v = eq + 1;
        else if (i + 1 < argc)
            v = argv[++i];
        else {
            fprintf(stderr, "capsule-engine: %s needs a value\n", a);
            return 2;
        }
        opts[k].val = (char *)v;
    }
    const char *lvl = optv(O_LOG);
    if (strcmp(lvl, "debug") == 0)
        cap_log_set_level(CAP_LOG_DEBUG);
    else if (strcmp(lvl, "info") == 0)
        cap_log_set_level(CAP_LOG_INFO);
    else if (strcmp(lvl, "warn") == 0)
        cap_log_set_level(CAP_LOG_WARN);
    else if (strcmp(lvl, "error") == 0)
        cap_log_set_level(CAP_LOG_ERROR);
    else {
        fprintf(stderr, "capsule-engine: --log-level must be debug, info, warn or error\n");
        return 2;
    }
    srv_limits_t *l = &G.lim;
    uint32_t pool, maxs, maxq, maxout, grace, idlerel;
    if (opt_u32(O_POOL, &pool) || opt_u32(O_MAXSESS, &maxs) || opt_u32(O_MAXQ, &maxq) ||
        opt_u32(O_IDLEREL, &idlerel) || opt_u32(O_MAXOUT, &maxout) || opt_u32(O_GRACE, &grace) ||
        opt_u32(O_MAXCONNS, &l->max_conns) || opt_u32(O_URL, &l->max_url_bytes) ||
        opt_u32(O_HDRB, &l->max_header_bytes) || opt_u32(O_HDRN, &l->max_headers) ||
        opt_u32(O_BODY, &l->max_body_bytes) || opt_u32(O_READTO, &l->read_timeout_ms) ||
        opt_u32(O_IDLETO, &l->idle_timeout_ms) || opt_u32(O_WSFRAME, &l->ws_max_frame) ||
        opt_u32(O_WSMSG, &l->ws_max_msg) || opt_u32(O_DEPTH, &l->json_max_depth) ||
        opt_u32(O_OUTB, &l->max_out_bytes))
        return 2;
    const char *dur = optv(O_DUR);
    if (strcmp(dur, "sync") != 0 && strcmp(dur, "nosync") != 0) {
        fprintf(stderr, "capsule-engine: --durability must be sync or nosync\n");
        return 2;
    }
    const char *aff = optv(O_AFFINITY);
    if (strcmp(aff, "auto") != 0 && strcmp(aff, "none") != 0) {
        fprintf(stderr, "capsule-engine: --affinity must be auto or none\n");
        return 2;
    }
    if (*optv(O_WARMUP) && !(warmup = read_file(optv(O_WARMUP)))) {
        fprintf(stderr, "capsule-engine: cannot read warm-up file %s: %s\n", optv(O_WARMUP),
                strerror(errno));
        return 2;
    }
    G.max_output = maxout ? maxout : 1 << 20;
    G.grace_ms = grace;
    G.loop = uv_default_loop();
    uv_loop_configure(G.loop, UV_METRICS_IDLE_TIME);

    /* The front end first: a bad address or missing tokens fail before workers start. */
    srv_config_t sc = {.listen = optv(O_LISTEN),
                       .limits = *l,
                       .tokens_file = *optv(O_TOKFILE) ? optv(O_TOKFILE) : NULL,
                       .tokens = getenv("CAPSULE_TOKENS")};
    if ((rc = srv_server_open(G.loop, &sc, &G.srv)) != 0) {
        fprintf(stderr, "capsule-engine: cannot start the server: %s\n", cap_strerror(rc));
        uv_run(G.loop, UV_RUN_DEFAULT);
        cap_free(warmup);
        return 1;
    }
    eng_opts_t eo = {.dir = optv(O_DATA),
                     .nosync = strcmp(dur, "nosync") == 0,
                     .loop = G.loop,
                     .worker_path = *optv(O_WORKER) ? optv(O_WORKER) : NULL,
                     .warmup = warmup,
                     .pool_idle = pool,
                     .max_sessions = maxs,
                     .max_queue = maxq,
                     .max_output = maxout,
                     .idle_release_ms = idlerel,
                     .affinity = strcmp(aff, "none") == 0 ? ENG_AFFINITY_NONE : ENG_AFFINITY_AUTO,
                     .pin_loop = 1}; /* the server's loop is the engine's */
    if ((rc = eng_open(&eo, &G.eng)) != 0) {
        fprintf(stderr, "capsule-engine: cannot open the engine in %s: %s\n", eo.dir,
                cap_strerror(rc));
        srv_server_close(G.srv);
        uv_run(G.loop, UV_RUN_DEFAULT);
        cap_free(warmup);
        return 1;
    }
    cap_free(warmup);

    srv_server_t *s = G.srv;
    srv_server_route(s, "GET", API "/healthz", SRV_ROUTE_PUBLIC, h_healthz, NULL);
    srv_server_route(s, "GET", API "/readyz", SRV_ROUTE_PUBLIC, h_readyz, NULL);
    srv_server_route(s, "GET", API "/openapi.json", SRV_ROUTE_PUBLIC, h_openapi, NULL);
    srv_server_route(s, "GET", API "/metrics", 0, h_metrics, NULL);
    srv_server_route(s, "GET", API "/pool", 0, h_pool, NULL);
    srv_server_route(s, "POST", API "/sessions", 0, h_session_create, NULL);
    srv_server_route(s, "GET", API "/sessions", 0, h_session_list, NULL);
    srv_server_route(s, "GET", API "/sessions/{sid}", 0, h_session_get, NULL);
    srv_server_route(s, "DELETE", API "/sessions/{sid}", 0, h_session_close, NULL);
    srv_server_route(s, "POST", API "/sessions/{sid}/checkpoint", 0, h_checkpoint, NULL);
    srv_server_route(s, "POST", API "/sessions/{sid}/release", 0, h_session_release, NULL);
    srv_server_route(s, "GET", API "/sessions/{sid}/warmup", 0, h_session_warmup, NULL);
    srv_server_route(s, "POST", API "/sessions/{sid}/executions", 0, h_execute, NULL);
    srv_server_route(s, "GET", API "/sessions/{sid}/ws", 0, h_ws, NULL);
    srv_server_route(s, "GET", API "/executions/{eid}", 0, h_exec_get, NULL);
    srv_server_route(s, "POST", API "/executions/{eid}/input", 0, h_exec_input, NULL);
    srv_server_route(s, "POST", API "/executions/{eid}/cancel", 0, h_exec_cancel, NULL);
    tasks_routes(s, API, G.eng, G.loop); /* durable steps, external promises: engine_tasks.c */
    /* ---- resonate: the Resonate protocol (POST /, GET /poll/{group}/{id}, /health, /ready) on
     * the engine's promise store; same tokens as /v1. CAPSULE_RESONATE_URL: head.serverUrl. */
    rsn_opts_t ro = {.server_url = getenv("CAPSULE_RESONATE_URL"),
                     .json_max_depth = l->json_max_depth};
    if (rsn_open(G.loop, s, eng_promise_store(G.eng), &ro, &resonate) != 0)
        cap_log(CAP_LOG_ERROR, "server", "the Resonate protocol routes could not be added");
    /* ---- end resonate */

    uv_timer_init(G.loop, &G.grace);
    uv_check_init(G.loop, &G.peek_check);
    uv_timer_init(G.loop, &G.acc_timer);
    uv_prepare_init(G.loop, &G.lw_prep);
    uv_prepare_start(&G.lw_prep, loop_watch);
    uv_unref((uv_handle_t *)&G.lw_prep); /* never what keeps the loop running */
    uv_signal_init(G.loop, &G.sigterm);
    uv_signal_init(G.loop, &G.sigint);
    uv_signal_start(&G.sigterm, on_signal, SIGTERM);
    uv_signal_start(&G.sigint, on_signal, SIGINT);
    cap_log(CAP_LOG_INFO, "server", "capsule-engine ready: http://%s port %d, data %s, %s",
            optv(O_LISTEN), srv_server_port(s), eo.dir, dur);
    printf("capsule-engine listening on port %d\n", srv_server_port(s));
    fflush(stdout);
    uv_run(G.loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(G.loop);
    if (rc)
        cap_log(CAP_LOG_WARN, "server", "loop not clean at exit: %s", uv_strerror(rc));
    return 0;
}
