/*
 * test_malformed.c - bad input on both sides of the protocol, with real processes:
 *   - raw bad bytes written at a real worker (short length, oversized frame, unknown type,
 *     truncated and over-long bodies, an input reply nobody asked for, a NUL in a cell, and a
 *     burst of random frames): each gets an ERROR frame, and the worker keeps serving;
 *   - a peer that is not a worker (writes garbage, exits at once, never answers): the client
 *     kills it and reports why; a missing executable is -ENOENT.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "check.h"
#include "pyworker.h"

static uv_loop_t g_loop;
static int g_errors, g_last_code, g_pongs, g_results, g_exited;
static pyw_exit_t g_exit;
static char g_exit_msg[256];

static void on_error(pyw_worker_t *w, uint64_t id, int code, const char *msg)
{
    (void)w;
    (void)id;
    (void)msg;
    g_errors++;
    g_last_code = code;
}
static void on_pong(pyw_worker_t *w, uint64_t id)
{
    (void)w;
    (void)id;
    g_pongs++;
}
static int g_last_status;
static void on_result(pyw_worker_t *w, const pyw_result_t *r)
{
    (void)w;
    g_last_status = r->status;
    g_results++;
}
static void on_exit_cb(pyw_worker_t *w, const pyw_exit_t *e)
{
    (void)w;
    g_exited = 1;
    g_exit = *e;
    snprintf(g_exit_msg, sizeof g_exit_msg, "%s", e->message);
}

static pyw_callbacks_t g_cb = {
    .on_error = on_error, .on_pong = on_pong, .on_result = on_result, .on_exit = on_exit_cb};

static void put32(uint8_t *p, uint32_t v)
{
    cap_put_le32(p, v);
}

/* Sends raw bytes and waits for one more ERROR frame, then checks the worker still answers. */
static void expect_error(pyw_worker_t *w, const void *raw, size_t n, int code)
{
    int before = g_errors;
    CHECK_OK(pyw_worker_send_raw(w, raw, n));
    while (g_errors == before && !g_exited)
        uv_run(&g_loop, UV_RUN_ONCE);
    CHECK(!g_exited);
    CHECK_EQ(g_last_code, code);
    int p = g_pongs;
    CHECK_OK(pyw_worker_ping(w, 77));
    while (g_pongs == p && !g_exited)
        uv_run(&g_loop, UV_RUN_ONCE);
    CHECK(!g_exited);
}

static void frame(uint8_t *buf, size_t *n, uint8_t type, uint64_t id, const void *body, size_t bl)
{
    put32(buf, (uint32_t)(9 + bl));
    buf[4] = type;
    cap_put_le64(buf + 5, id);
    memcpy(buf + 13, body, bl);
    *n = 13 + bl;
}

