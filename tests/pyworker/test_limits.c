/*
 * test_limits.c - per-worker resource limits on real workers (CI runs as root, so the process
 * limit must hold for root: a pids cgroup): a memory bomb, a fork bomb, a CPU spin, a file past
 * the size limit and too many open files each give an error naming the limit; the session lives
 * on after the recoverable ones; the CPU limit kills the worker and says so.
 */
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "pyworker.h"

static pyw_sync_run_t *run(pyw_sync_t *s, const char *src)
{
    pyw_sync_run_t *r = NULL;
    CHECK_OK(pyw_sync_execute(s, src, NULL, 0, 0, 30000, &r));
    fprintf(stderr, "  -> status %d %s: %s\n", r->status, r->etype ? r->etype : "-",
            r->emsg ? r->emsg : "-");
    return r;
}

static void test_memory(void)
{
    pyw_options_t opt = {0};
    pyw_sync_t *s;
    pyw_sync_run_t *r;
#ifdef CAPSULE_SANITIZE
    /* AddressSanitizer reserves terabytes of address space: RLIMIT_AS cannot apply to a
     * sanitized worker. The release build runs this part. */
    fprintf(stderr, "memory limit: not run under the sanitizers (RLIMIT_AS vs ASan shadow)\n");
    return;
#endif
    opt.limits.mem_bytes = 512ull << 20;
    CHECK_OK(pyw_sync_open(NULL, &opt, &s));
    r = run(s, "x = bytearray(1 << 30)");
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK_STREQ(r->etype, "MemoryError");
    CHECK_STREQ(r->emsg, "memory limit (512 MiB) exceeded");
    pyw_sync_run_free(r);
    /* a growing bomb */
    r = run(s, "hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))");
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK_STREQ(r->etype, "MemoryError");
    CHECK(strstr(r->emsg, "memory limit"));
    pyw_sync_run_free(r);
    r = run(s, "n = len(hog)\ndel hog\nn > 100");
    CHECK_EQ(r->status, PYW_STATUS_OK);
    CHECK_STREQ(r->repr, "True");
    pyw_sync_run_free(r);
    r = run(s, "y = bytearray(100 << 20)\nlen(y)"); /* memory is usable again */
    CHECK_STREQ(r->repr, "104857600");
    pyw_sync_run_free(r);
    pyw_sync_close(s);
}

static void test_fork_bomb(void)
{
    pyw_options_t opt = {0};
    pyw_sync_t *s;
    pyw_sync_run_t *r;
    opt.limits.nproc = 6;
    CHECK_OK(pyw_sync_open(NULL, &opt, &s));
    /* counted children: exactly the limit can be started */
    r = run(s, "import os, time\nkids = []\ntry:\n    while True:\n        pid = os.fork()\n"
               "        if pid == 0:\n            time.sleep(60)\n            os._exit(0)\n"
               "        kids.append(pid)\nfinally:\n    started = len(kids)\n");
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK_STREQ(r->etype, "BlockingIOError");
    CHECK(strstr(r->emsg, "process limit (6) exceeded"));
    pyw_sync_run_free(r);
    r = run(s, "started");
    CHECK_STREQ(r->repr, "6");
    pyw_sync_run_free(r);
    r = run(s,
            "import signal\nfor k in kids:\n    os.kill(k, signal.SIGKILL)\n    os.waitpid(k, 0)\n"
            "len(kids)");
    CHECK_STREQ(r->repr, "6");
    pyw_sync_run_free(r);
    /* the real thing: every process forks until the limit stops them all */
    r = run(s, "import os\nwhile True:\n    os.fork()");
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK(strstr(r->emsg, "process limit (6) exceeded"));
    pyw_sync_run_free(r);
    r = run(s, "'alive'");
    CHECK_STREQ(r->repr, "'alive'");
    pyw_sync_run_free(r);
    pyw_sync_close(s); /* the cgroup (and any process left in it) goes away here */
}

static void test_cpu(void)
{
    pyw_options_t opt = {0};
    pyw_sync_t *s;
    pyw_sync_run_t *r;
    opt.limits.cpu_seconds = 1;
    CHECK_OK(pyw_sync_open(NULL, &opt, &s));
    r = run(s, "while True: pass");
    CHECK_EQ(r->status, PYW_STATUS_DIED);
    CHECK(r->died);
    CHECK_EQ(r->exit.reason, PYW_EXIT_LIMIT);
    CHECK(strstr(r->exit.message, "CPU time limit (1 s) exceeded"));
    fprintf(stderr, "  exit: %s\n", r->exit.message);
    pyw_sync_run_free(r);
    pyw_sync_close(s);
}

static void test_files(void)
{
    pyw_options_t opt = {0};
    pyw_sync_t *s;
    pyw_sync_run_t *r;
    char *dir = check_tmpdir("pyw-limits");
    char src[512];
    opt.limits.fsize_bytes = 1 << 20;
    opt.limits.nofile = 64;
    CHECK_OK(pyw_sync_open(NULL, &opt, &s));
    snprintf(src, sizeof src,
             "with open('%s/big', 'wb') as f:\n    f.write(b'x' * (1 << 20))\n"
             "    f.write(b'y' * 4096)\n",
             dir);
    r = run(s, src);
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK(strstr(r->emsg, "file size limit (1048576 bytes) exceeded"));
    pyw_sync_run_free(r);
    snprintf(src, sizeof src, "import os\nos.path.getsize('%s/big')", dir);
    r = run(s, src);
    CHECK_STREQ(r->repr, "1048576");
    pyw_sync_run_free(r);
    snprintf(src, sizeof src, "fs = []\nwhile True:\n    fs.append(open('%s/big', 'rb'))", dir);
    r = run(s, src);
    CHECK_EQ(r->status, PYW_STATUS_ERROR);
    CHECK(strstr(r->emsg, "open files limit (64) exceeded"));
    pyw_sync_run_free(r);
    r = run(s, "n = len(fs)\nfor f in fs: f.close()\ndel fs\nn > 40");
    CHECK_STREQ(r->repr, "True");
    pyw_sync_run_free(r);
    pyw_sync_close(s);
    check_rmtree(dir);
    free(dir);
}

int main(void)
{
    test_memory();
    test_fork_bomb();
    test_cpu();
    test_files();
    printf("ok\n");
    return 0;
}
