/*
 * pyw_proto.c - frame and body codec of the worker protocol (layout in pyw_proto.h).
 *
 * Invariants: encoders only append to a pyw_buf; decoders check every length against the bytes
 * that remain before touching or allocating anything, and a failed reader stays failed.
 */
#include "pyw_proto.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cap.h"

void pyw__buf_init(pyw_buf_t *b)
{
    b->p = NULL;
    b->len = b->cap = 0;
}

void pyw__buf_free(pyw_buf_t *b)
{
    cap_free(b->p);
    pyw__buf_init(b);
}

static void buf_reserve(pyw_buf_t *b, size_t n)
{
    if (b->len + n <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n)
        cap *= 2;
    b->p = cap_realloc(b->p, cap);
    b->cap = cap;
}

static void buf_put(pyw_buf_t *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
}

void pyw__frame_begin(pyw_buf_t *b, uint8_t type, uint64_t id)
{
    uint8_t h[PYW_HDR_SIZE];
    cap_put_le32(h, 0);
    h[4] = type;
    cap_put_le64(h + 5, id);
    buf_put(b, h, sizeof h);
}

void pyw__frame_end(pyw_buf_t *b, size_t start)
{
    cap_put_le32(b->p + start, (uint32_t)(b->len - start - 4));
}

void pyw__put_raw(pyw_buf_t *b, const void *p, size_t n)
{
    buf_put(b, p, n);
}

void pyw__put_u8(pyw_buf_t *b, uint8_t v)
{
    buf_put(b, &v, 1);
}

void pyw__put_u32(pyw_buf_t *b, uint32_t v)
{
    uint8_t x[4];
    cap_put_le32(x, v);
    buf_put(b, x, 4);
}

void pyw__put_u64(pyw_buf_t *b, uint64_t v)
{
    uint8_t x[8];
    cap_put_le64(x, v);
    buf_put(b, x, 8);
}

void pyw__put_str(pyw_buf_t *b, const void *s, size_t n)
{
    pyw__put_u32(b, (uint32_t)n);
    buf_put(b, s, n);
}

void pyw__put_cstr(pyw_buf_t *b, const char *s)
{
    pyw__put_str(b, s ? s : "", s ? strlen(s) : 0);
}

void *pyw__memdup0(const void *p, size_t n)
{
    uint8_t *c = cap_malloc(n + 1);
    if (n)
        memcpy(c, p, n);
    c[n] = 0;
    return c;
}

void pyw__rd_init(pyw_rd_t *r, const void *body, size_t len)
{
    r->p = body;
    r->left = len;
    r->err = 0;
}

static int rd_take(pyw_rd_t *r, size_t n, const uint8_t **out)
{
    if (r->err || r->left < n) {
        r->err = CAP_EPROTO;
        return CAP_EPROTO;
    }
    *out = r->p;
    r->p += n;
    r->left -= n;
    return 0;
}

int pyw__get_u8(pyw_rd_t *r, uint8_t *out)
{
    const uint8_t *p;
    int rc = rd_take(r, 1, &p);
    if (rc == 0)
        *out = p[0];
    return rc;
}

int pyw__get_u32(pyw_rd_t *r, uint32_t *out)
{
    const uint8_t *p;
    int rc = rd_take(r, 4, &p);
    if (rc == 0)
        *out = cap_get_le32(p);
    return rc;
}

int pyw__get_u64(pyw_rd_t *r, uint64_t *out)
{
    const uint8_t *p;
    int rc = rd_take(r, 8, &p);
    if (rc == 0)
        *out = cap_get_le64(p);
    return rc;
}

int pyw__get_str(pyw_rd_t *r, const uint8_t **s, size_t *n)
{
    uint32_t len;
    const uint8_t *p;
    int rc = pyw__get_u32(r, &len);
    if (rc == 0)
        rc = rd_take(r, len, &p);
    if (rc == 0) {
        *s = p;
        *n = len;
    }
    return rc;
}

int pyw__get_strdup(pyw_rd_t *r, char **out)
{
    const uint8_t *s;
    size_t n;
    int rc = pyw__get_str(r, &s, &n);
    if (rc == 0) {
        char *c = cap_malloc(n + 1);
        memcpy(c, s, n);
        c[n] = 0;
        *out = c;
    }
    return rc;
}

void pyw__names_free(char **v, size_t n)
{
    if (!v)
        return;
    for (size_t i = 0; i < n; i++)
        cap_free(v[i]);
    cap_free(v);
}

