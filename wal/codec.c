/*
 * codec.c - the WAL frame codec: the only file in capsule that includes tpl.h and xxhash.h
 * (besides store/base/hash.c, see ARCHITECTURE.md). Format and validity rule: wal_format.h.
 *
 * Invariants:
 *   - tpl never sees a byte whose checksum has not been verified, and never a format other than
 *     WAL_BODY_FMT (tpl_peek first) nor an array count larger than the body could hold.
 *   - tpl's hooks are replaced once (pthread_once) before any tpl call: allocation through
 *     cap_malloc (abort on OOM), its messages to the debug log, and its fatal hook aborts with a
 *     log line instead of exit() (only a bug in this file could reach it).
 */
#include "wal_int.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <tpl.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

/* tpl.h does not declare the hook table that libtpl exports. */
extern tpl_hook_t tpl_hook;

struct wal_scratch {
    wal_field_t *fields;
    size_t cap;
    void **bufs; /* byte strings tpl_unpack allocated */
    size_t nbufs, bufcap;
};

static pthread_once_t wal__tpl_once = PTHREAD_ONCE_INIT;

static int wal__tpl_oops(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    cap_log(CAP_LOG_DEBUG, "wal", "tpl: %s", buf);
    return 0;
}

static void wal__tpl_fatal(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    cap_fatal("wal", "tpl fatal error (a bug in wal/codec.c): %s", buf);
}

static void wal__tpl_setup(void)
{
    tpl_hook.oops = wal__tpl_oops;
    tpl_hook.malloc = cap_malloc;
    tpl_hook.realloc = cap_realloc;
    tpl_hook.free = cap_free;
    tpl_hook.fatal = wal__tpl_fatal;
}

static void wal__tpl_init(void)
{
    pthread_once(&wal__tpl_once, wal__tpl_setup);
}

static uint64_t wal__seal_sum(const uint8_t *hdr, uint64_t body_hash)
{
    uint8_t c[32];
    memcpy(c, hdr, 24);
    cap_put_le64(c + 24, body_hash);
    return XXH3_64bits(c, sizeof(c));
}

int wal__frame_build(const wal_rec_t *rec, size_t max_bytes, uint8_t **frame, size_t *len)
{
    tpl_node *tn = NULL;
    uint8_t *buf = NULL;
    size_t body = 0, est;
    int rc = 0;

    if (!rec || rec->kind == 0 || rec->key_len > WAL_MAX_KEY || (rec->key_len && !rec->key) ||
        (rec->nfields && !rec->fields))
        return CAP_EINVAL;
    /* A cheap lower bound first, so a huge record is refused before it is packed. */
    est = WAL_FRAME_HDR + rec->key_len;
    for (size_t i = 0; i < rec->nfields; i++) {
        const wal_field_t *f = &rec->fields[i];
        if (f->len && !f->data)
            return CAP_EINVAL;
        if (f->len > UINT32_MAX)
            return CAP_ETOOBIG;
        est += WAL_MIN_FIELD_BYTES + f->len;
        if (est > max_bytes)
            return CAP_ETOOBIG;
    }
    if (est > max_bytes)
        return CAP_ETOOBIG;

    wal__tpl_init();
    uint32_t tag;
    uint64_t u;
    tpl_bin bin;
    tn = tpl_map(WAL_BODY_FMT, &tag, &u, &bin);
    if (!tn)
        cap_fatal("wal", "tpl_map(%s) failed", WAL_BODY_FMT);
    for (size_t i = 0; i < rec->nfields; i++) {
        const wal_field_t *f = &rec->fields[i];
        tag = f->tag;
        u = f->u;
        bin.addr = (void *)f->data; /* tpl_pack copies; never writes through addr */
        bin.sz = (uint32_t)f->len;
        if (tpl_pack(tn, 1) != 0)
            cap_fatal("wal", "tpl_pack failed");
    }
    if (tpl_dump(tn, TPL_GETSIZE, &body) != 0)
        cap_fatal("wal", "tpl_dump(TPL_GETSIZE) failed");
    if (body > UINT32_MAX || WAL_FRAME_HDR + rec->key_len + body > max_bytes) {
        rc = CAP_ETOOBIG;
        goto out;
    }
    size_t total = WAL_FRAME_HDR + rec->key_len + body;
    buf = cap_malloc(total);
    if (tpl_dump(tn, TPL_MEM | TPL_PREALLOCD, buf + WAL_FRAME_HDR + rec->key_len, body) != 0)
        cap_fatal("wal", "tpl_dump(TPL_MEM) failed");
    if (rec->key_len)
        memcpy(buf + WAL_FRAME_HDR, rec->key, rec->key_len);
    cap_put_le32(buf, WAL_FRAME_MAGIC);
    buf[4] = WAL_CODEC_VERSION;
    buf[5] = rec->kind;
    buf[6] = (uint8_t)rec->key_len;
    buf[7] = (uint8_t)(rec->key_len >> 8);
    cap_put_le64(buf + 8, 0);
    cap_put_le32(buf + 16, (uint32_t)body);
    cap_put_le32(buf + 20, 0);
    cap_put_le64(buf + 24, XXH3_64bits(buf + WAL_FRAME_HDR, total - WAL_FRAME_HDR));
    *frame = buf;
    *len = total;
    buf = NULL;
out:
    cap_free(buf);
    tpl_free(tn);
    return rc;
}

