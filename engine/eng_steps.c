/*
 * eng_steps.c - durable steps of an execution (issue 9): the promise operations behind the
 * worker's PROMISE frames and the listing of an execution's steps.
 *
 * A step is a promise "capsule/x/<eid>.<path>" (path: "1", "2", "2.1": call order per level, so a
 * re-run of the execution derives the same ids), tags capsule:kind=step|sleep, capsule:exec=<eid>,
 * capsule:task=<task name>; param data = the pickled call. Settled with value data = the pickled
 * result (resolved) or error (rejected) and header capsule:attempts. A sleep is a timer promise
 * (resonate:timer=true) whose deadline, fixed by the first create, is absolute: promise/ reads it
 * as resolved once due, so a re-run after a restart waits only for what remains.
 *
 * What is durable when: a step's result is ONE record, written by SETTLE (the promise created and
 * settled in one batch) before the worker is answered; OPEN and PRELOAD only read. The running
 * mark (START) is held in memory for ENG_MARK_DELAY_MS and dropped if the result comes first, else
 * written as the pending promise without anyone waiting for it. A failed attempt that will be
 * retried is recorded (ATTEMPT: the promise "<step id>#a<k>" rejected with its error, and the
 * step's pending promise) before the retry starts, so a re-run after a crash resumes at the same
 * attempt count.
 *
 * eng__step_run blocks (it waits for the group commit): run it off the loop (engine.c runs it on
 * libuv's thread pool).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_int.h"
#include "promise.h"

#define STEP_FOREVER ((int64_t)1 << 62)

char *eng__step_pid(const char *eid, const char *path)
{
    size_t n = strlen(eid) + strlen(path) + 16;
    char *p = cap_malloc(n);
    snprintf(p, n, "capsule/x/%s.%s", eid, path);
    return p;
}

char *eng__ext_pid(const char *sid, const char *name)
{
    const char *colon = sid ? strrchr(sid, ':') : NULL;
    int plen = colon ? (int)(colon - sid + 1) : 0;
    size_t n = strlen(ENG_EXT_PREFIX) + (size_t)plen + strlen(name) + 1;
    char *p = cap_malloc(n);
    snprintf(p, n, "%s%.*s%s", ENG_EXT_PREFIX, plen, sid ? sid : "", name);
    return p;
}

/* Splits a SETTLE/ATTEMPT body {u32 n, param, value}; 0 or CAP_EPROTO. */
static int split_body(const eng_step_t *st, prom_value_t *param, prom_value_t *value)
{
    memset(param, 0, sizeof *param);
    memset(value, 0, sizeof *value);
    if (st->in_len < 4)
        return CAP_EPROTO;
    size_t n = cap_get_le32(st->in);
    if (n > st->in_len - 4)
        return CAP_EPROTO;
    param->data = st->in + 4;
    param->len = n;
    value->data = st->in + 4 + n;
    value->len = st->in_len - 4 - n;
    return 0;
}

/* "<step id>#a<k>": the record of the step's failed attempt k. */
static char *attempt_pid(const char *pid, uint32_t k)
{
    size_t n = strlen(pid) + 16;
    char *a = cap_malloc(n);
    snprintf(a, n, "%s#a%u", pid, k);
    return a;
}

/* How many failed attempts of step pid are recorded (their records are numbered from 1). */
static uint32_t failed_attempts(prom_store_t *ps, const char *pid)
{
    uint32_t k = 0;
    for (;;) {
        prom_result_t res = {0};
        char *a = attempt_pid(pid, k + 1);
        int rc = prom_promise_get(ps, a, &res);
        int found = !rc && res.status == PROM_S_OK;
        prom_result_clear(&res);
        cap_free(a);
        if (!found || k >= 100000)
            return k;
        k++;
    }
}

static uint32_t attempts_of(const prom_promise_t *p)
{
    for (size_t i = 0; i < p->value.nheaders; i++)
        if (strcmp(p->value.headers[i].key, "capsule:attempts") == 0)
            return (uint32_t)strtoul(p->value.headers[i].value, NULL, 10);
    return 0;
}

