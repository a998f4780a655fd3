/*
 * test_affinity.c - pyw_worker_set_cpu on real workers (cold and zygote-forked): a pin reaches
 * every thread of the worker (main, protocol, output reader) as the kernel reports it to the
 * cell itself, a thread a cell starts while pinned inherits the pin, an unpin returns every
 * thread (that one included) to the CPUs of this process's main thread, also for a worker forked
 * from a pinned thread, and bad CPUs are refused without leaving the worker half pinned.
 */
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cap.h"
#include "check.h"
#include "pyworker.h"

/* The distinct CPU sets of every thread of the worker, as the cell sees them: "[(1,)]". */
static const char *ALL_SETS = "import os\n"
                              "sorted({tuple(sorted(os.sched_getaffinity(int(t))))\n"
                              "        for t in os.listdir('/proc/self/task')})";

static char *eval(pyw_sync_t *s, const char *src)
{
    pyw_sync_run_t *r = NULL;
    CHECK_OK(pyw_sync_execute(s, src, NULL, 0, 0, 30000, &r));
    if (r->status != PYW_STATUS_OK)
        fprintf(stderr, "cell: %s: %s\n%s\n", r->etype ? r->etype : "-", r->emsg ? r->emsg : "",
                r->traceback ? r->traceback : "");
    CHECK_EQ(r->status, PYW_STATUS_OK);
    char *v = cap_strdup(r->repr ? r->repr : "");
    pyw_sync_run_free(r);
    return v;
}

static void expect(pyw_sync_t *s, const char *src, const char *want)
{
    char *v = eval(s, src);
    if (strcmp(v, want) != 0)
        fprintf(stderr, "cell %s: got %s, want %s\n", src, v, want);
    CHECK_STREQ(v, want);
    cap_free(v);
}

static void check_worker(pyw_sync_t *s, const char *full, int cpu)
{
    pyw_worker_t *w = pyw_sync_worker(s);
    char one[64], single[32];
    snprintf(one, sizeof one, "[(%d,)]", cpu);
    snprintf(single, sizeof single, "[%d]", cpu);
    CHECK_EQ(pyw_worker_cpu(w), -1);
    expect(s, ALL_SETS, full);
    /* pinned: all three threads */
    CHECK_OK(pyw_worker_set_cpu(w, cpu));
    CHECK_EQ(pyw_worker_cpu(w), cpu);
    CHECK_OK(pyw_worker_set_cpu(w, cpu)); /* again: nothing to do */
    expect(s, ALL_SETS, one);
    expect(s, "len(os.listdir('/proc/self/task'))", "3");
    /* a thread started by a cell inherits the pin */
    expect(s,
           "import threading\nev = threading.Event()\nth = threading.Thread(target=ev.wait)\n"
           "th.start()\nsorted(os.sched_getaffinity(th.native_id))",
           single);
    /* unpinned: every thread, the cell's thread included */
    CHECK_OK(pyw_worker_set_cpu(w, -1));
    CHECK_EQ(pyw_worker_cpu(w), -1);
    expect(s, ALL_SETS, full);
    expect(s, "ev.set()\nth.join()\nth.is_alive()", "False");
    /* refused: out of range, or a CPU outside the process's set; nothing stays pinned */
    CHECK_ERR(pyw_worker_set_cpu(w, -2), CAP_EINVAL);
    CHECK_ERR(pyw_worker_set_cpu(w, 1 << 20), CAP_EINVAL);
    CHECK_ERR(pyw_worker_set_cpu(w, 1023), CAP_EINVAL);
    CHECK_EQ(pyw_worker_cpu(w), -1);
    expect(s, ALL_SETS, full);
}

/* A cold worker started by a thread pinned to one CPU: it inherits the pin. */
static void *open_pinned(void *arg)
{
    unsigned long one[16] = {1ul};
    CHECK_EQ(syscall(SYS_sched_setaffinity, 0, sizeof one, one), 0);
    CHECK_OK(pyw_sync_open(NULL, NULL, (pyw_sync_t **)arg));
    return NULL;
}

int main(void)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    pyw_sync_t *s;
    CHECK_OK(pyw_sync_open(NULL, NULL, &s));
    char *full = eval(s, "import os\n[tuple(sorted(os.sched_getaffinity(0)))]");
    if (ncpu < 2 || strchr(full, ',') == NULL || ncpu >= 1023) {
        fprintf(stderr, "affinity: skipped (%ld CPUs, worker mask %s)\n", ncpu, full);
        cap_free(full);
        pyw_sync_close(s);
        return 0;
    }
    int last = (int)ncpu - 1;
    check_worker(s, full, last);
    /* after the worker is gone: refused */
    pyw_worker_t *w = pyw_sync_worker(s);
    CHECK_EQ(kill(pyw_worker_pid(w), SIGKILL), 0);
    pyw_exit_t ex;
    CHECK_OK(pyw_sync_wait_exit(s, 5000, &ex));
    CHECK_ERR(pyw_worker_set_cpu(w, 0), CAP_ECLOSED);
    pyw_sync_close(s);

    /* a worker that inherited a pin: unknown placement until set, then unpinned for real */
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, open_pinned, &s), 0);
    CHECK_EQ(pthread_join(th, NULL), 0);
    expect(s, ALL_SETS, "[(0,)]");
    CHECK_EQ(pyw_worker_cpu(pyw_sync_worker(s)), -1);
    CHECK_OK(pyw_worker_set_cpu(pyw_sync_worker(s), -1));
    expect(s, ALL_SETS, full);
    pyw_sync_close(s);

    /* a zygote-forked worker */
    pyw_zygote_t *z;
    CHECK_OK(pyw_zygote_open(NULL, &z));
    CHECK_OK(pyw_sync_open(z, NULL, &s));
    check_worker(s, full, 0);
    pyw_sync_close(s);
    pyw_zygote_close(z);
    cap_free(full);
    fprintf(stderr, "affinity: ok\n");
    return 0;
}
