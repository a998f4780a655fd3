/*
 * test_concurrent.c - many producers at once: 8 threads append (single and 4-record appends,
 * sync and async with done callbacks), while the main thread truncates repeatedly and a reader
 * thread iterates. Afterwards: every acknowledged record after the last truncation point is
 * present exactly once and intact, sequence numbers are dense, each thread's records are in its
 * own order, multi-record appends are contiguous, and wal.key holds exactly one entry per record.
 */
#include "check.h"
#include "wal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#define NTHREADS   8
#define PER_THREAD 1500

struct shared {
    wal_log_t *log;
    _Atomic int writers_done;
    _Atomic uint64_t async_acks;
};

struct prod {
    struct shared *sh;
    int id;
};

static void async_done(void *arg, int status, uint64_t first_seq)
{
    struct shared *sh = arg;
    CHECK_OK(status);
    CHECK(first_seq > 0);
    atomic_fetch_add(&sh->async_acks, 1);
}

static void *producer(void *p)
{
    struct prod *pr = p;
    char key[16], data[4][64];
    snprintf(key, sizeof(key), "thread-%d", pr->id);
    uint64_t n = 0;
    while (n < PER_THREAD) {
        wal_rec_t r[4];
        wal_field_t f[4][3];
        size_t cnt = (n % 7 == 0 && n + 4 <= PER_THREAD) ? 4 : 1;
        for (size_t i = 0; i < cnt; i++) {
            snprintf(data[i], sizeof(data[i]), "t%d-n%llu", pr->id, (unsigned long long)(n + i));
            f[i][0] = (wal_field_t){.tag = 1, .u = (uint64_t)pr->id};
            f[i][1] = (wal_field_t){.tag = 2, .u = n + i};
            f[i][2] = (wal_field_t){
                .tag = 3, .u = cnt * 100 + i, .data = data[i], .len = strlen(data[i])};
            r[i] = (wal_rec_t){.kind = (uint8_t)(1 + pr->id),
                               .key = key,
                               .key_len = strlen(key),
                               .fields = f[i],
                               .nfields = 3};
        }
        if (n % 3 == 0)
            CHECK_OK(wal_log_append(pr->sh->log, r, cnt, async_done, pr->sh, NULL));
        else
            CHECK_OK(wal_log_append_sync(pr->sh->log, r, cnt, NULL));
        n += cnt;
    }
    return NULL;
}

static void *reader(void *p)
{
    struct shared *sh = p;
    uint64_t passes = 0;
    while (!atomic_load(&sh->writers_done)) {
        wal_iter_t *it;
        wal_entry_t e;
        wal_iter_opts_t o = {.decode = 1};
        uint64_t prev = 0;
        int rc;
        CHECK_OK(wal_iter_open(sh->log, &o, &it));
        while ((rc = wal_iter_next(it, &e)) == 0) {
            CHECK(e.seq > prev);
            prev = e.seq;
            CHECK_EQ(e.nfields, 3);
        }
        CHECK_ERR(rc, CAP_ENOTFOUND);
        wal_iter_close(it);
        passes++;
        usleep(2000);
    }
    return (void *)(uintptr_t)passes;
}

