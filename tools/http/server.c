/*
 * server.c - connections, routing and answers of capsule_http, on libuv TCP handles.
 *
 * A connection is an HTTP/1.1 keep-alive stream until a WebSocket handshake turns it into a
 * session. Invariants:
 *   - one request per connection is answered at a time; bytes of a pipelined next request wait
 *     in the connection's input buffer (bounded; reading pauses beyond it);
 *   - every connection has one timer: idle (between requests), read (first byte of a request to
 *     its last: 408), WebSocket silence, or lingering close; a handler's own time is not bounded
 *     here;
 *   - a connection closes asynchronously: conn_close() only starts it; a pending request's abort
 *     callback runs and the request is freed from the close callback, never inside a caller's
 *     stack, so srv_reply_*() / srv_stream_send() may be called at any time and see CAP_ECLOSED;
 *   - after an error answer the write side is shut down and the rest of the input drained for a
 *     short while (lingering close), so the client reads the answer instead of a reset;
 *   - bytes queued to a client that does not read are bounded (max_out_bytes): beyond, the
 *     connection is dropped.
 * Handles are freed only in their close callbacks; the server itself once the listener and the
 * last connection have closed after srv_server_close().
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include "cap.h"
#include "srv_int.h"

#define LINGER_MS    1000
#define ERR_MSG_MAX  512
#define REJECT_SLACK 64 /* connections beyond max_conns that still get a 503 (then a reset) */

typedef struct route {
    char method[16];
    char *pattern;
    char **segs;
    int nsegs;
    unsigned flags;
    srv_handler_fn fn;
    void *arg;
} route_t;

typedef struct kv {
    char *k, *v;
} kv_t;

typedef struct conn conn_t;

enum { T_NONE, T_IDLE, T_READ, T_WS, T_LINGER };

struct srv_ws {
    conn_t *conn;
    srv__wsproto_t *proto;
    srv_ws_callbacks_t cb;
    void *arg;
    char id[72];
    char principal[24];
};

struct srv_req {
    conn_t *conn;
    srv__hmsg_t *msg; /* borrowed from the connection's parser */
    char id[72];
    char *path;
    kv_t *query;
    int nquery;
    kv_t *params;
    int nparams;
    const char *principal;
    char *extra_hdrs; /* "Name: value\r\n"... */
    size_t extra_len;
    int answered, streaming, in_handler;
    srv_stream_kind_t kind;
    srv_abort_fn abort_fn;
    void *abort_arg;
    uint64_t t0;
    int status;
    uint64_t bytes_out;
};

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shut;
    srv_server_t *srv;
    conn_t *prev, *next;
    srv__hparser_t *hp;
    char *in;
    size_t in_len, in_cap;
    srv_req_t *req; /* being answered */
    srv_ws_t *ws;
    int tmode;
    int closing, shutting, reading, in_process, rejected, continue_sent;
    int open_handles;
    char peer[64];
    /* WebSocket frames waiting for the end of the loop iteration (see ws_write) */
    char *ob;
    size_t olen, ocap;
    conn_t *onext;
    int oqueued;
};

struct srv_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    int listener_open, accepting, closing, draining;
    srv_limits_t lim;
    srv__auth_t *auth;
    route_t *routes;
    size_t nroutes;
    conn_t *conns;
    uint32_t nconns;
    srv_stats_t st;
    int port;
    uint64_t seq;
    char idprefix[12];
    /* connections with WebSocket frames to write, flushed before the loop blocks again */
    conn_t *ohead;
    uv_prepare_t oprep;
    uv_check_t ocheck;
    int flush_open; /* oprep and ocheck not yet closed */
};

typedef struct wreq {
    uv_write_t w;
    conn_t *c;
    char data[];
} wreq_t;

static void conn_close(conn_t *c);
static void conn_process(conn_t *c);
static void conn_shutdown(conn_t *c);
static void server_maybe_free(srv_server_t *srv);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Case-insensitive substring test (strcasestr is a GNU extension). */
static int ci_contains(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return 1;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* limits, status texts                                                                        */

void srv_limits_default(srv_limits_t *l)
{
    l->max_conns = 1024;
    l->max_url_bytes = 8 << 10;
    l->max_header_bytes = 16 << 10;
    l->max_headers = 64;
    l->max_body_bytes = 1 << 20;
    l->read_timeout_ms = 10000;
    l->idle_timeout_ms = 60000;
    l->ws_max_frame = 256 << 10;
    l->ws_max_msg = 1 << 20;
    l->json_max_depth = 32;
    l->max_out_bytes = 16 << 20;
}

static void limits_fill(srv_limits_t *l)
{
    srv_limits_t d;
    srv_limits_default(&d);
#define FILL(f)                                                                                    \
    if (!l->f)                                                                                     \
    l->f = d.f
    FILL(max_conns);
    FILL(max_url_bytes);
    FILL(max_header_bytes);
    FILL(max_headers);
    FILL(max_body_bytes);
    FILL(read_timeout_ms);
    FILL(idle_timeout_ms);
    FILL(ws_max_frame);
    FILL(ws_max_msg);
    FILL(json_max_depth);
    FILL(max_out_bytes);
#undef FILL
}

static const char *status_text(int st)
{
    switch (st) {
    case 100:
        return "Continue";
    case 101:
        return "Switching Protocols";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 300:
        return "Multiple Choices";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 410:
        return "Gone";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 417:
        return "Expectation Failed";
    case 422:
        return "Unprocessable Content";
    case 426:
        return "Upgrade Required";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Status";
    }
}

/* ------------------------------------------------------------------------------------------ */
/* writing                                                                                     */

static void on_write(uv_write_t *w, int status)
{
    wreq_t *wr = (wreq_t *)w;
    conn_t *c = wr->c;
    cap_free(wr);
    if (status < 0 && !c->closing)
        conn_close(c);
}

/* Writes bytes, or queues what the socket does not take at once; returns 0, CAP_ECLOSED, or
 * CAP_ELIMIT (and drops the connection) when the client has left more than max_out_bytes unread.
 * With nothing queued before them the bytes are first offered to the socket directly
 * (uv_try_write: one write(2)); only a remainder is copied into a write request. A uv_write that
 * the kernel takes at once still costs its request (malloc + copy), a callback run later from
 * libuv's pending queue and an epoll_ctl re-arming the socket for reading only: strace counted
 * one epoll_ctl per WebSocket message, now gone. */
static int conn_write(conn_t *c, const void *data, size_t len)
{
    if (c->closing || c->shutting)
        return CAP_ECLOSED;
    if (len == 0)
        return 0;
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) == 0) {
        uv_buf_t tb = uv_buf_init((char *)data, (unsigned)len);
        int k = uv_try_write((uv_stream_t *)&c->tcp, &tb, 1);
        if (k >= 0 && (size_t)k == len)
            return 0;
        if (k < 0 && k != UV_EAGAIN) {
            conn_close(c); /* what on_write does with a failed write */
            return CAP_ECLOSED;
        }
        if (k > 0) {
            data = (const char *)data + k;
            len -= (size_t)k;
        }
    }
    wreq_t *wr = cap_malloc(sizeof(*wr) + len);
    wr->c = c;
    memcpy(wr->data, data, len);
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)len);
    int rc = uv_write(&wr->w, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc < 0) {
        cap_free(wr);
        conn_close(c);
        return CAP_ECLOSED;
    }
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > c->srv->lim.max_out_bytes) {
        cap_log(CAP_LOG_WARN, "http", "conn peer=%s dropped: %zu bytes unread (limit %u)", c->peer,
                uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp), c->srv->lim.max_out_bytes);
        conn_close(c);
        return CAP_ELIMIT;
    }
    return 0;
}

