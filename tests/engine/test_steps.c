/*
 * test_steps.c - durable steps (issue 9): `capsule` tasks inside executions, on a real engine
 * with real workers and LMDB.
 *   - steps record their values; the step listing shows them completed with attempts and names;
 *   - retries with backoff (attempt counts recorded), a failure after max_retries recorded as
 *     failed and raised, a per-attempt timeout, a task's ram limit (MemoryError naming it),
 *     unpicklable arguments and results as clear errors at the call, nested steps' paths;
 *   - kill -9: a child process embeds the engine and runs a three-step workflow appending to a
 *     file; it is killed during step 3; a new engine on the same directory re-runs the execution,
 *     which completes with steps 1 and 2 in the file exactly once;
 *   - a durable sleep across a kill -9: the re-run waits only for what remains of the deadline;
 *   - cost: a recorded step is ONE promise record and ONE wal commit (the cell with 20 steps
 *     against the same cell with none); a step that lasts shows "running" (its held mark written);
 *   - attempts across a kill -9: killed during attempt 3 of a task with max_retries=2, the re-run
 *     runs attempt 3 again (not attempts 1..3): 4 calls in all, the failure recorded with 3;
 *   - a task with its own limits runs in another worker (its helpers and nested steps with it), a
 *     ram limit there is a MemoryError while the caller lives, compute stops a spinning task;
 *     kill -9 during its third nested step: the re-run attaches to its execution, steps 1 and 2
 *     are not repeated.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "eng_test.h"
#include "promise.h"

static char g_dir[512];

static void wait_file(const char *path, double timeout_s);

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return strdup("");
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return strdup(buf);
}

static int count_lines(const char *text, const char *line)
{
    int n = 0;
    size_t l = strlen(line);
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len == l && memcmp(p, line, l) == 0)
            n++;
        p += len + (nl ? 1 : 0);
    }
    return n;
}

static eng_result_t *run_ok(eng_t *e, const char *sid, const char *eid, const char *code)
{
    eng_result_t *r = etest_run(e, sid, eid, code);
    if (r->status != ENG_ST_OK)
        fprintf(stderr, "cell failed: status %d %s: %s\n%s\n", r->status, r->etype ? r->etype : "?",
                r->emsg ? r->emsg : "", r->traceback ? r->traceback : "");
    CHECK_EQ(r->status, ENG_ST_OK);
    return r;
}

static const eng_task_info_t *find_task(const eng_task_info_t *v, size_t n, const char *path)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i].path, path) == 0)
            return &v[i];
    return NULL;
}

/* ---------- steps in one engine ---------- */
static void test_steps_basic(eng_t *e)
{
    char code[2048];
    snprintf(code, sizeof code,
             "from capsule import task, step\n"
             "LOG = '%s/basic.txt'\n"
             "@task(name='append')\n"
             "def append(x):\n"
             "    with open(LOG, 'a') as f:\n"
             "        f.write(x + '\\n')\n"
             "    return x.upper()\n"
             "@task\n"
             "def outer(a, b):\n"
             "    return [append(a), step(len, b)]\n"
             "[append('a'), outer('b', 'cc'), append('d')]",
             g_dir);
    eng_result_t *r = run_ok(e, "s", "basic-1", code);
    CHECK_STREQ(r->repr, "['A', ['B', 2], 'D']");
    eng_result_free(r);
    eng_task_info_t *v;
    size_t n;
    CHECK_OK(eng_tasks_list(e, "basic-1", &v, &n));
    CHECK_EQ(n, 5); /* 1, 2, 2.1, 2.2, 3 */
    const char *paths[] = {"1", "2", "2.1", "2.2", "3"};
    const char *names[] = {"append", "outer", "append", "len", "append"};
    for (size_t i = 0; i < n; i++) {
        CHECK_STREQ(v[i].path, paths[i]);
        CHECK_STREQ(v[i].name, names[i]);
        CHECK_STREQ(v[i].state, "completed");
        CHECK_EQ(v[i].attempts, 1);
        CHECK_STREQ(v[i].kind, "step");
        CHECK(v[i].settled_at >= v[i].created_at);
    }
    CHECK_STREQ(v[0].id, "capsule/x/basic-1.1");
    eng_tasks_free(v, n);
    CHECK_ERR(eng_tasks_list(e, "no-such-exec", &v, &n), CAP_ENOTFOUND);
    /* the same id again: the recorded result, nothing re-run */
    r = run_ok(e, "s", "basic-1", code);
    CHECK_STREQ(r->repr, "['A', ['B', 2], 'D']");
    eng_result_free(r);
    char path[600];
    snprintf(path, sizeof path, "%s/basic.txt", g_dir);
    char *t = slurp(path);
    CHECK_STREQ(t, "a\nb\nd\n");
    free(t);
    /* outside a task call the decorated function is still a task object; a plain cell without
     * tasks is unaffected */
    etest_expect(e, "s", "append.name, append.max_retries", "('append', 0)");
}

