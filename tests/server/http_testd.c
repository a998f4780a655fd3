/*
 * http_testd.c - a real capsule_http server process with routes that exercise every part of the
 * library, driven over real sockets by test_http.py (curl, http.client, raw sockets, websockets).
 *
 * It is the library under test plus the smallest application that reaches each feature: a strict
 * JSON body, path parameters, async answers, NDJSON/SSE streams, a stream to a client that never
 * reads, and a WebSocket session. GET /v1/stats reports the library's counters and what the
 * application observed (abort callbacks, stream outcomes), so tests check effects, not just codes.
 *
 * usage: http_testd --listen HOST:PORT [--tokens-file F] [--tokens a,b] [--limit name=value]...
 * Prints "PORT <n>" on stdout once listening; SIGTERM closes the server and exits 0 once the loop
 * has no handles left.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cap.h"
#include "srv.h"

static uv_loop_t *loop;
static srv_server_t *srv;
static uint64_t aborted, streams_done, flood_limit, ws_closed;

/* ---- plain routes ---- */
static void h_ping(srv_req_t *req, void *arg)
{
    (void)arg;
    srv_reply_json(req, 200, json_pack("{s:b}", "ok", 1));
}

static const srv_field_t echo_fields[] = {
    {"text", SRV_JSTRING, 1},
    {"n", SRV_JINT, 0},
    {"obj", SRV_JANY, 0},
    {NULL, 0, 0},
};

static void h_echo(srv_req_t *req, void *arg)
{
    (void)arg;
    json_t *body;
    if (srv_req_json(req, echo_fields, &body) != 0)
        return;
    json_object_set_new(body, "principal", json_string(srv_req_principal(req)));
    json_object_set_new(body, "request_id", json_string(srv_req_id(req)));
    srv_reply_json(req, 200, body);
}

static void h_item_get(srv_req_t *req, void *arg)
{
    (void)arg;
    static const char *const allowed[] = {"verbose", NULL};
    if (srv_req_query_check(req, allowed) != 0)
        return;
    const char *v = srv_req_query(req, "verbose");
    srv_reply_json(req, 200, json_pack("{s:s,s:s?}", "id", srv_req_param(req, "id"), "verbose", v));
}

static void h_item_delete(srv_req_t *req, void *arg)
{
    (void)arg;
    srv_reply_json(req, 204, NULL);
}

static void h_stats(srv_req_t *req, void *arg)
{
    (void)arg;
    srv_stats_t st;
    srv_server_stats(srv, &st);
    srv_reply_json(
        req, 200,
        json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "conns_open",
                  (json_int_t)st.conns_open, "conns_rejected", (json_int_t)st.conns_rejected,
                  "requests", (json_int_t)st.requests, "r2xx", (json_int_t)st.responses_2xx, "r4xx",
                  (json_int_t)st.responses_4xx, "ws_open", (json_int_t)st.ws_open, "ws_in",
                  (json_int_t)st.ws_msgs_in, "ws_out", (json_int_t)st.ws_msgs_out, "aborted",
                  (json_int_t)aborted, "streams_done", (json_int_t)streams_done, "flood_limit",
                  (json_int_t)flood_limit, "ws_closed", (json_int_t)ws_closed, "ws_sessions",
                  (json_int_t)st.ws_sessions, "accepted", (json_int_t)st.conns_accepted));
}

/* ---- async answers and streams: one timer per request ---- */
typedef struct job {
    uv_timer_t t;
    srv_req_t *req;
    int left, kind, flood;
    uint64_t interval;
    size_t size;
    int seq;
} job_t;

static void job_closed(uv_handle_t *h)
{
    free(h->data);
}

static void job_abort(srv_req_t *req, void *arg)
{
    (void)req;
    job_t *j = arg;
    aborted++;
    j->req = NULL;
    uv_timer_stop(&j->t);
    uv_close((uv_handle_t *)&j->t, job_closed);
}

static void job_end(job_t *j)
{
    uv_timer_stop(&j->t);
    uv_close((uv_handle_t *)&j->t, job_closed);
}

static void slow_tick(uv_timer_t *t)
{
    job_t *j = t->data;
    srv_req_t *req = j->req;
    job_end(j);
    srv_reply_json(req, 200, json_pack("{s:b}", "slow", 1));
}

