/*
 * test_io.c - streaming output and input through a real worker: stdout vs stderr ordering,
 * fd-level writes (os.write, a child process, C stdio), output interleaved with input prompts,
 * input() in plain, threaded and async cells, sys.stdin reads, EOF, and chunks arriving while the
 * cell still runs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "pyworker.h"

static pyw_sync_run_t *run_in(pyw_sync_t *s, const char *src, const char *const *in, size_t n)
{
    pyw_sync_run_t *r = NULL;
    CHECK_OK(pyw_sync_execute(s, src, in, n, 0, 0, &r));
    if (r->status != PYW_STATUS_OK)
        fprintf(stderr, "cell failed: %s: %s\n%s\n", r->etype ? r->etype : "?",
                r->emsg ? r->emsg : "", r->traceback ? r->traceback : "");
    return r;
}

static void test_ordering(pyw_sync_t *s)
{
    pyw_sync_run_t *r = run_in(s,
                               "import sys, os\n"
                               "print('one')\n"
                               "print('two', file=sys.stderr)\n"
                               "os.write(1, b'three\\n')\n"
                               "print('four')\n"
                               "os.write(2, b'five\\n')\n"
                               "sys.stdout.write('six\\n')\n",
                               NULL, 0);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->out, "one\nthree\nfour\nsix\n");
    CHECK_STREQ(r->err, "two\nfive\n");
    /* the transcript keeps the global order across both streams and both paths */
    const char *t = r->transcript;
    const char *order[] = {"one", "two", "three", "four", "five", "six"};
    for (size_t i = 0; i < 6; i++) {
        const char *p = strstr(t, order[i]);
        CHECK(p != NULL);
        t = p;
    }
    CHECK(strstr(r->transcript, "[2]two"));
    pyw_sync_run_free(r);

    /* a child process writing to the inherited fds, and sys.stdout.buffer */
    r = run_in(s,
               "import subprocess\n"
               "subprocess.run(['/bin/sh', '-c', 'echo from-child; echo child-err >&2'])\n"
               "sys.stdout.buffer.write(b'raw-bytes\\n')\n"
               "print('after')",
               NULL, 0);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->out, "from-child\nraw-bytes\nafter\n");
    CHECK_STREQ(r->err, "child-err\n");
    pyw_sync_run_free(r);

    /* a process forked by the cell: its print() goes through fd 1 and arrives; it never speaks
     * the protocol (only the worker sends the result) */
    r = run_in(s,
               "import os\npid = os.fork()\nif pid == 0:\n    print('from-fork-child')\n"
               "    sys.stdout.flush()\n    os._exit(0)\nos.waitpid(pid, 0)\nprint('parent')",
               NULL, 0);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK(strstr(r->out, "from-fork-child\n"));
    CHECK(strstr(r->out, "parent\n"));
    pyw_sync_run_free(r);
    /* and a forked child that finishes the cell instead of exiting is not taken for the worker */
    r = run_in(s, "import os\nchild = os.fork()\nif child:\n    os.waitpid(child, 0)\n'done'", NULL,
               0);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->repr, "'done'");
    pyw_sync_run_free(r);
    CHECK_OK(pyw_sync_ping(s));

    /* C-level stdio (ctypes printf + fflush via libc) arrives too */
    r = run_in(s,
               "import ctypes\nlibc = ctypes.CDLL(None)\n"
               "libc.printf(b'c-printf %d\\n', 42)\nlibc.fflush(None)\n",
               NULL, 0);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->out, "c-printf 42\n");
    pyw_sync_run_free(r);

    /* many lines arrive complete and in order */
    r = run_in(s, "for i in range(2000):\n    print(i)", NULL, 0);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    char *p = r->out;
    for (int i = 0; i < 2000; i++) {
        char want[16];
        int n = snprintf(want, sizeof want, "%d\n", i);
        CHECK(strncmp(p, want, (size_t)n) == 0);
        p += n;
    }
    CHECK(*p == 0);
    pyw_sync_run_free(r);
}

