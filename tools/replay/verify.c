/*
 * verify.c - `capsule-replay verify [--deep] DIR`.
 *
 * Pass 1 walks wal.log in bounded snapshots: every frame is checked by the wal's validity rule
 * (length, header, checksum over key and body, stored under its own seq), sequence numbers must be
 * dense from the first stored to the last; --deep also decodes every body (tpl). The records
 * that feed derived tables (promise and engine kinds) are decoded and remembered as "table key ->
 * (last seq, hash of the value it wrote)" (or "deleted by seq", for outbox messages).
 * Pass 2 compares each remembered row with the table, in snapshots of RP_CHUNK rows; before a
 * mismatch is reported the log is read on to the end of that same snapshot (a live engine may
 * have written newer records since pass 1), so table and records are always compared in one
 * snapshot. Pass 3 (only when the log was never truncated: its first record is seq 1) walks each
 * table for rows that no record wrote.
 * prom.docs in the promise store's checkpoint mode lags the log up to prom.meta docs_seq:
 * documents whose last record is after docs_seq are not compared (counted as "not yet flushed").
 *
 * Invariants: never writes; every problem is named with its sequence number (rows no record
 * wrote, with their table key); exit 0 clean, 1 problems, 2 cannot open, 64 usage.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "capsule.h"
#include "eng_int.h"
#include "promise.h"
#include "replay.h"

#define MAX_LISTED 1000 /* problems printed one by one at most; the rest are counted */

/* ---------- remembered rows: (table, key) -> (seq, value hash, length) ---------- */
typedef struct row {
    uint64_t seq, hash;
    size_t vlen;
    int absent; /* the row must not exist (an outbox message deleted by seq) */
    size_t klen;
    uint8_t tab;
    uint8_t key[];
} row_t;

typedef struct rows {
    row_t **slot;
    size_t cap, n;
} rows_t;

static uint64_t row_hash(int tab, const void *k, size_t n)
{
    return cap_hash64(k, n) ^ ((uint64_t)tab * 0x9E3779B97F4A7C15ull);
}

static row_t **rows_find(rows_t *r, int tab, const void *k, size_t n)
{
    size_t mask = r->cap - 1, i = row_hash(tab, k, n) & mask;
    for (;; i = (i + 1) & mask) {
        row_t *x = r->slot[i];
        if (!x || (x->tab == tab && x->klen == n && memcmp(x->key, k, n) == 0))
            return &r->slot[i];
    }
}

static void rows_grow(rows_t *r)
{
    rows_t g = {cap_calloc(r->cap ? r->cap * 2 : 1024, sizeof(row_t *)), r->cap ? r->cap * 2 : 1024,
                r->n};
    for (size_t i = 0; i < r->cap; i++)
        if (r->slot[i])
            *rows_find(&g, r->slot[i]->tab, r->slot[i]->key, r->slot[i]->klen) = r->slot[i];
    cap_free(r->slot);
    *r = g;
}

static void rows_put(rows_t *r, int tab, const void *k, size_t n, uint64_t seq, const void *v,
                     size_t vlen, int absent)
{
    if (!r->cap)
        rows_grow(r);
    row_t **s = rows_find(r, tab, k, n);
    if (!*s) {
        if ((r->n + 1) * 4 >= r->cap * 3) {
            rows_grow(r);
            s = rows_find(r, tab, k, n);
        }
        *s = cap_malloc(sizeof(row_t) + n);
        (*s)->tab = (uint8_t)tab;
        (*s)->klen = n;
        memcpy((*s)->key, k, n);
        r->n++;
    }
    (*s)->seq = seq;
    (*s)->absent = absent;
    (*s)->vlen = vlen;
    (*s)->hash = absent ? 0 : cap_hash64(v, vlen);
}

static row_t *rows_get(rows_t *r, int tab, const void *k, size_t n)
{
    return r->cap ? *rows_find(r, tab, k, n) : NULL;
}

static void rows_free(rows_t *r)
{
    for (size_t i = 0; i < r->cap; i++)
        cap_free(r->slot[i]);
    cap_free(r->slot);
}

