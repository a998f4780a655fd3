/*
 * prom_test.h - helpers shared by the promise tests: a fake clock and opening a promise store on a
 * fresh (or existing) LMDB env with the real wal.
 */
#ifndef PROM_TEST_H
#define PROM_TEST_H

#include <stdlib.h>

#include "check.h"
#include "promise.h"

typedef struct fake_clock {
    int64_t now;
} fake_clock_t;

static inline int64_t fake_clock_read(void *arg)
{
    return ((fake_clock_t *)arg)->now;
}

typedef struct ptest {
    char *dir;
    store_env_t *env;
    prom_store_t *ps;
    fake_clock_t clock;
    prom_lineage_t lineage;
    int nosync;
    int64_t retry_ms;
    int settled_cache; /* prom_opts_t.settled_cache (PROM_SETTLED_CACHE overrides) */
} ptest_t;

static inline void ptest_open(ptest_t *t)
{
    store_env_opts_t eo = {0};
    eo.nosync = t->nosync;
    eo.map_size = 64u << 20;
    CHECK_OK(store_env_open(t->dir, &eo, &t->env));
    prom_opts_t po = {0};
    po.clock = fake_clock_read;
    po.clock_arg = &t->clock;
    po.lineage = t->lineage;
    po.retry_ms = t->retry_ms;
    /* PROM_CHECKPOINT_MS: -1 selects the tables-in-each-commit mode (ctest runs the model, crash
     * and durable tests in both modes); unset: the default (checkpoint mode) */
    const char *ck = getenv("PROM_CHECKPOINT_MS");
    po.checkpoint_ms = ck ? atoi(ck) : 0;
    /* PROM_SETTLED_CACHE=-1 evicts every settled document as soon as it is durable (ctest runs
     * the model, crash and durable tests so as well) */
    const char *sc = getenv("PROM_SETTLED_CACHE");
    po.settled_cache = sc ? atoi(sc) : t->settled_cache;
    po.wal.durability = t->nosync ? WAL_NOSYNC : WAL_SYNC;
    CHECK_OK(prom_store_open(t->env, &po, &t->ps));
}

static inline void ptest_close(ptest_t *t)
{
    prom_store_close(t->ps);
    store_env_close(t->env);
    t->ps = NULL;
    t->env = NULL;
}

static inline void ptest_reopen(ptest_t *t)
{
    ptest_close(t);
    ptest_open(t);
}

static inline void ptest_init(ptest_t *t, const char *tag)
{
    memset(t, 0, sizeof(*t));
    t->dir = check_tmpdir(tag);
    t->clock.now = 1000000;
}

static inline void ptest_fini(ptest_t *t)
{
    ptest_close(t);
    check_rmtree(t->dir);
    cap_free(t->dir);
}

#endif