/* The reply for promise p: its state, attempts and value. */
static void answer(eng_step_t *st, const prom_promise_t *p, int64_t now)
{
    st->out_attempts = attempts_of(p);
    if (p->state == PROM_PENDING) {
        st->state = ENG_STEP_PENDING;
        st->out_num = p->timeout_at > now && p->timeout_at < STEP_FOREVER
                          ? (uint64_t)(p->timeout_at - now)
                          : 0;
        return;
    }
    st->state = p->state == PROM_RESOLVED ? ENG_STEP_RESOLVED : ENG_STEP_REJECTED;
    if (p->value.len) {
        st->out = cap_memdup(p->value.data, p->value.len);
        st->out_len = p->value.len;
    }
}

static void fail(eng_step_t *st, const char *what, int rc)
{
    char msg[256];
    snprintf(msg, sizeof msg, "%s: %s", what, cap_strerror(rc));
    st->state = ENG_STEP_FAILED;
    st->out = (uint8_t *)cap_strdup(msg);
    st->out_len = strlen(msg);
}

static const char *path_of(const char *id, const char *eid);

/* Appends a u32 LE length + len bytes (with_len) or just the bytes. */
static void buf_put(uint8_t **b, size_t *n, size_t *cap, int with_len, const void *p, size_t len)
{
    size_t need = *n + (with_len ? 4 : 0) + len;
    if (need > *cap) {
        *cap = need * 2;
        *b = cap_realloc(*b, *cap);
    }
    if (with_len) {
        cap_put_le32(*b + *n, (uint32_t)len);
        *n += 4;
    }
    if (len)
        memcpy(*b + *n, p, len);
    *n += len;
}

/* Every settled step of st->eid (and its failed attempts "<path>#a<k>"), packed for the worker (see
 * PYW_PO_PRELOAD); out_num = 1 when none was left out. */
static int preload(prom_store_t *ps, eng_step_t *st)
{
    uint8_t *b = NULL;
    size_t n = 0, cap = 0;
    char *cursor = NULL;
    prom_kv_t tag = {"capsule:exec", st->eid};
    int rc = 0, complete = 1;
    do {
        prom_result_t res = {0};
        prom_search_t q = {-1, &tag, 1, 1000, cursor};
        rc = prom_promise_search(ps, &q, &res);
        cap_free(cursor);
        cursor = NULL;
        if (!rc && res.status != PROM_S_OK)
            rc = CAP_EINVAL;
        for (size_t i = 0; !rc && i < res.npromises; i++) {
            const prom_promise_t *p = &res.promises[i];
            const char *path = path_of(p->id, st->eid);
            if (!path || p->state == PROM_PENDING)
                continue;
            if (n + p->value.len > ENG_PRELOAD_MAX) {
                complete = 0; /* the worker asks for the others one by one */
                continue;
            }
            uint8_t state = p->state == PROM_RESOLVED ? ENG_STEP_RESOLVED : ENG_STEP_REJECTED;
            buf_put(&b, &n, &cap, 1, path, strlen(path));
            buf_put(&b, &n, &cap, 0, &state, 1);
            buf_put(&b, &n, &cap, 1, p->value.data, p->value.len);
        }
        if (!rc && res.cursor)
            cursor = cap_strdup(res.cursor);
        prom_result_clear(&res);
    } while (cursor);
    if (rc) {
        cap_free(b);
        return rc;
    }
    st->state = ENG_STEP_RESOLVED;
    st->out = b;
    st->out_len = n;
    st->out_num = (uint64_t)complete;
    return 0;
}

/* The tags of a step's promise (sleep: a timer promise). */
static void step_tags(const eng_step_t *st, const char *kind, prom_kv_t tags[4])
{
    tags[0] = (prom_kv_t){"capsule:kind", (char *)kind};
    tags[1] = (prom_kv_t){"capsule:exec", st->eid};
    tags[2] = (prom_kv_t){"capsule:task", st->label ? st->label : ""};
    tags[3] = (prom_kv_t){"resonate:timer", "true"};
}

/* SETTLE: the step created (if the running mark did not already) and settled, one record in one
 * commit. ATTEMPT: the step pending (its running mark) and its failed attempt k's record created
 * rejected with the error, one append; the reply is the attempt's record. */