static void test_retries_and_limits(eng_t *e)
{
    char code[2048];
    /* fails twice, then succeeds: 3 attempts recorded */
    snprintf(code, sizeof code,
             "from capsule import task\n"
             "import os\n"
             "CNT = '%s/flaky.cnt'\n"
             "@task(max_retries=2)\n"
             "def flaky():\n"
             "    n = int(open(CNT).read()) if os.path.exists(CNT) else 0\n"
             "    open(CNT, 'w').write(str(n + 1))\n"
             "    if n < 2:\n"
             "        raise ValueError(f'attempt {n + 1} fails')\n"
             "    return n + 1\n"
             "flaky()",
             g_dir);
    eng_result_t *r = run_ok(e, "s", "retry-1", code);
    CHECK_STREQ(r->repr, "3");
    eng_result_free(r);
    eng_task_info_t *v;
    size_t n;
    CHECK_OK(eng_tasks_list(e, "retry-1", &v, &n));
    CHECK_EQ(n, 1);
    CHECK_STREQ(v[0].state, "completed");
    CHECK_EQ(v[0].attempts, 3);
    eng_tasks_free(v, n);

    /* always fails: 1 + max_retries attempts, recorded as failed, raised to the caller */
    r = etest_run(e, "s", "retry-2",
                  "from capsule import task\n"
                  "@task(name='bad', max_retries=1)\n"
                  "def bad():\n"
                  "    raise KeyError('nope')\n"
                  "bad()");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "KeyError");
    eng_result_free(r);
    CHECK_OK(eng_tasks_list(e, "retry-2", &v, &n));
    CHECK_EQ(n, 1);
    CHECK_STREQ(v[0].state, "failed");
    CHECK_EQ(v[0].attempts, 2);
    CHECK_STREQ(v[0].name, "bad");
    eng_tasks_free(v, n);

    /* a timeout per attempt: a sleeping task is interrupted */
    double t0 = now_s();
    r = etest_run(e, "s", "timeout-1",
                  "from capsule import task\n"
                  "import time\n"
                  "@task(timeout='300ms', max_retries=1)\n"
                  "def slow():\n"
                  "    time.sleep(20)\n"
                  "slow()");
    double took = now_s() - t0;
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "TaskTimeout");
    CHECK(strstr(r->emsg, "timed out after 0.3 s") != NULL);
    CHECK(took < 5.0); /* two attempts of 0.3 s and a backoff, not 20 s */
    eng_result_free(r);
    CHECK_OK(eng_tasks_list(e, "timeout-1", &v, &n));
    CHECK_EQ(v[0].attempts, 2);
    CHECK_STREQ(v[0].state, "failed");
    eng_tasks_free(v, n);

    /* a task with its own limits runs in its own session and worker: another process, its
     * helpers and imports rebuilt there, its nested steps durable under its own execution */
    r = run_ok(e, "s", "own-1",
               "from capsule import task, step\n"
               "import os\n"
               "K = 10\n"
               "def helper(x):\n"
               "    return x * K\n"
               "@task(name='inner')\n"
               "def inner(x):\n"
               "    return x + 1\n"
               "@task(name='own', compute='LOW', ram='64MB')\n"
               "def own(x, y=1):\n"
               "    return (os.getpid(), helper(x) + y, inner(x))\n"
               "pid, v, w = own(4, y=2)\n"
               "(pid != os.getpid(), v, w)");
    CHECK_STREQ(r->repr, "(True, 42, 5)");
    eng_result_free(r);
    CHECK_OK(eng_tasks_list(e, "own-1", &v, &n));
    CHECK_EQ(n, 1);
    CHECK_STREQ(v[0].name, "own");
    CHECK_STREQ(v[0].state, "completed");
    eng_tasks_free(v, n);
    CHECK_OK(eng_tasks_list(e, "own-1-t1", &v, &n)); /* the child execution's own step */
    CHECK_EQ(n, 1);
    CHECK_STREQ(v[0].name, "inner");
    CHECK_STREQ(v[0].state, "completed");
    eng_tasks_free(v, n);

