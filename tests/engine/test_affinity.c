/*
 * test_affinity.c - CPU placement of an execution (eng_opts_t.affinity), observed by the cells
 * themselves through the kernel: with ENG_AFFINITY_AUTO a lone execution's worker runs on one
 * CPU, the same as the engine's loop and wal threads; a cell that runs longer than 2 ms is
 * unpinned, an execution started while another is in flight is not pinned and unpins the
 * engine's threads, and a lone execution afterwards is pinned again.
 * ENG_AFFINITY_NONE pins nothing. The CPU of a lone execution is the one that takes the data
 * disk's interrupts when eng__io_cpu finds one (CAPSULE_IO_CPU overrides; its parsing and the
 * sysfs walk's answers are checked here too). On a caller's loop, its thread is pinned with
 * the lone execution only with eng_opts_t.pin_loop, and gets its own mask back at eng_close.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cap.h"
#include "eng_int.h"
#include "eng_test.h"

/* The cell's answer: "n/k": the CPUs its thread may use, and how many threads of the engine
 * process (its parent) are pinned to exactly the cell's own set when that is one CPU. */
static const char *PLACE =
    "import os\n"
    "mine = os.sched_getaffinity(0)\n"
    "tasks = os.listdir('/proc/%d/task' % os.getppid())\n"
    "k = sum(1 for t in tasks if len(mine) == 1 and os.sched_getaffinity(int(t)) == mine)\n"
    "'%d/%d' % (len(mine), k)";

/* The cell's answer: the names of the engine's threads pinned to the cell's one CPU. */
static const char *PINNED =
    "import os\n"
    "mine = os.sched_getaffinity(0)\n"
    "tasks = os.listdir('/proc/%d/task' % os.getppid())\n"
    "names = ' '.join(sorted(open('/proc/%d/task/%s/comm' % (os.getppid(), t)).read().strip()\n"
    "    for t in tasks if len(mine) == 1 and os.sched_getaffinity(int(t)) == mine))\n"
    "names";

static char *place(eng_t *e, const char *sid, const char *prefix)
{
    char code[1024];
    snprintf(code, sizeof code, "%s%s", prefix, PLACE);
    eng_result_t *r = etest_run(e, sid, NULL, code);
    if (r->status != ENG_ST_OK)
        fprintf(stderr, "cell failed: %s: %s\n%s\n", r->etype ? r->etype : "?",
                r->emsg ? r->emsg : "", r->traceback ? r->traceback : "");
    CHECK_EQ(r->status, ENG_ST_OK);
    char *v = cap_strdup(r->repr);
    eng_result_free(r);
    return v;
}

static void expect_place(eng_t *e, const char *sid, const char *prefix, const char *want)
{
    char *v = place(e, sid, prefix);
    if (strcmp(v, want) != 0)
        fprintf(stderr, "placement in %s after '%s': got %s, want %s\n", sid, prefix, v, want);
    CHECK_STREQ(v, want);
    cap_free(v);
}

static atomic_int g_done;
static void on_done(void *arg, const eng_result_t *r)
{
    (void)arg;
    CHECK_EQ(r->status, ENG_ST_OK);
    atomic_store(&g_done, 1);
}

/* eng__io_cpu: the override's parsing, and the sysfs walk's answers on this machine. */
static void test_io_cpu(const char *dir, long ncpu)
{
    static const struct {
        const char *env;
        int want;
    } cases[] = {{"0", 0},  {"1", 1},   {"-1", -1}, {"", -2},
                 {"x", -1}, {"1x", -1}, {"-2", -1}, {"5000", -1}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CHECK_OK(setenv("CAPSULE_IO_CPU", cases[i].env, 1));
        int c = eng__io_cpu(dir);
        if (cases[i].want == -2) /* empty: as if unset */
            CHECK(c >= -1 && c < ncpu);
        else
            CHECK_EQ(c, cases[i].want);
    }
    CHECK_OK(unsetenv("CAPSULE_IO_CPU"));
    int c = eng__io_cpu(dir); /* a disk's interrupt CPU, or no preference */
    CHECK(c >= -1 && c < ncpu);
    fprintf(stderr, "affinity: the interrupt CPU of %s's disk: %d\n", dir, c);
    CHECK_EQ(eng__io_cpu("/proc"), -1); /* no block device under it */
    CHECK_EQ(eng__io_cpu("/nonexistent/never"), -1);
    /* the guest's halt polling: what the sysfs files say, or -1 without the haltpoll driver */
    long hp = eng__halt_poll_ns(), want = -1;
    FILE *f = fopen("/sys/devices/system/cpu/cpuidle/current_driver", "r");
    char b[64] = "";
    if (f) {
        if (!fgets(b, sizeof b, f))
            b[0] = '\0';
        fclose(f);
    }
    if (strcmp(b, "haltpoll\n") == 0 &&
        (f = fopen("/sys/module/haltpoll/parameters/guest_halt_poll_ns", "r"))) {
        CHECK(fscanf(f, "%ld", &want) == 1);
        fclose(f);
    }
    CHECK_EQ(hp, want);
    fprintf(stderr, "affinity: guest_halt_poll_ns %ld (-1: not a haltpoll guest)\n", hp);
}

