/*
 * inspect.c - the read-only listings of capsule-replay: `export` (NDJSON of decoded log
 * records), `sessions`, `executions`, `promises` (tables or JSON lines, with filters) and `show`
 * (one session's timeline or one execution).
 *
 * Sources: the log for export; for the rest the materialised truth, prom.docs (promise
 * documents: sessions are capsule/s/<sid>, executions capsule/x/<eid>, input requests
 * capsule/x/<eid>/in/<k>) and the engine's tables (eng.results, eng.deltas, eng.ckpt, eng.base),
 * read in bounded snapshots (rp_walk). Stored bytes are decoded with the owners' strict codecs.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "capsule.h"
#include "eng_int.h"
#include "prom_int.h"
#include "replay.h"

/* ---------- JSON helpers ---------- */
static json_t *j_bytes(const void *p, size_t n)
{
    json_t *s = json_stringn(p ? p : "", n);
    if (s)
        return s;
    /* not UTF-8: hex */
    char *h = cap_malloc(2 * n + 1);
    for (size_t i = 0; i < n; i++)
        snprintf(h + 2 * i, 3, "%02x", ((const uint8_t *)p)[i]);
    json_t *o = json_pack("{s:s}", "hex", h);
    cap_free(h);
    return o;
}

static json_t *j_str(const char *s)
{
    return s ? j_bytes(s, strlen(s)) : json_null();
}

static json_t *j_kvs(const prom_kv_t *kv, size_t n)
{
    json_t *o = json_object();
    for (size_t i = 0; i < n; i++)
        json_object_set_new(o, kv[i].key, j_str(kv[i].value));
    return o;
}

static json_t *j_value(const prom_value_t *v)
{
    return json_pack("{s:o,s:o}", "headers", j_kvs(v->headers, v->nheaders), "data",
                     j_bytes(v->data, v->len));
}

static json_t *j_doc(const prom__doc_t *d)
{
    json_t *o = json_pack("{s:o,s:s,s:o,s:o,s:o,s:I,s:I,s:I}", "id", j_str(d->p.id), "state",
                          prom_state_name(d->p.state), "param", j_value(&d->p.param), "value",
                          j_value(&d->p.value), "tags", j_kvs(d->p.tags, d->p.ntags), "timeout_at",
                          (json_int_t)d->p.timeout_at, "created_at", (json_int_t)d->p.created_at,
                          "settled_at", (json_int_t)d->p.settled_at);
    if (d->has_task)
        json_object_set_new(
            o, "task",
            json_pack("{s:s,s:I,s:I,s:o,s:I,s:I}", "state", prom_task_state_name(d->tstate),
                      "version", (json_int_t)d->tversion, "resumes", (json_int_t)d->tresumes, "pid",
                      j_str(d->tpid), "ttl", (json_int_t)d->tttl, "timer", (json_int_t)d->ttimer));
    json_t *a = json_array(), *l = json_array();
    for (size_t i = 0; i < d->nawaiters; i++)
        json_array_append_new(a, j_str(d->awaiters[i]));
    for (size_t i = 0; i < d->nlisteners; i++)
        json_array_append_new(l, j_str(d->listeners[i]));
    json_object_set_new(o, "awaiters", a);
    json_object_set_new(o, "listeners", l);
    return o;
}

static const char *status_name(eng_status_t s)
{
    static const char *const n[] = {"ok", "error", "cancelled", "timeout", "died", "refused"};
    return (unsigned)s < 6 ? n[s] : "unknown";
}

static json_t *j_result(const eng_result_t *r)
{
    json_t *o =
        json_pack("{s:o,s:o,s:s,s:b,s:b,s:b,s:I}", "eid", j_str(r->eid), "sid", j_str(r->sid),
                  "status", status_name(r->status), "committed", r->committed, "restarted",
                  r->restarted, "truncated", r->truncated, "ordinal", (json_int_t)r->ordinal);
    if (r->status == ENG_ST_REFUSED)
        json_object_set_new(o, "err", json_string(cap_errname(r->err)));
    const struct {
        const char *k, *v;
    } f[] = {{"repr", r->repr},
             {"json", r->json},
             {"etype", r->etype},
             {"emsg", r->emsg},
             {"traceback", r->traceback},
             {"restore_failed", r->restore_failed},
             {"unrecorded", r->unrecorded}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].v)
            json_object_set_new(o, f[i].k, j_str(f[i].v));
    json_object_set_new(o, "output", j_bytes(r->output, r->output_len));
    return o;
}

static void j_print(json_t *o)
{
    char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    if (s)
        puts(s);
    free(s);
    json_decref(o);
}

/* ---------- export ---------- */
typedef struct exp {
    int kind;
    uint64_t n, bad;
    rp_progress_t pr;
} exp_t;

static json_t *j_fields_raw(const wal_entry_t *e)
{
    json_t *a = json_array();
    for (size_t i = 0; i < e->nfields; i++)
        json_array_append_new(a, json_pack("{s:i,s:I,s:o}", "tag", (int)e->fields[i].tag, "u",
                                           (json_int_t)e->fields[i].u, "data",
                                           j_bytes(e->fields[i].data, e->fields[i].len)));
    return a;
}

