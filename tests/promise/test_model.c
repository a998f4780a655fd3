/*
 * test_model.c - model-based test: many random operations (with a random, forward-moving clock,
 * random timer ticks and outbox drains) against the real store (real LMDB through the real wal),
 * each answer checked against the reference model in model.h; at a few points the store is
 * closed, reopened and compared with the model in full (promises, tasks, outbox, next deadline).
 * PROM_MODEL_OPS overrides the operation count (default 120000); PROM_MODEL_SEED the seed.
 */
#include "model.h"

/* Adds the store's counters (since its open) to *sum; resident = the store's current count. */
static void stats_add(prom_store_stats_t *sum, prom_store_t *ps)
{
    prom_store_stats_t st;
    prom_store_stats(ps, &st);
    sum->resident_docs = st.resident_docs;
    sum->evictions += st.evictions;
    sum->misses += st.misses;
}

int main(void)
{
    const char *e = getenv("PROM_MODEL_OPS");
#ifdef CAPSULE_SANITIZE
    long nops = e ? atol(e) : 40000; /* the sanitizer build is ~4x slower; the release build
                                        runs the full count */
#else
    long nops = e ? atol(e) : 120000;
#endif
    e = getenv("PROM_MODEL_SEED");
    uint64_t seed = e ? strtoull(e, NULL, 0) : 0x9e3779b97f4a7c15ull;
    uint64_t rng[1] = {seed};
    ptest_t t;
    ptest_init(&t, "prom-model");
    t.nosync = 1; /* speed; durability across kill -9 is test_crash's job */
    t.retry_ms = M_RETRY;
    ptest_open(&t);
    model_t *m = calloc(1, sizeof(*m));
    m->now = t.clock.now;
    long counts[20] = {0};
    prom_store_stats_t sum = {0};
    const char *sc = getenv("PROM_SETTLED_CACHE");
    int forced = sc && atoi(sc) < 0;
    for (long n = 0; n < nops; n++) {
        counts[m_step(m, t.ps, &t.clock, rng)]++;
        /* forced eviction in checkpoint mode: documents leave memory once a checkpoint holds
         * them; a checkpoint every 100 ops makes that independent of the machine's speed */
        if (forced && n % 100 == 99)
            CHECK_OK(prom_store_checkpoint(t.ps));
        if (n % 30000 == 29999) {
            stats_add(&sum, t.ps);
            ptest_reopen(&t);
            m_compare_all(m, t.ps);
        }
    }
    m_compare_all(m, t.ps);
    stats_add(&sum, t.ps);
    fprintf(stderr,
            "promise model: resident %llu docs at the end, %llu evictions, %llu misses "
            "served from prom.docs\n",
            (unsigned long long)sum.resident_docs, (unsigned long long)sum.evictions,
            (unsigned long long)sum.misses);
    if (forced) /* answers really came from prom.docs */
        CHECK(sum.evictions > (uint64_t)nops / 20 && sum.misses > (uint64_t)nops / 20);
    ptest_reopen(&t);
    m_compare_all(m, t.ps);
    fprintf(stderr, "promise model: %ld operations (seed %#llx) matched the model; per op:", nops,
            (unsigned long long)seed);
    for (int k = 0; k < 20; k++)
        fprintf(stderr, " %ld", counts[k]);
    fprintf(stderr, "\n");
    free(m->q);
    free(m);
    ptest_fini(&t);
    return 0;
}
