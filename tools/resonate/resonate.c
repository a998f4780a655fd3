/*
 * resonate.c - the Resonate protocol (2026-04-01) on capsule-engine's promise store: `POST /`
 * envelopes mapped 1:1 onto prom_* calls, the `GET /poll/{group}/{id}` SSE stream fed from the
 * durable outbox, `/health` and `/ready`. Facts: /work/shared/reference/resonate-protocol.md
 * (§2 wire, §3 state machines, §6.2 what SDK 0.11.5 needs).
 *
 * Invariants:
 *   - HTTP status == envelope status; every answer is JSON (application/json), including 400,
 *     401, 404 and 501; on any status other than 200/300 `data` is a JSON string; `kind` and
 *     `head.corrId` are echoed as sent; no field is ever null (absent optionals are omitted).
 *   - the loop thread only parses the body (srv_json_parse: depth limit, no duplicate keys) and
 *     checks the envelope; reading `data`, the prom_* call (which blocks until durable) and
 *     building the answer run on one of the front end's threads. A job's JSON belongs to one
 *     thread at a time (handed over under the queue mutex).
 *   - ids beginning "capsule/" and tags beginning "capsule:" belong to the engine's own promises
 *     (sessions, executions, inputs) and are refused (400); promise.search skips them, so the
 *     protocol can neither read nor change engine state.
 *   - outbox messages are taken (durably removed) only while at least one poller is connected,
 *     so with nobody polling nothing is lost. A message taken for a poller that is absent is
 *     parked in memory (bounded) and sent when that poller connects; a crash loses parked
 *     messages (an `execute` is re-sent by the task retry timer; an `unblock` is re-requested by
 *     the SDK's periodic register_listener), as with the Resonate server's at-most-once outbox.
 *   - timers (promise deadlines, task retry and lease) are fired by prom_store_tick on a thread,
 *     checked every tick_ms.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cap.h"
#include "rsn.h"

#define VERSION      "2026-04-01"
#define RESERVED_ID  "capsule/"
#define RESERVED_TAG "capsule:"
#define MSG_TAKE     256
#define MAX_ARRAY    1000 /* suspend actions, heartbeat tasks */

typedef struct ans ans_t;
typedef void (*op_fn)(rsn_t *r, json_t *data, ans_t *a);

typedef struct op {
    const char *kind;
    op_fn fn; /* NULL: not implemented (501) */
} op_t;

/* What an operation answers: status, then `data` (200/300) or a message. Arrays allocated while
 * reading the request are freed when the job ends. */
struct ans {
    int status;
    json_t *data;
    char msg[256];
    void *tofree[8];
    int ntofree;
};

enum { J_OP, J_DRAIN, J_TICK };

typedef struct job {
    struct job *next;
    int type;
    rsn_t *r;
    srv_req_t *req; /* loop only; NULL once the client went away */
    json_t *env;    /* J_OP: the request envelope (owned) */
    const op_t *op;
    json_t *answer; /* J_OP: the response envelope, built by the thread */
    int status;
    size_t outbox;    /* messages waiting after the job */
    prom_msg_t *msgs; /* J_DRAIN */
    size_t nmsgs;
    int rc;
} job_t;

typedef struct poller {
    struct poller *next;
    rsn_t *r;
    srv_req_t *req;
    char *group, *id;
} poller_t;

typedef struct parked {
    struct parked *next;
    prom_msg_t *m; /* an array of one (prom_msgs_free frees it) */
} parked_t;

struct rsn {
    uv_loop_t *loop;
    srv_server_t *srv;
    prom_store_t *ps;
    rsn_opts_t o;
    char *url;
    /* thread pool */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job_t *qhead, *qtail; /* to the threads */
    job_t *dhead, *dtail; /* back to the loop */
    int stop;
    pthread_t *thr;
    uint32_t nthr;
    uv_async_t async;
    uv_timer_t timer;
    int nclosed;
    /* loop only */
    poller_t *pollers;
    uint32_t npollers;
    uint64_t rr;
    parked_t *phead, *ptail;
    uint32_t nparked;
    int drain_busy, tick_busy, closing;
    rsn_stats_t st;
};

/* ------------------------------------------------------------------------------------------ */
/* answers                                                                                     */

static void fail(ans_t *a, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(ans_t *a, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->msg, sizeof(a->msg), fmt, ap);
    va_end(ap);
    a->status = status;
    json_decref(a->data);
    a->data = NULL;
}

static void *keep(ans_t *a, void *p)
{
    if (a->ntofree < (int)(sizeof(a->tofree) / sizeof(a->tofree[0])))
        a->tofree[a->ntofree++] = p;
    else
        abort(); /* a programming error: more arrays than slots */
    return p;
}