static void test_raw(void)
{
    pyw_options_t opt = {0};
    pyw_worker_t *w;
    uint8_t buf[8192];
    size_t n;
    opt.cb = &g_cb;
    opt.max_frame = 4096;
    CHECK_OK(pyw_worker_spawn(&g_loop, &opt, &w));
    while (!pyw_worker_is_ready(w))
        uv_run(&g_loop, UV_RUN_ONCE);

    /* length below the minimum: skipped, reported */
    uint8_t shortf[7] = {3, 0, 0, 0, 'a', 'b', 'c'};
    expect_error(w, shortf, sizeof shortf, CAP_EPROTO);
    /* oversized frame (limit 4096): skipped whole, reported */
    memset(buf, 'z', sizeof buf);
    put32(buf, 6000);
    expect_error(w, buf, 6004, CAP_ETOOBIG);
    /* unknown frame type */
    frame(buf, &n, 0x55, 1, "", 0);
    expect_error(w, buf, n, CAP_EPROTO);
    /* EXECUTE whose str length runs past the body */
    uint8_t body[64];
    put32(body, 0);        /* cell_id "" */
    put32(body + 4, 1000); /* source claims 1000 bytes */
    memcpy(body + 8, "2+2", 3);
    frame(buf, &n, 0x01, 5, body, 11);
    expect_error(w, buf, n, CAP_EPROTO);
    /* EXECUTE with trailing garbage */
    put32(body + 4, 3);
    memcpy(body + 11, "junk", 4);
    frame(buf, &n, 0x01, 6, body, 15);
    expect_error(w, buf, n, CAP_EPROTO);
    /* PING with a body */
    frame(buf, &n, 0x06, 7, "x", 1);
    expect_error(w, buf, n, CAP_EPROTO);
    /* an input reply nobody asked for */
    uint8_t ir[5] = {0, 0, 0, 0, 0};
    frame(buf, &n, 0x02, 8, ir, 5);
    expect_error(w, buf, n, CAP_ECONFLICT);
    /* PROMISE_REPLY (durable steps): a truncated body, a bad state, and one nobody asked for */
    uint8_t pr[17] = {1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    frame(buf, &n, 0x09, 8, pr, 9);
    expect_error(w, buf, n, CAP_EPROTO);
    pr[0] = 9; /* no such state */
    frame(buf, &n, 0x09, 8, pr, 17);
    expect_error(w, buf, n, CAP_EPROTO);
    pr[0] = 1;
    frame(buf, &n, 0x09, 8, pr, 17);
    expect_error(w, buf, n, CAP_ECONFLICT);
    /* a worker->client frame type sent to the worker */
    frame(buf, &n, 0x80, 9, "", 0);
    expect_error(w, buf, n, CAP_EPROTO);
    /* a cell with a NUL byte: the execution fails with an error, not a crash */
    int before = g_results;
    CHECK_OK(pyw_worker_execute(w, 10, NULL,
                                "1\0"
                                "2",
                                3, 0));
    while (g_results == before)
        uv_run(&g_loop, UV_RUN_ONCE);
    CHECK_EQ(g_last_code, CAP_EINVAL);
    /* an input reply for a running cell that asked for nothing: an error about that frame, and
     * the cell itself runs on to its own result */
    before = g_results;
    int errs = g_errors;
    const char *slow = "import time\ntime.sleep(0.2)\n'fine'";
    CHECK_OK(pyw_worker_execute(w, 20, NULL, slow, strlen(slow), 0));
    CHECK_OK(pyw_worker_input_reply(w, 20, "x", 1, 0));
    while (g_results == before)
        uv_run(&g_loop, UV_RUN_ONCE);
    CHECK_EQ(g_errors, errs + 1);
    CHECK_EQ(g_last_code, CAP_ECONFLICT);
    CHECK_EQ(g_last_status, PYW_STATUS_OK);
    /* a frame bigger than the limit is refused by the client before sending */
    char *big = malloc(8000);
    memset(big, ' ', 8000);
    CHECK_ERR(pyw_worker_execute(w, 11, NULL, big, 8000, 0), CAP_ETOOBIG);
    free(big);

    /* random frames (never SHUTDOWN): every one answered or ignored, the worker survives */
    srand(1234);
    for (int i = 0; i < 300; i++) {
        size_t bl = (size_t)(rand() % 40);
        uint8_t t;
        do
            t = (uint8_t)(rand() % 256);
        while (t == 0x07 || t == 0x01); /* no shutdown; no random code execution */
        for (size_t k = 0; k < bl; k++)
            body[k] = (uint8_t)rand();
        frame(buf, &n, t, 1000 + (uint64_t)i, body, bl);
        CHECK_OK(pyw_worker_send_raw(w, buf, n));
    }
    int p = g_pongs;
    CHECK_OK(pyw_worker_ping(w, 5));
    while (g_pongs == p && !g_exited)
        uv_run(&g_loop, UV_RUN_ONCE);
    CHECK(!g_exited);
    before = g_results;
    CHECK_OK(pyw_worker_execute(w, 12, NULL, "40 + 2", 6, 0));
    while (g_results == before && !g_exited)
        uv_run(&g_loop, UV_RUN_ONCE);
    CHECK(!g_exited);
    pyw_worker_close(w);
}

/* A fake peer from a shell script (not a mock of the worker: a real process that misbehaves). */
static void bad_peer(const char *dir, const char *name, const char *script, pyw_exit_reason_t want)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CHECK(f);
    fprintf(f, "#!/bin/sh\n%s\n", script);
    fclose(f);
    CHECK_EQ(chmod(path, 0755), 0);
    pyw_options_t opt = {0};
    pyw_worker_t *w;
    opt.cb = &g_cb;
    opt.worker_path = path;
    opt.start_timeout_ms = 500;
    g_exited = 0;
    CHECK_OK(pyw_worker_spawn(&g_loop, &opt, &w));
    while (!g_exited)
        uv_run(&g_loop, UV_RUN_ONCE);
    fprintf(stderr, "%s: reason %d: %s\n", name, g_exit.reason, g_exit_msg);
    CHECK_EQ(g_exit.reason, want);
    CHECK(!pyw_worker_is_ready(w));
    pyw_worker_close(w);
}