/* The decoded fields of a record of a known kind; NULL when they do not decode. */
static json_t *j_fields(const wal_entry_t *e)
{
    const wal_field_t *f1 = wal_entry_field(e, 1), *f2 = wal_entry_field(e, 2);
    switch (e->kind) {
    case PROM_REC_DOC: {
        prom__doc_t *d = NULL;
        if (!f1 || prom__doc_decode(f1->data, f1->len, &d))
            return NULL;
        json_t *o = json_pack("{s:o}", "document", j_doc(d));
        prom__doc_free(d);
        return o;
    }
    case PROM_REC_MSG_ADD: {
        prom__msg_t m = {0};
        if (!f1 || e->key_len != 8 || prom__msg_decode(f1->data, f1->len, cap_get_be64(e->key), &m))
            return NULL;
        json_t *o =
            json_pack("{s:I,s:i,s:o,s:o,s:I}", "mid", (json_int_t)m.mid, "kind", m.kind, "address",
                      j_str(m.address), "id", j_str(m.id), "version", (json_int_t)m.version);
        prom__msg_clear(&m);
        return o;
    }
    case PROM_REC_MSG_DEL:
        if (!f1 || !f2)
            return NULL;
        return json_pack("{s:I,s:I}", "first", (json_int_t)f1->u, "last", (json_int_t)f2->u);
    case ENG_REC_FINISH: {
        const wal_field_t *sid = wal_entry_field(e, ENG_F_SID);
        const wal_field_t *res = wal_entry_field(e, ENG_F_RESULT);
        const wal_field_t *ord = wal_entry_field(e, ENG_F_ORDINAL);
        const wal_field_t *delta = wal_entry_field(e, ENG_F_DELTA);
        eng_result_t *r = NULL;
        if (!sid || !res || !ord || eng__result_decode(res->data, res->len, &r))
            return NULL;
        json_t *o = json_pack("{s:o,s:I,s:I,s:o}", "sid", j_bytes(sid->data, sid->len), "ordinal",
                              (json_int_t)ord->u, "delta_bytes",
                              (json_int_t)(delta ? delta->len : 0), "result", j_result(r));
        eng_result_free(r);
        return o;
    }
    case ENG_REC_CHECKPOINT: {
        const wal_field_t *blob = wal_entry_field(e, ENG_C_BLOB);
        const wal_field_t *ord = wal_entry_field(e, ENG_C_ORDINAL);
        if (!blob || !ord)
            return NULL;
        return json_pack("{s:I,s:I}", "ordinal", (json_int_t)ord->u, "snapshot_bytes",
                         (json_int_t)blob->len);
    }
    case ENG_REC_SESSION: {
        const wal_field_t *par = wal_entry_field(e, ENG_S_PARENT);
        const wal_field_t *pord = wal_entry_field(e, ENG_S_PORD);
        if (!par || !pord)
            return NULL;
        return json_pack("{s:o,s:I}", "parent", j_bytes(par->data, par->len), "parent_ordinal",
                         (json_int_t)pord->u);
    }
    default:
        return json_pack("{s:o}", "raw", j_fields_raw(e));
    }
}

static int export_one(void *arg, store_txn_t *txn, int rc, const wal_entry_t *e, const char *why)
{
    (void)txn;
    exp_t *x = arg;
    rp_progress_step(&x->pr, 1);
    if (rc) {
        x->bad++;
        j_print(json_pack("{s:I,s:s}", "seq", (json_int_t)e->seq, "damaged", why));
        return 0;
    }
    if (x->kind && e->kind != x->kind)
        return 0;
    char kb[16];
    json_t *o =
        json_pack("{s:I,s:s,s:i,s:o}", "seq", (json_int_t)e->seq, "kind", rp_kind_name(e->kind, kb),
                  "kind_id", e->kind, "key", j_bytes(e->key, e->key_len));
    json_t *f = j_fields(e);
    if (f) {
        json_object_update(o, f);
        json_decref(f);
    } else {
        json_object_set_new(o, "undecodable", json_string("fields do not decode as this kind"));
        json_object_set_new(o, "raw", j_fields_raw(e));
        x->bad++;
    }
    j_print(o);
    x->n++;
    return 0;
}

int rp_cmd_export(int argc, char **argv)
{
    uint64_t from = 0, to = 0;
    int kind = 0;
    const char *dir = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--from") || !strcmp(a, "--to") || !strcmp(a, "--kind")) {
            if (i + 1 >= argc)
                return rp_usage_error("export", "%s needs a value", a);
            const char *val = argv[++i];
            if (!strcmp(a, "--kind")) {
                if ((kind = rp_kind_parse(val)) < 0)
                    return rp_usage_error("export", "unknown kind \"%s\"", val);
            } else if (rp_u64_parse(val, !strcmp(a, "--from") ? &from : &to)) {
                return rp_usage_error("export", "%s needs a sequence number, not \"%s\"", a, val);
            }
        } else if (a[0] == '-') {
            return rp_usage_error("export", "unknown option %s", a);
        } else if (dir) {
            return rp_usage_error("export", "one DIR only");
        } else {
            dir = a;
        }
    }
    if (!dir)
        return rp_usage_error("export", "DIR is missing");
    if (to && from > to)
        return rp_usage_error("export", "--from %" PRIu64 " is after --to %" PRIu64, from, to);
    rp_ctx_t c = {0};
    int status = rp_open(&c, dir, 0);
    if (status)
        return status;
    exp_t x = {.kind = kind};
    rp_progress_start(&x.pr, "export", 0);
    int rc = rp_log_walk(&c, from, to, RP_DECODE_ALL, export_one, &x);
    rp_progress_end(&x.pr);
    rp_close(&c);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read %s: %s\n", dir, cap_strerror(rc));
        return RP_EXIT_OPEN;
    }
    if (x.bad)
        fprintf(stderr, "capsule-replay export: %" PRIu64 " damaged or undecodable record(s)\n",
                x.bad);
    return x.bad ? RP_EXIT_PROBLEM : RP_EXIT_CLEAN;
}

