/*
 * test_basic.c - the engine through its public API with real workers and a real store: sessions,
 * executions and a persistent namespace, errors, streamed output, input(), ordered queueing and
 * the queue bound, cancel, list/close, idempotent execution ids, results fetched by id, the
 * output bound, a reopen that restores a session lazily from the log, and SIGPIPE on the loop.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "eng_test.h"

typedef struct collect {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, ndone, outputs, restarted;
    char order[256];
    eng_result_t *r[64];
    char out[4096];
} collect_t;

static void c_output(void *arg, const char *eid, int stream, const char *d, size_t n)
{
    (void)eid;
    (void)stream;
    collect_t *c = arg;
    pthread_mutex_lock(&c->mu);
    size_t l = strlen(c->out);
    if (l + n < sizeof(c->out)) {
        memcpy(c->out + l, d, n);
        c->out[l + n] = 0;
    }
    c->outputs++;
    pthread_mutex_unlock(&c->mu);
}

static void c_done(void *arg, const eng_result_t *r)
{
    collect_t *c = arg;
    pthread_mutex_lock(&c->mu);
    eng_result_t *cp = calloc(1, sizeof(*cp));
    cp->status = r->status;
    cp->err = r->err;
    cp->eid = cap_strdup(r->eid ? r->eid : "");
    cp->repr = r->repr ? cap_strdup(r->repr) : NULL;
    if (c->ndone < 64)
        c->r[c->ndone] = cp;
    else {
        cap_free(cp->eid);
        cap_free(cp->repr);
        free(cp);
    }
    c->ndone++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static void c_wait(collect_t *c, int n)
{
    pthread_mutex_lock(&c->mu);
    while (c->ndone < n)
        pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

static void c_free(collect_t *c)
{
    for (int i = 0; i < c->ndone && i < 64; i++) {
        cap_free(c->r[i]->eid);
        cap_free(c->r[i]->repr);
        free(c->r[i]);
    }
}

static void test_basics(eng_t *e)
{
    char *sid = NULL;
    CHECK_OK(eng_session_open(e, NULL, NULL, &sid));
    CHECK(sid && *sid);
    etest_expect(e, sid, "2+2", "4");
    etest_expect(e, sid, "x = 40", NULL);
    etest_expect(e, sid, "x + 2", "42");
    /* an error: reported, and (rollback_on_failure) the namespace is as before it */
    eng_result_t *r = etest_run(e, sid, NULL, "x = 1000\nraise ValueError('boom')");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "ValueError");
    CHECK(strstr(r->emsg, "boom"));
    CHECK(!r->committed);
    eng_result_free(r);
    etest_expect(e, sid, "x", "40");
    /* output is collected in order */
    r = etest_run(e, sid, NULL, "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')");
    CHECK_EQ(r->status, ENG_ST_OK);
    CHECK(r->output && strstr(r->output, "a\n") && strstr(r->output, "c\n"));
    CHECK(strstr(r->output, "a\n") < strstr(r->output, "c\n"));
    CHECK(r->committed);
    CHECK(r->ordinal >= 2);
    eng_result_free(r);
    /* input(): replies in order, then EOF */
    eng_exec_req_t rq = {0};
    rq.sid = sid;
    rq.code = "a = input('first? ')\nb = input('second? ')\na + '/' + b";
    const char *ins[] = {"one", "two"};
    CHECK_OK(eng_execute_sync(e, &rq, ins, 2, &r));
    CHECK_EQ(r->status, ENG_ST_OK);
    CHECK_STREQ(r->repr, "'one/two'");
    eng_result_free(r);
    rq.code = "input('x? ')";
    CHECK_OK(eng_execute_sync(e, &rq, NULL, 0, &r));
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "EOFError");
    eng_result_free(r);
    /* unknown session: refused, not hung */
    r = etest_run(e, "no-such-session", NULL, "1");
    CHECK_EQ(r->status, ENG_ST_REFUSED);
    CHECK_EQ(r->err, CAP_ENOTFOUND);
    eng_result_free(r);
    /* bad input to the API */
    rq.sid = "bad id with spaces";
    CHECK_ERR(eng_execute(e, &rq, NULL, NULL), CAP_EINVAL);
    CHECK_ERR(eng_session_open(e, "bad/id", NULL, NULL), CAP_EINVAL);
    cap_free(sid);
}

