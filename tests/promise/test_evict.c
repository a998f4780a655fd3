/*
 * test_evict.c - bounded memory of the promise store: the map's deletion (against a reference),
 * eviction of settled documents (the same answers from prom.docs: get, idempotent create and
 * settle, tasks, preload, search with cursors), 50,000 create+settle pairs (and pairs with an
 * input-like child promise on the execution's branch) keeping the resident set and the anonymous
 * memory flat, and a reopen that loads only the live set.
 */
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>

#include "prom_int.h"
#include "prom_test.h"

static uint64_t rnd(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* prom__smap_t: random put / replace / delete / get against a plain array, through growth, with
 * long probe runs (a tiny key space re-used heavily) */
static void test_smap(void)
{
    enum { KEYS = 3000 };
    static char keys[KEYS][16];
    static int present[KEYS];
    static int vals[KEYS][1];
    prom__smap_t m = {0};
    uint64_t x = 88172645463325252ull;
    size_t n = 0;
    for (int i = 0; i < KEYS; i++)
        snprintf(keys[i], sizeof(keys[i]), "k%d", i);
    for (int op = 0; op < 300000; op++) {
        int k = (int)(rnd(&x) % (op < 100000 ? 200 : KEYS));
        switch (rnd(&x) % 3) {
        case 0:
            prom__smap_put(&m, keys[k], vals[k]);
            n += !present[k];
            present[k] = 1;
            break;
        case 1: {
            void *v = prom__smap_del(&m, keys[k]);
            CHECK(v == (present[k] ? (void *)vals[k] : NULL));
            n -= present[k];
            present[k] = 0;
            break;
        }
        default:
            CHECK(prom__smap_get(&m, keys[k]) == (present[k] ? (void *)vals[k] : NULL));
        }
        CHECK_EQ(m.n, n);
        if (op % 50000 == 0) /* every key, not only the touched ones */
            for (int i = 0; i < KEYS; i++)
                CHECK(prom__smap_get(&m, keys[i]) == (present[i] ? (void *)vals[i] : NULL));
    }
    for (int i = 0; i < KEYS; i++)
        if (present[i])
            CHECK(prom__smap_del(&m, keys[i]) == vals[i]);
    CHECK_EQ(m.n, 0);
    for (size_t i = 0; i < m.cap; i++)
        CHECK(m.e[i].key == NULL);
    CHECK(prom__smap_get(&m, "k1") == NULL);
    prom__smap_free(&m);
}

static void open_cache(ptest_t *t, int settled_cache)
{
    t->settled_cache = settled_cache;
    ptest_open(t);
}

static void create(prom_store_t *ps, const char *id, int64_t timeout, const prom_kv_t *tags,
                   size_t ntags, int want)
{
    prom_result_t r;
    prom_value_t param = {NULL, 0, "param-bytes", 11};
    prom_create_t c = {id, timeout, &param, tags, ntags};
    CHECK_OK(prom_promise_create(ps, &c, &r));
    CHECK_EQ(r.status, want);
    prom_result_clear(&r);
}
static void settle(prom_store_t *ps, const char *id, prom_state_t st)
{
    prom_result_t r;
    prom_value_t v = {NULL, 0, "42", 2};
    prom_settle_t q = {id, st, &v};
    CHECK_OK(prom_promise_settle(ps, &q, &r));
    CHECK_EQ(r.status, PROM_S_OK);
    prom_result_clear(&r);
}

static long rss_anon_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "RssAnon: %ld", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb;
}

/* N create+settle pairs from THREADS callers (child: plus an input-like child promise on the
 * execution's branch, created, settled). The resident set stays within the cache plus the
 * documents in flight; anonymous memory between 20% and 100% of the run grows by far less than
 * the documents would take. */
#define THREADS 8
typedef struct pairs {
    prom_store_t *ps;
    int child, n, base;
    long rss_at;    /* thread 0: RssAnon at 20% */
    size_t heap_at; /* thread 0: malloc'd bytes in use at 20% */
    uint64_t max_resident;
} pairs_t;