/* ---------- list arguments ---------- */
typedef struct lopt {
    int json;
    const char *state, *session, *prefix, *dir, *target;
    int64_t since, until;
    uint64_t limit;
} lopt_t;

/* Parses [--json] [--state S] [--session SID] [--prefix P] [--since T] [--until T] [--limit N]
 * (those named in `allowed`) then DIR and, when want_target, one more name. */
static int lopt_parse(const char *cmd, int argc, char **argv, const char *allowed, int want_target,
                      lopt_t *o)
{
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-') {
            if (!o->dir)
                o->dir = a;
            else if (want_target && !o->target)
                o->target = a;
            else
                return rp_usage_error(cmd, "unexpected argument \"%s\"", a);
            continue;
        }
        if (!strstr(allowed, a) || strlen(a) < 3)
            return rp_usage_error(cmd, "unknown option %s", a);
        if (!strcmp(a, "--json")) {
            o->json = 1;
            continue;
        }
        if (i + 1 >= argc)
            return rp_usage_error(cmd, "%s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--state"))
            o->state = v;
        else if (!strcmp(a, "--session"))
            o->session = v;
        else if (!strcmp(a, "--prefix"))
            o->prefix = v;
        else if (!strcmp(a, "--limit")) {
            if (rp_u64_parse(v, &o->limit) || o->limit == 0)
                return rp_usage_error(cmd, "--limit needs a positive number, not \"%s\"", v);
        } else if (rp_time_parse(v, !strcmp(a, "--since") ? &o->since : &o->until))
            return rp_usage_error(cmd,
                                  "%s needs ms since the epoch or YYYY-MM-DD[THH:MM[:SS]]Z, "
                                  "not \"%s\"",
                                  a, v);
    }
    if (!o->dir)
        return rp_usage_error(cmd, "DIR is missing");
    if (want_target && !o->target)
        return rp_usage_error(cmd, "a SESSION or EXECUTION id is missing");
    return 0;
}

static int in_time(const lopt_t *o, int64_t t)
{
    return (!o->since || t >= o->since) && (!o->until || t <= o->until);
}

/* The highest ordinal stored under sid in an eng.deltas / eng.ckpt table (0 if none). */
static uint64_t last_ordinal(store_txn_t *txn, store_dbi_t dbi, const char *sid, size_t *count)
{
    size_t n = strlen(sid);
    uint8_t kb[ENG_MAX_ID + 16];
    memcpy(kb, sid, n);
    kb[n] = 0;
    cap_put_be64(kb + n + 1, 0);
    store_cursor_t *cur = NULL;
    store_val_t k = {kb, n + 9}, v;
    uint64_t last = 0;
    *count = 0;
    if (store_cursor_open(txn, dbi, &cur))
        return 0;
    for (int rc = store_cursor_get(cur, &k, &v, STORE_SET_RANGE); rc == 0;
         rc = store_cursor_get(cur, &k, &v, STORE_NEXT)) {
        if (k.len != n + 9 || memcmp(k.data, kb, n + 1) != 0)
            break;
        last = cap_get_be64((const uint8_t *)k.data + n + 1);
        (*count)++;
    }
    store_cursor_close(cur);
    return last;
}

static const char *hdr(const prom_value_t *v, const char *key)
{
    for (size_t i = 0; i < v->nheaders; i++)
        if (!strcmp(v->headers[i].key, key))
            return v->headers[i].value;
    return NULL;
}

/* ---------- promises / sessions ---------- */
typedef struct lwalk {
    rp_ctx_t *c;
    lopt_t *o;
    const char *prefix;
    uint64_t shown, bad;
} lwalk_t;

static int prefix_done(const lwalk_t *w, store_val_t k)
{
    size_t n = strlen(w->prefix);
    return k.len < n || memcmp(k.data, w->prefix, n) != 0;
}

static int promise_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    (void)txn;
    lwalk_t *w = arg;
    if (prefix_done(w, k))
        return 1;
    prom__doc_t *d = NULL;
    if (prom__doc_decode(v.data, v.len, &d)) {
        w->bad++;
        fprintf(stderr, "capsule-replay: prom.docs[%.*s] does not decode\n", (int)k.len,
                (const char *)k.data);
        return 0;
    }
    const char *st = prom_state_name(d->p.state);
    int match = in_time(w->o, d->p.created_at) &&
                (!w->o->state || !strncmp(st, w->o->state, strlen(w->o->state)));
    if (match) {
        char t1[32], t2[32];
        if (w->o->json)
            j_print(j_doc(d));
        else
            printf("%-40s %-18s %-24s %-24s %zu tag(s)%s\n", d->p.id, st,
                   rp_time_fmt(d->p.created_at, t1),
                   d->p.state ? rp_time_fmt(d->p.settled_at, t2) : "-", d->p.ntags,
                   d->has_task ? " +task" : "");
        w->shown++;
    }
    prom__doc_free(d);
    return w->o->limit && w->shown >= w->o->limit;
}

