/*
 * eng_store.c - the engine's derived tables (eng.results, eng.deltas, eng.ckpt, eng.base), kept
 * by the wal apply callback in the same transaction as the engine's records, the codec of a
 * recorded result, and the reads a restore needs.
 *
 * Invariants:
 *   - Only eng__apply writes the tables, inside the group-commit transaction of the record it
 *     derives from; every put is an overwrite of the same bytes, so a re-run batch is harmless.
 *   - Nothing here trusts stored bytes: the result TLV decoder checks every length and tag.
 */
#include <stdlib.h>
#include <string.h>

#include "eng_int.h"

/* ---------- ids ---------- */
int eng__id_valid(const char *id)
{
    if (!id || !*id)
        return 0;
    size_t n = 0;
    for (const char *c = id; *c; c++, n++) {
        if (n >= ENG_MAX_ID)
            return 0;
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '.' || *c == '_' || *c == '-' || *c == ':'))
            return 0;
    }
    return 1;
}

/* ---------- tables ---------- */
static int tables_open_fn(store_txn_t *txn, void *arg)
{
    eng_tables_t *t = arg;
    int rc = store_dbi_open(txn, "eng.results", STORE_DB_CREATE, &t->results);
    if (!rc)
        rc = store_dbi_open(txn, "eng.deltas", STORE_DB_CREATE, &t->deltas);
    if (!rc)
        rc = store_dbi_open(txn, "eng.ckpt", STORE_DB_CREATE, &t->ckpt);
    if (!rc)
        rc = store_dbi_open(txn, "eng.base", STORE_DB_CREATE, &t->base);
    return rc;
}

int eng__tables_open(store_env_t *env, eng_tables_t *t)
{
    t->env = env;
    return store_env_write(env, tables_open_fn, t);
}

/* key = sid 0x00 BE64(ord); buf must hold ENG_MAX_ID + 9 bytes. */
static store_val_t ord_key(uint8_t *buf, const void *sid, size_t sid_len, uint64_t ord)
{
    memcpy(buf, sid, sid_len);
    buf[sid_len] = 0;
    cap_put_be64(buf + sid_len + 1, ord);
    store_val_t k = {buf, sid_len + 9};
    return k;
}

int eng__apply(void *arg, store_txn_t *txn, const wal_entry_t *e)
{
    eng_tables_t *t = arg;
    uint8_t kb[ENG_MAX_ID + 16];
    int rc = 0;
    if (e->kind == ENG_REC_FINISH) {
        const wal_field_t *sid = wal_entry_field(e, ENG_F_SID);
        const wal_field_t *res = wal_entry_field(e, ENG_F_RESULT);
        const wal_field_t *ord = wal_entry_field(e, ENG_F_ORDINAL);
        const wal_field_t *delta = wal_entry_field(e, ENG_F_DELTA);
        if (!sid || !res || !ord || sid->len == 0 || sid->len > ENG_MAX_ID)
            return CAP_ECORRUPT;
        store_val_t k = {e->key, e->key_len}, v = {res->data, res->len};
        rc = store_put(txn, t->results, k, v, 0);
        if (!rc && ord->u > 0) {
            store_val_t dk = ord_key(kb, sid->data, sid->len, ord->u);
            store_val_t dv = {delta ? delta->data : "", delta ? delta->len : 0};
            rc = store_put(txn, t->deltas, dk, dv, 0);
        }
    } else if (e->kind == ENG_REC_CHECKPOINT) {
        const wal_field_t *blob = wal_entry_field(e, ENG_C_BLOB);
        const wal_field_t *ord = wal_entry_field(e, ENG_C_ORDINAL);
        if (!blob || !ord || e->key_len == 0 || e->key_len > ENG_MAX_ID)
            return CAP_ECORRUPT;
        store_val_t k = ord_key(kb, e->key, e->key_len, ord->u), v = {blob->data, blob->len};
        rc = store_put(txn, t->ckpt, k, v, 0);
    } else if (e->kind == ENG_REC_SESSION) {
        const wal_field_t *par = wal_entry_field(e, ENG_S_PARENT);
        const wal_field_t *pord = wal_entry_field(e, ENG_S_PORD);
        if (!par || !pord || par->len > ENG_MAX_ID || e->key_len == 0)
            return CAP_ECORRUPT;
        uint8_t vb[ENG_MAX_ID + 8];
        cap_put_be64(vb, pord->u);
        memcpy(vb + 8, par->data, par->len);
        store_val_t k = {e->key, e->key_len}, v = {vb, 8 + par->len};
        rc = store_put(txn, t->base, k, v, 0);
    }
    return rc;
}