#ifndef __SANITIZE_ADDRESS__
    /* ram: allocating beyond the task's limit is a MemoryError naming it, raised in its own
     * worker; the caller's session lives. (An ASan worker's allocator aborts on an allocation
     * failure instead of raising.) */
    r = etest_run(e, "s", "ram-1",
                  "from capsule import task\n"
                  "@task(ram='64MB')\n"
                  "def big():\n"
                  "    return len(bytearray(200_000_000))\n"
                  "big()");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "MemoryError");
    CHECK(strstr(r->emsg, "memory limit (ram=64MB) exceeded") != NULL);
    eng_result_free(r);
    /* the caller's worker never had the limit: the same allocation there works */
    etest_expect(e, "s", "len(bytearray(200_000_000))", "200000000");
#endif
    /* compute: CPU seconds of the task's own worker (RLIMIT_CPU): a spinning task is stopped,
     * the caller gets a TaskError saying why, and its session lives */
    t0 = now_s();
    r = etest_run(e, "s", "cpu-1",
                  "from capsule import task\n"
                  "@task(name='spin', compute=1)\n"
                  "def spin():\n"
                  "    while True:\n"
                  "        pass\n"
                  "spin()");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "TaskError");
    CHECK(strstr(r->emsg, "CPU time limit") != NULL);
    fprintf(stderr, "compute=1: %s (%.1f s)\n", r->emsg, now_s() - t0);
    eng_result_free(r);
    CHECK_OK(eng_tasks_list(e, "cpu-1", &v, &n));
    CHECK_STREQ(v[0].state, "failed");
    eng_tasks_free(v, n);
    etest_expect(e, "s", "'alive'", "'alive'");

    /* unpicklable argument and result: clear errors at the call */
    r = etest_run(e, "s", "pickle-1",
                  "from capsule import step\n"
                  "import threading\n"
                  "step(lambda l: 1, threading.Lock())");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "TypeError");
    CHECK(strstr(r->emsg, "arguments cannot be pickled") != NULL);
    eng_result_free(r);
    r = etest_run(e, "s", "pickle-2",
                  "from capsule import task\n"
                  "import threading\n"
                  "@task\n"
                  "def lock():\n"
                  "    return threading.Lock()\n"
                  "lock()");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK_STREQ(r->etype, "TypeError");
    CHECK(strstr(r->emsg, "result cannot be pickled") != NULL);
    eng_result_free(r);
    CHECK_OK(eng_tasks_list(e, "pickle-2", &v, &n));
    CHECK_STREQ(v[0].state, "failed");
    eng_tasks_free(v, n);

    /* the worker's step requests are checked: a bad op or name is refused, not recorded */
    etest_expect(e, "s",
                 "import _capsule\n"
                 "[_capsule.promise(9, '1', '', 0, 0, b'')[0], "
                 "_capsule.promise(1, 'a/b', '', 0, 0, b'')[0], "
                 "_capsule.promise(4, 'bad id!', '', 0, 0, b'')[0], "
                 "_capsule.promise(1, '', '', 0, 0, b'')[0]]",
                 "[3, 3, 3, 3]");
    r = etest_run(e, "s", NULL, "import capsule\ncapsule.promise('no/slash')");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK(strstr(r->emsg, "promise id: expected") != NULL);
    eng_result_free(r);
    /* bad options are errors at decoration */
    r = etest_run(e, "s", NULL, "from capsule import task\n@task(ram='lots')\ndef f(): pass");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK(strstr(r->emsg, "ram: cannot parse 'lots'") != NULL);
    eng_result_free(r);
    r = etest_run(e, "s", NULL, "from capsule import task\n@task(timeout='soon')\ndef f(): pass");
    CHECK_EQ(r->status, ENG_ST_ERROR);
    CHECK(strstr(r->emsg, "timeout: cannot parse 'soon'") != NULL);
    eng_result_free(r);
}

/* ---------- external promises ---------- */
typedef struct done_wait {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    eng_result_t *r;
} done_wait_t;