static int qint(srv_req_t *req, const char *name, int def)
{
    const char *v = srv_req_query(req, name);
    return v ? atoi(v) : def;
}

static job_t *job_new(srv_req_t *req)
{
    job_t *j = calloc(1, sizeof(*j));
    uv_timer_init(loop, &j->t);
    j->t.data = j;
    j->req = req;
    srv_req_on_abort(req, job_abort, j);
    return j;
}

static void h_slow(srv_req_t *req, void *arg)
{
    (void)arg;
    job_t *j = job_new(req);
    uv_timer_start(&j->t, slow_tick, (uint64_t)qint(req, "ms", 200), 0);
}

static void stream_tick(uv_timer_t *t)
{
    job_t *j = t->data;
    if (j->flood) {
        char *pad = malloc(j->size + 1);
        memset(pad, 'x', j->size);
        pad[j->size] = 0;
        int rc = srv_stream_send(j->req, json_pack("{s:i,s:s}", "seq", j->seq++, "pad", pad), NULL,
                                 NULL);
        free(pad);
        if (rc == CAP_ELIMIT)
            flood_limit++;
        /* On CAP_ELIMIT / CAP_ECLOSED the connection is closing: the abort callback ends the job.
         */
        return;
    }
    char id[32];
    snprintf(id, sizeof(id), "%d", j->seq);
    int rc =
        srv_stream_send(j->req, json_pack("{s:s,s:i}", "type", "tick", "seq", j->seq), "tick", id);
    j->seq++;
    if (rc != 0)
        return;
    if (--j->left <= 0) {
        srv_req_t *req = j->req;
        job_end(j);
        srv_stream_end(req);
        streams_done++;
    }
}

static void h_stream(srv_req_t *req, void *arg)
{
    (void)arg;
    static const char *const allowed[] = {"n", "format", "interval_ms", NULL};
    if (srv_req_query_check(req, allowed) != 0)
        return;
    const char *fmt = srv_req_query(req, "format");
    srv_stream_kind_t kind = SRV_STREAM_NDJSON;
    if (fmt && strcmp(fmt, "sse") == 0)
        kind = SRV_STREAM_SSE;
    else if (fmt && strcmp(fmt, "ndjson") != 0) {
        srv_reply_error(req, 400, "bad_format", "format must be ndjson or sse");
        return;
    }
    job_t *j = job_new(req);
    j->left = qint(req, "n", 5);
    srv_stream_start(req, kind);
    uv_timer_start(&j->t, stream_tick, 1, (uint64_t)qint(req, "interval_ms", 10));
}

static void h_flood(srv_req_t *req, void *arg)
{
    (void)arg;
    job_t *j = job_new(req);
    j->flood = 1;
    j->size = (size_t)qint(req, "size", 65536);
    srv_stream_start(req, SRV_STREAM_NDJSON);
    uv_timer_start(&j->t, stream_tick, 1, 1);
}

/* ---- WebSocket ---- */
static void ws_message(srv_ws_t *ws, json_t *msg, void *arg)
{
    (void)arg;
    const char *op = json_string_value(json_object_get(msg, "op"));
    if (!op) {
        srv_ws_send(ws, json_pack("{s:s,s:{s:s,s:s}}", "type", "error", "error", "code",
                                  "bad_message", "message", "missing \"op\""));
    } else if (strcmp(op, "echo") == 0) {
        json_t *data = json_object_get(msg, "data");
        srv_ws_send(ws, json_pack("{s:s,s:O?,s:s}", "type", "echo", "data", data, "principal",
                                  srv_ws_principal(ws)));
    } else if (strcmp(op, "burst") == 0) { /* n messages at once, each padded with `size` bytes */
        json_int_t n = json_integer_value(json_object_get(msg, "n"));
        json_int_t size = json_integer_value(json_object_get(msg, "size"));
        char *pad = cap_malloc((size_t)(size > 0 ? size : 0) + 1);
        memset(pad, 'x', (size_t)(size > 0 ? size : 0));
        pad[size > 0 ? size : 0] = 0;
        for (json_int_t i = 0; i < n; i++)
            if (srv_ws_send(ws,
                            json_pack("{s:s,s:I,s:s}", "type", "burst", "seq", i, "pad", pad)) != 0)
                break;
        cap_free(pad);
    } else if (strcmp(op, "close") == 0) {
        srv_ws_close(ws, 1000, "bye");
    } else {
        srv_ws_send(ws, json_pack("{s:s,s:{s:s,s:s}}", "type", "error", "error", "code",
                                  "unknown_op", "message", op));
    }
    json_decref(msg);
}

