/*
 * eng_test.h - helpers shared by the engine tests: an engine on a fresh (or existing) data
 * directory with real workers, and short-hands for running cells.
 */
#ifndef ENG_TEST_H
#define ENG_TEST_H

#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "capsule.h"
#include "check.h"

/* The small engine of a test that sets options of its own: dir, 64 MiB map, one warm worker. */
static inline eng_opts_t etest_opts(const char *dir)
{
    eng_opts_t o = {0};
    o.dir = dir;
    o.map_size = 64u << 20;
    o.pool_idle = 1;
    return o;
}

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

/* Starts argv[0] (this test re-executed as a child) with its stdout on a pipe: returns the pipe's
 * read end, *pid the child. */
static inline int etest_child(char *const *argv, pid_t *pid)
{
    int fds[2];
    CHECK(pipe(fds) == 0);
    *pid = fork();
    CHECK(*pid >= 0);
    if (*pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(fds[1]);
    return fds[0];
}

/* One line from fd without its newline: 0, or -1 on EOF / timeout. */
static inline int etest_read_line(int fd, char *buf, size_t n, int timeout_ms)
{
    size_t l = 0;
    while (l + 1 < n) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, timeout_ms) <= 0)
            return -1;
        char c;
        if (read(fd, &c, 1) <= 0)
            return -1;
        if (c == '\n')
            break;
        buf[l++] = c;
    }
    buf[l] = 0;
    return 0;
}

/* Workers of a killed child are reparented here (the subreaper): collect them. */
static inline void etest_reap_orphans(void)
{
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

#endif
