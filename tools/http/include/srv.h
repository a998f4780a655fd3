/*
 * srv.h - capsule's HTTP/1.1 + WebSocket front end (library capsule_http), on our own libuv TCP
 * handles. Used by capsule-engine (tools/capsule-engine.c); knows nothing of the engine.
 *
 * What it does for an application:
 *   - accepts connections up to a limit (one over the limit gets a 503 JSON error and is closed);
 *   - parses requests (http-parser, behind tools/http/httpparse.c) with limits on URL, header and
 *     body sizes (414 / 431 / 413), a read timeout per request for slow clients (408) and an idle
 *     timeout between keep-alive requests;
 *   - authenticates bearer tokens (constant-time, tokens from a file or the environment; required
 *     whenever the listen address is not loopback: srv_server_open refuses otherwise);
 *   - routes "METHOD /v1/pattern/{param}" to handlers (404 unknown route, 405 wrong method);
 *   - gives handlers JSON helpers (depth-limited parsing, unknown fields rejected, JSON errors
 *     {"error":{"code":"...","message":"...","request_id":"..."}}), full or streamed replies
 *     (chunked NDJSON or server-sent events) and WebSocket sessions carrying JSON text messages;
 *   - logs one structured line per request with its request id.
 *
 * Threads: everything here runs on the loop thread passed to srv_server_open; no function may be
 * called from another thread.
 *
 * JSON documents are jansson's json_t (jansson.h is a public dependency of this header); all JSON
 * read from the network is parsed by srv_json_parse (tools/http/json.c), nowhere else.
 */
#ifndef CAP_SRV_H
#define CAP_SRV_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct srv_server srv_server_t;
typedef struct srv_req srv_req_t;
typedef struct srv_ws srv_ws_t;

/* Limits on what a client may send or hold. Zero in any field means "use the default". */
typedef struct srv_limits {
    uint32_t max_conns;        /* open connections (HTTP + WebSocket); default 1024 */
    uint32_t max_url_bytes;    /* request line target; 414 beyond; default 8 KiB */
    uint32_t max_header_bytes; /* all header names + values; 431 beyond; default 16 KiB */
    uint32_t max_headers;      /* header count; 431 beyond; default 64 */
    uint32_t max_body_bytes;   /* decoded request body; 413 beyond; default 1 MiB */
    uint32_t read_timeout_ms;  /* first byte of a request to its last; 408 beyond; default 10 s */
    uint32_t idle_timeout_ms;  /* keep-alive idle / WebSocket silence; closed beyond; default 60 s
                                  (WebSocket: 10x this value) */
    uint32_t ws_max_frame;     /* one WebSocket frame payload; close 1009 beyond; default 256 KiB */
    uint32_t ws_max_msg;       /* one reassembled message; close 1009 beyond; default 1 MiB */
    uint32_t json_max_depth;   /* nesting of arrays/objects; 400 beyond; default 32 */
    uint32_t max_out_bytes;    /* bytes queued to a client that does not read; the connection is
                                  dropped beyond; default 16 MiB */
} srv_limits_t;

/* Fills every field of `l` with its default. */
void srv_limits_default(srv_limits_t *l);

typedef struct srv_config {
    const char *listen;      /* "host:port" (IPv4 dotted or "[v6]"); port 0 picks a free port */
    srv_limits_t limits;     /* zero fields take defaults */
    const char *tokens_file; /* one token per line ('#' comments, blank lines ignored); or NULL */
    const char *tokens;      /* comma-separated tokens (e.g. from CAPSULE_TOKENS); or NULL */
} srv_config_t;

/* Route flags. */
enum {
    SRV_ROUTE_PUBLIC = 1, /* no token required (health checks, the OpenAPI document) */
};

/*
 * A handler. It must, now or later on the loop thread, answer exactly once through srv_reply_*,
 * srv_stream_* (ending with srv_stream_end) or srv_ws_accept. The request stays valid until then,
 * or until the client goes away first: then the abort callback (srv_req_on_abort) runs and the
 * request is freed right after it returns; the handler must not touch it again. Returning without
 * answering is how a handler goes asynchronous. The return value is ignored.
 */
typedef void (*srv_handler_fn)(srv_req_t *req, void *arg);
typedef void (*srv_abort_fn)(srv_req_t *req, void *arg);

