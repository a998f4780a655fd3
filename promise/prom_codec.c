/*
 * prom_codec.c - the byte format of a promise document and of an outbox message, and deep
 * copy/free of the public records.
 *
 * Document format (all integers little-endian; str = u32 length + bytes, no NUL):
 *   u8 version (PROM__CODEC_VERSION) | str id | u8 state | value param | value value |
 *   u32 ntags, ntags x (str key, str value) | i64 timeout_at | i64 created_at | i64 settled_at |
 *   u8 has_task | u8 task state | i64 version | i64 resumes | u8 has_pid [str pid] | i64 ttl |
 *   i64 task timer | u32 nawaiters, str... | u32 nlisteners, str...
 *   value = u32 nheaders, nheaders x (str key, str value) | str data
 * Message format: u8 version | u8 kind | i64 version | str address | str id.
 *
 * Invariant: the decoder checks every length against the bytes that remain and every enum
 * against its range before it trusts anything; trailing bytes are an error.
 */
#include <string.h>

#include "prom_int.h"

typedef struct buf {
    uint8_t *p;
    size_t len, cap;
} buf_t;

static void buf_need(buf_t *b, size_t n)
{
    if (b->len + n <= b->cap)
        return;
    size_t c = b->cap ? b->cap * 2 : 256;
    while (c < b->len + n)
        c *= 2;
    b->p = cap_realloc(b->p, c);
    b->cap = c;
}
static void put_u8(buf_t *b, uint8_t v)
{
    buf_need(b, 1);
    b->p[b->len++] = v;
}
static void put_u32(buf_t *b, uint32_t v)
{
    buf_need(b, 4);
    cap_put_le32(b->p + b->len, v);
    b->len += 4;
}
static void put_i64(buf_t *b, int64_t v)
{
    buf_need(b, 8);
    cap_put_le64(b->p + b->len, (uint64_t)v);
    b->len += 8;
}
static void put_bytes(buf_t *b, const void *p, size_t n)
{
    put_u32(b, (uint32_t)n);
    buf_need(b, n);
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
}
static void put_str(buf_t *b, const char *s)
{
    put_bytes(b, s, s ? strlen(s) : 0);
}
static void put_kvs(buf_t *b, const prom_kv_t *kv, size_t n)
{
    put_u32(b, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        put_str(b, kv[i].key);
        put_str(b, kv[i].value);
    }
}
static void put_value(buf_t *b, const prom_value_t *v)
{
    put_kvs(b, v->headers, v->nheaders);
    put_bytes(b, v->data, v->len);
}

void prom__doc_encode(const prom__doc_t *d, uint8_t **out, size_t *len)
{
    buf_t b = {0};
    put_u8(&b, PROM__CODEC_VERSION);
    put_str(&b, d->p.id);
    put_u8(&b, (uint8_t)d->p.state);
    put_value(&b, &d->p.param);
    put_value(&b, &d->p.value);
    put_kvs(&b, d->p.tags, d->p.ntags);
    put_i64(&b, d->p.timeout_at);
    put_i64(&b, d->p.created_at);
    put_i64(&b, d->p.settled_at);
    put_u8(&b, (uint8_t)d->has_task);
    put_u8(&b, (uint8_t)d->tstate);
    put_i64(&b, d->tversion);
    put_i64(&b, d->tresumes);
    put_u8(&b, d->tpid != NULL);
    if (d->tpid)
        put_str(&b, d->tpid);
    put_i64(&b, d->tttl);
    put_i64(&b, d->ttimer);
    put_u32(&b, (uint32_t)d->nawaiters);
    for (size_t i = 0; i < d->nawaiters; i++)
        put_str(&b, d->awaiters[i]);
    put_u32(&b, (uint32_t)d->nlisteners);
    for (size_t i = 0; i < d->nlisteners; i++)
        put_str(&b, d->listeners[i]);
    *out = b.p;
    *len = b.len;
}

typedef struct rd {
    const uint8_t *p;
    size_t left;
    int bad;
} rd_t;

