/*
 * promise.c - the promise store: the Resonate state machine, its durability on the wal, timers,
 * the outbox.
 *
 * How an operation runs: under s->mu it reads the in-memory documents, computes the transition
 * into a working set (an op context holding copies of the documents it changes and the messages
 * it queues), encodes every changed document as one PROM_REC_DOC record (plus message records)
 * and appends them all in ONE wal_log_append (so they commit atomically). Only when the append
 * was accepted are the copies installed in memory (so a refused append changes nothing). The
 * result is copied out while still under the mutex; then the mutex is released and the caller
 * waits until its records are durable. An op that changed nothing waits until every record this
 * store appended before it is durable (it may have read their effects).
 *
 * Invariants:
 *   - s->last_seq is the seq of the last record appended; s->durable_seq the highest seq known
 *     durable (done callbacks come in seq order, so everything below it is durable too).
 *   - No result leaves an operation before durable_seq >= every seq it could have observed.
 *   - The apply callback (writer thread) touches only its txn and the dbi handles, which are
 *     fixed after open; it never takes s->mu.
 *   - Timer heap entries are hints: an entry fires only if the document's current next deadline
 *     still equals it; every installed document with a deadline has an entry for it.
 *   - Materialise on touch: a mutating op that touches a pending promise past its deadline first
 *     writes its timeout (with all effects) in the same record batch; reads project instead.
 *   - prom.docs + prom.meta docs_seq = the state after exactly the records <= docs_seq, and
 *     docs_seq is durable before it is written (see "the checkpoint of prom.docs" below).
 */
#define _GNU_SOURCE /* pthread_setname_np */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "prom_int.h"

#define PROM_MAX_BATCH_DOCS 256

typedef prom__smap_t smap_t;
#define smap_get prom__smap_get
#define smap_put prom__smap_put

/* An id with the seq of the record that made it a candidate (eviction queue, branch entries not
 * yet in prom.branch). */
typedef struct seq_id {
    uint64_t seq;
    char *id;
    char *branch; /* branch entries only */
} seq_id_t;
typedef struct seq_fifo {
    seq_id_t *v;
    size_t head, len, cap;
} seq_fifo_t;

static void fifo_push(seq_fifo_t *q, uint64_t seq, const char *id, const char *branch)
{
    if (q->head + q->len == q->cap) {
        if (q->head > q->cap / 2) {
            memmove(q->v, q->v + q->head, q->len * sizeof(*q->v));
            q->head = 0;
        } else {
            q->cap = q->cap ? q->cap * 2 : 256;
            q->v = cap_realloc(q->v, q->cap * sizeof(*q->v));
        }
    }
    q->v[q->head + q->len++] = (seq_id_t){seq, cap_strdup(id), branch ? cap_strdup(branch) : NULL};
}
static void fifo_pop(seq_fifo_t *q)
{
    cap_free(q->v[q->head].id);
    cap_free(q->v[q->head].branch);
    q->head++;
    q->len--;
}
static void fifo_free(seq_fifo_t *q)
{
    while (q->len)
        fifo_pop(q);
    cap_free(q->v);
    memset(q, 0, sizeof(*q));
}

typedef struct theap_ent {
    int64_t at;
    char *id;
} theap_ent_t;

typedef struct prom__wait {
    prom_store_t *s;
    pthread_cond_t cv;
    int done;
    int status;
    size_t nrec;
    /* asynchronous ops: the completion (called once, then the wait is freed) */
    prom_done_fn fn;
    void *fnarg;
    uint64_t target;         /* wrote nothing: complete when durable_seq reaches this */
    struct prom__wait *next; /* s->seq_waiters */
    char **settled;          /* ids the op settled, for the on_settle observer */
    size_t nsettled;
} prom__wait_t;

struct prom_store {
    store_env_t *env;
    wal_log_t *wal;
    prom_opts_t opts;
    store_dbi_t dbi_docs, dbi_outbox, dbi_meta;
    store_dbi_t dbi_live;   /* id -> "": the documents that must be resident (pending) */
    store_dbi_t dbi_branch; /* DUPSORT BE64 hash(branch) -> id: every promise on a branch */

    pthread_mutex_t mu;   /* the state machine */
    smap_t docs;          /* id -> prom__doc_t*: the resident documents */
    seq_fifo_t evq;       /* settled documents, candidates for eviction, in install order */
    seq_fifo_t pbranch;   /* branch entries whose record is not yet in prom.branch */
    int load_err;         /* a document of prom.docs failed to read during the current op */
    size_t settled_cache; /* settled documents kept resident beyond the durable ones */
    prom_store_stats_t st;
    theap_ent_t *heap;
    size_t nheap, capheap;
    size_t narmed;     /* documents with a deadline */
    prom__msg_t *outq; /* FIFO of messages, [outhead, outlen) */
    size_t outhead, outlen, outcap;
    uint64_t next_mid;
    uint64_t last_seq;
    char **dirty; /* ids whose document changed since the last checkpoint */
    size_t ndirty, capdirty;
    pthread_t flusher;
    int flusher_on, closing;
    int track_dirty; /* checkpoint mode, or replaying at open */
    pthread_cond_t fcv;
    uint64_t flushed_seq; /* prom.docs reflects the log up to here */
    int flushing;         /* a checkpoint is being written (s->mu released meanwhile) */
    size_t flushing_n;    /* documents in it */
    pthread_cond_t fdone; /* flushing went back to 0 */

    pthread_mutex_t dmu; /* durability */
    pthread_cond_t dcv;
    uint64_t durable_seq;
    int nreaders;
    int failed;
    prom__wait_t *seq_waiters; /* async ops that wrote nothing, waiting for durable_seq */
};

/* ---------- clock ---------- */
int64_t prom_store_now(prom_store_t *s)
{
    return s->opts.clock ? s->opts.clock(s->opts.clock_arg) : cap_wall_ms();
}

/* ---------- names ---------- */
const char *prom_state_name(prom_state_t st)
{
    switch (st) {
    case PROM_PENDING:
        return "pending";
    case PROM_RESOLVED:
        return "resolved";
    case PROM_REJECTED:
        return "rejected";
    case PROM_REJECTED_CANCELED:
        return "rejected_canceled";
    case PROM_REJECTED_TIMEDOUT:
        return "rejected_timedout";
    }
    return "?";
}
const char *prom_task_state_name(prom_task_state_t st)
{
    switch (st) {
    case PROM_TASK_PENDING:
        return "pending";
    case PROM_TASK_ACQUIRED:
        return "acquired";
    case PROM_TASK_SUSPENDED:
        return "suspended";
    case PROM_TASK_HALTED:
        return "halted";
    case PROM_TASK_FULFILLED:
        return "fulfilled";
    }
    return "?";
}

const char *prom_promise_tag(const prom_promise_t *p, const char *key)
{
    for (size_t i = 0; i < p->ntags; i++)
        if (strcmp(p->tags[i].key, key) == 0)
            return p->tags[i].value;
    return NULL;
}
static const char *kvs_get(const prom_kv_t *kv, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (kv[i].key && strcmp(kv[i].key, key) == 0)
            return kv[i].value;
    return NULL;
}
static int tag_true(const prom_promise_t *p, const char *key)
{
    const char *v = prom_promise_tag(p, key);
    return v && strcmp(v, "true") == 0;
}
/* External promises are awaitable (resonate-protocol.md §2.6). */
static int doc_external(const prom__doc_t *d)
{
    const char *scope = prom_promise_tag(&d->p, "resonate:scope");
    return (scope && strcmp(scope, "global") == 0) || tag_true(&d->p, "resonate:external") ||
           d->has_task || prom_promise_tag(&d->p, "resonate:target") ||
           tag_true(&d->p, "resonate:timer");
}

void prom_result_clear(prom_result_t *res)
{
    if (!res)
        return;
    if (res->promise) {
        prom_promise_clear(res->promise);
        cap_free(res->promise);
    }
    if (res->task) {
        cap_free(res->task->id);
        cap_free(res->task->pid);
        cap_free(res->task);
    }
    for (size_t i = 0; i < res->npromises; i++)
        prom_promise_clear(&res->promises[i]);
    cap_free(res->promises);
    cap_free(res->cursor);
    memset(res, 0, sizeof(*res));
}

/* ---------- validation ---------- */
static int address_valid(const char *a)
{
    static const char *const schemes[] = {"http://",     "https://",     "poll://any@",
                                          "poll://uni@", "local://any@", "local://uni@",
                                          "gcps://",     "bash://"};
    if (!a)
        return 0;
    for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++) {
        size_t n = strlen(schemes[i]);
        if (strncmp(a, schemes[i], n) == 0 && a[n] != 0)
            return 1;
    }
    return 0;
}

/* Parses a non-negative decimal integer; 0 on success. */
static int parse_i64(const char *s, int64_t *out)
{
    if (!s || !*s)
        return -1;
    int64_t v = 0;
    for (const char *c = s; *c; c++) {
        if (*c < '0' || *c > '9' || v > (INT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (*c - '0');
    }
    *out = v;
    return 0;
}

/* Length of the origin of id under the lineage rule. */
static size_t origin_len(prom_lineage_t mode, const char *id)
{
    const char *c = strchr(id, mode == PROM_LINEAGE_DOT ? '.' : ':');
    return c ? (size_t)(c - id) : strlen(id);
}
static int same_origin(prom_lineage_t mode, const char *a, const char *b)
{
    if (mode == PROM_LINEAGE_OFF)
        return 1;
    size_t la = origin_len(mode, a), lb = origin_len(mode, b);
    return la == lb && memcmp(a, b, la) == 0;
}
/* id == tag, or id extends tag by the rule's separator. */
static int id_extends(prom_lineage_t mode, const char *id, const char *tag)
{
    size_t n = strlen(tag);
    if (strcmp(id, tag) == 0)
        return 1;
    if (strncmp(id, tag, n) != 0)
        return 0;
    char sep = '.';
    if (mode == PROM_LINEAGE_COLON && !strchr(tag, ':'))
        sep = ':';
    return id[n] == sep;
}

/* The 400 checks of a create; NULL when valid, else the message. */
static const char *create_invalid(const prom_store_t *s, const prom_create_t *c)
{
    if (!c || !c->id || !c->id[0])
        return "The id must not be empty";
    if (c->timeout_at < 0)
        return "timeoutAt must not be negative";
    for (size_t i = 0; i < c->ntags; i++)
        if (!c->tags[i].key || !c->tags[i].value)
            return "A tag must have a key and a value";
    const char *target = kvs_get(c->tags, c->ntags, "resonate:target");
    if (target && !address_valid(target))
        return "Invalid resonate:target address";
    const char *delay = kvs_get(c->tags, c->ntags, "resonate:delay");
    if (delay) {
        int64_t d;
        if (parse_i64(delay, &d) != 0 || !target || d >= c->timeout_at)
            return "Invalid resonate:delay";
    }
    prom_lineage_t mode = s->opts.lineage;
    if (mode != PROM_LINEAGE_OFF) {
        static const char *const keys[] = {"resonate:origin", "resonate:branch", "resonate:parent"};
        for (size_t i = 0; i < 3; i++) {
            const char *t = kvs_get(c->tags, c->ntags, keys[i]);
            if (t && !id_extends(mode, c->id, t))
                return "The id does not extend its lineage tags";
        }
        const char *o = kvs_get(c->tags, c->ntags, "resonate:origin");
        if (o && strchr(o, mode == PROM_LINEAGE_DOT ? '.' : ':'))
            return "The origin tag contains the lineage separator";
    }
    return NULL;
}
static int settle_state_valid(prom_state_t st)
{
    return st == PROM_RESOLVED || st == PROM_REJECTED || st == PROM_REJECTED_CANCELED;
}

static prom__doc_t *doc_get(prom_store_t *s, const char *id);

/* ---------- the op context: a working set of changed documents ---------- */
typedef struct octx {
    prom_store_t *s;
    int64_t now;
    prom__doc_t **docs; /* new states (owned), one per id */
    size_t n, cap;
    prom__msg_t *msgs; /* queued messages (owned) */
    size_t nmsgs, capmsgs;
    uint64_t del_first, del_last; /* outbox take: delete this range */
    int has_del;
    char **settled; /* ids settled by this op (only with an on_settle observer) */
    size_t nsettled;
} octx_t;

static const prom__doc_t *ctx_find(octx_t *c, const char *id)
{
    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->docs[i]->p.id, id) == 0)
            return c->docs[i];
    return doc_get(c->s, id);
}
/* Like ctx_find, memory only: for ids that, when they have a deadline, are resident. */
static const prom__doc_t *ctx_find_mem(octx_t *c, const char *id)
{
    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->docs[i]->p.id, id) == 0)
            return c->docs[i];
    return smap_get(&c->s->docs, id);
}
static void ctx_push(octx_t *c, prom__doc_t *d)
{
    if (c->n == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 4;
        c->docs = cap_realloc(c->docs, c->cap * sizeof(*c->docs));
    }
    c->docs[c->n++] = d;
}
/* A mutable document (copied into the working set on first touch); NULL if absent. */
static prom__doc_t *ctx_mut(octx_t *c, const char *id)
{
    for (size_t i = 0; i < c->n; i++)
        if (strcmp(c->docs[i]->p.id, id) == 0)
            return c->docs[i];
    const prom__doc_t *d = doc_get(c->s, id);
    if (!d)
        return NULL;
    prom__doc_t *m = prom__doc_clone(d);
    ctx_push(c, m);
    return m;
}
static void ctx_msg(octx_t *c, int kind, const char *address, const char *id, int64_t version)
{
    if (c->nmsgs == c->capmsgs) {
        c->capmsgs = c->capmsgs ? c->capmsgs * 2 : 4;
        c->msgs = cap_realloc(c->msgs, c->capmsgs * sizeof(*c->msgs));
    }
    prom__msg_t *m = &c->msgs[c->nmsgs++];
    m->mid = 0;
    m->kind = kind;
    m->address = cap_strdup(address ? address : "");
    m->id = cap_strdup(id);
    m->version = version;
}
static void ctx_free(octx_t *c)
{
    for (size_t i = 0; i < c->n; i++)
        prom__doc_free(c->docs[i]);
    cap_free(c->docs);
    for (size_t i = 0; i < c->nmsgs; i++)
        prom__msg_clear(&c->msgs[i]);
    cap_free(c->msgs);
    c->docs = NULL;
    c->msgs = NULL;
    c->n = c->nmsgs = 0;
}