static void dw_done(void *arg, const eng_result_t *r)
{
    done_wait_t *d = arg;
    pthread_mutex_lock(&d->mu);
    eng_result_t tmp = *r;
    d->r = calloc(1, sizeof *d->r);
    d->r->status = tmp.status;
    d->r->repr = tmp.repr ? strdup(tmp.repr) : NULL;
    d->r->etype = tmp.etype ? strdup(tmp.etype) : NULL;
    d->r->emsg = tmp.emsg ? strdup(tmp.emsg) : NULL;
    pthread_cond_signal(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static void dw_start(eng_t *e, done_wait_t *d, const char *eid, const char *code)
{
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    d->r = NULL;
    eng_exec_req_t rq = {0};
    rq.sid = "s";
    rq.eid = eid;
    rq.code = code;
    eng_exec_cb_t cb = {0};
    cb.on_done = dw_done;
    CHECK_OK(eng_execute(e, &rq, &cb, d));
}

static void dw_end(done_wait_t *d, eng_status_t status, const char *repr, const char *etype)
{
    pthread_mutex_lock(&d->mu);
    while (!d->r)
        pthread_cond_wait(&d->cv, &d->mu);
    pthread_mutex_unlock(&d->mu);
    if (d->r->status != status)
        fprintf(stderr, "status %d %s: %s\n", d->r->status, d->r->etype ? d->r->etype : "",
                d->r->emsg ? d->r->emsg : "");
    CHECK_EQ(d->r->status, status);
    if (repr)
        CHECK_STREQ(d->r->repr, repr);
    if (etype)
        CHECK_STREQ(d->r->etype, etype);
    free(d->r->repr);
    free(d->r->etype);
    free(d->r->emsg);
    free(d->r);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv);
}

/* Settles `id` once an execution has created it (CAP_ENOTFOUND until then). */
static void settle_when_created(eng_t *e, const char *id, int resolve, const char *json)
{
    double t0 = now_s();
    int st = 0, rc;
    while ((rc = eng_promise_settle(e, id, resolve, json, strlen(json), &st)) == CAP_ENOTFOUND) {
        CHECK(now_s() - t0 < 60);
        usleep(20000);
    }
    CHECK_OK(rc);
    CHECK_EQ(st, resolve ? 1 : 2);
}

static void wal_counts(eng_t *e, uint64_t *records, uint64_t *commits)
{
    wal_stats_t ws;
    wal_log_stats(prom_store_wal(eng_promise_store(e)), &ws);
    *records = ws.records;
    *commits = ws.commits;
}

/* The promise records with key id in the log. */
static uint64_t doc_records(eng_t *e, const char *id)
{
    wal_iter_t *it;
    wal_iter_opts_t io = {0};
    wal_entry_t en;
    uint64_t n = 0;
    int rc;
    io.kind = PROM_REC_DOC;
    io.key = id;
    io.key_len = strlen(id);
    CHECK_OK(wal_iter_open(prom_store_wal(eng_promise_store(e)), &io, &it));
    while ((rc = wal_iter_next(it, &en)) == 0)
        n++;
    CHECK_ERR(rc, CAP_ENOTFOUND);
    wal_iter_close(it);
    return n;
}

/* What a step costs in the log: the same cell with 20 steps and with none (the execution's own
 * records are the same in both). */
static void test_step_cost(eng_t *e)
{
    const char *code = "from capsule import task\n"
                       "@task\n"
                       "def inc(x):\n"
                       "    return x + 1\n"
                       "N = %d\n"
                       "sum(inc(i) for i in range(N))";
    char c0[512], c20[512];
    snprintf(c0, sizeof c0, code, 0);
    snprintf(c20, sizeof c20, code, 20);
    uint64_t r0, k0, r1, k1, r2, k2;
    eng_result_free(run_ok(e, "s", "cost-warm", c0));
    usleep(200000); /* nothing else in flight */
    wal_counts(e, &r0, &k0);
    eng_result_free(run_ok(e, "s", "cost-0", c0));
    usleep(200000);
    wal_counts(e, &r1, &k1);
    eng_result_t *r = run_ok(e, "s", "cost-20", c20);
    CHECK_STREQ(r->repr, "210");
    eng_result_free(r);
    usleep(200000);
    wal_counts(e, &r2, &k2);
    fprintf(stderr,
            "step cost: cell without steps %llu records / %llu commits, with 20 steps "
            "%llu / %llu\n",
            (unsigned long long)(r1 - r0), (unsigned long long)(k1 - k0),
            (unsigned long long)(r2 - r1), (unsigned long long)(k2 - k1));
    /* a step that outlasted ENG_MARK_DELAY_MS (a stall of a loaded machine) also wrote its
     * running mark: counted from the log, one more record and commit each */
    uint64_t marks = 0;
    for (int i = 1; i <= 20; i++) {
        char id[64];
        snprintf(id, sizeof id, "capsule/x/cost-20.%d", i);
        uint64_t nrec = doc_records(e, id);
        CHECK(nrec == 1 || nrec == 2);
        marks += nrec - 1;
    }
    if (marks)
        fprintf(stderr, "step cost: %llu of 20 steps lasted long enough to write their mark\n",
                (unsigned long long)marks);
    CHECK_EQ((r2 - r1) - (r1 - r0), 20 + marks); /* one record per step */
    CHECK_EQ((k2 - k1) - (k1 - k0), 20 + marks); /* one commit per step */
    eng_task_info_t *v;
    size_t n;
    CHECK_OK(eng_tasks_list(e, "cost-20", &v, &n));
    CHECK_EQ(n, 20);
    for (size_t i = 0; i < n; i++) {
        CHECK_STREQ(v[i].state, "completed");
        CHECK_EQ(v[i].attempts, 1);
    }
    eng_tasks_free(v, n);

    /* a step that lasts: its running mark is written (after ENG_MARK_DELAY_MS) and listed */
    char mark[700], go[700], lcode[2048];
    snprintf(mark, sizeof mark, "%s/long-in", g_dir);
    snprintf(go, sizeof go, "%s/long-go", g_dir);
    snprintf(lcode, sizeof lcode,
             "from capsule import task\n"
             "import os, time\n"
             "@task(name='long')\n"
             "def long():\n"
             "    open('%s', 'w').close()\n"
             "    while not os.path.exists('%s'):\n"
             "        time.sleep(0.01)\n"
             "    return 'done'\n"
             "long()",
             mark, go);
    done_wait_t d;
    dw_start(e, &d, "long-1", lcode);
    wait_file(mark, 60);
    double t0 = now_s();
    for (;;) {
        int rc = eng_tasks_list(e, "long-1", &v, &n);
        CHECK(rc == 0 || rc == CAP_ENOTFOUND);
        if (rc == 0 && n == 1)
            break;
        if (rc == 0)
            eng_tasks_free(v, n);
        CHECK(now_s() - t0 < 30);
        usleep(10000);
    }
    CHECK_STREQ(v[0].state, "running");
    CHECK_STREQ(v[0].name, "long");
    CHECK_EQ(v[0].attempts, 1);
    eng_tasks_free(v, n);
    FILE *f = fopen(go, "w");
    CHECK(f);
    fclose(f);
    dw_end(&d, ENG_ST_OK, "'done'", NULL);
    CHECK_OK(eng_tasks_list(e, "long-1", &v, &n));
    CHECK_EQ(n, 1);
    CHECK_STREQ(v[0].state, "completed");
    eng_tasks_free(v, n);
}

static void test_external(eng_t *e)
{
    done_wait_t d;
    const char *wait_code = "import capsule\ncapsule.promise('approval-42').wait()";
    dw_start(e, &d, "ext-1", wait_code);
    usleep(200000); /* the execution is blocked meanwhile */
    pthread_mutex_lock(&d.mu);
    CHECK(d.r == NULL);
    pthread_mutex_unlock(&d.mu);
    settle_when_created(e, "approval-42", 1, "{\"ok\": true, \"by\": \"ann\"}");
    dw_end(&d, ENG_ST_OK, "{'ok': True, 'by': 'ann'}", NULL);
    /* settled already: a later wait returns at once; a second settle changes nothing */
    etest_expect(e, "s", "capsule.promise('approval-42').wait()['by']", "'ann'");
    int st = 0;
    CHECK_OK(eng_promise_settle(e, "approval-42", 0, "1", 1, &st));
    CHECK_EQ(st, 1);
    CHECK_ERR(eng_promise_settle(e, "nobody-made-it", 1, "1", 1, &st), CAP_ENOTFOUND);
    /* rejected: PromiseRejected with the value */
    dw_start(e, &d, "ext-2", "import capsule\ncapsule.promise('deny-1').wait()");
    settle_when_created(e, "deny-1", 0, "\"not today\"");
    dw_end(&d, ENG_ST_ERROR, NULL, "PromiseRejected");
    /* a waiting execution can be cancelled; settling afterwards wakes nobody (a stale waiter) */
    dw_start(e, &d, "ext-3", "import capsule\ncapsule.promise('never-1').wait()");
    usleep(300000);
    CHECK_OK(eng_cancel(e, "ext-3"));
    dw_end(&d, ENG_ST_CANCELLED, NULL, NULL);
    int rc = eng_promise_settle(e, "never-1", 1, "0", 1, &st);
    CHECK(rc == 0 || rc == CAP_ENOTFOUND);
    etest_expect(e, "s", "1 + 1", "2");
}

/* The child: an embedding program that opens the engine and runs one execution; the parent
 * kill -9s it. */
static int child(const char *dir, const char *eid, const char *code)
{
    eng_t *e = etest_open(dir, 0);
    int rc = eng_session_open(e, "wf", NULL, NULL);
    CHECK(rc == 0 || rc == CAP_EEXIST);
    eng_result_t *r = etest_run(e, "wf", eid, code);
    fprintf(stderr, "child: %s ended (status %d) before it was killed\n", eid, r->status);
    eng_result_free(r);
    eng_close(e);
    return 0;
}

static void wait_file(const char *path, double timeout_s)
{
    double t0 = now_s();
    struct stat st;
    while (stat(path, &st) != 0) {
        CHECK(now_s() - t0 < timeout_s);
        usleep(10000);
    }
}

static pid_t spawn_child(const char *self, const char *dir, const char *eid, const char *code)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        execl(self, self, "child", dir, eid, code, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static void kill_child(pid_t pid)
{
    CHECK(kill(pid, SIGKILL) == 0);
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    usleep(100000);
    while (waitpid(-1, NULL, WNOHANG) > 0) /* workers reparented to us (subreaper) */
        ;
}

/* Runs execution eid of `code` in a child engine on dir and kill -9s the child once `mark` exists
 * (+ settle_us). */
static void run_until_mark_then_kill(const char *self, const char *dir, const char *eid,
                                     const char *code, const char *mark, useconds_t settle_us)
{
    pid_t pid = spawn_child(self, dir, eid, code);
    wait_file(mark, 60);
    usleep(settle_us);
    kill_child(pid);
}

/* dir = g_dir/<sub> (created), log and mark under g_dir. */
static void crash_paths(const char *sub, const char *logname, const char *markname, char *dir,
                        char *log, char *mark)
{
    snprintf(dir, 600, "%s/%s", g_dir, sub);
    CHECK(mkdir(dir, 0700) == 0);
    if (log)
        snprintf(log, 700, "%s/%s", g_dir, logname);
    snprintf(mark, 700, "%s/%s", g_dir, markname);
}

/* Three steps appending to LOG; step 3 blocks the first time (creating MARK: the parent kills
 * the engine then) and completes when re-run. Formats: LOG, MARK. */
#define THREE_STEPS                                                                                \
    "from capsule import task\n"                                                                   \
    "import os, time\n"                                                                            \
    "LOG, MARK = '%s', '%s'\n"                                                                     \
    "def note(s):\n"                                                                               \
    "    with open(LOG, 'a') as f:\n"                                                              \
    "        f.write(s + '\\n')\n"                                                                 \
    "@task\n"                                                                                      \
    "def step1():\n"                                                                               \
    "    note('step1')\n"                                                                          \
    "    return 1\n"                                                                               \
    "@task\n"                                                                                      \
    "def step2(x):\n"                                                                              \
    "    note('step2')\n"                                                                          \
    "    return x + 1\n"                                                                           \
    "@task\n"                                                                                      \
    "def step3(x):\n"                                                                              \
    "    note('step3-start')\n"                                                                    \
    "    if not os.path.exists(MARK):\n"                                                           \
    "        open(MARK, 'w').close()\n"                                                            \
    "        time.sleep(60)\n"                                                                     \
    "    note('step3')\n"                                                                          \
    "    return x + 1\n"

static void test_kill9_workflow(const char *self)
{
    char dir[600], log[700], mark[700], code[4096];
    crash_paths("wf", "steps.txt", "in-step3", dir, log, mark);
    /* step 3 blocks the first time (the parent kills the engine then); the re-run finds the
     * marker and completes */
    snprintf(code, sizeof code,
             THREE_STEPS "@task\n"
                         "def boom():\n"
                         "    note('boom')\n"
                         "    raise ValueError('recorded')\n"
                         "@task(name='main')\n"
                         "def main():\n"
                         "    try:\n"
                         "        boom()\n"
                         "    except ValueError as e:\n"
                         "        r = str(e)\n"
                         "    return [step1(), step2(1), step3(2), r]\n"
                         "main()",
             log, mark);
    run_until_mark_then_kill(self, dir, "wf-run-1", code, mark, 50000);
    char *t = slurp(log);
    CHECK_STREQ(t, "boom\nstep1\nstep2\nstep3-start\n");
    free(t);

    /* restart: recovery re-runs the execution; attaching by id gets its result */
    eng_t *e = etest_open(dir, 0);
    eng_result_t *r = run_ok(e, "wf", "wf-run-1", code);
    CHECK_STREQ(r->repr, "[1, 2, 3, 'recorded']");
    CHECK(r->restarted);
    eng_result_free(r);
    t = slurp(log);
    CHECK_EQ(count_lines(t, "boom"), 1); /* its recorded error was raised again, not re-run */
    CHECK_EQ(count_lines(t, "step1"), 1);
    CHECK_EQ(count_lines(t, "step2"), 1);
    CHECK_EQ(count_lines(t, "step3-start"), 2); /* the step in flight ran again (at least once) */
    CHECK_EQ(count_lines(t, "step3"), 1);
    free(t);
    eng_task_info_t *v;
    size_t n;
    CHECK_OK(eng_tasks_list(e, "wf-run-1", &v, &n));
    CHECK_EQ(n, 5);
    CHECK_STREQ(v[0].name, "main");
    CHECK_STREQ(find_task(v, n, "1.4")->name, "step3");
    CHECK_STREQ(find_task(v, n, "1.1")->state, "failed");
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i].path, "1.1") != 0)
            CHECK_STREQ(v[i].state, "completed");
    eng_tasks_free(v, n);
    eng_close(e);
}