/* A per-execution timeout overrides the session's, both ways; 0 keeps the session's. */
static void test_exec_timeout(eng_t *e)
{
    char *sid = NULL;
    CHECK_OK(eng_session_open(e, NULL, NULL, &sid)); /* no session timeout */
    eng_result_t *r;
    eng_exec_req_t rq = {
        .sid = sid, .code = "x = 1\nimport time\ntime.sleep(30)", .timeout_ms = 200};
    uint64_t t0 = cap_now_ns();
    CHECK_OK(eng_execute_sync(e, &rq, NULL, 0, &r));
    CHECK_EQ(r->status, ENG_ST_TIMEOUT);
    CHECK(!r->committed);
    CHECK(cap_now_ns() - t0 < 10000000000ull); /* not the cell's 30 s */
    eng_result_free(r);
    etest_expect(e, sid, "'x' in globals()", "False"); /* rolled back */
    cap_free(sid);
    eng_session_opts_t so = {.timeout_ms = 200};
    CHECK_OK(eng_session_open(e, NULL, &so, &sid));
    rq = (eng_exec_req_t){
        .sid = sid, .code = "import time\ntime.sleep(0.5)\n'slept'", .timeout_ms = 20000};
    CHECK_OK(eng_execute_sync(e, &rq, NULL, 0, &r)); /* raised above the session's 200 ms */
    CHECK_EQ(r->status, ENG_ST_OK);
    CHECK_STREQ(r->repr, "'slept'");
    eng_result_free(r);
    rq.timeout_ms = 0; /* the session's again */
    CHECK_OK(eng_execute_sync(e, &rq, NULL, 0, &r));
    CHECK_EQ(r->status, ENG_ST_TIMEOUT);
    eng_result_free(r);
    etest_expect(e, sid, "2+2", "4");
    cap_free(sid);
}

/* Output that threads write while no execution runs is the next execution's, first and in
 * order (the engine drops output of no execution, and a finished execution's output is
 * recorded); past 64 KiB the rest is counted in a line on stderr. */
static void test_output_between(eng_t *e)
{
    char *sid = NULL;
    CHECK_OK(eng_session_open(e, NULL, NULL, &sid));
    eng_result_t *r = etest_run(e, sid, NULL,
                                "import threading, os, sys, time\n"
                                "go, done = threading.Event(), threading.Event()\n"
                                "def late():\n"
                                "    go.wait()\n"
                                "    time.sleep(0.1)\n"
                                "    print('late-1')\n"
                                "    os.write(1, b'late-2\\n')\n"
                                "    print('late-3', file=sys.stderr)\n"
                                "    sys.stdout.write('partial')\n"
                                "    sys.stdout.flush()\n"
                                "    done.set()\n"
                                "def flood():\n"
                                "    go.wait()\n"
                                "    done.wait()\n"
                                "    time.sleep(0.1)\n"
                                "    os.write(1, b'a' * 100000)\n"
                                "    flooded.set()\n"
                                "flooded = threading.Event()\n"
                                "threading.Thread(target=late).start()\n"
                                "print('cell-1')");
    CHECK_EQ(r->status, ENG_ST_OK);
    eng_result_free(r);
    /* the writes come 0.1 s after this cell ended (on a slow machine some may still be its own:
     * then they are here, never lost) */
    r = etest_run(e, sid, NULL, "go.set()");
    char both[1024];
    snprintf(both, sizeof both, "%s", r->output ? r->output : "");
    eng_result_free(r);
    usleep(600000);
    r = etest_run(e, sid, NULL, "done.wait(30)\nprint('cell-3')");
    snprintf(both + strlen(both), sizeof both - strlen(both), "%s", r->output);
    if (strcmp(both, "late-1\nlate-2\nlate-3\npartialcell-3\n") != 0)
        fprintf(stderr, "output of cells 2 and 3: [%s]\n", both);
    CHECK_STREQ(both, "late-1\nlate-2\nlate-3\npartialcell-3\n");
    eng_result_free(r);
    /* 100000 bytes between executions */
    r = etest_run(e, sid, NULL,
                  "go.clear(); done.clear()\n"
                  "threading.Thread(target=flood).start()\n"
                  "go.set()\n"
                  "done.set()");
    size_t in1 = r->output_len;
    eng_result_free(r);
    usleep(600000);
    r = etest_run(e, sid, NULL, "flooded.wait(30)\nprint('end')");
    size_t a = strspn(r->output, "a");
    unsigned long long dropped = 0;
    const char *m = strstr(r->output, "[capsule: ");
    if (m)
        CHECK(sscanf(m, "[capsule: %llu more bytes written between executions were dropped]",
                     &dropped) == 1);
    fprintf(stderr,
            "100000 bytes between executions: %zu in the one before, %zu kept for the "
            "next, %llu dropped\n",
            in1, a, dropped);
    CHECK_EQ(in1 + a + dropped, (size_t)100000); /* every byte is there or counted */
    CHECK(in1 > 0 || a == 65536);                /* all of it between executions: the bound */
    CHECK(strstr(r->output + a, "end\n") != NULL);
    eng_result_free(r);
    cap_free(sid);
}