/*
 * WebSocket output is corked for the rest of the loop iteration: ws_write appends a frame to the
 * connection's buffer and queues the connection; out_flush writes the buffer with one uv_write.
 * The server flushes every queued connection just before the loop blocks again (uv_prepare, for
 * what timers and pending callbacks queued) and right after its I/O callbacks (uv_check, for
 * what they queued), so nothing waits for the next event. What that buys: a frame's header and
 * payload (two callbacks from wslay) leave in one write and one TCP segment, as do several
 * messages of one iteration; and a message sent from inside an engine callback ("accepted", from
 * the log's commit) is written after that callback has handed the execution to its worker, so
 * the worker starts without waiting for the client's wake-up on the same CPUs.
 */
static void out_unqueue(conn_t *c)
{
    if (!c->oqueued)
        return;
    conn_t **p = &c->srv->ohead;
    while (*p != c)
        p = &(*p)->onext;
    *p = c->onext;
    c->onext = NULL;
    c->oqueued = 0;
    c->olen = 0;
}

static void out_flush(conn_t *c)
{
    if (!c->oqueued)
        return;
    size_t n = c->olen;
    out_unqueue(c);
    conn_write(c, c->ob, n);
}

static void out_flush_all(srv_server_t *srv)
{
    while (srv->ohead)
        out_flush(srv->ohead);
    uv_prepare_stop(&srv->oprep);
    uv_check_stop(&srv->ocheck);
}

static void on_out_prepare(uv_prepare_t *h)
{
    out_flush_all(h->data);
}

static void on_out_check(uv_check_t *h)
{
    out_flush_all(h->data);
}

/* Appends bytes to c's corked output. Big writes are not held: what is buffered goes out, then
 * they do, through conn_write (which drops a client that has left more than max_out_bytes
 * unread, counting what the kernel did not take at once, as for every other write). */
#define OUT_CORK_MAX 16384

static void out_append(conn_t *c, const void *data, size_t len)
{
    srv_server_t *srv = c->srv;
    if (c->closing || c->shutting || len == 0)
        return;
    if (srv->closing || c->olen + len > OUT_CORK_MAX) { /* closing: the flush handles are gone */
        out_flush(c);
        conn_write(c, data, len);
        return;
    }
    if (c->olen + len > c->ocap) {
        size_t cap = c->ocap ? c->ocap : 512;
        while (cap < c->olen + len)
            cap *= 2;
        c->ob = cap_realloc(c->ob, cap);
        c->ocap = cap;
    }
    memcpy(c->ob + c->olen, data, len);
    c->olen += len;
    if (!c->oqueued) {
        c->oqueued = 1;
        c->onext = srv->ohead;
        srv->ohead = c;
        uv_prepare_start(&srv->oprep, on_out_prepare);
        uv_check_start(&srv->ocheck, on_out_check);
    }
}

static void on_out_closed(uv_handle_t *h)
{
    srv_server_t *srv = h->data;
    srv->flush_open--;
    server_maybe_free(srv);
}

/* ------------------------------------------------------------------------------------------ */
/* timers                                                                                      */

static void on_timer(uv_timer_t *t)
{
    conn_t *c = t->data;
    int mode = c->tmode;
    c->tmode = T_NONE;
    switch (mode) {
    case T_IDLE:
        conn_close(c);
        break;
    case T_READ: {
        /* A slow client: answer 408 and close. */
        char body[256];
        char id[40];
        snprintf(id, sizeof(id), "%s-%llu", c->srv->idprefix, (unsigned long long)++c->srv->seq);
        int n = snprintf(body, sizeof(body),
                         "{\"error\":{\"code\":\"request_timeout\",\"message\":\"request not "
                         "received within %u ms\",\"request_id\":\"%s\"}}",
                         c->srv->lim.read_timeout_ms, id);
        char head[256];
        int h = snprintf(head, sizeof(head),
                         "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                         "Content-Length: %d\r\nConnection: close\r\nX-Request-Id: %s\r\n\r\n",
                         n, id);
        conn_write(c, head, (size_t)h);
        conn_write(c, body, (size_t)n);
        c->srv->st.responses_4xx++;
        cap_log(CAP_LOG_INFO, "http", "req id=%s peer=%s status=408 reason=read_timeout", id,
                c->peer);
        conn_shutdown(c);
        break;
    }
    case T_WS:
        if (c->ws && !c->closing) {
            srv__wsproto_close(c->ws->proto, 1001, "idle timeout");
            /* Give the client a short while to answer the close. */
            c->tmode = T_LINGER;
            uv_timer_start(&c->timer, on_timer, LINGER_MS, 0);
        }
        break;
    case T_LINGER:
        conn_close(c);
        break;
    default:
        break;
    }
}

static void timer_set(conn_t *c, int mode, uint64_t ms)
{
    if (c->closing)
        return;
    c->tmode = mode;
    if (mode == T_NONE)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, on_timer, ms, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* requests                                                                                    */

static int pct_decode(const char *s, size_t n, int plus_space, char **out)
{
    char *d = cap_malloc(n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (ch == '%') {
            if (i + 2 >= n || !isxdigit((unsigned char)s[i + 1]) ||
                !isxdigit((unsigned char)s[i + 2]))
                goto bad;
            char hex[3] = {s[i + 1], s[i + 2], 0};
            ch = (char)strtol(hex, NULL, 16);
            if (ch == 0)
                goto bad;
            i += 2;
        } else if (ch == '+' && plus_space) {
            ch = ' ';
        }
        d[k++] = ch;
    }
    d[k] = 0;
    *out = d;
    return 0;
bad:
    cap_free(d);
    return CAP_EINVAL;
}

static void req_free(srv_req_t *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->nquery; i++) {
        cap_free(r->query[i].k);
        cap_free(r->query[i].v);
    }
    for (int i = 0; i < r->nparams; i++) {
        cap_free(r->params[i].k);
        cap_free(r->params[i].v);
    }
    cap_free(r->query);
    cap_free(r->params);
    cap_free(r->path);
    cap_free(r->extra_hdrs);
    cap_free(r);
}