static int64_t doc_deadline(const prom__doc_t *d)
{
    int64_t t = INT64_MAX;
    if (!d)
        return t;
    if (d->p.state == PROM_PENDING)
        t = d->p.timeout_at;
    if (d->has_task && d->ttimer && d->ttimer < t)
        t = d->ttimer;
    return t;
}

/* ---------- timer heap ---------- */
/* (deadline, id) order, so timers due together fire in a deterministic order. */
static int heap_less(const theap_ent_t *a, const theap_ent_t *b)
{
    return a->at < b->at || (a->at == b->at && strcmp(a->id, b->id) < 0);
}
static void heap_push(prom_store_t *s, int64_t at, const char *id)
{
    if (s->nheap == s->capheap) {
        s->capheap = s->capheap ? s->capheap * 2 : 256;
        s->heap = cap_realloc(s->heap, s->capheap * sizeof(*s->heap));
    }
    size_t i = s->nheap++;
    theap_ent_t e = {at, cap_strdup(id)};
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &s->heap[p]))
            break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = e;
}
static theap_ent_t heap_pop(prom_store_t *s)
{
    theap_ent_t top = s->heap[0];
    theap_ent_t last = s->heap[--s->nheap];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const theap_ent_t *mv = &last;
        if (l < s->nheap && heap_less(&s->heap[l], mv)) {
            m = l;
            mv = &s->heap[l];
        }
        if (r < s->nheap && heap_less(&s->heap[r], mv))
            m = r;
        if (m == i)
            break;
        s->heap[i] = s->heap[m];
        i = m;
    }
    if (s->nheap)
        s->heap[i] = last;
    return top;
}
static void heap_rebuild(prom_store_t *s)
{
    while (s->nheap)
        cap_free(heap_pop(s).id);
    s->narmed = 0;
    for (size_t i = 0; i < s->docs.cap; i++) {
        prom__doc_t *d = s->docs.e[i].val;
        if (d && doc_deadline(d) != INT64_MAX) {
            heap_push(s, doc_deadline(d), d->p.id);
            s->narmed++;
        }
    }
}

/* Installs d (owned) as the current state of its id; keeps the indexes. A settled document
 * becomes a candidate for eviction (evict_some). */
static void store_install(prom_store_t *s, prom__doc_t *d, int dirty)
{
    prom__doc_t *old = smap_get(&s->docs, d->p.id);
    d->dirty = old ? old->dirty : 0;
    d->created = 0;
    if (dirty && s->track_dirty && !d->dirty) {
        d->dirty = 1;
        if (s->ndirty == s->capdirty) {
            s->capdirty = s->capdirty ? s->capdirty * 2 : 256;
            s->dirty = cap_realloc(s->dirty, s->capdirty * sizeof(char *));
        }
        s->dirty[s->ndirty++] = cap_strdup(d->p.id);
    }
    int64_t od = doc_deadline(old), nd = doc_deadline(d);
    smap_put(&s->docs, d->p.id, d);
    d->mem = prom__doc_mem(d);
    s->st.resident_bytes += d->mem;
    if (old)
        s->st.resident_bytes -= old->mem;
    if (od != INT64_MAX)
        s->narmed--;
    if (nd != INT64_MAX) {
        s->narmed++;
        if (nd != od)
            heap_push(s, nd, d->p.id);
    }
    if (d->p.state != PROM_PENDING)
        fifo_push(&s->evq, d->seq, d->p.id, NULL);
    prom__doc_free(old);
    if (s->nheap > 2 * s->narmed + 4096)
        heap_rebuild(s);
}

/* The seq up to which prom.docs (with prom.live, prom.branch) holds every record. */
static uint64_t persisted_seq(prom_store_t *s)
{
    if (s->opts.checkpoint_ms > 0 || s->track_dirty)
        return s->flushed_seq; /* under s->mu */
    pthread_mutex_lock(&s->dmu);
    uint64_t v = s->durable_seq;
    pthread_mutex_unlock(&s->dmu);
    return v;
}

/* Drops from memory the settled documents that prom.docs holds, beyond the settled cache, and
 * the branch entries prom.branch holds; at most `max` of each (an operation evicts a bounded
 * amount, so that a checkpoint that made thousands evictable does not stall the one that comes
 * next; operations install fewer than they evict, so the queue drains). Under s->mu, between
 * operations (no document pointer of an operation is live). A document is evicted only if it is
 * still the state that made it a candidate (same seq), settled (so no deadline, no awaiters, no
 * listeners, its task fulfilled) and not waiting for a checkpoint. */
#define PROM_EVICT_PER_OP 64
static void evict_some(prom_store_t *s, size_t max)
{
    uint64_t ps = persisted_seq(s);
    for (size_t n = 0; n < max && s->pbranch.len && s->pbranch.v[s->pbranch.head].seq <= ps; n++)
        fifo_pop(&s->pbranch);
    for (size_t n = 0; n < max && s->evq.len > s->settled_cache; n++) {
        const seq_id_t *e = &s->evq.v[s->evq.head];
        if (e->seq > ps)
            break;
        prom__doc_t *d = smap_get(&s->docs, e->id);
        if (d && d->seq == e->seq && d->p.state != PROM_PENDING && !d->dirty) {
            prom__smap_del(&s->docs, e->id);
            s->st.resident_bytes -= d->mem;
            s->st.evictions++;
            prom__doc_free(d);
        }
        fifo_pop(&s->evq);
    }
}

/* Reads id's document from prom.docs into memory (a miss); NULL when there is none. */
static prom__doc_t *doc_load(prom_store_t *s, const char *id)
{
    store_txn_t *txn = NULL;
    store_val_t v;
    prom__doc_t *d = NULL;
    size_t n = strlen(id);
    if (n == 0 || n > WAL_MAX_KEY)
        return NULL;
    int rc = store_txn_begin(s->env, 1, &txn);
    if (rc == 0)
        rc = store_get(txn, s->dbi_docs, (store_val_t){id, n}, &v);
    if (rc == 0)
        rc = prom__doc_decode(v.data, v.len, &d);
    store_txn_abort(txn);
    if (rc != 0) {
        if (rc != CAP_ENOTFOUND && !s->load_err)
            s->load_err = rc; /* the op fails with it (it must not decide on a missing document) */
        if (rc != CAP_ENOTFOUND)
            cap_log(CAP_LOG_ERROR, "promise", "%s: prom.docs: reading \"%.*s\": %s",
                    store_env_path(s->env), (int)(n < 200 ? n : 200), id, cap_strerror(rc));
        return NULL;
    }
    s->st.misses++;
    d->seq = 0;
    store_install(s, d, 0);
    return d;
}

/* The current document of id: resident, or read from prom.docs (then resident until evicted). */
static prom__doc_t *doc_get(prom_store_t *s, const char *id)
{
    prom__doc_t *d = smap_get(&s->docs, id);
    return d ? d : doc_load(s, id);
}

/* ---------- durability ---------- */
/* Tells the settle observer about ids (settled by one op) once durable (rc 0); frees them. */
static void notify_settled(prom_store_t *s, char **ids, size_t n, int rc)
{
    for (size_t i = 0; i < n; i++) {
        if (rc == 0)
            s->opts.on_settle(s->opts.on_settle_arg, ids[i]);
        cap_free(ids[i]);
    }
    cap_free(ids);
}

/* Completes an asynchronous op: the settle observer (when durable), then done; frees w. */
static void wait_complete(prom_store_t *s, prom__wait_t *w, int rc)
{
    notify_settled(s, w->settled, w->nsettled, rc);
    w->fn(w->fnarg, rc);
    cap_free(w);
}

/* The wal's done callback of an op's append (wal writer thread): moves durable_seq, wakes the
 * blocking waiter, or calls the asynchronous completions that are now due (outside dmu). */
static void on_done(void *arg, int status, uint64_t first_seq)
{
    prom__wait_t *w = arg;
    prom_store_t *s = w->s;
    prom__wait_t *due = NULL;
    pthread_mutex_lock(&s->dmu);
    if (status == 0) {
        uint64_t last = first_seq + w->nrec - 1;
        if (last > s->durable_seq)
            s->durable_seq = last;
    } else {
        s->failed = 1;
    }
    w->status = status;
    w->done = 1;
    if (w->fn) {
        w->next = due;
        due = w;
    } else {
        pthread_cond_signal(&w->cv);
    }
    for (prom__wait_t **pp = &s->seq_waiters; *pp;) {
        prom__wait_t *q = *pp;
        if (q->target <= s->durable_seq || s->failed) {
            *pp = q->next;
            q->status = q->target <= s->durable_seq ? 0 : CAP_ECLOSED;
            q->next = due;
            due = q;
        } else {
            pp = &q->next;
        }
    }
    if (s->nreaders)
        pthread_cond_broadcast(&s->dcv);
    pthread_mutex_unlock(&s->dmu);
    while (due) {
        prom__wait_t *q = due;
        due = q->next;
        wait_complete(s, q, q->status);
    }
}

static int wait_seq(prom_store_t *s, uint64_t target)
{
    int rc = 0;
    pthread_mutex_lock(&s->dmu);
    if (s->durable_seq < target) {
        s->nreaders++;
        while (s->durable_seq < target && !s->failed)
            pthread_cond_wait(&s->dcv, &s->dmu);
        s->nreaders--;
        if (s->durable_seq < target)
            rc = CAP_ECLOSED;
    }
    pthread_mutex_unlock(&s->dmu);
    return rc;
}

