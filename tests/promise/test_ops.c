/*
 * test_ops.c - table-driven tests of every promise-store operation and outcome (200, 300, 400,
 * 404, 409, 422), including the corner cases of the protocol's state tables: create after the
 * deadline, settle of a settled promise, projected timeouts, suspend when an awaited promise
 * already settled, lease expiry, retry re-dispatch, halt/continue, lineage, reopen. Runs on the
 * real LMDB through the real wal with a fake clock.
 */
#include <stdlib.h>
#include <string.h>

#include "prom_test.h"

enum {
    OP_CREATE = 1,
    OP_GET,
    OP_SETTLE,
    OP_CB,
    OP_LISTEN,
    OP_SEARCH,
    OP_TGET,
    OP_TCREATE,
    OP_ACQ,
    OP_REL,
    OP_FUL,
    OP_SUS,
    OP_FENCE_C,
    OP_FENCE_S,
    OP_HB,
    OP_HALT,
    OP_CONT,
    OP_CLOCK,
    OP_TICK,
    OP_OUT,
    OP_REOPEN
};

/* Expected enums are stored +1 so that 0 means "not checked". */
#define PS(x) (PROM_##x + 1)
#define TS(x) (PROM_TASK_##x + 1)
#define T(x)  (1000000 + (x))

typedef struct step {
    int op;
    const char *id;
    const char *s;    /* second id / address / pid / awaited list / search state */
    const char *tags; /* "k=v;k=v" */
    int64_t n;        /* timeout / version / clock */
    int64_t m;        /* ttl / settle state / limit / child timeout */
    int want;         /* status; TICK: fired; OUT: messages; SEARCH: status */
    int ps;           /* expected promise state + 1 */
    int ts;           /* expected task state + 1 */
    int64_t ver;      /* expected task version + 1; OUT: version of the first message + 1 */
    int pre;          /* expected preload count + 1; SEARCH: expected hits + 1 */
    int act;          /* fence: expected inner status */
    int64_t sat;      /* expected settled_at (0 = unchecked) */
    int64_t tout;     /* expected timeout_at (0 = unchecked) */
    int res;          /* expected resumes + 1 */
    int cur;          /* SEARCH: 1 cursor present, 2 absent */
} step_t;

static int verbose;
static prom_kv_t kvbuf[16];
static char kvstr[1024];

static size_t parse_tags(const char *tags, prom_kv_t **out)
{
    size_t n = 0;
    *out = kvbuf;
    if (!tags)
        return 0;
    snprintf(kvstr, sizeof(kvstr), "%s", tags);
    char *save = NULL;
    for (char *tok = strtok_r(kvstr, ";", &save); tok && n < 16; tok = strtok_r(NULL, ";", &save)) {
        char *eq = strchr(tok, '=');
        CHECK(eq);
        *eq = 0;
        kvbuf[n].key = tok;
        kvbuf[n].value = eq + 1;
        n++;
    }
    return n;
}

static int state_of(const char *name)
{
    for (int i = 0; i <= PROM_REJECTED_TIMEDOUT; i++)
        if (strcmp(prom_state_name((prom_state_t)i), name) == 0)
            return i;
    return -1;
}

