/*
 * test_verify - `capsule-replay verify` on data directories written by real engine runs: a clean
 * dir (closed, and while the engine still holds it open), a dir left by kill -9 of an engine in
 * the middle of executions, a dir with bytes flipped in one stored record (verify must name that
 * seq), a dir with a record deleted (a sequence gap), and directories that cannot be opened.
 * The tool runs as a separate process (the real binary), its stdout captured.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "capsule.h"
#include "check.h"
#include "rtest.h"
#include "store.h"

/* Runs `capsule-replay verify [--deep] dir`; returns its exit status, its stdout in out. */
static int run_verify(const char *dir, int deep, char *out, size_t cap)
{
    int st = deep ? RT_RUN("verify", "--deep", dir) : RT_RUN("verify", dir);
    size_t n = strnlen(rt_out, cap - 1);
    memcpy(out, rt_out, n);
    out[n] = 0;
    return st;
}

static void test_clean_live_and_damaged(void)
{
    char *dir = check_tmpdir("replay-clean");
    static char out[1 << 16];
    eng_opts_t o = {.dir = dir, .map_size = 64u << 20, .pool_idle = 1};
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    CHECK_OK(eng_session_open(e, "s1", NULL, NULL));
    rt_cells(e, "s1", 0, 20);
    /* the engine still holds the dir: a read-only verify is safe and sees a clean log */
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 0);
    CHECK(strstr(out, "OK: 0 problem(s)"));
    CHECK(strstr(out, "kind 0x40")); /* the engine's FINISH records were read */
    eng_close(e);
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 0);
    CHECK_EQ(run_verify(dir, 1, out, sizeof out), 0); /* every body decodes */
    CHECK(strstr(out, "bodies decoded: yes"));
    CHECK(strstr(out, "OK: 0 problem(s)"));

    /* flip a byte in a record in the middle: verify names exactly that seq */
    uint64_t last = 0, first = rt_stored_seq(dir, 0, &last);
    CHECK(first > 0 && last > first + 10);
    uint64_t bad = rt_stored_seq(dir, (first + last) / 2, &last);
    rt_damage(dir, bad, 1);
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 1);
    char want[96];
    snprintf(want, sizeof want, "seq %llu: damaged record", (unsigned long long)bad);
    CHECK(strstr(out, want));
    CHECK(strstr(out, "damaged records: 1, sequence gaps: 0"));
    CHECK_EQ(run_verify(dir, 1, out, sizeof out), 1);
    CHECK(strstr(out, want));

    /* delete a later record: a gap, named by the seq after it */
    uint64_t gone = rt_stored_seq(dir, bad + 3, &last);
    CHECK(gone > 0 && gone < last);
    rt_damage(dir, gone, 0);
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 1);
    snprintf(want, sizeof want, "seq %llu: gap: 1 record(s) missing after seq %llu",
             (unsigned long long)gone + 1, (unsigned long long)gone - 1);
    CHECK(strstr(out, want));
    CHECK(strstr(out, "damaged records: 1, sequence gaps: 1"));
    CHECK(strstr(out, "PROBLEMS: "));
    check_rmtree(dir);
    cap_free(dir);
}

/* Derived tables changed behind the log's back: verify names the row and the record's seq. */
static void test_derived_mismatch(void)
{
    char *dir = check_tmpdir("replay-derived");
    static char out[1 << 16];
    eng_opts_t o = {.dir = dir, .map_size = 64u << 20, .pool_idle = 1};
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    CHECK_OK(eng_session_open(e, "d1", NULL, NULL));
    rt_cells(e, "d1", 0, 5);
    eng_close(e);
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 0);
    CHECK(strstr(out, "rows cross-checked"));
    /* change the delta of ordinal 3, delete the session's promise document, add a stray result */
    store_env_opts_t so = {.map_size = 64u << 20};
    store_env_t *env = NULL;
    store_txn_t *t = NULL;
    store_dbi_t deltas, docs, results;
    CHECK_OK(store_env_open(dir, &so, &env));
    CHECK_OK(store_txn_begin(env, 0, &t));
    CHECK_OK(store_dbi_open(t, "eng.deltas", 0, &deltas));
    CHECK_OK(store_dbi_open(t, "prom.docs", 0, &docs));
    CHECK_OK(store_dbi_open(t, "eng.results", 0, &results));
    uint8_t k[11] = {'d', '1', 0};
    cap_put_be64(k + 3, 3);
    CHECK_OK(store_put(t, deltas, (store_val_t){k, sizeof k}, (store_val_t){"xx", 2}, 0));
    CHECK_OK(store_del(t, docs, (store_val_t){"capsule/s/d1", 12}, NULL));
    CHECK_OK(store_put(t, results, (store_val_t){"ghost", 5}, (store_val_t){"?", 1}, 0));
    CHECK_OK(store_txn_commit(t));
    store_env_close(env);
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 1);
    CHECK(strstr(out, ": eng.deltas[d1#3] differs from the record"));
    CHECK(strstr(out, "prom.docs[capsule/s/d1] missing"));
    CHECK(strstr(out, "seq -: eng.results[ghost] has no record that wrote it"));
    CHECK(strstr(out, "PROBLEMS: 3 problem(s)"));
    check_rmtree(dir);
    cap_free(dir);
}

/* An engine kill -9'd while executing: the log it leaves is clean (every frame whole). */
static void test_killed_engine(void)
{
    char *dir = check_tmpdir("replay-kill");
    static char out[1 << 16];
    rt_killed_engine(dir);
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 0);
    CHECK(strstr(out, "OK: 0 problem(s)"));
    check_rmtree(dir);
    cap_free(dir);
}

static void test_cannot_open(void)
{
    static char out[4096];
    /* not a directory at all */
    CHECK_EQ(run_verify("/dev/null/nowhere", 0, out, sizeof out), 2);
    /* bad usage: exit 64, nothing opened */
    int st = system(REPLAY_BIN " verify 2>/dev/null");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 64);
    st = system(REPLAY_BIN " verify --deep 2>/dev/null");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 64);
    st = system(REPLAY_BIN " frobnicate /tmp 2>/dev/null");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 64);
    /* a directory with no log in it */
    char *dir = check_tmpdir("replay-empty");
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 2);
    check_rmtree(dir);
    cap_free(dir);
    /* a data file that is not LMDB */
    dir = check_tmpdir("replay-junk");
    char path[512];
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    FILE *f = fopen(path, "w");
    CHECK(f);
    for (int i = 0; i < 4096; i++)
        fputc('x', f);
    fclose(f);
    CHECK_EQ(run_verify(dir, 0, out, sizeof out), 2);
    check_rmtree(dir);
    cap_free(dir);
}

int main(void)
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    test_cannot_open();
    test_clean_live_and_damaged();
    test_killed_engine();
    test_derived_mismatch();
    printf("replay verify: ok\n");
    return 0;
}