static void req_log(srv_req_t *r)
{
    uint64_t us = (cap_now_ns() - r->t0) / 1000;
    cap_log(CAP_LOG_INFO, "http",
            "req id=%s method=%s path=%s status=%d bytes=%llu us=%llu principal=%s peer=%s", r->id,
            r->msg ? r->msg->method : "-", r->path ? r->path : "-", r->status,
            (unsigned long long)r->bytes_out, (unsigned long long)us,
            r->principal ? r->principal : "-", r->conn ? r->conn->peer : "-");
}

static void count_status(srv_server_t *srv, int st)
{
    if (st < 300)
        srv->st.responses_2xx++;
    else if (st < 500)
        srv->st.responses_4xx++;
    else
        srv->st.responses_5xx++;
}

/* The answer is complete: log, release, and go on with the connection. */
static void req_finish(srv_req_t *r, int close_conn)
{
    conn_t *c = r->conn;
    req_log(r);
    count_status(c->srv, r->status);
    int keep = !close_conn && r->msg->keep_alive && !r->msg->upgrade && !c->srv->draining;
    c->req = NULL;
    req_free(r);
    if (c->closing)
        return;
    if (!keep) {
        conn_shutdown(c);
        return;
    }
    srv__hparser_next(c->hp);
    c->continue_sent = 0;
    timer_set(c, T_IDLE, c->srv->lim.idle_timeout_ms);
    if (!c->in_process)
        conn_process(c);
}

static const char *hdr_get(const srv__hmsg_t *m, const char *name)
{
    for (uint32_t i = 0; i < m->nhdrs; i++)
        if (strcasecmp(m->hdrs[i].name, name) == 0)
            return m->hdrs[i].value;
    return NULL;
}

static int id_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '.' && *s != '_' && *s != '-')
            return 0;
    return 1;
}

/* Writes a complete answer: head with the request's extra headers, then the body. */
static void req_send(srv_req_t *r, int status, const char *ctype, const void *body, size_t len,
                     const char *more_hdrs)
{
    conn_t *c = r->conn;
    r->answered = 1;
    r->status = status;
    int close_conn = !r->msg->keep_alive || c->srv->draining || status == 400 || status == 413 ||
                     status == 408 || r->msg->upgrade;
    size_t cap = 512 + r->extra_len + (more_hdrs ? strlen(more_hdrs) : 0);
    char *head = cap_malloc(cap);
    int h = snprintf(head, cap, "HTTP/1.%d %d %s\r\nX-Request-Id: %s\r\nConnection: %s\r\n",
                     r->msg->http_minor ? 1 : 0, status, status_text(status), r->id,
                     close_conn ? "close" : "keep-alive");
    if (ctype)
        h += snprintf(head + h, cap - (size_t)h, "Content-Type: %s\r\n", ctype);
    if (status != 204 && status != 304)
        h += snprintf(head + h, cap - (size_t)h, "Content-Length: %zu\r\n", len);
    if (more_hdrs)
        h += snprintf(head + h, cap - (size_t)h, "%s", more_hdrs);
    if (r->extra_hdrs)
        h += snprintf(head + h, cap - (size_t)h, "%s", r->extra_hdrs);
    h += snprintf(head + h, cap - (size_t)h, "\r\n");
    if (!c->closing) {
        /* One write for small answers (one segment on the wire). */
        if (len <= 16384) {
            char *all = cap_malloc((size_t)h + len);
            memcpy(all, head, (size_t)h);
            if (len)
                memcpy(all + h, body, len);
            conn_write(c, all, (size_t)h + len);
            cap_free(all);
        } else {
            conn_write(c, head, (size_t)h);
            conn_write(c, body, len);
        }
    }
    r->bytes_out += len;
    cap_free(head);
    if (!c->closing)
        req_finish(r, close_conn);
}

void srv_reply_raw(srv_req_t *r, int status, const char *ctype, const void *data, size_t len)
{
    if (r->answered || r->streaming)
        return;
    if (r->conn->closing) {
        r->answered = 1;
        r->status = status;
        return;
    }
    req_send(r, status, ctype, data, len, NULL);
}

void srv_reply_json(srv_req_t *r, int status, json_t *body)
{
    char *s = NULL;
    if (body) {
        s = json_dumps(body, JSON_COMPACT);
        json_decref(body);
    }
    if (!s) {
        srv_reply_raw(r, status, NULL, "", 0);
        return;
    }
    size_t n = strlen(s);
    s = cap_realloc(s, n + 2);
    s[n++] = '\n';
    srv_reply_raw(r, status, "application/json", s, n);
    free(s);
}

static json_t *error_doc(const char *code, const char *msg, const char *id)
{
    return json_pack("{s:{s:s,s:s,s:s}}", "error", "code", code, "message", msg, "request_id", id);
}

static void reply_error_hdr(srv_req_t *r, int status, const char *code, const char *more_hdrs,
                            const char *msg)
{
    if (r->answered || r->streaming)
        return;
    json_t *doc = error_doc(code, msg, r->id);
    char *s = json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    size_t n = strlen(s);
    s = cap_realloc(s, n + 2);
    s[n++] = '\n';
    if (r->conn->closing) {
        r->answered = 1;
        r->status = status;
    } else {
        req_send(r, status, "application/json", s, n, more_hdrs);
    }
    free(s);
}