#define CTX_LOCAL_RECS 4 /* records of an op whose arrays ctx_commit keeps on the stack */

/* Appends the working set as one batch and installs it. Called under s->mu. On 0, *w is armed
 * (the caller waits with wait_own after unlocking) or w->nrec == 0 (nothing to write). */
static int ctx_commit(octx_t *c, prom__wait_t *w, const wal_rec_t *extra, size_t nextra)
{
    prom_store_t *s = c->s;
    size_t nrec = nextra + c->n + c->nmsgs + (c->has_del ? 1 : 0);
    int rc = 0;
    w->s = s;
    w->done = 0;
    w->status = 0;
    w->nrec = nrec;
    if (nrec == 0)
        goto out;
    /* most ops write one or two records: their arrays live on the stack */
    wal_rec_t recs_l[CTX_LOCAL_RECS];
    wal_field_t fields_l[3 * CTX_LOCAL_RECS];
    uint8_t *bufs_l[CTX_LOCAL_RECS];
    uint8_t keys_l[CTX_LOCAL_RECS][8];
    int local = nrec <= CTX_LOCAL_RECS;
    if (local) {
        memset(recs_l, 0, sizeof(recs_l));
        memset(fields_l, 0, sizeof(fields_l));
        memset(bufs_l, 0, sizeof(bufs_l));
    }
    wal_rec_t *recs = local ? recs_l : cap_calloc(nrec, sizeof(wal_rec_t));
    wal_field_t *fields = local ? fields_l : cap_calloc(nrec * 3, sizeof(wal_field_t));
    uint8_t **bufs = local ? bufs_l : cap_calloc(nrec, sizeof(uint8_t *));
    uint8_t(*keys)[8] = local ? keys_l : cap_calloc(nrec, 8);
    size_t k = 0;
    for (size_t i = 0; i < nextra; i++, k++)
        recs[k] = extra[i]; /* the caller's records first, in the same append */
    for (size_t i = 0; i < c->n; i++, k++) {
        /* field 2: PROM_DOC_LIVE (pending: prom.live holds it), PROM_DOC_CREATED; field 3: the
         * branch of a created promise (prom.branch gets it) */
        const prom__doc_t *d = c->docs[i];
        const char *br = d->created ? prom_promise_tag(&d->p, "resonate:branch") : NULL;
        uint64_t flags =
            (d->p.state == PROM_PENDING ? PROM_DOC_LIVE : 0) | (d->created ? PROM_DOC_CREATED : 0);
        size_t len;
        prom__doc_encode(d, &bufs[k], &len);
        fields[3 * k] = (wal_field_t){1, 0, bufs[k], len};
        fields[3 * k + 1] = (wal_field_t){2, flags, NULL, 0};
        if (br)
            fields[3 * k + 2] = (wal_field_t){3, 0, br, strlen(br)};
        recs[k] = (wal_rec_t){PROM_REC_DOC, d->p.id, strlen(d->p.id), &fields[3 * k], br ? 3 : 2};
    }
    uint64_t mid = s->next_mid;
    for (size_t i = 0; i < c->nmsgs; i++, k++) {
        size_t len;
        c->msgs[i].mid = mid++;
        prom__msg_encode(&c->msgs[i], &bufs[k], &len);
        fields[3 * k] = (wal_field_t){1, 0, bufs[k], len};
        cap_put_be64(keys[k], c->msgs[i].mid);
        recs[k] = (wal_rec_t){PROM_REC_MSG_ADD, keys[k], 8, &fields[3 * k], 1};
    }
    if (c->has_del) {
        fields[3 * k] = (wal_field_t){1, c->del_first, NULL, 0};
        fields[3 * k + 1] = (wal_field_t){2, c->del_last, NULL, 0};
        recs[k] = (wal_rec_t){PROM_REC_MSG_DEL, NULL, 0, &fields[3 * k], 2};
        k++;
    }
    uint64_t first = 0;
    if (!w->fn)
        pthread_cond_init(&w->cv, NULL);
    rc = wal_log_append(s->wal, recs, nrec, on_done, w, &first);
    if (!local) {
        cap_free(keys);
        cap_free(recs);
    }
    if (rc != 0) {
        if (!w->fn)
            pthread_cond_destroy(&w->cv);
        w->nrec = 0;
        goto done;
    }
    s->last_seq = first + nrec - 1;
    s->next_mid = mid;
    s->st.records += nrec;
    for (size_t i = 0; i < c->n; i++) {
        prom__doc_t *d = c->docs[i];
        d->seq = first + nextra + i;
        if (s->track_dirty) { /* the checkpoint writes these bytes: no second encoding */
            d->enc = bufs[nextra + i];
            d->enclen = fields[3 * (nextra + i)].len;
            bufs[nextra + i] = NULL;
        }
        const char *br = d->created ? prom_promise_tag(&d->p, "resonate:branch") : NULL;
        if (br)
            fifo_push(&s->pbranch, d->seq, d->p.id, br);
        store_install(s, d, 1);
    }
    c->n = 0;
    for (size_t i = 0; i < c->nmsgs; i++) {
        if (s->outhead + s->outlen == s->outcap) {
            if (s->outhead > s->outcap / 2) {
                memmove(s->outq, s->outq + s->outhead, s->outlen * sizeof(prom__msg_t));
                s->outhead = 0;
            } else {
                s->outcap = s->outcap ? s->outcap * 2 : 64;
                s->outq = cap_realloc(s->outq, s->outcap * sizeof(prom__msg_t));
            }
        }
        s->outq[s->outhead + s->outlen++] = c->msgs[i];
    }
    c->nmsgs = 0;
done:
    for (size_t i = 0; i < nrec; i++)
        cap_free(bufs[i]);
    if (!local) {
        cap_free(bufs);
        cap_free(fields);
    }
out:
    return rc;
}

/* Waits for the op's own batch (or, when it wrote nothing, for everything appended so far). */
static int ctx_wait(prom_store_t *s, prom__wait_t *w, uint64_t seen)
{
    if (w->nrec == 0)
        return wait_seq(s, seen);
    pthread_mutex_lock(&s->dmu);
    while (!w->done)
        pthread_cond_wait(&w->cv, &s->dmu);
    pthread_mutex_unlock(&s->dmu);
    pthread_cond_destroy(&w->cv);
    return w->status;
}

/* ---------- transitions ---------- */
static void task_clear_lease(prom__doc_t *d)
{
    cap_free(d->tpid);
    d->tpid = NULL;
    d->tttl = 0;
}

static int doc_alive(const prom__doc_t *d, int64_t now)
{
    return d->p.state == PROM_PENDING && now < d->p.timeout_at;
}

/* Makes a task pending and dispatches it (execute to its target). */
static void task_dispatch(octx_t *c, prom__doc_t *d)
{
    d->tstate = PROM_TASK_PENDING;
    task_clear_lease(d);
    d->ttimer = c->now + c->s->opts.retry_ms;
    ctx_msg(c, PROM_MSG_EXECUTE, prom_promise_tag(&d->p, "resonate:target"), d->p.id, d->tversion);
}

/* Settles d (already in the working set) with every effect. */
static void do_settle(octx_t *c, prom__doc_t *d, prom_state_t st, const prom_value_t *value,
                      int64_t settled_at)
{
    if (c->s->opts.on_settle) {
        c->settled = cap_realloc(c->settled, (c->nsettled + 1) * sizeof(char *));
        c->settled[c->nsettled++] = cap_strdup(d->p.id);
    }
    d->p.state = st;
    prom__value_clear(&d->p.value);
    prom__value_copy(&d->p.value, value);
    d->p.settled_at = settled_at;
    if (d->has_task && d->tstate != PROM_TASK_FULFILLED) {
        d->tstate = PROM_TASK_FULFILLED;
        task_clear_lease(d);
        d->ttimer = 0;
    }
    for (size_t i = 0; i < d->nawaiters; i++) {
        prom__doc_t *a = ctx_mut(c, d->awaiters[i]);
        if (a && a->has_task) {
            if (a->tstate == PROM_TASK_SUSPENDED) {
                if (doc_alive(a, c->now)) {
                    a->tresumes++;
                    task_dispatch(c, a);
                }
            } else if (a->tstate != PROM_TASK_FULFILLED) {
                a->tresumes++;
            }
        }
        cap_free(d->awaiters[i]);
    }
    cap_free(d->awaiters);
    d->awaiters = NULL;
    d->nawaiters = 0;
    for (size_t i = 0; i < d->nlisteners; i++) {
        ctx_msg(c, PROM_MSG_UNBLOCK, d->listeners[i], d->p.id, 0);
        cap_free(d->listeners[i]);
    }
    cap_free(d->listeners);
    d->listeners = NULL;
    d->nlisteners = 0;
}

static prom_state_t timeout_state(const prom__doc_t *d)
{
    return tag_true(&d->p, "resonate:timer") ? PROM_RESOLVED : PROM_REJECTED_TIMEDOUT;
}

/* Materialises the timeout of id if it is due; returns the current document (NULL if absent). */
static const prom__doc_t *materialise(octx_t *c, const char *id)
{
    const prom__doc_t *d = ctx_find(c, id);
    if (d && d->p.state == PROM_PENDING && c->now >= d->p.timeout_at) {
        prom__doc_t *m = ctx_mut(c, id);
        do_settle(c, m, timeout_state(m), NULL, m->p.timeout_at);
        d = m;
    }
    return d;
}

/* ---------- result building (under s->mu) ---------- */
static void project(const prom__doc_t *d, int64_t now, prom_promise_t *out)
{
    prom_promise_copy(out, &d->p);
    if (d->p.state == PROM_PENDING && now >= d->p.timeout_at) {
        out->state = timeout_state(d);
        out->settled_at = d->p.timeout_at;
    }
}
static void res_promise(prom_result_t *res, const prom__doc_t *d, int64_t now)
{
    res->promise = cap_calloc(1, sizeof(prom_promise_t));
    project(d, now, res->promise);
}
static void res_task(prom_result_t *res, const prom__doc_t *d, int64_t now)
{
    prom_task_t *t = cap_calloc(1, sizeof(*t));
    t->id = cap_strdup(d->p.id);
    t->state = d->tstate;
    t->version = d->tversion;
    t->resumes = d->tresumes;
    if (d->p.state == PROM_PENDING && now >= d->p.timeout_at)
        t->state = PROM_TASK_FULFILLED; /* projected */
    if (t->state == PROM_TASK_ACQUIRED) {
        t->pid = d->tpid ? cap_strdup(d->tpid) : NULL;
        t->ttl = d->tttl;
    }
    res->task = t;
}
static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}
static void strv_push(char ***v, size_t *n, size_t *cap, const char *str, size_t len)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 16;
        *v = cap_realloc(*v, *cap * sizeof(char *));
    }
    char *x = cap_malloc(len + 1);
    memcpy(x, str, len);
    x[len] = 0;
    (*v)[(*n)++] = x;
}

/* Every promise on d's branch but d, ordered by id, at most preload_limit. The ids come from
 * prom.branch (keyed by a hash of the branch: members are checked by their tag), the branch
 * entries not yet written there, and the promises this op creates; the documents from memory or
 * prom.docs. */