/* With CAPSULE_IO_CPU=cpu, a lone execution (and the engine's threads) run on that CPU. */
static void lone_on(const char *dir, int cpu)
{
    cpu_set_t set;
    CHECK_OK(sched_getaffinity(0, sizeof set, &set));
    if (!CPU_ISSET(cpu, &set)) {
        fprintf(stderr, "affinity: CPU %d is not ours: CAPSULE_IO_CPU=%d not tried\n", cpu, cpu);
        return;
    }
    char env[16], want[32];
    snprintf(env, sizeof env, "%d", cpu);
    snprintf(want, sizeof want, "'[%d]'", cpu);
    CHECK_OK(setenv("CAPSULE_IO_CPU", env, 1));
    eng_t *e = etest_open(dir, 1);
    CHECK_OK(eng_session_open(e, "c", NULL, NULL));
    char *v = NULL;
    for (int i = 0; i < 50 && (!v || strcmp(v, want) != 0); i++) { /* (a cell past 2 ms) */
        cap_free(v);
        eng_result_t *r =
            etest_run(e, "c", NULL, "import os\nstr(sorted(os.sched_getaffinity(0)))");
        CHECK_EQ(r->status, ENG_ST_OK);
        v = cap_strdup(r->repr);
        eng_result_free(r);
    }
    if (strcmp(v, want) != 0)
        fprintf(stderr, "CAPSULE_IO_CPU=%d: the lone cell ran on %s\n", cpu, v);
    CHECK_STREQ(v, want);
    cap_free(v);
    eng_close(e);
    check_rmtree(dir);
    CHECK_OK(unsetenv("CAPSULE_IO_CPU"));
}

/* An engine on a caller's loop, run by its own thread (the caller): pin_loop decides whether the
 * engine may pin that thread. */
typedef struct {
    const char *dir;
    int pin;
    uv_loop_t loop;
    uv_async_t stop;
    eng_t *e;
    _Atomic pid_t tid;
} caller_t;

static void caller_stop(uv_async_t *h)
{
    uv_close((uv_handle_t *)h, NULL);
}

static void *caller_main(void *arg)
{
    caller_t *c = arg;
    CHECK_EQ(uv_loop_init(&c->loop), 0);
    CHECK_EQ(uv_async_init(&c->loop, &c->stop, caller_stop), 0); /* keeps it running */
    eng_opts_t o = {0};
    o.dir = c->dir;
    o.nosync = 1;
    o.map_size = 64u << 20;
    o.loop = &c->loop;
    o.pin_loop = c->pin;
    CHECK_OK(eng_open(&o, &c->e));
    atomic_store(&c->tid, (pid_t)syscall(SYS_gettid));
    uv_run(&c->loop, UV_RUN_DEFAULT);
    CHECK_EQ(uv_loop_close(&c->loop), 0);
    return NULL;
}

static int cpus_of(pid_t tid)
{
    cpu_set_t m;
    CHECK_EQ(sched_getaffinity(tid, sizeof m, &m), 0);
    return CPU_COUNT(&m);
}

static void caller_loop(const char *dir, int pin, long ncpu)
{
    caller_t c = {.dir = dir, .pin = pin};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, caller_main, &c), 0);
    while (!atomic_load(&c.tid))
        usleep(1000);
    CHECK_EQ(cpus_of(c.tid), (int)ncpu);
    CHECK_OK(eng_session_open(c.e, "a", NULL, NULL));
    int n = 0, k = 0, loop_cpus = 0;
    for (int i = 0; i < 50; i++) { /* a lone cell (one past 2 ms on a loaded machine is not) */
        char *v = place(c.e, "a", "");
        CHECK_EQ(sscanf(v, "'%d/%d'", &n, &k), 2);
        cap_free(v);
        loop_cpus = cpus_of(c.tid);
        if (n == 1 && (!pin || loop_cpus == 1))
            break;
    }
    CHECK_EQ(n, 1);
    CHECK_EQ(loop_cpus, pin ? 1 : (int)ncpu);
    eng_close(c.e);                      /* the loop keeps running */
    CHECK_EQ(cpus_of(c.tid), (int)ncpu); /* its own mask again */
    uv_async_send(&c.stop);
    CHECK_EQ(pthread_join(th, NULL), 0);
    check_rmtree(dir);
}