static void run(const char *name, const step_t *steps, size_t nsteps, prom_lineage_t lineage)
{
    ptest_t t;
    ptest_init(&t, "prom-ops");
    t.lineage = lineage;
    ptest_open(&t);
    char cursor[256] = "";
    for (size_t i = 0; i < nsteps; i++) {
        const step_t *st = &steps[i];
        prom_result_t r;
        memset(&r, 0, sizeof(r));
        prom_kv_t *kv;
        size_t nkv = parse_tags(st->tags, &kv);
        prom_value_t val = {NULL, 0, "v", 1};
        int status = -1;
        if (verbose)
            fprintf(stderr, "%s step %zu op %d id %s\n", name, i, st->op, st->id ? st->id : "-");
        switch (st->op) {
        case OP_CREATE: {
            prom_create_t c = {st->id, st->n, &val, kv, nkv};
            CHECK_OK(prom_promise_create(t.ps, &c, &r));
            break;
        }
        case OP_GET:
            CHECK_OK(prom_promise_get(t.ps, st->id, &r));
            break;
        case OP_SETTLE: {
            prom_settle_t se = {st->id, (prom_state_t)st->m, &val};
            CHECK_OK(prom_promise_settle(t.ps, &se, &r));
            break;
        }
        case OP_CB:
            CHECK_OK(prom_promise_register_callback(t.ps, st->id, st->s, &r));
            break;
        case OP_LISTEN:
            CHECK_OK(prom_promise_register_listener(t.ps, st->id, st->s, &r));
            break;
        case OP_SEARCH: {
            prom_search_t q = {st->s ? state_of(st->s) : -1, kv, nkv, (int)st->m,
                               st->id ? cursor : NULL};
            CHECK_OK(prom_promise_search(t.ps, &q, &r));
            snprintf(cursor, sizeof(cursor), "%s", r.cursor ? r.cursor : "");
            if (st->cur)
                CHECK_EQ(r.cursor != NULL, st->cur == 1);
            for (size_t k = 1; k < r.npromises; k++)
                CHECK(strcmp(r.promises[k - 1].id, r.promises[k].id) < 0);
            break;
        }
        case OP_TGET:
            CHECK_OK(prom_task_get(t.ps, st->id, &r));
            break;
        case OP_TCREATE: {
            prom_create_t c = {st->id, st->n, &val, kv, nkv};
            CHECK_OK(prom_task_create(t.ps, st->s, st->m, &c, &r));
            break;
        }
        case OP_ACQ:
            CHECK_OK(prom_task_acquire(t.ps, st->id, st->n, st->s ? st->s : "w1",
                                       st->m ? st->m : 5000, &r));
            break;
        case OP_REL:
            CHECK_OK(prom_task_release(t.ps, st->id, st->n, &r));
            break;
        case OP_FUL: {
            prom_settle_t se = {st->s ? st->s : st->id, (prom_state_t)st->m, &val};
            CHECK_OK(prom_task_fulfill(t.ps, st->id, st->n, &se, &r));
            break;
        }
        case OP_SUS: {
            char buf[256];
            const char *aw[8];
            size_t na = 0;
            snprintf(buf, sizeof(buf), "%s", st->s ? st->s : "");
            char *save = NULL;
            for (char *tok = strtok_r(buf, ",", &save); tok && na < 8;
                 tok = strtok_r(NULL, ",", &save))
                aw[na++] = tok;
            CHECK_OK(prom_task_suspend(t.ps, st->id, st->n, aw, na, &r));
            break;
        }
        case OP_FENCE_C: {
            prom_create_t c = {st->s, st->m, &val, kv, nkv};
            CHECK_OK(prom_task_fence_create(t.ps, st->id, st->n, &c, &r));
            break;
        }
        case OP_FENCE_S: {
            prom_settle_t se = {st->s, PROM_RESOLVED, &val};
            CHECK_OK(prom_task_fence_settle(t.ps, st->id, st->n, &se, &r));
            break;
        }
        case OP_HB: {
            prom_task_ref_t ref = {st->id, st->n};
            CHECK_OK(prom_task_heartbeat(t.ps, st->s, &ref, st->id ? 1 : 0, &r));
            break;
        }
        case OP_HALT:
            CHECK_OK(prom_task_halt(t.ps, st->id, &r));
            break;
        case OP_CONT:
            CHECK_OK(prom_task_continue(t.ps, st->id, &r));
            break;
        case OP_CLOCK:
            t.clock.now = st->n;
            continue;
        case OP_TICK: {
            size_t fired;
            if (st->n)
                t.clock.now = st->n;
            CHECK_OK(prom_store_tick(t.ps, t.clock.now, &fired));
            CHECK_EQ(fired, st->want);
            continue;
        }
        case OP_OUT: {
            prom_msg_t *msgs;
            size_t nm;
            CHECK_OK(prom_outbox_take(t.ps, 1000, &msgs, &nm));
            CHECK_EQ(nm, st->want);
            if (nm && st->m)
                CHECK_EQ(msgs[0].kind, st->m);
            if (nm && st->s)
                CHECK_STREQ(msgs[0].address, st->s);
            if (nm && st->id)
                CHECK_STREQ(msgs[0].id, st->id);
            if (nm && st->ver)
                CHECK_EQ(msgs[0].version, st->ver - 1);
            if (nm && msgs[0].kind == PROM_MSG_UNBLOCK) {
                CHECK(msgs[0].promise);
                CHECK(msgs[0].promise->state != PROM_PENDING);
                if (st->ps)
                    CHECK_EQ(msgs[0].promise->state, st->ps - 1);
            }
            prom_msgs_free(msgs, nm);
            CHECK_EQ(prom_outbox_len(t.ps), 0);
            continue;
        }
        case OP_REOPEN:
            ptest_reopen(&t);
            continue;
        default:
            CHECK(0);
        }
        status = r.status;
        if (status != st->want)
            fprintf(stderr, "%s step %zu: status %d, expected %d (%s)\n", name, i, status, st->want,
                    r.message ? r.message : "");
        CHECK_EQ(status, st->want);
        if (status != PROM_S_OK)
            CHECK(r.message && r.message[0]);
        if (st->act)
            CHECK_EQ(r.action_status, st->act);
        if (st->op == OP_SEARCH) {
            if (st->pre)
                CHECK_EQ(r.npromises, st->pre - 1);
        } else if (st->pre) {
            CHECK_EQ(r.npromises, st->pre - 1);
        }
        if (st->ps || st->sat || st->tout) {
            prom_result_t g;
            const prom_promise_t *p = r.promise;
            memset(&g, 0, sizeof(g));
            if (!p || st->op == OP_CB) {
                const char *pid = st->op == OP_FENCE_C || st->op == OP_FENCE_S ? st->s : st->id;
                CHECK_OK(prom_promise_get(t.ps, pid, &g));
                CHECK_EQ(g.status, 200);
                p = g.promise;
            }
            if (st->ps)
                CHECK_EQ(p->state, st->ps - 1);
            if (st->sat)
                CHECK_EQ(p->settled_at, st->sat);
            if (st->tout)
                CHECK_EQ(p->timeout_at, st->tout);
            prom_result_clear(&g);
        }
        if (st->ts || st->ver || st->res) {
            prom_result_t g;
            memset(&g, 0, sizeof(g));
            const char *tid = st->op == OP_CB ? st->s : st->id;
            CHECK_OK(prom_task_get(t.ps, tid, &g));
            CHECK_EQ(g.status, 200);
            if (st->ts)
                CHECK_EQ(g.task->state, st->ts - 1);
            if (st->ver)
                CHECK_EQ(g.task->version, st->ver - 1);
            if (st->res)
                CHECK_EQ(g.task->resumes, st->res - 1);
            CHECK_EQ(g.task->pid != NULL, g.task->state == PROM_TASK_ACQUIRED);
            prom_result_clear(&g);
        }
        prom_result_clear(&r);
    }
    ptest_fini(&t);
    fprintf(stderr, "%s: ok (%zu steps)\n", name, nsteps);
}