/* Takes a prom_* outcome: a system failure is a 500, a protocol refusal its status + message. */
static int outcome(ans_t *a, int rc, const prom_result_t *res)
{
    if (rc < 0) {
        cap_log(CAP_LOG_ERROR, "resonate", "promise store failure: %s", cap_strerror(rc));
        fail(a, 500, "Internal error: %s", cap_strerror(rc));
        return -1;
    }
    a->status = res->status;
    if (res->status != PROM_S_OK && res->status != PROM_S_PRELOAD) {
        fail(a, res->status, "%s", res->message ? res->message : "Error");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* reading `data`                                                                              */

/* Each getter returns 0, or -1 with a 400 in `a`. `req`: the member must be present. */
static int f_str(ans_t *a, json_t *o, const char *k, int req, const char **out)
{
    json_t *v = json_object_get(o, k);
    *out = NULL;
    if (!v) {
        if (req)
            fail(a, 400, "Missing field '%s'", k);
        return req ? -1 : 0;
    }
    if (!json_is_string(v)) {
        fail(a, 400, "Field '%s' must be a string", k);
        return -1;
    }
    *out = json_string_value(v);
    return 0;
}

static int f_id(ans_t *a, json_t *o, const char *k, const char **out)
{
    if (f_str(a, o, k, 1, out))
        return -1;
    if (strncmp(*out, RESERVED_ID, strlen(RESERVED_ID)) == 0) {
        fail(a, 400, "Ids beginning with '" RESERVED_ID "' are reserved for the engine");
        return -1;
    }
    return 0;
}

static int f_i64(ans_t *a, json_t *o, const char *k, int req, int64_t *out)
{
    json_t *v = json_object_get(o, k);
    if (!v) {
        if (req)
            fail(a, 400, "Missing field '%s'", k);
        return req ? -1 : 0;
    }
    if (!json_is_integer(v)) {
        fail(a, 400, "Field '%s' must be an integer", k);
        return -1;
    }
    *out = json_integer_value(v);
    return 0;
}

static int f_obj(ans_t *a, json_t *o, const char *k, int req, json_t **out)
{
    json_t *v = json_object_get(o, k);
    *out = NULL;
    if (!v) {
        if (req)
            fail(a, 400, "Missing field '%s'", k);
        return req ? -1 : 0;
    }
    if (!json_is_object(v)) {
        fail(a, 400, "Field '%s' must be an object", k);
        return -1;
    }
    *out = v;
    return 0;
}

/* An object of string values as a prom_kv_t array (strings borrowed from the JSON). */
static int f_map(ans_t *a, json_t *o, const char *k, int tags, prom_kv_t **kv, size_t *n)
{
    json_t *m;
    *kv = NULL;
    *n = 0;
    if (f_obj(a, o, k, 0, &m))
        return -1;
    if (!m)
        return 0;
    size_t cnt = json_object_size(m);
    if (cnt == 0)
        return 0;
    prom_kv_t *arr = keep(a, cap_calloc(cnt, sizeof(*arr)));
    const char *key;
    json_t *v;
    size_t i = 0;
    json_object_foreach(m, key, v)
    {
        if (!json_is_string(v)) {
            fail(a, 400, "'%s.%s' must be a string", k, key);
            return -1;
        }
        if (tags && strncmp(key, RESERVED_TAG, strlen(RESERVED_TAG)) == 0) {
            fail(a, 400, "Tags beginning with '" RESERVED_TAG "' are reserved for the engine");
            return -1;
        }
        arr[i].key = (char *)key;
        arr[i].value = (char *)json_string_value(v);
        i++;
    }
    *kv = arr;
    *n = cnt;
    return 0;
}

/* param / value: {headers?: {k: v}, data?: string}. *present = 0 when the member is absent. */
static int f_value(ans_t *a, json_t *o, const char *k, prom_value_t *v, int *present)
{
    json_t *m;
    memset(v, 0, sizeof(*v));
    *present = 0;
    if (f_obj(a, o, k, 0, &m))
        return -1;
    if (!m)
        return 0;
    *present = 1;
    if (f_map(a, m, "headers", 0, &v->headers, &v->nheaders))
        return -1;
    json_t *d = json_object_get(m, "data");
    if (d && !json_is_string(d)) {
        fail(a, 400, "'%s.data' must be a string", k);
        return -1;
    }
    if (d) {
        v->data = (void *)json_string_value(d);
        v->len = json_string_length(d);
    }
    return 0;
}

static int f_state(ans_t *a, json_t *o, prom_state_t *st)
{
    const char *s;
    if (f_str(a, o, "state", 1, &s))
        return -1;
    if (strcmp(s, "resolved") == 0)
        *st = PROM_RESOLVED;
    else if (strcmp(s, "rejected") == 0)
        *st = PROM_REJECTED;
    else if (strcmp(s, "rejected_canceled") == 0)
        *st = PROM_REJECTED_CANCELED;
    else {
        fail(a, 400, "Field 'state' must be resolved, rejected or rejected_canceled");
        return -1;
    }
    return 0;
}

typedef struct create_in {
    prom_create_t c;
    prom_value_t param;
} create_in_t;

static int f_create(ans_t *a, json_t *d, create_in_t *in)
{
    int present;
    memset(in, 0, sizeof(*in));
    prom_kv_t *tags;
    if (f_id(a, d, "id", &in->c.id) || f_i64(a, d, "timeoutAt", 1, &in->c.timeout_at) ||
        f_value(a, d, "param", &in->param, &present) || f_map(a, d, "tags", 1, &tags, &in->c.ntags))
        return -1;
    in->c.tags = tags;
    in->c.param = present ? &in->param : NULL;
    return 0;
}

typedef struct settle_in {
    prom_settle_t s;
    prom_value_t value;
} settle_in_t;

static int f_settle(ans_t *a, json_t *d, settle_in_t *in)
{
    int present;
    memset(in, 0, sizeof(*in));
    if (f_id(a, d, "id", &in->s.id) || f_state(a, d, &in->s.state) ||
        f_value(a, d, "value", &in->value, &present))
        return -1;
    in->s.value = present ? &in->value : NULL;
    return 0;
}

/* An inner action envelope {kind, head?, data}: its kind must be `want` (or one of two). */
static int f_action(ans_t *a, json_t *action, const char *want1, const char *want2,
                    const char **kind, const char **corr, json_t **data)
{
    if (!json_is_object(action)) {
        fail(a, 400, "An action must be an object");
        return -1;
    }
    if (f_str(a, action, "kind", 1, kind))
        return -1;
    if (strcmp(*kind, want1) != 0 && (!want2 || strcmp(*kind, want2) != 0)) {
        if (want2)
            fail(a, 400, "The action kind must be %s or %s", want1, want2);
        else
            fail(a, 400, "The action kind must be %s", want1);
        return -1;
    }
    json_t *head = json_object_get(action, "head");
    *corr = "";
    if (head && json_is_object(head) && json_is_string(json_object_get(head, "corrId")))
        *corr = json_string_value(json_object_get(head, "corrId"));
    return f_obj(a, action, "data", 1, data);
}

/* ------------------------------------------------------------------------------------------ */
/* records (resonate-protocol.md §2.2: absent optionals omitted, never null)                    */

static json_t *j_value(const prom_value_t *v)
{
    json_t *o = json_object();
    if (v->nheaders || v->data) {
        json_t *h = json_object();
        for (size_t i = 0; i < v->nheaders; i++)
            json_object_set_new(h, v->headers[i].key, json_string(v->headers[i].value));
        json_object_set_new(o, "headers", h);
    }
    if (v->data) {
        json_t *d = json_stringn(v->data, v->len);
        if (d)
            json_object_set_new(o, "data", d);
    }
    return o;
}

static json_t *j_promise(const prom_promise_t *p)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(p->id));
    json_object_set_new(o, "state", json_string(prom_state_name(p->state)));
    json_object_set_new(o, "param", j_value(&p->param));
    json_object_set_new(o, "value", j_value(&p->value));
    json_t *t = json_object();
    for (size_t i = 0; i < p->ntags; i++)
        json_object_set_new(t, p->tags[i].key, json_string(p->tags[i].value));
    json_object_set_new(o, "tags", t);
    json_object_set_new(o, "createdAt", json_integer(p->created_at));
    json_object_set_new(o, "timeoutAt", json_integer(p->timeout_at));
    if (p->state != PROM_PENDING)
        json_object_set_new(o, "settledAt", json_integer(p->settled_at));
    return o;
}

