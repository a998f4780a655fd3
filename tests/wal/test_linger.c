/*
 * test_linger.c - the group-commit linger (wal_opts_t.linger_us).
 *   - the option's range: above the maximum is CAP_EINVAL, 0 (off, the default) and the maximum
 *     open;
 *   - a lone synchronous appender never lingers (every commit carries its one record);
 *   - 64 appends in flight, re-issued by one loop thread as their acknowledgements come (the
 *     way the engine and bench_promise drive the log): with the linger, the writer waits for the
 *     acknowledged callers and batches grow; with it off, no linger is counted;
 *   - after such a burst, when the writer went idle, a lone appender is not lingered on.
 * The completion wakes the loop only when it sleeps (as uv_async_send would), which is what
 * splits the callers into two alternating halves without the linger. Assertions are on the
 * log's counters, never on times.
 */
#include "check.h"
#include "wal.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define INFLIGHT 64
#define ROUNDS   40 /* appends per caller */

static char *fresh(const char *tag)
{
    char path[256];
    snprintf(path, sizeof path, "/tmp/capsule-test-linger-%d-%s", (int)getpid(), tag);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", path);
    CHECK_EQ(system(cmd), 0);
    return cap_strdup(path);
}

static void drop(char *dir)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK_EQ(system(cmd), 0);
    cap_free(dir);
}

struct opened {
    char *dir;
    store_env_t *env;
    wal_log_t *log;
};

static int open_log(struct opened *o, const char *tag, uint32_t linger_us)
{
    o->dir = fresh(tag);
    store_env_opts_t eo = {0};
    eo.map_size = 64u << 20;
    CHECK_OK(store_env_open(o->dir, &eo, &o->env));
    wal_opts_t wo = {0};
    wo.linger_us = linger_us;
    int rc = wal_log_open(o->env, &wo, &o->log);
    if (rc) {
        store_env_close(o->env);
        drop(o->dir);
    }
    return rc;
}

static void close_log(struct opened *o)
{
    wal_log_close(o->log);
    store_env_close(o->env);
    drop(o->dir);
}

static void append1(wal_log_t *log, wal_done_fn done, void *arg, int who, int n)
{
    char key[32], data[48];
    snprintf(key, sizeof key, "caller-%d", who);
    snprintf(data, sizeof data, "payload of caller %d, append %d", who, n);
    wal_field_t f = {.tag = 1, .u = (uint64_t)n, .data = data, .len = strlen(data)};
    wal_rec_t r = {.kind = 1, .key = key, .key_len = strlen(key), .fields = &f, .nfields = 1};
    if (done)
        CHECK_OK(wal_log_append(log, &r, 1, done, arg, NULL));
    else
        CHECK_OK(wal_log_append_sync(log, &r, 1, NULL));
}

/* INFLIGHT callers on one loop thread (this one): a completion on the writer thread only queues
 * its caller and wakes the loop, which appends the caller's next record. */
struct loop;
struct caller {
    struct loop *L;
    int id, n;
    struct caller *next;
};
struct loop {
    wal_log_t *log;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct caller *ready;
    int sleeping;
};

static void caller_done(void *arg, int status, uint64_t first_seq)
{
    struct caller *c = arg;
    CHECK_OK(status);
    CHECK(first_seq > 0);
    pthread_mutex_lock(&c->L->mu);
    c->next = c->L->ready;
    c->L->ready = c;
    if (c->L->sleeping) {
        c->L->sleeping = 0;
        pthread_cond_signal(&c->L->cv);
    }
    pthread_mutex_unlock(&c->L->mu);
}

static void run_loop(wal_log_t *log)
{
    struct loop L = {.log = log};
    struct caller cs[INFLIGHT];
    pthread_mutex_init(&L.mu, NULL);
    pthread_cond_init(&L.cv, NULL);
    int inflight = INFLIGHT;
    for (int i = 0; i < INFLIGHT; i++) {
        cs[i] = (struct caller){.L = &L, .id = i};
        append1(log, caller_done, &cs[i], i, cs[i].n++);
    }
    while (inflight) {
        pthread_mutex_lock(&L.mu);
        while (!L.ready) {
            L.sleeping = 1;
            pthread_cond_wait(&L.cv, &L.mu);
        }
        struct caller *list = L.ready;
        L.ready = NULL;
        pthread_mutex_unlock(&L.mu);
        while (list) {
            struct caller *c = list;
            list = c->next;
            if (c->n < ROUNDS)
                append1(log, caller_done, c, c->id, c->n++);
            else
                inflight--;
        }
    }
    pthread_cond_destroy(&L.cv);
    pthread_mutex_destroy(&L.mu);
}

