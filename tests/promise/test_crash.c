/*
 * test_crash.c - crash test. For each of KILLS kill points a child process opens a fresh store
 * (WAL_SYNC, fsync on every commit), runs random operations (model.h: each answer checked
 * against the model) and after each one reports over a pipe (operations done, the wal's last
 * sequence number). The parent kills it with SIGKILL at a random moment, reopens the store,
 * rebuilds the model by replaying the same seeded operations on a scratch store up to the last
 * acknowledged operation (or one more, when the wal shows that the in-flight operation's records
 * became durable), and checks: every promise, task, the outbox and the next deadline equal the
 * model's; then timers are re-armed (a tick far in the future fires exactly what the model fires)
 * and the outbox holds exactly the model's messages.
 */
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "model.h"

#define KILLS 60

typedef struct ack {
    uint64_t ops;
    uint64_t last_seq;
} ack_t;

static void child(const char *dir, uint64_t seed, int fd)
{
    ptest_t t;
    memset(&t, 0, sizeof(t));
    t.dir = (char *)dir;
    t.clock.now = 1000000;
    t.retry_ms = M_RETRY;
    ptest_open(&t);
    model_t *m = calloc(1, sizeof(*m));
    m->now = t.clock.now;
    uint64_t rng[1] = {seed};
    for (uint64_t n = 1;; n++) {
        m_step(m, t.ps, &t.clock, rng);
        wal_stats_t ws;
        wal_log_stats(prom_store_wal(t.ps), &ws);
        ack_t a = {n, ws.last_seq};
        if (write(fd, &a, sizeof(a)) != (ssize_t)sizeof(a))
            _exit(3);
    }
}

/* Replays `ops` operations of `seed` on a scratch store; returns the model and the wal's last
 * sequence number after them. */
static model_t *replay(uint64_t seed, uint64_t ops, uint64_t *last_seq)
{
    ptest_t t;
    ptest_init(&t, "prom-crash-ref");
    t.nosync = 1;
    t.retry_ms = M_RETRY;
    ptest_open(&t);
    model_t *m = calloc(1, sizeof(*m));
    m->now = t.clock.now;
    uint64_t rng[1] = {seed};
    for (uint64_t n = 0; n < ops; n++)
        m_step(m, t.ps, &t.clock, rng);
    wal_stats_t ws;
    wal_log_stats(prom_store_wal(t.ps), &ws);
    *last_seq = ws.last_seq;
    ptest_fini(&t);
    return m;
}

int main(void)
{
    uint64_t total_ops = 0;
    int used_next = 0;
    srand((unsigned)time(NULL));
    for (int k = 0; k < KILLS; k++) {
        uint64_t seed = 0x1234567ull + (uint64_t)k * 7919;
        char *dir = check_tmpdir("prom-crash");
        int p[2];
        CHECK(pipe(p) == 0);
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            close(p[0]);
            child(dir, seed, p[1]);
            _exit(0);
        }
        close(p[1]);
        /* wait for the first acknowledgement, then kill at a random moment */
        ack_t last = {0, 0}, a;
        CHECK(read(p[0], &last, sizeof(last)) == (ssize_t)sizeof(last));
        usleep((useconds_t)(1000 + rand() % 40000));
        CHECK(kill(pid, SIGKILL) == 0);
        int st;
        CHECK(waitpid(pid, &st, 0) == pid);
        CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        ssize_t r;
        while ((r = read(p[0], &a, sizeof(a))) == (ssize_t)sizeof(a))
            last = a;
        close(p[0]);

        /* reopen the crashed store */
        ptest_t t;
        memset(&t, 0, sizeof(t));
        t.dir = dir;
        t.retry_ms = M_RETRY;
        ptest_open(&t);
        wal_stats_t ws;
        wal_log_stats(prom_store_wal(t.ps), &ws);
        CHECK(ws.last_seq >= last.last_seq); /* every acknowledged record is there */
        uint64_t ops = last.ops, ref_seq;
        model_t *m = replay(seed, ops, &ref_seq);
        CHECK_EQ(ref_seq, last.last_seq);
        if (ws.last_seq > last.last_seq) {
            /* the in-flight operation's records became durable before the kill */
            free(m->q);
            free(m);
            ops++;
            used_next++;
            m = replay(seed, ops, &ref_seq);
            CHECK_EQ(ref_seq, ws.last_seq);
        }
        t.clock.now = m->now;
        fprintf(stderr, "kill %d: seed %#llx, %llu ops acknowledged, wal %llu/%llu%s\n", k,
                (unsigned long long)seed, (unsigned long long)last.ops,
                (unsigned long long)last.last_seq, (unsigned long long)ws.last_seq,
                ops > last.ops ? " (in-flight op durable)" : "");
        m_compare_all(m, t.ps);
        /* timers re-armed: a tick in the future fires what the model fires */
        m->now += 200000;
        t.clock.now = m->now;
        size_t fired;
        CHECK_OK(prom_store_tick(t.ps, m->now, &fired));
        CHECK_EQ(fired, m_tick(m));
        m_take(m, t.ps);
        m_compare_all(m, t.ps);
        total_ops += ops;
        free(m->q);
        free(m);
        ptest_close(&t);
        check_rmtree(dir);
        cap_free(dir);
    }
    fprintf(stderr,
            "promise crash: %d kill -9 points, %llu acknowledged operations verified (%d with the "
            "in-flight operation durable)\n",
            KILLS, (unsigned long long)total_ops, used_next);
    return 0;
}