static void *pairs_main(void *arg)
{
    pairs_t *a = arg;
    char id[64], cid[80];
    for (int i = 0; i < a->n; i++) {
        snprintf(id, sizeof(id), "capsule/x/%08d", a->base + i);
        prom_kv_t tags[] = {{"capsule:kind", "exec"}, {"resonate:branch", id}};
        create(a->ps, id, INT64_MAX / 2, tags, 2, PROM_S_OK);
        if (a->child) {
            snprintf(cid, sizeof(cid), "%s.input.0", id);
            prom_kv_t ctags[] = {{"capsule:kind", "input"}, {"resonate:branch", id}};
            create(a->ps, cid, INT64_MAX / 2, ctags, 2, PROM_S_OK);
            settle(a->ps, cid, PROM_RESOLVED);
        }
        settle(a->ps, id, (a->base + i) % 7 ? PROM_RESOLVED : PROM_REJECTED);
        prom_store_stats_t st;
        prom_store_stats(a->ps, &st);
        /* checkpoint mode: documents changed since the last checkpoint wait for the next (one
         * changed again while a checkpoint writes it counts twice) */
        uint64_t held =
            st.resident_docs > st.unflushed_docs ? st.resident_docs - st.unflushed_docs : 0;
        if (held > a->max_resident)
            a->max_resident = held;
        if (a->base == 0 && i == a->n / 5) {
            a->rss_at = rss_anon_kb();
            a->heap_at = mallinfo2().uordblks;
        }
    }
    return NULL;
}

static void test_pairs(int child, int settled_cache)
{
    ptest_t t;
    ptest_init(&t, "prom-evict-pairs");
    t.nosync = 1;
    open_cache(&t, settled_cache);
#ifdef CAPSULE_SANITIZE
    int N = 16000;
#else
    int N = 50000;
#endif
    if (getenv("PROM_EVICT_PAIRS")) /* PROM_EVICT_PAIRS overrides the count (profiling) */
        N = atoi(getenv("PROM_EVICT_PAIRS"));
    size_t cache = settled_cache < 0 ? 0 : settled_cache == 0 ? 1024 : (size_t)settled_cache;
    pairs_t a[THREADS];
    pthread_t th[THREADS];
    for (int k = 0; k < THREADS; k++) {
        a[k] = (pairs_t){t.ps, child, N / THREADS, k * (N / THREADS), 0, 0, 0};
        CHECK(pthread_create(&th[k], NULL, pairs_main, &a[k]) == 0);
    }
    uint64_t max_resident = 0;
    for (int k = 0; k < THREADS; k++) {
        pthread_join(th[k], NULL);
        if (a[k].max_resident > max_resident)
            max_resident = a[k].max_resident;
    }
    long rss_at = a[0].rss_at, rss_end = rss_anon_kb();
    size_t heap_at = a[0].heap_at, heap_end = mallinfo2().uordblks;
    prom_store_stats_t st;
    CHECK_OK(prom_store_checkpoint(t.ps));
    prom_store_stats(t.ps, &st);
    CHECK_EQ(st.unflushed_docs, 0);
    uint64_t docs = (uint64_t)N * (child ? 2 : 1);
    fprintf(
        stderr,
        "evict: %d pairs%s from %d callers, cache %zu: max resident %llu docs, now %llu docs / "
        "%llu bytes, %llu evictions, %llu misses, %llu records; RssAnon %ld -> %ld kB, malloc'd "
        "%zu -> %zu kB\n",
        N, child ? " with a child" : "", THREADS, cache, (unsigned long long)max_resident,
        (unsigned long long)st.resident_docs, (unsigned long long)st.resident_bytes,
        (unsigned long long)st.evictions, (unsigned long long)st.misses,
        (unsigned long long)st.records, rss_at, rss_end, heap_at / 1024, heap_end / 1024);
    /* at most the cache, the documents of the operations in flight (a few per caller) and, in
     * checkpoint mode, those waiting for the next checkpoint (a 50 ms window) */
    CHECK(max_resident <= cache + 4 * THREADS);
    CHECK(st.resident_docs <= cache);
    CHECK(st.evictions + st.resident_docs == docs);
    CHECK_EQ(st.records, docs * 2);
    CHECK_EQ(st.misses, 0); /* settle found every promise in memory */
    CHECK(st.resident_bytes <= (cache + 1) * 1024);
#ifndef CAPSULE_SANITIZE
    /* every document resident (the old behaviour) grew ~1 KB each: 40,000+ docs = 40+ MB */
    CHECK(rss_at > 0 && rss_end - rss_at < 6 * 1024);
#endif
    /* the evicted ones read back the same */
    prom_result_t r;
    CHECK_OK(prom_promise_get(t.ps, "capsule/x/00000007", &r));
    CHECK_EQ(r.status, PROM_S_OK);
    CHECK_EQ(r.promise->state, PROM_REJECTED);
    CHECK_EQ(r.promise->value.len, 2);
    CHECK(memcmp(r.promise->value.data, "42", 2) == 0);
    CHECK_STREQ(prom_promise_tag(r.promise, "capsule:kind"), "exec");
    prom_result_clear(&r);
    /* reopen: only the live set (nothing pending) is loaded */
    create(t.ps, "pending-a", INT64_MAX / 2, NULL, 0, PROM_S_OK);
    create(t.ps, "pending-b", INT64_MAX / 2, NULL, 0, PROM_S_OK);
    ptest_close(&t);
    open_cache(&t, settled_cache);
    prom_store_stats(t.ps, &st);
    CHECK_EQ(st.resident_docs, 2);
    CHECK_EQ(st.misses, 0);
    CHECK_OK(prom_promise_get(t.ps, "capsule/x/00000008", &r));
    CHECK_EQ(r.promise->state, PROM_RESOLVED);
    prom_result_clear(&r);
    prom_store_stats(t.ps, &st);
    CHECK_EQ(st.misses, 1);
    ptest_fini(&t);
}