void srv_reply_error(srv_req_t *r, int status, const char *code, const char *fmt, ...)
{
    char msg[ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    reply_error_hdr(r, status, code, NULL, msg);
}

int srv_req_add_header(srv_req_t *r, const char *name, const char *value)
{
    if (strpbrk(name, "\r\n:") || strpbrk(value, "\r\n") || !*name)
        return CAP_EINVAL;
    size_t add = strlen(name) + strlen(value) + 4;
    r->extra_hdrs = cap_realloc(r->extra_hdrs, r->extra_len + add + 1);
    snprintf(r->extra_hdrs + r->extra_len, add + 1, "%s: %s\r\n", name, value);
    r->extra_len += add;
    return 0;
}

/* ---- streaming ---- */

void srv_stream_start(srv_req_t *r, srv_stream_kind_t kind)
{
    conn_t *c = r->conn;
    if (r->answered || r->streaming)
        return;
    r->streaming = 1;
    r->kind = kind;
    r->status = 200;
    if (c->closing)
        return;
    char head[512];
    int chunked = r->msg->http_minor != 0;
    int h = snprintf(head, sizeof(head),
                     "HTTP/1.%d 200 OK\r\nX-Request-Id: %s\r\nContent-Type: %s\r\n"
                     "Cache-Control: no-store\r\nX-Accel-Buffering: no\r\n%s%s",
                     chunked ? 1 : 0, r->id,
                     kind == SRV_STREAM_SSE ? "text/event-stream" : "application/x-ndjson",
                     chunked ? "Transfer-Encoding: chunked\r\n" : "Connection: close\r\n",
                     r->extra_hdrs ? r->extra_hdrs : "");
    conn_write(c, head, (size_t)h);
    conn_write(c, "\r\n", 2);
}

static int stream_chunk(srv_req_t *r, const char *data, size_t len)
{
    conn_t *c = r->conn;
    int rc;
    if (r->msg->http_minor == 0)
        return conn_write(c, data, len);
    char *buf = cap_malloc(len + 32);
    int h = snprintf(buf, 32, "%zx\r\n", len);
    memcpy(buf + h, data, len);
    memcpy(buf + h + len, "\r\n", 2);
    rc = conn_write(c, buf, (size_t)h + len + 2);
    cap_free(buf);
    return rc;
}

int srv_stream_send(srv_req_t *r, json_t *ev, const char *sse_event, const char *sse_id)
{
    int rc = 0;
    char *s = json_dumps(ev, JSON_COMPACT);
    json_decref(ev);
    if (!r->streaming || r->answered || r->conn->closing || r->conn->shutting) {
        rc = CAP_ECLOSED;
        goto out;
    }
    size_t n = strlen(s);
    if (r->kind == SRV_STREAM_NDJSON) {
        s = cap_realloc(s, n + 2);
        s[n++] = '\n';
        s[n] = 0;
        rc = stream_chunk(r, s, n);
    } else {
        size_t cap = n + 256;
        char *e = cap_malloc(cap);
        int k = 0;
        if (sse_id && !strpbrk(sse_id, "\r\n"))
            k += snprintf(e + k, cap - (size_t)k, "id: %.100s\n", sse_id);
        if (sse_event && !strpbrk(sse_event, "\r\n"))
            k += snprintf(e + k, cap - (size_t)k, "event: %.64s\n", sse_event);
        k += snprintf(e + k, cap - (size_t)k, "data: %s\n\n", s); /* compact JSON: one line */
        rc = stream_chunk(r, e, (size_t)k);
        cap_free(e);
    }
    r->bytes_out += n;
out:
    free(s);
    return rc;
}

void srv_stream_end(srv_req_t *r)
{
    conn_t *c = r->conn;
    if (!r->streaming || r->answered)
        return;
    r->answered = 1;
    if (c->closing)
        return; /* freed by the close callback */
    int close_conn = r->msg->http_minor == 0;
    if (!close_conn)
        conn_write(c, "0\r\n\r\n", 5);
    req_finish(r, close_conn);
}

/* ---- accessors ---- */

const char *srv_req_method(const srv_req_t *r)
{
    return r->msg->method;
}
const char *srv_req_path(const srv_req_t *r)
{
    return r->path;
}
const char *srv_req_id(const srv_req_t *r)
{
    return r->id;
}
const char *srv_req_principal(const srv_req_t *r)
{
    return r->principal;
}
const char *srv_req_header(const srv_req_t *r, const char *name)
{
    return hdr_get(r->msg, name);
}
const uint8_t *srv_req_body(const srv_req_t *r, size_t *len)
{
    *len = r->msg->body_len;
    return r->msg->body ? r->msg->body : (const uint8_t *)"";
}
const char *srv_req_param(const srv_req_t *r, const char *name)
{
    for (int i = 0; i < r->nparams; i++)
        if (strcmp(r->params[i].k, name) == 0)
            return r->params[i].v;
    return NULL;
}
const char *srv_req_query(const srv_req_t *r, const char *name)
{
    for (int i = 0; i < r->nquery; i++)
        if (strcmp(r->query[i].k, name) == 0)
            return r->query[i].v;
    return NULL;
}
void srv_req_on_abort(srv_req_t *r, srv_abort_fn fn, void *arg)
{
    r->abort_fn = fn;
    r->abort_arg = arg;
}

int srv_req_query_check(srv_req_t *r, const char *const *allowed)
{
    for (int i = 0; i < r->nquery; i++) {
        const char *const *a = allowed;
        while (*a && strcmp(*a, r->query[i].k) != 0)
            a++;
        if (!*a) {
            srv_reply_error(r, 400, "unknown_parameter", "unknown query parameter \"%.64s\"",
                            r->query[i].k);
            return CAP_EINVAL;
        }
    }
    return 0;
}

int srv_req_json(srv_req_t *r, const srv_field_t *fields, json_t **out)
{
    char err[ERR_MSG_MAX];
    json_t *v = NULL;
    size_t len = r->msg->body_len;
    int rc;
    if (len == 0) {
        v = json_object();
    } else {
        const char *ct = hdr_get(r->msg, "content-type");
        if (!ct || strncasecmp(ct, "application/json", 16) != 0 ||
            (ct[16] != 0 && ct[16] != ';' && ct[16] != ' ')) {
            srv_reply_error(r, 415, "unsupported_media_type",
                            "the request body must be application/json");
            return CAP_EINVAL;
        }
        rc = srv_json_parse((const char *)r->msg->body, len, r->conn->srv->lim.json_max_depth, &v,
                            err, sizeof(err));
        if (rc) {
            srv_reply_error(r, 400, rc == CAP_ETOOBIG ? "json_too_deep" : "malformed_json", "%s",
                            err);
            return rc;
        }
    }
    if ((rc = srv_json_check(v, fields, err, sizeof(err))) != 0) {
        json_decref(v);
        srv_reply_error(r, 400, "invalid_request", "%s", err);
        return rc;
    }
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* routing                                                                                     */

static void split_path(const char *path, char ***segs, int *n)
{
    *segs = NULL;
    *n = 0;
    const char *p = path;
    while (*p) {
        while (*p == '/')
            p++;
        if (!*p)
            break;
        const char *e = strchr(p, '/');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        *segs = cap_realloc(*segs, (size_t)(*n + 1) * sizeof(char *));
        char *s = cap_malloc(len + 1);
        memcpy(s, p, len);
        s[len] = 0;
        (*segs)[(*n)++] = s;
        p += len;
    }
}

static void free_segs(char **segs, int n)
{
    for (int i = 0; i < n; i++)
        cap_free(segs[i]);
    cap_free(segs);
}

int srv_server_route(srv_server_t *srv, const char *method, const char *pattern, unsigned flags,
                     srv_handler_fn fn, void *arg)
{
    if (!method || strlen(method) >= 16 || !pattern || pattern[0] != '/' || !fn)
        return CAP_EINVAL;
    srv->routes = cap_realloc(srv->routes, (srv->nroutes + 1) * sizeof(route_t));
    route_t *rt = &srv->routes[srv->nroutes++];
    memset(rt, 0, sizeof(*rt));
    snprintf(rt->method, sizeof(rt->method), "%s", method);
    rt->pattern = cap_strdup(pattern);
    split_path(pattern, &rt->segs, &rt->nsegs);
    rt->flags = flags;
    rt->fn = fn;
    rt->arg = arg;
    return 0;
}

/* Matches decoded segments against a route; on success fills the request's params. */
static int route_match(const route_t *rt, char **segs, int n, srv_req_t *r)
{
    if (rt->nsegs != n)
        return 0;
    for (int i = 0; i < n; i++) {
        const char *p = rt->segs[i];
        if (p[0] != '{' && strcmp(p, segs[i]) != 0)
            return 0;
    }
    if (r) {
        for (int i = 0; i < n; i++) {
            const char *p = rt->segs[i];
            if (p[0] != '{')
                continue;
            size_t pl = strlen(p);
            r->params = cap_realloc(r->params, (size_t)(r->nparams + 1) * sizeof(kv_t));
            r->params[r->nparams].k = cap_malloc(pl);
            memcpy(r->params[r->nparams].k, p + 1, pl - 2);
            r->params[r->nparams].k[pl - 2] = 0;
            r->params[r->nparams].v = cap_strdup(segs[i]);
            r->nparams++;
        }
    }
    return 1;
}

static int parse_target(srv_req_t *r, char ***segs, int *nsegs)
{
    const char *url = r->msg->url;
    if (url[0] != '/')
        return CAP_EINVAL;
    const char *q = strchr(url, '?');
    size_t plen = q ? (size_t)(q - url) : strlen(url);
    r->path = cap_malloc(plen + 1);
    memcpy(r->path, url, plen);
    r->path[plen] = 0;
    char **raw;
    int n;
    split_path(r->path, &raw, &n);
    *segs = cap_calloc((size_t)n + 1, sizeof(char *));
    *nsegs = n; /* entries not yet decoded stay NULL */
    for (int i = 0; i < n; i++) {
        if (pct_decode(raw[i], strlen(raw[i]), 0, &(*segs)[i]) != 0 ||
            strcmp((*segs)[i], "..") == 0 || strcmp((*segs)[i], ".") == 0) {
            free_segs(raw, n);
            return CAP_EINVAL;
        }
    }
    free_segs(raw, n);
    if (q) {
        const char *p = q + 1;
        while (*p) {
            const char *amp = strchr(p, '&');
            size_t len = amp ? (size_t)(amp - p) : strlen(p);
            if (len) {
                const char *eq = memchr(p, '=', len);
                size_t kl = eq ? (size_t)(eq - p) : len;
                char *k, *v;
                if (pct_decode(p, kl, 1, &k) != 0)
                    return CAP_EINVAL;
                if (pct_decode(eq ? eq + 1 : "", eq ? len - kl - 1 : 0, 1, &v) != 0) {
                    cap_free(k);
                    return CAP_EINVAL;
                }
                r->query = cap_realloc(r->query, (size_t)(r->nquery + 1) * sizeof(kv_t));
                r->query[r->nquery].k = k;
                r->query[r->nquery].v = v;
                r->nquery++;
            }
            p += len;
            if (*p == '&')
                p++;
        }
    }
    return 0;
}

static void dispatch(conn_t *c)
{
    srv_server_t *srv = c->srv;
    srv__hmsg_t *m = srv__hparser_msg(c->hp);
    srv_req_t *r = cap_calloc(1, sizeof(*r));
    char **segs = NULL;
    int nsegs = 0;
    r->conn = c;
    r->msg = m;
    r->t0 = cap_now_ns();
    c->req = r;
    srv->st.requests++;
    const char *rid = hdr_get(m, "x-request-id");
    if (rid && id_ok(rid))
        snprintf(r->id, sizeof(r->id), "%s", rid);
    else
        snprintf(r->id, sizeof(r->id), "%s-%llu", srv->idprefix, (unsigned long long)++srv->seq);
    timer_set(c, T_NONE, 0);

    if (parse_target(r, &segs, &nsegs) != 0) {
        srv_reply_error(r, 400, "bad_target",
                        "the request target must be an origin-form path with valid "
                        "percent-encoding and no dot segments");
        goto out;
    }
    const route_t *found = NULL;
    char allow[128] = "";
    for (size_t i = 0; i < srv->nroutes; i++) {
        const route_t *rt = &srv->routes[i];
        if (!route_match(rt, segs, nsegs, NULL))
            continue;
        if (strcmp(rt->method, m->method) == 0) {
            found = rt;
            break;
        }
        size_t al = strlen(allow);
        snprintf(allow + al, sizeof(allow) - al, "%s%s", al ? ", " : "", rt->method);
    }
    if (!found) {
        if (allow[0]) {
            char hdr[160];
            char msg[200];
            snprintf(hdr, sizeof(hdr), "Allow: %s\r\n", allow);
            snprintf(msg, sizeof(msg), "method %s is not allowed here (allowed: %s)", m->method,
                     allow);
            reply_error_hdr(r, 405, "method_not_allowed", hdr, msg);
        } else {
            srv_reply_error(r, 404, "not_found", "no route for %s %.200s", m->method, r->path);
        }
        goto out;
    }
    route_match(found, segs, nsegs, r);
    if (srv__auth_enabled(srv->auth)) {
        const char *principal = NULL;
        if (srv__auth_check(srv->auth, hdr_get(m, "authorization"), &principal) == 0) {
            r->principal = principal;
        } else if (!(found->flags & SRV_ROUTE_PUBLIC)) {
            reply_error_hdr(r, 401, "unauthorized", "WWW-Authenticate: Bearer\r\n",
                            hdr_get(m, "authorization") ? "the bearer token is not valid"
                                                        : "a bearer token is required");
            goto out;
        }
    } else {
        r->principal = "anonymous";
    }
    r->in_handler = 1;
    found->fn(r, found->arg);
    /* The handler may have answered (then r is freed and c->req is something else or NULL). */
    if (c->req == r)
        r->in_handler = 0;
out:
    free_segs(segs, nsegs);
}

/* ------------------------------------------------------------------------------------------ */
/* WebSocket sessions                                                                          */

static void ws_error_msg(srv_ws_t *ws, const char *code, const char *msg)
{
    json_t *doc =
        json_pack("{s:s,s:{s:s,s:s}}", "type", "error", "error", "code", code, "message", msg);
    srv_ws_send(ws, doc);
}

static void ws_on_text(void *arg, const uint8_t *data, size_t len)
{
    srv_ws_t *ws = arg;
    conn_t *c = ws->conn;
    char err[ERR_MSG_MAX];
    json_t *msg = NULL;
    c->srv->st.ws_msgs_in++;
    int rc =
        srv_json_parse((const char *)data, len, c->srv->lim.json_max_depth, &msg, err, sizeof(err));
    if (rc) {
        ws_error_msg(ws, rc == CAP_ETOOBIG ? "json_too_deep" : "malformed_json", err);
        return;
    }
    if (c->closing) {
        json_decref(msg);
        return;
    }
    ws->cb.on_message(ws, msg, ws->arg);
}

static void ws_on_binary(void *arg, size_t len)
{
    (void)len;
    srv_ws_t *ws = arg;
    ws->conn->srv->st.ws_msgs_in++;
    ws_error_msg(ws, "unsupported_message", "binary messages are not supported; send JSON text");
}

static void ws_write(void *arg, const uint8_t *data, size_t len)
{
    srv_ws_t *ws = arg;
    out_append(ws->conn, data, len);
}

int srv_ws_accept(srv_req_t *r, const srv_ws_callbacks_t *cb, void *arg, srv_ws_t **out)
{
    conn_t *c = r->conn;
    srv__hmsg_t *m = r->msg;
    const char *up = hdr_get(m, "upgrade");
    const char *conn_h = hdr_get(m, "connection");
    const char *ver = hdr_get(m, "sec-websocket-version");
    const char *key = hdr_get(m, "sec-websocket-key");
    if (strcmp(m->method, "GET") != 0 || !up || !ci_contains(up, "websocket") || !conn_h ||
        !ci_contains(conn_h, "upgrade")) {
        reply_error_hdr(r, 426, "upgrade_required", "Upgrade: websocket\r\n",
                        "this route speaks WebSocket: send a GET with Upgrade: websocket");
        return CAP_EPROTO;
    }
    if (!ver || strcmp(ver, "13") != 0) {
        reply_error_hdr(r, 426, "unsupported_websocket_version", "Sec-WebSocket-Version: 13\r\n",
                        "only WebSocket version 13 is supported");
        return CAP_EPROTO;
    }
    if (!key || !srv__ws_key_valid(key)) {
        srv_reply_error(r, 400, "bad_websocket_key", "Sec-WebSocket-Key must be 16 bytes base64");
        return CAP_EPROTO;
    }
    if (c->closing) {
        r->answered = 1;
        return CAP_ECLOSED;
    }
    char accept[29];
    srv__ws_accept_key(key, accept);
    char head[512];
    int h = snprintf(head, sizeof(head),
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\nX-Request-Id: %s\r\n\r\n",
                     accept, r->id);
    conn_write(c, head, (size_t)h);
    srv_ws_t *ws = cap_calloc(1, sizeof(*ws));
    ws->conn = c;
    ws->cb = *cb;
    ws->arg = arg;
    snprintf(ws->id, sizeof(ws->id), "%s", r->id);
    snprintf(ws->principal, sizeof(ws->principal), "%s", r->principal ? r->principal : "-");
    srv__wsproto_cb_t pcb = {.on_text = ws_on_text, .on_binary = ws_on_binary, .write = ws_write};
    srv__wsproto_new(&c->srv->lim, &pcb, ws, &ws->proto);
    c->ws = ws;
    c->srv->st.ws_sessions++;
    c->srv->st.ws_open++;
    r->answered = 1;
    r->status = 101;
    req_log(r);
    count_status(c->srv, 101);
    c->req = NULL;
    req_free(r);
    timer_set(c, T_WS, (uint64_t)c->srv->lim.idle_timeout_ms * 10);
    *out = ws;
    /* Bytes after the head (already read) are frames: conn_process hands them over, now if the
     * handshake was answered asynchronously, else when the handler returns. */
    if (!c->in_process)
        conn_process(c);
    return 0;
}

int srv_ws_send_text(srv_ws_t *ws, const char *text, size_t len)
{
    if (ws->conn->closing || ws->conn->shutting)
        return CAP_ECLOSED;
    int rc = srv__wsproto_send_text(ws->proto, text, len);
    if (rc == 0) {
        ws->conn->srv->st.ws_msgs_out++;
        if (ws->conn->closing)
            rc = CAP_ELIMIT; /* dropped by conn_write for not reading */
    }
    return rc;
}

int srv_ws_send(srv_ws_t *ws, json_t *msg)
{
    char *s = json_dumps(msg, JSON_COMPACT);
    json_decref(msg);
    int rc = s ? srv_ws_send_text(ws, s, strlen(s)) : -ENOMEM;
    free(s);
    return rc;
}

void srv_ws_close(srv_ws_t *ws, uint16_t code, const char *reason)
{
    conn_t *c = ws->conn;
    if (c->closing)
        return;
    srv__wsproto_close(ws->proto, code, reason);
    if (srv__wsproto_done(ws->proto))
        conn_shutdown(c);
    else
        timer_set(c, T_LINGER, LINGER_MS * 5);
}

const char *srv_ws_principal(const srv_ws_t *ws)
{
    return ws->principal;
}

const char *srv_ws_id(const srv_ws_t *ws)
{
    return ws->id;
}

/* ------------------------------------------------------------------------------------------ */
/* connections                                                                                 */

static void in_consume(conn_t *c, size_t n)
{
    memmove(c->in, c->in + n, c->in_len - n);
    c->in_len -= n;
}

static size_t in_limit(const srv_server_t *srv)
{
    return (size_t)srv->lim.max_url_bytes + srv->lim.max_header_bytes + srv->lim.max_body_bytes +
           65536;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    conn_t *c = h->data;
    if (c->in_cap - c->in_len < 65536) {
        c->in_cap = c->in_len + 65536;
        c->in = cap_realloc(c->in, c->in_cap);
    }
    *buf = uv_buf_init(c->in + c->in_len, (unsigned)(c->in_cap - c->in_len));
}

/* An error before or while parsing (no request object yet or a broken one): answer, close. */
static void conn_fail(conn_t *c, int status, const char *code, const char *msg)
{
    srv_server_t *srv = c->srv;
    char id[40];
    snprintf(id, sizeof(id), "%s-%llu", srv->idprefix, (unsigned long long)++srv->seq);
    json_t *doc = error_doc(code, msg, id);
    char *s = json_dumps(doc, JSON_COMPACT);
    json_decref(doc);
    size_t n = strlen(s);
    char head[300];
    int h = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\nX-Request-Id: %s\r\n\r\n",
                     status, status_text(status), n + 1, id);
    conn_write(c, head, (size_t)h);
    conn_write(c, s, n);
    conn_write(c, "\n", 1);
    free(s);
    count_status(srv, status);
    cap_log(CAP_LOG_INFO, "http", "req id=%s peer=%s status=%d reason=%s: %s", id, c->peer, status,
            code, msg);
    conn_shutdown(c);
}

static void conn_process(conn_t *c)
{
    if (c->in_process)
        return;
    c->in_process = 1;
    while (!c->closing && !c->shutting) {
        if (c->ws) {
            if (c->in_len) {
                size_t n = c->in_len;
                c->in_len = 0; /* the callbacks may write, never read c->in */
                int rc = srv__wsproto_feed(c->ws->proto, (const uint8_t *)c->in, n);
                (void)rc;
                if (!c->closing && c->tmode == T_WS)
                    timer_set(c, T_WS, (uint64_t)c->srv->lim.idle_timeout_ms * 10);
            }
            if (!c->closing && srv__wsproto_done(c->ws->proto))
                conn_shutdown(c); /* flush our close frame, then drain: no reset */
            break;
        }
        if (c->req || c->in_len == 0)
            break;
        size_t used = 0;
        int status = 0;
        int ev = srv__hparser_feed(c->hp, c->in, c->in_len, &used, &status);
        in_consume(c, used);
        if (ev == SRV__HP_ERROR) {
            const char *code = status == 413   ? "body_too_large"
                               : status == 414 ? "uri_too_long"
                               : status == 431 ? "headers_too_large"
                               : status == 417 ? "expectation_failed"
                               : status == 505 ? "http_version_not_supported"
                                               : "malformed_request";
            conn_fail(c, status, code, srv__hparser_error(c->hp));
            break;
        }
        if (ev == SRV__HP_MORE) {
            if (c->tmode != T_READ && srv__hparser_started(c->hp))
                timer_set(c, T_READ, c->srv->lim.read_timeout_ms);
            srv__hmsg_t *m = srv__hparser_msg(c->hp);
            if (srv__hparser_head_done(c->hp) && m->expect_continue && !c->continue_sent) {
                c->continue_sent = 1;
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                conn_write(c, cont, sizeof(cont) - 1);
            }
            break;
        }
        /* A complete request. */
        dispatch(c);
    }
    c->in_process = 0;
    /* Reading resumes once the buffered input is back under its bound. */
    if (!c->closing && !c->reading && c->in_len < in_limit(c->srv)) {
        c->reading = 1;
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    conn_t *c = s->data;
    if (nread < 0) {
        conn_close(c);
        return;
    }
    if (c->shutting) { /* lingering: discard */
        return;
    }
    c->in_len += (size_t)nread;
    if (c->in_len >= in_limit(c->srv) && c->reading) {
        c->reading = 0;
        uv_read_stop(s);
    }
    conn_process(c);
}

static void conn_free_if_done(conn_t *c)
{
    if (c->open_handles > 0)
        return;
    srv_server_t *srv = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv->nconns--;
    srv->st.conns_open = srv->nconns;
    srv__hparser_free(c->hp);
    cap_free(c->in);
    cap_free(c->ob);
    cap_free(c);
    server_maybe_free(srv);
}

static void on_handle_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    if ((uv_handle_t *)&c->tcp == h) {
        /* Abort a pending request or end the session, now that no caller is on the stack. */
        if (c->req) {
            srv_req_t *r = c->req;
            c->req = NULL;
            if (!r->answered && r->abort_fn)
                r->abort_fn(r, r->abort_arg);
            if (!r->status)
                r->status = 499; /* client went away */
            req_log(r);
            req_free(r);
        }
        if (c->ws) {
            srv_ws_t *ws = c->ws;
            c->ws = NULL;
            c->srv->st.ws_open--;
            cap_log(CAP_LOG_INFO, "http", "ws id=%s closed peer=%s", ws->id, c->peer);
            if (ws->cb.on_close)
                ws->cb.on_close(ws, ws->arg);
            srv__wsproto_free(ws->proto);
            cap_free(ws);
        }
    }
    c->open_handles--;
    conn_free_if_done(c);
}

static void conn_close(conn_t *c)
{
    if (c->closing)
        return;
    out_unqueue(c); /* what was not written is dropped with the connection */
    c->closing = 1;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

static void on_shutdown(uv_shutdown_t *sh, int status)
{
    conn_t *c = sh->data;
    if (c->closing)
        return;
    if (status < 0) {
        conn_close(c);
        return;
    }
    /* Linger: read and discard until the client closes or a short while passes. */
    c->tmode = T_LINGER;
    uv_timer_start(&c->timer, on_timer, LINGER_MS, 0);
    if (!c->reading) {
        c->reading = 1;
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    }
}

static void conn_shutdown(conn_t *c)
{
    if (c->closing || c->shutting)
        return;
    out_flush(c); /* frames queued in this iteration (a close frame) go before the FIN */
    if (c->closing)
        return;
    c->shutting = 1;
    c->in_len = 0;
    uv_timer_stop(&c->timer);
    c->tmode = T_NONE;
    c->shut.data = c;
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown) < 0)
        conn_close(c);
}