#define RUN(tbl) run(#tbl, tbl, sizeof(tbl) / sizeof(tbl[0]), PROM_LINEAGE_OFF)

#define TGT    "resonate:target=poll://any@default"
#define TGTW   "resonate:target=poll://any@default/w1"
#define GLOBAL "resonate:scope=global"

/* promise.create / get / settle, idempotency, validation */
static const step_t t_promise[] = {
    {.op = OP_GET, .id = "p1", .want = 404},
    {.op = OP_CREATE, .id = "p1", .n = T(1000), .want = 200, .ps = PS(PENDING)},
    {.op = OP_CREATE,
     .id = "p1",
     .n = T(5000),
     .tags = "a=b",
     .want = 200,
     .ps = PS(PENDING),
     .tout = T(1000)},
    {.op = OP_GET, .id = "p1", .want = 200, .ps = PS(PENDING)},
    {.op = OP_CREATE, .id = "", .n = T(1000), .want = 400},
    {.op = OP_CREATE, .id = "p2", .n = -1, .want = 400},
    {.op = OP_CREATE, .id = "p2", .n = T(10), .tags = "resonate:target=ftp://x", .want = 400},
    {.op = OP_CREATE, .id = "p2", .n = T(10), .tags = "resonate:target=poll://any@", .want = 400},
    {.op = OP_CREATE, .id = "p2", .n = T(100), .tags = TGT ";resonate:delay=abc", .want = 400},
    {.op = OP_CREATE, .id = "p2", .n = T(100), .tags = TGT ";resonate:delay=2000000", .want = 400},
    {.op = OP_CREATE, .id = "p2", .n = T(100), .tags = "resonate:delay=1000050", .want = 400},
    {.op = OP_GET, .id = "p2", .want = 404},
    {.op = OP_SETTLE, .id = "p1", .m = PROM_PENDING, .want = 400},
    {.op = OP_SETTLE, .id = "p1", .m = PROM_REJECTED_TIMEDOUT, .want = 400},
    {.op = OP_SETTLE, .id = "nope", .m = PROM_RESOLVED, .want = 404},
    {.op = OP_SETTLE, .id = "p1", .m = PROM_RESOLVED, .want = 200, .ps = PS(RESOLVED), .sat = T(0)},
    {.op = OP_CLOCK, .n = T(10)},
    /* settle of a settled promise: 200 with the stored state */
    {.op = OP_SETTLE, .id = "p1", .m = PROM_REJECTED, .want = 200, .ps = PS(RESOLVED), .sat = T(0)},
    {.op = OP_CREATE, .id = "p3", .n = T(20), .want = 200, .ps = PS(PENDING)},
    {.op = OP_SETTLE,
     .id = "p3",
     .m = PROM_REJECTED_CANCELED,
     .want = 200,
     .ps = PS(REJECTED_CANCELED)},
    {.op = OP_CREATE, .id = "p4", .n = T(20), .want = 200},
    {.op = OP_SETTLE,
     .id = "p4",
     .m = PROM_REJECTED,
     .want = 200,
     .ps = PS(REJECTED),
     .sat = T(10)},
    {.op = OP_REOPEN},
    {.op = OP_GET, .id = "p1", .want = 200, .ps = PS(RESOLVED), .sat = T(0), .tout = T(1000)},
    {.op = OP_GET, .id = "p4", .want = 200, .ps = PS(REJECTED)},
};

