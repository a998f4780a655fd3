/*
 * model.h - a small in-memory reference model of the Resonate promise/task state machine, written
 * independently of promise/ (arrays indexed by a small id pool, no wal, no encoding), and a random
 * operation driver that runs one operation on both the real store and the model and checks the
 * store's answer against the model's. Used by test_model (many operations, random clock) and
 * test_crash (the child's operations; the parent replays acknowledged ones).
 */
#ifndef PROM_MODEL_H
#define PROM_MODEL_H

#include <stdlib.h>
#include <string.h>

#include "prom_test.h"

#define M_IDS         40
#define M_MAXL        8
#define M_RETRY       5000
#define M_ADDR_TARGET "poll://any@default"

static const char *const m_addrs[] = {"poll://uni@g/0", "http://h/1", "local://any@g/2"};

typedef struct mprom {
    int ex;
    int st;
    int64_t tout, cat, sat;
    int tgt, timer, global, branch;
    int has_task, ts;
    int64_t tv, tr;
    int pid;
    int64_t ttl, tt;
    int aw[M_IDS];
    int naw;
    int lis[M_MAXL];
    int nlis;
} mprom_t;

typedef struct mmsg {
    int kind;
    int addr; /* -1 = the target */
    int id;
    int gen;
    int64_t version;
} mmsg_t;

typedef struct model {
    int64_t now;
    mprom_t p[M_IDS];
    mmsg_t *q;
    size_t nq, capq;
    int gen[M_IDS]; /* slot i holds the promise "p<i>.<gen[i]>" */
    /* retired promises (settled, task fulfilled, awaited by no one) stay in the store under
     * their old ids; the model only counts them, for preload and search */
    long retired_branch[4];
    long retired_state[5];
} model_t;

static inline void m_idg(char *buf, int i, int gen)
{
    snprintf(buf, 24, "p%02d.%d", i, gen);
}
#define m_id(buf, i) m_idg(buf, i, m->gen[i])

static inline int m_ext(const mprom_t *p)
{
    return p->global || p->tgt || p->timer;
}
static inline int m_alive(const model_t *m, const mprom_t *p)
{
    return p->st == PROM_PENDING && m->now < p->tout;
}
static inline void m_msg(model_t *m, int kind, int addr, int id, int64_t v)
{
    if (m->nq == m->capq) {
        m->capq = m->capq ? m->capq * 2 : 64;
        m->q = realloc(m->q, m->capq * sizeof(mmsg_t));
    }
    m->q[m->nq++] = (mmsg_t){kind, addr, id, m->gen[id], v};
}
static inline void m_dispatch(model_t *m, int i)
{
    mprom_t *p = &m->p[i];
    p->ts = PROM_TASK_PENDING;
    p->pid = -1;
    p->ttl = 0;
    p->tt = m->now + M_RETRY;
    m_msg(m, PROM_MSG_EXECUTE, -1, i, p->tv);
}
static inline void m_settle(model_t *m, int i, int st, int64_t at)
{
    mprom_t *p = &m->p[i];
    p->st = st;
    p->sat = at;
    if (p->has_task && p->ts != PROM_TASK_FULFILLED) {
        p->ts = PROM_TASK_FULFILLED;
        p->pid = -1;
        p->ttl = 0;
        p->tt = 0;
    }
    for (int k = 0; k < p->naw; k++) {
        mprom_t *a = &m->p[p->aw[k]];
        if (!a->has_task)
            continue;
        if (a->ts == PROM_TASK_SUSPENDED) {
            if (m_alive(m, a)) {
                a->tr++;
                m_dispatch(m, p->aw[k]);
            }
        } else if (a->ts != PROM_TASK_FULFILLED) {
            a->tr++;
        }
    }
    p->naw = 0;
    for (int k = 0; k < p->nlis; k++)
        m_msg(m, PROM_MSG_UNBLOCK, p->lis[k], i, 0);
    p->nlis = 0;
}
static inline int m_tostate(const mprom_t *p)
{
    return p->timer ? PROM_RESOLVED : PROM_REJECTED_TIMEDOUT;
}
static inline void m_mat(model_t *m, int i)
{
    mprom_t *p = &m->p[i];
    if (p->ex && p->st == PROM_PENDING && m->now >= p->tout)
        m_settle(m, i, m_tostate(p), p->tout);
}
static inline int64_t m_deadline(const mprom_t *p)
{
    int64_t t = INT64_MAX;
    if (!p->ex)
        return t;
    if (p->st == PROM_PENDING)
        t = p->tout;
    if (p->has_task && p->tt && p->tt < t)
        t = p->tt;
    return t;
}
static inline int m_preload(const model_t *m, int i)
{
    int n = 0;
    if (m->p[i].branch < 0)
        return 0;
    for (int k = 0; k < M_IDS; k++)
        n += k != i && m->p[k].ex && m->p[k].branch == m->p[i].branch;
    n += (int)m->retired_branch[m->p[i].branch];
    return n < 1000 ? n : 1000; /* the default preload_limit */
}

