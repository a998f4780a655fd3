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

/* Every settled step of st->eid, packed for the worker (see PYW_PO_PRELOAD). */
static int preload(prom_store_t *ps, eng_step_t *st)
{
    uint8_t *b = NULL;
    size_t n = 0, cap = 0;
    char *cursor = NULL;
    prom_kv_t tag = {"capsule:exec", st->eid};
    int rc = 0;
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
            if (!path || p->state == PROM_PENDING || n + p->value.len > ENG_PRELOAD_MAX)
                continue;
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
    return 0;
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
    } else if (st->op == ENG_STEP_SETTLE) {
        char att[16];
        snprintf(att, sizeof att, "%u", st->attempts);
        prom_kv_t hdr = {"capsule:attempts", att};
        prom_value_t v = {&hdr, 1, st->in, st->in_len};
        prom_settle_t s = {pid, st->num == ENG_STEP_RESOLVED ? PROM_RESOLVED : PROM_REJECTED, &v};
        rc = prom_promise_settle(ps, &s, &res);
    } else {
        int sleep = st->op == ENG_STEP_SLEEP;
        prom_kv_t tags[4] = {
            {"capsule:kind", sleep ? "sleep" : "step"},
            {"capsule:exec", st->eid},
            {"capsule:task", st->label ? st->label : ""},
            {"resonate:timer", "true"},
        };
        prom_value_t param = {NULL, 0, st->in, st->in_len};
        int64_t deadline =
            sleep ? now + (int64_t)(st->num > (uint64_t)1 << 40 ? (uint64_t)1 << 40 : st->num)
                  : STEP_FOREVER;
        prom_create_t c = {pid, deadline, &param, tags, sleep ? 4 : 3};
        rc = prom_promise_create(ps, &c, &res);
    }
    if (rc)
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

/* ---- listing ---- */

static const char *path_of(const char *id, const char *eid)
{
    size_t n = strlen(eid);
    if (strncmp(id, "capsule/x/", 10) == 0 && strncmp(id + 10, eid, n) == 0 && id[10 + n] == '.')
        return id + 10 + n + 1;
    return NULL;
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
    size_t cap = 0;
    char *cursor = NULL;
    prom_kv_t tag = {"capsule:exec", (char *)eid};
    do {
        prom_search_t q = {-1, &tag, 1, 1000, cursor};
        rc = prom_promise_search(ps, &q, &res);
        cap_free(cursor);
        cursor = NULL;
        if (rc || res.status != PROM_S_OK) {
            rc = rc ? rc : CAP_EINVAL;
            prom_result_clear(&res);
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