/* ---------- the state of a verify run ---------- */
typedef struct verify {
    rp_ctx_t *c;
    int deep;
    uint64_t records, bytes, problems, corrupt, gaps, derived_bad, unflushed;
    uint64_t first, last, prev;
    uint64_t per_kind[256];
    rows_t rows; /* pass 1's rows (pass 2 walks its slots: it never grows during pass 2) */
    rows_t late; /* rows first written by records appended during pass 2 (not compared) */
    int pass2;
    wal_scratch_t *scratch;
    rp_progress_t pr;
} verify_t;

static void problem(verify_t *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(verify_t *v, const char *fmt, ...)
{
    v->problems++;
    if (v->problems <= MAX_LISTED) {
        va_list ap;
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        putchar('\n');
    } else if (v->problems == MAX_LISTED + 1) {
        printf("(further problems counted, not listed)\n");
    }
}

/* A table key as text: ids as they are, deltas/ckpt keys as sid#ordinal, outbox keys as #id. */
static const char *key_fmt(int tab, const uint8_t *k, size_t n, char *buf, size_t cap)
{
    if (tab == RP_T_OUTBOX && n == 8) {
        snprintf(buf, cap, "#%" PRIu64, cap_get_be64(k));
        return buf;
    }
    size_t o = 0, idn = n;
    if ((tab == RP_T_DELTAS || tab == RP_T_CKPT) && n >= 9 && k[n - 9] == 0)
        idn = n - 9;
    for (size_t i = 0; i < idn && o + 5 < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, k[i] >= 0x20 && k[i] < 0x7F ? "%c" : "\\x%02x",
                              k[i]);
    if (idn != n && o + 22 < cap)
        snprintf(buf + o, cap - o, "#%" PRIu64, cap_get_be64(k + idn + 1));
    else
        buf[o] = 0;
    return buf;
}

/* Pass 1 adds rows; in pass 2 a row pass 1 did not see goes to `late` (no growth while pass 2
 * walks the slots). */
static void remember(verify_t *v, int tab, const void *k, size_t n, uint64_t seq, const void *val,
                     size_t vlen, int absent)
{
    rows_t *r = v->pass2 && !rows_get(&v->rows, tab, k, n) ? &v->late : &v->rows;
    rows_put(r, tab, k, n, seq, val, vlen, absent);
}

static int known(verify_t *v, int tab, const void *k, size_t n)
{
    return rows_get(&v->rows, tab, k, n) || rows_get(&v->late, tab, k, n);
}

/* Remembers the rows a decoded derived record writes (the apply callbacks' rules). */
static void derived_feed(verify_t *v, const wal_entry_t *e)
{
    rp_ctx_t *c = v->c;
    const wal_field_t *f1 = wal_entry_field(e, 1), *f2 = wal_entry_field(e, 2);
    uint8_t kb[ENG_MAX_ID + 16];
    int prom = e->kind >= PROM_REC_FIRST && e->kind <= PROM_REC_LAST;
    if (prom ? !c->have[RP_T_DOCS] && !c->have[RP_T_OUTBOX] : !c->have[RP_T_RESULTS])
        return; /* no table derives from this kind here (a log written without the engine) */
    switch (e->kind) {
    case PROM_REC_DOC:
        if (!f1 || !e->key_len)
            goto bad;
        if (c->have[RP_T_DOCS])
            remember(v, RP_T_DOCS, e->key, e->key_len, e->seq, f1->data, f1->len, 0);
        return;
    case PROM_REC_MSG_ADD:
        if (!f1 || e->key_len != 8)
            goto bad;
        if (c->have[RP_T_OUTBOX])
            remember(v, RP_T_OUTBOX, e->key, 8, e->seq, f1->data, f1->len, 0);
        return;
    case PROM_REC_MSG_DEL:
        if (!f1 || !f2 || f2->u < f1->u || f2->u - f1->u > (1u << 24))
            goto bad;
        for (uint64_t id = f1->u; c->have[RP_T_OUTBOX] && id <= f2->u; id++) {
            cap_put_be64(kb, id);
            if (known(v, RP_T_OUTBOX, kb, 8)) /* only messages this log added; older ones were
                                                 truncated with their adds */
                remember(v, RP_T_OUTBOX, kb, 8, e->seq, NULL, 0, 1);
        }
        return;
    case ENG_REC_FINISH: {
        const wal_field_t *sid = wal_entry_field(e, ENG_F_SID);
        const wal_field_t *res = wal_entry_field(e, ENG_F_RESULT);
        const wal_field_t *ord = wal_entry_field(e, ENG_F_ORDINAL);
        const wal_field_t *delta = wal_entry_field(e, ENG_F_DELTA);
        if (!sid || !res || !ord || sid->len == 0 || sid->len > ENG_MAX_ID || !e->key_len)
            goto bad;
        if (c->have[RP_T_RESULTS])
            remember(v, RP_T_RESULTS, e->key, e->key_len, e->seq, res->data, res->len, 0);
        if (ord->u > 0 && c->have[RP_T_DELTAS]) {
            memcpy(kb, sid->data, sid->len);
            kb[sid->len] = 0;
            cap_put_be64(kb + sid->len + 1, ord->u);
            remember(v, RP_T_DELTAS, kb, sid->len + 9, e->seq, delta ? delta->data : "",
                     delta ? delta->len : 0, 0);
        }
        return;
    }
    case ENG_REC_CHECKPOINT: {
        const wal_field_t *blob = wal_entry_field(e, ENG_C_BLOB);
        const wal_field_t *ord = wal_entry_field(e, ENG_C_ORDINAL);
        if (!blob || !ord || !e->key_len || e->key_len > ENG_MAX_ID)
            goto bad;
        memcpy(kb, e->key, e->key_len);
        kb[e->key_len] = 0;
        cap_put_be64(kb + e->key_len + 1, ord->u);
        if (c->have[RP_T_CKPT])
            remember(v, RP_T_CKPT, kb, e->key_len + 9, e->seq, blob->data, blob->len, 0);
        return;
    }
    case ENG_REC_SESSION: {
        const wal_field_t *par = wal_entry_field(e, ENG_S_PARENT);
        const wal_field_t *pord = wal_entry_field(e, ENG_S_PORD);
        if (!par || !pord || par->len > ENG_MAX_ID || !e->key_len)
            goto bad;
        uint8_t vb[ENG_MAX_ID + 8];
        cap_put_be64(vb, pord->u);
        memcpy(vb + 8, par->data, par->len);
        if (c->have[RP_T_BASE])
            remember(v, RP_T_BASE, e->key, e->key_len, e->seq, vb, 8 + par->len, 0);
        return;
    }
    default:
        return;
    }
bad:
    v->derived_bad++;
    problem(v, "seq %" PRIu64 ": %s record lacks the fields its table needs", e->seq,
            rp_kind_name(e->kind, (char[16]){0}));
}

/* One stored record (pass 1, and the catch-up of pass 2). */
static void record_check(verify_t *v, int rc, const wal_entry_t *e, const char *why)
{
    if (v->prev && e->seq > v->prev + 1) {
        v->gaps++;
        problem(v, "seq %" PRIu64 ": gap: %" PRIu64 " record(s) missing after seq %" PRIu64, e->seq,
                e->seq - v->prev - 1, v->prev);
    }
    if (!v->first)
        v->first = e->seq;
    v->prev = v->last = e->seq;
    v->records++;
    if (rc) {
        v->corrupt++;
        problem(v, "seq %" PRIu64 ": damaged record: %s", e->seq, why);
        return;
    }
    v->bytes += e->frame_len;
    v->per_kind[e->kind]++;
    if (rp_kind_derived(e->kind))
        derived_feed(v, e);
}

static int decode_mode(verify_t *v)
{
    if (v->deep)
        return RP_DECODE_ALL;
    for (int t = RP_T_DOCS; t < RP_T_N; t++)
        if (v->c->have[t] && t != RP_T_PMETA)
            return RP_DECODE_DERIVED;
    return RP_DECODE_NONE;
}

static int pass1_one(void *arg, store_txn_t *txn, int rc, const wal_entry_t *e, const char *why)
{
    (void)txn;
    verify_t *v = arg;
    if (v->prev && e->seq > v->prev + 1) { /* a gap, or the engine truncated the log meanwhile */
        uint64_t first, last, high;
        int r = rp_log_bounds(v->c, txn, &first, &last, &high);
        if (r)
            return r;
        if (first == e->seq)
            v->prev = 0;
    }
    record_check(v, rc, e, why);
    rp_progress_step(&v->pr, 1);
    return 0;
}

/* Reads the records appended after pass 1's last one, inside txn (pass 2's snapshot). */
static int catch_up(verify_t *v, store_txn_t *txn)
{
    store_cursor_t *cur = NULL;
    uint8_t kb[8];
    store_val_t k = store_key_u64(kb, v->last + 1), val;
    int rc = store_cursor_open(txn, v->c->dbi[RP_T_LOG], &cur);
    if (rc)
        return rc;
    for (rc = store_cursor_get(cur, &k, &val, STORE_SET_RANGE); rc == 0;
         rc = store_cursor_get(cur, &k, &val, STORE_NEXT)) {
        wal_entry_t e;
        const char *why;
        int r = rp_frame_decode(k, val, decode_mode(v), &v->scratch, &e, &why);
        record_check(v, r, &e, why);
    }
    store_cursor_close(cur);
    return rc == CAP_ENOTFOUND ? 0 : rc;
}

static uint64_t docs_seq_read(verify_t *v, store_txn_t *txn)
{
    store_val_t val;
    if (v->c->have[RP_T_PMETA] &&
        store_get(txn, v->c->dbi[RP_T_PMETA], (store_val_t){"docs_seq", 8}, &val) == 0 &&
        val.len == 8)
        return cap_get_be64(val.data);
    return 0;
}

/* 0 = the table agrees with the row, else a description of the disagreement. */
static const char *row_disagrees(verify_t *v, store_txn_t *txn, const row_t *r)
{
    store_val_t val;
    int rc = store_get(txn, v->c->dbi[r->tab], (store_val_t){(void *)r->key, r->klen}, &val);
    if (r->absent)
        return rc == 0 ? "still present though this record deleted it" : NULL;
    if (rc)
        return "missing";
    if (val.len != r->vlen || cap_hash64(val.data, val.len) != r->hash)
        return "differs from the record";
    return NULL;
}

/* Pass 2: every remembered row against its table, RP_CHUNK rows per snapshot. */
static int pass2(verify_t *v)
{
    int rc = 0;
    for (size_t i = 0; i < v->rows.cap && rc == 0;) {
        store_txn_t *txn = NULL;
        rc = store_txn_begin(v->c->env, 1, &txn);
        if (rc)
            break;
        uint64_t docs_seq = docs_seq_read(v, txn);
        int caught = 0;
        for (size_t n = 0; i < v->rows.cap && n < RP_CHUNK && rc == 0; i++) {
            row_t *r = v->rows.slot[i];
            if (!r)
                continue;
            n++;
            if (r->tab == RP_T_DOCS && r->seq > docs_seq) {
                v->unflushed++;
                continue;
            }
            const char *what = row_disagrees(v, txn, r);
            if (what && !caught) { /* the engine may have written on: read its newer records */
                caught = 1;
                rc = catch_up(v, txn);
                docs_seq = docs_seq_read(v, txn);
                if (r->tab == RP_T_DOCS && r->seq > docs_seq) {
                    v->unflushed++;
                    continue;
                }
                what = row_disagrees(v, txn, r);
            }
            if (what) {
                char kbuf[600];
                problem(v, "seq %" PRIu64 ": %s[%s] %s", r->seq, rp_table_names[r->tab],
                        key_fmt(r->tab, r->key, r->klen, kbuf, sizeof kbuf), what);
            }
        }
        store_txn_abort(txn);
    }
    return rc;
}

/* Pass 3: rows that no record wrote (only meaningful when the log was never truncated). */
typedef struct orphan {
    verify_t *v;
    int tab;
} orphan_t;

static int orphan_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t val)
{
    (void)val;
    orphan_t *o = arg;
    verify_t *v = o->v;
    if (!known(v, o->tab, k.data, k.len)) {
        int rc = catch_up(v, txn);
        if (rc)
            return rc;
    }
    if (!known(v, o->tab, k.data, k.len)) {
        char kbuf[600];
        problem(v, "seq -: %s[%s] has no record that wrote it", rp_table_names[o->tab],
                key_fmt(o->tab, k.data, k.len, kbuf, sizeof kbuf));
    }
    return 0;
}