static json_t *j_task(const prom_task_t *t)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(t->id));
    json_object_set_new(o, "version", json_integer(t->version));
    json_object_set_new(o, "state", json_string(prom_task_state_name(t->state)));
    json_object_set_new(o, "resumes", json_integer(t->resumes));
    if (t->state == PROM_TASK_ACQUIRED) {
        if (t->pid)
            json_object_set_new(o, "pid", json_string(t->pid));
        json_object_set_new(o, "ttl", json_integer(t->ttl));
    }
    return o;
}

static json_t *j_promises(const prom_result_t *res, int skip_reserved)
{
    json_t *arr = json_array();
    for (size_t i = 0; i < res->npromises; i++) {
        if (skip_reserved && strncmp(res->promises[i].id, RESERVED_ID, strlen(RESERVED_ID)) == 0)
            continue;
        json_array_append_new(arr, j_promise(&res->promises[i]));
    }
    return arr;
}

/* {promise} */
static void ok_promise(ans_t *a, const prom_result_t *res)
{
    a->data = json_object();
    if (res->promise)
        json_object_set_new(a->data, "promise", j_promise(res->promise));
}

/* {task, promise, preload} */
static void ok_task(ans_t *a, const prom_result_t *res)
{
    a->data = json_object();
    if (res->task)
        json_object_set_new(a->data, "task", j_task(res->task));
    if (res->promise)
        json_object_set_new(a->data, "promise", j_promise(res->promise));
    json_object_set_new(a->data, "preload", j_promises(res, 0));
}

/* ------------------------------------------------------------------------------------------ */
/* operations (one function per kind; each runs on a front-end thread)                          */

static void op_promise_get(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id;
    prom_result_t res;
    if (f_id(a, d, "id", &id))
        return;
    if (outcome(a, prom_promise_get(r->ps, id, &res), &res) == 0)
        ok_promise(a, &res);
    prom_result_clear(&res);
}

static void op_promise_create(rsn_t *r, json_t *d, ans_t *a)
{
    create_in_t in;
    prom_result_t res;
    if (f_create(a, d, &in))
        return;
    if (outcome(a, prom_promise_create(r->ps, &in.c, &res), &res) == 0)
        ok_promise(a, &res);
    prom_result_clear(&res);
}

static void op_promise_settle(rsn_t *r, json_t *d, ans_t *a)
{
    settle_in_t in;
    prom_result_t res;
    if (f_settle(a, d, &in))
        return;
    if (outcome(a, prom_promise_settle(r->ps, &in.s, &res), &res) == 0)
        ok_promise(a, &res);
    prom_result_clear(&res);
}

static void op_promise_register_callback(rsn_t *r, json_t *d, ans_t *a)
{
    const char *awaited, *awaiter;
    prom_result_t res;
    if (f_id(a, d, "awaited", &awaited) || f_id(a, d, "awaiter", &awaiter))
        return;
    if (outcome(a, prom_promise_register_callback(r->ps, awaited, awaiter, &res), &res) == 0)
        ok_promise(a, &res);
    prom_result_clear(&res);
}

static void op_promise_register_listener(rsn_t *r, json_t *d, ans_t *a)
{
    const char *awaited, *address;
    prom_result_t res;
    if (f_id(a, d, "awaited", &awaited) || f_str(a, d, "address", 1, &address))
        return;
    if (outcome(a, prom_promise_register_listener(r->ps, awaited, address, &res), &res) == 0)
        ok_promise(a, &res);
    prom_result_clear(&res);
}

static void op_promise_search(rsn_t *r, json_t *d, ans_t *a)
{
    prom_search_t q = {.state = -1};
    const char *st = NULL;
    int64_t limit = 0;
    prom_kv_t *tags;
    prom_result_t res;
    if (f_str(a, d, "state", 0, &st) || f_map(a, d, "tags", 1, &tags, &q.ntags) ||
        f_i64(a, d, "limit", 0, &limit) || f_str(a, d, "cursor", 0, &q.cursor))
        return;
    q.tags = tags;
    if (st) {
        static const char *const names[] = {"pending", "resolved", "rejected", "rejected_canceled",
                                            "rejected_timedout"};
        for (int i = 0; i < 5; i++)
            if (strcmp(st, names[i]) == 0)
                q.state = i;
        if (q.state < 0) {
            fail(a, 400, "Field 'state' is not a promise state");
            return;
        }
    }
    if (json_object_get(d, "limit") && (limit < 1 || limit > 1000)) {
        fail(a, 400, "Field 'limit' must be 1..1000");
        return;
    }
    q.limit = (int)limit;
    if (outcome(a, prom_promise_search(r->ps, &q, &res), &res) == 0) {
        a->data = json_object();
        json_object_set_new(a->data, "promises", j_promises(&res, 1));
        if (res.cursor)
            json_object_set_new(a->data, "cursor", json_string(res.cursor));
    }
    prom_result_clear(&res);
}