static int record(prom_store_t *ps, const eng_step_t *st, const char *pid, int64_t now,
                  prom_result_t *res)
{
    (void)now;
    prom_value_t param, value;
    if (split_body(st, &param, &value))
        return CAP_EPROTO;
    char att[16];
    snprintf(att, sizeof att, "%u", st->attempts);
    prom_kv_t hdr = {"capsule:attempts", att};
    value.headers = &hdr;
    value.nheaders = 1;
    prom_kv_t tags[4], atags[4];
    step_tags(st, "step", tags);
    prom_create_t c = {pid, STEP_FOREVER, &param, tags, 3};
    if (st->op == ENG_STEP_SETTLE) {
        prom_settle_t s = {pid, st->num == ENG_STEP_RESOLVED ? PROM_RESOLVED : PROM_REJECTED,
                           &value};
        prom_op_t ops[2] = {{&c, NULL}, {NULL, &s}};
        return prom_promise_batch(ps, ops, 2, res);
    }
    char *apid = attempt_pid(pid, st->attempts);
    step_tags(st, "attempt", atags);
    prom_create_t a = {apid, STEP_FOREVER, NULL, atags, 3};
    prom_settle_t s = {apid, PROM_REJECTED, &value};
    prom_op_t ops[3] = {{&c, NULL}, {&a, NULL}, {NULL, &s}};
    int rc = prom_promise_batch(ps, ops, 3, res);
    cap_free(apid);
    return rc;
}

void eng__step_run(prom_store_t *ps, eng_step_t *st)
{
    prom_result_t res = {0};
    char *pid = st->op == ENG_STEP_AWAIT ? cap_strdup(st->ext) : eng__step_pid(st->eid, st->path);
    int64_t now = prom_store_now(ps);
    int rc;
    cap_free(st->out); /* a re-run (recheck) replaces the previous answer */
    st->out = NULL;
    st->out_len = 0;
    if (st->op == ENG_STEP_PRELOAD) {
        if ((rc = preload(ps, st)))
            fail(st, "steps not read", rc);
        cap_free(pid);
        return;
    }
    if (st->op == ENG_STEP_AWAIT && st->recheck) {
        rc = prom_promise_get(ps, pid, &res);
    } else if (st->op == ENG_STEP_AWAIT) {
        prom_kv_t tag = {"capsule:kind", "external"};
        prom_value_t param = {NULL, 0, st->in, st->in_len};
        prom_create_t c = {pid, STEP_FOREVER, &param, &tag, 1};
        rc = prom_promise_create(ps, &c, &res);
    } else if (st->op == ENG_STEP_OPEN) {
        /* a read: the step's outcome if recorded, else pending with its failed attempts */
        rc = prom_promise_get(ps, pid, &res);
        if (!rc && (res.status == PROM_S_NOTFOUND ||
                    (res.status == PROM_S_OK && res.promise->state == PROM_PENDING))) {
            st->state = ENG_STEP_PENDING;
            st->out_attempts = failed_attempts(ps, pid);
            st->out_num = 0;
            prom_result_clear(&res);
            cap_free(pid);
            return;
        }
    } else if (st->op == ENG_STEP_SETTLE || st->op == ENG_STEP_ATTEMPT) {
        rc = record(ps, st, pid, now, &res);
    } else {
        int sleep = st->op == ENG_STEP_SLEEP;
        prom_kv_t tags[4];
        step_tags(st, sleep ? "sleep" : "step", tags);
        prom_value_t param = {NULL, 0, st->in, st->in_len};
        int64_t deadline =
            sleep ? now + (int64_t)(st->num > (uint64_t)1 << 40 ? (uint64_t)1 << 40 : st->num)
                  : STEP_FOREVER;
        prom_create_t c = {pid, deadline, &param, tags, sleep ? 4 : 3};
        rc = prom_promise_create(ps, &c, &res);
    }
    if (rc == CAP_EPROTO)
        fail(st, "malformed step record", rc);
    else if (rc)
        fail(st, "step not recorded", rc);
    else if (res.status != PROM_S_OK || !res.promise)
        fail(st, res.message ? res.message : "step refused", CAP_ECONFLICT);
    else
        answer(st, res.promise, prom_store_now(ps));
    prom_result_clear(&res);
    cap_free(pid);
}

void eng__step_free(eng_step_t *st)
{
    if (!st)
        return;
    cap_free(st->eid);
    cap_free(st->path);
    cap_free(st->label);
    cap_free(st->ext);
    cap_free(st->in);
    cap_free(st->out);
    cap_free(st);
}