static void test_queue(eng_t *e)
{
    CHECK_OK(eng_session_open(e, "q1", NULL, NULL));
    collect_t c = {0};
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);
    eng_exec_cb_t cb = {0};
    cb.on_output = c_output;
    cb.on_done = c_done;
    /* 20 executions submitted at once run one at a time, in order */
    etest_expect(e, "q1", "seen = []", NULL);
    char code[64];
    for (int i = 0; i < 20; i++) {
        snprintf(code, sizeof(code), "seen.append(%d)\nprint(%d)", i, i);
        eng_exec_req_t rq = {0};
        rq.sid = "q1";
        rq.code = code;
        CHECK_OK(eng_execute(e, &rq, &cb, &c));
    }
    c_wait(&c, 20);
    for (int i = 0; i < 20; i++)
        CHECK_EQ(c.r[i]->status, ENG_ST_OK);
    /* output was streamed to the listener as it came, in submission order */
    CHECK(c.outputs >= 20);
    const char *p = c.out;
    for (int i = 0; i < 20; i++) {
        char want[8];
        snprintf(want, sizeof(want), "%d\n", i);
        const char *q = strstr(p, want);
        CHECK(q != NULL);
        p = q + strlen(want);
    }
    etest_expect(e, "q1", "seen == list(range(20))", "True");
    c_free(&c);
    pthread_mutex_destroy(&c.mu);
    pthread_cond_destroy(&c.cv);
}

static void test_queue_limit(void)
{
    char *dir = check_tmpdir("eng-qlim");
    eng_opts_t o = {0};
    o.dir = dir;
    o.map_size = 64u << 20;
    o.pool_idle = 1;
    o.max_queue = 3;
    o.max_sessions = 2;
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    CHECK_OK(eng_session_open(e, "a", NULL, NULL));
    CHECK_OK(eng_session_open(e, "b", NULL, NULL));
    CHECK_ERR(eng_session_open(e, "c", NULL, NULL), CAP_ELIMIT);
    CHECK_OK(eng_session_open(e, "a", NULL, NULL)); /* already open: fine */
    collect_t c = {0};
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);
    eng_exec_cb_t cb = {0};
    cb.on_done = c_done;
    /* the first runs (sleeps) and leaves the queue; then 3 fit and the rest are refused */
    eng_exec_req_t rq = {0};
    rq.sid = "a";
    rq.eid = "sleeper";
    rq.code = "import time\ntime.sleep(1.0)\n'slept'";
    CHECK_OK(eng_execute(e, &rq, &cb, &c));
    usleep(300 * 1000);
    rq.code = "1";
    int refused = 0;
    char eid[32];
    for (int i = 0; i < 6; i++) {
        snprintf(eid, sizeof(eid), "q-%d", i);
        rq.eid = eid;
        CHECK_OK(eng_execute(e, &rq, &cb, &c));
    }
    c_wait(&c, 7);
    for (int i = 0; i < 7; i++)
        if (c.r[i]->status == ENG_ST_REFUSED) {
            CHECK_EQ(c.r[i]->err, CAP_EBUSY);
            refused++;
        }
    CHECK_EQ(refused, 3);
    c_free(&c);
    /* cancel: a queued one and the running one */
    memset(&c, 0, sizeof(c));
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);
    rq.eid = "long";
    rq.code = "import time\nfor i in range(100):\n    time.sleep(0.05)\n";
    CHECK_OK(eng_execute(e, &rq, &cb, &c));
    rq.eid = "queued";
    rq.code = "'never'";
    CHECK_OK(eng_execute(e, &rq, &cb, &c));
    usleep(400 * 1000);
    CHECK_OK(eng_cancel(e, "queued"));
    CHECK_OK(eng_cancel(e, "long"));
    c_wait(&c, 2);
    for (int i = 0; i < 2; i++)
        CHECK_EQ(c.r[i]->status, ENG_ST_CANCELLED);
    eng_result_t *r = NULL;
    CHECK_OK(eng_result_get(e, "queued", &r));
    CHECK_EQ(r->status, ENG_ST_CANCELLED);
    eng_result_free(r);
    /* the session still works */
    etest_expect(e, "a", "'alive'", "'alive'");
    c_free(&c);
    eng_close(e);
    check_rmtree(dir);
    cap_free(dir);
}

