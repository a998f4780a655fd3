/*
 * test_pool.c - the warm pool's refill, which asks the zygote for workers without blocking the
 * loop and adopts them as they come, one at a time:
 *   - the pool fills to pool_idle after open and after acquires, and never beyond it;
 *   - sessions opened back to back while a refill is in flight (more than the pool holds, so
 *     some are spawned at once) all serve, and no worker is left over or lost: the engine's
 *     children are its zygote, its spare, the sessions' workers and the pool's, nothing else;
 *   - pooled workers killed with kill -9 are replaced (the zygote is not restarted);
 *   - pooled workers that died (kill -9) while the loop could not yet handle their exit are never
 *     handed out: the acquire that finds them dead takes another (pool_dead counts them);
 *   - the zygote killed (kill -9) at random points after an acquire, with a refill in flight or
 *     not: a new zygote is started, sessions carry on, the pool fills again from it;
 *   - opening a new session does not wait for the loop: it returns while the loop is held, and
 *     its worker (popped on the opener's thread) killed before the loop adopts it is never
 *     handed to the session, which gets another;
 *   - four threads opening the same ids at once all land in one session per id (each thread's
 *     execution runs there), and no worker is left over.
 */
#include <pthread.h>
#include <dirent.h>
#include <errno.h>
#include <semaphore.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "eng_test.h"

#define POOL 3

/* This process's children that are still running (zombies and exiting ones not counted), and
 * their pids (up to max). */
static int children(pid_t *pids, int max)
{
    DIR *d = opendir("/proc");
    CHECK(d != NULL);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d)) != NULL) {
        char *end, path[300], buf[512];
        long pid = strtol(de->d_name, &end, 10);
        if (*end || pid <= 0)
            continue;
        snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t k = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[k] = 0;
        char *p = strrchr(buf, ')'), st = 0;
        int ppid = 0;
        if (!p || sscanf(p + 1, " %c %d", &st, &ppid) != 2 || ppid != getpid() || st == 'Z' ||
            st == 'X')
            continue;
        if (n < max)
            pids[n] = (pid_t)pid;
        n++;
    }
    closedir(d);
    return n;
}

/* Waits (up to 60 s) until the pool holds want idle workers; fails the test otherwise. */
static void pool_wait(eng_t *e, uint32_t want)
{
    eng_stats_t st;
    uint64_t deadline = cap_now_ns() + 60000000000ull;
    for (;;) {
        eng_stats(e, &st);
        if (st.pool_idle == want)
            return;
        if (cap_now_ns() > deadline) {
            fprintf(stderr, "pool_idle %u, want %u\n", st.pool_idle, want);
            CHECK(0);
        }
        usleep(2000);
    }
}

/* Checks the engine's children: the zygote, its spare (0 or 1), `workers` busy and POOL idle
 * ones, once the refill and the spare have settled (a worker becomes our child when the zygote's
 * intermediate process has exited, which can come after its FORKED under a sanitizer). */
static void children_expect(eng_t *e, int workers)
{
    pool_wait(e, POOL);
    pid_t p[64];
    int n, lo = workers + POOL + 1, hi = lo + 1;
    uint64_t deadline = cap_now_ns() + 60000000000ull;
    while (((n = children(p, 64)) < lo || n > hi) && cap_now_ns() < deadline)
        usleep(5000);
    if (n < lo || n > hi)
        fprintf(stderr, "%d children, want %d (+1 spare)\n", n, lo);
    CHECK(n >= lo && n <= hi);
    usleep(100000);
    eng_stats_t st;
    eng_stats(e, &st);
    CHECK_EQ(st.pool_idle, (uint32_t)POOL); /* never beyond pool_idle */
    CHECK(children(p, 64) <= hi);
}

/* Waits (up to 60 s) until pid has exited, every thread of it (its pidfd is readable, as the
 * engine sees it), without reaping it. */
static void exited_wait(pid_t pid)
{
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) {
        CHECK_EQ(errno, ESRCH); /* already reaped */
        return;
    }
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n;
    while ((n = poll(&p, 1, 60000)) < 0 && errno == EINTR)
        ;
    CHECK_EQ(n, 1);
    close(fd);
}

/* A cell whose on_done holds the loop thread until released (a test device: callbacks must not
 * block), so that workers can die without the loop handling their exit. */
typedef struct {
    sem_t held, release, done;
    int status;
    char repr[64];
} hold_t;