static int session_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    lwalk_t *w = arg;
    if (prefix_done(w, k))
        return 1;
    prom__doc_t *d = NULL;
    if (prom__doc_decode(v.data, v.len, &d)) {
        w->bad++;
        return 0;
    }
    const char *kind = prom_promise_tag(&d->p, "capsule:kind");
    const char *sid = d->p.id + strlen("capsule/s/");
    const char *st = d->p.state == PROM_PENDING ? "open" : "closed";
    if (!kind || strcmp(kind, "session") || !in_time(w->o, d->p.created_at) ||
        (w->o->state && strcmp(w->o->state, st))) {
        prom__doc_free(d);
        return 0;
    }
    size_t nd = 0, nc = 0;
    uint64_t ord =
        w->c->have[RP_T_DELTAS] ? last_ordinal(txn, w->c->dbi[RP_T_DELTAS], sid, &nd) : 0;
    uint64_t ck = w->c->have[RP_T_CKPT] ? last_ordinal(txn, w->c->dbi[RP_T_CKPT], sid, &nc) : 0;
    char parent[ENG_MAX_ID + 32] = "";
    store_val_t bv;
    if (w->c->have[RP_T_BASE] &&
        store_get(txn, w->c->dbi[RP_T_BASE], (store_val_t){(void *)sid, strlen(sid)}, &bv) == 0 &&
        bv.len >= 8)
        snprintf(parent, sizeof parent, "%.*s@%" PRIu64, (int)(bv.len - 8),
                 (const char *)bv.data + 8, cap_get_be64(bv.data));
    char t1[32], t2[32];
    if (w->o->json)
        j_print(json_pack("{s:o,s:s,s:I,s:I,s:I,s:I,s:I,s:o}", "session", j_str(sid), "state", st,
                          "created_at", (json_int_t)d->p.created_at, "closed_at",
                          (json_int_t)(d->p.state ? d->p.settled_at : 0), "committed",
                          (json_int_t)ord, "checkpoints", (json_int_t)nc, "last_checkpoint",
                          (json_int_t)ck, "fork_of", *parent ? json_string(parent) : json_null()));
    else
        printf("%-24s %-6s %-24s %-24s %9" PRIu64 " %5zu %9" PRIu64 " %s\n", sid, st,
               rp_time_fmt(d->p.created_at, t1),
               d->p.state ? rp_time_fmt(d->p.settled_at, t2) : "-", ord, nc, ck,
               *parent ? parent : "-");
    w->shown++;
    prom__doc_free(d);
    return w->o->limit && w->shown >= w->o->limit;
}

/* ---------- executions ---------- */
typedef struct xrow {
    prom__doc_t *d;
    eng_result_t *r;
    uint64_t ord;
    size_t inputs;
} xrow_t;

typedef struct xwalk {
    rp_ctx_t *c;
    lopt_t *o;
    const char *session; /* NULL = any */
    xrow_t *rows;
    size_t n, cap;
    uint64_t bad;
} xwalk_t;

static size_t inputs_count(store_txn_t *txn, rp_ctx_t *c, const char *pid)
{
    char pre[ENG_MAX_ID + 32];
    int n = snprintf(pre, sizeof pre, "%s/in/", pid);
    store_cursor_t *cur = NULL;
    store_val_t k = {pre, (size_t)n}, v;
    size_t cnt = 0;
    if (store_cursor_open(txn, c->dbi[RP_T_DOCS], &cur))
        return 0;
    for (int rc = store_cursor_get(cur, &k, &v, STORE_SET_RANGE);
         rc == 0 && k.len > (size_t)n && !memcmp(k.data, pre, (size_t)n);
         rc = store_cursor_get(cur, &k, &v, STORE_NEXT))
        cnt++;
    store_cursor_close(cur);
    return cnt;
}

static int exec_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    xwalk_t *w = arg;
    if (k.len < 10 || memcmp(k.data, "capsule/x/", 10))
        return 1;
    if (memchr((const char *)k.data + 10, '/', k.len - 10))
        return 0; /* an input request */
    prom__doc_t *d = NULL;
    if (prom__doc_decode(v.data, v.len, &d)) {
        w->bad++;
        return 0;
    }
    const char *kind = prom_promise_tag(&d->p, "capsule:kind");
    const char *sid = prom_promise_tag(&d->p, "capsule:session");
    if (!kind || strcmp(kind, "exec") || !sid || (w->session && strcmp(sid, w->session)) ||
        !in_time(w->o, d->p.created_at)) {
        prom__doc_free(d);
        return 0;
    }
    xrow_t x = {.d = d};
    const char *ord = hdr(&d->p.param, "capsule:ord");
    x.ord = ord ? strtoull(ord, NULL, 10) : 0;
    const char *eid = d->p.id + 10;
    store_val_t rv;
    if (w->c->have[RP_T_RESULTS] &&
        store_get(txn, w->c->dbi[RP_T_RESULTS], (store_val_t){(void *)eid, strlen(eid)}, &rv) ==
            0 &&
        eng__result_decode(rv.data, rv.len, &x.r)) {
        w->bad++;
        fprintf(stderr, "capsule-replay: eng.results[%s] does not decode\n", eid);
        x.r = NULL;
    }
    const char *st = x.r ? status_name(x.r->status) : "pending";
    if (w->o->state && strcmp(w->o->state, st) && !(x.r && !strcmp(w->o->state, "done"))) {
        eng_result_free(x.r);
        prom__doc_free(d);
        return 0;
    }
    x.inputs = inputs_count(txn, w->c, d->p.id);
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 64;
        w->rows = cap_realloc(w->rows, w->cap * sizeof *w->rows);
    }
    w->rows[w->n++] = x;
    return 0;
}