/* Evicted documents answer as before: get, idempotent create and settle, task get, the preload
 * of a task whose branch members were evicted, register_callback on an evicted awaited. */
static void test_same_answers(void)
{
    ptest_t t;
    ptest_init(&t, "prom-evict-same");
    open_cache(&t, -1);
    prom_result_t r;
    prom_kv_t ttags[] = {{"resonate:target", "poll://any@w"}, {"resonate:branch", "root"}};
    create(t.ps, "root", 5000000, ttags, 2, PROM_S_OK);
    for (int i = 0; i < 5; i++) {
        char id[16];
        snprintf(id, sizeof(id), "root.%d", i);
        prom_kv_t ctags[] = {{"resonate:branch", "root"}, {"resonate:scope", "global"}};
        create(t.ps, id, 5000000, ctags, 2, PROM_S_OK);
        if (i % 2 == 0)
            settle(t.ps, id, PROM_RESOLVED);
    }
    create(t.ps, "done", 5000000, ttags, 1, PROM_S_OK);
    settle(t.ps, "done", PROM_REJECTED_CANCELED);
    prom_store_stats_t st;
    CHECK_OK(prom_store_checkpoint(t.ps)); /* checkpoint mode: evictable once in prom.docs */
    prom_store_stats(t.ps, &st);
    CHECK_EQ(st.resident_docs, 3); /* root, root.1, root.3 */
    /* idempotent create of an evicted settled promise: the stored state, nothing written */
    create(t.ps, "root.0", 9, NULL, 0, PROM_S_OK);
    CHECK_OK(prom_promise_create(t.ps, &(prom_create_t){"root.2", 7, NULL, NULL, 0}, &r));
    CHECK_EQ(r.promise->state, PROM_RESOLVED);
    CHECK_EQ(r.promise->timeout_at, 5000000);
    CHECK_STREQ(prom_promise_tag(r.promise, "resonate:branch"), "root");
    prom_result_clear(&r);
    CHECK_OK(prom_promise_settle(t.ps, &(prom_settle_t){"root.4", PROM_REJECTED, NULL}, &r));
    CHECK_EQ(r.status, PROM_S_OK);
    CHECK_EQ(r.promise->state, PROM_RESOLVED);
    CHECK_EQ(r.promise->value.len, 2);
    prom_result_clear(&r);
    prom_store_stats_t st2;
    prom_store_stats(t.ps, &st2);
    CHECK_EQ(st2.records, st.records);
    CHECK(st2.misses >= 3);
    /* the task of an evicted promise */
    CHECK_OK(prom_task_get(t.ps, "done", &r));
    CHECK_EQ(r.status, PROM_S_OK);
    CHECK_EQ(r.task->state, PROM_TASK_FULFILLED);
    prom_result_clear(&r);
    CHECK_OK(prom_task_acquire(t.ps, "done", 0, "pid", 1000, &r));
    CHECK_EQ(r.status, PROM_S_CONFLICT);
    prom_result_clear(&r);
    /* preload: every member of the branch, evicted or resident, ordered by id */
    CHECK_OK(prom_task_acquire(t.ps, "root", 0, "pid", 100000, &r));
    CHECK_EQ(r.status, PROM_S_OK);
    CHECK_EQ(r.npromises, 5);
    for (size_t i = 0; i < r.npromises; i++) {
        char id[32];
        snprintf(id, sizeof(id), "root.%zu", i);
        CHECK_STREQ(r.promises[i].id, id);
        CHECK_EQ(r.promises[i].state, i % 2 ? PROM_PENDING : PROM_RESOLVED);
    }
    prom_result_clear(&r);
    /* suspend on an evicted settled awaited: 300 with the preload */
    const char *aw[] = {"root.1", "root.2"};
    CHECK_OK(prom_task_suspend(t.ps, "root", 1, aw, 2, &r));
    CHECK_EQ(r.status, PROM_S_PRELOAD);
    CHECK_EQ(r.npromises, 5);
    prom_result_clear(&r);
    /* suspend on a pending one, settle it: the resumed task dispatches again */
    CHECK_OK(prom_task_suspend(t.ps, "root", 1, aw, 1, &r));
    CHECK_EQ(r.status, PROM_S_OK);
    prom_result_clear(&r);
    settle(t.ps, "root.1", PROM_RESOLVED);
    CHECK_OK(prom_task_get(t.ps, "root", &r));
    CHECK_EQ(r.task->state, PROM_TASK_PENDING);
    CHECK_EQ(r.task->resumes, 1);
    prom_result_clear(&r);
    /* after a reopen the branch index is still complete (it lives in prom.branch) */
    ptest_close(&t);
    open_cache(&t, -1);
    prom_store_stats(t.ps, &st);
    CHECK_EQ(st.resident_docs, 2); /* root, root.3 */
    CHECK_OK(prom_task_acquire(t.ps, "root", 1, "pid", 100000, &r));
    CHECK_EQ(r.status, PROM_S_OK);
    CHECK_EQ(r.npromises, 5);
    CHECK_EQ(r.promises[1].state, PROM_RESOLVED);
    prom_result_clear(&r);
    ptest_fini(&t);
}