static void op_task_get(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id;
    prom_result_t res;
    if (f_id(a, d, "id", &id))
        return;
    if (outcome(a, prom_task_get(r->ps, id, &res), &res) == 0) {
        a->data = json_object();
        json_object_set_new(a->data, "task", j_task(res.task));
    }
    prom_result_clear(&res);
}

static void op_task_create(rsn_t *r, json_t *d, ans_t *a)
{
    const char *pid, *kind, *corr;
    int64_t ttl;
    json_t *ad;
    create_in_t in;
    prom_result_t res;
    if (f_str(a, d, "pid", 1, &pid) || f_i64(a, d, "ttl", 1, &ttl))
        return;
    json_t *action = json_object_get(d, "action");
    if (!action) {
        fail(a, 400, "Missing field 'action'");
        return;
    }
    if (f_action(a, action, "promise.create", NULL, &kind, &corr, &ad) || f_create(a, ad, &in))
        return;
    if (outcome(a, prom_task_create(r->ps, pid, ttl, &in.c, &res), &res) == 0)
        ok_task(a, &res);
    prom_result_clear(&res);
}

static void op_task_acquire(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id, *pid;
    int64_t version, ttl;
    prom_result_t res;
    if (f_id(a, d, "id", &id) || f_i64(a, d, "version", 1, &version) ||
        f_str(a, d, "pid", 1, &pid) || f_i64(a, d, "ttl", 1, &ttl))
        return;
    if (outcome(a, prom_task_acquire(r->ps, id, version, pid, ttl, &res), &res) == 0)
        ok_task(a, &res);
    prom_result_clear(&res);
}

static void op_task_release(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id;
    int64_t version;
    prom_result_t res;
    if (f_id(a, d, "id", &id) || f_i64(a, d, "version", 1, &version))
        return;
    if (outcome(a, prom_task_release(r->ps, id, version, &res), &res) == 0)
        a->data = json_object();
    prom_result_clear(&res);
}

static void op_task_fulfill(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id, *kind, *corr;
    int64_t version;
    json_t *ad;
    settle_in_t in;
    prom_result_t res;
    if (f_id(a, d, "id", &id) || f_i64(a, d, "version", 1, &version))
        return;
    json_t *action = json_object_get(d, "action");
    if (!action) {
        fail(a, 400, "Missing field 'action'");
        return;
    }
    if (f_action(a, action, "promise.settle", NULL, &kind, &corr, &ad) || f_settle(a, ad, &in))
        return;
    if (outcome(a, prom_task_fulfill(r->ps, id, version, &in.s, &res), &res) == 0)
        ok_promise(a, &res);
    prom_result_clear(&res);
}

static void op_task_suspend(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id;
    int64_t version;
    prom_result_t res;
    if (f_id(a, d, "id", &id) || f_i64(a, d, "version", 1, &version))
        return;
    json_t *acts = json_object_get(d, "actions");
    if (!json_is_array(acts)) {
        fail(a, 400, "Field 'actions' must be an array");
        return;
    }
    size_t n = json_array_size(acts);
    if (n > MAX_ARRAY) {
        fail(a, 400, "At most %d actions", MAX_ARRAY);
        return;
    }
    const char **awaited = keep(a, cap_calloc(n ? n : 1, sizeof(*awaited)));
    for (size_t i = 0; i < n; i++) {
        const char *kind, *corr, *awaiter;
        json_t *ad;
        if (f_action(a, json_array_get(acts, i), "promise.register_callback", NULL, &kind, &corr,
                     &ad) ||
            f_id(a, ad, "awaited", &awaited[i]) || f_id(a, ad, "awaiter", &awaiter))
            return;
        if (strcmp(awaiter, id) != 0) {
            fail(a, 400, "The awaiter of every action must be the task id");
            return;
        }
    }
    int rc = prom_task_suspend(r->ps, id, version, awaited, n, &res);
    if (outcome(a, rc, &res) == 0) {
        a->data = json_object();
        if (res.status == PROM_S_PRELOAD)
            json_object_set_new(a->data, "preload", j_promises(&res, 0));
    }
    prom_result_clear(&res);
}

static void op_task_fence(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id, *kind, *corr;
    int64_t version;
    json_t *ad;
    prom_result_t res;
    int rc;
    if (f_id(a, d, "id", &id) || f_i64(a, d, "version", 1, &version))
        return;
    json_t *action = json_object_get(d, "action");
    if (!action) {
        fail(a, 400, "Missing field 'action'");
        return;
    }
    if (f_action(a, action, "promise.create", "promise.settle", &kind, &corr, &ad))
        return;
    if (strcmp(kind, "promise.create") == 0) {
        create_in_t in;
        if (f_create(a, ad, &in))
            return;
        rc = prom_task_fence_create(r->ps, id, version, &in.c, &res);
    } else {
        settle_in_t in;
        if (f_settle(a, ad, &in))
            return;
        rc = prom_task_fence_settle(r->ps, id, version, &in.s, &res);
    }
    if (outcome(a, rc, &res) == 0) {
        int ist = res.action_status ? res.action_status : 200;
        json_t *inner = json_object();
        json_object_set_new(inner, "kind", json_string(kind));
        json_object_set_new(
            inner, "head",
            json_pack("{s:s,s:i,s:s}", "corrId", corr, "status", ist, "version", VERSION));
        if (ist == 200 && res.promise)
            json_object_set_new(inner, "data",
                                json_pack("{s:o}", "promise", j_promise(res.promise)));
        else
            json_object_set_new(inner, "data", json_string("Error"));
        a->data = json_object();
        json_object_set_new(a->data, "action", inner);
        json_object_set_new(a->data, "preload", j_promises(&res, 0));
    }
    prom_result_clear(&res);
}