static void hold_done(void *arg, const eng_result_t *r)
{
    hold_t *h = arg;
    h->status = r->status;
    snprintf(h->repr, sizeof(h->repr), "%s", r->repr ? r->repr : "");
    sem_post(&h->held);
    while (sem_wait(&h->release) != 0)
        ;
}

static void note_done(void *arg, const eng_result_t *r)
{
    hold_t *h = arg;
    h->status = r->status;
    snprintf(h->repr, sizeof(h->repr), "%s", r->repr ? r->repr : "");
    sem_post(&h->done);
}

static void sem_wait_ok(sem_t *s)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 60;
    while (sem_timedwait(s, &ts) != 0)
        CHECK(errno == EINTR);
}

/* Runs a cell in session sid whose on_done holds the loop thread (h->held posted, the loop waits
 * for h->release); returns the pid of sid's worker. */
static pid_t hold_loop(eng_t *e, const char *sid, hold_t *h)
{
    CHECK_EQ(sem_init(&h->held, 0, 0), 0);
    CHECK_EQ(sem_init(&h->release, 0, 0), 0);
    eng_exec_req_t rq = {0};
    rq.sid = sid;
    rq.code = "import os\nos.getpid()";
    eng_exec_cb_t hcb = {0};
    hcb.on_done = hold_done;
    CHECK_OK(eng_execute(e, &rq, &hcb, h));
    sem_wait_ok(&h->held); /* the loop is held from here */
    CHECK_EQ(h->status, ENG_ST_OK);
    pid_t holder = (pid_t)atoi(h->repr);
    CHECK(holder > 0);
    return holder;
}

/* Kills (kill -9) every child but the zygote and `keep`, and waits until each has exited (a
 * zombie, or gone: every thread of it) but not for the engine to reap it. Returns how many were
 * killed. */
static int kill_idle_workers(int zpid, pid_t keep)
{
    pid_t p[64];
    int n = children(p, 64), k = 0;
    for (int i = 0; i < n && i < 64; i++)
        if (p[i] != zpid && p[i] != keep) {
            CHECK_EQ(kill(p[i], SIGKILL), 0);
            p[k++] = p[i];
        }
    for (int i = 0; i < k; i++)
        exited_wait(p[i]);
    return k;
}

/* Pooled workers die (kill -9) while the loop is held, so their exit is not handled yet, and an
 * acquire is waiting on the loop (a cold session's first cell: with nothing to restore, a pop).
 * Released, the loop finds the popped workers dead: the cell must run on a live one. */
static void dead_in_pool(eng_t *e)
{
    eng_stats_t st;
    eng_stats(e, &st);
    uint64_t dead0 = st.pool_dead, deaths0 = st.worker_deaths;
    int zpid = st.zygote_pid;
    CHECK_OK(eng_session_open(e, "cold", NULL, NULL));
    CHECK_OK(eng_session_release(e, "cold"));
    CHECK_OK(eng_session_open(e, "holder", NULL, NULL));
    pool_wait(e, POOL);

    hold_t h = {0}, c = {0};
    CHECK_EQ(sem_init(&c.done, 0, 0), 0);
    pid_t holder = hold_loop(e, "holder", &h);

    eng_exec_req_t rq = {0};
    rq.sid = "cold";
    rq.code = "40 + 2";
    eng_exec_cb_t ccb = {0};
    ccb.on_done = note_done;
    CHECK_OK(eng_execute(e, &rq, &ccb, &c)); /* queued for the loop, before any death */
    CHECK(kill_idle_workers(zpid, holder) >= POOL);
    sem_post(&h.release);
    sem_wait_ok(&c.done);
    if (c.status != ENG_ST_OK)
        fprintf(stderr, "cold's cell after the pool died: status %d\n", c.status);
    CHECK_EQ(c.status, ENG_ST_OK);
    CHECK_STREQ(c.repr, "42");
    eng_stats(e, &st);
    /* the pop came before the loop could handle the exits: the dead were skipped, and no
     * session was given one (a session's worker dying counts in worker_deaths) */
    CHECK(st.pool_dead > dead0);
    CHECK_EQ(st.worker_deaths, deaths0);
    sem_destroy(&h.held);
    sem_destroy(&h.release);
    sem_destroy(&c.done);
    CHECK_OK(eng_session_close(e, "cold"));

    /* not held: kill -9, then an acquire as soon as the workers have exited (reaped or not) */
    for (int round = 0; round < 3; round++) {
        children_expect(e, 1);
        eng_stats(e, &st);
        kill_idle_workers(st.zygote_pid, holder);
        char sid[32];
        snprintf(sid, sizeof(sid), "dead-%d", round);
        CHECK_OK(eng_session_open(e, sid, NULL, NULL));
        etest_expect(e, sid, "'alive'", "'alive'");
        CHECK_OK(eng_session_close(e, sid));
    }
    CHECK_OK(eng_session_close(e, "holder"));
    children_expect(e, 0);
}