/*
 * Opens a server listening on cfg->listen, on `loop` (borrowed; must outlive the server).
 * Returns 0; CAP_EINVAL for a bad address or for a non-loopback address with no tokens (logged);
 * CAP_ENOTFOUND / -errno if the tokens file cannot be read; CAP_EINVAL if it holds no token;
 * -errno from bind/listen (e.g. -EADDRINUSE).
 */
int srv_server_open(uv_loop_t *loop, const srv_config_t *cfg, srv_server_t **out);

/* Adds a route. `pattern` starts with '/', segments "{name}" capture one path segment.
 * `method` is "GET", "POST", "DELETE", ... Strings are copied. Returns 0 or CAP_EINVAL. */
int srv_server_route(srv_server_t *srv, const char *method, const char *pattern, unsigned flags,
                     srv_handler_fn fn, void *arg);

/* The bound port (useful after listening on port 0). */
int srv_server_port(const srv_server_t *srv);

/* Whether tokens are required on this server. */
int srv_server_auth_required(const srv_server_t *srv);

/* Checks a bare bearer token (not a header value) against the server's token set, for protocols
 * that carry it in the body (the Resonate envelope's head.auth). Returns 0 and the principal
 * (borrowed, as srv_req_principal's) or CAP_EINVAL (unknown, empty or longer than 4 KiB). */
int srv_server_auth_token(const srv_server_t *srv, const char *token, const char **principal);

/* Stops accepting new connections (graceful shutdown, first step); existing ones continue.
 * Idle keep-alive connections are closed; busy ones are closed after their current answer. */
void srv_server_stop_accepting(srv_server_t *srv);

/* Number of open connections (HTTP and WebSocket). */
uint32_t srv_server_conn_count(const srv_server_t *srv);

/* Counters since open, for metrics. */
typedef struct srv_stats {
    uint64_t conns_accepted, conns_rejected; /* rejected: over max_conns (503) */
    uint64_t requests, responses_2xx, responses_4xx, responses_5xx;
    uint64_t ws_sessions, ws_msgs_in, ws_msgs_out;
    uint32_t conns_open, ws_open;
} srv_stats_t;
void srv_server_stats(const srv_server_t *srv, srv_stats_t *out);

/*
 * Closes every connection (aborting pending requests; WebSocket sessions get close 1001, flushed,
 * then at most 1 s for the client to hang up) and the listener. The memory is released from libuv
 * close callbacks: run the loop until it has no more handles of this server.
 * srv_server_close(NULL) is a no-op.
 */
void srv_server_close(srv_server_t *srv);

/* ---- requests (all pointers returned are borrowed, valid while the request is) ---- */
const char *srv_req_method(const srv_req_t *req);
const char *srv_req_path(const srv_req_t *req);
/* The request id: the client's X-Request-Id if it is 1..64 of [A-Za-z0-9._-], else generated. */
const char *srv_req_id(const srv_req_t *req);
/* A "{name}" path parameter (percent-decoded), or NULL. */
const char *srv_req_param(const srv_req_t *req, const char *name);
/* A query parameter (percent-decoded; '+' is a space), or NULL. */
const char *srv_req_query(const srv_req_t *req, const char *name);
/* Replies 400 and returns CAP_EINVAL if the query holds a name not in the NULL-terminated list. */
int srv_req_query_check(srv_req_t *req, const char *const *allowed);
/* A header by case-insensitive name, or NULL. */
const char *srv_req_header(const srv_req_t *req, const char *name);
const uint8_t *srv_req_body(const srv_req_t *req, size_t *len);
/* The authenticated principal: "anonymous" when auth is off, else a stable id derived from the
 * token (hex of the first 8 bytes of its SHA-256), never the token itself. */
const char *srv_req_principal(const srv_req_t *req);
/* Attach application data / an abort callback (client gone before the answer). */
void srv_req_on_abort(srv_req_t *req, srv_abort_fn fn, void *arg);

/* ---- JSON ---- */
typedef enum {
    SRV_JANY = 0,
    SRV_JSTRING,
    SRV_JINT,
    SRV_JNUMBER,
    SRV_JBOOL,
    SRV_JOBJECT,
    SRV_JARRAY,
} srv_jtype_t;

/* One allowed member of a JSON object; a list ends with name == NULL. */
typedef struct srv_field {
    const char *name;
    srv_jtype_t type;
    int required;
} srv_field_t;

/*
 * Parses `len` bytes of JSON text (any top-level value) refusing nesting deeper than max_depth
 * (checked before jansson sees the text), duplicate keys, invalid UTF-8 and "\u0000".
 * Returns 0 and a new reference in *out; CAP_ETOOBIG (too deep) or CAP_EPROTO (malformed) with a
 * message in err (always NUL-terminated).
 */