static int xrow_cmp(const void *a, const void *b)
{
    const xrow_t *x = a, *y = b;
    return x->ord < y->ord ? -1 : x->ord > y->ord;
}

static void xwalk_free(xwalk_t *w)
{
    for (size_t i = 0; i < w->n; i++) {
        prom__doc_free(w->rows[i].d);
        eng_result_free(w->rows[i].r);
    }
    cap_free(w->rows);
}

/* The first line of code, at most 40 bytes, for a table cell. */
static const char *code_head(const prom__doc_t *d, char buf[48])
{
    size_t n = 0;
    const char *p = d->p.param.data;
    while (n < d->p.param.len && n < 40 && p[n] != '\n')
        n++;
    snprintf(buf, 48, "%.*s%s", (int)n, p ? p : "", n < d->p.param.len ? "..." : "");
    return buf;
}

static json_t *j_exec(const xrow_t *x)
{
    json_t *o =
        json_pack("{s:o,s:o,s:I,s:s,s:I,s:I,s:I,s:o}", "execution", j_str(x->d->p.id + 10),
                  "session", j_str(prom_promise_tag(&x->d->p, "capsule:session")), "submitted",
                  (json_int_t)x->ord, "state", x->r ? status_name(x->r->status) : "pending",
                  "created_at", (json_int_t)x->d->p.created_at, "settled_at",
                  (json_int_t)(x->d->p.state ? x->d->p.settled_at : 0), "inputs",
                  (json_int_t)x->inputs, "code", j_bytes(x->d->p.param.data, x->d->p.param.len));
    if (x->r)
        json_object_set_new(o, "result", j_result(x->r));
    return o;
}

static void exec_print(const lopt_t *o, const xrow_t *x)
{
    char t1[32], cb[48];
    if (o->json) {
        j_print(j_exec(x));
        return;
    }
    char ordb[24] = "-";
    if (x->r && x->r->committed)
        snprintf(ordb, sizeof ordb, "%" PRIu64, x->r->ordinal);
    printf("%-28s %-16s %-9s %8s %s %2zu  %s\n", x->d->p.id + 10,
           prom_promise_tag(&x->d->p, "capsule:session"),
           x->r ? status_name(x->r->status) : "pending", ordb, rp_time_fmt(x->d->p.created_at, t1),
           x->inputs, code_head(x->d, cb));
}

static int exec_collect(rp_ctx_t *c, lopt_t *o, const char *session, xwalk_t *w)
{
    memset(w, 0, sizeof *w);
    w->c = c;
    w->o = o;
    w->session = session;
    int rc = rp_walk(c, RP_T_DOCS, "capsule/x/", 10, exec_one, w);
    if (rc == 0 && w->n)
        qsort(w->rows, w->n, sizeof *w->rows, xrow_cmp);
    return rc;
}

int rp_cmd_list(int argc, char **argv)
{
    const char *cmd = argv[0];
    lopt_t o;
    int is_exec = !strcmp(cmd, "executions"), is_sess = !strcmp(cmd, "sessions");
    int st = lopt_parse(cmd, argc, argv,
                        is_exec   ? "--json --state --session --since --until --limit"
                        : is_sess ? "--json --state --since --until --limit"
                                  : "--json --state --prefix --since --until --limit",
                        0, &o);
    if (st)
        return st;
    static const char *const states[][9] = {
        {"open", "closed"},
        {"pending", "done", "ok", "error", "cancelled", "timeout", "died", "refused"},
        {"pending", "resolved", "rejected"}};
    if (o.state) {
        int ok = 0;
        for (int i = 0; i < 9 && states[is_sess ? 0 : is_exec ? 1 : 2][i]; i++)
            ok |= !strcmp(o.state, states[is_sess ? 0 : is_exec ? 1 : 2][i]);
        if (!ok)
            return rp_usage_error(cmd, "unknown --state \"%s\"", o.state);
    }
    rp_ctx_t c = {0};
    if ((st = rp_open(&c, o.dir, 0)))
        return st;
    int rc = 0;
    uint64_t bad = 0;
    if (!c.have[RP_T_DOCS]) {
        fprintf(stderr, "capsule-replay: %s has no prom.docs table (not an engine's directory)\n",
                o.dir);
        rp_close(&c);
        return RP_EXIT_OPEN;
    }
    if (is_exec) {
        xwalk_t w;
        rc = exec_collect(&c, &o, o.session, &w);
        if (!o.json && rc == 0)
            printf("%-28s %-16s %-9s %8s %-24s %2s  %s\n", "EXECUTION", "SESSION", "STATE",
                   "ORDINAL", "CREATED", "IN", "CODE");
        for (size_t i = 0; rc == 0 && i < w.n && (!o.limit || i < o.limit); i++)
            exec_print(&o, &w.rows[i]);
        bad = w.bad;
        xwalk_free(&w);
    } else {
        lwalk_t w = {.c = &c, .o = &o, .prefix = is_sess ? "capsule/s/" : o.prefix ? o.prefix : ""};
        if (!o.json && is_sess)
            printf("%-24s %-6s %-24s %-24s %9s %5s %9s %s\n", "SESSION", "STATE", "CREATED",
                   "CLOSED", "COMMITTED", "CKPTS", "LAST_CKPT", "FORK_OF");
        else if (!o.json)
            printf("%-40s %-18s %-24s %-24s %s\n", "ID", "STATE", "CREATED", "SETTLED", "TAGS");
        rc = rp_walk(&c, RP_T_DOCS, w.prefix, strlen(w.prefix), is_sess ? session_one : promise_one,
                     &w);
        bad = w.bad;
    }
    rp_close(&c);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read %s: %s\n", o.dir, cap_strerror(rc));
        return RP_EXIT_OPEN;
    }
    return bad ? RP_EXIT_PROBLEM : RP_EXIT_CLEAN;
}