static void on_connection(uv_stream_t *ls, int status)
{
    srv_server_t *srv = ls->data;
    if (status < 0) {
        cap_log(CAP_LOG_WARN, "http", "accept: %s", uv_strerror(status));
        return;
    }
    conn_t *c = cap_calloc(1, sizeof(*c));
    c->srv = srv;
    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->open_handles = 2;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->nconns++;
    srv->st.conns_open = srv->nconns;
    srv__hparser_new(&srv->lim, &c->hp);
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    snprintf(c->peer, sizeof(c->peer), "?");
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        char ip[48] = "?";
        int port = 0;
        if (ss.ss_family == AF_INET) {
            uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof(ip));
            port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof(ip));
            port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        }
        snprintf(c->peer, sizeof(c->peer), "%s:%d", ip, port);
    }
    if (srv->nconns > srv->lim.max_conns) {
        srv->st.conns_rejected++;
        if (srv->nconns > srv->lim.max_conns + REJECT_SLACK) {
            conn_close(c);
            return;
        }
        c->rejected = 1;
        char msg[128];
        snprintf(msg, sizeof(msg), "the server is at its connection limit (%u); retry later",
                 srv->lim.max_conns);
        conn_fail(c, 503, "too_many_connections", msg);
        return;
    }
    srv->st.conns_accepted++;
    c->reading = 1;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    timer_set(c, T_IDLE, srv->lim.idle_timeout_ms);
}