/* deadlines: create after the deadline, projection, the tick, timers resolve */
static const step_t t_timeout[] = {
    /* created after its deadline: settled at once, createdAt = settledAt = timeoutAt */
    {.op = OP_CREATE,
     .id = "late",
     .n = T(-5),
     .want = 200,
     .ps = PS(REJECTED_TIMEDOUT),
     .sat = T(-5)},
    {.op = OP_CREATE,
     .id = "late-timer",
     .n = T(0),
     .tags = "resonate:timer=true",
     .want = 200,
     .ps = PS(RESOLVED),
     .sat = T(0)},
    {.op = OP_CREATE, .id = "a", .n = T(100), .want = 200, .ps = PS(PENDING)},
    {.op = OP_CREATE, .id = "sleep", .n = T(200), .tags = "resonate:timer=true", .want = 200},
    {.op = OP_CLOCK, .n = T(150)},
    /* projected on read before any timer ran */
    {.op = OP_GET, .id = "a", .want = 200, .ps = PS(REJECTED_TIMEDOUT), .sat = T(100)},
    {.op = OP_GET, .id = "sleep", .want = 200, .ps = PS(PENDING)},
    /* settle after the deadline: the timeout wins */
    {.op = OP_SETTLE,
     .id = "a",
     .m = PROM_RESOLVED,
     .want = 200,
     .ps = PS(REJECTED_TIMEDOUT),
     .sat = T(100)},
    {.op = OP_TICK, .n = T(150), .want = 0},
    {.op = OP_TICK, .n = T(250), .want = 1},
    {.op = OP_GET, .id = "sleep", .want = 200, .ps = PS(RESOLVED), .sat = T(200)},
    {.op = OP_CREATE, .id = "b", .n = T(400), .want = 200},
    {.op = OP_REOPEN},
    /* timers re-armed after reopen */
    {.op = OP_TICK, .n = T(399), .want = 0},
    {.op = OP_TICK, .n = T(401), .want = 1},
    {.op = OP_GET, .id = "b", .want = 200, .ps = PS(REJECTED_TIMEDOUT), .sat = T(400)},
    {.op = OP_TICK, .n = T(1000), .want = 0},
};

/* a promise with a target: task pending v0, execute; acquire/release/fulfill; retry timer */
static const step_t t_task[] = {
    {.op = OP_TGET, .id = "t", .want = 404},
    {.op = OP_CREATE,
     .id = "t",
     .n = T(100000),
     .tags = TGT,
     .want = 200,
     .ps = PS(PENDING),
     .ts = TS(PENDING),
     .ver = 1,
     .res = 1},
    {.op = OP_OUT,
     .id = "t",
     .s = "poll://any@default",
     .m = PROM_MSG_EXECUTE,
     .ver = 1,
     .want = 1},
    {.op = OP_TGET, .id = "t", .want = 200, .ts = TS(PENDING)},
    {.op = OP_ACQ, .id = "t", .n = 1, .want = 409}, /* version mismatch */
    {.op = OP_ACQ,
     .id = "t",
     .n = 0,
     .m = 0,
     .want = 200}, /* ttl 0 -> default 5000 in this table */
    {.op = OP_ACQ, .id = "t", .n = 1, .want = 409, .ts = TS(ACQUIRED), .ver = 2}, /* not pending */
    {.op = OP_ACQ, .id = "zz", .n = 0, .want = 404},
    {.op = OP_ACQ, .id = "t", .n = 1, .s = "", .want = 400},
    {.op = OP_REL, .id = "t", .n = 0, .want = 409},
    {.op = OP_REL, .id = "t", .n = 1, .want = 200, .ts = TS(PENDING), .ver = 2},
    {.op = OP_OUT, .id = "t", .m = PROM_MSG_EXECUTE, .ver = 2, .want = 1},
    {.op = OP_REL, .id = "t", .n = 1, .want = 409},
    /* retry timer re-sends execute while pending */
    {.op = OP_TICK, .n = T(30001), .want = 1},
    {.op = OP_OUT, .id = "t", .m = PROM_MSG_EXECUTE, .ver = 2, .want = 1},
    {.op = OP_ACQ, .id = "t", .n = 1, .want = 200, .ts = TS(ACQUIRED), .ver = 3},
    {.op = OP_FUL, .id = "t", .n = 1, .m = PROM_RESOLVED, .want = 409},
    {.op = OP_FUL, .id = "t", .n = 2, .s = "other", .m = PROM_RESOLVED, .want = 400},
    {.op = OP_FUL, .id = "t", .n = 2, .m = PROM_PENDING, .want = 400},
    {.op = OP_FUL, .id = "zz", .n = 2, .m = PROM_RESOLVED, .want = 404},
    {.op = OP_FUL,
     .id = "t",
     .n = 2,
     .m = PROM_RESOLVED,
     .want = 200,
     .ps = PS(RESOLVED),
     .ts = TS(FULFILLED)},
    {.op = OP_FUL, .id = "t", .n = 2, .m = PROM_RESOLVED, .want = 409},
    {.op = OP_TICK, .n = T(90000), .want = 0},
    {.op = OP_OUT, .want = 0},
    /* settling a promise fulfils its task */
    {.op = OP_CREATE, .id = "u", .n = T(200000), .tags = TGT, .want = 200},
    {.op = OP_SETTLE, .id = "u", .m = PROM_REJECTED, .want = 200, .ts = TS(FULFILLED)},
    /* a delayed task: no execute until the delay */
    {.op = OP_CREATE,
     .id = "d",
     .n = T(500000),
     .tags = TGT ";resonate:delay=1150000",
     .want = 200,
     .ts = TS(PENDING)},
    {.op = OP_OUT, .id = "u", .want = 1}, /* only u's execute */
    {.op = OP_TICK, .n = T(149999), .want = 0},
    {.op = OP_TICK, .n = T(150000), .want = 1},
    {.op = OP_OUT, .id = "d", .m = PROM_MSG_EXECUTE, .want = 1},
    /* a task whose promise times out is fulfilled */
    {.op = OP_TICK, .n = T(500000), .want = 1},
    {.op = OP_TGET, .id = "d", .want = 200, .ts = TS(FULFILLED)},
    {.op = OP_ACQ, .id = "d", .n = 0, .want = 409},
};