/* ---------- show ---------- */
typedef struct blobs {
    const char *pre;
    size_t pre_len, n, cap;
    uint64_t *ord;
    size_t *len;
} blobs_t;

/* Collects (ordinal, size) of the rows of eng.deltas / eng.ckpt under "sid\0". */
static int blob_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    (void)txn;
    blobs_t *b = arg;
    if (k.len != b->pre_len + 8 || memcmp(k.data, b->pre, b->pre_len))
        return 1;
    if (b->n == b->cap) {
        b->cap = b->cap ? 2 * b->cap : 64;
        b->ord = cap_realloc(b->ord, b->cap * sizeof *b->ord);
        b->len = cap_realloc(b->len, b->cap * sizeof *b->len);
    }
    b->ord[b->n] = cap_get_be64((const uint8_t *)k.data + b->pre_len);
    b->len[b->n++] = v.len;
    return 0;
}

static int blobs_read(rp_ctx_t *c, int t, const char *sid, blobs_t *b)
{
    memset(b, 0, sizeof *b);
    b->pre_len = strlen(sid) + 1;
    b->pre = sid; /* the NUL ends the prefix */
    int rc = rp_walk(c, t, sid, b->pre_len, blob_one, b);
    return rc == CAP_ENOTFOUND ? 0 : rc;
}

static void blobs_free(blobs_t *b)
{
    cap_free(b->ord);
    cap_free(b->len);
}

static size_t blob_size(const blobs_t *b, uint64_t ord)
{
    for (size_t i = 0; i < b->n; i++)
        if (b->ord[i] == ord)
            return b->len[i];
    return 0;
}

/* One document of prom.docs (copy decoded), or NULL. */
typedef struct docget {
    const char *id;
    prom__doc_t *d;
    char base[ENG_MAX_ID + 32];
} docget_t;

static int docget_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    docget_t *g = arg;
    if (k.len == strlen(g->id) && !memcmp(k.data, g->id, k.len))
        prom__doc_decode(v.data, v.len, &g->d);
    (void)txn;
    return 1;
}

static prom__doc_t *doc_get(rp_ctx_t *c, const char *id)
{
    docget_t g = {.id = id};
    rp_walk(c, RP_T_DOCS, id, strlen(id), docget_one, &g);
    return g.d;
}

static int base_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    docget_t *g = arg;
    (void)txn;
    if (k.len == strlen(g->id) && !memcmp(k.data, g->id, k.len) && v.len >= 8)
        snprintf(g->base, sizeof g->base, "%.*s@%" PRIu64, (int)(v.len - 8),
                 (const char *)v.data + 8, cap_get_be64(v.data));
    return 1;
}

static int show_session(rp_ctx_t *c, const lopt_t *o, const char *sid, prom__doc_t *sd)
{
    lopt_t none = {0};
    xwalk_t w;
    blobs_t deltas, ckpts;
    docget_t base = {.id = sid};
    int rc = exec_collect(c, &none, sid, &w);
    if (rc == 0)
        rc = blobs_read(c, RP_T_DELTAS, sid, &deltas);
    if (rc == 0)
        rc = blobs_read(c, RP_T_CKPT, sid, &ckpts);
    if (rc)
        return rc;
    if (c->have[RP_T_BASE])
        rp_walk(c, RP_T_BASE, sid, strlen(sid), base_one, &base);
    char t1[32];
    json_t *tl = json_array();
    if (!o->json) {
        printf("session %s: %s, created %s", sid, sd->p.state ? "closed" : "open",
               rp_time_fmt(sd->p.created_at, t1));
        if (sd->p.state)
            printf(", closed %s", rp_time_fmt(sd->p.settled_at, t1));
        printf("%s%s\n", *base.base ? ", fork of " : "", base.base);
        printf("%zu execution(s), %zu committed delta(s), %zu checkpoint(s)\n", w.n, deltas.n,
               ckpts.n);
        if (w.n)
            printf("\n%-24s %-28s %-9s %s\n", "TIME", "EVENT", "STATE", "DETAIL");
    }
    size_t ck = 0;
    for (size_t i = 0; i < w.n; i++) {
        const xrow_t *x = &w.rows[i];
        const eng_result_t *r = x->r;
        char detail[256] = "";
        size_t dl = 0;
        if (r && r->committed)
            dl += (size_t)snprintf(detail + dl, sizeof detail - dl, "delta #%" PRIu64 " (%zu B)",
                                   r->ordinal, blob_size(&deltas, r->ordinal));
        else if (r)
            dl += (size_t)snprintf(detail + dl, sizeof detail - dl, "not committed");
        if (x->inputs)
            dl += (size_t)snprintf(detail + dl, sizeof detail - dl, ", %zu input(s)", x->inputs);
        if (r && r->restarted)
            dl +=
                (size_t)snprintf(detail + dl, sizeof detail - dl, ", re-run after an engine crash");
        if (r && r->status == ENG_ST_DIED)
            dl += (size_t)snprintf(detail + dl, sizeof detail - dl,
                                   ", worker died (%s); namespace restored from the log",
                                   r->emsg ? r->emsg : "?");
        if (r && r->status == ENG_ST_ERROR)
            dl += (size_t)snprintf(detail + dl, sizeof detail - dl, ", %s",
                                   r->etype ? r->etype : "error");
        if (r && r->restore_failed)
            snprintf(detail + dl, sizeof detail - dl, ", restore failed: %s", r->restore_failed);
        if (o->json) {
            json_t *ev = j_exec(x);
            json_object_set_new(ev, "event", json_string("execution"));
            if (r && r->committed)
                json_object_set_new(ev, "delta_bytes",
                                    json_integer((json_int_t)blob_size(&deltas, r->ordinal)));
            json_array_append_new(tl, ev);
        } else {
            printf("%-24s %-28s %-9s %s\n", rp_time_fmt(x->d->p.created_at, t1), x->d->p.id + 10,
                   r ? status_name(r->status) : "pending", detail);
        }
        /* checkpoints taken right after this ordinal */
        for (; r && r->committed && ck < ckpts.n && ckpts.ord[ck] <= r->ordinal; ck++) {
            if (o->json)
                json_array_append_new(tl, json_pack("{s:s,s:I,s:I}", "event", "checkpoint",
                                                    "ordinal", (json_int_t)ckpts.ord[ck], "bytes",
                                                    (json_int_t)ckpts.len[ck]));
            else
                printf("%-24s %-28s %-9s after delta #%" PRIu64 " (%zu B)\n", "", "checkpoint", "",
                       ckpts.ord[ck], ckpts.len[ck]);
        }
    }
    if (o->json)
        j_print(
            json_pack("{s:o,s:s,s:I,s:I,s:o,s:I,s:I,s:o}", "session", j_str(sid), "state",
                      sd->p.state ? "closed" : "open", "created_at", (json_int_t)sd->p.created_at,
                      "closed_at", (json_int_t)(sd->p.state ? sd->p.settled_at : 0), "fork_of",
                      *base.base ? json_string(base.base) : json_null(), "deltas",
                      (json_int_t)deltas.n, "checkpoints", (json_int_t)ckpts.n, "timeline", tl));
    else
        json_decref(tl);
    xwalk_free(&w);
    blobs_free(&deltas);
    blobs_free(&ckpts);
    return 0;
}