/* ------------------------------------------------------------------------------------------ */
/* the server                                                                                  */

static int parse_listen(const char *listen, struct sockaddr_storage *ss, int *loopback)
{
    char host[128];
    const char *colon = strrchr(listen, ':');
    if (!colon || colon == listen || strlen(listen) >= sizeof(host))
        return CAP_EINVAL;
    char *end = NULL;
    long port = strtol(colon + 1, &end, 10);
    if (!*(colon + 1) || *end || port < 0 || port > 65535)
        return CAP_EINVAL;
    size_t hl = (size_t)(colon - listen);
    memcpy(host, listen, hl);
    host[hl] = 0;
    memset(ss, 0, sizeof(*ss));
    if (host[0] == '[') {
        if (hl < 3 || host[hl - 1] != ']')
            return CAP_EINVAL;
        host[hl - 1] = 0;
        if (uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)ss) != 0)
            return CAP_EINVAL;
        struct in6_addr lo = IN6ADDR_LOOPBACK_INIT;
        *loopback = memcmp(&((struct sockaddr_in6 *)ss)->sin6_addr, &lo, sizeof(lo)) == 0;
        return 0;
    }
    if (strcmp(host, "localhost") == 0)
        snprintf(host, sizeof(host), "127.0.0.1");
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) != 0)
        return CAP_EINVAL;
    uint32_t a = ntohl(((struct sockaddr_in *)ss)->sin_addr.s_addr);
    *loopback = (a >> 24) == 127;
    return 0;
}