/* lease expiry and heartbeat */
static const step_t t_lease[] = {
    {.op = OP_CREATE, .id = "l", .n = T(1000000), .tags = TGT, .want = 200},
    {.op = OP_OUT, .want = 1},
    {.op = OP_ACQ, .id = "l", .n = 0, .m = 1000, .s = "w1", .want = 200, .ver = 2},
    {.op = OP_CLOCK, .n = T(900)},
    {.op = OP_HB,
     .id = "l",
     .n = 0,
     .s = "w1",
     .want = 200}, /* wrong version: no effect, still 200 */
    {.op = OP_HB, .id = "l", .n = 1, .s = "w2", .want = 200}, /* wrong pid: no effect */
    {.op = OP_HB, .s = "w1", .want = 400},                    /* empty */
    {.op = OP_TICK, .n = T(1000), .want = 1},                 /* lease lapsed */
    {.op = OP_TGET, .id = "l", .want = 200, .ts = TS(PENDING), .ver = 2},
    {.op = OP_OUT, .id = "l", .m = PROM_MSG_EXECUTE, .ver = 2, .want = 1},
    {.op = OP_ACQ, .id = "l", .n = 1, .m = 1000, .s = "w1", .want = 200, .ver = 3},
    {.op = OP_CLOCK, .n = T(1900)},
    {.op = OP_HB, .id = "l", .n = 2, .s = "w1", .want = 200}, /* lease now until T(2900) */
    {.op = OP_TICK, .n = T(2500), .want = 0},
    {.op = OP_TGET, .id = "l", .want = 200, .ts = TS(ACQUIRED)},
    {.op = OP_REOPEN},
    {.op = OP_TICK, .n = T(2900), .want = 1},
    {.op = OP_TGET, .id = "l", .want = 200, .ts = TS(PENDING), .ver = 3},
};

/* task.create */
static const step_t t_tcreate[] = {
    {.op = OP_TCREATE,
     .id = "r",
     .s = "w1",
     .m = 5000,
     .n = T(100000),
     .tags = TGTW,
     .want = 200,
     .ps = PS(PENDING),
     .ts = TS(ACQUIRED),
     .ver = 2,
     .pre = 1},
    {.op = OP_OUT, .want = 0}, /* no execute */
    {.op = OP_TCREATE, .id = "r", .s = "w2", .m = 5000, .n = T(100000), .tags = TGTW, .want = 409},
    {.op = OP_TCREATE, .id = "x", .s = "w1", .m = 5000, .n = T(100000), .want = 400},
    {.op = OP_TCREATE, .id = "x", .s = "w1", .m = 0, .n = T(100000), .tags = TGT, .want = 400},
    {.op = OP_TCREATE, .id = "x", .s = "", .m = 10, .n = T(100000), .tags = TGT, .want = 400},
    {.op = OP_TCREATE,
     .id = "x",
     .s = "w1",
     .m = 10,
     .n = T(100000),
     .tags = TGT ";resonate:delay=1000010",
     .want = 400},
    {.op = OP_CREATE, .id = "plain", .n = T(100000), .want = 200},
    {.op = OP_TCREATE, .id = "plain", .s = "w1", .m = 10, .n = T(100000), .tags = TGT, .want = 422},
    {.op = OP_REL, .id = "r", .n = 1, .want = 200},
    {.op = OP_OUT, .want = 1},
    /* existing pending task: acquired v+1 */
    {.op = OP_TCREATE,
     .id = "r",
     .s = "w2",
     .m = 5000,
     .n = T(100000),
     .tags = TGTW,
     .want = 200,
     .ts = TS(ACQUIRED),
     .ver = 3},
    {.op = OP_FUL, .id = "r", .n = 2, .m = PROM_RESOLVED, .want = 200},
    /* fulfilled: returned as is */
    {.op = OP_TCREATE,
     .id = "r",
     .s = "w2",
     .m = 5000,
     .n = T(100000),
     .tags = TGTW,
     .want = 200,
     .ps = PS(RESOLVED),
     .ts = TS(FULFILLED),
     .ver = 3},
    /* created after its deadline: a fulfilled task */
    {.op = OP_TCREATE,
     .id = "dead",
     .s = "w1",
     .m = 5000,
     .n = T(-1),
     .tags = TGTW,
     .want = 200,
     .ps = PS(REJECTED_TIMEDOUT),
     .ts = TS(FULFILLED)},
    {.op = OP_HALT, .id = "r", .want = 409},
};