static void ws_close(srv_ws_t *ws, void *arg)
{
    (void)ws;
    (void)arg;
    ws_closed++;
}

static void h_ws(srv_req_t *req, void *arg)
{
    (void)arg;
    static const srv_ws_callbacks_t cb = {ws_message, ws_close};
    srv_ws_t *ws;
    srv_ws_accept(req, &cb, NULL, &ws);
}

/* ---- main ---- */
static uv_signal_t sigterm;

static void on_sigterm(uv_signal_t *s, int signum)
{
    (void)signum;
    srv_server_close(srv);
    uv_close((uv_handle_t *)s, NULL);
}

static int set_limit(srv_limits_t *l, const char *kv)
{
    const char *eq = strchr(kv, '=');
    if (!eq)
        return -1;
    uint32_t v = (uint32_t)strtoul(eq + 1, NULL, 10);
    size_t n = (size_t)(eq - kv);
#define L(f)                                                                                       \
    if (strlen(#f) == n && strncmp(kv, #f, n) == 0) {                                              \
        l->f = v;                                                                                  \
        return 0;                                                                                  \
    }
    L(max_conns)
    L(max_url_bytes)
    L(max_header_bytes)
    L(max_headers) L(max_body_bytes) L(read_timeout_ms) L(idle_timeout_ms) L(ws_max_frame)
        L(ws_max_msg) L(json_max_depth) L(max_out_bytes)
#undef L
            return -1;
}

int main(int argc, char **argv)
{
    srv_config_t cfg = {.listen = "127.0.0.1:0"};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc)
            cfg.listen = argv[++i];
        else if (strcmp(argv[i], "--tokens-file") == 0 && i + 1 < argc)
            cfg.tokens_file = argv[++i];
        else if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc)
            cfg.tokens = argv[++i];
        else if (strcmp(argv[i], "--limit") == 0 && i + 1 < argc) {
            if (set_limit(&cfg.limits, argv[++i]) != 0) {
                fprintf(stderr, "bad --limit %s\n", argv[i]);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: http_testd --listen H:P [--tokens-file F] [--tokens a,b] "
                            "[--limit name=value]...\n");
            return 2;
        }
    }
    loop = uv_default_loop();
    int rc = srv_server_open(loop, &cfg, &srv);
    if (rc) {
        fprintf(stderr, "http_testd: cannot start: %s\n", cap_strerror(rc));
        uv_run(loop, UV_RUN_DEFAULT);
        uv_loop_close(loop);
        return 1;
    }
    srv_server_route(srv, "GET", "/v1/ping", SRV_ROUTE_PUBLIC, h_ping, NULL);
    srv_server_route(srv, "GET", "/v1/stats", SRV_ROUTE_PUBLIC, h_stats, NULL);
    srv_server_route(srv, "POST", "/v1/echo", 0, h_echo, NULL);
    srv_server_route(srv, "GET", "/v1/items/{id}", 0, h_item_get, NULL);
    srv_server_route(srv, "DELETE", "/v1/items/{id}", 0, h_item_delete, NULL);
    srv_server_route(srv, "GET", "/v1/slow", 0, h_slow, NULL);
    srv_server_route(srv, "GET", "/v1/stream", 0, h_stream, NULL);
    srv_server_route(srv, "GET", "/v1/flood", 0, h_flood, NULL);
    srv_server_route(srv, "GET", "/v1/ws", 0, h_ws, NULL);
    uv_signal_init(loop, &sigterm);
    uv_signal_start(&sigterm, on_sigterm, SIGTERM);
    printf("PORT %d\n", srv_server_port(srv));
    fflush(stdout);
    uv_run(loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(loop);
    if (rc) {
        fprintf(stderr, "http_testd: loop not clean at exit: %s\n", uv_strerror(rc));
        return 3;
    }
    return 0;
}