static void test_bad_peers(void)
{
    char *dir = check_tmpdir("pyw-malformed");
    bad_peer(dir, "garbage", "printf 'GARBAGE-GARBAGE-GARBAGE' >&3; exec sleep 30",
             PYW_EXIT_PROTOCOL);
    bad_peer(dir, "huge", "printf '\\377\\377\\377\\177' >&3; exec sleep 30", PYW_EXIT_PROTOCOL);
    bad_peer(dir, "exits", "exit 7", PYW_EXIT_START_FAILED);
    bad_peer(dir, "silent", "exec sleep 30", PYW_EXIT_START_FAILED);
    CHECK(strstr(g_exit_msg, "no READY"));
    pyw_options_t opt = {0};
    pyw_worker_t *w;
    char missing[512];
    snprintf(missing, sizeof missing, "%s/does-not-exist", dir);
    opt.worker_path = missing;
    CHECK_ERR(pyw_worker_spawn(&g_loop, &opt, &w), -ENOENT);
    opt.worker_path = NULL;
    opt.max_frame = 100; /* below the smallest frame limit */
    CHECK_ERR(pyw_worker_spawn(&g_loop, &opt, &w), CAP_EINVAL);
    check_rmtree(dir);
    free(dir);
}

/* Values bigger than a frame: a small max_frame (4 KiB) makes them easy to reach. Every result
 * still fits in a frame (texts are cut, an oversized delta is reported missing), so the worker is
 * never killed for what user code produced. */
static void test_big_values(void)
{
    pyw_options_t opt = {0};
    pyw_sync_t *s;
    pyw_sync_run_t *r;
    opt.max_frame = 4096;
    CHECK_OK(pyw_sync_open(NULL, &opt, &s));
    CHECK_OK(pyw_sync_execute(s, "'x' * 100000", NULL, 0, 0, 0, &r));
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK(strstr(r->repr, "characters cut]"));
    CHECK(strlen(r->repr) < 4096);
    CHECK(r->json == NULL); /* too long to send as JSON */
    pyw_sync_run_free(r);
    CHECK_OK(pyw_sync_execute(s, "raise ValueError('v' * 100000)", NULL, 0, 0, 0, &r));
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK(strstr(r->emsg, "characters cut]"));
    pyw_sync_run_free(r);
    /* a namespace value whose delta cannot fit: reported, not sent, the session goes on */
    CHECK_OK(pyw_sync_execute(s, "blob = bytes(range(256)) * 400", NULL, 0, 0, 0, &r));
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK(r->delta_error && strstr(r->delta_error, "exceeds the frame limit"));
    CHECK(r->delta_blob == NULL);
    pyw_sync_run_free(r);
    /* large output is split into frames that fit */
    CHECK_OK(pyw_sync_execute(s, "print('y' * 50000)", NULL, 0, 0, 0, &r));
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_EQ(strlen(r->out), 50001);
    pyw_sync_run_free(r);
    /* a source that is not UTF-8: a clear error */
    CHECK_OK(pyw_sync_execute(s, "x = '\xff\xfe'", NULL, 0, 0, 0, &r));
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK_STREQ(r->etype, "UnicodeDecodeError");
    pyw_sync_run_free(r);
    CHECK_OK(pyw_sync_execute(s, "len(blob)", NULL, 0, 0, 0, &r));
    CHECK_STREQ(r->repr, "102400");
    pyw_sync_run_free(r);
    pyw_sync_close(s);
}

int main(void)
{
    uv_loop_init(&g_loop);
    test_big_values();
    test_raw();
    test_bad_peers();
    while (uv_run(&g_loop, UV_RUN_DEFAULT))
        ;
    CHECK_OK(uv_loop_close(&g_loop));
    printf("ok\n");
    return 0;
}