typedef struct inputs {
    const char *pre;
    size_t pre_len, n;
    prom__doc_t **d;
} inputs_t;

static int input_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    (void)txn;
    inputs_t *in = arg;
    if (k.len <= in->pre_len || memcmp(k.data, in->pre, in->pre_len))
        return 1;
    prom__doc_t *d = NULL;
    if (prom__doc_decode(v.data, v.len, &d) == 0) {
        in->d = cap_realloc(in->d, (in->n + 1) * sizeof *in->d);
        in->d[in->n++] = d;
    }
    return 0;
}

static uint64_t input_k(const prom__doc_t *d)
{
    const char *s = strrchr(d->p.id, '/');
    return s ? strtoull(s + 1, NULL, 10) : 0;
}

static int input_cmp(const void *a, const void *b)
{
    uint64_t x = input_k(*(prom__doc_t *const *)a), y = input_k(*(prom__doc_t *const *)b);
    return x < y ? -1 : x > y;
}

static int show_exec(rp_ctx_t *c, const lopt_t *o, const char *eid, prom__doc_t *xd)
{
    char pre[ENG_MAX_ID + 32];
    snprintf(pre, sizeof pre, "capsule/x/%s/in/", eid);
    inputs_t in = {.pre = pre, .pre_len = strlen(pre)};
    int rc = rp_walk(c, RP_T_DOCS, pre, in.pre_len, input_one, &in);
    if (rc)
        return rc;
    if (in.n)
        qsort(in.d, in.n, sizeof *in.d, input_cmp);
    xrow_t x = {.d = xd, .inputs = in.n};
    const char *ord = hdr(&xd->p.param, "capsule:ord");
    x.ord = ord ? strtoull(ord, NULL, 10) : 0;
    /* the result, read in its own snapshot */
    store_txn_t *txn = NULL;
    store_val_t rv;
    if (c->have[RP_T_RESULTS] && store_txn_begin(c->env, 1, &txn) == 0) {
        if (store_get(txn, c->dbi[RP_T_RESULTS], (store_val_t){(void *)eid, strlen(eid)}, &rv) ==
                0 &&
            eng__result_decode(rv.data, rv.len, &x.r))
            fprintf(stderr, "capsule-replay: eng.results[%s] does not decode\n", eid);
        store_txn_abort(txn);
    }
    if (o->json) {
        json_t *j = j_exec(&x), *a = json_array();
        for (size_t i = 0; i < in.n; i++) {
            const prom__doc_t *d = in.d[i];
            json_array_append_new(
                a, json_pack("{s:I,s:o,s:s,s:o,s:b}", "k", (json_int_t)input_k(d), "prompt",
                             j_bytes(d->p.param.data, d->p.param.len), "state",
                             prom_state_name(d->p.state), "reply",
                             d->p.state ? j_bytes(d->p.value.data, d->p.value.len) : json_null(),
                             hdr(&d->p.value, "capsule:eof") != NULL));
        }
        json_object_set_new(j, "input_requests", a);
        j_print(j);
    } else {
        char t1[32];
        printf("execution %s (session %s, created %s)\n", eid,
               prom_promise_tag(&xd->p, "capsule:session"), rp_time_fmt(xd->p.created_at, t1));
        printf("--- code\n%.*s\n", (int)xd->p.param.len, (const char *)xd->p.param.data);
        for (size_t i = 0; i < in.n; i++) {
            const prom__doc_t *d = in.d[i];
            printf("--- input %" PRIu64 ": prompt \"%.*s\" -> ", input_k(d), (int)d->p.param.len,
                   (const char *)d->p.param.data);
            if (!d->p.state)
                printf("(no reply yet)\n");
            else if (hdr(&d->p.value, "capsule:eof"))
                printf("EOF\n");
            else
                printf("\"%.*s\"\n", (int)d->p.value.len, (const char *)d->p.value.data);
        }
        if (!x.r) {
            printf("--- no result recorded (pending, or interrupted: re-run at recovery)\n");
        } else {
            const eng_result_t *r = x.r;
            printf("--- output (%zu bytes%s)\n%.*s", r->output_len,
                   r->truncated ? ", truncated" : "", (int)r->output_len,
                   r->output ? r->output : "");
            if (r->output_len && r->output[r->output_len - 1] != '\n')
                printf("\n");
            printf("--- result: %s", status_name(r->status));
            if (r->committed)
                printf(", committed as delta #%" PRIu64, r->ordinal);
            else
                printf(", not committed");
            printf("%s\n", r->restarted ? ", re-run after an engine crash" : "");
            if (r->repr)
                printf("value: %s\n", r->repr);
            if (r->etype || r->emsg)
                printf("error: %s: %s\n", r->etype ? r->etype : "", r->emsg ? r->emsg : "");
            if (r->traceback)
                printf("%s", r->traceback);
            if (r->restore_failed)
                printf("restore failed: %s\n", r->restore_failed);
            if (r->unrecorded)
                printf("not recorded: %s\n", r->unrecorded);
        }
    }
    for (size_t i = 0; i < in.n; i++)
        prom__doc_free(in.d[i]);
    cap_free(in.d);
    eng_result_free(x.r);
    return 0;
}

