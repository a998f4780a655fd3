/*
 * test_async.c - the asynchronous promise operations (prom_promise_create_async,
 * prom_promise_settle_async) on a real WAL_SYNC store:
 *   - the completion comes exactly once, and only when the op's record is committed: a checker
 *     thread reads the committed log for every id the moment its completion is seen;
 *   - many ops issued without waiting share group commits;
 *   - an op that writes nothing (a repeated create) completes once everything before it is
 *     durable, with the same result as the blocking form;
 *   - extra records of another module go in the same append as the settle (consecutive sequence
 *     numbers, one transaction), also when the settle is a 404 or the promise is already settled;
 *     extras of promise's own kinds are refused (CAP_EINVAL, no completion, nothing written);
 *   - prom_promise_batch: a promise created and settled in one batch is one record, one commit;
 *     several promises in one batch share one append;
 *   - closing the store completes every outstanding op (rc 0) before it returns.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "prom_log.h"
#include "prom_test.h"

#define N       400
#define K_EXTRA 0x05 /* wal's own test range: promise hands it to the (absent) module apply */

static ptest_t t;

typedef struct op {
    prom_result_t res;
    atomic_int calls;
    int rc;
    pthread_t thread;
} op_t;

static op_t ops[N];

static void on_durable(void *arg, int rc)
{
    op_t *o = arg;
    o->rc = rc;
    o->thread = pthread_self();
    atomic_fetch_add(&o->calls, 1);
}

static int committed_doc(const char *id, uint64_t *seq)
{
    return prom_log_state(t.ps, id, seq);
}

/* The seq of the record of kind K_EXTRA with key, 0 if none. */
static uint64_t committed_extra(const char *key)
{
    wal_iter_t *it;
    wal_iter_opts_t io = {0};
    wal_entry_t e;
    uint64_t seq = 0;
    int rc;
    io.kind = K_EXTRA;
    io.key = key;
    io.key_len = strlen(key);
    io.decode = 1;
    CHECK_OK(wal_iter_open(prom_store_wal(t.ps), &io, &it));
    while ((rc = wal_iter_next(it, &e)) == 0) {
        const wal_field_t *f = wal_entry_field(&e, 1);
        CHECK(f && f->len == strlen(key) && memcmp(f->data, key, f->len) == 0);
        seq = e.seq;
    }
    CHECK_ERR(rc, CAP_ENOTFOUND);
    wal_iter_close(it);
    return seq;
}

static void wait_calls(op_t *o)
{
    for (int i = 0; atomic_load(&o->calls) == 0; i++) {
        CHECK(i < 30000); /* 30 s */
        usleep(1 * 1000);
    }
}

static void test_create_many(void)
{
    wal_stats_t before, after;
    wal_log_stats(prom_store_wal(t.ps), &before);
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "a%d", i);
        prom_create_t c = {id, INT64_MAX / 2, NULL, NULL, 0};
        CHECK_OK(prom_promise_create_async(t.ps, &c, &ops[i].res, on_durable, &ops[i]));
        /* the result is there at once, as the blocking form gives it */
        CHECK_EQ(ops[i].res.status, PROM_S_OK);
        CHECK(ops[i].res.promise && ops[i].res.promise->state == PROM_PENDING);
    }
    /* as each completion arrives, its record must already be in the committed log */
    int seen[N] = {0}, left = N;
    for (int spin = 0; left; spin++) {
        CHECK(spin < 3000000);
        for (int i = 0; i < N; i++) {
            if (seen[i] || atomic_load(&ops[i].calls) == 0)
                continue;
            char id[32];
            snprintf(id, sizeof(id), "a%d", i);
            CHECK_EQ(ops[i].rc, 0);
            CHECK_EQ(committed_doc(id, NULL), (int)PROM_PENDING);
            CHECK(!pthread_equal(ops[i].thread, pthread_self())); /* the wal writer's */
            seen[i] = 1;
            left--;
        }
    }
    wal_log_stats(prom_store_wal(t.ps), &after);
    CHECK_EQ(after.records - before.records, (uint64_t)N);
    /* nobody waited between the submits: they shared commits */
    CHECK(after.commits - before.commits < (uint64_t)N);
    usleep(20 * 1000);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(atomic_load(&ops[i].calls), 1);
        prom_result_clear(&ops[i].res);
        memset(&ops[i], 0, sizeof(ops[i]));
    }
}

