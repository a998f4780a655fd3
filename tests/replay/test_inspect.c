/*
 * test_inspect - `capsule-replay export | sessions | executions | promises | show` (the real
 * binary) on a data directory written by a real engine: two sessions (one closed), an execution
 * that asks for input (its reply recorded), a failing one, a checkpoint, one whose worker dies;
 * then the same commands on the directory while the engine still holds it, and bad arguments (exit
 * 64).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include "capsule.h"
#include "check.h"
#include "rtest.h"

static void exec_ok(eng_t *e, const char *sid, const char *eid, const char *code, const char *input,
                    eng_status_t want)
{
    eng_exec_req_t rq = {.sid = sid, .eid = eid, .code = code};
    eng_result_t *r = NULL;
    const char *in[1] = {input};
    CHECK_OK(eng_execute_sync(e, &rq, input ? in : NULL, input ? 1 : 0, &r));
    CHECK_EQ(r->status, want);
    eng_result_free(r);
}

static void commands(const char *dir)
{
    /* sessions: both, filtered by state */
    CHECK_EQ(RT_RUN("sessions", dir), 0);
    CHECK(strstr(rt_out, "alpha ") && strstr(rt_out, "beta "));
    CHECK_EQ(RT_RUN("sessions", "--state", "closed", "--json", dir), 0);
    CHECK(strstr(rt_out, "\"session\":\"beta\"") && !strstr(rt_out, "\"alpha\""));
    CHECK_EQ(rt_lines(rt_out), 1);
    CHECK_EQ(RT_RUN("sessions", "--json", "--state", "open", dir), 0);
    CHECK(strstr(rt_out, "\"session\":\"alpha\"") && strstr(rt_out, "\"committed\":3"));
    CHECK(strstr(rt_out, "\"checkpoints\":1"));
    /* executions: submission order, results, inputs */
    CHECK_EQ(RT_RUN("executions", "--session", "alpha", dir), 0);
    char *a1 = strstr(rt_out, "a1 "), *a2 = strstr(rt_out, "a2 "), *a3 = strstr(rt_out, "a3 ");
    CHECK(a1 && a2 && a3 && a1 < a2 && a2 < a3);
    CHECK_EQ(RT_RUN("executions", "--json", "--state", "error", dir), 0);
    CHECK(strstr(rt_out, "\"execution\":\"a3\"") && strstr(rt_out, "ZeroDivisionError"));
    CHECK_EQ(rt_lines(rt_out), 1);
    CHECK_EQ(RT_RUN("executions", "--json", "--session", "alpha", "--limit", "1", dir), 0);
    CHECK_EQ(rt_lines(rt_out), 1);
    CHECK(strstr(rt_out, "\"execution\":\"a1\""));
    CHECK_EQ(RT_RUN("executions", "--json", "--session", "alpha", "--since", "2000-01-01", dir), 0);
    CHECK(strstr(rt_out, "\"execution\":\"a2\"") && strstr(rt_out, "\"inputs\":1"));
    CHECK_EQ(RT_RUN("executions", "--json", "--until", "2000-01-01T00:00Z", dir), 0);
    CHECK_EQ(rt_lines(rt_out), 0);
    /* promises: the input request and its reply */
    CHECK_EQ(RT_RUN("promises", "--json", "--prefix", "capsule/x/a2/in/", dir), 0);
    CHECK(strstr(rt_out, "\"state\":\"resolved\"") && strstr(rt_out, "\"data\":\"Ada\""));
    CHECK_EQ(RT_RUN("promises", "--state", "pending", dir), 0);
    CHECK(strstr(rt_out, "capsule/s/alpha") && !strstr(rt_out, "capsule/s/beta"));
    /* export: every record decoded; ranges and kinds */
    CHECK_EQ(RT_RUN("export", dir), 0);
    CHECK(strstr(rt_out, "\"kind\":\"eng.finish\"") && strstr(rt_out, "\"kind\":\"prom.doc\""));
    CHECK(strstr(rt_out, "\"kind\":\"eng.checkpoint\"") &&
          strstr(rt_out, "\"repr\":\"'hello Ada'\""));
    size_t all = rt_lines(rt_out);
    CHECK_EQ(RT_RUN("export", "--kind", "eng.finish", dir), 0);
    CHECK_EQ(rt_lines(rt_out), 7); /* a1..a5, beta:warmup, b1 */
    CHECK(!strstr(rt_out, "prom.doc"));
    CHECK_EQ(RT_RUN("export", "--from", "2", "--to", "4", dir), 0);
    CHECK_EQ(rt_lines(rt_out), 3);
    CHECK(!strncmp(rt_out, "{\"seq\":2,", 9));
    CHECK(all > 10);
    /* show EXECUTION: code, the input with its reply, output, result */
    CHECK_EQ(RT_RUN("show", dir, "a2"), 0);
    CHECK(strstr(rt_out, "--- code\nname = input('who? ')"));
    CHECK(strstr(rt_out, "--- input 1: prompt \"who? \" -> \"Ada\""));
    CHECK(strstr(rt_out, "--- result: ok, committed as delta #2"));
    CHECK(strstr(rt_out, "value: 'hello Ada'"));
    CHECK_EQ(RT_RUN("show", "--json", dir, "a3"), 0);
    CHECK(strstr(rt_out, "\"etype\":\"ZeroDivisionError\"") && rt_lines(rt_out) == 1);
    /* what the log could not hold, as the execution's result said */
    CHECK_EQ(RT_RUN("show", dir, "a4"), 0);
    CHECK(strstr(rt_out, "\nnot recorded: lk:_thread.lock"));
    CHECK_EQ(RT_RUN("show", "--json", dir, "a4"), 0);
    CHECK(strstr(rt_out, "\"unrecorded\":\"lk:_thread.lock"));
    /* show SESSION: the timeline with its checkpoint and the worker's death */
    CHECK_EQ(RT_RUN("show", dir, "alpha"), 0);
    char *p1 = strstr(rt_out, " a2 "), *pc = strstr(rt_out, "checkpoint "),
         *p3 = strstr(rt_out, " a3 ");
    CHECK(p1 && pc && p3 && p1 < pc && pc < p3);
    CHECK(strstr(rt_out, "after delta #2"));
    CHECK(strstr(rt_out, "worker died ("));
    CHECK(strstr(rt_out, "a4 "));
    CHECK_EQ(RT_RUN("show", "--json", dir, "beta"), 0);
    CHECK(strstr(rt_out, "\"state\":\"closed\"") && strstr(rt_out, "\"event\":\"execution\""));
    CHECK_EQ(RT_RUN("show", dir, "nobody"), 1);
}