/* suspend, callbacks, resume, 300 with preload */
static const step_t t_suspend[] = {
    {.op = OP_TCREATE,
     .id = "wf",
     .s = "w1",
     .m = 60000,
     .n = T(900000),
     .tags = TGTW ";resonate:branch=wf",
     .want = 200,
     .ver = 2},
    {.op = OP_FENCE_C,
     .id = "wf",
     .s = "wf.0",
     .n = 1,
     .m = T(900000),
     .tags = "resonate:scope=local;resonate:branch=wf",
     .want = 200,
     .act = 200,
     .ps = PS(PENDING),
     .pre = 2},
    {.op = OP_FENCE_C,
     .id = "wf",
     .s = "wf.1",
     .n = 1,
     .m = T(300),
     .tags = TGT ";resonate:timer=true;resonate:branch=wf.1",
     .want = 200,
     .act = 200},
    {.op = OP_FENCE_C,
     .id = "wf",
     .s = "wf.2",
     .n = 1,
     .m = T(900000),
     .tags = TGT ";resonate:branch=wf.2;" GLOBAL,
     .want = 200},
    {.op = OP_FENCE_C, .id = "wf", .s = "wf", .n = 1, .m = T(900000), .want = 400},
    {.op = OP_FENCE_C, .id = "wf", .s = "wf.9", .n = 0, .m = T(900000), .want = 409},
    {.op = OP_FENCE_C, .id = "nope", .s = "wf.9", .n = 1, .m = T(900000), .want = 404},
    {.op = OP_FENCE_S, .id = "wf", .s = "missing", .n = 1, .want = 200, .act = 404},
    {.op = OP_FENCE_S,
     .id = "wf",
     .s = "wf.0",
     .n = 1,
     .want = 200,
     .act = 200,
     .ps = PS(RESOLVED)},
    {.op = OP_OUT, .want = 2}, /* execute wf.1, wf.2 */
    {.op = OP_SUS, .id = "wf", .s = "", .n = 1, .want = 400},
    {.op = OP_SUS, .id = "wf", .s = "wf", .n = 1, .want = 400},
    {.op = OP_SUS, .id = "wf", .s = "wf.1,wf.1", .n = 1, .want = 400},
    {.op = OP_SUS, .id = "zz", .s = "wf.1", .n = 1, .want = 404},
    {.op = OP_SUS, .id = "wf", .s = "wf.1", .n = 0, .want = 409},
    {.op = OP_SUS, .id = "wf", .s = "wf.x", .n = 1, .want = 422},
    {.op = OP_SUS, .id = "wf", .s = "wf.0", .n = 1, .want = 422}, /* internal (scope=local) */
    {.op = OP_SUS, .id = "wf", .s = "wf.1,wf.2", .n = 1, .want = 200, .ts = TS(SUSPENDED)},
    {.op = OP_SUS, .id = "wf", .s = "wf.1", .n = 1, .want = 409},
    {.op = OP_HB, .id = "wf", .n = 1, .s = "w1", .want = 200, .ts = TS(SUSPENDED)},
    /* the timer resolves wf.1: the awaiter resumes (pending, execute, resumes 1) */
    {.op = OP_TICK, .n = T(300), .want = 1},
    {.op = OP_TGET, .id = "wf", .want = 200, .ts = TS(PENDING), .ver = 2, .res = 2},
    {.op = OP_GET, .id = "wf.1", .want = 200, .ps = PS(RESOLVED), .sat = T(300)},
    {.op = OP_OUT, .id = "wf", .m = PROM_MSG_EXECUTE, .ver = 2, .want = 1},
    {.op = OP_ACQ, .id = "wf", .n = 1, .want = 200, .ver = 3, .res = 1, .pre = 2},
    /* suspend when an awaited promise already settled: 300 with preload, stays acquired */
    {.op = OP_SUS, .id = "wf", .s = "wf.2,wf.1", .n = 2, .want = 300, .ts = TS(ACQUIRED), .pre = 2},
    {.op = OP_SUS, .id = "wf", .s = "wf.2", .n = 2, .want = 200, .ts = TS(SUSPENDED)},
    {.op = OP_REOPEN},
    {.op = OP_SETTLE, .id = "wf.2", .m = PROM_RESOLVED, .want = 200},
    {.op = OP_TGET, .id = "wf", .want = 200, .ts = TS(PENDING), .res = 2},
    {.op = OP_OUT, .id = "wf", .m = PROM_MSG_EXECUTE, .ver = 3, .want = 1},
};