static void op_task_heartbeat(rsn_t *r, json_t *d, ans_t *a)
{
    const char *pid;
    prom_result_t res;
    if (f_str(a, d, "pid", 1, &pid))
        return;
    json_t *tasks = json_object_get(d, "tasks");
    if (!json_is_array(tasks)) {
        fail(a, 400, "Field 'tasks' must be an array");
        return;
    }
    size_t n = json_array_size(tasks);
    if (n > MAX_ARRAY) {
        fail(a, 400, "At most %d tasks", MAX_ARRAY);
        return;
    }
    prom_task_ref_t *refs = keep(a, cap_calloc(n ? n : 1, sizeof(*refs)));
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(tasks, i);
        if (!json_is_object(t)) {
            fail(a, 400, "Every task must be an object {id, version}");
            return;
        }
        if (f_id(a, t, "id", &refs[i].id) || f_i64(a, t, "version", 1, &refs[i].version))
            return;
    }
    if (outcome(a, prom_task_heartbeat(r->ps, pid, refs, n, &res), &res) == 0)
        a->data = json_object();
    prom_result_clear(&res);
}

static void op_task_halt(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id;
    prom_result_t res;
    if (f_id(a, d, "id", &id))
        return;
    if (outcome(a, prom_task_halt(r->ps, id, &res), &res) == 0)
        a->data = json_object();
    prom_result_clear(&res);
}

static void op_task_continue(rsn_t *r, json_t *d, ans_t *a)
{
    const char *id;
    prom_result_t res;
    if (f_id(a, d, "id", &id))
        return;
    if (outcome(a, prom_task_continue(r->ps, id, &res), &res) == 0)
        a->data = json_object();
    prom_result_clear(&res);
}

static const op_t OPS[] = {
    {"promise.get", op_promise_get},
    {"promise.create", op_promise_create},
    {"promise.settle", op_promise_settle},
    {"promise.register_callback", op_promise_register_callback},
    {"promise.register_listener", op_promise_register_listener},
    {"promise.search", op_promise_search},
    {"task.get", op_task_get},
    {"task.create", op_task_create},
    {"task.acquire", op_task_acquire},
    {"task.release", op_task_release},
    {"task.fulfill", op_task_fulfill},
    {"task.suspend", op_task_suspend},
    {"task.fence", op_task_fence},
    {"task.heartbeat", op_task_heartbeat},
    {"task.halt", op_task_halt},
    {"task.continue", op_task_continue},
    /* in the protocol, not in promise/ (yet): 501 */
    {"task.search", NULL},
    {"schedule.create", NULL},
    {"schedule.get", NULL},
    {"schedule.delete", NULL},
    {"schedule.search", NULL},
    {"debug.start", NULL},
    {"debug.stop", NULL},
    {"debug.reset", NULL},
    {"debug.snap", NULL},
    {"debug.tick", NULL},
};

/* ------------------------------------------------------------------------------------------ */
/* envelopes                                                                                    */

static json_t *envelope(const char *kind, const char *corr, int status, json_t *data)
{
    json_t *e = json_object();
    json_object_set_new(e, "kind", json_string(kind));
    json_object_set_new(
        e, "head",
        json_pack("{s:s,s:i,s:s}", "corrId", corr, "status", status, "version", VERSION));
    json_object_set_new(e, "data", data);
    return e;
}

static const char *env_str(json_t *env, const char *k)
{
    json_t *v = json_is_object(env) ? json_object_get(env, k) : NULL;
    return json_is_string(v) ? json_string_value(v) : "";
}

static const char *env_corr(json_t *env)
{
    json_t *h = json_is_object(env) ? json_object_get(env, "head") : NULL;
    json_t *c = json_is_object(h) ? json_object_get(h, "corrId") : NULL;
    return json_is_string(c) ? json_string_value(c) : "";
}

/* An error answered on the loop (before a job exists). */
static void reply_err(rsn_t *r, srv_req_t *req, json_t *env, int status, const char *msg)
{
    r->st.requests++;
    r->st.errors++;
    srv_reply_json(req, status,
                   envelope(env_str(env, "kind"), env_corr(env), status, json_string(msg)));
}

/* Runs on a thread: the operation and its answer. */
static void job_run_op(rsn_t *r, job_t *j)
{
    ans_t a;
    memset(&a, 0, sizeof(a));
    json_t *data = json_object_get(j->env, "data");
    j->op->fn(r, data, &a);
    if (!a.status) /* cannot happen: every op sets a status; keep the answer well formed */
        fail(&a, 500, "Internal error: no outcome");
    j->status = a.status;
    json_t *out = (a.status == 200 || a.status == 300) ? (a.data ? a.data : json_object())
                                                       : json_string(a.msg);
    j->answer = envelope(env_str(j->env, "kind"), env_corr(j->env), a.status, out);
    for (int i = 0; i < a.ntofree; i++)
        cap_free(a.tofree[i]);
}

/* ------------------------------------------------------------------------------------------ */
/* the threads                                                                                  */