static void test_repeat_writes_nothing(void)
{
    wal_stats_t before, after;
    op_t a = {0}, b = {0};
    prom_kv_t tag = {"k", "v"};
    prom_create_t c = {"r1", INT64_MAX / 2, NULL, &tag, 1};
    wal_log_stats(prom_store_wal(t.ps), &before);
    CHECK_OK(prom_promise_create_async(t.ps, &c, &a.res, on_durable, &a));
    /* the repeat reads a state that may not be durable yet: it completes after it */
    CHECK_OK(prom_promise_create_async(t.ps, &c, &b.res, on_durable, &b));
    wait_calls(&b);
    CHECK_EQ(b.rc, 0);
    CHECK_EQ(committed_doc("r1", NULL), (int)PROM_PENDING);
    wait_calls(&a);
    wal_log_stats(prom_store_wal(t.ps), &after);
    CHECK_EQ(after.records,
             before.records + 1); /* the first create only: the repeat wrote nothing */
    CHECK_EQ(b.res.status, PROM_S_OK);
    CHECK_STREQ(prom_promise_tag(b.res.promise, "k"), "v");
    /* durable already: completes in the calling thread, before the call returns */
    op_t d = {0};
    CHECK_OK(prom_promise_create_async(t.ps, &c, &d.res, on_durable, &d));
    CHECK_EQ(atomic_load(&d.calls), 1);
    CHECK(pthread_equal(d.thread, pthread_self()));
    prom_result_clear(&a.res);
    prom_result_clear(&b.res);
    prom_result_clear(&d.res);
}

static void test_settle_with_extra(void)
{
    prom_result_t res;
    prom_create_t c = {"s1", INT64_MAX / 2, NULL, NULL, 0};
    CHECK_OK(prom_promise_create(t.ps, &c, &res));
    prom_result_clear(&res);

    struct {
        const char *id, *key;
        int status;
    } cases[] = {
        {"s1", "x-s1", PROM_S_OK},       /* settles and appends */
        {"s1", "x-s1-again", PROM_S_OK}, /* already settled: extras still go */
        {"nope", "x-nope", PROM_S_NOTFOUND},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        op_t o = {0};
        wal_field_t f = {1, 0, cases[i].key, strlen(cases[i].key)};
        wal_rec_t rec = {K_EXTRA, cases[i].key, strlen(cases[i].key), &f, 1};
        prom_value_t v = {NULL, 0, "42", 2};
        prom_settle_t st = {cases[i].id, PROM_RESOLVED, &v};
        CHECK_OK(prom_promise_settle_async(t.ps, &st, &rec, 1, &o.res, on_durable, &o));
        CHECK_EQ(o.res.status, cases[i].status);
        wait_calls(&o);
        CHECK_EQ(o.rc, 0);
        uint64_t xs = committed_extra(cases[i].key);
        CHECK(xs > 0);
        if (i == 0) {
            uint64_t ds = 0;
            CHECK_EQ(committed_doc("s1", &ds), (int)PROM_RESOLVED);
            CHECK_EQ(ds, xs + 1); /* one append: the extra first, then the document */
        }
        prom_result_clear(&o.res);
    }

    /* extras of promise's own kinds are refused before anything happens */
    op_t o = {0};
    wal_field_t f = {1, 0, "z", 1};
    wal_rec_t rec = {PROM_REC_DOC, "s2", 2, &f, 1};
    prom_settle_t st = {"s1", PROM_RESOLVED, NULL};
    CHECK_ERR(prom_promise_settle_async(t.ps, &st, &rec, 1, &o.res, on_durable, &o), CAP_EINVAL);
    usleep(10 * 1000);
    CHECK_EQ(atomic_load(&o.calls), 0);
    CHECK_EQ(committed_doc("s2", NULL), -1);
}

static void test_close_completes(void)
{
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "c%d", i);
        prom_create_t c = {id, INT64_MAX / 2, NULL, NULL, 0};
        CHECK_OK(prom_promise_create_async(t.ps, &c, &ops[i].res, on_durable, &ops[i]));
    }
    ptest_close(&t);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(atomic_load(&ops[i].calls), 1);
        CHECK_EQ(ops[i].rc, 0);
        prom_result_clear(&ops[i].res);
    }
    ptest_open(&t);
    for (int i = 0; i < N; i++) {
        char id[32];
        snprintf(id, sizeof(id), "c%d", i);
        prom_result_t res;
        CHECK_OK(prom_promise_get(t.ps, id, &res));
        CHECK_EQ(res.status, PROM_S_OK);
        prom_result_clear(&res);
    }
}