/* Checks a promise record against the model's projection of promise i. */
static inline void m_check_promise(const model_t *m, int i, const prom_promise_t *r)
{
    const mprom_t *p = &m->p[i];
    char id[24];
    m_id(id, i);
    CHECK(r);
    CHECK_STREQ(r->id, id);
    int st = p->st;
    int64_t sat = p->sat;
    if (st == PROM_PENDING && m->now >= p->tout) {
        st = m_tostate(p);
        sat = p->tout;
    }
    CHECK_EQ(r->state, st);
    CHECK_EQ(r->timeout_at, p->tout);
    CHECK_EQ(r->created_at, p->cat);
    if (st != PROM_PENDING)
        CHECK_EQ(r->settled_at, sat);
}
static inline void m_check_task(const model_t *m, int i, const prom_task_t *t)
{
    const mprom_t *p = &m->p[i];
    CHECK(t);
    int ts = p->ts;
    if (p->st == PROM_PENDING && m->now >= p->tout)
        ts = PROM_TASK_FULFILLED;
    CHECK_EQ(t->state, ts);
    CHECK_EQ(t->version, p->tv);
    CHECK_EQ(t->resumes, p->tr);
    if (ts == PROM_TASK_ACQUIRED) {
        char pid[8];
        snprintf(pid, sizeof(pid), "w%d", p->pid);
        CHECK_STREQ(t->pid, pid);
        CHECK_EQ(t->ttl, p->ttl);
    } else {
        CHECK(t->pid == NULL);
    }
}

/* Compares every promise and task, the outbox length and the next deadline. */
static inline void m_compare_all(model_t *m, prom_store_t *ps)
{
    for (int i = 0; i < M_IDS; i++) {
        char id[24];
        prom_result_t r;
        m_id(id, i);
        CHECK_OK(prom_promise_get(ps, id, &r));
        CHECK_EQ(r.status, m->p[i].ex ? 200 : 404);
        if (m->p[i].ex)
            m_check_promise(m, i, r.promise);
        prom_result_clear(&r);
        CHECK_OK(prom_task_get(ps, id, &r));
        CHECK_EQ(r.status, m->p[i].ex && m->p[i].has_task ? 200 : 404);
        if (r.status == 200)
            m_check_task(m, i, r.task);
        prom_result_clear(&r);
    }
    CHECK_EQ(prom_outbox_len(ps), m->nq);
    int64_t d = INT64_MAX;
    for (int i = 0; i < M_IDS; i++)
        if (m_deadline(&m->p[i]) < d)
            d = m_deadline(&m->p[i]);
    CHECK_EQ(prom_store_next_deadline(ps), d);
}

static inline int m_cmp_msg(const void *a, const void *b)
{
    const mmsg_t *x = a, *y = b;
    if (x->kind != y->kind)
        return x->kind - y->kind;
    if (x->id != y->id)
        return x->id - y->id;
    if (x->gen != y->gen)
        return x->gen - y->gen;
    if (x->addr != y->addr)
        return x->addr - y->addr;
    return x->version < y->version ? -1 : x->version > y->version;
}

