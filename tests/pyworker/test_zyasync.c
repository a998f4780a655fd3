/*
 * test_zyasync.c - asking a zygote for workers without waiting (pyw_zygote_request), collecting
 * them when its socket is readable (pyw_zygote_collect): several requests in flight are each
 * answered with a working worker of its own; a blocking spawn between a request and its
 * collection leaves that answer for collect; a zygote killed with requests in flight fails each
 * of them, once, and then reports itself gone; requests never collected are killed and reaped
 * by pyw_zygote_close; a zygote killed while it holds its spare leaves no zombie (the close
 * reaps the spare it named).
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "pyworker.h"

typedef struct {
    int ready, exited, results;
    char repr[64];
} seen_t;

static void on_ready(pyw_worker_t *w)
{
    ((seen_t *)pyw_worker_data(w))->ready = 1;
}

static void on_exit_(pyw_worker_t *w, const pyw_exit_t *e)
{
    (void)e;
    ((seen_t *)pyw_worker_data(w))->exited = 1;
}

static void on_result(pyw_worker_t *w, const pyw_result_t *r)
{
    seen_t *s = pyw_worker_data(w);
    snprintf(s->repr, sizeof s->repr, "%s", r->repr ? r->repr : "-");
    s->results++;
}

static const pyw_callbacks_t cbs = {
    .on_ready = on_ready, .on_exit = on_exit_, .on_result = on_result};

/* Collects one answer, waiting (poll on the zygote's socket) up to 60 s: its return code. */
static int collect_wait(pyw_zygote_t *z, uv_loop_t *loop, pyw_worker_t **w, uint64_t *req)
{
    uint64_t deadline = cap_now_ns() + 60000000000ull;
    for (;;) {
        int rc = pyw_zygote_collect(z, loop, w, req);
        if (rc != -EAGAIN)
            return rc;
        CHECK(cap_now_ns() < deadline);
        struct pollfd pf = {pyw_zygote_fd(z), POLLIN, 0};
        CHECK(poll(&pf, 1, 100) >= 0);
    }
}

/* Runs `code` in w (its loop) and checks the result's repr. */
static void expect(uv_loop_t *loop, pyw_worker_t *w, uint64_t id, const char *code,
                   const char *repr)
{
    seen_t *s = pyw_worker_data(w);
    int before = s->results;
    CHECK_OK(pyw_worker_execute(w, id, NULL, code, strlen(code), 0));
    uint64_t deadline = cap_now_ns() + 30000000000ull;
    while (s->results == before && !s->exited && cap_now_ns() < deadline)
        uv_run(loop, UV_RUN_ONCE);
    CHECK_EQ(s->results, before + 1);
    CHECK_STREQ(s->repr, repr);
}