static void test_kill9_sleep(const char *self)
{
    char dir[600], mark[700], code[2048];
    crash_paths("sl", NULL, "sleeping", dir, NULL, mark);
    snprintf(code, sizeof code,
             "import capsule, time\n"
             "t0 = time.time()\n"
             "capsule.sleep(0.05)\n"
             "open('%s', 'a').close()\n"
             "capsule.sleep(4)\n"
             "'woke after %%.2f' %% (time.time() - t0)",
             mark);
    double t0 = now_s();
    /* killed 1.5 s into the 4 s sleep: the re-run must wait only the remaining ~2.5 s. Its own
     * clock says so (t0 is taken again by the re-run, the sleeps are steps): measured from the
     * restart here it also counted the engine's open, over 1 s under ASan on a loaded machine */
    run_until_mark_then_kill(self, dir, "sl-1", code, mark, 1500000);
    double t_restart = now_s();
    eng_t *e = etest_open(dir, 0);
    eng_result_t *r = run_ok(e, "wf", "sl-1", code);
    double t_end = now_s(), rerun = -1;
    CHECK_EQ(sscanf(r->repr, "'woke after %lf'", &rerun), 1);
    eng_result_free(r);
    fprintf(stderr, "sleep: total %.2f s, after the restart %.2f s, in the re-run %.2f s\n",
            t_end - t0, t_end - t_restart, rerun);
    CHECK(t_end - t0 >= 4.0);               /* the deadline held */
    CHECK(rerun >= 0 && rerun < 4.0 - 0.5); /* and only the remainder was waited for */
    eng_task_info_t *v;
    size_t n;
    CHECK_OK(eng_tasks_list(e, "sl-1", &v, &n));
    CHECK_EQ(n, 2);
    CHECK_STREQ(v[1].kind, "sleep");
    CHECK_STREQ(v[1].state, "completed");
    CHECK(v[1].timeout_at - v[1].created_at == 4000);
    eng_tasks_free(v, n);
    eng_close(e);
}