static void test_range(void)
{
    struct opened o;
    CHECK_ERR(open_log(&o, "range", 100001), CAP_EINVAL);
    CHECK_OK(open_log(&o, "range", 100000));
    close_log(&o);
    CHECK_OK(open_log(&o, "range", 0));
    close_log(&o);
}

/* A lone synchronous appender: never a linger, one record per commit. */
static void test_lone(void)
{
    struct opened o;
    CHECK_OK(open_log(&o, "lone", 0));
    for (int i = 0; i < 200; i++)
        append1(o.log, NULL, NULL, 0, i);
    wal_stats_t st;
    wal_log_stats(o.log, &st);
    CHECK_EQ(st.records, 200);
    CHECK_EQ(st.commits, 200);
    CHECK_EQ(st.lingers, 0);
    CHECK_EQ(st.max_batch, 1);
    close_log(&o);
}

/* Records per commit of the burst, and the lingers. */
static void burst(uint32_t linger_us, wal_stats_t *out)
{
    struct opened o;
    CHECK_OK(open_log(&o, linger_us ? "on" : "off", linger_us));
    run_loop(o.log);
    wal_log_stats(o.log, out);
    CHECK_EQ(out->records, INFLIGHT * ROUNDS);
    CHECK_EQ(out->pending, 0);
    if (linger_us) {
        /* the writer is idle now (every append acknowledged): a lone appender is not delayed */
        usleep(20000);
        for (int i = 0; i < 50; i++)
            append1(o.log, NULL, NULL, 1000, i);
        wal_stats_t after;
        wal_log_stats(o.log, &after);
        CHECK_EQ(after.lingers, out->lingers);
        CHECK_EQ(after.commits, out->commits + 50);
    }
    close_log(&o);
}

static void test_burst(void)
{
    wal_stats_t off, on;
    /* the machine is shared: a loop thread that is not scheduled before the writer looks again
     * leaves it idle after its commit (no linger: the next batch takes everything queued by
     * then), one scheduled late makes a linger end short. The claim is that lingers happen,
     * join appends and batches grow over a burst without linger run just before: pairs of
     * bursts until one shows it, for up to 60 s */
    double mean_off = 0, mean_on = 0;
    uint64_t until = cap_now_ns() + 60000000000ull;
    do {
        burst(0, &off);
        CHECK_EQ(off.lingers, 0);
        CHECK_EQ(off.linger_joined, 0);
        mean_off = (double)off.records / (double)off.commits;
        burst(100000, &on);
        mean_on = (double)on.records / (double)on.commits;
        fprintf(stderr,
                "linger: %llu commits (%.1f records each) against %llu (%.1f) without; %llu "
                "lingers, %llu appends joined, %llu full\n",
                (unsigned long long)on.commits, mean_on, (unsigned long long)off.commits, mean_off,
                (unsigned long long)on.lingers, (unsigned long long)on.linger_joined,
                (unsigned long long)on.linger_full);
        CHECK(on.linger_joined <= on.records);
        CHECK(on.linger_full <= on.lingers);
        CHECK(on.lingers > 0 || on.linger_joined == 0);
    } while (
        !(on.lingers > 0 && on.linger_joined > 0 && on.linger_full > 0 && mean_on > mean_off) &&
        cap_now_ns() < until);
    CHECK(on.lingers > 0);
    CHECK(on.linger_joined > 0);
    CHECK(on.linger_full > 0);
    CHECK(mean_on > mean_off);
}

int main(void)
{
    test_range();
    test_lone();
    test_burst();
    printf("wal linger: ok\n");
    return 0;
}