/* register_callback and register_listener */
static const step_t t_callbacks[] = {
    {.op = OP_CREATE, .id = "aw", .n = T(1000), .tags = GLOBAL, .want = 200},
    {.op = OP_CREATE, .id = "int", .n = T(1000), .want = 200},
    {.op = OP_CREATE, .id = "wk", .n = T(1000), .tags = TGT, .want = 200},
    {.op = OP_CREATE, .id = "notask", .n = T(1000), .want = 200},
    {.op = OP_OUT, .want = 1},
    {.op = OP_CB, .id = "aw", .s = "aw", .want = 400},
    {.op = OP_CB, .id = "zz", .s = "wk", .want = 404},
    {.op = OP_CB, .id = "aw", .s = "zz", .want = 422},
    {.op = OP_CB, .id = "aw", .s = "notask", .want = 422},
    {.op = OP_CB, .id = "int", .s = "wk", .want = 422},
    {.op = OP_CB, .id = "aw", .s = "wk", .want = 200, .ps = PS(PENDING)},
    {.op = OP_CB, .id = "aw", .s = "wk", .want = 200, .ps = PS(PENDING)},
    {.op = OP_LISTEN, .id = "aw", .s = "nope", .want = 400},
    {.op = OP_LISTEN, .id = "zz", .s = "poll://uni@default/w1", .want = 404},
    {.op = OP_LISTEN, .id = "int", .s = "poll://uni@default/w1", .want = 422},
    {.op = OP_LISTEN, .id = "aw", .s = "poll://uni@default/w1", .want = 200},
    {.op = OP_LISTEN, .id = "aw", .s = "poll://uni@default/w1", .want = 200},
    {.op = OP_REOPEN},
    /* the awaiter's task is pending (not suspended): resumes counts, no execute */
    {.op = OP_SETTLE, .id = "aw", .m = PROM_RESOLVED, .want = 200},
    {.op = OP_TGET, .id = "wk", .want = 200, .ts = TS(PENDING), .res = 2},
    {.op = OP_OUT,
     .id = "aw",
     .s = "poll://uni@default/w1",
     .m = PROM_MSG_UNBLOCK,
     .ps = PS(RESOLVED),
     .want = 1},
    {.op = OP_LISTEN, .id = "aw", .s = "poll://uni@default/w1", .want = 200, .ps = PS(RESOLVED)},
    {.op = OP_OUT, .want = 0},
    /* callback on a settled awaited with a suspended awaiter: resumed at once */
    {.op = OP_CREATE, .id = "aw2", .n = T(1000), .tags = GLOBAL, .want = 200},
    {.op = OP_ACQ, .id = "wk", .n = 0, .want = 200},
    {.op = OP_SUS, .id = "wk", .s = "aw2", .n = 1, .want = 200, .ts = TS(SUSPENDED)},
    {.op = OP_CREATE, .id = "aw3", .n = T(1000), .tags = GLOBAL, .want = 200},
    {.op = OP_SETTLE, .id = "aw3", .m = PROM_RESOLVED, .want = 200},
    {.op = OP_CB, .id = "aw3", .s = "wk", .want = 200, .ps = PS(RESOLVED), .ts = TS(PENDING)},
    {.op = OP_OUT, .id = "wk", .m = PROM_MSG_EXECUTE, .ver = 2, .want = 1},
    /* a listener on a promise that times out is unblocked by the tick */
    {.op = OP_LISTEN, .id = "aw2", .s = "http://example/cb", .want = 200},
    {.op = OP_TICK, .n = T(1000), .want = 4},
    {.op = OP_OUT, .want = 1},
};

/* halt / continue */
static const step_t t_halt[] = {
    {.op = OP_HALT, .id = "zz", .want = 404},
    {.op = OP_CONT, .id = "zz", .want = 404},
    {.op = OP_CREATE, .id = "plain", .n = T(10000000), .want = 200},
    {.op = OP_HALT, .id = "plain", .want = 404},
    {.op = OP_CREATE, .id = "h", .n = T(100000), .tags = TGT, .want = 200},
    {.op = OP_OUT, .want = 1},
    {.op = OP_CONT, .id = "h", .want = 409},
    {.op = OP_ACQ, .id = "h", .n = 0, .want = 200},
    {.op = OP_HALT, .id = "h", .want = 200, .ts = TS(HALTED), .ver = 2},
    {.op = OP_HALT, .id = "h", .want = 200, .ts = TS(HALTED)},
    {.op = OP_TICK, .n = T(60000), .want = 0}, /* no lease, no retry while halted */
    {.op = OP_FUL, .id = "h", .n = 1, .m = PROM_RESOLVED, .want = 409},
    {.op = OP_REOPEN},
    {.op = OP_CONT, .id = "h", .want = 200, .ts = TS(PENDING), .ver = 2},
    {.op = OP_OUT, .id = "h", .m = PROM_MSG_EXECUTE, .ver = 2, .want = 1},
    {.op = OP_CONT, .id = "h", .want = 409},
    {.op = OP_HALT, .id = "h", .want = 200},
    /* continue after the deadline: the promise timed out, the task is fulfilled */
    {.op = OP_CLOCK, .n = T(100001)},
    {.op = OP_CONT, .id = "h", .want = 409, .ts = TS(FULFILLED)},
    {.op = OP_OUT, .want = 0},
};