/* ---- tasks with their own limits ---- */

char *eng__child_id(const char *eid, const char *path)
{
    size_t n = strlen(eid) + strlen(path) + 3;
    char *id = cap_malloc(n);
    snprintf(id, n, "%s-t%s", eid, path);
    if (!eng__id_valid(id)) {
        cap_free(id);
        return NULL;
    }
    return id;
}

void eng__child_answer(eng_step_t *st, const eng_result_t *r)
{
    static const char *what[] = {"ok", "error", "cancelled", "timed out", "died", "refused"};
    cap_free(st->out);
    if (r->status == ENG_ST_OK && r->repr) {
        st->state = ENG_STEP_RESOLVED;
        st->out = (uint8_t *)cap_strdup(r->repr);
        st->out_len = strlen(r->repr);
        return;
    }
    char msg[512];
    int s = r->status >= ENG_ST_OK && r->status <= ENG_ST_REFUSED ? (int)r->status : 1;
    snprintf(msg, sizeof msg, "%s%s%s%s%s", what[s], r->etype || r->emsg ? ": " : "",
             r->etype ? r->etype : "", r->etype && r->emsg ? ": " : "", r->emsg ? r->emsg : "");
    if (r->status == ENG_ST_REFUSED && !r->emsg)
        snprintf(msg, sizeof msg, "refused: %s", cap_strerror(r->err));
    st->state = ENG_STEP_REJECTED;
    st->out = (uint8_t *)cap_strdup(msg);
    st->out_len = strlen(msg);
}

/* ---- running marks ---- */

void eng__mark_hold(eng_step_t **marks, eng_step_t *st)
{
    st->next = *marks;
    *marks = st;
}

void eng__mark_drop(eng_step_t **marks, const char *eid, const char *path)
{
    for (eng_step_t **pp = marks; *pp; pp = &(*pp)->next) {
        eng_step_t *m = *pp;
        if (strcmp(m->path, path) == 0 && strcmp(m->eid, eid) == 0) {
            *pp = m->next;
            eng__step_free(m);
            return;
        }
    }
}

static void mark_written(void *arg, int rc)
{
    (void)rc; /* a mark lost with the log only loses "running" of an attempt run again anyway */
    prom_result_clear(arg);
    cap_free(arg);
}

int64_t eng__mark_flush(prom_store_t *ps, eng_step_t **marks, int64_t now)
{
    int64_t next = INT64_MAX;
    for (eng_step_t **pp = marks; *pp;) {
        eng_step_t *m = *pp;
        if (m->due > now) {
            next = m->due < next ? m->due : next;
            pp = &m->next;
            continue;
        }
        *pp = m->next;
        char *pid = eng__step_pid(m->eid, m->path);
        prom_kv_t tags[4];
        step_tags(m, "step", tags);
        prom_value_t param = {NULL, 0, m->in, m->in_len};
        prom_create_t c = {pid, STEP_FOREVER, &param, tags, 3};
        prom_result_t *res = cap_calloc(1, sizeof *res);
        if (prom_promise_create_async(ps, &c, res, mark_written, res))
            cap_free(res);
        cap_free(pid);
        eng__step_free(m);
    }
    return next;
}

void eng__marks_free(eng_step_t **marks)
{
    while (*marks) {
        eng_step_t *m = *marks;
        *marks = m->next;
        eng__step_free(m);
    }
}

/* ---- listing ---- */

static const char *path_of(const char *id, const char *eid)
{
    size_t n = strlen(eid);
    if (strncmp(id, "capsule/x/", 10) == 0 && strncmp(id + 10, eid, n) == 0 && id[10 + n] == '.')
        return id + 10 + n + 1;
    return NULL;
}

static void strv_add(char ***v, size_t *n, size_t *cap, const char *s, size_t len)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 8;
        *v = cap_realloc(*v, *cap * sizeof **v);
    }
    char *c = cap_malloc(len + 1);
    memcpy(c, s, len);
    c[len] = 0;
    (*v)[(*n)++] = c;
}