static void on_listener_closed(uv_handle_t *h)
{
    srv_server_t *srv = h->data;
    srv->listener_open = 0;
    server_maybe_free(srv);
}

int srv_server_open(uv_loop_t *loop, const srv_config_t *cfg, srv_server_t **out)
{
    int rc = 0;
    struct sockaddr_storage ss;
    int loopback = 0;
    srv_server_t *srv = cap_calloc(1, sizeof(*srv));
    srv->loop = loop;
    srv->lim = cfg->limits;
    limits_fill(&srv->lim);
    uint8_t rnd[4];
    srv__random(rnd, sizeof(rnd));
    snprintf(srv->idprefix, sizeof(srv->idprefix), "%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2],
             rnd[3]);
    if ((rc = parse_listen(cfg->listen ? cfg->listen : "127.0.0.1:8765", &ss, &loopback)) != 0) {
        cap_log(CAP_LOG_ERROR, "http", "bad listen address \"%s\" (expected host:port, [v6]:port)",
                cfg->listen);
        goto out;
    }
    if ((rc = srv__auth_open(cfg->tokens_file, cfg->tokens, &srv->auth)) != 0)
        goto out;
    if (!loopback && !srv__auth_enabled(srv->auth)) {
        cap_log(CAP_LOG_ERROR, "http",
                "refusing to listen on %s without tokens: set a tokens file or CAPSULE_TOKENS "
                "(tokens are required beyond loopback)",
                cfg->listen);
        rc = CAP_EINVAL;
        goto out;
    }
    uv_tcp_init(loop, &srv->listener);
    srv->listener.data = srv;
    srv->listener_open = 1;
    if ((rc = uv_tcp_bind(&srv->listener, (struct sockaddr *)&ss, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&srv->listener, 511, on_connection)) != 0) {
        cap_log(CAP_LOG_ERROR, "http", "cannot listen on %s: %s", cfg->listen, uv_strerror(rc));
        /* The handle must still be closed through the loop. */
        srv->closing = 1;
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
        return rc;
    }
    struct sockaddr_storage bound;
    int bl = sizeof(bound);
    uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &bl);
    srv->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                  : ((struct sockaddr_in *)&bound)->sin_port);
    srv->accepting = 1;
    uv_prepare_init(loop, &srv->oprep);
    uv_check_init(loop, &srv->ocheck);
    srv->oprep.data = srv->ocheck.data = srv;
    srv->flush_open = 2;
    cap_log(CAP_LOG_INFO, "http", "listening on %s port %d (auth %s)", cfg->listen, srv->port,
            srv__auth_enabled(srv->auth) ? "on" : "off");