/* Killed during attempt 3 of a task with max_retries=2 (attempts 1 and 2 failed and were
 * recorded before their retries): the re-run resumes at attempt 3, so the task is called 4 times
 * in all (not 6) and fails with 3 attempts recorded. */
static void test_kill9_attempts(const char *self)
{
    char dir[600], log[700], mark[700], code[4096];
    crash_paths("at", "tries.txt", "in-try3", dir, log, mark);
    snprintf(code, sizeof code,
             "from capsule import task\n"
             "import time\n"
             "LOG, MARK = '%s', '%s'\n"
             "@task(name='flaky', max_retries=2)\n"
             "def flaky():\n"
             "    with open(LOG, 'a') as f:\n"
             "        f.write('try\\n')\n"
             "    n = open(LOG).read().count('try')\n"
             "    if n == 3:\n"
             "        open(MARK, 'w').close()\n"
             "        time.sleep(60)\n"
             "    raise ValueError(f'call {n}')\n"
             "@task(name='main')\n"
             "def main():\n"
             "    try:\n"
             "        flaky()\n"
             "    except ValueError as e:\n"
             "        return str(e)\n"
             "main()",
             log, mark);
    run_until_mark_then_kill(self, dir, "at-1", code, mark, 100000);
    char *t = slurp(log);
    CHECK_EQ(count_lines(t, "try"), 3);
    free(t);
    eng_t *e = etest_open(dir, 0);
    eng_result_t *r = run_ok(e, "wf", "at-1", code);
    CHECK_STREQ(r->repr, "'call 4'");
    CHECK(r->restarted);
    eng_result_free(r);
    t = slurp(log);
    CHECK_EQ(count_lines(t, "try"), 4);
    free(t);
    eng_task_info_t *v;
    size_t n;
    CHECK_OK(eng_tasks_list(e, "at-1", &v, &n));
    CHECK_EQ(n, 2); /* main and flaky: the attempts' records are not listed as steps */
    const eng_task_info_t *f = find_task(v, n, "1.1");
    CHECK_STREQ(f->name, "flaky");
    CHECK_STREQ(f->state, "failed");
    CHECK_EQ(f->attempts, 3);
    eng_tasks_free(v, n);
    eng_close(e);
}