/* search */
static const step_t t_search[] = {
    {.op = OP_CREATE, .id = "s1", .n = T(1000), .tags = "k=a", .want = 200},
    {.op = OP_CREATE, .id = "s2", .n = T(1000), .tags = "k=b", .want = 200},
    {.op = OP_CREATE, .id = "s3", .n = T(1000), .tags = "k=a;j=x", .want = 200},
    {.op = OP_CREATE, .id = "s4", .n = T(10), .tags = "k=a", .want = 200},
    {.op = OP_SETTLE, .id = "s2", .m = PROM_REJECTED_CANCELED, .want = 200},
    {.op = OP_CLOCK, .n = T(20)},
    {.op = OP_SEARCH, .want = 200, .pre = 5, .cur = 2},
    {.op = OP_SEARCH, .s = "pending", .want = 200, .pre = 3},
    {.op = OP_SEARCH,
     .s = "rejected",
     .want = 200,
     .pre = 3}, /* canceled + timed out (projected) */
    {.op = OP_SEARCH, .s = "rejected_timedout", .want = 200, .pre = 2},
    {.op = OP_SEARCH, .tags = "k=a", .want = 200, .pre = 4},
    {.op = OP_SEARCH, .tags = "k=a;j=x", .want = 200, .pre = 2},
    {.op = OP_SEARCH, .m = 2, .want = 200, .pre = 3, .cur = 1},
    {.op = OP_SEARCH, .id = "$", .m = 2, .want = 200, .pre = 3, .cur = 2},
    {.op = OP_SEARCH, .s = "pending", .m = 1, .want = 200, .pre = 2, .cur = 1},
    {.op = OP_SEARCH, .id = "$", .s = "pending", .m = 1, .want = 200, .pre = 2, .cur = 2},
    {.op = OP_SEARCH, .m = 1001, .want = 400},
    {.op = OP_SEARCH, .m = -1, .want = 400},
};

/* lineage rules */
static const step_t t_lineage_dot[] = {
    {.op = OP_CREATE,
     .id = "o.0",
     .n = T(1000),
     .tags = "resonate:origin=o;resonate:branch=o",
     .want = 200},
    {.op = OP_CREATE, .id = "o:0", .n = T(1000), .tags = "resonate:origin=o", .want = 400},
    {.op = OP_CREATE, .id = "o.x", .n = T(1000), .tags = "resonate:origin=o.x", .want = 400},
    {.op = OP_CREATE, .id = "o", .n = T(1000), .tags = TGT, .want = 200},
    {.op = OP_CREATE, .id = "q.1", .n = T(1000), .tags = GLOBAL, .want = 200},
    {.op = OP_CB, .id = "q.1", .s = "o", .want = 400},
    {.op = OP_CB, .id = "o.0", .s = "o", .want = 422},
};
static const step_t t_lineage_colon[] = {
    {.op = OP_CREATE,
     .id = "o:0",
     .n = T(1000),
     .tags = "resonate:origin=o;resonate:parent=o",
     .want = 200},
    {.op = OP_CREATE,
     .id = "o:0.1",
     .n = T(1000),
     .tags = "resonate:origin=o;resonate:parent=o:0",
     .want = 200},
    {.op = OP_CREATE, .id = "o.0", .n = T(1000), .tags = "resonate:origin=o", .want = 400},
    {.op = OP_CREATE, .id = "o:0:1", .n = T(1000), .tags = "resonate:parent=o:0", .want = 400},
};
static const step_t t_lineage_off[] = {
    {.op = OP_CREATE, .id = "o.0", .n = T(1000), .tags = "resonate:origin=o", .want = 200},
    {.op = OP_CREATE, .id = "o:0", .n = T(1000), .tags = "resonate:origin=o", .want = 200},
    {.op = OP_CREATE, .id = "zz", .n = T(1000), .tags = "resonate:origin=o", .want = 200},
};

int main(void)
{
    verbose = getenv("PROM_TEST_VERBOSE") != NULL;
    RUN(t_promise);
    RUN(t_timeout);
    RUN(t_task);
    RUN(t_lease);
    RUN(t_tcreate);
    RUN(t_suspend);
    RUN(t_callbacks);
    RUN(t_halt);
    RUN(t_search);
    run("t_lineage_dot", t_lineage_dot, sizeof(t_lineage_dot) / sizeof(step_t), PROM_LINEAGE_DOT);
    run("t_lineage_colon", t_lineage_colon, sizeof(t_lineage_colon) / sizeof(step_t),
        PROM_LINEAGE_COLON);
    RUN(t_lineage_off);
    fprintf(stderr, "promise ops: all tables passed\n");
    return 0;
}