/* ---------- result codec ---------- */
enum {
    T_EID = 1,
    T_SID,
    T_STATUS,
    T_ERR,
    T_REPR,
    T_JSON,
    T_ETYPE,
    T_EMSG,
    T_TB,
    T_OUTPUT,
    T_FLAGS,
    T_ORDINAL,
    T_RFAILED,
    T_UNREC,
    T_LAST = T_UNREC
};

typedef struct buf {
    uint8_t *p;
    size_t n, cap;
} buf_t;

static void buf_put(buf_t *b, uint8_t tag, const void *data, size_t len)
{
    if (b->n + 5 + len > b->cap) {
        b->cap = (b->n + 5 + len) * 2 + 64;
        b->p = cap_realloc(b->p, b->cap);
    }
    b->p[b->n] = tag;
    cap_put_le32(b->p + b->n + 1, (uint32_t)len);
    if (len)
        memcpy(b->p + b->n + 5, data, len);
    b->n += 5 + len;
}

static void buf_str(buf_t *b, uint8_t tag, const char *s)
{
    if (s)
        buf_put(b, tag, s, strlen(s));
}

static void buf_u64(buf_t *b, uint8_t tag, uint64_t v)
{
    uint8_t x[8];
    cap_put_le64(x, v);
    buf_put(b, tag, x, 8);
}

void eng__result_encode(const eng_result_t *r, uint8_t **out, size_t *len)
{
    buf_t b = {0};
    buf_str(&b, T_EID, r->eid);
    buf_str(&b, T_SID, r->sid);
    buf_u64(&b, T_STATUS, (uint64_t)r->status);
    buf_u64(&b, T_ERR, (uint64_t)(int64_t)r->err);
    buf_str(&b, T_REPR, r->repr);
    buf_str(&b, T_JSON, r->json);
    buf_str(&b, T_ETYPE, r->etype);
    buf_str(&b, T_EMSG, r->emsg);
    buf_str(&b, T_TB, r->traceback);
    if (r->output)
        buf_put(&b, T_OUTPUT, r->output, r->output_len);
    buf_u64(&b, T_FLAGS,
            (uint64_t)((r->truncated ? 1 : 0) | (r->restarted ? 2 : 0) | (r->committed ? 4 : 0)));
    buf_u64(&b, T_ORDINAL, r->ordinal);
    buf_str(&b, T_RFAILED, r->restore_failed);
    buf_str(&b, T_UNREC, r->unrecorded);
    *out = b.p;
    *len = b.n;
}

static char *dupn(const uint8_t *p, size_t n)
{
    char *s = cap_malloc(n + 1);
    memcpy(s, p, n);
    s[n] = 0;
    return s;
}