void wal__frame_seal(uint8_t *frame, uint64_t seq)
{
    uint64_t body_hash = cap_get_le64(frame + 24);
    cap_put_le64(frame + 8, seq);
    cap_put_le64(frame + 24, wal__seal_sum(frame, body_hash));
}

int wal_frame_encode(const wal_rec_t *rec, uint64_t seq, uint8_t **frame, size_t *len)
{
    int rc = wal__frame_build(rec, WAL_DEFAULT_MAX_RECORD, frame, len);
    if (rc == 0)
        wal__frame_seal(*frame, seq);
    return rc;
}

int wal__frame_peek_key(const void *frame, size_t len, const void **key, size_t *key_len)
{
    const uint8_t *p = frame;
    if (len < WAL_FRAME_HDR)
        return CAP_ECORRUPT;
    size_t kl = (size_t)p[6] | (size_t)p[7] << 8;
    if (kl > WAL_MAX_KEY || WAL_FRAME_HDR + kl > len)
        return CAP_ECORRUPT;
    *key = p + WAL_FRAME_HDR;
    *key_len = kl;
    return 0;
}

static void wal__scratch_reset(wal_scratch_t *s)
{
    for (size_t i = 0; i < s->nbufs; i++)
        cap_free(s->bufs[i]);
    s->nbufs = 0;
}

void wal_scratch_free(wal_scratch_t *s)
{
    if (!s)
        return;
    wal__scratch_reset(s);
    cap_free(s->bufs);
    cap_free(s->fields);
    cap_free(s);
}

/* Unpacks a verified body. */
static int wal__body_decode(const uint8_t *body, size_t body_len, wal_scratch_t *s, wal_entry_t *e,
                            const char **why)
{
    tpl_node *tn = NULL;
    char *fmt = NULL;
    int rc = CAP_ECORRUPT;

    wal__tpl_init();
    wal__scratch_reset(s);
    fmt = tpl_peek(TPL_MEM, (void *)body, body_len);
    if (!fmt || strcmp(fmt, WAL_BODY_FMT) != 0) {
        *why = "body is not a tpl image of format A(uUB)";
        goto out;
    }
    uint32_t tag = 0;
    uint64_t u = 0;
    tpl_bin bin = {NULL, 0};
    tn = tpl_map(WAL_BODY_FMT, &tag, &u, &bin);
    if (!tn)
        cap_fatal("wal", "tpl_map(%s) failed", WAL_BODY_FMT);
    if (tpl_load(tn, TPL_MEM, (void *)body, body_len) != 0) {
        *why = "tpl image does not load";
        goto out;
    }
    int count = tpl_Alen(tn, 1);
    if (count < 0 || (size_t)count > body_len / WAL_MIN_FIELD_BYTES) {
        *why = "field count larger than the body";
        goto out;
    }
    if ((size_t)count > s->cap) {
        s->cap = (size_t)count;
        s->fields = cap_realloc(s->fields, s->cap * sizeof(*s->fields));
    }
    if ((size_t)count > s->bufcap) {
        s->bufcap = (size_t)count;
        s->bufs = cap_realloc(s->bufs, s->bufcap * sizeof(*s->bufs));
    }
    size_t n = 0;
    while (n < (size_t)count) {
        bin.addr = NULL;
        bin.sz = 0;
        int r = tpl_unpack(tn, 1);
        if (r <= 0)
            break;
        if (bin.addr)
            s->bufs[s->nbufs++] = bin.addr;
        s->fields[n].tag = tag;
        s->fields[n].u = u;
        s->fields[n].data = bin.addr;
        s->fields[n].len = bin.sz;
        n++;
    }
    if (n != (size_t)count) {
        *why = "tpl array shorter than its count";
        goto out;
    }
    e->fields = n ? s->fields : NULL;
    e->nfields = n;
    rc = 0;
out:
    cap_free(fmt);
    if (tn) /* tpl_free(NULL) crashes */
        tpl_free(tn);
    return rc;
}