int main(void)
{
    char *dir = check_tmpdir("wal-conc");
    store_env_t *env;
    store_env_opts_t eo = {.map_size = 256 << 10}; /* grows during the run too */
    struct shared sh = {0};
    CHECK_OK(store_env_open(dir, &eo, &env));
    wal_opts_t wo = {.index_lag = 100}; /* the key index catches up during the run */
    CHECK_OK(wal_log_open(env, &wo, &sh.log));

    pthread_t th[NTHREADS], rd;
    struct prod pr[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        pr[i] = (struct prod){&sh, i};
        CHECK(pthread_create(&th[i], NULL, producer, &pr[i]) == 0);
    }
    CHECK(pthread_create(&rd, NULL, reader, &sh) == 0);
    uint64_t truncations = 0, last_cut = 0;
    for (;;) {
        wal_stats_t st;
        wal_log_stats(sh.log, &st);
        if (st.records >= (uint64_t)NTHREADS * PER_THREAD)
            break;
        if (st.last_seq > 500 && st.last_seq - 500 > last_cut) {
            last_cut = st.last_seq - 500;
            CHECK_OK(wal_log_truncate(sh.log, last_cut));
            truncations++;
        }
        usleep(1000);
    }
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(th[i], NULL);
    atomic_store(&sh.writers_done, 1);
    void *passes;
    pthread_join(rd, &passes);

    wal_stats_t st;
    wal_log_stats(sh.log, &st);
    CHECK_EQ(st.last_seq, (uint64_t)NTHREADS * PER_THREAD);
    CHECK_EQ(st.pending, 0);
    CHECK_EQ(st.first_seq, last_cut ? last_cut : 1);
    fprintf(stderr,
            "%llu records in %llu commits (largest batch %llu), %llu truncations, %llu "
            "reader passes, %llu map growths\n",
            (unsigned long long)st.records, (unsigned long long)st.commits,
            (unsigned long long)st.max_batch, (unsigned long long)truncations,
            (unsigned long long)(uintptr_t)passes, (unsigned long long)store_env_grow_count(env));
    CHECK(truncations > 0);

    /* dense, intact, per-thread order, groups contiguous */
    wal_iter_t *it;
    wal_entry_t e;
    wal_iter_opts_t o = {.decode = 1};
    uint64_t expect = st.first_seq, count = 0;
    int64_t last_n[NTHREADS];
    for (int i = 0; i < NTHREADS; i++)
        last_n[i] = -1;
    int rc;
    CHECK_OK(wal_iter_open(sh.log, &o, &it));
    while ((rc = wal_iter_next(it, &e)) == 0) {
        CHECK_EQ(e.seq, expect);
        expect++;
        count++;
        int id = (int)wal_entry_field(&e, 1)->u;
        int64_t n = (int64_t)wal_entry_field(&e, 2)->u;
        const wal_field_t *g = wal_entry_field(&e, 3);
        CHECK(id >= 0 && id < NTHREADS);
        CHECK_EQ(e.kind, 1 + id);
        if (last_n[id] >= 0)
            CHECK_EQ(n, last_n[id] + 1); /* nothing of this thread missing or out of order */
        last_n[id] = n;
        char want[64];
        snprintf(want, sizeof(want), "t%d-n%lld", id, (long long)n);
        CHECK_EQ(g->len, strlen(want));
        CHECK(memcmp(g->data, want, g->len) == 0);
    }
    CHECK_ERR(rc, CAP_ENOTFOUND);
    wal_iter_close(it);
    CHECK_EQ(expect, st.last_seq + 1);
    /* a thread that finished early may have had all its records truncated; the others end with
     * their last record */
    int seen = 0;
    for (int i = 0; i < NTHREADS; i++) {
        if (last_n[i] >= 0) {
            CHECK_EQ(last_n[i], PER_THREAD - 1);
            seen++;
        }
    }
    CHECK(seen > 0);

    /* by key: each thread's surviving records */
    uint64_t bykey = 0;
    for (int i = 0; i < NTHREADS; i++) {
        char key[16];
        snprintf(key, sizeof(key), "thread-%d", i);
        wal_iter_opts_t ko = {.key = key, .key_len = strlen(key)};
        CHECK_OK(wal_iter_open(sh.log, &ko, &it));
        while ((rc = wal_iter_next(it, &e)) == 0)
            bykey++;
        CHECK_ERR(rc, CAP_ENOTFOUND);
        wal_iter_close(it);
    }
    CHECK_EQ(bykey, count);
    store_txn_t *txn;
    store_dbi_t kdbi;
    uint64_t nidx;
    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK_OK(store_dbi_open(txn, "wal.key", 0, &kdbi));
    CHECK_OK(store_dbi_count(txn, kdbi, &nidx));
    CHECK(nidx <= count && nidx + 100 + 4 * NTHREADS >= count); /* the index lags <= a lag+batch */
    store_txn_abort(txn);

    wal_log_close(sh.log);
    uint64_t acks = atomic_load(&sh.async_acks);
    CHECK(acks > 0);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "wal.concurrent: ok\n");
    return 0;
}