/* Takes the whole outbox and compares it with the model's queue (as multisets). */
static inline void m_take(model_t *m, prom_store_t *ps)
{
    prom_msg_t *msgs;
    size_t n;
    CHECK_OK(prom_outbox_take(ps, 1u << 30, &msgs, &n));
    CHECK_EQ(n, m->nq);
    mmsg_t *got = calloc(n + 1, sizeof(mmsg_t));
    for (size_t k = 0; k < n; k++) {
        got[k].kind = msgs[k].kind;
        CHECK_EQ(sscanf(msgs[k].id, "p%d.%d", &got[k].id, &got[k].gen), 2);
        got[k].version = msgs[k].version;
        got[k].addr = -2;
        if (strcmp(msgs[k].address, M_ADDR_TARGET) == 0)
            got[k].addr = -1;
        for (int a = 0; a < 3; a++)
            if (strcmp(msgs[k].address, m_addrs[a]) == 0)
                got[k].addr = a;
        CHECK(got[k].addr != -2);
        if (msgs[k].kind == PROM_MSG_UNBLOCK) {
            CHECK(msgs[k].promise);
            if (got[k].gen == m->gen[got[k].id])
                CHECK_EQ(msgs[k].promise->state, m->p[got[k].id].st);
        }
        CHECK(k == 0 || msgs[k].mid > msgs[k - 1].mid);
    }
    if (n) {
        qsort(got, n, sizeof(mmsg_t), m_cmp_msg);
        qsort(m->q, n, sizeof(mmsg_t), m_cmp_msg);
    }
    for (size_t k = 0; k < n; k++)
        CHECK(m_cmp_msg(&got[k], &m->q[k]) == 0);
    m->nq = 0;
    free(got);
    prom_msgs_free(msgs, n);
}

/* Fires due timers in the model as the store's tick does; returns how many documents fired. */
static inline size_t m_tick(model_t *m)
{
    size_t fired = 0;
    for (;;) {
        int best = -1;
        int64_t bd = INT64_MAX;
        char bid[24] = "", cid[24];
        for (int i = 0; i < M_IDS; i++) {
            int64_t d = m_deadline(&m->p[i]);
            m_id(cid, i);
            if (d <= m->now && (d < bd || (d == bd && strcmp(cid, bid) < 0))) {
                bd = d;
                best = i;
                memcpy(bid, cid, sizeof(bid));
            }
        }
        if (best < 0)
            break;
        mprom_t *p = &m->p[best];
        fired++;
        if (p->st == PROM_PENDING && m->now >= p->tout) {
            m_settle(m, best, m_tostate(p), p->tout);
        } else if (p->ts == PROM_TASK_PENDING) {
            p->tt = m->now + M_RETRY;
            m_msg(m, PROM_MSG_EXECUTE, -1, best, p->tv);
        } else if (p->ts == PROM_TASK_ACQUIRED) {
            m_dispatch(m, best);
        } else {
            p->tt = 0;
        }
    }
    return fired;
}

/* Moves slot i to a fresh id if its promise is done with: settled, task fulfilled, awaited by
 * no one, no message for it queued. */
static inline void m_retire(model_t *m, int i)
{
    mprom_t *p = &m->p[i];
    if (!p->ex || p->st == PROM_PENDING || (p->has_task && p->ts != PROM_TASK_FULFILLED))
        return;
    for (int k = 0; k < M_IDS; k++)
        for (int l = 0; l < m->p[k].naw; l++)
            if (m->p[k].aw[l] == i)
                return;
    if (p->branch >= 0)
        m->retired_branch[p->branch]++;
    m->retired_state[p->st]++;
    memset(p, 0, sizeof(*p));
    m->gen[i]++;
}

/* Rng: xorshift64*. */
static inline uint64_t m_rand(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}
#define RND(n) ((int64_t)(m_rand(rng) % (uint64_t)(n)))

/* One random operation against the store and the model. Returns the op code. If `check` is 0,
 * results are not compared (used when the model is known to be ahead, never in practice). */