/* Orders step paths numerically per level ("2" < "10", "2" < "2.1" < "3"). */
static int cmp_path(const void *a, const void *b)
{
    const char *p = ((const eng_task_info_t *)a)->path, *q = ((const eng_task_info_t *)b)->path;
    while (*p && *q) {
        char *pe, *qe;
        unsigned long x = strtoul(p, &pe, 10), y = strtoul(q, &qe, 10);
        p = pe;
        q = qe;
        if (x != y)
            return x < y ? -1 : 1;
        if (*p == '.')
            p++;
        if (*q == '.')
            q++;
    }
    return *p ? 1 : *q ? -1 : 0;
}

int eng__tasks_list(prom_store_t *ps, const char *eid, eng_task_info_t **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    prom_result_t res = {0};
    char *xpid = eng__step_pid(eid, "x");
    xpid[strlen(xpid) - 2] = 0; /* "capsule/x/<eid>" */
    int rc = prom_promise_get(ps, xpid, &res);
    cap_free(xpid);
    if (rc)
        return rc;
    if (res.status != PROM_S_OK) {
        prom_result_clear(&res);
        return CAP_ENOTFOUND;
    }
    int exec_running = res.promise->state == PROM_PENDING;
    prom_result_clear(&res);
    size_t cap = 0, nfailed = 0, capfailed = 0;
    char *cursor = NULL, **failed = NULL;
    prom_kv_t tag = {"capsule:exec", (char *)eid};
    do {
        prom_search_t q = {-1, &tag, 1, 1000, cursor};
        rc = prom_promise_search(ps, &q, &res);
        cap_free(cursor);
        cursor = NULL;
        if (rc || res.status != PROM_S_OK) {
            rc = rc ? rc : CAP_EINVAL;
            prom_result_clear(&res);
            for (size_t k = 0; k < nfailed; k++)
                cap_free(failed[k]);
            cap_free(failed);
            eng_tasks_free(*out, *n);
            *out = NULL;
            *n = 0;
            return rc;
        }
        for (size_t i = 0; i < res.npromises; i++) {
            const prom_promise_t *p = &res.promises[i];
            const char *path = path_of(p->id, eid);
            if (!path)
                continue;
            if (strchr(path, '#')) { /* a failed attempt's record: counted below */
                strv_add(&failed, &nfailed, &capfailed, path, (size_t)(strchr(path, '#') - path));
                continue;
            }
            if (*n == cap) {
                cap = cap ? cap * 2 : 16;
                *out = cap_realloc(*out, cap * sizeof **out);
            }
            eng_task_info_t *t = &(*out)[(*n)++];
            memset(t, 0, sizeof *t);
            t->id = cap_strdup(p->id);
            t->path = cap_strdup(path);
            const char *name = prom_promise_tag(p, "capsule:task");
            const char *kind = prom_promise_tag(p, "capsule:kind");
            t->name = cap_strdup(name ? name : "");
            t->kind = cap_strdup(kind ? kind : "step");
            t->attempts = attempts_of(p);
            t->created_at = p->created_at;
            t->settled_at = p->state == PROM_PENDING ? 0 : p->settled_at;
            t->timeout_at = p->timeout_at < STEP_FOREVER ? p->timeout_at : 0;
            t->state = p->state == PROM_RESOLVED  ? "completed"
                       : p->state != PROM_PENDING ? "failed"
                       : exec_running             ? "running"
                                                  : "pending";
        }
        cursor = res.cursor ? cap_strdup(res.cursor) : NULL;
        prom_result_clear(&res);
    } while (cursor);
    /* a step not settled yet: its failed attempts (recorded) + the one in flight or left */
    for (size_t i = 0; i < *n; i++) {
        eng_task_info_t *t = &(*out)[i];
        if (t->settled_at || strcmp(t->kind, "step") != 0)
            continue;
        t->attempts = 1;
        for (size_t k = 0; k < nfailed; k++)
            t->attempts += strcmp(failed[k], t->path) == 0;
    }
    for (size_t k = 0; k < nfailed; k++)
        cap_free(failed[k]);
    cap_free(failed);
    if (*n)
        qsort(*out, *n, sizeof **out, cmp_path);
    return 0;
}

void eng_tasks_free(eng_task_info_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        cap_free(v[i].id);
        cap_free(v[i].path);
        cap_free(v[i].name);
        cap_free(v[i].kind);
    }
    cap_free(v);
}