/* kill -9 while a task with its own limits (its own session and worker) runs its third nested
 * step: after the restart the engine re-runs both executions, the parent's re-run reaches the task
 * again and attaches to the child execution (same id), whose finished steps are not repeated. */
static void test_kill9_own_worker(const char *self)
{
    char dir[600], log[700], mark[700], code[4096];
    crash_paths("ow", "own.txt", "in-own3", dir, log, mark);
    snprintf(code, sizeof code,
             THREE_STEPS "@task(name='main', ram='256MB')\n"
                         "def main():\n"
                         "    return [step3(step2(step1())), os.getpid()]\n"
                         "r = main()\n"
                         "(r[0], r[1] != os.getpid())",
             log, mark);
    run_until_mark_then_kill(self, dir, "ow-1", code, mark, 100000);
    eng_t *e = etest_open(dir, 0);
    eng_result_t *r = run_ok(e, "wf", "ow-1", code);
    CHECK_STREQ(r->repr, "(3, True)");
    eng_result_free(r);
    char *t = slurp(log);
    CHECK_EQ(count_lines(t, "step1"), 1);
    CHECK_EQ(count_lines(t, "step2"), 1);
    CHECK_EQ(count_lines(t, "step3-start"), 2);
    free(t);
    eng_task_info_t *v;
    size_t n;
    CHECK_OK(eng_tasks_list(e, "ow-1-t1", &v, &n));
    CHECK_EQ(n, 3);
    for (size_t i = 0; i < n; i++)
        CHECK_STREQ(v[i].state, "completed");
    eng_tasks_free(v, n);
    eng_close(e);
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "child") == 0)
        return child(argv[2], argv[3], argv[4]);
    char self[4096];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof(self) - 1);
    CHECK(sl > 0);
    self[sl] = 0;
    char *dir = check_tmpdir("eng-steps");
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    char edir[600];
    snprintf(edir, sizeof edir, "%s/e", dir);
    CHECK(mkdir(edir, 0700) == 0);
    eng_t *e = etest_open(edir, 0);
    CHECK_OK(eng_session_open(e, "s", NULL, NULL));
    test_steps_basic(e);
    test_retries_and_limits(e);
    test_step_cost(e);
    test_external(e);
    eng_close(e);
    test_kill9_workflow(self);
    test_kill9_sleep(self);
    test_kill9_attempts(self);
    test_kill9_own_worker(self);
    check_rmtree(dir);
    free(dir);
    fprintf(stderr, "steps: ok\n");
    return 0;
}
