/* rtest.c - see rtest.h. */
#include "rtest.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

char rt_out[1 << 20];

int rt_run(const char *const *args)
{
    int fds[2];
    CHECK_OK(pipe(fds));
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(REPLAY_BIN, (char *const *)args);
        _exit(127);
    }
    close(fds[1]);
    size_t n = 0;
    ssize_t r;
    while (n + 1 < sizeof rt_out && (r = read(fds[0], rt_out + n, sizeof rt_out - 1 - n)) > 0)
        n += (size_t)r;
    rt_out[n] = 0;
    close(fds[0]);
    if (getenv("RT_VERBOSE")) /* debugging: show what the tool printed */
        fprintf(stderr, "$ capsule-replay %s ...\n%s", args[1] ? args[1] : "", rt_out);
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st));
    return WEXITSTATUS(st);
}

size_t rt_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

uint64_t rt_stored_seq(const char *dir, uint64_t from, uint64_t *last)
{
    store_env_opts_t so = {.readonly = 1};
    store_env_t *env = NULL;
    store_txn_t *t = NULL;
    store_dbi_t dbi;
    store_cursor_t *c = NULL;
    uint8_t kb[8];
    store_val_t k = store_key_u64(kb, from), v;
    uint64_t got = 0;
    CHECK_OK(store_env_open(dir, &so, &env));
    CHECK_OK(store_txn_begin(env, 1, &t));
    CHECK_OK(store_dbi_open(t, "wal.log", 0, &dbi));
    CHECK_OK(store_cursor_open(t, dbi, &c));
    if (store_cursor_get(c, &k, &v, STORE_SET_RANGE) == 0)
        got = cap_get_be64(k.data);
    store_val_t lk, lv;
    CHECK_OK(store_cursor_get(c, &lk, &lv, STORE_LAST));
    *last = cap_get_be64(lk.data);
    store_cursor_close(c);
    store_txn_abort(t);
    store_env_close(env);
    return got;
}

void rt_damage(const char *dir, uint64_t seq, int flip)
{
    store_env_opts_t so = {0};
    store_env_t *env = NULL;
    store_txn_t *t = NULL;
    store_dbi_t dbi;
    uint8_t kb[8];
    store_val_t k = store_key_u64(kb, seq), v;
    CHECK_OK(store_env_open(dir, &so, &env));
    CHECK_OK(store_txn_begin(env, 0, &t));
    CHECK_OK(store_dbi_open(t, "wal.log", 0, &dbi));
    if (flip) {
        CHECK_OK(store_get(t, dbi, k, &v));
        uint8_t *copy = cap_memdup(v.data, v.len);
        copy[v.len - 1] ^= 0x5A;
        CHECK_OK(store_put(t, dbi, k, (store_val_t){copy, v.len}, 0));
        cap_free(copy);
    } else {
        CHECK_OK(store_del(t, dbi, k, NULL));
    }
    CHECK_OK(store_txn_commit(t));
    store_env_close(env);
}

void rt_cells(eng_t *e, const char *sid, int first, int n)
{
    for (int i = first; i < first + n; i++) {
        char code[64];
        snprintf(code, sizeof code, "v%d = %d * 2\nv%d", i, i, i);
        eng_exec_req_t rq = {.sid = sid, .code = code};
        eng_result_t *r = NULL;
        CHECK_OK(eng_execute_sync(e, &rq, NULL, 0, &r));
        CHECK_EQ(r->status, ENG_ST_OK);
        eng_result_free(r);
    }
}

char *rt_eval(eng_t *e, const char *sid, const char *code)
{
    eng_exec_req_t rq = {.sid = sid, .code = code};
    eng_result_t *r = NULL;
    CHECK_OK(eng_execute_sync(e, &rq, NULL, 0, &r));
    if (r->status != ENG_ST_OK)
        fprintf(stderr, "rt_eval %s: %s %s\n", code, r->etype ? r->etype : "",
                r->emsg ? r->emsg : "");
    CHECK_EQ(r->status, ENG_ST_OK);
    char *s = cap_strdup(r->repr ? r->repr : "");
    eng_result_free(r);
    return s;
}

void rt_killed_engine(const char *dir)
{
    int fds[2];
    CHECK_OK(pipe(fds));
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        eng_opts_t o = {.dir = dir, .map_size = 64u << 20, .pool_idle = 1};
        eng_t *e = NULL;
        CHECK_OK(eng_open(&o, &e));
        CHECK_OK(eng_session_open(e, "k", NULL, NULL));
        rt_cells(e, "k", 0, 3);
        CHECK(write(fds[1], "r", 1) == 1);
        for (int i = 3;; i++)
            rt_cells(e, "k", i, 1);
    }
    close(fds[1]);
    char b;
    CHECK(read(fds[0], &b, 1) == 1);
    usleep(150 * 1000);
    CHECK_OK(kill(pid, SIGKILL));
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    close(fds[0]);
    /* the killed engine's workers were reparented to us (subreaper): give them time to notice
     * and collect them */
    for (int i = 0; i < 50 && waitpid(-1, &st, WNOHANG) >= 0; i++)
        usleep(20 * 1000);
}