int rp_cmd_verify(int argc, char **argv)
{
    int deep = 0;
    const char *dir = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--deep"))
            deep = 1;
        else if (argv[i][0] == '-')
            return rp_usage_error("verify", "unknown option %s", argv[i]);
        else if (dir)
            return rp_usage_error("verify", "one DIR only");
        else
            dir = argv[i];
    }
    if (!dir)
        return rp_usage_error("verify", "DIR is missing");
    rp_ctx_t c = {0};
    int status = rp_open(&c, dir, 0);
    if (status)
        return status;
    verify_t *v = cap_calloc(1, sizeof *v);
    v->c = &c;
    v->deep = deep;
    uint64_t t0 = cap_now_ns(), first = 0, last = 0, high = 0, last_start = 0;
    store_txn_t *txn = NULL;
    int rc = store_txn_begin(c.env, 1, &txn);
    if (rc == 0) {
        rc = rp_log_bounds(&c, txn, &first, &last_start, &high);
        store_txn_abort(txn);
    }
    rp_progress_start(&v->pr, "verify", first && last_start >= first ? last_start - first + 1 : 0);
    if (rc == 0)
        rc = rp_log_walk(&c, 0, 0, decode_mode(v), pass1_one, v);
    rp_progress_end(&v->pr);
    if (rc == 0) {
        rc = store_txn_begin(c.env, 1, &txn);
        if (rc == 0) {
            rc = rp_log_bounds(&c, txn, &first, &last, &high);
            store_txn_abort(txn);
        }
        if (rc == 0 && last && v->last < last_start)
            problem(v, "seq %" PRIu64 ": missing at the end: last stored record is seq %" PRIu64,
                    last_start, v->last);
    }
    v->pass2 = 1;
    if (rc == 0)
        rc = pass2(v);
    int truncated = first > 1 || (first == 0 && high > 0);
    for (int t = RP_T_DOCS; rc == 0 && !truncated && t < RP_T_N; t++) {
        if (t == RP_T_PMETA || !c.have[t])
            continue;
        orphan_t o = {v, t};
        rc = rp_walk(&c, t, NULL, 0, orphan_one, &o);
    }
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read %s: %s\n", dir, cap_strerror(rc));
        status = RP_EXIT_OPEN;
        goto out;
    }
    double secs = (double)(cap_now_ns() - t0) / 1e9;
    char kb[16];
    printf("log: %" PRIu64 " records (seq %" PRIu64 "..%" PRIu64 "), %" PRIu64 " bytes, %.3f s\n",
           v->records, v->first, v->last, v->bytes, secs);
    for (int k = 1; k < 256; k++)
        if (v->per_kind[k])
            printf("  kind 0x%02x %-15s %" PRIu64 "\n", k, rp_kind_name(k, kb), v->per_kind[k]);
    printf("damaged records: %" PRIu64 ", sequence gaps: %" PRIu64 "\n", v->corrupt, v->gaps);
    uint64_t pending = 0;
    if (wal_journal_pending(c.env, last > high ? last : high, &pending) != 0)
        problem(v, "%s/store.ckpt names a journal that cannot be read\n", dir);
    else if (pending)
        printf("%" PRIu64 " records in the journal not yet applied (the next engine open applies "
               "them)\n",
               pending);
    printf("bodies decoded: %s\n",
           deep ? "yes (--deep)" : "promise and engine kinds only (--deep decodes all)");
    int any = 0;
    for (int t = RP_T_DOCS; t < RP_T_N; t++)
        any |= t != RP_T_PMETA && c.have[t];
    if (!any)
        printf("derived tables: none in this directory (not an engine's)\n");
    else
        printf("derived tables: %zu rows cross-checked against their records%s; rows without a "
               "record: %s\n",
               v->rows.n, v->unflushed ? " (prom.docs rows after docs_seq skipped)" : "",
               truncated ? "not checked (the log was truncated)" : "checked");
    printf("%s: %" PRIu64 " problem(s)\n", v->problems ? "PROBLEMS" : "OK", v->problems);
    status = v->problems ? RP_EXIT_PROBLEM : RP_EXIT_CLEAN;
out:
    rows_free(&v->rows);
    rows_free(&v->late);
    wal_scratch_free(v->scratch);
    cap_free(v);
    rp_close(&c);
    return status;
}