static void res_preload(octx_t *c, prom_result_t *res, const prom__doc_t *d)
{
    prom_store_t *s = c->s;
    const char *b = prom_promise_tag(&d->p, "resonate:branch");
    if (!b)
        return;
    char **ids = NULL;
    size_t nids = 0, capids = 0;
    store_txn_t *txn = NULL;
    store_cursor_t *cur = NULL;
    uint8_t hk[8];
    store_val_t k = store_key_u64(hk, cap_hash64(b, strlen(b))), v;
    int rc = store_txn_begin(s->env, 1, &txn);
    if (rc == 0)
        rc = store_cursor_open(txn, s->dbi_branch, &cur);
    for (int r = rc ? rc : store_cursor_get(cur, &k, &v, STORE_SET_KEY); r == 0;
         r = store_cursor_get(cur, &k, &v, STORE_NEXT_DUP))
        strv_push(&ids, &nids, &capids, v.data, v.len);
    for (size_t i = 0; i < s->pbranch.len; i++) {
        const seq_id_t *e = &s->pbranch.v[s->pbranch.head + i];
        if (strcmp(e->branch, b) == 0)
            strv_push(&ids, &nids, &capids, e->id, strlen(e->id));
    }
    for (size_t i = 0; i < c->n; i++) {
        const char *xb = prom_promise_tag(&c->docs[i]->p, "resonate:branch");
        if (c->docs[i]->created && xb && strcmp(xb, b) == 0)
            strv_push(&ids, &nids, &capids, c->docs[i]->p.id, strlen(c->docs[i]->p.id));
    }
    if (nids > 1)
        qsort(ids, nids, sizeof(char *), cmp_str);
    prom_promise_t *ps = nids ? cap_calloc(nids, sizeof(*ps)) : NULL;
    size_t n = 0;
    for (size_t i = 0; i < nids && n < s->opts.preload_limit; i++) {
        if ((i > 0 && strcmp(ids[i], ids[i - 1]) == 0) || strcmp(ids[i], d->p.id) == 0)
            continue;
        const prom__doc_t *x = ctx_find_mem(c, ids[i]);
        prom__doc_t *loaded = NULL;
        if (!x && txn &&
            store_get(txn, s->dbi_docs, (store_val_t){ids[i], strlen(ids[i])}, &v) == 0) {
            int r = prom__doc_decode(v.data, v.len, &loaded);
            if (r == 0)
                x = loaded;
            else if (!s->load_err)
                s->load_err = r;
        }
        const char *xb = x ? prom_promise_tag(&x->p, "resonate:branch") : NULL;
        if (xb && strcmp(xb, b) == 0)
            project(x, c->now, &ps[n++]);
        prom__doc_free(loaded);
    }
    store_cursor_close(cur);
    store_txn_abort(txn);
    for (size_t i = 0; i < nids; i++)
        cap_free(ids[i]);
    cap_free(ids);
    res->promises = ps;
    res->npromises = n;
}

/* ---------- running an op ---------- */
static void op_begin(prom_store_t *s, octx_t *c, prom_result_t *res)
{
    memset(c, 0, sizeof(*c));
    memset(res, 0, sizeof(*res));
    c->s = s;
    pthread_mutex_lock(&s->mu);
    s->load_err = 0;
    /* what earlier ops made durable (no document pointer is held here) */
    evict_some(s, PROM_EVICT_PER_OP);
    c->now = prom_store_now(s);
}
/* Tells the settle observer about the op's settles once they are durable (rc 0), then frees the
 * list (outside the lock). */
static void ctx_notify(prom_store_t *s, octx_t *c, int rc)
{
    notify_settled(s, c->settled, c->nsettled, rc);
    c->settled = NULL;
    c->nsettled = 0;
}

/* Commits, unlocks, waits. On a commit failure the result is cleared. */
static int op_end(octx_t *c, prom_result_t *res)
{
    prom_store_t *s = c->s;
    prom__wait_t w = {0};
    /* a document that failed to read from prom.docs: the op decided without it, write nothing */
    int rc = s->load_err ? s->load_err : ctx_commit(c, &w, NULL, 0);
    uint64_t seen = s->last_seq;
    ctx_free(c);
    pthread_mutex_unlock(&s->mu);
    if (rc == 0)
        rc = ctx_wait(s, &w, seen);
    ctx_notify(s, c, rc);
    if (rc != 0)
        prom_result_clear(res);
    return rc;
}
/* The asynchronous end of an op: commits (with the caller's extra records first in the same
 * append), unlocks, and arranges for done(arg, rc) once the op's records - or, when it wrote
 * nothing, every record appended before it - are durable. */
static int op_end_async(octx_t *c, prom_result_t *res, const wal_rec_t *extra, size_t nextra,
                        prom_done_fn done, void *arg)
{
    prom_store_t *s = c->s;
    prom__wait_t *w = cap_calloc(1, sizeof(*w));
    w->fn = done;
    w->fnarg = arg;
    w->settled = c->settled; /* told to the observer at completion */
    w->nsettled = c->nsettled;
    c->settled = NULL;
    c->nsettled = 0;
    /* counted before the append: from then on the writer may complete and free w */
    size_t nrec = nextra + c->n + c->nmsgs + (c->has_del ? 1 : 0);
    /* a document that failed to read from prom.docs: write nothing (as op_end) */
    int rc = s->load_err ? s->load_err : ctx_commit(c, w, extra, nextra);
    uint64_t seen = s->last_seq;
    ctx_free(c);
    pthread_mutex_unlock(&s->mu);
    if (rc != 0) {
        notify_settled(s, w->settled, w->nsettled, rc); /* frees */
        cap_free(w);
        prom_result_clear(res);
        return rc;
    }
    if (nrec)
        return 0;
    pthread_mutex_lock(&s->dmu);
    if (s->durable_seq >= seen || s->failed) {
        rc = s->durable_seq >= seen ? 0 : CAP_ECLOSED;
        pthread_mutex_unlock(&s->dmu);
        wait_complete(s, w, rc);
        return 0;
    }
    w->target = seen;
    w->next = s->seq_waiters;
    s->seq_waiters = w;
    pthread_mutex_unlock(&s->dmu);
    return 0;
}
static void set_status(prom_result_t *res, int status, const char *msg)
{
    res->status = status;
    res->message = status == PROM_S_OK ? NULL : msg;
}

/* promise.create inside an op; returns the status and the current document. */
static int do_create(octx_t *c, const prom_create_t *req, const prom__doc_t **out)
{
    const prom__doc_t *d = ctx_find(c, req->id);
    if (d) {
        *out = d;
        return PROM_S_OK;
    }
    prom__doc_t *n = cap_calloc(1, sizeof(*n));
    n->p.id = cap_strdup(req->id);
    prom__value_copy(&n->p.param, req->param);
    prom__kvs_copy(&n->p.tags, &n->p.ntags, req->tags, req->ntags);
    n->p.timeout_at = req->timeout_at;
    const char *target = prom_promise_tag(&n->p, "resonate:target");
    n->has_task = target != NULL;
    n->created = 1;
    ctx_push(c, n);
    if (c->now >= req->timeout_at) {
        n->p.state = timeout_state(n);
        n->p.created_at = n->p.settled_at = req->timeout_at;
        n->tstate = PROM_TASK_FULFILLED;
    } else {
        n->p.state = PROM_PENDING;
        n->p.created_at = c->now;
        if (n->has_task) {
            int64_t delay = 0;
            const char *ds = prom_promise_tag(&n->p, "resonate:delay");
            if (ds && parse_i64(ds, &delay) == 0 && delay > c->now) {
                n->tstate = PROM_TASK_PENDING;
                n->ttimer = delay;
            } else {
                task_dispatch(c, n);
            }
        }
    }
    *out = n;
    return PROM_S_OK;
}

/* promise.settle inside an op. */
static int do_settle_op(octx_t *c, const prom_settle_t *req, const prom__doc_t **out)
{
    const prom__doc_t *d = materialise(c, req->id);
    if (!d)
        return PROM_S_NOTFOUND;
    if (d->p.state == PROM_PENDING) {
        prom__doc_t *m = ctx_mut(c, req->id);
        do_settle(c, m, req->state, req->value, c->now);
        d = m;
    }
    *out = d;
    return PROM_S_OK;
}

int prom_promise_get(prom_store_t *s, const char *id, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const prom__doc_t *d = id ? ctx_find(&c, id) : NULL;
    if (!d) {
        set_status(res, PROM_S_NOTFOUND, "Promise not found");
    } else {
        set_status(res, PROM_S_OK, NULL);
        res_promise(res, d, c.now);
    }
    return op_end(&c, res);
}

static void create_body(octx_t *c, const prom_create_t *req, prom_result_t *res)
{
    const char *bad = create_invalid(c->s, req);
    if (bad) {
        set_status(res, PROM_S_BAD, bad);
    } else {
        const prom__doc_t *d;
        set_status(res, do_create(c, req, &d), NULL);
        res_promise(res, d, c->now);
    }
}

int prom_promise_create(prom_store_t *s, const prom_create_t *req, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    create_body(&c, req, res);
    return op_end(&c, res);
}

int prom_promise_create_async(prom_store_t *s, const prom_create_t *req, prom_result_t *res,
                              prom_done_fn done, void *arg)
{
    octx_t c;
    op_begin(s, &c, res);
    create_body(&c, req, res);
    return op_end_async(&c, res, NULL, 0, done, arg);
}

static void settle_body(octx_t *c, const prom_settle_t *req, prom_result_t *res)
{
    const prom__doc_t *d = NULL;
    if (!req || !req->id || !req->id[0] || !settle_state_valid(req->state)) {
        set_status(res, PROM_S_BAD, "Invalid settle request");
    } else if (do_settle_op(c, req, &d) == PROM_S_NOTFOUND) {
        set_status(res, PROM_S_NOTFOUND, "Promise not found");
    } else {
        set_status(res, PROM_S_OK, NULL);
        res_promise(res, d, c->now);
    }
}

int prom_promise_batch(prom_store_t *s, const prom_op_t *ops, size_t n, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    set_status(res, PROM_S_BAD, "Empty batch");
    for (size_t i = 0; i < n; i++) {
        prom_result_clear(res);
        if (!ops[i].create == !ops[i].settle)
            set_status(res, PROM_S_BAD, "Invalid batch operation");
        else if (ops[i].create)
            create_body(&c, ops[i].create, res);
        else
            settle_body(&c, ops[i].settle, res);
        if (res->status != PROM_S_OK)
            break;
    }
    return op_end(&c, res);
}

int prom_promise_settle(prom_store_t *s, const prom_settle_t *req, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    settle_body(&c, req, res);
    return op_end(&c, res);
}

int prom_promise_settle_async(prom_store_t *s, const prom_settle_t *req, const wal_rec_t *extra,
                              size_t nextra, prom_result_t *res, prom_done_fn done, void *arg)
{
    for (size_t i = 0; i < nextra; i++)
        if (extra[i].kind >= PROM_REC_FIRST && extra[i].kind <= PROM_REC_LAST)
            return CAP_EINVAL;
    octx_t c;
    op_begin(s, &c, res);
    settle_body(&c, req, res);
    return op_end_async(&c, res, extra, nextra, done, arg);
}

int prom_promise_register_callback(prom_store_t *s, const char *awaited, const char *awaiter,
                                   prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const prom__doc_t *ad, *wd;
    if (!awaited || !awaiter || !awaited[0] || !awaiter[0] || strcmp(awaited, awaiter) == 0) {
        set_status(res, PROM_S_BAD, "Awaited and awaiter must be two different ids");
    } else if (!same_origin(s->opts.lineage, awaited, awaiter)) {
        set_status(res, PROM_S_BAD, "Awaited and awaiter have different origins");
    } else if (!(ad = ctx_find(&c, awaited))) {
        set_status(res, PROM_S_NOTFOUND, "Awaited promise not found");
    } else if (!(wd = ctx_find(&c, awaiter))) {
        set_status(res, PROM_S_UNPROCESSABLE, "Awaiter promise not found");
    } else if (!wd->has_task) {
        set_status(res, PROM_S_UNPROCESSABLE, "Awaiter promise has no task");
    } else if (!doc_external(ad)) {
        set_status(res, PROM_S_UNPROCESSABLE, "Awaited promise is not awaitable");
    } else {
        ad = materialise(&c, awaited);
        wd = materialise(&c, awaiter);
        if (ad->p.state == PROM_PENDING && wd->p.state == PROM_PENDING) {
            int have = 0;
            for (size_t i = 0; i < ad->nawaiters; i++)
                have |= strcmp(ad->awaiters[i], awaiter) == 0;
            if (!have) {
                prom__doc_t *m = ctx_mut(&c, awaited);
                m->awaiters = cap_realloc(m->awaiters, (m->nawaiters + 1) * sizeof(char *));
                m->awaiters[m->nawaiters++] = cap_strdup(awaiter);
                ad = m;
            }
        } else if (ad->p.state != PROM_PENDING && wd->tstate == PROM_TASK_SUSPENDED &&
                   doc_alive(wd, c.now)) {
            prom__doc_t *m = ctx_mut(&c, awaiter);
            m->tresumes++;
            task_dispatch(&c, m);
            ad = ctx_find(&c, awaited);
        }
        set_status(res, PROM_S_OK, NULL);
        res_promise(res, ad, c.now);
    }
    return op_end(&c, res);
}

