/*
 * httpparse.c - HTTP/1.1 request parsing: the only file that includes http_parser.h.
 *
 * Wraps one http_parser (requests only) and collects one request at a time into srv__hmsg_t.
 * Invariants:
 *   - the limits are enforced while bytes arrive, before anything is buffered beyond them: URL
 *     (414), header bytes and count (431), body (413; also refused from Content-Length alone,
 *     before the body is sent);
 *   - after a complete request the parser is paused, so bytes of a pipelined next request (or the
 *     frames after an Upgrade) are left to the caller unconsumed;
 *   - every error leaves a status and a message; the caller replies and closes.
 */
#include <ctype.h>
#include <string.h>
#include <strings.h>

#include <http_parser.h>

#include "cap.h"
#include "srv_int.h"

struct srv__hparser {
    http_parser p;
    http_parser_settings cb;
    srv_limits_t lim;
    srv__hmsg_t msg;
    size_t hdr_bytes;
    int in_value; /* last header callback was a value */
    int started, head_done, done;
    int status; /* error status set by a callback */
    char err[160];
};

static int hp_fail(srv__hparser_t *hp, int status, const char *msg)
{
    hp->status = status;
    snprintf(hp->err, sizeof(hp->err), "%s", msg);
    return -1;
}

static void append(char **dst, size_t *len, const char *at, size_t n)
{
    *dst = cap_realloc(*dst, *len + n + 1);
    memcpy(*dst + *len, at, n);
    *len += n;
    (*dst)[*len] = 0;
}