/* A new session's open returns while the loop is held (the acquire pops on the opener's thread);
 * the popped worker and the pool are then killed before the loop has adopted it: the session
 * must get a live worker, and no session sees a worker death. */
static void dead_after_pop(eng_t *e)
{
    eng_stats_t st;
    CHECK_OK(eng_session_open(e, "holder2", NULL, NULL));
    pool_wait(e, POOL);
    eng_stats(e, &st);
    uint64_t dead0 = st.pool_dead, deaths0 = st.worker_deaths;
    int zpid = st.zygote_pid;
    hold_t h = {0};
    pid_t holder = hold_loop(e, "holder2", &h);
    CHECK_OK(eng_session_open(e, "popped", NULL, NULL)); /* returns with the loop held */
    int killed = kill_idle_workers(zpid, holder);
    CHECK(killed >= POOL); /* the popped one among them */
    /* two more opens while the dead still sit in the pool (the loop has not seen their exits):
     * each passes them, and each dead worker is counted once, not once per open */
    CHECK_OK(eng_session_open(e, "popped2", NULL, NULL));
    CHECK_OK(eng_session_open(e, "popped3", NULL, NULL));
    sem_post(&h.release);
    etest_expect(e, "popped", "6 * 7", "42");
    etest_expect(e, "popped2", "6 * 8", "48");
    etest_expect(e, "popped3", "6 * 9", "54");
    eng_stats(e, &st);
    CHECK(st.pool_dead > dead0);
    if (st.pool_dead - dead0 > (uint64_t)killed)
        fprintf(stderr, "pool_dead +%llu for %d workers killed\n",
                (unsigned long long)(st.pool_dead - dead0), killed);
    CHECK(st.pool_dead - dead0 <= (uint64_t)killed);
    CHECK_EQ(st.worker_deaths, deaths0);
    sem_destroy(&h.held);
    sem_destroy(&h.release);
    CHECK_OK(eng_session_close(e, "popped"));
    CHECK_OK(eng_session_close(e, "popped2"));
    CHECK_OK(eng_session_close(e, "popped3"));
    CHECK_OK(eng_session_close(e, "holder2"));
    children_expect(e, 0);
}

#define RACERS   4
#define RACE_IDS 12
typedef struct {
    eng_t *e;
    int t;
} racer_t;

static void *racer(void *arg)
{
    racer_t *ra = arg;
    int order[RACE_IDS];
    for (int i = 0; i < RACE_IDS; i++)
        order[i] = (i + ra->t * 5) % RACE_IDS; /* each thread in another order */
    char sid[32];
    for (int k = 0; k < RACE_IDS; k++) {
        snprintf(sid, sizeof(sid), "race-%d", order[k]);
        CHECK_OK(eng_session_open(ra->e, sid, NULL, NULL));
        eng_result_t *r = etest_run(ra->e, sid, NULL, "hits = globals().get('hits', 0) + 1");
        CHECK_EQ(r->status, ENG_ST_OK);
        eng_result_free(r);
    }
    return NULL;
}

/* RACERS threads open the same ids at once: one session per id takes every thread's cell. */
static void racing_opens(eng_t *e)
{
    pthread_t th[RACERS];
    racer_t ra[RACERS];
    for (int t = 0; t < RACERS; t++) {
        ra[t] = (racer_t){e, t};
        CHECK_EQ(pthread_create(&th[t], NULL, racer, &ra[t]), 0);
    }
    for (int t = 0; t < RACERS; t++)
        CHECK_EQ(pthread_join(th[t], NULL), 0);
    char **sids = NULL;
    size_t n = 0;
    CHECK_OK(eng_session_list(e, &sids, &n));
    int listed[RACE_IDS] = {0};
    for (size_t i = 0; i < n; i++) {
        int k;
        if (sscanf(sids[i], "race-%d", &k) == 1 && k >= 0 && k < RACE_IDS)
            listed[k]++;
        cap_free(sids[i]);
    }
    cap_free(sids);
    char sid[32], want[16];
    snprintf(want, sizeof(want), "%d", RACERS);
    for (int k = 0; k < RACE_IDS; k++) {
        CHECK_EQ(listed[k], 1);
        snprintf(sid, sizeof(sid), "race-%d", k);
        etest_expect(e, sid, "hits", want);
        CHECK_OK(eng_session_close(e, sid));
    }
    children_expect(e, 0);
}