static void test_ids_and_reopen(const char *dir)
{
    eng_t *e = etest_open(dir, 0);
    CHECK_OK(eng_session_open(e, "keep", NULL, NULL));
    etest_expect(e, "keep", "import math\ncounter = 1\ndef f(v):\n    return v * 3\n", NULL);
    eng_result_t *r = etest_run(e, "keep", "inc-1", "counter += 1\ncounter");
    CHECK_EQ(r->status, ENG_ST_OK);
    CHECK_STREQ(r->repr, "2");
    /* where its time went: every stage took some, and none more than the whole call could */
    CHECK(r->t_request_ns > 0 && r->t_run_ns > 0 && r->t_finish_ns > 0);
    CHECK(r->t_request_ns + r->t_run_ns + r->t_finish_ns < 60ull * 1000000000ull);
    eng_result_free(r);
    /* the same id again: the recorded result, not a second run (so no stage times) */
    r = etest_run(e, "keep", "inc-1", "counter += 1\ncounter");
    CHECK_STREQ(r->repr, "2");
    CHECK(r->t_request_ns == 0 && r->t_run_ns == 0 && r->t_finish_ns == 0);
    eng_result_free(r);
    etest_expect(e, "keep", "counter", "2");
    CHECK_ERR(eng_result_get(e, "nope", &r), CAP_ENOTFOUND);
    CHECK_OK(eng_result_get(e, "inc-1", &r));
    CHECK_STREQ(r->repr, "2");
    CHECK_STREQ(r->sid, "keep");
    eng_result_free(r);
    /* output bound: stored truncated with a marker */
    r = etest_run(e, "keep", "big", "print('x' * (3 << 20))");
    CHECK_EQ(r->status, ENG_ST_OK);
    CHECK(r->truncated);
    CHECK(r->output_len < (1u << 20) + 200);
    CHECK(strstr(r->output, "[capsule: output truncated"));
    eng_result_free(r);
    /* release the idle worker: the next use restores the namespace from the log */
    CHECK_OK(eng_session_release(e, "keep"));
    etest_expect(e, "keep", "(counter, f(2))", "(2, 6)");
    CHECK_ERR(eng_session_release(e, "nope"), CAP_ENOTFOUND);
    CHECK_OK(eng_session_open(e, "gone", NULL, NULL));
    CHECK_OK(eng_session_close(e, "gone"));
    CHECK_ERR(eng_session_close(e, "gone"), CAP_ENOTFOUND);
    char **ids;
    size_t n;
    CHECK_OK(eng_session_list(e, &ids, &n));
    CHECK_EQ(n, 1);
    CHECK_STREQ(ids[0], "keep");
    cap_free(ids[0]);
    cap_free(ids);
    eng_close(e);

    /* reopen: the session is back (restored lazily from the log), results are fetchable */
    e = etest_open(dir, 0);
    CHECK_OK(eng_session_list(e, &ids, &n));
    CHECK_EQ(n, 1);
    CHECK_STREQ(ids[0], "keep");
    cap_free(ids[0]);
    cap_free(ids);
    CHECK_OK(eng_result_get(e, "inc-1", &r));
    CHECK_STREQ(r->repr, "2");
    eng_result_free(r);
    etest_expect(e, "keep", "(counter, f(5), math.pi > 3)", "(2, 15, True)");
    r = etest_run(e, "keep", "inc-1", "counter += 1\ncounter");
    CHECK_STREQ(r->repr, "2");
    eng_result_free(r);
    /* a closed session's id is not reused */
    CHECK_ERR(eng_session_open(e, "gone", NULL, NULL), CAP_EEXIST);
    /* close while an execution runs: it stays pending and is re-run at the next open */
    eng_exec_req_t rq = {0};
    rq.sid = "keep";
    rq.eid = "slow";
    rq.code = "import time\ntime.sleep(0.3)\ncounter += 10\ncounter";
    eng_exec_cb_t none = {0};
    CHECK_OK(eng_execute(e, &rq, &none, NULL));
    usleep(150 * 1000);
    eng_close(e);
    e = etest_open(dir, 0);
    r = etest_run(e, "keep", "slow", rq.code); /* attaches to the re-run */
    CHECK_EQ(r->status, ENG_ST_OK);
    CHECK_STREQ(r->repr, "12");
    CHECK(r->restarted);
    eng_result_free(r);
    etest_expect(e, "keep", "counter", "12");
    eng_close(e);
}

