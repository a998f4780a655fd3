/*
 * srv_int.h - internals shared by the files of capsule_http. Each third-party library stays in
 * one file: http_parser.h in httpparse.c, wslay.h in ws.c, libcrypto in crypto.c; server.c does
 * the libuv I/O and knows only these interfaces, which are pure (bytes in, bytes/events out) so
 * the fuzz driver can run them without sockets.
 */
#ifndef CAP_SRV_INT_H
#define CAP_SRV_INT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "srv.h"

/* ---- HTTP request parsing (httpparse.c) ---- */
typedef struct srv__hdr {
    char *name; /* lower-cased */
    char *value;
} srv__hdr_t;

/* One parsed request; owned by the parser, reset by srv__hparser_next. */
typedef struct srv__hmsg {
    char method[16];
    char *url; /* raw request target, NUL-terminated */
    size_t url_len;
    srv__hdr_t *hdrs;
    uint32_t nhdrs;
    uint8_t *body;
    size_t body_len, body_cap;
    int keep_alive;      /* HTTP/1.1 default or Connection: keep-alive */
    int upgrade;         /* Upgrade requested (bytes after the head are the new protocol's) */
    int expect_continue; /* Expect: 100-continue seen */
    int http_minor;
} srv__hmsg_t;

typedef struct srv__hparser srv__hparser_t;

enum {
    SRV__HP_MORE = 0, /* need more bytes */
    SRV__HP_DONE = 1, /* a full request is in srv__hparser_msg(); parsing is paused */
    SRV__HP_ERROR = 2 /* unrecoverable: *status and the message tell why; close after replying */
};

void srv__hparser_new(const srv_limits_t *lim, srv__hparser_t **out);
void srv__hparser_free(srv__hparser_t *p);
/* Feeds bytes. *used = how many were consumed (the rest belongs to the next request or, after an
 * upgrade, to the new protocol). Returns SRV__HP_*. On SRV__HP_ERROR, *status is 400/413/414/431
 * and srv__hparser_error() a message. */
int srv__hparser_feed(srv__hparser_t *p, const char *data, size_t len, size_t *used, int *status);
/* Whether the current request has started (any byte seen) and whether its head is complete. */
int srv__hparser_started(const srv__hparser_t *p);
int srv__hparser_head_done(const srv__hparser_t *p);
srv__hmsg_t *srv__hparser_msg(srv__hparser_t *p);
const char *srv__hparser_error(const srv__hparser_t *p);
/* Forgets the current request and unpauses for the next one. */
void srv__hparser_next(srv__hparser_t *p);

/* ---- WebSocket framing (ws.c) ---- */
typedef struct srv__wsproto srv__wsproto_t;
typedef struct srv__wsproto_cb {
    void (*on_text)(void *arg, const uint8_t *data, size_t len);
    void (*on_binary)(void *arg, size_t len);
    /* Bytes to put on the wire; must take all of them. */
    void (*write)(void *arg, const uint8_t *data, size_t len);
} srv__wsproto_cb_t;

void srv__wsproto_new(const srv_limits_t *lim, const srv__wsproto_cb_t *cb, void *arg,
                      srv__wsproto_t **out);
void srv__wsproto_free(srv__wsproto_t *ws);
/* Processes received bytes (all of them). Returns 0, or CAP_EPROTO when the peer broke the
 * protocol (a close frame is queued and written; the caller closes after flushing). */
int srv__wsproto_feed(srv__wsproto_t *ws, const uint8_t *data, size_t len);
/* Queues and writes a text message. Returns 0 or CAP_ECLOSED. */
int srv__wsproto_send_text(srv__wsproto_t *ws, const char *data, size_t len);
void srv__wsproto_close(srv__wsproto_t *ws, uint16_t code, const char *reason);
/* Nonzero once nothing more can be exchanged (close sent and received, or read side dead and
 * nothing queued): the caller closes the TCP connection. */
int srv__wsproto_done(const srv__wsproto_t *ws);
/* The close code sent by us (0 if none yet). */
uint16_t srv__wsproto_close_sent(const srv__wsproto_t *ws);

/* ---- crypto helpers (crypto.c, the only user of libcrypto) ---- */
/* Sec-WebSocket-Accept for a client key: base64(SHA1(key + GUID)), 28 chars + NUL. */
void srv__ws_accept_key(const char *key, char out[29]);
/* Whether `s` is the base64 of exactly 16 bytes. */
int srv__ws_key_valid(const char *s);
void srv__sha256(const void *data, size_t len, uint8_t out[32]);
/* Constant-time equality of n bytes. */
int srv__ct_equal(const void *a, const void *b, size_t n);
void srv__random(void *buf, size_t n);

/* ---- tokens (auth.c) ---- */
typedef struct srv__auth srv__auth_t;
/* Loads tokens from a file and/or a comma-separated list. Returns 0 (an empty set means auth
 * off), -errno if the file cannot be read, CAP_EINVAL if a file was given but holds no token. */
int srv__auth_open(const char *file, const char *list, srv__auth_t **out);
void srv__auth_close(srv__auth_t *a);
int srv__auth_enabled(const srv__auth_t *a);
/* Checks an Authorization header value. Returns 0 and the principal (borrowed, lives as long as
 * the auth object) or CAP_EINVAL (missing / malformed / unknown token). Constant time over the
 * token set. */
int srv__auth_check(const srv__auth_t *a, const char *authorization, const char **principal);

#endif /* CAP_SRV_INT_H */