/* search by state and tags with cursors over a mix of resident and evicted documents: every page
 * equals the expected page computed here, for several limits */
static void test_search(int settled_cache)
{
    enum { N = 700 };
    ptest_t t;
    ptest_init(&t, "prom-evict-search");
    t.nosync = 1;
    open_cache(&t, settled_cache);
    static int state[N]; /* the final state of p%04d */
    static int tagged[N];
    uint64_t x = 12345;
    for (int i = 0; i < N; i++) {
        int j = (int)((uint64_t)i * 389 % N); /* creation order differs from id order */
        char id[16];
        snprintf(id, sizeof(id), "p%04d", j);
        tagged[j] = (int)(rnd(&x) % 3 == 0);
        prom_kv_t tags[] = {{"color", "red"}};
        create(t.ps, id, 5000000, tags, tagged[j] ? 1 : 0, PROM_S_OK);
        int k = (int)(rnd(&x) % 5);
        state[j] = k == 0   ? PROM_RESOLVED
                   : k == 1 ? PROM_REJECTED
                   : k == 2 ? PROM_REJECTED_CANCELED
                            : PROM_PENDING;
        if (state[j] != PROM_PENDING)
            settle(t.ps, id, (prom_state_t)state[j]);
    }
    prom_store_stats_t st;
    CHECK_OK(prom_store_checkpoint(t.ps));
    prom_store_stats(t.ps, &st);
    CHECK(settled_cache >= 0 || st.resident_docs < N / 2 + 10);
    int states[] = {-1, PROM_PENDING, PROM_RESOLVED, PROM_REJECTED, PROM_REJECTED_CANCELED};
    int limits[] = {1, 7, 100, 1000};
    for (int reopen = 0; reopen < 2; reopen++) {
        for (size_t si = 0; si < 5; si++)
            for (int tag = 0; tag < 2; tag++)
                for (size_t li = 0; li < 4; li++) {
                    prom_kv_t qt[] = {{"color", "red"}};
                    prom_search_t q = {states[si], qt, (size_t)tag, limits[li], NULL};
                    char *cursor = NULL;
                    int next = 0; /* the next expected index */
                    for (;;) {
                        prom_result_t r;
                        q.cursor = cursor;
                        CHECK_OK(prom_promise_search(t.ps, &q, &r));
                        CHECK_EQ(r.status, PROM_S_OK);
                        for (size_t i = 0; i < r.npromises; i++) {
                            for (;;) { /* the next matching id */
                                CHECK(next < N);
                                int s = state[next];
                                int ok =
                                    (!tag || tagged[next]) &&
                                    (q.state < 0 || s == q.state ||
                                     (q.state == PROM_REJECTED && (s == PROM_REJECTED_CANCELED)));
                                if (ok)
                                    break;
                                next++;
                            }
                            char id[16];
                            snprintf(id, sizeof(id), "p%04d", next);
                            CHECK_STREQ(r.promises[i].id, id);
                            CHECK_EQ((int)r.promises[i].state, state[next]);
                            next++;
                        }
                        cap_free(cursor);
                        cursor = r.cursor ? cap_strdup(r.cursor) : NULL;
                        CHECK(r.npromises == (size_t)limits[li] || !r.cursor);
                        prom_result_clear(&r);
                        if (!cursor)
                            break;
                    }
                    /* nothing matching is left after the last page */
                    for (; next < N; next++) {
                        int s = state[next];
                        CHECK(!((!tag || tagged[next]) &&
                                (q.state < 0 || s == q.state ||
                                 (q.state == PROM_REJECTED && s == PROM_REJECTED_CANCELED))));
                    }
                }
        ptest_close(&t);
        open_cache(&t, settled_cache);
    }
    ptest_fini(&t);
}

#define PHASE(call)                                                                                \
    do {                                                                                           \
        uint64_t t0_ = cap_now_ns();                                                               \
        call;                                                                                      \
        fprintf(stderr, "evict: %s %.2f s\n", #call, (double)(cap_now_ns() - t0_) / 1e9);          \
    } while (0)

int main(void)
{
    PHASE(test_smap());
    PHASE(test_same_answers());
    PHASE(test_search(-1));
    PHASE(test_search(0));
    PHASE(test_pairs(0, -1));
    PHASE(test_pairs(1, -1));
    PHASE(test_pairs(1, 0));
    fprintf(stderr, "promise evict: ok\n");
    return 0;
}