int prom_promise_register_listener(prom_store_t *s, const char *awaited, const char *address,
                                   prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const prom__doc_t *d;
    if (!awaited || !awaited[0] || !address_valid(address)) {
        set_status(res, PROM_S_BAD, "Invalid address");
    } else if (!(d = ctx_find(&c, awaited))) {
        set_status(res, PROM_S_NOTFOUND, "Promise not found");
    } else if (!doc_external(d)) {
        set_status(res, PROM_S_UNPROCESSABLE, "Awaited promise is not awaitable");
    } else {
        d = materialise(&c, awaited);
        if (d->p.state == PROM_PENDING) {
            int have = 0;
            for (size_t i = 0; i < d->nlisteners; i++)
                have |= strcmp(d->listeners[i], address) == 0;
            if (!have) {
                prom__doc_t *m = ctx_mut(&c, awaited);
                m->listeners = cap_realloc(m->listeners, (m->nlisteners + 1) * sizeof(char *));
                m->listeners[m->nlisteners++] = cap_strdup(address);
                d = m;
            }
        }
        set_status(res, PROM_S_OK, NULL);
        res_promise(res, d, c.now);
    }
    return op_end(&c, res);
}

static int search_match(const prom_search_t *q, const prom_promise_t *p)
{
    if (q->state >= 0) {
        if (q->state == PROM_REJECTED) {
            if (p->state != PROM_REJECTED && p->state != PROM_REJECTED_CANCELED &&
                p->state != PROM_REJECTED_TIMEDOUT)
                return 0;
        } else if ((int)p->state != q->state) {
            return 0;
        }
    }
    for (size_t i = 0; i < q->ntags; i++) {
        const char *v = prom_promise_tag(p, q->tags[i].key);
        if (!v || strcmp(v, q->tags[i].value) != 0)
            return 0;
    }
    return 1;
}

static int cmp_doc_id(const void *a, const void *b)
{
    return strcmp((*(const prom__doc_t *const *)a)->p.id, (*(const prom__doc_t *const *)b)->p.id);
}

/* The matching documents of prom.docs that are not resident, after req->cursor, in id order:
 * stops at k + 1 of them, or at k when `resident` matches already prove a next page. Under s->mu
 * (the resident set cannot change; a document is evicted only once prom.docs holds its state). */
static int search_evicted(prom_store_t *s, const prom_search_t *req, size_t k, size_t resident,
                          prom__doc_t ***out, size_t *nout)
{
    store_txn_t *txn = NULL;
    store_cursor_t *cur = NULL;
    store_val_t key = {req->cursor, req->cursor ? strlen(req->cursor) : 0}, v;
    prom__doc_t **l = cap_calloc(k + 1, sizeof(*l));
    size_t nl = 0;
    char id[WAL_MAX_KEY + 1];
    int rc = store_txn_begin(s->env, 1, &txn);
    if (rc == 0)
        rc = store_cursor_open(txn, s->dbi_docs, &cur);
    if (rc == 0)
        rc = store_cursor_get(cur, &key, &v,
                              req->cursor && req->cursor[0] ? STORE_SET_RANGE : STORE_FIRST);
    while (rc == 0 && nl <= k && !(nl == k && resident > 0)) {
        if (key.len <= WAL_MAX_KEY) {
            memcpy(id, key.data, key.len);
            id[key.len] = 0;
            prom__doc_t *d = NULL;
            if ((!req->cursor || strcmp(id, req->cursor) > 0) && !smap_get(&s->docs, id)) {
                rc = prom__doc_decode(v.data, v.len, &d);
                if (rc) {
                    cap_log(CAP_LOG_ERROR, "promise",
                            "%s: prom.docs: the document of \"%.200s\" does not decode",
                            store_env_path(s->env), id);
                    break;
                }
                if (search_match(req, &d->p))
                    l[nl++] = d;
                else
                    prom__doc_free(d);
            }
        }
        rc = store_cursor_get(cur, &key, &v, STORE_NEXT);
    }
    store_cursor_close(cur);
    store_txn_abort(txn);
    if (rc == CAP_ENOTFOUND)
        rc = 0;
    if (rc) {
        for (size_t i = 0; i < nl; i++)
            prom__doc_free(l[i]);
        cap_free(l);
        return rc;
    }
    *out = l;
    *nout = nl;
    return 0;
}

int prom_promise_search(prom_store_t *s, const prom_search_t *req, prom_result_t *res)
{
    memset(res, 0, sizeof(*res));
    int limit = req->limit ? req->limit : 100;
    if (limit < 1 || limit > 1000 || req->state < -1 || req->state > PROM_REJECTED_TIMEDOUT) {
        set_status(res, PROM_S_BAD, "Invalid search request");
        return 0;
    }
    /* in memory: every document matching, after the cursor, ordered by id */
    pthread_mutex_lock(&s->mu);
    int64_t now = prom_store_now(s);
    /* the `limit` smallest matching ids, kept in a max-heap by id: O(n log limit) */
    size_t k = (size_t)limit, nh = 0, matched = 0;
    const prom__doc_t **h = cap_calloc(k, sizeof(*h));
    for (size_t i = 0; i < s->docs.cap; i++) {
        const prom__doc_t *d = s->docs.e[i].val;
        if (!d || (req->cursor && strcmp(d->p.id, req->cursor) <= 0))
            continue;
        prom_promise_t view = d->p; /* shallow: only state is projected */
        if (d->p.state == PROM_PENDING && now >= d->p.timeout_at)
            view.state = timeout_state(d);
        if (!search_match(req, &view))
            continue;
        matched++;
        size_t j;
        if (nh < k) {
            j = nh++;
            while (j > 0 && strcmp(h[(j - 1) / 2]->p.id, d->p.id) < 0) {
                h[j] = h[(j - 1) / 2];
                j = (j - 1) / 2;
            }
            h[j] = d;
        } else if (strcmp(d->p.id, h[0]->p.id) < 0) {
            j = 0; /* replace the largest, sift down */
            for (;;) {
                size_t l = 2 * j + 1, r = l + 1, m = j;
                const char *mv = d->p.id;
                if (l < nh && strcmp(h[l]->p.id, mv) > 0) {
                    m = l;
                    mv = h[l]->p.id;
                }
                if (r < nh && strcmp(h[r]->p.id, mv) > 0)
                    m = r;
                if (m == j)
                    break;
                h[j] = h[m];
                j = m;
            }
            h[j] = d;
        }
    }
    if (nh > 1)
        qsort(h, nh, sizeof(*h), cmp_doc_id);
    /* evicted documents (settled, so never a pending match): prom.docs in id order after the
     * cursor, skipping the resident ones (memory has their current state); the first k matches
     * are all that can make the page, one more tells whether a next page exists */
    prom__doc_t **l = NULL;
    size_t nl = 0;
    if (req->state != PROM_PENDING) {
        int rc = search_evicted(s, req, k, matched, &l, &nl);
        if (rc) {
            cap_free(h);
            pthread_mutex_unlock(&s->mu);
            return rc;
        }
    }
    size_t take = nh + nl < k ? nh + nl : k;
    res->promises = take ? cap_calloc(take, sizeof(prom_promise_t)) : NULL;
    for (size_t i = 0, j = 0; i + j < take;) {
        prom_promise_t *dst = &res->promises[i + j];
        if (j == nl || (i < nh && strcmp(h[i]->p.id, l[j]->p.id) < 0))
            project(h[i++], now, dst);
        else
            project(l[j++], now, dst);
    }
    res->npromises = take;
    if (matched + nl > take)
        res->cursor = cap_strdup(res->promises[take - 1].id);
    for (size_t j = 0; j < nl; j++)
        prom__doc_free(l[j]);
    cap_free(l);
    cap_free(h);
    set_status(res, PROM_S_OK, NULL);
    uint64_t seen = s->last_seq;
    pthread_mutex_unlock(&s->mu);
    int rc = wait_seq(s, seen);
    if (rc)
        prom_result_clear(res);
    return rc;
}

/* ---------- tasks ---------- */
int prom_task_get(prom_store_t *s, const char *id, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const prom__doc_t *d = id ? ctx_find(&c, id) : NULL;
    if (!d || !d->has_task) {
        set_status(res, PROM_S_NOTFOUND, "Task not found");
    } else {
        set_status(res, PROM_S_OK, NULL);
        res_task(res, d, c.now);
    }
    return op_end(&c, res);
}

static void task_acquire(octx_t *c, prom__doc_t *m, const char *pid, int64_t ttl)
{
    m->tstate = PROM_TASK_ACQUIRED;
    m->tversion++;
    cap_free(m->tpid);
    m->tpid = cap_strdup(pid);
    m->tttl = ttl;
    m->ttimer = c->now + ttl;
    m->tresumes = 0;
}

int prom_task_create(prom_store_t *s, const char *pid, int64_t ttl, const prom_create_t *create,
                     prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const char *bad = create_invalid(s, create);
    const prom__doc_t *d;
    if (!bad && (!pid || !pid[0] || ttl <= 0))
        bad = "pid must not be empty and ttl must be positive";
    if (!bad && !kvs_get(create->tags, create->ntags, "resonate:target"))
        bad = "The promise must have a resonate:target";
    if (!bad && kvs_get(create->tags, create->ntags, "resonate:delay"))
        bad = "task.create does not take resonate:delay";
    if (bad) {
        set_status(res, PROM_S_BAD, bad);
    } else if ((d = ctx_find(&c, create->id)) && !d->has_task) {
        set_status(res, PROM_S_UNPROCESSABLE, "Promise exists without a task");
    } else if (d) {
        d = materialise(&c, create->id);
        if (d->tstate == PROM_TASK_PENDING) {
            prom__doc_t *m = ctx_mut(&c, create->id);
            task_acquire(&c, m, pid, ttl);
            d = m;
        } else if (d->tstate != PROM_TASK_FULFILLED) {
            d = NULL;
        }
        if (d) {
            set_status(res, PROM_S_OK, NULL);
            res_task(res, d, c.now);
            res_promise(res, d, c.now);
            res_preload(&c, res, d);
        } else {
            set_status(res, PROM_S_CONFLICT, "Task already exists");
        }
    } else {
        do_create(&c, create, &d);
        prom__doc_t *m = ctx_mut(&c, create->id);
        if (m->p.state == PROM_PENDING) {
            /* drop the execute do_create queued: task.create acquires at once */
            for (size_t i = 0; i < c.nmsgs; i++)
                prom__msg_clear(&c.msgs[i]);
            c.nmsgs = 0;
            m->tversion = 0;
            task_acquire(&c, m, pid, ttl);
        }
        set_status(res, PROM_S_OK, NULL);
        res_task(res, m, c.now);
        res_promise(res, m, c.now);
        res_preload(&c, res, m);
    }
    return op_end(&c, res);
}

/* The common prefix of the versioned task ops: 404 / 409 checks after materialising. Returns the
 * document or NULL with res set. */