static uint8_t get_u8(rd_t *r)
{
    if (r->bad || r->left < 1) {
        r->bad = 1;
        return 0;
    }
    r->left--;
    return *r->p++;
}
static uint32_t get_u32(rd_t *r)
{
    if (r->bad || r->left < 4) {
        r->bad = 1;
        return 0;
    }
    uint32_t v = cap_get_le32(r->p);
    r->p += 4;
    r->left -= 4;
    return v;
}
static int64_t get_i64(rd_t *r)
{
    if (r->bad || r->left < 8) {
        r->bad = 1;
        return 0;
    }
    uint64_t v = cap_get_le64(r->p);
    r->p += 8;
    r->left -= 8;
    return (int64_t)v;
}
/* A NUL-terminated copy (binary data too: the NUL is extra). */
static char *get_bytes(rd_t *r, size_t *len)
{
    uint32_t n = get_u32(r);
    if (r->bad || r->left < n) {
        r->bad = 1;
        if (len)
            *len = 0;
        return NULL;
    }
    char *s = cap_malloc((size_t)n + 1);
    memcpy(s, r->p, n);
    s[n] = 0;
    r->p += n;
    r->left -= n;
    if (len)
        *len = n;
    return s;
}
static char *get_str(rd_t *r)
{
    return get_bytes(r, NULL);
}
static size_t get_count(rd_t *r, size_t min_item)
{
    uint32_t n = get_u32(r);
    if (r->bad || (size_t)n * min_item > r->left) {
        r->bad = 1;
        return 0;
    }
    return n;
}
static void get_kvs(rd_t *r, prom_kv_t **kv, size_t *n)
{
    *n = get_count(r, 8);
    *kv = *n ? cap_calloc(*n, sizeof(prom_kv_t)) : NULL;
    for (size_t i = 0; i < *n; i++) {
        (*kv)[i].key = get_str(r);
        (*kv)[i].value = get_str(r);
        if (r->bad) {
            *n = i + 1;
            return;
        }
    }
}
static void get_value(rd_t *r, prom_value_t *v)
{
    get_kvs(r, &v->headers, &v->nheaders);
    v->data = get_bytes(r, &v->len);
}

int prom__doc_decode(const void *buf, size_t len, prom__doc_t **out)
{
    rd_t r = {buf, len, 0};
    prom__doc_t *d = cap_calloc(1, sizeof(*d));
    if (get_u8(&r) != PROM__CODEC_VERSION)
        r.bad = 1;
    d->p.id = get_str(&r);
    d->p.state = (prom_state_t)get_u8(&r);
    get_value(&r, &d->p.param);
    get_value(&r, &d->p.value);
    get_kvs(&r, &d->p.tags, &d->p.ntags);
    d->p.timeout_at = get_i64(&r);
    d->p.created_at = get_i64(&r);
    d->p.settled_at = get_i64(&r);
    d->has_task = get_u8(&r);
    d->tstate = (prom_task_state_t)get_u8(&r);
    d->tversion = get_i64(&r);
    d->tresumes = get_i64(&r);
    if (get_u8(&r))
        d->tpid = get_str(&r);
    d->tttl = get_i64(&r);
    d->ttimer = get_i64(&r);
    d->nawaiters = get_count(&r, 4);
    d->awaiters = d->nawaiters ? cap_calloc(d->nawaiters, sizeof(char *)) : NULL;
    for (size_t i = 0; i < d->nawaiters && !r.bad; i++)
        d->awaiters[i] = get_str(&r);
    d->nlisteners = get_count(&r, 4);
    d->listeners = d->nlisteners ? cap_calloc(d->nlisteners, sizeof(char *)) : NULL;
    for (size_t i = 0; i < d->nlisteners && !r.bad; i++)
        d->listeners[i] = get_str(&r);
    if (r.left != 0 || d->p.state > PROM_REJECTED_TIMEDOUT || d->tstate > PROM_TASK_FULFILLED ||
        d->has_task > 1 || !d->p.id || !d->p.id[0])
        r.bad = 1;
    if (r.bad) {
        prom__doc_free(d);
        return CAP_ECORRUPT;
    }
    *out = d;
    return 0;
}

void prom__kvs_copy(prom_kv_t **dst, size_t *ndst, const prom_kv_t *src, size_t n)
{
    *ndst = n;
    *dst = n ? cap_calloc(n, sizeof(prom_kv_t)) : NULL;
    for (size_t i = 0; i < n; i++) {
        (*dst)[i].key = cap_strdup(src[i].key ? src[i].key : "");
        (*dst)[i].value = cap_strdup(src[i].value ? src[i].value : "");
    }
}

void prom__kvs_free(prom_kv_t *kv, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        cap_free(kv[i].key);
        cap_free(kv[i].value);
    }
    cap_free(kv);
}

void prom__value_copy(prom_value_t *dst, const prom_value_t *src)
{
    memset(dst, 0, sizeof(*dst));
    if (!src)
        return;
    prom__kvs_copy(&dst->headers, &dst->nheaders, src->headers, src->nheaders);
    dst->len = src->len;
    dst->data = src->len ? cap_memdup(src->data, src->len) : NULL;
}

