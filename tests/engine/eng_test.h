/*
 * eng_test.h - helpers shared by the engine tests: an engine on a fresh (or existing) data
 * directory with real workers, and short-hands for running cells.
 */
#ifndef ENG_TEST_H
#define ENG_TEST_H

#include <stdio.h>
#include <string.h>

#include "capsule.h"
#include "check.h"

static inline eng_t *etest_open(const char *dir, int nosync)
{
    eng_opts_t o = {0};
    o.dir = dir;
    o.nosync = nosync;
    o.map_size = 64u << 20;
    o.pool_idle = 2;
    o.dur_threads = 4;
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    return e;
}

/* Runs code in sid (eid may be NULL) and returns the owned result. */
static inline eng_result_t *etest_run(eng_t *e, const char *sid, const char *eid, const char *code)
{
    eng_exec_req_t rq = {0};
    rq.sid = sid;
    rq.eid = eid;
    rq.code = code;
    eng_result_t *r = NULL;
    CHECK_OK(eng_execute_sync(e, &rq, NULL, 0, &r));
    return r;
}

/* Runs code and checks it succeeded with repr `repr` (NULL: no value). */
static inline void etest_expect(eng_t *e, const char *sid, const char *code, const char *repr)
{
    eng_result_t *r = etest_run(e, sid, NULL, code);
    if (r->status != ENG_ST_OK)
        fprintf(stderr, "cell %s failed: status %d err %d %s: %s\n%s\n", code, r->status, r->err,
                r->etype ? r->etype : "?", r->emsg ? r->emsg : "",
                r->traceback ? r->traceback : "");
    CHECK_EQ(r->status, ENG_ST_OK);
    if (repr)
        CHECK_STREQ(r->repr, repr);
    else
        CHECK(r->repr == NULL);
    eng_result_free(r);
}

#endif