int srv_json_parse(const char *text, size_t len, uint32_t max_depth, json_t **out, char *err,
                   size_t errlen);

/* Checks that `obj` is an object whose members all appear in `fields` with the right types and
 * that required ones are present. Returns 0 or CAP_EINVAL with a message in err. */
int srv_json_check(const json_t *obj, const srv_field_t *fields, char *err, size_t errlen);

/*
 * Parses the request body as a JSON object matching `fields` (an empty body counts as {}).
 * On failure it has already replied (415 not application/json, 400 malformed / too deep /
 * unknown or mistyped field) and returns a negative code; the handler just returns.
 * On success *out holds a new reference.
 */
int srv_req_json(srv_req_t *req, const srv_field_t *fields, json_t **out);

/* ---- answers ---- */
/* JSON reply; `body` is stolen (may be NULL for an empty 204). */
void srv_reply_json(srv_req_t *req, int status, json_t *body);
/* {"error":{"code":code,"message":...,"request_id":...}} with `status`. */
void srv_reply_error(srv_req_t *req, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Any bytes with a content type (e.g. the OpenAPI YAML/JSON, Prometheus text). Copied. */
void srv_reply_raw(srv_req_t *req, int status, const char *content_type, const void *data,
                   size_t len);
/* Adds a response header to the answer about to be sent (before srv_reply_* / srv_stream_start).
 * Name and value are copied; CR/LF in them is refused (CAP_EINVAL). */
int srv_req_add_header(srv_req_t *req, const char *name, const char *value);

typedef enum { SRV_STREAM_NDJSON = 1, SRV_STREAM_SSE = 2 } srv_stream_kind_t;
/* Starts a 200 chunked stream: application/x-ndjson (one JSON document per line) or
 * text/event-stream (each event "id:", "event:", "data:"). */
void srv_stream_start(srv_req_t *req, srv_stream_kind_t kind);
/* Sends one event. `ev` is stolen. `sse_event` names the SSE event (ignored for NDJSON) and
 * `sse_id` its id (or NULL). Returns 0, or CAP_ECLOSED if the client is gone (the abort callback
 * has then run or will run) or CAP_ELIMIT if it stopped reading (the connection is dropped). */
int srv_stream_send(srv_req_t *req, json_t *ev, const char *sse_event, const char *sse_id);
/* Ends the stream; the request is released. */
void srv_stream_end(srv_req_t *req);

/* ---- WebSocket ---- */
typedef struct srv_ws_callbacks {
    /* A complete text message that parsed as JSON (new reference; the callee owns it). Text that
     * is not JSON, too deep, or binary messages are answered by the library with
     * {"type":"error","error":{...}} and never reach the application. */
    void (*on_message)(srv_ws_t *ws, json_t *msg, void *arg);
    /* The session ended (either side, or server close). `ws` is freed after this returns. */
    void (*on_close)(srv_ws_t *ws, void *arg);
} srv_ws_callbacks_t;

/*
 * Completes a WebSocket handshake for `req` (which must be a GET with the RFC 6455 headers) and
 * turns its connection into a session. On success the request is released and *out is the
 * session (valid until on_close returns). On failure replies 400/426 and returns CAP_EPROTO.
 * `cb` is copied; `arg` is borrowed.
 */
int srv_ws_accept(srv_req_t *req, const srv_ws_callbacks_t *cb, void *arg, srv_ws_t **out);
/* Sends `msg` (stolen) as one text message. Returns 0, CAP_ECLOSED if the session is closing,
 * CAP_ELIMIT if the client stopped reading (the session is dropped). */
int srv_ws_send(srv_ws_t *ws, json_t *msg);
/* The same for a message already serialized: text[0..len) (borrowed), sent as it is: it must be
 * a JSON document in UTF-8 (what srv_ws_send would have made of it). Lets a caller encode a
 * message once for several sessions, or build a small fixed one without a json_t. */
int srv_ws_send_text(srv_ws_t *ws, const char *text, size_t len);
/* Starts the closing handshake with `code` (1000 normal, 1001 going away, 1008 policy...). */
void srv_ws_close(srv_ws_t *ws, uint16_t code, const char *reason);
const char *srv_ws_principal(const srv_ws_t *ws);
/* The id of the request that opened the session (for logs). */
const char *srv_ws_id(const srv_ws_t *ws);

#ifdef __cplusplus
}
#endif
#endif /* CAP_SRV_H */