int main(void)
{
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    char *dir = check_tmpdir("eng-pool");
    eng_opts_t o = {0};
    o.dir = dir;
    o.map_size = 64u << 20;
    o.pool_idle = POOL;
    o.dur_threads = 4;
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    children_expect(e, 0);

    /* back to back, more sessions than the pool holds: acquires land on refills in flight */
    char sid[32];
    for (int i = 0; i < 2 * POOL; i++) {
        snprintf(sid, sizeof(sid), "b%d", i);
        CHECK_OK(eng_session_open(e, sid, NULL, NULL));
    }
    for (int i = 0; i < 2 * POOL; i++) {
        snprintf(sid, sizeof(sid), "b%d", i);
        char code[32], want[32];
        snprintf(code, sizeof(code), "n = %d\nn * 2", i);
        snprintf(want, sizeof(want), "%d", i * 2);
        etest_expect(e, sid, code, want);
    }
    children_expect(e, 2 * POOL);
    for (int i = 0; i < 2 * POOL; i++) {
        snprintf(sid, sizeof(sid), "b%d", i);
        CHECK_OK(eng_session_close(e, sid));
    }
    children_expect(e, 0);

    /* pooled workers (and the spare) killed: replaced, the zygote stays */
    eng_stats_t st;
    eng_stats(e, &st);
    int zpid = st.zygote_pid;
    uint64_t restarts = st.zygote_restarts;
    pid_t p[64];
    int n = children(p, 64);
    for (int i = 0; i < n && i < 64; i++)
        if (p[i] != zpid)
            CHECK_EQ(kill(p[i], SIGKILL), 0);
    /* until the engine has reaped them all (it drops a dead one from the pool then), the pool
     * still counts them idle: an acquire could be handed one (the session below then got a
     * WorkerDied, 1 of 5 ASan runs) */
    uint64_t until = cap_now_ns() + 60000000000ull;
    for (int i = 0; i < n && i < 64; i++)
        while (p[i] != zpid && kill(p[i], 0) == 0) {
            CHECK(cap_now_ns() < until);
            usleep(2000);
        }
    children_expect(e, 0);
    eng_stats(e, &st);
    CHECK_EQ(st.zygote_pid, zpid);
    CHECK_EQ(st.zygote_restarts, restarts);
    CHECK_OK(eng_session_open(e, "after-pool-kill", NULL, NULL));
    etest_expect(e, "after-pool-kill", "'fine'", "'fine'");
    CHECK_OK(eng_session_close(e, "after-pool-kill"));
    dead_in_pool(e);
    dead_after_pop(e);
    racing_opens(e);

    /* the zygote killed at a random point after an acquire (its refill in flight or not) */
    for (int round = 0; round < 5; round++) {
        eng_stats(e, &st);
        restarts = st.zygote_restarts;
        zpid = st.zygote_pid;
        snprintf(sid, sizeof(sid), "z%d", round);
        CHECK_OK(eng_session_open(e, sid, NULL, NULL));
        usleep((useconds_t)(rand() % 4000));
        CHECK_EQ(kill(zpid, SIGKILL), 0);
        etest_expect(e, sid, "'served'", "'served'");
        for (int i = 0; i < POOL + 1; i++) { /* past the pool: from the new zygote */
            char s2[48];
            snprintf(s2, sizeof(s2), "z%d-%d", round, i);
            CHECK_OK(eng_session_open(e, s2, NULL, NULL));
            etest_expect(e, s2, "1 + 1", "2");
            CHECK_OK(eng_session_close(e, s2));
        }
        pool_wait(e, POOL);
        eng_stats(e, &st);
        CHECK_EQ(st.zygote_restarts, restarts + 1);
        CHECK(st.zygote_pid > 0 && st.zygote_pid != zpid);
    }
    eng_close(e);
    check_rmtree(dir);
    cap_free(dir);
    printf("ok\n");
    return 0;
}