static int on_message_begin(http_parser *p)
{
    srv__hparser_t *hp = p->data;
    hp->started = 1;
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    srv__hparser_t *hp = p->data;
    hp->started = 1;
    if (hp->msg.url_len + n > hp->lim.max_url_bytes)
        return hp_fail(hp, 414, "request target longer than the limit");
    append(&hp->msg.url, &hp->msg.url_len, at, n);
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n)
{
    srv__hparser_t *hp = p->data;
    srv__hmsg_t *m = &hp->msg;
    hp->hdr_bytes += n;
    if (hp->hdr_bytes > hp->lim.max_header_bytes)
        return hp_fail(hp, 431, "request headers larger than the limit");
    if (m->nhdrs == 0 || hp->in_value) {
        if (m->nhdrs >= hp->lim.max_headers)
            return hp_fail(hp, 431, "more request headers than the limit");
        m->hdrs = cap_realloc(m->hdrs, (m->nhdrs + 1) * sizeof(*m->hdrs));
        m->hdrs[m->nhdrs].name = cap_strdup("");
        m->hdrs[m->nhdrs].value = cap_strdup("");
        m->nhdrs++;
        hp->in_value = 0;
    }
    srv__hdr_t *h = &m->hdrs[m->nhdrs - 1];
    size_t len = strlen(h->name);
    append(&h->name, &len, at, n);
    for (char *c = h->name; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t n)
{
    srv__hparser_t *hp = p->data;
    srv__hmsg_t *m = &hp->msg;
    hp->hdr_bytes += n;
    if (hp->hdr_bytes > hp->lim.max_header_bytes)
        return hp_fail(hp, 431, "request headers larger than the limit");
    if (m->nhdrs == 0)
        return hp_fail(hp, 400, "header value without a name");
    hp->in_value = 1;
    srv__hdr_t *h = &m->hdrs[m->nhdrs - 1];
    size_t len = strlen(h->value);
    if (memchr(at, 0, n))
        return hp_fail(hp, 400, "NUL byte in a header value");
    append(&h->value, &len, at, n);
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    srv__hparser_t *hp = p->data;
    srv__hmsg_t *m = &hp->msg;
    if (!m->url)
        return hp_fail(hp, 400, "empty request target");
    if (p->http_major != 1)
        return hp_fail(hp, 505, "only HTTP/1.0 and HTTP/1.1 are supported");
    snprintf(m->method, sizeof(m->method), "%s", http_method_str((enum http_method)p->method));
    m->keep_alive = http_should_keep_alive(p);
    m->upgrade = p->upgrade;
    m->http_minor = p->http_minor;
    for (uint32_t i = 0; i < m->nhdrs; i++) {
        if (strcmp(m->hdrs[i].name, "expect") == 0) {
            if (strcasecmp(m->hdrs[i].value, "100-continue") != 0)
                return hp_fail(hp, 417, "unsupported Expect header");
            m->expect_continue = 1;
        }
    }
    if ((p->flags & F_CONTENTLENGTH) && p->content_length != ULLONG_MAX &&
        p->content_length > hp->lim.max_body_bytes)
        return hp_fail(hp, 413, "request body larger than the limit");
    hp->head_done = 1;
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    srv__hparser_t *hp = p->data;
    srv__hmsg_t *m = &hp->msg;
    if (m->body_len + n > hp->lim.max_body_bytes)
        return hp_fail(hp, 413, "request body larger than the limit");
    if (m->body_len + n + 1 > m->body_cap) {
        m->body_cap = (m->body_len + n + 1) * 2;
        if (m->body_cap > (size_t)hp->lim.max_body_bytes + 1)
            m->body_cap = (size_t)hp->lim.max_body_bytes + 1;
        m->body = cap_realloc(m->body, m->body_cap);
    }
    memcpy(m->body + m->body_len, at, n);
    m->body_len += n;
    m->body[m->body_len] = 0;
    return 0;
}

static int on_message_complete(http_parser *p)
{
    srv__hparser_t *hp = p->data;
    hp->done = 1;
    http_parser_pause(p, 1);
    return 0;
}

void srv__hparser_new(const srv_limits_t *lim, srv__hparser_t **out)
{
    srv__hparser_t *hp = cap_calloc(1, sizeof(*hp));
    hp->lim = *lim;
    http_parser_init(&hp->p, HTTP_REQUEST);
    hp->p.data = hp;
    http_parser_settings_init(&hp->cb);
    hp->cb.on_message_begin = on_message_begin;
    hp->cb.on_url = on_url;
    hp->cb.on_header_field = on_header_field;
    hp->cb.on_header_value = on_header_value;
    hp->cb.on_headers_complete = on_headers_complete;
    hp->cb.on_body = on_body;
    hp->cb.on_message_complete = on_message_complete;
    *out = hp;
}

static void msg_clear(srv__hmsg_t *m)
{
    for (uint32_t i = 0; i < m->nhdrs; i++) {
        cap_free(m->hdrs[i].name);
        cap_free(m->hdrs[i].value);
    }
    cap_free(m->hdrs);
    cap_free(m->url);
    cap_free(m->body);
    memset(m, 0, sizeof(*m));
}

void srv__hparser_free(srv__hparser_t *hp)
{
    if (!hp)
        return;
    msg_clear(&hp->msg);
    cap_free(hp);
}

int srv__hparser_feed(srv__hparser_t *hp, const char *data, size_t len, size_t *used, int *status)
{
    *used = 0;
    *status = 0;
    if (hp->done)
        return SRV__HP_DONE;
    if (hp->status) {
        *status = hp->status;
        return SRV__HP_ERROR;
    }
    if (len == 0)
        return SRV__HP_MORE;
    if (!hp->started)
        hp->started = 1;
    size_t n = http_parser_execute(&hp->p, &hp->cb, data, len);
    enum http_errno e = HTTP_PARSER_ERRNO(&hp->p);
    *used = n;
    if (hp->status) { /* one of our limits */
        *status = hp->status;
        return SRV__HP_ERROR;
    }
    if (hp->done)
        return SRV__HP_DONE;
    if (e != HPE_OK && e != HPE_PAUSED) {
        int st = 400;
        if (e == HPE_HEADER_OVERFLOW)
            st = 431;
        else if (e == HPE_INVALID_METHOD)
            st = 400;
        hp_fail(hp, st, http_errno_description(e));
        snprintf(hp->err, sizeof(hp->err), "malformed HTTP request: %s (%s)",
                 http_errno_description(e), http_errno_name(e));
        *status = st;
        return SRV__HP_ERROR;
    }
    if (hp->p.upgrade && hp->head_done) {
        /* http_parser stops at the end of an upgrade request's head without a body callback. */
        hp->done = 1;
        return SRV__HP_DONE;
    }
    return SRV__HP_MORE;
}

int srv__hparser_started(const srv__hparser_t *hp)
{
    return hp->started;
}

int srv__hparser_head_done(const srv__hparser_t *hp)
{
    return hp->head_done;
}

srv__hmsg_t *srv__hparser_msg(srv__hparser_t *hp)
{
    return &hp->msg;
}

const char *srv__hparser_error(const srv__hparser_t *hp)
{
    return hp->err[0] ? hp->err : "malformed HTTP request";
}

void srv__hparser_next(srv__hparser_t *hp)
{
    msg_clear(&hp->msg);
    hp->hdr_bytes = 0;
    hp->in_value = 0;
    hp->started = hp->head_done = hp->done = 0;
    hp->status = 0;
    hp->err[0] = 0;
    /* A fresh parser state per request: simple, and nothing of a previous request leaks in. */
    http_parser_init(&hp->p, HTTP_REQUEST);
    hp->p.data = hp;
}