static inline int m_step(model_t *m, prom_store_t *ps, fake_clock_t *clk, uint64_t *rng)
{
    int op = (int)RND(20);
    int i = (int)RND(M_IDS), j = (int)RND(M_IDS);
    char id[24], jd[24], pid[8];
    if (RND(4) == 0)
        m_retire(m, (int)RND(M_IDS));
    m_id(id, i);
    m_id(jd, j);
    mprom_t *p = &m->p[i];
    int pidn = (int)RND(3);
    snprintf(pid, sizeof(pid), "w%d", pidn);
    prom_result_t r;
    prom_value_t val = {NULL, 0, "x", 1};
    int64_t v = p->tv + (RND(5) == 0 ? RND(3) - 1 : 0);
    int sst = RND(20) == 0 ? PROM_PENDING : 1 + (int)RND(3);
    /* tags for a create */
    prom_kv_t tags[6];
    size_t nt = 0;
    int tgt = RND(10) < 4, timer = tgt && RND(5) == 0, global = RND(10) < 3;
    int branch = RND(2) ? (int)RND(4) : -1, delay = RND(20) == 0;
    int64_t tout = m->now + RND(60000) - 500;
    int64_t dval = m->now + RND(70000);
    char bbuf[8], dbuf[24];
    if (tgt)
        tags[nt++] = (prom_kv_t){"resonate:target", M_ADDR_TARGET};
    if (timer)
        tags[nt++] = (prom_kv_t){"resonate:timer", "true"};
    if (global)
        tags[nt++] = (prom_kv_t){"resonate:scope", "global"};
    if (branch >= 0) {
        snprintf(bbuf, sizeof(bbuf), "b%d", branch);
        tags[nt++] = (prom_kv_t){"resonate:branch", bbuf};
    }
    if (delay) {
        snprintf(dbuf, sizeof(dbuf), "%lld", (long long)dval);
        tags[nt++] = (prom_kv_t){"resonate:delay", dbuf};
    }
    int create_bad = delay && (!tgt || dval >= tout);

    switch (op) {
    case 0:
    case 1: { /* promise.create */
        prom_create_t c = {id, tout, &val, tags, nt};
        CHECK_OK(prom_promise_create(ps, &c, &r));
        if (create_bad) {
            CHECK_EQ(r.status, 400);
            break;
        }
        CHECK_EQ(r.status, 200);
        if (!p->ex) {
            memset(p, 0, sizeof(*p));
            p->ex = 1;
            p->tout = tout;
            p->tgt = tgt;
            p->timer = timer;
            p->global = global;
            p->branch = branch;
            p->has_task = tgt;
            p->pid = -1;
            if (m->now >= tout) {
                p->st = m_tostate(p);
                p->cat = p->sat = tout;
                p->ts = PROM_TASK_FULFILLED;
            } else {
                p->st = PROM_PENDING;
                p->cat = m->now;
                if (tgt) {
                    if (delay && dval > m->now) {
                        p->ts = PROM_TASK_PENDING;
                        p->tt = dval;
                    } else {
                        m_dispatch(m, i);
                    }
                }
            }
        }
        m_check_promise(m, i, r.promise);
        break;
    }
    case 2: /* promise.get */
        CHECK_OK(prom_promise_get(ps, id, &r));
        CHECK_EQ(r.status, p->ex ? 200 : 404);
        if (p->ex)
            m_check_promise(m, i, r.promise);
        break;
    case 3: { /* promise.settle */
        prom_settle_t se = {id, (prom_state_t)sst, &val};
        CHECK_OK(prom_promise_settle(ps, &se, &r));
        if (sst == PROM_PENDING) {
            CHECK_EQ(r.status, 400);
            break;
        }
        if (!p->ex) {
            CHECK_EQ(r.status, 404);
            break;
        }
        m_mat(m, i);
        if (p->st == PROM_PENDING)
            m_settle(m, i, sst, m->now);
        CHECK_EQ(r.status, 200);
        m_check_promise(m, i, r.promise);
        break;
    }
    case 4: { /* promise.register_callback: awaited i, awaiter j */
        mprom_t *w = &m->p[j];
        CHECK_OK(prom_promise_register_callback(ps, id, jd, &r));
        int want = i == j ? 400 : !p->ex ? 404 : !w->ex || !w->has_task || !m_ext(p) ? 422 : 200;
        CHECK_EQ(r.status, want);
        if (want != 200)
            break;
        m_mat(m, i);
        m_mat(m, j);
        if (p->st == PROM_PENDING && w->st == PROM_PENDING) {
            int have = 0;
            for (int k = 0; k < p->naw; k++)
                have |= p->aw[k] == j;
            if (!have)
                p->aw[p->naw++] = j;
        } else if (p->st != PROM_PENDING && w->ts == PROM_TASK_SUSPENDED && m_alive(m, w)) {
            w->tr++;
            m_dispatch(m, j);
        }
        m_check_promise(m, i, r.promise);
        break;
    }
    case 5: { /* promise.register_listener */
        int a = (int)RND(4);
        CHECK_OK(prom_promise_register_listener(ps, id, a < 3 ? m_addrs[a] : "bogus", &r));
        int want = a == 3 ? 400 : !p->ex ? 404 : !m_ext(p) ? 422 : 200;
        CHECK_EQ(r.status, want);
        if (want != 200)
            break;
        m_mat(m, i);
        if (p->st == PROM_PENDING) {
            int have = 0;
            for (int k = 0; k < p->nlis; k++)
                have |= p->lis[k] == a;
            if (!have)
                p->lis[p->nlis++] = a;
        }
        m_check_promise(m, i, r.promise);
        break;
    }
    case 6: { /* promise.search by state (reads committed state) */
        int qs = (int)RND(4) - 1;
        prom_search_t q = {qs, NULL, 0, 1 + (int)RND(1000), NULL};
        size_t got = 0;
        char *cur = NULL;
        for (;;) {
            CHECK_OK(prom_promise_search(ps, &q, &r));
            CHECK_EQ(r.status, 200);
            got += r.npromises;
            CHECK(r.npromises <= (size_t)q.limit);
            cap_free(cur);
            cur = r.cursor ? cap_strdup(r.cursor) : NULL;
            prom_result_clear(&r);
            if (!cur)
                break;
            q.cursor = cur;
        }
        size_t want = 0;
        for (int k = 0; k < M_IDS; k++) {
            const mprom_t *x = &m->p[k];
            if (!x->ex)
                continue;
            int st = x->st == PROM_PENDING && m->now >= x->tout ? m_tostate(x) : x->st;
            want += qs < 0 || st == qs || (qs == PROM_REJECTED && st >= PROM_REJECTED);
        }
        for (int st = 0; st < 5; st++)
            if (qs < 0 || st == qs || (qs == PROM_REJECTED && st >= PROM_REJECTED))
                want += (size_t)m->retired_state[st];
        CHECK_EQ(got, want);
        break;
    }
    case 7: { /* task.create (always a target; sometimes a delay, which is 400) */
        prom_kv_t tt[3] = {{"resonate:target", M_ADDR_TARGET},
                           {"resonate:branch", "b0"},
                           {"resonate:delay", dbuf}};
        snprintf(dbuf, sizeof(dbuf), "%lld", (long long)dval);
        int64_t ttl = 1000 + RND(9000);
        prom_create_t c = {id, tout, &val, tt, delay ? 3 : 2};
        CHECK_OK(prom_task_create(ps, pid, ttl, &c, &r));
        if (delay) {
            CHECK_EQ(r.status, 400);
            break;
        }
        if (p->ex && !p->has_task) {
            CHECK_EQ(r.status, 422);
            break;
        }
        if (p->ex) {
            m_mat(m, i);
            if (p->ts != PROM_TASK_PENDING && p->ts != PROM_TASK_FULFILLED) {
                CHECK_EQ(r.status, 409);
                break;
            }
        } else {
            memset(p, 0, sizeof(*p));
            p->ex = 1;
            p->tout = tout;
            p->tgt = 1;
            p->branch = 0;
            p->has_task = 1;
            p->pid = -1;
            if (m->now >= tout) {
                p->st = PROM_REJECTED_TIMEDOUT;
                p->cat = p->sat = tout;
                p->ts = PROM_TASK_FULFILLED;
            } else {
                p->st = PROM_PENDING;
                p->cat = m->now;
                p->ts = PROM_TASK_PENDING;
            }
        }
        if (p->ts == PROM_TASK_PENDING) {
            p->ts = PROM_TASK_ACQUIRED;
            p->tv++;
            p->pid = pidn;
            p->ttl = ttl;
            p->tt = m->now + ttl;
            p->tr = 0;
        }
        CHECK_EQ(r.status, 200);
        m_check_task(m, i, r.task);
        m_check_promise(m, i, r.promise);
        CHECK_EQ(r.npromises, m_preload(m, i));
        break;
    }
    case 8: { /* task.acquire */
        int64_t ttl = 1000 + RND(9000);
        CHECK_OK(prom_task_acquire(ps, id, v, pid, ttl, &r));
        if (!p->ex || !p->has_task) {
            CHECK_EQ(r.status, 404);
            break;
        }
        m_mat(m, i);
        if (p->ts != PROM_TASK_PENDING || p->tv != v) {
            CHECK_EQ(r.status, 409);
            break;
        }
        p->ts = PROM_TASK_ACQUIRED;
        p->tv++;
        p->pid = pidn;
        p->ttl = ttl;
        p->tt = m->now + ttl;
        p->tr = 0;
        CHECK_EQ(r.status, 200);
        m_check_task(m, i, r.task);
        m_check_promise(m, i, r.promise);
        CHECK_EQ(r.npromises, m_preload(m, i));
        break;
    }
    case 9:    /* task.release */
    case 10:   /* task.fulfill */
    case 13:   /* task.fence (create) */
    case 14:   /* task.fence (settle) */
    case 11: { /* task.suspend */
        const char *aw[3];
        char awb[3][24];
        int awi[3], na = 1 + (int)RND(3);
        for (int k = 0; k < na; k++) {
            awi[k] = (int)RND(M_IDS);
            m_id(awb[k], awi[k]);
            aw[k] = awb[k];
        }
        prom_settle_t se = {id, (prom_state_t)sst, &val};
        prom_settle_t fs = {jd, (prom_state_t)sst, &val};
        prom_create_t fc = {jd, tout, &val, tags, nt};
        int bad = 0;
        if (op == 9) {
            CHECK_OK(prom_task_release(ps, id, v, &r));
        } else if (op == 10) {
            CHECK_OK(prom_task_fulfill(ps, id, v, &se, &r));
            bad = sst == PROM_PENDING;
        } else if (op == 11) {
            CHECK_OK(prom_task_suspend(ps, id, v, aw, (size_t)na, &r));
            for (int k = 0; k < na; k++) {
                bad |= awi[k] == i;
                for (int l = 0; l < k; l++)
                    bad |= awi[k] == awi[l];
            }
        } else if (op == 13) {
            CHECK_OK(prom_task_fence_create(ps, id, v, &fc, &r));
            bad = create_bad || i == j;
        } else {
            CHECK_OK(prom_task_fence_settle(ps, id, v, &fs, &r));
            bad = sst == PROM_PENDING || i == j;
        }
        if (bad) {
            CHECK_EQ(r.status, 400);
            break;
        }
        if (!p->ex || !p->has_task) {
            CHECK_EQ(r.status, 404);
            break;
        }
        m_mat(m, i);
        if (p->ts != PROM_TASK_ACQUIRED || p->tv != v) {
            CHECK_EQ(r.status, 409);
            break;
        }
        if (op == 9) {
            m_dispatch(m, i);
            CHECK_EQ(r.status, 200);
        } else if (op == 10) {
            m_settle(m, i, sst, m->now);
            CHECK_EQ(r.status, 200);
            m_check_promise(m, i, r.promise);
        } else if (op == 11) {
            int u = 0;
            for (int k = 0; k < na; k++)
                u |= !m->p[awi[k]].ex || !m_ext(&m->p[awi[k]]);
            if (u) {
                CHECK_EQ(r.status, 422);
                break;
            }
            int settled = 0;
            for (int k = 0; k < na; k++) {
                m_mat(m, awi[k]);
                settled |= m->p[awi[k]].st != PROM_PENDING;
            }
            if (settled) {
                CHECK_EQ(r.status, 300);
                CHECK_EQ(r.npromises, m_preload(m, i));
                break;
            }
            for (int k = 0; k < na; k++) {
                mprom_t *a = &m->p[awi[k]];
                int have = 0;
                for (int l = 0; l < a->naw; l++)
                    have |= a->aw[l] == i;
                if (!have)
                    a->aw[a->naw++] = i;
            }
            p->ts = PROM_TASK_SUSPENDED;
            p->pid = -1;
            p->ttl = 0;
            p->tt = 0;
            CHECK_EQ(r.status, 200);
        } else if (op == 13) {
            mprom_t *c = &m->p[j];
            if (!c->ex) {
                memset(c, 0, sizeof(*c));
                c->ex = 1;
                c->tout = tout;
                c->tgt = tgt;
                c->timer = timer;
                c->global = global;
                c->branch = branch;
                c->has_task = tgt;
                c->pid = -1;
                if (m->now >= tout) {
                    c->st = m_tostate(c);
                    c->cat = c->sat = tout;
                    c->ts = PROM_TASK_FULFILLED;
                } else {
                    c->st = PROM_PENDING;
                    c->cat = m->now;
                    if (tgt) {
                        if (delay && dval > m->now) {
                            c->ts = PROM_TASK_PENDING;
                            c->tt = dval;
                        } else {
                            m_dispatch(m, j);
                        }
                    }
                }
            }
            CHECK_EQ(r.status, 200);
            CHECK_EQ(r.action_status, 200);
            m_check_promise(m, j, r.promise);
            CHECK_EQ(r.npromises, m_preload(m, i));
        } else {
            mprom_t *c = &m->p[j];
            CHECK_EQ(r.status, 200);
            if (!c->ex) {
                CHECK_EQ(r.action_status, 404);
                break;
            }
            m_mat(m, j);
            if (c->st == PROM_PENDING)
                m_settle(m, j, sst, m->now);
            CHECK_EQ(r.action_status, 200);
            m_check_promise(m, j, r.promise);
            CHECK_EQ(r.npromises, m_preload(m, i));
        }
        break;
    }
    case 12: { /* task.heartbeat */
        prom_task_ref_t ref = {id, v};
        CHECK_OK(prom_task_heartbeat(ps, pid, &ref, 1, &r));
        CHECK_EQ(r.status, 200);
        if (p->ex && p->has_task && p->ts == PROM_TASK_ACQUIRED && p->tv == v && p->pid == pidn &&
            m_alive(m, p))
            p->tt = m->now + p->ttl;
        break;
    }
    case 15: /* task.halt */
        CHECK_OK(prom_task_halt(ps, id, &r));
        if (!p->ex || !p->has_task) {
            CHECK_EQ(r.status, 404);
            break;
        }
        m_mat(m, i);
        if (p->ts == PROM_TASK_FULFILLED) {
            CHECK_EQ(r.status, 409);
            break;
        }
        if (p->ts != PROM_TASK_HALTED) {
            p->ts = PROM_TASK_HALTED;
            p->pid = -1;
            p->ttl = 0;
            p->tt = 0;
        }
        CHECK_EQ(r.status, 200);
        break;
    case 16: /* task.continue */
        CHECK_OK(prom_task_continue(ps, id, &r));
        if (!p->ex || !p->has_task) {
            CHECK_EQ(r.status, 404);
            break;
        }
        m_mat(m, i);
        if (p->ts != PROM_TASK_HALTED) {
            CHECK_EQ(r.status, 409);
            break;
        }
        m_dispatch(m, i);
        CHECK_EQ(r.status, 200);
        break;
    case 17: { /* the timer tick */
        size_t fired;
        CHECK_OK(prom_store_tick(ps, m->now, &fired));
        CHECK_EQ(fired, m_tick(m));
        return op;
    }
    case 18: /* drain the outbox */
        m_take(m, ps);
        return op;
    default:                                              /* the clock moves (never backwards) */
        m->now += RND(100) == 0 ? RND(60000) : RND(1000); /* sometimes a jump: many timers due */
        clk->now = m->now;
        return op;
    }
    prom_result_clear(&r);
    return op;
}

#endif