int eng__result_decode(const void *data, size_t len, eng_result_t **out)
{
    const uint8_t *p = data;
    eng_result_t *r = cap_calloc(1, sizeof(*r));
    uint32_t seen = 0;
    int rc = 0;
    size_t off = 0;
    while (off < len) {
        if (len - off < 5) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        uint8_t tag = p[off];
        uint32_t n = cap_get_le32(p + off + 1);
        off += 5;
        if (n > len - off || tag == 0 || tag > T_LAST || (seen & (1u << tag))) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        seen |= 1u << tag;
        const uint8_t *v = p + off;
        off += n;
        int is_num = tag == T_STATUS || tag == T_ERR || tag == T_FLAGS || tag == T_ORDINAL;
        if (is_num && n != 8) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        /* strings must not hold NUL (output may: it is length-counted) */
        if (!is_num && tag != T_OUTPUT && memchr(v, 0, n)) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        uint64_t u = is_num ? cap_get_le64(v) : 0;
        switch (tag) {
        case T_EID:
            r->eid = dupn(v, n);
            break;
        case T_SID:
            r->sid = dupn(v, n);
            break;
        case T_STATUS:
            if (u > ENG_ST_REFUSED) {
                rc = CAP_ECORRUPT;
                goto out;
            }
            r->status = (eng_status_t)u;
            break;
        case T_ERR:
            r->err = (int)(int64_t)u;
            break;
        case T_REPR:
            r->repr = dupn(v, n);
            break;
        case T_JSON:
            r->json = dupn(v, n);
            break;
        case T_ETYPE:
            r->etype = dupn(v, n);
            break;
        case T_EMSG:
            r->emsg = dupn(v, n);
            break;
        case T_TB:
            r->traceback = dupn(v, n);
            break;
        case T_OUTPUT:
            r->output = dupn(v, n);
            r->output_len = n;
            break;
        case T_FLAGS:
            r->truncated = !!(u & 1);
            r->restarted = !!(u & 2);
            r->committed = !!(u & 4);
            break;
        case T_ORDINAL:
            r->ordinal = u;
            break;
        case T_RFAILED:
            r->restore_failed = dupn(v, n);
            break;
        case T_UNREC:
            r->unrecorded = dupn(v, n);
            break;
        }
    }
    if (!(seen & (1u << T_EID)) || !(seen & (1u << T_STATUS)))
        rc = CAP_ECORRUPT;
out:
    if (rc) {
        eng_result_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

eng_result_t *eng__result_dup(const eng_result_t *r)
{
    uint8_t *p;
    size_t n;
    eng_result_t *c = NULL;
    eng__result_encode(r, &p, &n);
    if (eng__result_decode(p, n, &c) != 0)
        cap_fatal("engine", "result codec failed its own round trip");
    cap_free(p);
    /* the stage times are not recorded (they describe this run, not the result) */
    c->t_request_ns = r->t_request_ns;
    c->t_run_ns = r->t_run_ns;
    c->t_finish_ns = r->t_finish_ns;
    return c;
}

void eng__result_clear(eng_result_t *r)
{
    cap_free(r->eid);
    cap_free(r->sid);
    cap_free(r->repr);
    cap_free(r->json);
    cap_free(r->etype);
    cap_free(r->emsg);
    cap_free(r->traceback);
    cap_free(r->output);
    cap_free(r->restore_failed);
    cap_free(r->unrecorded);
    memset(r, 0, sizeof(*r));
}

void eng_result_free(eng_result_t *r)
{
    if (!r)
        return;
    eng__result_clear(r);
    cap_free(r);
}

/* ---------- reads ---------- */
void eng__blobs_free(eng_blob_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        cap_free(b[i].p);
    cap_free(b);
}

int eng__result_read(eng_tables_t *t, const char *eid, eng_result_t **out)
{
    store_txn_t *txn = NULL;
    int rc = store_txn_begin(t->env, 1, &txn);
    if (rc)
        goto out;
    store_val_t k = {eid, strlen(eid)}, v;
    rc = store_get(txn, t->results, k, &v);
    if (rc)
        goto out;
    rc = eng__result_decode(v.data, v.len, out);
out:
    store_txn_abort(txn);
    return rc;
}

/* The greatest key of dbi with prefix sid\0 and ordinal <= upto: 0 and *ord, or CAP_ENOTFOUND. */
static int last_le(store_txn_t *txn, store_dbi_t dbi, const char *sid, uint64_t upto, uint64_t *ord,
                   store_val_t *val)
{
    store_cursor_t *cur = NULL;
    uint8_t kb[ENG_MAX_ID + 16];
    size_t sl = strlen(sid);
    int rc = store_cursor_open(txn, dbi, &cur);
    if (rc)
        goto out;
    store_val_t k = ord_key(kb, sid, sl, upto), v;
    rc = store_cursor_get(cur, &k, &v, STORE_SET_RANGE);
    if (rc == 0 && k.len == sl + 9 && memcmp(k.data, kb, sl + 9) == 0)
        goto found; /* exactly upto */
    if (rc == 0)
        rc = store_cursor_get(cur, &k, &v, STORE_PREV);
    else if (rc == CAP_ENOTFOUND)
        rc = store_cursor_get(cur, &k, &v, STORE_LAST);
    if (rc)
        goto out;
found:
    if (k.len != sl + 9 || memcmp(k.data, sid, sl) != 0 || ((const uint8_t *)k.data)[sl] != 0) {
        rc = CAP_ENOTFOUND;
        goto out;
    }
    *ord = cap_get_be64((const uint8_t *)k.data + sl + 1);
    if (val)
        *val = v;
out:
    store_cursor_close(cur);
    return rc;
}

int eng__last_ordinal(eng_tables_t *t, const char *sid, uint64_t *out)
{
    store_txn_t *txn = NULL;
    uint64_t o = 0;
    int rc = store_txn_begin(t->env, 1, &txn);
    if (rc)
        goto out;
    rc = last_le(txn, t->deltas, sid, UINT64_MAX, &o, NULL);
    if (rc == CAP_ENOTFOUND) {
        rc = 0;
        o = 0;
    }
    if (!rc)
        *out = o;
out:
    store_txn_abort(txn);
    return rc;
}

typedef struct blobv {
    eng_blob_t *b;
    size_t n, cap;
} blobv_t;

static void blobv_push(blobv_t *v, const void *p, size_t n)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 16;
        v->b = cap_realloc(v->b, v->cap * sizeof(*v->b));
    }
    v->b[v->n].p = cap_memdup(n ? p : "", n ? n : 1);
    v->b[v->n].n = n;
    v->n++;
}

