/*
 * test_durable.c - the durability invariant under concurrency: no caller is told anything that
 * depends on a record that is not yet durable. Writer threads create and settle promises (the
 * settle is acknowledged only once durable); reader threads poll promise.get on the ids being
 * written, and every time a read reports a promise (or its settled state), the test reads the
 * COMMITTED log (by key, in a fresh LMDB read transaction) (WAL_SYNC: committed = fsynced) and
 * checks the reported state is already there. A read that returned a state from a record still
 * in the group-commit queue would be caught here. Also: every acknowledged create/settle is
 * committed when acknowledged. (The oracle is the log read by key: prom.docs is only a lagging
 * checkpoint.)
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "prom_log.h"
#include "prom_test.h"

#define WRITERS    8
#define READERS    8
#define PER_WRITER 300

static ptest_t t;
static atomic_long published[WRITERS]; /* ids [0, published) of writer w are being written */
static atomic_long violations, reads_checked;
static atomic_int stop;

static int committed_state(const char *id)
{
    return prom_log_state(t.ps, id, NULL);
}

static void *writer(void *arg)
{
    int w = (int)(intptr_t)arg;
    for (long n = 0; n < PER_WRITER; n++) {
        char id[32];
        snprintf(id, sizeof(id), "w%d-%ld", w, n);
        atomic_store(&published[w], n + 1);
        prom_result_t r;
        prom_kv_t tags[1] = {{"resonate:scope", "global"}};
        prom_create_t c = {id, INT64_MAX / 2, NULL, tags, 1};
        CHECK_OK(prom_promise_create(t.ps, &c, &r));
        CHECK_EQ(r.status, 200);
        prom_result_clear(&r);
        CHECK_EQ(committed_state(id), PROM_PENDING); /* acknowledged => committed */
        prom_settle_t s = {id, PROM_RESOLVED, NULL};
        CHECK_OK(prom_promise_settle(t.ps, &s, &r));
        CHECK_EQ(r.status, 200);
        prom_result_clear(&r);
        CHECK_EQ(committed_state(id), PROM_RESOLVED);
    }
    return NULL;
}

static void *reader(void *arg)
{
    uint64_t rng = 0x9e3779b97f4a7c15ull * (uint64_t)((intptr_t)arg + 1);
    while (!atomic_load(&stop)) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        int w = (int)(rng % WRITERS);
        long n = atomic_load(&published[w]) - 1;
        if (n < 0)
            continue;
        char id[32];
        snprintf(id, sizeof(id), "w%d-%ld", w, n);
        prom_result_t r;
        CHECK_OK(prom_promise_get(t.ps, id, &r));
        if (r.status == 200) {
            int st = committed_state(id);
            /* what the reader was told must already be committed (a settled state must not be
             * reported while only the create is durable) */
            if (st < 0 || (r.promise->state != PROM_PENDING && st == PROM_PENDING))
                atomic_fetch_add(&violations, 1);
            atomic_fetch_add(&reads_checked, 1);
        }
        prom_result_clear(&r);
    }
    return NULL;
}

int main(void)
{
    ptest_init(&t, "prom-durable");
    ptest_open(&t); /* WAL_SYNC */
    pthread_t wt[WRITERS], rt[READERS];
    for (int i = 0; i < READERS; i++)
        CHECK(pthread_create(&rt[i], NULL, reader, (void *)(intptr_t)i) == 0);
    for (int i = 0; i < WRITERS; i++)
        CHECK(pthread_create(&wt[i], NULL, writer, (void *)(intptr_t)i) == 0);
    for (int i = 0; i < WRITERS; i++)
        pthread_join(wt[i], NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < READERS; i++)
        pthread_join(rt[i], NULL);
    fprintf(stderr,
            "promise durable: %d x %d create+settle, %ld concurrent reads checked, %ld "
            "violations\n",
            WRITERS, PER_WRITER, atomic_load(&reads_checked), atomic_load(&violations));
    CHECK(atomic_load(&reads_checked) > 1000);
    CHECK_EQ(atomic_load(&violations), 0);
    ptest_fini(&t);
    return 0;
}