static void *thread_main(void *arg)
{
    rsn_t *r = arg;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->qhead && !r->stop)
            pthread_cond_wait(&r->cv, &r->mu);
        job_t *j = r->qhead;
        if (!j)
            break; /* stopping and nothing left */
        r->qhead = j->next;
        if (!r->qhead)
            r->qtail = NULL;
        pthread_mutex_unlock(&r->mu);
        j->next = NULL;
        if (j->type == J_OP) {
            job_run_op(r, j);
        } else if (j->type == J_DRAIN) {
            j->rc = prom_outbox_take(r->ps, MSG_TAKE, &j->msgs, &j->nmsgs);
        } else {
            size_t fired = 0;
            j->rc = prom_store_tick(r->ps, prom_store_now(r->ps), &fired);
        }
        j->outbox = prom_outbox_len(r->ps);
        pthread_mutex_lock(&r->mu);
        if (r->dtail)
            r->dtail->next = j;
        else
            r->dhead = j;
        r->dtail = j;
        uv_async_send(&r->async);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static void submit(rsn_t *r, job_t *j)
{
    pthread_mutex_lock(&r->mu);
    if (r->qtail)
        r->qtail->next = j;
    else
        r->qhead = j;
    r->qtail = j;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static job_t *job_new(rsn_t *r, int type)
{
    job_t *j = cap_calloc(1, sizeof(*j));
    j->r = r;
    j->type = type;
    return j;
}

static void job_free(job_t *j)
{
    json_decref(j->env);
    json_decref(j->answer);
    prom_msgs_free(j->msgs, j->nmsgs);
    cap_free(j);
}

/* ------------------------------------------------------------------------------------------ */
/* messages to pollers (loop thread)                                                            */

static json_t *msg_json(rsn_t *r, const prom_msg_t *m)
{
    json_t *o = json_object();
    if (m->kind == PROM_MSG_EXECUTE) {
        json_object_set_new(o, "kind", json_string("execute"));
        json_object_set_new(o, "head", json_pack("{s:s}", "serverUrl", r->url));
        json_object_set_new(
            o, "data",
            json_pack("{s:{s:s,s:I}}", "task", "id", m->id, "version", (json_int_t)m->version));
    } else {
        json_object_set_new(o, "kind", json_string("unblock"));
        json_object_set_new(o, "head", json_pack("{s:s}", "serverUrl", r->url));
        json_t *d = json_object();
        if (m->promise)
            json_object_set_new(d, "promise", j_promise(m->promise));
        json_object_set_new(o, "data", d);
    }
    return o;
}

/* The poller an address names: poll://uni@G/I exactly that one (the latest connected);
 * poll://any@G[/I] that one if connected, else the next of group G in turn. NULL: none.
 * *foreign = 1 when the scheme is not poll:// (this front end only streams). */
static poller_t *route(rsn_t *r, const char *addr, int *foreign)
{
    *foreign = 0;
    int any;
    if (strncmp(addr, "poll://uni@", 11) == 0)
        any = 0;
    else if (strncmp(addr, "poll://any@", 11) == 0)
        any = 1;
    else {
        *foreign = 1;
        return NULL;
    }
    const char *g = addr + 11, *slash = strchr(g, '/');
    size_t glen = slash ? (size_t)(slash - g) : strlen(g);
    const char *id = slash ? slash + 1 : NULL;
    poller_t *exact = NULL, *first = NULL;
    uint32_t ningroup = 0;
    for (poller_t *p = r->pollers; p; p = p->next) {
        if (strlen(p->group) != glen || memcmp(p->group, g, glen) != 0)
            continue;
        if (id && strcmp(p->id, id) == 0 && !exact)
            exact = p;
        if (!first)
            first = p;
        ningroup++;
    }
    if (exact || !any || !first)
        return exact;
    uint64_t k = r->rr++ % ningroup;
    for (poller_t *p = r->pollers; p; p = p->next) {
        if (strlen(p->group) != glen || memcmp(p->group, g, glen) != 0)
            continue;
        if (k-- == 0)
            return p;
    }
    return first;
}

/* Sends m if its poller is here: 1 sent (or dropped for good), 0 not deliverable now. */
static int deliver(rsn_t *r, const prom_msg_t *m)
{
    int foreign;
    poller_t *p = route(r, m->address ? m->address : "", &foreign);
    if (foreign) {
        cap_log(CAP_LOG_WARN, "resonate",
                "message for %s dropped: only poll:// addresses are served", m->address);
        r->st.dropped++;
        return 1;
    }
    if (!p)
        return 0;
    if (srv_stream_send(p->req, msg_json(r, m), NULL, NULL) != 0)
        return 0; /* the poller is going away: its abort callback removes it */
    r->st.sent++;
    return 1;
}

static void park(rsn_t *r, prom_msg_t *m)
{
    if (r->nparked >= r->o.park_max) {
        parked_t *old = r->phead;
        r->phead = old->next;
        if (!r->phead)
            r->ptail = NULL;
        r->nparked--;
        cap_log(CAP_LOG_WARN, "resonate", "parked message for %s dropped (over %u parked)",
                old->m->address, r->o.park_max);
        prom_msgs_free(old->m, 1);
        cap_free(old);
        r->st.dropped++;
    }
    parked_t *pk = cap_malloc(sizeof(*pk));
    pk->next = NULL;
    pk->m = cap_malloc(sizeof(*pk->m));
    *pk->m = *m; /* takes what m owns */
    memset(m, 0, sizeof(*m));
    if (r->ptail)
        r->ptail->next = pk;
    else
        r->phead = pk;
    r->ptail = pk;
    r->nparked++;
    r->st.parked++;
}

static void parked_retry(rsn_t *r)
{
    parked_t **pp = &r->phead, *last = NULL;
    while (*pp) {
        parked_t *pk = *pp;
        if (deliver(r, pk->m)) {
            *pp = pk->next;
            prom_msgs_free(pk->m, 1);
            cap_free(pk);
            r->nparked--;
        } else {
            last = pk;
            pp = &pk->next;
        }
    }
    r->ptail = last;
}

static void maybe_drain(rsn_t *r, size_t outbox)
{
    if (r->closing || r->drain_busy || !r->npollers || !outbox)
        return;
    r->drain_busy = 1;
    submit(r, job_new(r, J_DRAIN));
}

/* ------------------------------------------------------------------------------------------ */
/* completions (loop thread)                                                                    */

static void done_job(rsn_t *r, job_t *j)
{
    if (j->type == J_OP) {
        r->st.requests++;
        if (j->status != 200 && j->status != 300)
            r->st.errors++;
        if (j->req) {
            srv_reply_json(j->req, j->status, j->answer);
            j->answer = NULL;
        }
    } else if (j->type == J_DRAIN) {
        r->drain_busy = 0;
        if (j->rc < 0)
            cap_log(CAP_LOG_ERROR, "resonate", "outbox take failed: %s", cap_strerror(j->rc));
        for (size_t i = 0; i < j->nmsgs; i++)
            if (!deliver(r, &j->msgs[i]))
                park(r, &j->msgs[i]);
    } else {
        r->tick_busy = 0;
        if (j->rc < 0)
            cap_log(CAP_LOG_ERROR, "resonate", "timer tick failed: %s", cap_strerror(j->rc));
    }
    size_t outbox = j->outbox;
    job_free(j);
    maybe_drain(r, outbox);
}

static void run_done(rsn_t *r)
{
    pthread_mutex_lock(&r->mu);
    job_t *j = r->dhead;
    r->dhead = r->dtail = NULL;
    pthread_mutex_unlock(&r->mu);
    while (j) {
        job_t *next = j->next;
        done_job(r, j);
        j = next;
    }
}

static void on_async(uv_async_t *h)
{
    run_done(h->data);
}

static void on_tick(uv_timer_t *t)
{
    rsn_t *r = t->data;
    if (r->closing)
        return;
    if (!r->tick_busy && prom_store_next_deadline(r->ps) <= prom_store_now(r->ps)) {
        r->tick_busy = 1;
        submit(r, job_new(r, J_TICK));
    }
    if (r->npollers)
        maybe_drain(r, prom_outbox_len(r->ps));
}

/* ------------------------------------------------------------------------------------------ */
/* routes (loop thread)                                                                         */

static void on_job_abort(srv_req_t *req, void *arg)
{
    (void)req;
    ((job_t *)arg)->req = NULL;
}

/* Authorization header (checked by the server for us) or head.auth. */
static int authorized(rsn_t *r, srv_req_t *req, json_t *env)
{
    if (!srv_server_auth_required(r->srv) || srv_req_principal(req))
        return 1;
    json_t *h = json_object_get(env, "head");
    json_t *t = json_is_object(h) ? json_object_get(h, "auth") : NULL;
    const char *principal;
    return json_is_string(t) &&
           srv_server_auth_token(r->srv, json_string_value(t), &principal) == 0;
}

static void h_rpc(srv_req_t *req, void *arg)
{
    rsn_t *r = arg;
    size_t len;
    const uint8_t *body = srv_req_body(req, &len);
    char err[200];
    json_t *env = NULL;
    if (srv_json_parse((const char *)body, len, r->o.json_max_depth, &env, err, sizeof(err)) != 0) {
        reply_err(r, req, NULL, 400, err);
        return;
    }
    if (!authorized(r, req, env)) {
        reply_err(r, req, env, 401,
                  "Unauthorized: a valid bearer token is required (Authorization header or "
                  "head.auth)");
        goto out;
    }
    if (!json_is_object(env)) {
        reply_err(r, req, env, 400, "The request must be a JSON object {kind, head, data}");
        goto out;
    }
    json_t *kind = json_object_get(env, "kind"), *head = json_object_get(env, "head");
    if (!json_is_string(kind) || !json_string_length(kind)) {
        reply_err(r, req, env, 400, "Field 'kind' must be a non-empty string");
        goto out;
    }
    if (!json_is_object(head) || !json_is_string(json_object_get(head, "corrId"))) {
        reply_err(r, req, env, 400, "Field 'head' must be an object with a string 'corrId'");
        goto out;
    }
    json_t *ver = json_object_get(head, "version");
    if (!json_is_string(ver) || strcmp(json_string_value(ver), VERSION) != 0) {
        reply_err(r, req, env, 400, "Unsupported version (supported: " VERSION ")");
        goto out;
    }
    if (!json_is_object(json_object_get(env, "data"))) {
        reply_err(r, req, env, 400, "Field 'data' must be an object");
        goto out;
    }
    const op_t *op = NULL;
    for (size_t i = 0; i < sizeof(OPS) / sizeof(OPS[0]); i++)
        if (strcmp(OPS[i].kind, json_string_value(kind)) == 0)
            op = &OPS[i];
    if (!op) {
        char m[160];
        snprintf(m, sizeof(m), "Unknown kind '%.100s'", json_string_value(kind));
        reply_err(r, req, env, 400, m);
        goto out;
    }
    if (!op->fn) {
        char m[160];
        snprintf(m, sizeof(m), "Not implemented: %s", op->kind);
        reply_err(r, req, env, 501, m);
        goto out;
    }
    job_t *j = job_new(r, J_OP);
    j->req = req;
    j->env = env;
    j->op = op;
    env = NULL;
    srv_req_on_abort(req, on_job_abort, j);
    submit(r, j);
out:
    json_decref(env);
}

static void poller_abort(srv_req_t *req, void *arg)
{
    (void)req;
    poller_t *p = arg, **pp;
    rsn_t *r = p->r;
    for (pp = &r->pollers; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            r->npollers--;
            break;
        }
    cap_free(p->group);
    cap_free(p->id);
    cap_free(p);
}

static void h_poll(srv_req_t *req, void *arg)
{
    rsn_t *r = arg;
    if (srv_server_auth_required(r->srv) && !srv_req_principal(req)) {
        srv_reply_json(req, 401, json_pack("{s:s}", "error", "a valid bearer token is required"));
        return;
    }
    const char *g = srv_req_param(req, "group"), *id = srv_req_param(req, "id");
    poller_t *p = cap_calloc(1, sizeof(*p));
    p->r = r;
    p->req = req;
    p->group = cap_strdup(g);
    p->id = cap_strdup(id);
    /* newest first: poll://uni@ goes to the latest connection of a worker */
    p->next = r->pollers;
    r->pollers = p;
    r->npollers++;
    srv_req_on_abort(req, poller_abort, p);
    srv_stream_start(req, SRV_STREAM_SSE);
    parked_retry(r);
    maybe_drain(r, prom_outbox_len(r->ps));
}

/* The legacy REST API (/promises, /schedules, /tasks and below): 410, as the Resonate server. */
static void h_gone(srv_req_t *req, void *arg)
{
    (void)arg;
    srv_reply_json(req, 410,
                   json_pack("{s:s}", "error",
                             "Gone: the legacy REST API is not served; use POST / with the "
                             "protocol 2026-04-01 envelope"));
}

static void h_health(srv_req_t *req, void *arg)
{
    (void)arg;
    srv_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

static void h_ready(srv_req_t *req, void *arg)
{
    rsn_t *r = arg;
    /* The store answers (its mutex is free within a state-machine step) and we are not closing. */
    (void)prom_store_now(r->ps);
    if (r->closing)
        srv_reply_json(req, 503, json_pack("{s:s}", "status", "closing"));
    else
        srv_reply_json(req, 200, json_pack("{s:s}", "status", "ready"));
}

/* ------------------------------------------------------------------------------------------ */
/* open / close                                                                                 */

static int legacy_routes(srv_server_t *srv, rsn_t *r)
{
    static const char *const roots[] = {"/promises", "/schedules", "/tasks"};
    static const char *const methods[] = {"GET", "POST", "PATCH", "DELETE"};
    static const char *const tails[] = {"", "/{a}", "/{a}/{b}", "/{a}/{b}/{c}"};
    char pat[64];
    for (size_t i = 0; i < 3; i++)
        for (size_t m = 0; m < 4; m++)
            for (size_t t = 0; t < 4; t++) {
                snprintf(pat, sizeof(pat), "%s%s", roots[i], tails[t]);
                if (srv_server_route(srv, methods[m], pat, SRV_ROUTE_PUBLIC, h_gone, r))
                    return -1;
            }
    return 0;
}

int rsn_open(uv_loop_t *loop, srv_server_t *srv, prom_store_t *ps, const rsn_opts_t *opts,
             rsn_t **out)
{
    rsn_t *r = cap_calloc(1, sizeof(*r));
    r->loop = loop;
    r->srv = srv;
    r->ps = ps;
    if (opts)
        r->o = *opts;
    if (!r->o.threads)
        r->o.threads = 64;
    if (!r->o.tick_ms)
        r->o.tick_ms = 100;
    if (!r->o.park_max)
        r->o.park_max = 10000;
    if (!r->o.json_max_depth)
        r->o.json_max_depth = 32;
    if (r->o.server_url) {
        r->url = cap_strdup(r->o.server_url);
    } else {
        char u[64];
        snprintf(u, sizeof(u), "http://127.0.0.1:%d", srv_server_port(srv));
        r->url = cap_strdup(u);
    }
    r->o.server_url = r->url;
    if (srv_server_route(srv, "POST", "/", SRV_ROUTE_PUBLIC, h_rpc, r) ||
        srv_server_route(srv, "GET", "/poll/{group}/{id}", SRV_ROUTE_PUBLIC, h_poll, r) ||
        srv_server_route(srv, "GET", "/health", SRV_ROUTE_PUBLIC, h_health, r) ||
        srv_server_route(srv, "GET", "/ready", SRV_ROUTE_PUBLIC, h_ready, r) ||
        legacy_routes(srv, r)) {
        cap_free(r->url);
        cap_free(r);
        return CAP_EINVAL;
    }
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    uv_async_init(loop, &r->async, on_async);
    r->async.data = r;
    uv_timer_init(loop, &r->timer);
    r->timer.data = r;
    uv_timer_start(&r->timer, on_tick, r->o.tick_ms, r->o.tick_ms);
    r->nthr = r->o.threads;
    r->thr = cap_calloc(r->nthr, sizeof(*r->thr));
    for (uint32_t i = 0; i < r->nthr; i++)
        if (pthread_create(&r->thr[i], NULL, thread_main, r) != 0) {
            cap_log(CAP_LOG_ERROR, "resonate", "cannot start a thread");
            abort();
        }
    *out = r;
    return 0;
}

static void on_closed(uv_handle_t *h)
{
    rsn_t *r = h->data;
    if (++r->nclosed < 2)
        return;
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    cap_free(r->thr);
    cap_free(r->url);
    cap_free(r);
}

void rsn_close(rsn_t *r)
{
    if (!r)
        return;
    r->closing = 1;
    uv_timer_stop(&r->timer);
    /* The threads finish every submitted job, then exit. */
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    for (uint32_t i = 0; i < r->nthr; i++)
        pthread_join(r->thr[i], NULL);
    run_done(r); /* answers the last operations; drained messages go out or are parked */
    while (r->pollers) {
        poller_t *p = r->pollers;
        r->pollers = p->next;
        srv_stream_end(p->req); /* released without the abort callback */
        cap_free(p->group);
        cap_free(p->id);
        cap_free(p);
    }
    r->npollers = 0;
    if (r->nparked)
        cap_log(CAP_LOG_WARN, "resonate", "%u parked messages dropped at shutdown", r->nparked);
    while (r->phead) {
        parked_t *pk = r->phead;
        r->phead = pk->next;
        prom_msgs_free(pk->m, 1);
        cap_free(pk);
    }
    uv_close((uv_handle_t *)&r->async, on_closed);
    uv_close((uv_handle_t *)&r->timer, on_closed);
}

void rsn_stats(const rsn_t *r, rsn_stats_t *out)
{
    *out = r->st;
    out->pollers = r->npollers;
}