static const prom__doc_t *task_check(octx_t *c, prom_result_t *res, const char *id, int64_t version,
                                     prom_task_state_t want)
{
    const prom__doc_t *d = ctx_find(c, id);
    if (!d || !d->has_task) {
        set_status(res, PROM_S_NOTFOUND, "Task not found");
        return NULL;
    }
    d = materialise(c, id);
    if (d->tstate != want) {
        set_status(res, PROM_S_CONFLICT,
                   want == PROM_TASK_PENDING ? "Task is not pending" : "Task is not acquired");
        return NULL;
    }
    if (d->tversion != version) {
        set_status(res, PROM_S_CONFLICT, "Version mismatch");
        return NULL;
    }
    return d;
}

int prom_task_acquire(prom_store_t *s, const char *id, int64_t version, const char *pid,
                      int64_t ttl, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    if (!id || !id[0] || !pid || !pid[0] || ttl <= 0) {
        set_status(res, PROM_S_BAD, "id and pid must not be empty and ttl must be positive");
    } else if (task_check(&c, res, id, version, PROM_TASK_PENDING)) {
        prom__doc_t *m = ctx_mut(&c, id);
        task_acquire(&c, m, pid, ttl);
        set_status(res, PROM_S_OK, NULL);
        res_task(res, m, c.now);
        res_promise(res, m, c.now);
        res_preload(&c, res, m);
    }
    return op_end(&c, res);
}

int prom_task_release(prom_store_t *s, const char *id, int64_t version, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    if (!id || !id[0]) {
        set_status(res, PROM_S_BAD, "id must not be empty");
    } else if (task_check(&c, res, id, version, PROM_TASK_ACQUIRED)) {
        task_dispatch(&c, ctx_mut(&c, id));
        set_status(res, PROM_S_OK, NULL);
    }
    return op_end(&c, res);
}

int prom_task_fulfill(prom_store_t *s, const char *id, int64_t version, const prom_settle_t *settle,
                      prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    if (!id || !id[0] || !settle || !settle->id || strcmp(settle->id, id) != 0 ||
        !settle_state_valid(settle->state)) {
        set_status(res, PROM_S_BAD, "The settle action must name the task's promise");
    } else if (task_check(&c, res, id, version, PROM_TASK_ACQUIRED)) {
        prom__doc_t *m = ctx_mut(&c, id);
        do_settle(&c, m, settle->state, settle->value, c.now);
        set_status(res, PROM_S_OK, NULL);
        res_promise(res, m, c.now);
    }
    return op_end(&c, res);
}

int prom_task_suspend(prom_store_t *s, const char *id, int64_t version, const char *const *awaited,
                      size_t n, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const char *bad = NULL;
    if (!id || !id[0] || n == 0)
        bad = "Suspend needs at least one awaited promise";
    for (size_t i = 0; !bad && i < n; i++) {
        if (!awaited[i] || !awaited[i][0] || strcmp(awaited[i], id) == 0)
            bad = "A task cannot await itself";
        else if (!same_origin(s->opts.lineage, awaited[i], id))
            bad = "Awaited promise has a different origin";
        for (size_t j = 0; !bad && j < i; j++)
            if (strcmp(awaited[i], awaited[j]) == 0)
                bad = "Duplicate awaited promise";
    }
    if (bad) {
        set_status(res, PROM_S_BAD, bad);
        goto done;
    }
    if (!task_check(&c, res, id, version, PROM_TASK_ACQUIRED))
        goto done;
    for (size_t i = 0; i < n; i++) {
        const prom__doc_t *a = ctx_find(&c, awaited[i]);
        if (!a) {
            set_status(res, PROM_S_UNPROCESSABLE, "Awaited promise not found");
            goto done;
        }
        if (!doc_external(a)) {
            set_status(res, PROM_S_UNPROCESSABLE, "Awaited promise is not awaitable");
            goto done;
        }
    }
    int settled = 0;
    for (size_t i = 0; i < n; i++)
        settled |= materialise(&c, awaited[i])->p.state != PROM_PENDING;
    if (settled) {
        set_status(res, PROM_S_PRELOAD, "An awaited promise is already settled");
        res_preload(&c, res, ctx_find(&c, id));
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        prom__doc_t *a = ctx_mut(&c, awaited[i]);
        int have = 0;
        for (size_t j = 0; j < a->nawaiters; j++)
            have |= strcmp(a->awaiters[j], id) == 0;
        if (!have) {
            a->awaiters = cap_realloc(a->awaiters, (a->nawaiters + 1) * sizeof(char *));
            a->awaiters[a->nawaiters++] = cap_strdup(id);
        }
    }
    prom__doc_t *m = ctx_mut(&c, id);
    m->tstate = PROM_TASK_SUSPENDED;
    task_clear_lease(m);
    m->ttimer = 0;
    set_status(res, PROM_S_OK, NULL);
done:
    return op_end(&c, res);
}

static int fence_begin(octx_t *c, prom_result_t *res, const char *id, int64_t version,
                       const char *action_id)
{
    if (!id || !id[0] || !action_id || !action_id[0] || strcmp(id, action_id) == 0) {
        set_status(res, PROM_S_BAD, "The fenced action must not name the task's promise");
        return -1;
    }
    if (!task_check(c, res, id, version, PROM_TASK_ACQUIRED))
        return -1;
    return 0;
}

int prom_task_fence_create(prom_store_t *s, const char *id, int64_t version,
                           const prom_create_t *create, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const char *bad = create_invalid(s, create);
    const prom__doc_t *d;
    prom_lineage_t mode = s->opts.lineage;
    if (!bad && mode != PROM_LINEAGE_OFF && id &&
        origin_len(mode, create->id) != strlen(create->id) && !same_origin(mode, id, create->id))
        bad = "The fenced action has a different origin";
    if (bad)
        set_status(res, PROM_S_BAD, bad);
    else if (fence_begin(&c, res, id, version, create->id) == 0) {
        res->action_status = do_create(&c, create, &d);
        res_promise(res, d, c.now);
        set_status(res, PROM_S_OK, NULL);
        res_preload(&c, res, ctx_find(&c, id));
    }
    return op_end(&c, res);
}

int prom_task_fence_settle(prom_store_t *s, const char *id, int64_t version,
                           const prom_settle_t *settle, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const prom__doc_t *d = NULL;
    if (!settle || !settle_state_valid(settle->state) ||
        (settle->id && id && !same_origin(s->opts.lineage, id, settle->id)))
        set_status(res, PROM_S_BAD, "Invalid fenced settle");
    else if (fence_begin(&c, res, id, version, settle->id) == 0) {
        res->action_status = do_settle_op(&c, settle, &d);
        if (d)
            res_promise(res, d, c.now);
        set_status(res, PROM_S_OK, NULL);
        res_preload(&c, res, ctx_find(&c, id));
    }
    return op_end(&c, res);
}

int prom_task_heartbeat(prom_store_t *s, const char *pid, const prom_task_ref_t *tasks, size_t n,
                        prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const char *bad = (!pid || !pid[0] || n == 0) ? "Heartbeat needs a pid and tasks" : NULL;
    for (size_t i = 0; !bad && i < n; i++)
        if (!tasks[i].id || !tasks[i].id[0] ||
            !same_origin(s->opts.lineage, tasks[i].id, tasks[0].id))
            bad = "Heartbeat tasks must share one origin";
    if (bad) {
        set_status(res, PROM_S_BAD, bad);
    } else {
        for (size_t i = 0; i < n; i++) {
            const prom__doc_t *d = ctx_find(&c, tasks[i].id);
            if (d && d->has_task && d->tstate == PROM_TASK_ACQUIRED &&
                d->tversion == tasks[i].version && d->tpid && strcmp(d->tpid, pid) == 0 &&
                doc_alive(d, c.now)) {
                prom__doc_t *m = ctx_mut(&c, tasks[i].id);
                m->ttimer = c.now + m->tttl;
            }
        }
        set_status(res, PROM_S_OK, NULL);
    }
    return op_end(&c, res);
}

int prom_task_halt(prom_store_t *s, const char *id, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const prom__doc_t *d = id ? ctx_find(&c, id) : NULL;
    if (!d || !d->has_task) {
        set_status(res, PROM_S_NOTFOUND, "Task not found");
    } else if (materialise(&c, id)->tstate == PROM_TASK_FULFILLED) {
        set_status(res, PROM_S_CONFLICT, "Task is fulfilled");
    } else {
        prom__doc_t *m = ctx_mut(&c, id);
        if (m->tstate != PROM_TASK_HALTED) {
            m->tstate = PROM_TASK_HALTED;
            task_clear_lease(m);
            m->ttimer = 0;
        }
        set_status(res, PROM_S_OK, NULL);
    }
    return op_end(&c, res);
}

int prom_task_continue(prom_store_t *s, const char *id, prom_result_t *res)
{
    octx_t c;
    op_begin(s, &c, res);
    const prom__doc_t *d = id ? ctx_find(&c, id) : NULL;
    if (!d || !d->has_task) {
        set_status(res, PROM_S_NOTFOUND, "Task not found");
    } else if (materialise(&c, id)->tstate != PROM_TASK_HALTED) {
        set_status(res, PROM_S_CONFLICT, "Task is not halted");
    } else {
        task_dispatch(&c, ctx_mut(&c, id));
        set_status(res, PROM_S_OK, NULL);
    }
    return op_end(&c, res);
}

/* ---------- timers ---------- */
/* Fires d's due timer into the working set. */
static void fire(octx_t *c, const char *id)
{
    const prom__doc_t *d = ctx_find(c, id);
    if (d->p.state == PROM_PENDING && c->now >= d->p.timeout_at) {
        materialise(c, id);
        return;
    }
    prom__doc_t *m = ctx_mut(c, id);
    if (m->tstate == PROM_TASK_PENDING) {
        m->ttimer = c->now + c->s->opts.retry_ms;
        ctx_msg(c, PROM_MSG_EXECUTE, prom_promise_tag(&m->p, "resonate:target"), m->p.id,
                m->tversion);
    } else if (m->tstate == PROM_TASK_ACQUIRED) {
        task_dispatch(c, m); /* lease expired */
    } else {
        m->ttimer = 0;
    }
}

int prom_store_tick(prom_store_t *s, int64_t now, size_t *fired)
{
    size_t total = 0;
    int rc = 0;
    for (;;) {
        octx_t c;
        memset(&c, 0, sizeof(c));
        c.s = s;
        c.now = now;
        pthread_mutex_lock(&s->mu);
        evict_some(s, PROM_EVICT_PER_OP + PROM_MAX_BATCH_DOCS); /* a tick installs up to 256 */
        size_t nf = 0;
        /* Timers fire in (deadline, id) order. A document already changed by an earlier timer's
         * effects in this batch is judged by its new state: within a tick, deadlines only move
         * past `now` (or vanish), so an entry still equal to its deadline is due exactly once. */
        while (s->nheap && s->heap[0].at <= now && c.n < PROM_MAX_BATCH_DOCS) {
            theap_ent_t e = heap_pop(s);
            /* memory only: a document with a deadline is resident, an evicted one has none */
            const prom__doc_t *d = ctx_find_mem(&c, e.id);
            if (d && doc_deadline(d) == e.at) {
                fire(&c, e.id);
                nf++;
            }
            cap_free(e.id);
        }
        int more = s->nheap && s->heap[0].at <= now;
        prom__wait_t w = {0};
        rc = ctx_commit(&c, &w, NULL, 0);
        uint64_t seen = s->last_seq;
        if (rc != 0)
            heap_rebuild(s); /* the popped entries must come back */
        ctx_free(&c);
        pthread_mutex_unlock(&s->mu);
        if (rc == 0)
            rc = ctx_wait(s, &w, seen);
        ctx_notify(s, &c, rc);
        if (rc != 0)
            break;
        total += nf;
        if (!more)
            break;
    }
    if (fired)
        *fired = total;
    return rc;
}