void prom__value_clear(prom_value_t *v)
{
    prom__kvs_free(v->headers, v->nheaders);
    cap_free(v->data);
    memset(v, 0, sizeof(*v));
}

void prom_promise_copy(prom_promise_t *dst, const prom_promise_t *src)
{
    *dst = *src;
    dst->id = cap_strdup(src->id);
    prom__value_copy(&dst->param, &src->param);
    prom__value_copy(&dst->value, &src->value);
    prom__kvs_copy(&dst->tags, &dst->ntags, src->tags, src->ntags);
}

void prom_promise_clear(prom_promise_t *p)
{
    if (!p)
        return;
    cap_free(p->id);
    prom__value_clear(&p->param);
    prom__value_clear(&p->value);
    prom__kvs_free(p->tags, p->ntags);
    memset(p, 0, sizeof(*p));
}

static char **strs_copy(char *const *src, size_t n)
{
    if (!n)
        return NULL;
    char **d = cap_calloc(n, sizeof(char *));
    for (size_t i = 0; i < n; i++)
        d[i] = cap_strdup(src[i]);
    return d;
}

static void strs_free(char **s, size_t n)
{
    for (size_t i = 0; s && i < n; i++)
        cap_free(s[i]);
    cap_free(s);
}

prom__doc_t *prom__doc_clone(const prom__doc_t *d)
{
    prom__doc_t *c = cap_malloc(sizeof(*c));
    *c = *d;
    prom_promise_copy(&c->p, &d->p);
    c->tpid = d->tpid ? cap_strdup(d->tpid) : NULL;
    c->awaiters = strs_copy(d->awaiters, d->nawaiters);
    c->listeners = strs_copy(d->listeners, d->nlisteners);
    c->enc = NULL;
    c->enclen = 0;
    return c;
}

void prom__doc_free(prom__doc_t *d)
{
    if (!d)
        return;
    prom_promise_clear(&d->p);
    cap_free(d->tpid);
    strs_free(d->awaiters, d->nawaiters);
    strs_free(d->listeners, d->nlisteners);
    cap_free(d->enc);
    cap_free(d);
}

void prom__msg_encode(const prom__msg_t *m, uint8_t **out, size_t *len)
{
    buf_t b = {0};
    put_u8(&b, PROM__CODEC_VERSION);
    put_u8(&b, (uint8_t)m->kind);
    put_i64(&b, m->version);
    put_str(&b, m->address);
    put_str(&b, m->id);
    *out = b.p;
    *len = b.len;
}

int prom__msg_decode(const void *buf, size_t len, uint64_t mid, prom__msg_t *out)
{
    rd_t r = {buf, len, 0};
    prom__msg_t m = {.mid = mid};
    if (get_u8(&r) != PROM__CODEC_VERSION)
        r.bad = 1;
    m.kind = get_u8(&r);
    m.version = get_i64(&r);
    m.address = get_str(&r);
    m.id = get_str(&r);
    if (r.left || (m.kind != PROM_MSG_EXECUTE && m.kind != PROM_MSG_UNBLOCK))
        r.bad = 1;
    if (r.bad) {
        prom__msg_clear(&m);
        return CAP_ECORRUPT;
    }
    *out = m;
    return 0;
}

void prom__msg_clear(prom__msg_t *m)
{
    cap_free(m->address);
    cap_free(m->id);
    m->address = m->id = NULL;
}

static size_t str_mem(const char *s)
{
    return s ? strlen(s) + 1 : 0;
}
static size_t kvs_mem(const prom_kv_t *kv, size_t n)
{
    size_t b = n * sizeof(*kv);
    for (size_t i = 0; i < n; i++)
        b += str_mem(kv[i].key) + str_mem(kv[i].value);
    return b;
}

size_t prom__doc_mem(const prom__doc_t *d)
{
    size_t b = sizeof(*d) + str_mem(d->p.id) + str_mem(d->tpid) + kvs_mem(d->p.tags, d->p.ntags) +
               kvs_mem(d->p.param.headers, d->p.param.nheaders) + d->p.param.len +
               kvs_mem(d->p.value.headers, d->p.value.nheaders) + d->p.value.len +
               (d->nawaiters + d->nlisteners) * sizeof(char *);
    for (size_t i = 0; i < d->nawaiters; i++)
        b += str_mem(d->awaiters[i]);
    for (size_t i = 0; i < d->nlisteners; i++)
        b += str_mem(d->listeners[i]);
    return b;
}