int wal__frame_decode(const void *frame, size_t len, int decode, wal_scratch_t **scratch,
                      wal_entry_t *e, const char **why)
{
    const uint8_t *p = frame;
    const char *reason = NULL;
    int rc = CAP_ECORRUPT;

    if (!p || len < WAL_FRAME_HDR) {
        reason = "frame shorter than its 32-byte header";
        goto out;
    }
    size_t kl = (size_t)p[6] | (size_t)p[7] << 8;
    size_t bl = cap_get_le32(p + 16);
    if (WAL_FRAME_HDR + kl + bl != len) {
        reason = "frame length does not match key_len + body_len";
        goto out;
    }
    if (cap_get_le32(p) != WAL_FRAME_MAGIC) {
        reason = "bad magic";
        goto out;
    }
    if (p[4] != WAL_CODEC_VERSION) {
        reason = "unknown codec version";
        goto out;
    }
    if (p[5] == 0 || kl > WAL_MAX_KEY || cap_get_le32(p + 20) != 0) {
        reason = "bad header field (kind, key_len or reserved)";
        goto out;
    }
    uint64_t body_hash = XXH3_64bits(p + WAL_FRAME_HDR, len - WAL_FRAME_HDR);
    if (wal__seal_sum(p, body_hash) != cap_get_le64(p + 24)) {
        reason = "checksum mismatch";
        goto out;
    }
    wal_entry_t out_e = {0};
    out_e.seq = cap_get_le64(p + 8);
    out_e.kind = p[5];
    out_e.key = kl ? p + WAL_FRAME_HDR : NULL;
    out_e.key_len = kl;
    out_e.frame_len = len;
    if (decode) {
        if (!scratch)
            return CAP_EINVAL;
        if (!*scratch)
            *scratch = cap_calloc(1, sizeof(**scratch));
        rc = wal__body_decode(p + WAL_FRAME_HDR + kl, bl, *scratch, &out_e, &reason);
        if (rc)
            goto out;
    }
    *e = out_e;
    rc = 0;
out:
    if (rc == CAP_ECORRUPT && why)
        *why = reason;
    return rc;
}

int wal_frame_decode(const void *frame, size_t len, int decode, wal_scratch_t **scratch,
                     wal_entry_t *e)
{
    return wal__frame_decode(frame, len, decode, scratch, e, NULL);
}

store_val_t wal__index_key(uint8_t buf[16], const void *key, size_t key_len, uint64_t seq)
{
    cap_put_be64(buf, XXH3_64bits(key, key_len));
    cap_put_be64(buf + 8, seq);
    store_val_t v = {buf, 16};
    return v;
}

const wal_field_t *wal_entry_field(const wal_entry_t *e, uint32_t tag)
{
    for (size_t i = 0; i < e->nfields; i++)
        if (e->fields[i].tag == tag)
            return &e->fields[i];
    return NULL;
}