int64_t prom_store_next_deadline(prom_store_t *s)
{
    pthread_mutex_lock(&s->mu);
    /* drop stale tops so the answer is exact */
    while (s->nheap) {
        const prom__doc_t *d = smap_get(&s->docs, s->heap[0].id);
        if (d && doc_deadline(d) == s->heap[0].at)
            break;
        cap_free(heap_pop(s).id);
    }
    int64_t t = s->nheap ? s->heap[0].at : INT64_MAX;
    pthread_mutex_unlock(&s->mu);
    return t;
}

/* ---------- outbox ---------- */
int prom_outbox_take(prom_store_t *s, size_t max, prom_msg_t **msgs, size_t *n)
{
    octx_t c;
    prom_result_t dummy;
    op_begin(s, &c, &dummy);
    size_t k = s->outlen < max ? s->outlen : max;
    prom_msg_t *out = k ? cap_calloc(k, sizeof(*out)) : NULL;
    for (size_t i = 0; i < k; i++) {
        prom__msg_t *m = &s->outq[s->outhead + i];
        out[i].mid = m->mid;
        out[i].kind = (prom_msg_kind_t)m->kind;
        out[i].address = cap_strdup(m->address);
        out[i].id = cap_strdup(m->id);
        out[i].version = m->version;
        if (m->kind == PROM_MSG_UNBLOCK) {
            const prom__doc_t *d = doc_get(s, m->id);
            if (d) {
                out[i].promise = cap_calloc(1, sizeof(prom_promise_t));
                project(d, c.now, out[i].promise);
            }
        }
    }
    if (k) {
        c.has_del = 1;
        c.del_first = s->outq[s->outhead].mid;
        c.del_last = s->outq[s->outhead + k - 1].mid;
    }
    prom__wait_t w = {0};
    int rc = s->load_err ? s->load_err : ctx_commit(&c, &w, NULL, 0);
    if (rc == 0 && k) {
        for (size_t i = 0; i < k; i++)
            prom__msg_clear(&s->outq[s->outhead + i]);
        s->outhead += k;
        s->outlen -= k;
    }
    uint64_t seen = s->last_seq;
    ctx_free(&c);
    pthread_mutex_unlock(&s->mu);
    if (rc == 0)
        rc = ctx_wait(s, &w, seen);
    if (rc != 0) {
        prom_msgs_free(out, k);
        return rc;
    }
    *msgs = out;
    *n = k;
    return 0;
}

void prom_msgs_free(prom_msg_t *msgs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        cap_free(msgs[i].address);
        cap_free(msgs[i].id);
        if (msgs[i].promise) {
            prom_promise_clear(msgs[i].promise);
            cap_free(msgs[i].promise);
        }
    }
    cap_free(msgs);
}

