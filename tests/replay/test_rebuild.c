/*
 * test_rebuild - `capsule-replay replay [--rerun]` (the real binary; it spawns its own cold
 * workers) on data directories written by a real engine: a session with functions, a class, a
 * set, input() with a recorded reply, a rolled-back failure and a checkpoint agrees on every path;
 * a session whose cell is not deterministic (random) differs under --rerun and the name is
 * printed; a delta changed behind the engine's back makes the chain path differ; usage errors.
 */
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>

#include "capsule.h"
#include "check.h"
#include "rtest.h"

static void cell(eng_t *e, const char *sid, const char *code, const char *input, eng_status_t want)
{
    eng_exec_req_t rq = {.sid = sid, .code = code};
    eng_result_t *r = NULL;
    const char *in[1] = {input};
    CHECK_OK(eng_execute_sync(e, &rq, input ? in : NULL, input ? 1 : 0, &r));
    CHECK_EQ(r->status, want);
    eng_result_free(r);
}

int main(void)
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    char *dir = check_tmpdir("replay-rebuild");
    eng_opts_t o = {.dir = dir, .map_size = 64u << 20, .pool_idle = 1};
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    CHECK_OK(eng_session_open(e, "good", NULL, NULL));
    cell(e, "good", "import math\ndef area(r):\n    return math.pi * r * r\n", NULL, ENG_ST_OK);
    cell(e, "good", "class P:\n    def __init__(self, n):\n        self.n = n\n", NULL, ENG_ST_OK);
    cell(e, "good", "tags = {'a', 'b', 'c'}\np = P(3)\nname = input('who? ')", "Ada", ENG_ST_OK);
    size_t bytes = 0;
    CHECK_OK(eng_checkpoint(e, "good", 0, &bytes));
    cell(e, "good", "1 / 0", NULL, ENG_ST_ERROR);
    cell(e, "good", "total = area(2) + p.n\nlines = [name] * 3", NULL, ENG_ST_OK);
    CHECK_OK(eng_session_open(e, "dice", NULL, NULL));
    cell(e, "dice", "import random\nroll = random.random()", NULL, ENG_ST_OK);
    cell(e, "dice", "fixed = 7", NULL, ENG_ST_OK);

    /* while the engine holds the dir */
    CHECK_EQ(RT_RUN("replay", "--rerun", dir, "good"), 0);
    CHECK(strstr(rt_out, "OK: 0 difference(s)"));
    CHECK(strstr(rt_out, "rerun: 4 committed execution(s) re-run"));
    CHECK(strstr(rt_out, "chain: all 4 deltas without the checkpoint"));
    eng_close(e);
    CHECK_EQ(RT_RUN("replay", dir, "good"), 0);
    CHECK_EQ(RT_RUN("replay", dir, "dice"), 0); /* restore alone agrees */
    CHECK(strstr(rt_out, "no checkpoint"));
    CHECK_EQ(RT_RUN("replay", "--rerun", dir, "dice"), 1);
    CHECK(strstr(rt_out, "rerun: roll: value differs"));
    CHECK(!strstr(rt_out, "fixed:"));

    /* change delta #2 of "good" (the class) to the delta of #1: the chain path disagrees */
    store_env_opts_t so = {.map_size = 64u << 20};
    store_env_t *env = NULL;
    store_txn_t *t = NULL;
    store_dbi_t deltas;
    CHECK_OK(store_env_open(dir, &so, &env));
    CHECK_OK(store_txn_begin(env, 0, &t));
    CHECK_OK(store_dbi_open(t, "eng.deltas", 0, &deltas));
    uint8_t k1[13] = {'g', 'o', 'o', 'd', 0}, k2[13] = {'g', 'o', 'o', 'd', 0};
    cap_put_be64(k1 + 5, 1);
    cap_put_be64(k2 + 5, 2);
    store_val_t v1;
    CHECK_OK(store_get(t, deltas, (store_val_t){k1, sizeof k1}, &v1));
    uint8_t *copy = cap_memdup(v1.data, v1.len);
    CHECK_OK(store_put(t, deltas, (store_val_t){k2, sizeof k2}, (store_val_t){copy, v1.len}, 0));
    cap_free(copy);
    CHECK_OK(store_txn_commit(t));
    store_env_close(env);
    CHECK_EQ(RT_RUN("replay", dir, "good"), 1);
    CHECK(strstr(rt_out, "chain: P: missing"));

    CHECK_EQ(RT_RUN("replay", dir), 64);
    CHECK_EQ(RT_RUN("replay", "--fast", dir, "good"), 64);
    CHECK_EQ(RT_RUN("replay", dir, "bad id!"), 64);
    CHECK_EQ(RT_RUN("replay", "/dev/null/nowhere", "good"), 2);
    check_rmtree(dir);
    cap_free(dir);
    printf("replay rebuild: ok\n");
    return 0;
}