static void test_idle_and_warmup(void)
{
    char *dir = check_tmpdir("eng-idle");
    eng_opts_t o = {0};
    o.dir = dir;
    o.map_size = 64u << 20;
    o.pool_idle = 1;
    o.idle_release_ms = 150;
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    eng_session_opts_t so = {0};
    so.warmup = "WC = globals().get('WC', 0) + 1\nimport json";
    CHECK_OK(eng_session_open(e, "w", &so, NULL));
    CHECK_OK(eng_session_open(e, "w", &so, NULL)); /* the warm-up ran once */
    etest_expect(e, "w", "(WC, json.dumps([1]))", "(1, '[1]')");
    eng_result_t *r = etest_run(e, "w", NULL, "import threading\nlk = threading.Lock()");
    CHECK(r->unrecorded && strncmp(r->unrecorded, "lk:", 3) == 0);
    eng_result_free(r);
    eng_stats_t st0, st1;
    eng_stats(e, &st0);
    usleep(500 * 1000); /* idle expiry releases the worker */
    /* the first result after the lazy restore says what it could not bring back, once */
    r = etest_run(e, "w", NULL, "WC");
    CHECK_STREQ(r->repr, "1");
    CHECK(r->committed && r->restore_failed && strncmp(r->restore_failed, "lk:", 3) == 0);
    eng_result_free(r);
    r = etest_run(e, "w", NULL, "'lk' in globals()");
    CHECK_STREQ(r->repr, "False");
    CHECK(r->restore_failed == NULL);
    eng_result_free(r);
    eng_stats(e, &st1);
    CHECK(st1.restored > st0.restored);
    so.warmup = "raise RuntimeError('bad warm-up')";
    CHECK_ERR(eng_session_open(e, "w2", &so, NULL), CAP_EUNPROCESSABLE);
    eng_close(e);
    check_rmtree(dir);
    cap_free(dir);
}

/* What the engine-wide warm-up binds (in the zygote) is every worker's: no session's delta
 * records it, none names it as not recorded (a function defined there has no cell source, a lock
 * cannot be pickled), and a restored worker has it from the zygote again. */