/* prom_promise_batch: a create and a settle of the same promise are ONE record (created and
 * settled) in one commit; two promises in one batch share one append (consecutive seqs); a batch
 * that re-creates an existing pending promise settles it; bad batches answer 400. */
static void test_batch(void)
{
    wal_stats_t before, after;
    prom_result_t res = {0};
    prom_kv_t tag = {"k", "v"};
    prom_value_t val = {NULL, 0, "42", 2};
    prom_create_t c = {"b1", INT64_MAX / 2, NULL, &tag, 1};
    prom_settle_t st = {"b1", PROM_RESOLVED, &val};
    prom_op_t one[2] = {{&c, NULL}, {NULL, &st}};
    wal_log_stats(prom_store_wal(t.ps), &before);
    CHECK_OK(prom_promise_batch(t.ps, one, 2, &res));
    wal_log_stats(prom_store_wal(t.ps), &after);
    CHECK_EQ(res.status, PROM_S_OK);
    CHECK(res.promise && res.promise->state == PROM_RESOLVED);
    CHECK_EQ(res.promise->value.len, (size_t)2);
    CHECK_EQ(after.records - before.records, (uint64_t)1);
    CHECK_EQ(after.commits - before.commits, (uint64_t)1);
    CHECK_EQ(committed_doc("b1", NULL), (int)PROM_RESOLVED); /* durable on return */
    prom_result_clear(&res);

    /* an existing pending promise + a new one created and settled */
    prom_create_t p2 = {"b2", INT64_MAX / 2, NULL, NULL, 0};
    CHECK_OK(prom_promise_create(t.ps, &p2, &res));
    prom_result_clear(&res);
    prom_create_t a3 = {"b2#a1", INT64_MAX / 2, NULL, NULL, 0};
    prom_settle_t s3 = {"b2#a1", PROM_REJECTED, &val};
    prom_op_t two[3] = {{&p2, NULL}, {&a3, NULL}, {NULL, &s3}};
    wal_log_stats(prom_store_wal(t.ps), &before);
    CHECK_OK(prom_promise_batch(t.ps, two, 3, &res));
    wal_log_stats(prom_store_wal(t.ps), &after);
    CHECK_EQ(res.status, PROM_S_OK);
    CHECK(res.promise && res.promise->state == PROM_REJECTED);
    CHECK_EQ(after.records - before.records, (uint64_t)1); /* b2 unchanged: nothing written */
    CHECK_EQ(committed_doc("b2#a1", NULL), (int)PROM_REJECTED);
    CHECK_EQ(committed_doc("b2", NULL), (int)PROM_PENDING);
    prom_result_clear(&res);
    /* the pending one settled in a batch with a new one: two records, one append */
    prom_create_t c4 = {"b4", INT64_MAX / 2, NULL, NULL, 0};
    prom_settle_t s2 = {"b2", PROM_RESOLVED, &val};
    prom_op_t three[2] = {{&c4, NULL}, {NULL, &s2}};
    CHECK_OK(prom_promise_batch(t.ps, three, 2, &res));
    uint64_t q2 = 0, q4 = 0;
    CHECK_EQ(committed_doc("b2", &q2), (int)PROM_RESOLVED);
    CHECK_EQ(committed_doc("b4", &q4), (int)PROM_PENDING);
    CHECK_EQ(q2, q4 + 1);
    prom_result_clear(&res);

    /* refusals */
    CHECK_OK(prom_promise_batch(t.ps, NULL, 0, &res));
    CHECK_EQ(res.status, PROM_S_BAD);
    prom_op_t both = {&c, &st}, none = {NULL, NULL};
    CHECK_OK(prom_promise_batch(t.ps, &both, 1, &res));
    CHECK_EQ(res.status, PROM_S_BAD);
    CHECK_OK(prom_promise_batch(t.ps, &none, 1, &res));
    CHECK_EQ(res.status, PROM_S_BAD);
    prom_settle_t missing = {"nope", PROM_RESOLVED, &val};
    prom_op_t m[1] = {{NULL, &missing}};
    CHECK_OK(prom_promise_batch(t.ps, m, 1, &res));
    CHECK_EQ(res.status, PROM_S_NOTFOUND);
    prom_result_clear(&res);
}

int main(void)
{
    ptest_init(&t, "prom-async");
    ptest_open(&t);
    test_create_many();
    test_repeat_writes_nothing();
    test_settle_with_extra();
    test_batch();
    test_close_completes();
    ptest_fini(&t);
    printf("promise.async: ok\n");
    return 0;
}