static int chain(store_txn_t *txn, eng_tables_t *t, const char *sid, uint64_t upto, int depth,
                 blobv_t *v)
{
    uint8_t kb[ENG_MAX_ID + 16];
    store_cursor_t *cur = NULL;
    size_t sl = strlen(sid);
    uint64_t from = 1, c = 0;
    store_val_t cv;
    int rc;
    if (depth > ENG_MAX_FORK_DEPTH)
        return CAP_ELIMIT;
    rc = last_le(txn, t->ckpt, sid, upto, &c, &cv);
    if (rc == 0) {
        blobv_push(v, cv.data, cv.len);
        from = c + 1;
    } else if (rc == CAP_ENOTFOUND) {
        store_val_t k = {sid, sl}, bv;
        rc = store_get(txn, t->base, k, &bv);
        if (rc == 0) {
            if (bv.len < 9 || bv.len > 8 + ENG_MAX_ID)
                return CAP_ECORRUPT;
            char par[ENG_MAX_ID + 1];
            memcpy(par, (const uint8_t *)bv.data + 8, bv.len - 8);
            par[bv.len - 8] = 0;
            rc = chain(txn, t, par, cap_get_be64(bv.data), depth + 1, v);
            if (rc)
                return rc;
        } else if (rc != CAP_ENOTFOUND) {
            return rc;
        }
        rc = 0;
    } else {
        return rc;
    }
    rc = store_cursor_open(txn, t->deltas, &cur);
    if (rc)
        goto out;
    store_val_t k = ord_key(kb, sid, sl, from), dv;
    int r = store_cursor_get(cur, &k, &dv, STORE_SET_RANGE);
    while (r == 0) {
        if (k.len != sl + 9 || memcmp(k.data, kb, sl + 1) != 0)
            break;
        uint64_t o = cap_get_be64((const uint8_t *)k.data + sl + 1);
        if (o > upto)
            break;
        blobv_push(v, dv.data, dv.len);
        r = store_cursor_get(cur, &k, &dv, STORE_NEXT);
    }
    if (r != 0 && r != CAP_ENOTFOUND)
        rc = r;
out:
    store_cursor_close(cur);
    return rc;
}

int eng__chain_read(eng_tables_t *t, const char *sid, uint64_t upto, eng_blob_t **blobs, size_t *n)
{
    store_txn_t *txn = NULL;
    blobv_t v = {0};
    int rc = store_txn_begin(t->env, 1, &txn);
    if (rc)
        goto out;
    rc = chain(txn, t, sid, upto ? upto : UINT64_MAX, 0, &v);
out:
    store_txn_abort(txn);
    if (rc) {
        eng__blobs_free(v.b, v.n);
        return rc;
    }
    *blobs = v.b;
    *n = v.n;
    return 0;
}