size_t prom_outbox_len(prom_store_t *s)
{
    pthread_mutex_lock(&s->mu);
    size_t n = s->outlen;
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* ---------- apply (writer thread) ---------- */
/* Keeps prom.live and prom.branch for one document written to prom.docs in txn: live = pending;
 * created (the first record of the promise) with its branch adds the branch entry (put again on a
 * replay: the same pair is a no-op). */
static int index_doc(prom_store_t *s, store_txn_t *txn, store_val_t id, int live, int created,
                     const void *branch, size_t blen)
{
    int rc;
    if (live)
        rc = store_put(txn, s->dbi_live, id, (store_val_t){"", 0}, 0);
    else if (created)
        rc = 0; /* created settled: never was live */
    else
        rc = store_del(txn, s->dbi_live, id, NULL);
    if (rc == CAP_ENOTFOUND)
        rc = 0;
    if (rc == 0 && branch) {
        uint8_t hk[8];
        rc = store_put(txn, s->dbi_branch, store_key_u64(hk, cap_hash64(branch, blen)), id, 0);
        if (rc == CAP_EEXIST)
            rc = 0;
    }
    return rc;
}

static int prom_apply(void *arg, store_txn_t *txn, const wal_entry_t *e)
{
    prom_store_t *s = arg;
    int rc = 0;
    if (e->kind < PROM_REC_FIRST || e->kind > PROM_REC_LAST) {
        if (s->opts.wal.apply)
            rc = s->opts.wal.apply(s->opts.wal.apply_arg, txn, e);
        goto out;
    }
    const wal_field_t *f1 = wal_entry_field(e, 1);
    if (e->kind == PROM_REC_DOC) {
        if (!f1 || !e->key_len) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        /* checkpoint mode: documents reach prom.docs through the flusher, not per record */
        if (s->opts.checkpoint_ms > 0)
            goto out;
        uint8_t mb[8];
        store_val_t id = {e->key, e->key_len};
        rc = store_put(txn, s->dbi_docs, id, (store_val_t){f1->data, f1->len}, 0);
        if (rc == 0)
            rc = store_put(txn, s->dbi_meta, (store_val_t){"docs_seq", 8},
                           store_key_u64(mb, e->seq), 0);
        const wal_field_t *f2 = wal_entry_field(e, 2), *f3 = wal_entry_field(e, 3);
        if (rc == 0 && f2)
            rc = index_doc(s, txn, id, f2->u & PROM_DOC_LIVE, f2->u & PROM_DOC_CREATED,
                           f3 ? f3->data : NULL, f3 ? f3->len : 0);
    } else if (e->kind == PROM_REC_MSG_ADD) {
        if (!f1 || e->key_len != 8) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        store_val_t k = {e->key, e->key_len}, v = {f1->data, f1->len};
        rc = store_put(txn, s->dbi_outbox, k, v, 0);
    } else if (e->kind == PROM_REC_MSG_DEL) {
        const wal_field_t *f2 = wal_entry_field(e, 2);
        if (!f1 || !f2) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        if (f2->u < f1->u || f2->u - f1->u > (1u << 24)) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        for (uint64_t id = f1->u; id <= f2->u && rc == 0; id++) {
            uint8_t kb[8];
            int r = store_del(txn, s->dbi_outbox, store_key_u64(kb, id), NULL);
            if (r != 0 && r != CAP_ENOTFOUND)
                rc = r;
        }
    }
out:
    return rc;
}

/* ---------- open / close ---------- */
static int open_dbis(store_txn_t *txn, void *arg)
{
    prom_store_t *s = arg;
    int rc = store_dbi_open(txn, "prom.docs", STORE_DB_CREATE, &s->dbi_docs);
    if (rc == 0)
        rc = store_dbi_open(txn, "prom.outbox", STORE_DB_CREATE, &s->dbi_outbox);
    if (rc == 0)
        rc = store_dbi_open(txn, "prom.meta", STORE_DB_CREATE, &s->dbi_meta);
    if (rc == 0)
        rc = store_dbi_open(txn, "prom.live", STORE_DB_CREATE, &s->dbi_live);
    if (rc == 0)
        rc = store_dbi_open(txn, "prom.branch", STORE_DB_CREATE | STORE_DB_DUPSORT, &s->dbi_branch);
    if (rc)
        return rc;
    /* a store written before prom.live / prom.branch existed: build them from prom.docs, once */
    store_val_t v;
    rc = store_get(txn, s->dbi_meta, (store_val_t){"indexes", 7}, &v);
    if (rc != CAP_ENOTFOUND)
        return rc;
    store_cursor_t *cur = NULL;
    store_val_t k;
    rc = store_cursor_open(txn, s->dbi_docs, &cur);
    int r = rc ? rc : store_cursor_get(cur, &k, &v, STORE_FIRST);
    while (r == 0) {
        prom__doc_t *d;
        rc = prom__doc_decode(v.data, v.len, &d);
        if (rc) {
            cap_log(CAP_LOG_ERROR, "promise",
                    "%s: prom.docs: the document of \"%.*s\" does not decode",
                    store_env_path(s->env), (int)(k.len < 200 ? k.len : 200), (const char *)k.data);
            break;
        }
        const char *b = prom_promise_tag(&d->p, "resonate:branch");
        rc = index_doc(s, txn, k, d->p.state == PROM_PENDING, 1, b, b ? strlen(b) : 0);
        prom__doc_free(d);
        if (rc)
            break;
        r = store_cursor_get(cur, &k, &v, STORE_NEXT);
    }
    store_cursor_close(cur);
    if (rc == 0 && r != CAP_ENOTFOUND)
        rc = r;
    if (rc == 0)
        rc = store_put(txn, s->dbi_meta, (store_val_t){"indexes", 7}, (store_val_t){"1", 1}, 0);
    return rc;
}

static int load(prom_store_t *s)
{
    store_txn_t *txn = NULL;
    store_cursor_t *cur = NULL;
    store_val_t k, v;
    int rc = store_txn_begin(s->env, 1, &txn);
    if (rc)
        goto out;
    rc = store_get(txn, s->dbi_meta, (store_val_t){"docs_seq", 8}, &v);
    if (rc == 0 && v.len != 8)
        rc = CAP_ECORRUPT;
    if (rc == 0)
        s->flushed_seq = cap_get_be64(v.data);
    else if (rc != CAP_ENOTFOUND)
        goto out;
    /* the live set only: prom.live names the pending documents */
    rc = store_cursor_open(txn, s->dbi_live, &cur);
    if (rc)
        goto out;
    int r = store_cursor_get(cur, &k, &v, STORE_FIRST);
    while (r == 0) {
        prom__doc_t *d;
        rc = store_get(txn, s->dbi_docs, k, &v);
        if (rc == 0)
            rc = prom__doc_decode(v.data, v.len, &d);
        if (rc) {
            rc = CAP_ECORRUPT;
            cap_log(CAP_LOG_ERROR, "promise",
                    "%s: prom.docs: the live document \"%.*s\" is missing or does not decode",
                    store_env_path(s->env), (int)(k.len < 200 ? k.len : 200), (const char *)k.data);
            goto out;
        }
        store_install(s, d, 0);
        r = store_cursor_get(cur, &k, &v, STORE_NEXT);
    }
    store_cursor_close(cur);
    cur = NULL;
    rc = store_cursor_open(txn, s->dbi_outbox, &cur);
    if (rc)
        goto out;
    r = store_cursor_get(cur, &k, &v, STORE_FIRST);
    while (r == 0) {
        if (k.len != 8) {
            rc = CAP_ECORRUPT;
            goto out;
        }
        if (s->outlen == s->outcap) {
            s->outcap = s->outcap ? s->outcap * 2 : 64;
            s->outq = cap_realloc(s->outq, s->outcap * sizeof(prom__msg_t));
        }
        uint64_t mid = cap_get_be64(k.data);
        rc = prom__msg_decode(v.data, v.len, mid, &s->outq[s->outlen]);
        if (rc)
            goto out;
        s->outlen++;
        s->next_mid = mid + 1;
        r = store_cursor_get(cur, &k, &v, STORE_NEXT);
    }
    rc = r == CAP_ENOTFOUND ? 0 : r;
out:
    store_cursor_close(cur);
    store_txn_abort(txn);
    return rc;
}

/* ---------- the checkpoint of prom.docs ----------
 * Documents are not written to prom.docs inside the group commit (a random-key B-tree put per
 * record roughly halved throughput): the log is the truth, and a flusher thread checkpoints the
 * changed documents every 50 ms. Under s->mu it encodes every dirty document and takes
 * mark = s->last_seq (the documents then reflect exactly the records up to mark), waits until mark
 * is durable, and writes the documents plus prom.meta "docs_seq" = mark in one transaction. Open
 * loads prom.docs and replays the PROM_REC_DOC records after docs_seq from the log. The log must
 * therefore not be truncated past prom_store_checkpoint_seq(). */
typedef struct flush_ent {
    char *id;
    uint8_t *buf;
    size_t len;
    int live;
} flush_ent_t;
typedef struct flush_batch {
    prom_store_t *s;
    size_t n;
    flush_ent_t *e; /* sorted by id before the write */
    size_t nbr;
    seq_id_t *br; /* branch entries (copies) up to mark */
    uint64_t mark;
} flush_batch_t;

static int flush_ent_cmp(const void *a, const void *b)
{
    return strcmp(((const flush_ent_t *)a)->id, ((const flush_ent_t *)b)->id);
}

static int flush_write(store_txn_t *txn, void *arg)
{
    flush_batch_t *b = arg;
    int rc = 0;
    uint8_t mb[8];
    for (size_t i = 0; i < b->n && rc == 0; i++) {
        store_val_t id = {b->e[i].id, strlen(b->e[i].id)};
        rc = store_put(txn, b->s->dbi_docs, id, (store_val_t){b->e[i].buf, b->e[i].len}, 0);
        if (rc == 0)
            rc = index_doc(b->s, txn, id, b->e[i].live, 0, NULL, 0);
    }
    /* the branch entries only (live 0 + created 1 leaves prom.live alone: the document's own
     * entry above keeps it) */
    for (size_t i = 0; i < b->nbr && rc == 0; i++)
        rc = index_doc(b->s, txn, (store_val_t){b->br[i].id, strlen(b->br[i].id)}, 0, 1,
                       b->br[i].branch, strlen(b->br[i].branch));
    if (rc == 0)
        rc = store_put(txn, b->s->dbi_meta, (store_val_t){"docs_seq", 8},
                       store_key_u64(mb, b->mark), 0);
    return rc;
}

/* Checkpoints the dirty documents. Called with s->mu held; returns with it held. One checkpoint
 * at a time: flushed_seq = mark claims every earlier batch written. Operations wait for s->mu,
 * so it is held only to take the batch (pointer moves: the bytes were encoded by the ops) and to
 * publish the new mark; sorting, writing and freeing run without it. Eviction is left to the
 * operations (bounded per op). */
static int flush_locked(prom_store_t *s)
{
    flush_batch_t b = {0};
    int rc = 0;
    while (s->flushing)
        pthread_cond_wait(&s->fdone, &s->mu);
    b.s = s;
    b.mark = s->last_seq;
    if (s->ndirty == 0 && s->flushed_seq >= b.mark)
        return 0;
    s->flushing = 1;
    s->flushing_n = s->ndirty;
    b.n = s->ndirty;
    b.e = cap_calloc(b.n + 1, sizeof(flush_ent_t));
    for (size_t i = 0; i < b.n; i++) {
        prom__doc_t *d = smap_get(&s->docs, s->dirty[i]); /* a dirty document is never evicted */
        d->dirty = 0;
        b.e[i].id = s->dirty[i];
        b.e[i].live = d->p.state == PROM_PENDING;
        if (d->enc) { /* the bytes its record carried */
            b.e[i].buf = d->enc;
            b.e[i].len = d->enclen;
            d->enc = NULL;
        } else {
            prom__doc_encode(d, &b.e[i].buf, &b.e[i].len);
        }
    }
    b.br = cap_calloc(s->pbranch.len + 1, sizeof(seq_id_t));
    for (size_t i = 0; i < s->pbranch.len; i++) {
        const seq_id_t *e = &s->pbranch.v[s->pbranch.head + i];
        if (e->seq <= b.mark)
            b.br[b.nbr++] = (seq_id_t){e->seq, cap_strdup(e->id), cap_strdup(e->branch)};
    }
    cap_free(s->dirty);
    s->dirty = NULL;
    s->ndirty = s->capdirty = 0;
    pthread_mutex_unlock(&s->mu);
    /* in key order: the puts walk prom.docs and prom.live left to right */
    if (b.n > 1)
        qsort(b.e, b.n, sizeof(flush_ent_t), flush_ent_cmp);
    rc = wait_seq(s, b.mark);
    if (rc == 0)
        rc = store_env_write(s->env, flush_write, &b);
    for (size_t i = 0; i < b.n; i++) {
        cap_free(b.e[i].buf);
        if (rc == 0) {
            cap_free(b.e[i].id);
            b.e[i].id = NULL;
        }
    }
    for (size_t i = 0; i < b.nbr; i++) {
        cap_free(b.br[i].id);
        cap_free(b.br[i].branch);
    }
    cap_free(b.br);
    pthread_mutex_lock(&s->mu);
    if (rc == 0) {
        if (b.mark > s->flushed_seq)
            s->flushed_seq = b.mark;
        s->st.checkpoints++;
        s->st.checkpoint_docs += b.n;
    } else {
        cap_log(CAP_LOG_ERROR, "promise",
                "checkpoint of prom.docs failed: %s (the log keeps "
                "the state; the next open replays it)",
                cap_strerror(rc));
        for (size_t i = 0; i < b.n; i++) {
            prom__doc_t *d = smap_get(&s->docs, b.e[i].id);
            if (d && !d->dirty) { /* not written: dirty again (not evictable, in the next one) */
                d->dirty = 1;
                if (s->ndirty == s->capdirty) {
                    s->capdirty = s->capdirty ? s->capdirty * 2 : 256;
                    s->dirty = cap_realloc(s->dirty, s->capdirty * sizeof(char *));
                }
                s->dirty[s->ndirty++] = b.e[i].id;
            } else {
                cap_free(b.e[i].id);
            }
        }
    }
    cap_free(b.e);
    s->flushing = 0;
    s->flushing_n = 0;
    pthread_cond_broadcast(&s->fdone);
    return rc;
}

static void *flusher_main(void *arg)
{
    prom_store_t *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->closing) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += s->opts.checkpoint_ms / 1000;
        ts.tv_nsec += (long)(s->opts.checkpoint_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&s->fcv, &s->mu, &ts);
        if (s->ndirty)
            flush_locked(s);
    }
    flush_locked(s);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int prom_store_checkpoint(prom_store_t *s)
{
    if (s->opts.checkpoint_ms < 0) { /* the apply wrote every document with its record */
        pthread_mutex_lock(&s->mu);
        uint64_t seen = s->last_seq;
        pthread_mutex_unlock(&s->mu);
        return wait_seq(s, seen);
    }
    pthread_mutex_lock(&s->mu);
    int rc = flush_locked(s);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

uint64_t prom_store_checkpoint_seq(prom_store_t *s)
{
    uint64_t v;
    if (s->opts.checkpoint_ms <= 0) {
        /* every document is in prom.docs with its record: the whole durable log is covered */
        pthread_mutex_lock(&s->dmu);
        v = s->durable_seq;
        pthread_mutex_unlock(&s->dmu);
        return v;
    }
    pthread_mutex_lock(&s->mu);
    v = s->flushed_seq;
    pthread_mutex_unlock(&s->mu);
    return v;
}

/* Replays the document records after the checkpoint (the open path). */
static int replay(prom_store_t *s)
{
    wal_iter_t *it = NULL;
    wal_iter_opts_t io = {0};
    wal_entry_t e;
    io.from_seq = s->flushed_seq + 1;
    io.kind = PROM_REC_DOC;
    io.decode = 1;
    int rc = wal_iter_open(s->wal, &io, &it);
    if (rc)
        goto out;
    while ((rc = wal_iter_next(it, &e)) == 0) {
        const wal_field_t *f = wal_entry_field(&e, 1);
        prom__doc_t *d;
        rc = f ? prom__doc_decode(f->data, f->len, &d) : CAP_ECORRUPT;
        if (rc) {
            cap_log(CAP_LOG_ERROR, "promise", "wal record %llu: not a valid promise document",
                    (unsigned long long)e.seq);
            goto out;
        }
        /* its branch entry may not be in prom.branch yet (checkpoint mode writes it with the
         * document): the next checkpoint puts it (again: idempotent) */
        const char *br = prom_promise_tag(&d->p, "resonate:branch");
        d->seq = e.seq;
        if (br)
            fifo_push(&s->pbranch, e.seq, d->p.id, br);
        store_install(s, d, 1);
    }
    if (rc == CAP_ECORRUPT)
        cap_log(CAP_LOG_ERROR, "promise", "replay: %s", wal_iter_error(it));
    rc = rc == CAP_ENOTFOUND ? 0 : rc;
out:
    wal_iter_close(it);
    return rc;
}

int prom_store_open(store_env_t *env, const prom_opts_t *opts, prom_store_t **out)
{
    prom_store_t *s = cap_calloc(1, sizeof(*s));
    int rc;
    s->env = env;
    if (opts)
        s->opts = *opts;
    if (s->opts.retry_ms <= 0)
        s->opts.retry_ms = 30000;
    if (!s->opts.preload_limit)
        s->opts.preload_limit = 1000;
    if (s->opts.checkpoint_ms == 0)
        s->opts.checkpoint_ms = PROM_CHECKPOINT_MS_DEFAULT; /* < 0: tables in each commit */
    s->settled_cache = s->opts.settled_cache < 0    ? 0
                       : s->opts.settled_cache == 0 ? 1024
                                                    : (size_t)s->opts.settled_cache;
    s->next_mid = 1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->dmu, NULL);
    pthread_cond_init(&s->dcv, NULL);
    pthread_cond_init(&s->fdone, NULL);
    rc = store_env_write(env, open_dbis, s);
    if (rc)
        goto out;
    wal_opts_t wo = s->opts.wal;
    wo.apply = prom_apply;
    wo.apply_arg = s;
    /* the log first: its open may re-apply records from its journal (prom_apply writes the
     * tables), and load() must see them */
    rc = wal_log_open(env, &wo, &s->wal);
    if (rc)
        goto out;
    rc = load(s);
    if (rc)
        goto out;
    s->track_dirty = 1;
    rc = replay(s);
    if (rc)
        goto out;
    wal_stats_t ws;
    wal_log_stats(s->wal, &ws);
    s->last_seq = s->durable_seq = ws.last_seq; /* everything stored is durable */
    if (s->opts.checkpoint_ms > 0) {
        pthread_cond_init(&s->fcv, NULL);
        if (pthread_create(&s->flusher, NULL, flusher_main, s) != 0) {
            pthread_cond_destroy(&s->fcv);
            rc = -EAGAIN;
            goto out;
        }
        (void)pthread_setname_np(s->flusher, "capsule-flush");
        s->flusher_on = 1;
    } else {
        /* documents replayed after a checkpoint-mode run's last checkpoint: write them now */
        pthread_mutex_lock(&s->mu);
        if (s->ndirty)
            rc = flush_locked(s);
        s->track_dirty = 0;
        pthread_mutex_unlock(&s->mu);
        if (rc)
            goto out;
    }
    *out = s;
out:
    if (rc)
        prom_store_close(s);
    return rc;
}

void prom_store_close(prom_store_t *s)
{
    if (!s)
        return;
    if (s->flusher_on) {
        pthread_mutex_lock(&s->mu);
        s->closing = 1;
        pthread_cond_signal(&s->fcv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->flusher, NULL);
        pthread_cond_destroy(&s->fcv);
    }
    wal_log_close(s->wal);
    for (size_t i = 0; i < s->ndirty; i++)
        cap_free(s->dirty[i]);
    cap_free(s->dirty);
    for (size_t i = 0; i < s->docs.cap; i++)
        prom__doc_free(s->docs.e[i].val);
    prom__smap_free(&s->docs);
    fifo_free(&s->evq);
    fifo_free(&s->pbranch);
    while (s->nheap)
        cap_free(heap_pop(s).id);
    cap_free(s->heap);
    for (size_t i = 0; i < s->outlen; i++)
        prom__msg_clear(&s->outq[s->outhead + i]);
    cap_free(s->outq);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->dmu);
    pthread_cond_destroy(&s->dcv);
    pthread_cond_destroy(&s->fdone);
    cap_free(s);
}

void prom_store_stats(prom_store_t *s, prom_store_stats_t *out)
{
    pthread_mutex_lock(&s->mu);
    evict_some(s, SIZE_MAX); /* everything evictable: the counts are exact */
    *out = s->st;
    out->resident_docs = s->docs.n;
    out->unflushed_docs = s->opts.checkpoint_ms > 0 ? s->ndirty + s->flushing_n : 0;
    pthread_mutex_unlock(&s->mu);
}

wal_log_t *prom_store_wal(prom_store_t *s)
{
    return s->wal;
}