static void bad_usage(const char *dir)
{
    CHECK_EQ(RT_RUN("sessions"), 64);
    CHECK_EQ(RT_RUN("sessions", "--state", "asleep", dir), 64);
    CHECK_EQ(RT_RUN("executions", "--limit", "0", dir), 64);
    CHECK_EQ(RT_RUN("executions", "--since", "yesterday", dir), 64);
    CHECK_EQ(RT_RUN("promises", "--session", "x", dir), 64);
    CHECK_EQ(RT_RUN("export", "--kind", "eng.nothing", dir), 64);
    CHECK_EQ(RT_RUN("export", "--from", "9", "--to", "3", dir), 64);
    CHECK_EQ(RT_RUN("export", "--from", dir), 64);
    CHECK_EQ(RT_RUN("export", dir, dir), 64);
    CHECK_EQ(RT_RUN("show", dir), 64);
    CHECK_EQ(RT_RUN("show", dir, "a1", "a2"), 64);
    CHECK_EQ(RT_RUN("show", "--state", "ok", dir, "a1"), 64);
    CHECK_EQ(RT_RUN("frobnicate", dir), 64);
    CHECK_EQ(RT_RUN("export", "--help"), 0);
    CHECK(strstr(rt_out, "capsule-replay export"));
    CHECK_EQ(RT_RUN("--help"), 0);
    CHECK(strstr(rt_out, "executions") && strstr(rt_out, "verify"));
    CHECK_EQ(RT_RUN("sessions", "/dev/null/nowhere"), 2);
}

int main(void)
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char *dir = check_tmpdir("replay-inspect");
    eng_opts_t o = {.dir = dir, .map_size = 64u << 20, .pool_idle = 1};
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    CHECK_OK(eng_session_open(e, "alpha", NULL, NULL));
    eng_session_opts_t bo = {.warmup = "w = 1"};
    CHECK_OK(eng_session_open(e, "beta", &bo, NULL));
    exec_ok(e, "alpha", "a1", "x = 40 + 2", NULL, ENG_ST_OK);
    exec_ok(e, "alpha", "a2", "name = input('who? ')\n'hello ' + name", "Ada", ENG_ST_OK);
    size_t bytes = 0;
    CHECK_OK(eng_checkpoint(e, "alpha", 0, &bytes));
    exec_ok(e, "alpha", "a3", "1 / 0", NULL, ENG_ST_ERROR);
    exec_ok(e, "alpha", "a4", "y = x + 1\nimport threading\nlk = threading.Lock()", NULL,
            ENG_ST_OK);
    exec_ok(e, "alpha", "a5", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", NULL,
            ENG_ST_DIED);
    exec_ok(e, "beta", "b1", "z = w", NULL, ENG_ST_OK);
    CHECK_OK(eng_session_close(e, "beta"));
    /* the engine still holds the directory: every command reads it safely */
    commands(dir);
    eng_close(e);
    commands(dir);
    bad_usage(dir);
    check_rmtree(dir);
    cap_free(dir);
    printf("replay inspect: ok\n");
    return 0;
}