int rp_cmd_show(int argc, char **argv)
{
    lopt_t o;
    int st = lopt_parse("show", argc, argv, "--json", 1, &o);
    if (st)
        return st;
    rp_ctx_t c = {0};
    if ((st = rp_open(&c, o.dir, 0)))
        return st;
    char id[ENG_MAX_ID + 32];
    int rc = 0;
    st = RP_EXIT_CLEAN;
    snprintf(id, sizeof id, "capsule/x/%s", o.target);
    prom__doc_t *d = c.have[RP_T_DOCS] ? doc_get(&c, id) : NULL;
    if (d) {
        rc = show_exec(&c, &o, o.target, d);
    } else {
        snprintf(id, sizeof id, "capsule/s/%s", o.target);
        d = c.have[RP_T_DOCS] ? doc_get(&c, id) : NULL;
        if (d) {
            rc = show_session(&c, &o, o.target, d);
        } else {
            fprintf(stderr, "capsule-replay show: no session or execution \"%s\" in %s\n", o.target,
                    o.dir);
            st = RP_EXIT_PROBLEM;
        }
    }
    prom__doc_free(d);
    rp_close(&c);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read %s: %s\n", o.dir, cap_strerror(rc));
        return RP_EXIT_OPEN;
    }
    return st;
}

/* ---------- for replay --rerun ---------- */

int rp_session_execs(rp_ctx_t *c, const char *sid, rp_exec_t **out, size_t *n)
{
    lopt_t none = {0};
    xwalk_t w;
    int rc = exec_collect(c, &none, sid, &w);
    *out = NULL;
    *n = 0;
    if (rc)
        return rc;
    rp_exec_t *x = cap_calloc(w.n ? w.n : 1, sizeof *x);
    for (size_t i = 0; i < w.n && rc == 0; i++) {
        const prom__doc_t *d = w.rows[i].d;
        x[i].eid = cap_strdup(d->p.id + 10);
        x[i].code = cap_memdup(d->p.param.data ? d->p.param.data : "", d->p.param.len + 1);
        x[i].code_len = d->p.param.len;
        x[i].r = w.rows[i].r;
        w.rows[i].r = NULL;
        char pre[ENG_MAX_ID + 32];
        snprintf(pre, sizeof pre, "%s/in/", d->p.id);
        inputs_t in = {.pre = pre, .pre_len = strlen(pre)};
        rc = rp_walk(c, RP_T_DOCS, pre, in.pre_len, input_one, &in);
        if (in.n)
            qsort(in.d, in.n, sizeof *in.d, input_cmp);
        x[i].inputs = cap_calloc(in.n ? in.n : 1, sizeof(char *));
        for (size_t k = 0; k < in.n; k++) {
            const prom__doc_t *q = in.d[k];
            if (q->p.state && !hdr(&q->p.value, "capsule:eof")) {
                x[i].inputs[k] = cap_malloc(q->p.value.len + 1);
                memcpy(x[i].inputs[k], q->p.value.data ? q->p.value.data : "", q->p.value.len);
                x[i].inputs[k][q->p.value.len] = 0;
            }
            prom__doc_free(in.d[k]);
        }
        x[i].ninputs = in.n;
        cap_free(in.d);
    }
    *out = x;
    *n = w.n;
    xwalk_free(&w);
    return rc;
}

void rp_session_execs_free(rp_exec_t *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        cap_free(x[i].eid);
        cap_free(x[i].code);
        eng_result_free(x[i].r);
        for (size_t k = 0; k < x[i].ninputs; k++)
            cap_free(x[i].inputs[k]);
        cap_free(x[i].inputs);
    }
    cap_free(x);
}