int main(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    pyw_zygote_t *z;
    pyw_zygote_options_t zo = {0};
    zo.warmup = "WARM = 'warm'\n";
    CHECK_OK(pyw_zygote_open(&zo, &z));
    CHECK_EQ(pyw_zygote_pending(z), 0u);
    CHECK_EQ(pyw_zygote_collect(z, &loop, &(pyw_worker_t *){NULL}, NULL), -EAGAIN);

    /* three requests in flight, answered in any order, each its own worker */
    enum { N = 3 };
    seen_t seen[N] = {0};
    uint64_t ids[N];
    pyw_worker_t *ws[N] = {0};
    for (int i = 0; i < N; i++) {
        pyw_options_t o = {0};
        o.cb = &cbs;
        o.data = &seen[i];
        CHECK_OK(pyw_zygote_request(z, &o, &ids[i]));
    }
    CHECK_EQ(pyw_zygote_pending(z), (size_t)N);
    CHECK(ids[0] != ids[1] && ids[1] != ids[2]);
    for (int k = 0; k < N; k++) {
        pyw_worker_t *w = NULL;
        uint64_t req = 0;
        CHECK_OK(collect_wait(z, &loop, &w, &req));
        seen_t *s = pyw_worker_data(w);
        int i = (int)(s - seen);
        CHECK(i >= 0 && i < N && !ws[i]);
        CHECK_EQ(req, ids[i]);
        ws[i] = w;
    }
    CHECK_EQ(pyw_zygote_pending(z), 0u);
    for (int i = 0; i < N; i++) {
        char want[32];
        snprintf(want, sizeof want, "%d", pyw_worker_pid(ws[i]));
        expect(&loop, ws[i], 1, "import os\nos.getpid()", want);
        expect(&loop, ws[i], 2, "WARM", "'warm'");
    }

    /* a blocking spawn while a request is in flight: that answer stays for collect */
    seen_t sa = {0};
    pyw_options_t oa = {0};
    oa.cb = &cbs;
    oa.data = &sa;
    uint64_t ida;
    CHECK_OK(pyw_zygote_request(z, &oa, &ida));
    pyw_sync_t *sy;
    CHECK_OK(pyw_sync_open(z, NULL, &sy));
    pyw_sync_run_t *r = NULL;
    CHECK_OK(pyw_sync_execute(sy, "WARM * 2", NULL, 0, 0, 30000, &r));
    CHECK_STREQ(r->repr, "'warmwarm'");
    pyw_sync_run_free(r);
    pyw_sync_close(sy);
    CHECK_EQ(pyw_zygote_pending(z), 1u);
    pyw_worker_t *wa = NULL;
    uint64_t got = 0;
    CHECK_OK(collect_wait(z, &loop, &wa, &got));
    CHECK_EQ(got, ida);
    expect(&loop, wa, 1, "1 + 1", "2");
    pyw_worker_close(wa);

    /* requests never collected: pyw_zygote_close kills and reaps their workers */
    for (int i = 0; i < 2; i++)
        CHECK_OK(pyw_zygote_request(z, NULL, NULL));
    usleep(50000); /* answered (or not): either way nothing is left behind */
    for (int i = 0; i < N; i++)
        pyw_worker_close(ws[i]);
    pyw_zygote_close(z);
    while (uv_run(&loop, UV_RUN_NOWAIT))
        ;
    int st;
    CHECK_EQ(waitpid(-1, &st, WNOHANG), -1);
    CHECK_EQ(errno, ECHILD);

    /* the zygote killed with requests in flight: each is answered once, by a worker (forked
     * before the kill) or CAP_EWORKER; then the zygote is reported gone */
    CHECK_OK(pyw_zygote_open(&zo, &z));
    seen_t sk[2] = {0};
    for (int i = 0; i < 2; i++) {
        pyw_options_t o = {0};
        o.cb = &cbs;
        o.data = &sk[i];
        CHECK_OK(pyw_zygote_request(z, &o, NULL));
    }
    CHECK_EQ(kill(pyw_zygote_pid(z), SIGKILL), 0);
    int failed = 0;
    for (int i = 0; i < 2; i++) {
        pyw_worker_t *w = (pyw_worker_t *)&st; /* set to NULL on a failure */
        int rc = collect_wait(z, &loop, &w, NULL);
        if (rc == 0) {
            pyw_worker_close(w);
            continue;
        }
        CHECK_ERR(rc, CAP_EWORKER);
        CHECK(w == NULL);
        failed++;
    }
    fprintf(stderr, "zygote killed with 2 requests in flight: %d failed, %d answered\n", failed,
            2 - failed);
    CHECK_EQ(pyw_zygote_pending(z), 0u);
    pyw_worker_t *w = NULL;
    CHECK_ERR(collect_wait(z, &loop, &w, NULL), CAP_EWORKER);
    CHECK_EQ(pyw_zygote_fd(z), -1);
    CHECK_ERR(pyw_zygote_request(z, NULL, NULL), CAP_EWORKER);
    pyw_zygote_close(z);
    while (uv_run(&loop, UV_RUN_NOWAIT))
        ;
    /* a request whose worker was forked but not yet answered when the zygote died: that worker,
     * orphaned to us (subreaper), exits once its socket closes, but its pid never reached us
     * (the known gap in ARCHITECTURE.md): reap it here */
    uint64_t deadline = cap_now_ns() + 60000000000ull;
    while (waitpid(-1, &st, WNOHANG) >= 0 && cap_now_ns() < deadline)
        usleep(1000);
    CHECK_EQ(errno, ECHILD);

    /* the zygote killed while idle, holding a spare (SPARE named it: the first one before READY,
     * the next one after a hand-out and 5 ms of quiet): the spare, our child (subreaper), is
     * killed and reaped by pyw_zygote_close, not left a zombie. The kill waits until the SPARE
     * has been read (a fixed 200 ms was too short under ASan on a loaded machine: the spare was
     * killed unnamed, the known gap, and left a zombie) */
    for (int round = 0; round < 2; round++) {
        CHECK_OK(pyw_zygote_open(&zo, &z));
        CHECK(pyw_zygote_spare(z) > 0); /* named before READY */
        if (round == 1) {
            pyw_worker_t *w1 = NULL;
            int handed = pyw_zygote_spare(z);
            CHECK_OK(pyw_zygote_request(z, NULL, NULL));
            CHECK_OK(collect_wait(z, &loop, &w1, NULL));
            pyw_worker_close(w1);
            /* the zygote makes its next spare after 5 ms without requests */
            uint64_t until = cap_now_ns() + 60000000000ull;
            while (pyw_zygote_spare(z) == 0) {
                CHECK(cap_now_ns() < until);
                struct pollfd pf = {pyw_zygote_fd(z), POLLIN, 0};
                CHECK(poll(&pf, 1, 100) >= 0);
                pyw_worker_t *none = NULL;
                CHECK_ERR(pyw_zygote_collect(z, &loop, &none, NULL), -EAGAIN); /* reads SPARE */
            }
            CHECK(pyw_zygote_spare(z) != handed); /* a new spare */
        }
        CHECK_EQ(kill(pyw_zygote_pid(z), SIGKILL), 0);
        pyw_worker_t *none = NULL;
        CHECK_ERR(collect_wait(z, &loop, &none, NULL), CAP_EWORKER);
        pyw_zygote_close(z);
        while (uv_run(&loop, UV_RUN_NOWAIT))
            ;
        CHECK_EQ(waitpid(-1, &st, WNOHANG), -1);
        CHECK_EQ(errno, ECHILD);
        fprintf(stderr, "zygote killed idle (round %d): its spare reaped by the close\n", round);
    }
    CHECK_OK(uv_loop_close(&loop));
    printf("ok\n");
    return 0;
}