int main(void)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 2) {
        fprintf(stderr, "affinity: skipped (1 CPU)\n");
        return 0;
    }
    char all[32], lone[32];
    snprintf(all, sizeof all, "'%ld/0'", ncpu);
    char *dir = check_tmpdir("eng-affinity");
    test_io_cpu(dir, ncpu);
    lone_on(dir, 0);
    lone_on(dir, 1);
    caller_loop(dir, 0, ncpu);
    caller_loop(dir, 1, ncpu);
    eng_t *e = etest_open(dir, 1); /* the default: ENG_AFFINITY_AUTO */
    CHECK_OK(eng_session_open(e, "a", NULL, NULL));
    CHECK_OK(eng_session_open(e, "b", NULL, NULL));
    /* lone: one CPU, shared with the loop and the wal's threads (loop, writer).
     * A cell whose wall time passes 2 ms (a loaded machine) is unpinned: a few tries. */
    char *v = NULL;
    int n = 0, k = 0;
    for (int i = 0; i < 50 && n != 1; i++) {
        cap_free(v);
        v = place(e, "a", "");
        CHECK_EQ(sscanf(v, "'%d/%d'", &n, &k), 2);
    }
    CHECK_EQ(n, 1);
    if (k < 2)
        fprintf(stderr, "lone placement %s\n", v);
    CHECK(k >= 2);
    snprintf(lone, sizeof lone, "%s", v);
    cap_free(v);
    /* the engine's threads on the lone cell's CPU are the loop and the wal writer, by name: not
     * the background ones (the wal's checkpoint thread, the promise store's flusher) */
    v = NULL;
    for (int i = 0; i < 50 && (!v || strcmp(v, "'capsule-loop capsule-wal'") != 0); i++) {
        cap_free(v);
        eng_result_t *r = etest_run(e, "a", NULL, PINNED);
        CHECK_EQ(r->status, ENG_ST_OK);
        v = cap_strdup(r->repr);
        eng_result_free(r);
    }
    if (strcmp(v, "'capsule-loop capsule-wal'") != 0)
        fprintf(stderr, "pinned with the lone cell: %s\n", v);
    CHECK_STREQ(v, "'capsule-loop capsule-wal'");
    cap_free(v);
    /* a cell that runs past 2 ms is let go (the engine's threads keep their place) */
    v = place(e, "a", "import time\ntime.sleep(0.03)\n");
    CHECK_EQ(sscanf(v, "'%d/%d'", &n, &k), 2);
    CHECK_EQ(n, (int)ncpu);
    cap_free(v);
    /* two in flight: the second is not pinned, nor are the engine's threads */
    eng_exec_req_t rq = {0};
    rq.sid = "a";
    rq.code = "import time\ntime.sleep(0.3)";
    eng_exec_cb_t cb = {0};
    cb.on_done = on_done;
    CHECK_OK(eng_execute(e, &rq, &cb, NULL));
    usleep(50000);
    expect_place(e, "b", "", all);
    while (!atomic_load(&g_done))
        usleep(1000);
    /* after it: lone again, on the engine's CPU */
    usleep(30000);
    v = place(e, "b", "");
    for (int i = 0; i < 50 && strcmp(v, lone) != 0; i++) {
        cap_free(v);
        v = place(e, "b", "");
    }
    CHECK_STREQ(v, lone);
    cap_free(v);
    eng_close(e);
    check_rmtree(dir);

    /* ENG_AFFINITY_NONE */
    eng_opts_t o = {0};
    o.dir = dir;
    o.nosync = 1;
    o.map_size = 64u << 20;
    o.affinity = ENG_AFFINITY_NONE;
    CHECK_OK(eng_open(&o, &e));
    CHECK_OK(eng_session_open(e, "a", NULL, NULL));
    expect_place(e, "a", "", all);
    expect_place(e, "a", "", all);
    eng_close(e);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "affinity: ok\n");
    return 0;
}