static void test_engine_warmup_names(void)
{
    char *dir = check_tmpdir("eng-warm");
    eng_opts_t o = etest_opts(dir);
    o.warmup = "import threading\nLK = threading.Lock()\ndef helper(x):\n    return x + 1\n";
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    CHECK_OK(eng_session_open(e, "ew", NULL, NULL));
    eng_result_t *r = etest_run(e, "ew", NULL, "y = helper(1)");
    CHECK(r->committed);
    if (r->unrecorded)
        fprintf(stderr, "unrecorded: %s\n", r->unrecorded);
    CHECK(r->unrecorded == NULL);
    eng_result_free(r);
    r = etest_run(e, "ew", NULL, "import os\nos._exit(1)"); /* restored from the log */
    CHECK_EQ(r->status, ENG_ST_DIED);
    CHECK(r->restore_failed == NULL);
    eng_result_free(r);
    etest_expect(e, "ew", "(y, helper(y), LK.locked())", "(2, 3, False)");
    eng_close(e);
    check_rmtree(dir);
    cap_free(dir);
}

static void loop_thread(void *arg)
{
    uv_run(arg, UV_RUN_DEFAULT);
}

/* The engine on the caller's loop, driven from another thread; the loop closes cleanly after. */
static void test_caller_loop(void)
{
    char *dir = check_tmpdir("eng-loop");
    uv_loop_t loop;
    CHECK_OK(uv_loop_init(&loop));
    eng_opts_t o = {0};
    o.dir = dir;
    o.map_size = 64u << 20;
    o.loop = &loop;
    o.idle_release_ms = 1000;
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    uv_thread_t t;
    CHECK_OK(uv_thread_create(&t, loop_thread, &loop));
    CHECK_OK(eng_session_open(e, "cl", NULL, NULL));
    etest_expect(e, "cl", "v = 6 * 7\nv", "42");
    etest_expect(e, "cl", "v", "42");
    eng_close(e);
    uv_thread_join(&t);
    CHECK_OK(uv_loop_close(&loop)); /* no handle of the engine left behind */
    check_rmtree(dir);
    cap_free(dir);
}

/* A write on the engine's loop thread to a peer that is gone (a worker killed as it is written
 * to) must fail with EPIPE, not kill the embedding process with SIGPIPE, whose action this
 * program leaves at its default. The write is made from an on_done callback, which runs on that
 * thread. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    ssize_t n;
    int err;
} pipe_probe_t;

static void probe_done(void *arg, const eng_result_t *r)
{
    pipe_probe_t *p = arg;
    (void)r;
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    close(sv[1]);
    ssize_t n = write(sv[0], "x", 1);
    int err = errno;
    close(sv[0]);
    pthread_mutex_lock(&p->mu);
    p->n = n;
    p->err = err;
    p->done = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

static void test_sigpipe(eng_t *e)
{
    struct sigaction sa;
    CHECK_EQ(sigaction(SIGPIPE, NULL, &sa), 0);
    CHECK(sa.sa_handler == SIG_DFL); /* otherwise this proves nothing */
    CHECK_OK(eng_session_open(e, "pipe", NULL, NULL));
    pipe_probe_t p = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0};
    eng_exec_req_t rq = {0};
    rq.sid = "pipe";
    rq.code = "1";
    eng_exec_cb_t cb = {0};
    cb.on_done = probe_done;
    CHECK_OK(eng_execute(e, &rq, &cb, &p));
    pthread_mutex_lock(&p.mu);
    while (!p.done)
        pthread_cond_wait(&p.cv, &p.mu);
    pthread_mutex_unlock(&p.mu);
    CHECK_EQ(p.n, -1);
    CHECK_EQ(p.err, EPIPE);
    etest_expect(e, "pipe", "'still here'", "'still here'");
    CHECK_OK(eng_session_close(e, "pipe"));
}

int main(void)
{
    char *dir = check_tmpdir("eng-basic");
    eng_t *e = etest_open(dir, 0);
    test_basics(e);
    test_exec_timeout(e);
    test_output_between(e);
    test_queue(e);
    test_sigpipe(e);
    eng_close(e);
    check_rmtree(dir);
    cap_free(dir);
    test_queue_limit();
    test_idle_and_warmup();
    test_engine_warmup_names();
    test_caller_loop();
    dir = check_tmpdir("eng-reopen");
    test_ids_and_reopen(dir);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "engine.basic ok\n");
    return 0;
}