static int get_list(pyw_rd_t *r, size_t per, char ***out, size_t *n)
{
    uint32_t count;
    int rc = pyw__get_u32(r, &count);
    char **v = NULL;
    size_t got = 0;
    if (rc)
        goto out;
    /* each str needs at least 4 bytes: reject impossible counts before allocating */
    if ((uint64_t)count * per * 4 > r->left) {
        r->err = rc = CAP_EPROTO;
        goto out;
    }
    v = cap_calloc((size_t)count * per + 1, sizeof *v);
    for (got = 0; got < (size_t)count * per; got++) {
        rc = pyw__get_strdup(r, &v[got]);
        if (rc)
            goto out;
    }
    *out = v;
    *n = count;
    v = NULL;
out:
    pyw__names_free(v, got);
    return rc;
}

int pyw__get_names(pyw_rd_t *r, char ***out, size_t *n)
{
    return get_list(r, 1, out, n);
}

int pyw__get_pairs(pyw_rd_t *r, char ***out, size_t *n)
{
    return get_list(r, 2, out, n);
}

int pyw__rd_end(pyw_rd_t *r)
{
    if (r->err || r->left != 0)
        return CAP_EPROTO;
    return 0;
}

int pyw__hdr_parse(const uint8_t hdr[PYW_HDR_SIZE], uint32_t max_frame, uint32_t *length,
                   uint8_t *type, uint64_t *id)
{
    uint32_t len = cap_get_le32(hdr);
    *length = len;
    if (len < PYW_MIN_LEN)
        return CAP_EPROTO;
    if (len > max_frame)
        return CAP_ETOOBIG;
    *type = hdr[4];
    *id = cap_get_le64(hdr + 5);
    return 0;
}

static int parse_u64(const char *s, size_t n, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;
    if (n == 0 || n > 20)
        return CAP_EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return CAP_EINVAL;
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (max - d) / 10)
            return CAP_EINVAL;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

int pyw__wopts_parse(const char *s, pyw_wopts_t *out)
{
    pyw_wopts_t o;
    int rc = 0;
    memset(&o, 0, sizeof o);
    while (*s) {
        const char *end = strchr(s, ',');
        size_t n = end ? (size_t)(end - s) : strlen(s);
        const char *eq = memchr(s, '=', n);
        if (!eq || eq == s) {
            rc = CAP_EINVAL;
            goto out;
        }
        size_t kn = (size_t)(eq - s), vn = n - kn - 1;
        const char *v = eq + 1;
        uint64_t x = 0;
#define KEY(k) (kn == sizeof(k) - 1 && memcmp(s, k, kn) == 0)
        if (KEY("cgroup")) {
            if (vn == 0 || vn >= sizeof o.cgroup || v[0] != '/') {
                rc = CAP_EINVAL;
                goto out;
            }
            memcpy(o.cgroup, v, vn);
            o.cgroup[vn] = 0;
        } else if (KEY("mem") || KEY("fsize")) {
            if ((rc = parse_u64(v, vn, UINT64_MAX, &x)))
                goto out;
            if (KEY("mem"))
                o.mem = x;
            else
                o.fsize = x;
        } else if (KEY("cpu") || KEY("nofile") || KEY("nproc") || KEY("maxframe")) {
            if ((rc = parse_u64(v, vn, UINT32_MAX, &x)))
                goto out;
            if (KEY("cpu"))
                o.cpu = (uint32_t)x;
            else if (KEY("nofile"))
                o.nofile = (uint32_t)x;
            else if (KEY("nproc"))
                o.nproc = (uint32_t)x;
            else
                o.max_frame = (uint32_t)x;
        } else {
            rc = CAP_EINVAL;
            goto out;
        }
#undef KEY
        s += n;
        if (*s == ',')
            s++;
    }
    *out = o;
out:
    return rc;
}

int pyw__wopts_format(const pyw_wopts_t *o, char *buf, size_t n)
{
    int k = snprintf(buf, n, "mem=%llu,cpu=%u,nofile=%u,fsize=%llu,nproc=%u,maxframe=%u%s%s",
                     (unsigned long long)o->mem, o->cpu, o->nofile, (unsigned long long)o->fsize,
                     o->nproc, o->max_frame, o->cgroup[0] ? ",cgroup=" : "", o->cgroup);
    if (k < 0 || (size_t)k >= n)
        return CAP_ETOOBIG;
    return 0;
}
