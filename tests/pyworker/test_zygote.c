/*
 * test_zygote.c - workers forked by a zygote: warm-up code's names are inherited, each worker is
 * independent (own pid, own namespace, own limits), is reaped by this process (the subreaper) with
 * its real exit status, and a kill -9 of a forked worker is reported at once. Also the zygote
 * survives the death of its workers and keeps forking.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "pyworker.h"

static pyw_sync_run_t *run(pyw_sync_t *s, const char *src)
{
    pyw_sync_run_t *r = NULL;
    CHECK_OK(pyw_sync_execute(s, src, NULL, 0, 0, 30000, &r));
    if (r->status != PYW_STATUS_OK)
        fprintf(stderr, "cell: %s: %s\n%s\n", r->etype ? r->etype : "-", r->emsg ? r->emsg : "",
                r->traceback ? r->traceback : "");
    return r;
}

int main(void)
{
    pyw_zygote_t *z;
    pyw_zygote_options_t zo = {0};
    zo.warmup = "import json, asyncio\nWARM = 'warmed'\n";
    CHECK_OK(pyw_zygote_open(&zo, &z));
    int sub = 0;
    CHECK_EQ(prctl(PR_GET_CHILD_SUBREAPER, &sub, 0, 0, 0), 0);
    CHECK_EQ(sub, 1);

    pyw_sync_t *a, *b;
    CHECK_OK(pyw_sync_open(z, NULL, &a));
    CHECK_OK(pyw_sync_open(z, NULL, &b));
    int pa = pyw_worker_pid(pyw_sync_worker(a)), pb = pyw_worker_pid(pyw_sync_worker(b));
    CHECK(pa != pb && pa != pyw_zygote_pid(z) && pb != pyw_zygote_pid(z));

    pyw_sync_run_t *r = run(a, "WARM");
    CHECK_STREQ(r->repr, "'warmed'");
    pyw_sync_run_free(r);
    /* the worker is a real session: its own pid, asyncio, output, input */
    r = run(a, "import os\nmine = os.getpid()\nprint('pid', mine)\nawait asyncio.sleep(0)\nmine");
    char want[32];
    snprintf(want, sizeof want, "%d", pa);
    CHECK_STREQ(r->repr, want);
    CHECK(strstr(r->out, want));
    pyw_sync_run_free(r);
    r = run(a, "os.getppid()"); /* reparented to us (the subreaper), not the zygote */
    snprintf(want, sizeof want, "%d", (int)getpid());
    CHECK_STREQ(r->repr, want);
    pyw_sync_run_free(r);
    /* namespaces are independent */
    r = run(a, "only_in_a = 1");
    pyw_sync_run_free(r);
    r = run(b, "'only_in_a' in globals()");
    CHECK_STREQ(r->repr, "False");
    pyw_sync_run_free(r);

    /* a cancel works in a forked worker too */
    r = NULL;
    CHECK_OK(pyw_sync_execute(b, "import time\ntime.sleep(100)", NULL, 0, 50, 0, &r));
    CHECK_EQ(r->status, PYW_STATUS_CANCELLED);
    pyw_sync_run_free(r);

    /* kill -9 from outside: reported at once, with the signal */
    uint64_t t0 = cap_now_ns();
    CHECK_EQ(kill(pa, SIGKILL), 0);
    pyw_exit_t ex;
    CHECK_OK(pyw_sync_wait_exit(a, 5000, &ex));
    uint64_t ms = (cap_now_ns() - t0) / 1000000;
    fprintf(stderr, "kill -9 of a forked worker reported after %llu ms: %s\n",
            (unsigned long long)ms, ex.message);
    CHECK_EQ(ex.reason, PYW_EXIT_CRASHED);
    CHECK_EQ(ex.signal, SIGKILL);
    CHECK(ms < 1000);
    pyw_sync_close(a);

    /* limits apply to forked workers */
    pyw_options_t opt = {0};
#ifndef CAPSULE_SANITIZE /* RLIMIT_AS cannot apply to an ASan worker (shadow memory) */
    opt.limits.mem_bytes = 512ull << 20;
#endif
    opt.limits.nproc = 3;
    pyw_sync_t *c;
    CHECK_OK(pyw_sync_open(z, &opt, &c));
#ifndef CAPSULE_SANITIZE
    r = NULL;
    CHECK_OK(pyw_sync_execute(c, "x = bytearray(1 << 30)", NULL, 0, 0, 0, &r));
    CHECK_STREQ(r->emsg, "memory limit (512 MiB) exceeded");
    pyw_sync_run_free(r);
#endif
    r = NULL;
    CHECK_OK(pyw_sync_execute(c, "import os\nwhile True:\n    os.fork()", NULL, 0, 0, 0, &r));
    CHECK(r->emsg && strstr(r->emsg, "process limit (3) exceeded"));
    pyw_sync_run_free(r);

    /* the zygote keeps serving: forks in a burst (direct forks while no spare is ready) and
     * spaced out (each served by the pre-forked spare) */
    for (int i = 0; i < 10; i++) {
        if (i >= 5)
            usleep(30000);
        pyw_sync_t *d;
        CHECK_OK(pyw_sync_open(z, NULL, &d));
        r = run(d, "WARM + '!'");
        CHECK_STREQ(r->repr, "'warmed!'");
        pyw_sync_run_free(r);
        pyw_sync_close(d);
    }
    pyw_sync_close(c);
    pyw_sync_close(b);
    pyw_zygote_close(z);
    /* every worker, the zygote and its unused spare were reaped: no child is left */
    int st;
    CHECK_EQ(waitpid(-1, &st, WNOHANG), -1);
    CHECK_EQ(errno, ECHILD);

    /* a warm-up that fails is reported, not hidden */
    zo.warmup = "raise RuntimeError('bad warmup')";
    CHECK_ERR(pyw_zygote_open(&zo, &z), CAP_EWORKER);
    /* so is a warm-up that leaves a thread running (forking it would be unsafe) */
    zo.warmup = "import threading, time\n"
                "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()";
    CHECK_ERR(pyw_zygote_open(&zo, &z), CAP_EWORKER);
    printf("ok\n");
    return 0;
}