static void test_input(pyw_sync_t *s)
{
    const char *in[] = {"Ada", "42"};
    pyw_sync_run_t *r = run_in(s,
                               "print('before')\n"
                               "name = input('name? ')\n"
                               "print('hello', name)\n"
                               "n = int(input('n? '))\n"
                               "n * 2",
                               in, 2);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->repr, "84");
    CHECK_STREQ(r->transcript, "[1]before\n[in:name? ][1]hello Ada\n[in:n? ]");
    pyw_sync_run_free(r);

    /* EOF -> EOFError */
    r = run_in(s, "input('more? ')", NULL, 0);
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK_STREQ(r->etype, "EOFError");
    CHECK(strstr(r->transcript, "[in:more? ]"));
    pyw_sync_run_free(r);

    /* sys.stdin reads are input requests too; '' at EOF */
    const char *lines[] = {"l1", "l2", NULL};
    r = run_in(s, "import sys\n[sys.stdin.readline(), sys.stdin.readline(), sys.stdin.readline()]",
               lines, 3);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->repr, "['l1\\n', 'l2\\n', '']");
    pyw_sync_run_free(r);

    /* input() from another thread */
    const char *t_in[] = {"threaded"};
    r = run_in(s,
               "import threading\nbox = []\n"
               "th = threading.Thread(target=lambda: box.append(input('t? ')))\n"
               "th.start(); th.join()\nbox[0]",
               t_in, 1);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->repr, "'threaded'");
    CHECK(strstr(r->transcript, "[in:t? ]"));
    pyw_sync_run_free(r);

    /* input() in an async cell */
    const char *a_in[] = {"async-answer"};
    r = run_in(
        s, "import asyncio\nawait asyncio.sleep(0)\nv = input('a? ')\nawait asyncio.sleep(0)\nv",
        a_in, 1);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->repr, "'async-answer'");
    pyw_sync_run_free(r);

    /* getpass asks with the password flag and does not echo */
    const char *pw[] = {"secret"};
    r = run_in(s, "import getpass\ngetpass.getpass('pw: ')", pw, 1);
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->repr, "'secret'");
    pyw_sync_run_free(r);
}

/* Output chunks arrive while the cell still runs (not batched until the result). */
static int g_seen_chunk_before_result;
static int g_chunk, g_result, g_flushed_partial;
static uint64_t g_timer_chunk_at, g_timer_chunk_lag; /* the unflushed partial line */
static void on_output(pyw_worker_t *w, uint64_t id, int stream, const char *d, size_t n)
{
    (void)w;
    (void)id;
    (void)stream;
    if (n >= 5 && memcmp(d, "first", 5) == 0 && !g_result)
        g_chunk = 1;
    if (n == 7 && memcmp(d, "partial", 7) == 0 && !g_result)
        g_flushed_partial = 1; /* a line without newline, flushed by flush=True */
    if (n > 1 && n < 32 && d[0] == 't' && !g_result) {
        /* "t<monotonic ns>", no newline and no flush: the worker's partial-line timer sent it */
        char tmp[32];
        memcpy(tmp, d + 1, n - 1);
        tmp[n - 1] = 0;
        uint64_t now = cap_now_ns(), t = strtoull(tmp, NULL, 10);
        g_timer_chunk_at = now;
        g_timer_chunk_lag = now >= t ? now - t : 0;
    }
}
static void on_result(pyw_worker_t *w, const pyw_result_t *r)
{
    (void)w;
    CHECK_EQ(r->status, PYW_STATUS_OK);
    g_result = 1;
}

static void test_streaming(void)
{
    uv_loop_t loop;
    pyw_callbacks_t cb = {0};
    pyw_options_t opt = {0};
    pyw_worker_t *w;
    cb.on_output = on_output;
    cb.on_result = on_result;
    opt.cb = &cb;
    uv_loop_init(&loop);
    CHECK_OK(pyw_worker_spawn(&loop, &opt, &w));
    /* the cell ends only once the test has seen the unflushed partial line (it waits for a file
     * the test creates then), so every chunk checked came while it ran; the old bounds (first
     * line > 200 ms before the end, partial line under 150 ms late) were wall-clock guesses */
    char *dir = check_tmpdir("pyw-streaming"), go[4200], src[4600];
    snprintf(go, sizeof go, "%s/go", dir);
    snprintf(src, sizeof src,
             "import os, time, sys\nprint('first')\nprint('partial', end='', flush=True)\n"
             "sys.stdout.write('t%%d' %% time.monotonic_ns())\n"
             "while not os.path.exists('%s'):\n    time.sleep(0.005)\nprint('second')",
             go);
    CHECK_OK(pyw_worker_execute(w, 7, NULL, src, strlen(src), 0));
    uint64_t until = cap_now_ns() + 60000000000ull;
    while (!g_timer_chunk_at && !g_result) {
        CHECK(cap_now_ns() < until);
        uv_run(&loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    CHECK(!g_result);
    g_seen_chunk_before_result = g_chunk;
    FILE *f = fopen(go, "w");
    CHECK(f != NULL);
    fclose(f);
    while (!g_result)
        uv_run(&loop, UV_RUN_ONCE);
    fprintf(stderr, "partial line sent by the timer %.1f ms after its write\n",
            (double)g_timer_chunk_lag / 1e6);
    CHECK(g_seen_chunk_before_result);
    CHECK(g_flushed_partial);
    CHECK(g_timer_chunk_at != 0);
    check_rmtree(dir);
    cap_free(dir);
    pyw_worker_close(w);
    while (uv_run(&loop, UV_RUN_DEFAULT))
        ;
    CHECK_OK(uv_loop_close(&loop));
}

int main(void)
{
    pyw_sync_t *s;
    CHECK_OK(pyw_sync_open(NULL, NULL, &s));
    test_ordering(s);
    test_input(s);
    pyw_sync_close(s);
    test_streaming();
    printf("ok\n");
    return 0;
}