out:
    if (rc) {
        srv__auth_close(srv->auth);
        cap_free(srv);
        return rc;
    }
    *out = srv;
    return 0;
}

int srv_server_port(const srv_server_t *srv)
{
    return srv->port;
}

int srv_server_auth_required(const srv_server_t *srv)
{
    return srv__auth_enabled(srv->auth);
}

int srv_server_auth_token(const srv_server_t *srv, const char *token, const char **principal)
{
    if (!token || strlen(token) > 4096)
        return CAP_EINVAL;
    size_t n = strlen(token);
    char *h = cap_malloc(n + 8);
    memcpy(h, "Bearer ", 7);
    memcpy(h + 7, token, n + 1);
    int rc = srv__auth_check(srv->auth, h, principal);
    cap_free(h);
    return rc;
}

uint32_t srv_server_conn_count(const srv_server_t *srv)
{
    return srv->nconns;
}

void srv_server_stats(const srv_server_t *srv, srv_stats_t *out)
{
    *out = srv->st;
    out->conns_open = srv->nconns;
}

void srv_server_stop_accepting(srv_server_t *srv)
{
    if (srv->draining)
        return;
    srv->draining = 1;
    if (srv->accepting) {
        srv->accepting = 0;
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    }
    for (conn_t *c = srv->conns, *next; c; c = next) {
        next = c->next;
        if (!c->req && !c->ws && !srv__hparser_started(c->hp))
            conn_close(c);
    }
}

static void server_maybe_free(srv_server_t *srv)
{
    if (!srv->closing || srv->listener_open || srv->nconns || srv->flush_open)
        return;
    for (size_t i = 0; i < srv->nroutes; i++) {
        cap_free(srv->routes[i].pattern);
        free_segs(srv->routes[i].segs, srv->routes[i].nsegs);
    }
    cap_free(srv->routes);
    srv__auth_close(srv->auth);
    cap_free(srv);
}

void srv_server_close(srv_server_t *srv)
{
    if (!srv || srv->closing)
        return;
    srv->closing = 1;
    srv->draining = 1;
    if (srv->accepting) {
        srv->accepting = 0;
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    }
    for (conn_t *c = srv->conns, *next; c; c = next) {
        next = c->next;
        if (c->closing || c->shutting)
            continue; /* already closing, or lingering for at most LINGER_MS */
        if (c->ws) {
            /* The close frame is flushed before the FIN, then a short linger: the client learns
             * why (1001) instead of seeing a reset. */
            srv__wsproto_close(c->ws->proto, 1001, "server shutting down");
            conn_shutdown(c);
        } else {
            conn_close(c);
        }
    }
    out_flush_all(srv);
    if (srv->flush_open) {
        uv_close((uv_handle_t *)&srv->oprep, on_out_closed);
        uv_close((uv_handle_t *)&srv->ocheck, on_out_closed);
    }
    server_maybe_free(srv);
}
