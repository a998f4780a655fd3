/*
 * client.c - the engine-side client of one worker, on libuv.
 *
 * A pyw_worker owns: our end of the worker's socket (a uv_pipe_t), a pidfd polled for the
 * worker's exit (uv_poll_t), a start timer, a reap timer, and one entry (with its own timer) per
 * execution in flight.
 * Invariants:
 *   - on_result is called exactly once per accepted execute; on_exit exactly once, after every
 *     pending execution was failed with PYW_STATUS_DIED (unless pyw_worker_close came first);
 *   - frames from the worker are fully bounds-checked; a malformed or unknown frame is a protocol
 *     violation: the worker is killed and reported with PYW_EXIT_PROTOCOL;
 *   - memory is released only after every handle's close callback ran (w->open_handles == 0).
 */
#include "pyw_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cap.h"

_Static_assert(PYW_PROTOCOL_VERSION == 1, "pyworker.h and pyw_proto.h disagree");

typedef struct pyw_exec {
    struct pyw_exec *next;
    pyw_worker_t *w;
    uint64_t id;
    uv_timer_t timer;
    uint32_t timeout_ms;
    int cancelled, timed_out, timer_on;
    /* the DELTA frame that precedes the RESULT */
    uint8_t *delta_frame;
    size_t delta_len;
} pyw_exec_t;

struct pyw_worker {
    uv_loop_t *loop;
    uv_pipe_t pipe;
    uv_poll_t pidpoll;
    uv_timer_t start_timer;
    uv_timer_t reap_timer;
    uv_timer_t hb_timer;
    uint32_t hb_ms;
    uint64_t hb_last_ns; /* last PONG (or READY) */
    uint64_t hb_seq;
    int open_handles;
    int pidfd;
    pid_t pid;
    pyw_callbacks_t cb;
    void *data;
    uint32_t max_frame, grace_ms;
    pyw_limits_t limits;
    char cgroup[256];
    uint8_t *rbuf;
    size_t rlen, rcap;
    int ready, exited, closed, shutdown_sent, eof, reading, poll_on;
    pyw_exit_reason_t kill_reason; /* why we killed it (0 = we did not) */
    int killed;
    char kill_note[160];
    char *pyver;
    pyw_exec_t *execs;
    int reap_tries;
    /* CPU affinity (pyw_worker_set_cpu): the worker's own threads as listed at READY, the mask
     * they started with, and the CPU they are pinned to (-1: none) */
    pid_t tids[PYW_OWN_THREADS];
    int ntids, cpu; /* cpu: -2 = inherited, unknown */
    unsigned long mask0[PYW_MASK_WORDS];
    size_t mask0_len;
};

static void worker_handle_exit(pyw_worker_t *w, int status);
static void affinity_learn(pyw_worker_t *w);
static void on_hb_timer(uv_timer_t *t);
#define HB_ID_BIT (1ull << 63)
static void worker_kill_for(pyw_worker_t *w, pyw_exit_reason_t why, const char *note);

const char *pyw__worker_path(const char *opt_path)
{
    const char *env = getenv("CAPSULE_PYWORKER");
    if (opt_path && *opt_path)
        return opt_path;
    if (env && *env)
        return env;
    return PYW_DEFAULT_WORKER_PATH;
}

/* ---- cgroups (the process limit) ---- */

static int file_write(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    int rc = 0;
    if (fd < 0)
        return -errno;
    if (write(fd, s, strlen(s)) < 0)
        rc = -errno;
    close(fd);
    return rc;
}

static int cgroup_base(char *out, size_t n)
{
    static const char *v1 = "/sys/fs/cgroup/pids";
    char buf[512];
    if (access(v1, W_OK) == 0) {
        snprintf(out, n, "%s", v1);
        return 0;
    }
    int fd = open("/sys/fs/cgroup/cgroup.controllers", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k > 0) {
            buf[k] = 0;
            if (strstr(buf, "pids") && access("/sys/fs/cgroup", W_OK) == 0 &&
                file_write("/sys/fs/cgroup/cgroup.subtree_control", "+pids") == 0) {
                snprintf(out, n, "/sys/fs/cgroup");
                return 0;
            }
        }
    }
    return -ENOTSUP;
}

int pyw__wopts_prepare(const pyw_options_t *opt, pyw_wopts_t *wo)
{
    static unsigned seq;
    char base[64], path[160];
    int rc = 0;
    memset(wo, 0, sizeof *wo);
    if (opt->max_frame && opt->max_frame < PYW_MIN_MAX_FRAME)
        return CAP_EINVAL;
    wo->mem = opt->limits.mem_bytes;
    wo->cpu = opt->limits.cpu_seconds;
    wo->nofile = opt->limits.nofile;
    wo->fsize = opt->limits.fsize_bytes;
    wo->nproc = opt->limits.nproc;
    wo->max_frame = opt->max_frame ? opt->max_frame : PYW_DEFAULT_MAX_FRAME;
    if (!wo->nproc)
        goto out;
    if (cgroup_base(base, sizeof base) == 0) {
        snprintf(path, sizeof path, "%s/capsule-pyw-%d-%u", base, (int)getpid(),
                 __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED));
        if (mkdir(path, 0755) < 0 && errno != EEXIST) {
            rc = -errno;
            goto out;
        }
        char f[340], v[32];
        /* the worker's own threads (main, protocol, fd reader) do not count against the limit */
        snprintf(v, sizeof v, "%u", wo->nproc + 3);
        snprintf(f, sizeof f, "%s/pids.max", path);
        if ((rc = file_write(f, v))) {
            rmdir(path);
            goto out;
        }
        snprintf(wo->cgroup, sizeof wo->cgroup, "%s", path);
    } else if (geteuid() == 0) {
        /* RLIMIT_NPROC does not hold for root: refuse rather than pretend */
        cap_log(CAP_LOG_ERROR, "pyworker",
                "a process limit needs a writable pids cgroup when running as root");
        rc = -ENOTSUP;
    }
out:
    return rc;
}

void pyw__cgroup_destroy(const char *dir)
{
    char f[340], buf[4096];
    if (!dir || !dir[0])
        return;
    snprintf(f, sizeof f, "%s/cgroup.procs", dir);
    for (int tries = 0; tries < 200; tries++) {
        int fd = open(f, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            break;
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k <= 0)
            break;
        buf[k] = 0;
        for (char *s = buf, *e; *s; s = e) {
            long pid = strtol(s, &e, 10);
            if (e == s)
                break;
            if (pid > 0) {
                int st;
                kill((pid_t)pid, SIGKILL);
                (void)waitpid((pid_t)pid, &st, WNOHANG); /* ours if reparented to us */
            }
            while (*e == '\n')
                e++;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (rmdir(dir) < 0)
        cap_log(CAP_LOG_WARN, "pyworker", "cannot remove cgroup %s: %s", dir, strerror(errno));
}

/* Reads ppid and pgrp of a process from /proc/PID/stat; 0 or -1. */
static int proc_ids(pid_t pid, pid_t *ppid, pid_t *pgrp)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t k = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (k <= 0)
        return -1;
    buf[k] = 0;
    char *p = strrchr(buf, ')'); /* the command may contain spaces and parentheses */
    int a, b;
    char st;
    if (!p || sscanf(p + 1, " %c %d %d", &st, &a, &b) != 3)
        return -1;
    *ppid = a;
    *pgrp = b;
    return 0;
}

/* After a worker died and its group was killed: what it started was reparented to us if we are a
 * subreaper (a zygote user). Kill what is left of its process group and reap those that became
 * our children, until none is left (bounded: 200 ms). */
static void reap_group(pid_t pgid)
{
    pid_t me = getpid();
    for (int round = 0; round < 200; round++) {
        int left = 0;
        DIR *d = opendir("/proc");
        if (!d)
            return;
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            char *end;
            long pid = strtol(e->d_name, &end, 10);
            pid_t ppid, pgrp;
            if (*end || pid <= 0 || proc_ids((pid_t)pid, &ppid, &pgrp) != 0 || pgrp != pgid)
                continue;
            kill((pid_t)pid, SIGKILL);
            if (ppid == me) {
                int st;
                if (waitpid((pid_t)pid, &st, WNOHANG) == (pid_t)pid)
                    continue;
            }
            left++;
        }
        closedir(d);
        if (!left)
            return;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

/* ---- handles and lifetime ---- */

static void on_handle_closed(uv_handle_t *h)
{
    pyw_worker_t *w = h->data;
    if (--w->open_handles == 0) {
        cap_free(w->rbuf);
        cap_free(w->pyver);
        cap_free(w);
    }
}

static void on_exec_timer_closed(uv_handle_t *h)
{
    pyw_exec_t *e = h->data;
    pyw_worker_t *w = e->w;
    cap_free(e->delta_frame);
    cap_free(e);
    on_handle_closed((uv_handle_t *)&w->pipe); /* same accounting */
}

static void exec_free(pyw_exec_t *e)
{
    e->timer.data = e;
    uv_close((uv_handle_t *)&e->timer, on_exec_timer_closed);
}

static pyw_exec_t *exec_find(pyw_worker_t *w, uint64_t id, int unlink)
{
    for (pyw_exec_t **pp = &w->execs; *pp; pp = &(*pp)->next) {
        if ((*pp)->id == id) {
            pyw_exec_t *e = *pp;
            if (unlink)
                *pp = e->next;
            return e;
        }
    }
    return NULL;
}

/* ---- sending ---- */

typedef struct {
    uv_write_t req;
    uint8_t *p;
} wreq_t;

static void on_written(uv_write_t *req, int status)
{
    (void)status; /* a failed write shows up as EOF / exit */
    wreq_t *r = (wreq_t *)req;
    cap_free(r->p);
    cap_free(r);
}

static int send_frame(pyw_worker_t *w, pyw_buf_t *b)
{
    int rc = 0;
    if (w->exited || w->closed || w->eof) {
        rc = CAP_ECLOSED;
        goto out;
    }
    if (b->len - 4 > w->max_frame) {
        rc = CAP_ETOOBIG;
        goto out;
    }
    /* Nothing queued (uv_try_write refuses otherwise, so the order holds): the frame usually
     * goes in one write now, with no request, no deferred callback and no poll re-arm. A
     * failed write is left to show up as EOF / exit, like a failed uv_write. */
    size_t done = 0;
    uv_buf_t all = uv_buf_init((char *)b->p, (unsigned)b->len);
    int n = uv_try_write((uv_stream_t *)&w->pipe, &all, 1);
    if (n >= 0 && (size_t)n == b->len)
        goto out;
    if (n >= 0)
        done = (size_t)n;
    else if (n == UV_EPIPE || n == UV_ECONNRESET)
        goto out;
    else if (n != UV_EAGAIN) {
        rc = CAP_ECLOSED;
        goto out;
    }
    wreq_t *r = cap_malloc(sizeof *r);
    r->p = b->p;
    uv_buf_t ub = uv_buf_init((char *)b->p + done, (unsigned)(b->len - done));
    b->p = NULL;
    if ((rc = uv_write(&r->req, (uv_stream_t *)&w->pipe, &ub, 1, on_written)) < 0) {
        cap_free(r->p);
        cap_free(r);
        rc = CAP_ECLOSED;
    }
out:
    pyw__buf_free(b);
    return rc;
}

static int send_simple(pyw_worker_t *w, uint8_t type, uint64_t id)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, type, id);
    pyw__frame_end(&b, 0);
    return send_frame(w, &b);
}

/* ---- decoding worker frames ---- */

typedef struct {
    const uint8_t *blob;
    size_t blob_len;
    char **lists[4];
    size_t n[4];
    char **pairs;
    size_t n_pairs;
    pyw_pair_t *pv;
    uint8_t ok;
    char *error;
} delta_dec_t;

static void delta_dec_free(delta_dec_t *d)
{
    for (int i = 0; i < 4; i++)
        pyw__names_free(d->lists[i], d->n[i]);
    pyw__names_free(d->pairs, d->n_pairs * 2);
    cap_free(d->pv);
    cap_free(d->error);
}

static int delta_decode(pyw_rd_t *r, delta_dec_t *d, pyw_delta_t *out)
{
    int rc;
    memset(d, 0, sizeof *d);
    if ((rc = pyw__get_u8(r, &d->ok)) || (rc = pyw__get_strdup(r, &d->error)) ||
        (rc = pyw__get_str(r, &d->blob, &d->blob_len)))
        return rc;
    for (int i = 0; i < 4; i++)
        if ((rc = pyw__get_names(r, &d->lists[i], &d->n[i])))
            return rc;
    if ((rc = pyw__get_pairs(r, &d->pairs, &d->n_pairs)))
        return rc;
    if ((rc = pyw__rd_end(r)))
        return rc;
    d->pv = cap_calloc(d->n_pairs + 1, sizeof *d->pv);
    for (size_t i = 0; i < d->n_pairs; i++) {
        d->pv[i].name = d->pairs[2 * i];
        d->pv[i].reason = d->pairs[2 * i + 1];
    }
    memset(out, 0, sizeof *out);
    out->blob = d->blob;
    out->blob_len = d->blob_len;
    out->added = (const char *const *)d->lists[0];
    out->n_added = d->n[0];
    out->changed = (const char *const *)d->lists[1];
    out->n_changed = d->n[1];
    out->mutated = (const char *const *)d->lists[2];
    out->n_mutated = d->n[2];
    out->deleted = (const char *const *)d->lists[3];
    out->n_deleted = d->n[3];
    out->unpicklable = d->pv;
    out->n_unpicklable = d->n_pairs;
    return 0;
}

static void on_exec_timer(uv_timer_t *t);

/* The worker runs cells in order, so the first execution in flight is the running one: its
 * timeout runs from when it started (when the one before it ended), not from its request. */
static void exec_arm_head(pyw_worker_t *w)
{
    pyw_exec_t *e = w->execs;
    if (e && e->timeout_ms && !e->timer_on && !e->cancelled && !w->exited && !w->closed) {
        uv_timer_start(&e->timer, on_exec_timer, e->timeout_ms, 0);
        e->timer_on = 1;
    }
}

static void deliver_result(pyw_worker_t *w, pyw_exec_t *e, pyw_result_t *res)
{
    delta_dec_t dd;
    pyw_delta_t delta;
    memset(&dd, 0, sizeof dd);
    if (e->delta_frame) {
        pyw_rd_t r;
        pyw__rd_init(&r, e->delta_frame, e->delta_len);
        if (delta_decode(&r, &dd, &delta) == 0 && dd.ok) {
            res->delta = &delta;
        } else if (!res->delta_error) {
            res->delta_error = dd.error && dd.error[0] ? dd.error : "malformed delta";
        }
    }
    if (e->timed_out && res->status == PYW_STATUS_CANCELLED)
        res->status = PYW_STATUS_TIMEOUT;
    if (w->cb.on_result && !w->closed)
        w->cb.on_result(w, res);
    delta_dec_free(&dd);
    if (e->timer_on)
        uv_timer_stop(&e->timer);
    exec_free(e);
    exec_arm_head(w);
}

static int handle_result(pyw_worker_t *w, uint64_t id, pyw_rd_t *r)
{
    uint8_t status, flags;
    uint32_t cell_no;
    uint64_t dur;
    char *s[5] = {0}, *derr = NULL;
    int rc;
    if ((rc = pyw__get_u8(r, &status)) || (rc = pyw__get_u32(r, &cell_no)) ||
        (rc = pyw__get_u64(r, &dur)))
        goto out;
    for (int i = 0; i < 5; i++)
        if ((rc = pyw__get_strdup(r, &s[i])))
            goto out;
    if ((rc = pyw__get_u8(r, &flags)) || (rc = pyw__get_strdup(r, &derr)) || (rc = pyw__rd_end(r)))
        goto out;
    if (status > PYW_RS_CANCELLED) {
        rc = CAP_EPROTO;
        goto out;
    }
    pyw_exec_t *e = exec_find(w, id, 1);
    if (!e) /* not ours (already failed by us, e.g. after close) */
        goto out;
    pyw_result_t res;
    memset(&res, 0, sizeof res);
    res.exec_id = id;
    res.status = (pyw_status_t)status;
    res.cell_no = cell_no;
    res.duration_ns = dur;
    res.repr = (flags & 1) ? s[0] : NULL;
    res.json = (flags & 2) ? s[1] : NULL;
    res.etype = s[2][0] ? s[2] : NULL;
    res.emsg = s[2][0] ? s[3] : NULL;
    res.traceback = s[4][0] ? s[4] : NULL;
    res.delta_error = derr[0] ? derr : NULL;
    res.not_run = (flags & PYW_RF_NOT_RUN) != 0;
    deliver_result(w, e, &res);
out:
    for (int i = 0; i < 5; i++)
        cap_free(s[i]);
    cap_free(derr);
    return rc;
}

static int handle_frame(pyw_worker_t *w, uint8_t type, uint64_t id, const uint8_t *body, size_t len)
{
    pyw_rd_t r;
    int rc = 0;
    pyw__rd_init(&r, body, len);
    if (!w->ready && type != PYW_F_READY && type != PYW_F_ERROR)
        return CAP_EPROTO;
    switch (type) {
    case PYW_F_READY: {
        uint32_t ver, pid, maxf;
        char *pv = NULL;
        if ((rc = pyw__get_u32(&r, &ver)) || (rc = pyw__get_u32(&r, &pid)) ||
            (rc = pyw__get_u32(&r, &maxf)) || (rc = pyw__get_strdup(&r, &pv)) ||
            (rc = pyw__rd_end(&r))) {
            cap_free(pv);
            return rc;
        }
        if (ver != PYW_PROTOCOL_VERSION || w->ready || (pid_t)pid != w->pid) {
            cap_free(pv);
            return CAP_EVERSION;
        }
        w->pyver = pv;
        w->ready = 1;
        affinity_learn(w);
        uv_timer_stop(&w->start_timer);
        w->hb_last_ns = cap_now_ns();
        if (w->hb_ms)
            uv_timer_start(&w->hb_timer, on_hb_timer, w->hb_ms, w->hb_ms);
        if (w->cb.on_ready)
            w->cb.on_ready(w);
        return 0;
    }
    case PYW_F_STREAM: {
        uint8_t stream;
        const uint8_t *data;
        size_t n;
        if ((rc = pyw__get_u8(&r, &stream)) || (rc = pyw__get_str(&r, &data, &n)) ||
            (rc = pyw__rd_end(&r)))
            return rc;
        if (stream != 1 && stream != 2)
            return CAP_EPROTO;
        if (w->cb.on_output)
            w->cb.on_output(w, id, stream, (const char *)data, n);
        return 0;
    }
    case PYW_F_INPUT_REQ: {
        uint8_t pw;
        char *prompt = NULL;
        if ((rc = pyw__get_u8(&r, &pw)) || (rc = pyw__get_strdup(&r, &prompt)) ||
            (rc = pyw__rd_end(&r))) {
            cap_free(prompt);
            return rc;
        }
        if (w->cb.on_input)
            w->cb.on_input(w, id, prompt, pw);
        else
            pyw_worker_input_reply(w, id, NULL, 0, 1);
        cap_free(prompt);
        return 0;
    }
    case PYW_F_PROMISE: {
        uint8_t op;
        pyw_promise_req_t q = {0};
        uint64_t num;
        const uint8_t *data;
        char *name = NULL, *label = NULL;
        if ((rc = pyw__get_u8(&r, &op)) || (rc = pyw__get_u32(&r, &q.attempts)) ||
            (rc = pyw__get_u64(&r, &num)) || (rc = pyw__get_strdup(&r, &name)) ||
            (rc = pyw__get_strdup(&r, &label)) || (rc = pyw__get_str(&r, &data, &q.len)) ||
            (rc = pyw__rd_end(&r))) {
            cap_free(name);
            cap_free(label);
            return rc;
        }
        q.label = label;
        q.op = op;
        q.name = name;
        q.num = num;
        q.data = data;
        const char *ok_chars = op == PYW_PO_AWAIT
                                   ? "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTU"
                                     "VWXYZ0123456789._-"
                                   : "0123456789.";
        int bad = op < PYW_PO_OPEN || op > PYW_PO_CHILD || !name[0] ||
                  strlen(name) > (op == PYW_PO_AWAIT ? 128u : 200u) ||
                  strspn(name, ok_chars) != strlen(name);
        if (bad && op == PYW_PO_START)
            ; /* nobody waits for an answer: a bad running mark is not written */
        else if (bad)
            pyw_worker_promise_reply(w, id, PYW_PS_FAILED, 0, 0, "bad step request", 16);
        else if (w->cb.on_promise)
            w->cb.on_promise(w, id, &q);
        else if (op != PYW_PO_START)
            pyw_worker_promise_reply(w, id, PYW_PS_FAILED, 0, 0, "no durable steps here", 21);
        cap_free(name);
        cap_free(label);
        return 0;
    }
    case PYW_F_DELTA: {
        pyw_exec_t *e = exec_find(w, id, 0);
        if (e) {
            cap_free(e->delta_frame);
            e->delta_frame = pyw__memdup0(body, len);
            e->delta_len = len;
        }
        return 0;
    }
    case PYW_F_RESULT:
        return handle_result(w, id, &r);
    case PYW_F_SNAPSHOT_DATA: {
        delta_dec_t dd;
        pyw_delta_t d;
        rc = delta_decode(&r, &dd, &d);
        if (rc == 0 && w->cb.on_snapshot)
            w->cb.on_snapshot(w, id, dd.ok ? 0 : CAP_EUNPROCESSABLE, dd.ok ? &d : NULL,
                              dd.ok ? NULL : dd.error);
        delta_dec_free(&dd);
        return rc;
    }
    case PYW_F_APPLIED: {
        uint8_t ok;
        char *err = NULL, **rest = NULL, **del = NULL, **fail = NULL;
        size_t nr = 0, nd = 0, nf = 0;
        if ((rc = pyw__get_u8(&r, &ok)) == 0 && (rc = pyw__get_strdup(&r, &err)) == 0 &&
            (rc = pyw__get_names(&r, &rest, &nr)) == 0 &&
            (rc = pyw__get_names(&r, &del, &nd)) == 0 &&
            (rc = pyw__get_pairs(&r, &fail, &nf)) == 0 && (rc = pyw__rd_end(&r)) == 0) {
            pyw_pair_t *pv = cap_calloc(nf + 1, sizeof *pv);
            for (size_t i = 0; i < nf; i++) {
                pv[i].name = fail[2 * i];
                pv[i].reason = fail[2 * i + 1];
            }
            pyw_apply_result_t ar = {id,
                                     ok ? 0 : CAP_EUNPROCESSABLE,
                                     ok ? NULL : err,
                                     (const char *const *)rest,
                                     nr,
                                     (const char *const *)del,
                                     nd,
                                     pv,
                                     nf};
            if (w->cb.on_applied)
                w->cb.on_applied(w, &ar);
            cap_free(pv);
        }
        cap_free(err);
        pyw__names_free(rest, nr);
        pyw__names_free(del, nd);
        pyw__names_free(fail, nf * 2);
        return rc;
    }
    case PYW_F_PONG:
        if ((rc = pyw__rd_end(&r)))
            return rc;
        w->hb_last_ns = cap_now_ns();
        if (id & HB_ID_BIT)
            return 0; /* our own heartbeat */
        if (w->cb.on_pong)
            w->cb.on_pong(w, id);
        return 0;
    case PYW_F_ERROR: {
        uint32_t code;
        uint8_t about;
        char *msg = NULL;
        if ((rc = pyw__get_u32(&r, &code)) || (rc = pyw__get_strdup(&r, &msg)) ||
            (rc = pyw__get_u8(&r, &about)) || (rc = pyw__rd_end(&r))) {
            cap_free(msg);
            return rc;
        }
        /* an EXECUTE the worker rejected will never get a result: fail it now */
        pyw_exec_t *e = about == PYW_F_EXECUTE ? exec_find(w, id, 1) : NULL;
        if (e) {
            pyw_result_t res;
            memset(&res, 0, sizeof res);
            res.exec_id = id;
            res.status = PYW_STATUS_ERROR;
            res.etype = "ProtocolError";
            res.emsg = msg;
            deliver_result(w, e, &res);
        }
        if (w->cb.on_error)
            w->cb.on_error(w, id, -(int)code, msg);
        cap_free(msg);
        return 0;
    }
    default:
        return CAP_EPROTO;
    }
}

/* Parses every whole frame in rbuf. Returns 0 or the protocol error. */
static int parse_frames(pyw_worker_t *w)
{
    size_t off = 0;
    int rc = 0;
    while (w->rlen - off >= 4) {
        uint32_t len = cap_get_le32(w->rbuf + off);
        uint8_t type;
        uint64_t id;
        /* judge the length as soon as it is there: never wait for an impossible frame */
        if (len < PYW_MIN_LEN) {
            rc = CAP_EPROTO;
            break;
        }
        if (len > w->max_frame) {
            rc = CAP_ETOOBIG;
            break;
        }
        if (w->rlen - off < PYW_HDR_SIZE)
            break;
        if ((rc = pyw__hdr_parse(w->rbuf + off, w->max_frame, &len, &type, &id)))
            break;
        if (w->rlen - off < 4 + (size_t)len)
            break;
        rc = handle_frame(w, type, id, w->rbuf + off + PYW_HDR_SIZE, len - 9);
        off += 4 + (size_t)len;
        if (rc || w->closed)
            break;
    }
    memmove(w->rbuf, w->rbuf + off, w->rlen - off);
    w->rlen -= off;
    return rc;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    pyw_worker_t *w = h->data;
    (void)suggested;
    if (w->rcap - w->rlen < 65536) {
        w->rcap = w->rcap ? w->rcap * 2 : 131072;
        w->rbuf = cap_realloc(w->rbuf, w->rcap);
    }
    *buf = uv_buf_init((char *)w->rbuf + w->rlen, (unsigned)(w->rcap - w->rlen));
}

static void on_reap_timer(uv_timer_t *t);

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    pyw_worker_t *w = s->data;
    (void)buf;
    if (n > 0) {
        w->rlen += (size_t)n;
        int rc = parse_frames(w);
        if (rc && !w->exited && !w->closed) {
            char note[96];
            snprintf(note, sizeof note, "protocol violation by the worker: %s", cap_strerror(rc));
            worker_kill_for(w, rc == CAP_EVERSION ? PYW_EXIT_START_FAILED : PYW_EXIT_PROTOCOL,
                            note);
        }
        return;
    }
    if (n < 0) {
        /* EOF or error: the worker is dying; the pidfd reports the exit. Make sure it does. */
        uv_read_stop(s);
        w->reading = 0;
        w->eof = 1;
        if (!w->exited && !w->closed) {
            w->reap_tries = 0;
            uv_timer_start(&w->reap_timer, on_reap_timer, 1000, 0);
        }
    }
}

/* ---- exit ---- */

static void on_reap_timer(uv_timer_t *t)
{
    pyw_worker_t *w = t->data;
    int st;
    if (w->exited)
        return;
    pid_t r = waitpid(w->pid, &st, WNOHANG);
    if (r == w->pid) {
        worker_handle_exit(w, st);
        return;
    }
    if (r == 0 && w->eof && w->reap_tries == 0 && !w->killed) {
        /* the socket closed a second ago and the process lingers: it is not serving us */
        worker_kill_for(w, PYW_EXIT_CRASHED, "the worker closed its socket");
    }
    if (++w->reap_tries < 5000)
        uv_timer_start(&w->reap_timer, on_reap_timer, 1, 0);
}

static void on_pidfd(uv_poll_t *p, int status, int events)
{
    pyw_worker_t *w = p->data;
    (void)status;
    (void)events;
    uv_poll_stop(p);
    w->poll_on = 0;
    /* the worker is dead but not yet reaped (so its pid, which is also its process group id,
     * cannot be reused): take down what it left running in its group */
    kill(-w->pid, SIGKILL);
    w->reap_tries = 1;
    on_reap_timer(&w->reap_timer);
}

static const char *sig_name(int sig)
{
    switch (sig) {
    case SIGKILL:
        return "SIGKILL";
    case SIGSEGV:
        return "SIGSEGV";
    case SIGABRT:
        return "SIGABRT";
    case SIGXCPU:
        return "SIGXCPU";
    case SIGXFSZ:
        return "SIGXFSZ";
    case SIGTERM:
        return "SIGTERM";
    case SIGBUS:
        return "SIGBUS";
    default:
        return "signal";
    }
}

static void worker_handle_exit(pyw_worker_t *w, int st)
{
    char msg[256];
    pyw_exit_t ex;
    memset(&ex, 0, sizeof ex);
    w->exited = 1;
    if (w->poll_on) {
        uv_poll_stop(&w->pidpoll);
        w->poll_on = 0;
    }
    uv_timer_stop(&w->start_timer);
    uv_timer_stop(&w->reap_timer);
    uv_timer_stop(&w->hb_timer);
    /* read what the worker wrote before dying (final output, a last result) */
    if (!w->eof && !w->closed) {
        uv_os_fd_t fd;
        if (uv_fileno((uv_handle_t *)&w->pipe, &fd) == 0) {
            for (;;) {
                if (w->rcap - w->rlen < 65536) {
                    w->rcap = w->rcap ? w->rcap * 2 : 131072;
                    w->rbuf = cap_realloc(w->rbuf, w->rcap);
                }
                ssize_t k = read(fd, w->rbuf + w->rlen, w->rcap - w->rlen);
                if (k <= 0)
                    break;
                w->rlen += (size_t)k;
                if (parse_frames(w))
                    break;
            }
        }
    }
    if (w->reading) {
        uv_read_stop((uv_stream_t *)&w->pipe);
        w->reading = 0;
    }
    w->eof = 1;
    pyw__cgroup_destroy(w->cgroup);
    w->cgroup[0] = 0;
    reap_group(w->pid);
    ex.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    ex.signal = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
    if (w->killed) {
        ex.reason = w->kill_reason;
        snprintf(msg, sizeof msg, "%s", w->kill_note);
    } else if (ex.signal == SIGXCPU || (ex.signal == SIGKILL && w->limits.cpu_seconds)) {
        ex.reason = PYW_EXIT_LIMIT;
        snprintf(msg, sizeof msg, "CPU time limit (%u s) exceeded (%s)", w->limits.cpu_seconds,
                 sig_name(ex.signal));
    } else if (ex.signal == SIGXFSZ) {
        ex.reason = PYW_EXIT_LIMIT;
        snprintf(msg, sizeof msg, "file size limit (%llu bytes) exceeded (SIGXFSZ)",
                 (unsigned long long)w->limits.fsize_bytes);
    } else if (!w->ready) {
        ex.reason = PYW_EXIT_START_FAILED;
        if (ex.signal)
            snprintf(msg, sizeof msg, "the worker died during start-up (%s %d)",
                     sig_name(ex.signal), ex.signal);
        else
            snprintf(msg, sizeof msg, "the worker exited during start-up with status %d",
                     ex.exit_code);
    } else if (ex.signal) {
        ex.reason = PYW_EXIT_CRASHED;
        snprintf(msg, sizeof msg, "the worker was killed by %s (%d)", sig_name(ex.signal),
                 ex.signal);
    } else if (ex.exit_code == 0 && w->shutdown_sent) {
        ex.reason = PYW_EXIT_CLEAN;
        snprintf(msg, sizeof msg, "the worker shut down cleanly");
    } else {
        ex.reason = PYW_EXIT_CRASHED;
        snprintf(msg, sizeof msg, "the worker exited unexpectedly with status %d", ex.exit_code);
    }
    ex.message = msg;
    /* every execution still in flight fails now, in order */
    while (w->execs) {
        pyw_exec_t *e = w->execs;
        w->execs = e->next;
        pyw_result_t res;
        memset(&res, 0, sizeof res);
        res.exec_id = e->id;
        res.status = PYW_STATUS_DIED;
        res.etype = "WorkerDied";
        res.emsg = msg;
        cap_free(e->delta_frame);
        e->delta_frame = NULL;
        deliver_result(w, e, &res);
    }
    if (w->cb.on_exit && !w->closed)
        w->cb.on_exit(w, &ex);
}

/* The worker leads its own process group (setpgid in the child / in the forked worker): kill the
 * group, so subprocesses the session started go too (a cgroup, when there is one, catches those
 * that left the group). */
static void kill_tree(pyw_worker_t *w)
{
    if (w->pid > 0 && !w->exited) {
        kill(-w->pid, SIGKILL);
        kill(w->pid, SIGKILL);
    }
}

static void worker_kill_for(pyw_worker_t *w, pyw_exit_reason_t why, const char *note)
{
    if (w->exited)
        return;
    if (!w->killed) {
        w->killed = 1;
        w->kill_reason = why;
        snprintf(w->kill_note, sizeof w->kill_note, "%s", note);
    }
    kill_tree(w);
}

static void on_hb_timer(uv_timer_t *t)
{
    pyw_worker_t *w = t->data;
    if (w->exited || w->closed)
        return;
    if (cap_now_ns() - w->hb_last_ns > 4ull * w->hb_ms * 1000000ull) {
        char note[96];
        uv_timer_stop(t);
        snprintf(note, sizeof note, "no heartbeat answer for %llu ms: the worker was killed",
                 (unsigned long long)((cap_now_ns() - w->hb_last_ns) / 1000000));
        worker_kill_for(w, PYW_EXIT_HUNG, note);
        return;
    }
    (void)send_simple(w, PYW_F_PING, HB_ID_BIT | ++w->hb_seq);
}

static void on_start_timer(uv_timer_t *t)
{
    pyw_worker_t *w = t->data;
    if (!w->ready)
        worker_kill_for(w, PYW_EXIT_START_FAILED, "no READY from the worker before the timeout");
}

/* ---- creation ---- */

static int pidfd_open_(pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

int pyw__worker_attach(uv_loop_t *loop, const pyw_options_t *opt, int sock, pid_t pid,
                       const char *cgroup, pyw_worker_t **out)
{
    int rc = 0;
    pyw_worker_t *w = cap_calloc(1, sizeof *w);
    w->loop = loop;
    w->pid = pid;
    w->pidfd = -1;
    if (opt->cb)
        w->cb = *opt->cb;
    w->data = opt->data;
    w->max_frame = opt->max_frame ? opt->max_frame : PYW_DEFAULT_MAX_FRAME;
    w->grace_ms = opt->cancel_grace_ms ? opt->cancel_grace_ms : 1000;
    w->limits = opt->limits;
    snprintf(w->cgroup, sizeof w->cgroup, "%s", cgroup ? cgroup : "");
    w->pidfd = pidfd_open_(pid);
    if (w->pidfd < 0) {
        rc = -errno;
        kill(pid, SIGKILL);
        close(sock);
        pyw__cgroup_destroy(w->cgroup);
        cap_free(w);
        goto out;
    }
    uv_pipe_init(loop, &w->pipe, 0);
    uv_poll_init(loop, &w->pidpoll, w->pidfd);
    uv_timer_init(loop, &w->start_timer);
    uv_timer_init(loop, &w->reap_timer);
    uv_timer_init(loop, &w->hb_timer);
    w->hb_timer.data = w;
    w->hb_ms = opt->heartbeat_ms;
    w->pipe.data = w->pidpoll.data = w->start_timer.data = w->reap_timer.data = w;
    w->open_handles = 5;
    if ((rc = uv_pipe_open(&w->pipe, sock)) < 0) {
        close(sock);
        w->eof = 1;
    } else {
        uv_read_start((uv_stream_t *)&w->pipe, on_alloc, on_read);
        w->reading = 1;
    }
    uv_poll_start(&w->pidpoll, UV_READABLE, on_pidfd);
    w->poll_on = 1;
    uv_timer_start(&w->start_timer, on_start_timer,
                   opt->start_timeout_ms ? opt->start_timeout_ms : 10000, 0);
    rc = 0;
    *out = w;
out:
    return rc;
}

int pyw_worker_spawn(uv_loop_t *loop, const pyw_options_t *opt, pyw_worker_t **out)
{
    static const pyw_options_t defaults;
    pyw_wopts_t wo;
    char optstr[512];
    int sv[2] = {-1, -1}, rc;
    pid_t pid;
    if (!opt)
        opt = &defaults;
    const char *path = pyw__worker_path(opt->worker_path);
    if (access(path, X_OK) < 0)
        return -errno;
    if ((rc = pyw__wopts_prepare(opt, &wo)))
        return rc;
    if ((rc = pyw__wopts_format(&wo, optstr, sizeof optstr)))
        goto fail;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        rc = -errno;
        goto fail;
    }
    char *argv[] = {(char *)path, "--fd", "3", "--opts", optstr, NULL};
    pid = fork();
    if (pid < 0) {
        rc = -errno;
        goto fail;
    }
    if (pid == 0) {
        /* async-signal-safe calls only until exec */
        if (dup2(sv[1], 3) < 0)
            _exit(127);
        setpgid(0, 0); /* a terminal's Ctrl-C is not the engine's cancel */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv(path, argv);
        _exit(127);
    }
    close(sv[1]);
    return pyw__worker_attach(loop, opt, sv[0], pid, wo.cgroup, out);
fail:
    if (sv[0] >= 0) {
        close(sv[0]);
        close(sv[1]);
    }
    pyw__cgroup_destroy(wo.cgroup);
    return rc;
}

/* ---- requests ---- */

static void on_exec_timer(uv_timer_t *t)
{
    pyw_exec_t *e = t->data;
    pyw_worker_t *w = e->w;
    if (!e->cancelled) {
        /* the timeout passed: interrupt, then give it the grace period */
        e->timed_out = e->cancelled = 1;
        send_simple(w, PYW_F_CANCEL, e->id);
        uv_timer_start(&e->timer, on_exec_timer, w->grace_ms, 0);
        return;
    }
    char note[160];
    snprintf(note, sizeof note, "execution %llu ignored its %s for %u ms: the worker was killed",
             (unsigned long long)e->id, e->timed_out ? "timeout" : "cancel", w->grace_ms);
    worker_kill_for(w, PYW_EXIT_CANCEL_KILLED, note);
}

int pyw_worker_execute(pyw_worker_t *w, uint64_t exec_id, const char *cell_id, const char *source,
                       size_t len, uint32_t timeout_ms)
{
    pyw_buf_t b;
    int rc;
    if (w->exited || w->closed || w->eof)
        return CAP_ECLOSED;
    if (exec_find(w, exec_id, 0))
        return CAP_EEXIST;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_EXECUTE, exec_id);
    pyw__put_cstr(&b, cell_id);
    pyw__put_str(&b, source, len);
    pyw__frame_end(&b, 0);
    if ((rc = send_frame(w, &b)))
        return rc;
    pyw_exec_t *e = cap_calloc(1, sizeof *e);
    e->w = w;
    e->id = exec_id;
    e->timeout_ms = timeout_ms;
    uv_timer_init(w->loop, &e->timer);
    e->timer.data = e;
    w->open_handles++;
    /* append: results arrive in order */
    pyw_exec_t **pp = &w->execs;
    while (*pp)
        pp = &(*pp)->next;
    *pp = e;
    exec_arm_head(w);
    return 0;
}

int pyw_worker_input_reply(pyw_worker_t *w, uint64_t exec_id, const char *text, size_t len, int eof)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_INPUT_REPLY, exec_id);
    pyw__put_u8(&b, eof ? 1 : 0);
    pyw__put_str(&b, text ? text : "", text ? len : 0);
    pyw__frame_end(&b, 0);
    return send_frame(w, &b);
}

int pyw_worker_promise_reply(pyw_worker_t *w, uint64_t exec_id, int state, uint32_t attempts,
                             uint64_t num, const void *data, size_t len)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_PROMISE_REPLY, exec_id);
    pyw__put_u8(&b, (uint8_t)state);
    pyw__put_u32(&b, attempts);
    pyw__put_u64(&b, num);
    pyw__put_str(&b, data ? data : "", data ? len : 0);
    pyw__frame_end(&b, 0);
    return send_frame(w, &b);
}

int pyw_worker_cancel(pyw_worker_t *w, uint64_t exec_id)
{
    pyw_exec_t *e = exec_find(w, exec_id, 0);
    if (!e)
        return CAP_ENOTFOUND;
    int rc = send_simple(w, PYW_F_CANCEL, exec_id);
    if (rc)
        return rc;
    if (!e->cancelled) {
        e->cancelled = 1;
        uv_timer_start(&e->timer, on_exec_timer, w->grace_ms, 0);
        e->timer_on = 1;
    }
    return 0;
}

int pyw_worker_snapshot(pyw_worker_t *w, uint64_t req_id)
{
    return send_simple(w, PYW_F_SNAPSHOT, req_id);
}

int pyw_worker_apply(pyw_worker_t *w, uint64_t req_id, const void *blob, size_t len)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_APPLY, req_id);
    pyw__put_str(&b, blob, len);
    pyw__frame_end(&b, 0);
    return send_frame(w, &b);
}

int pyw_worker_ping(pyw_worker_t *w, uint64_t req_id)
{
    return send_simple(w, PYW_F_PING, req_id);
}

int pyw_worker_shutdown(pyw_worker_t *w)
{
    int rc = send_simple(w, PYW_F_SHUTDOWN, 0);
    if (rc == 0)
        w->shutdown_sent = 1;
    return rc;
}

int pyw_worker_kill(pyw_worker_t *w)
{
    if (w->exited)
        return CAP_ECLOSED;
    worker_kill_for(w, PYW_EXIT_KILLED, "killed at the client's request");
    return 0;
}

int pyw_worker_send_raw(pyw_worker_t *w, const void *data, size_t len)
{
    if (w->exited || w->closed || w->eof)
        return CAP_ECLOSED;
    wreq_t *r = cap_malloc(sizeof *r);
    r->p = pyw__memdup0(data, len);
    uv_buf_t ub = uv_buf_init((char *)r->p, (unsigned)len);
    if (uv_write(&r->req, (uv_stream_t *)&w->pipe, &ub, 1, on_written) < 0) {
        cap_free(r->p);
        cap_free(r);
        return CAP_ECLOSED;
    }
    return 0;
}

/* ---- reaping a closed worker off the caller's thread ----
 * A killed worker still has to be waited for (its exit tears its memory down: milliseconds for
 * a big namespace), its cgroup removed, and its process group swept through /proc: measured
 * p50 3.5 ms, p99 32 ms at load 6 when done inline, on the engine's loop thread, at every
 * session close. A detached thread per close does it instead; pyw_reap_wait waits for all. */
static pthread_mutex_t reap_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t reap_cv = PTHREAD_COND_INITIALIZER;
static int reap_pending;

struct reap_job {
    pid_t pid;
    char cgroup[256];
};

static void reap_now(pid_t pid, const char *cgroup)
{
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) /* SIGKILL is prompt */
        ;
    pyw__cgroup_destroy(cgroup);
    reap_group(pid);
}

static void *reaper_main(void *arg)
{
    struct reap_job *j = arg;
    reap_now(j->pid, j->cgroup);
    cap_free(j);
    pthread_mutex_lock(&reap_mu);
    if (--reap_pending == 0)
        pthread_cond_broadcast(&reap_cv);
    pthread_mutex_unlock(&reap_mu);
    return NULL;
}

static void reap_later(pid_t pid, const char *cgroup)
{
    struct reap_job *j = cap_calloc(1, sizeof *j);
    j->pid = pid;
    snprintf(j->cgroup, sizeof j->cgroup, "%s", cgroup);
    pthread_attr_t a;
    pthread_t t;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 64 * 1024);
    pthread_mutex_lock(&reap_mu);
    reap_pending++;
    pthread_mutex_unlock(&reap_mu);
    if (pthread_create(&t, &a, reaper_main, j) != 0) {
        reaper_main(j); /* no thread: inline, as before */
    }
    pthread_attr_destroy(&a);
}

void pyw_reap_wait(void)
{
    pthread_mutex_lock(&reap_mu);
    while (reap_pending > 0)
        pthread_cond_wait(&reap_cv, &reap_mu);
    pthread_mutex_unlock(&reap_mu);
}

void pyw_worker_close(pyw_worker_t *w)
{
    if (!w || w->closed)
        return;
    w->closed = 1;
    if (!w->exited) {
        kill_tree(w);
        reap_later(w->pid, w->cgroup);
        w->exited = 1;
    }
    while (w->execs) {
        pyw_exec_t *e = w->execs;
        w->execs = e->next;
        if (e->timer_on)
            uv_timer_stop(&e->timer);
        exec_free(e);
    }
    uv_close((uv_handle_t *)&w->pipe, on_handle_closed);
    uv_close((uv_handle_t *)&w->pidpoll, on_handle_closed);
    uv_close((uv_handle_t *)&w->start_timer, on_handle_closed);
    uv_close((uv_handle_t *)&w->reap_timer, on_handle_closed);
    uv_close((uv_handle_t *)&w->hb_timer, on_handle_closed);
    if (w->pidfd >= 0)
        close(w->pidfd);
}

/* ---- CPU affinity ---- */

/* At READY the worker runs exactly its own threads (main, output reader, protocol): remember
 * them, and the mask an unpin restores: the CPUs of this process's main thread (a worker forked
 * from a pinned thread inherited that pin: then its placement is unknown, -2, until set). Raw
 * syscalls: the CPU set macros need _GNU_SOURCE. */
static void affinity_learn(pyw_worker_t *w)
{
    char path[64];
    unsigned long cur[PYW_MASK_WORDS] = {0};
    w->ntids = 0;
    memset(w->mask0, 0, sizeof w->mask0);
    long n = syscall(SYS_sched_getaffinity, getpid(), sizeof w->mask0, w->mask0);
    long k = syscall(SYS_sched_getaffinity, w->pid, sizeof cur, cur);
    w->mask0_len = n > 0 ? (size_t)n : 0;
    w->cpu = n > 0 && k > 0 && memcmp(cur, w->mask0, sizeof cur) != 0 ? -2 : -1;
    snprintf(path, sizeof path, "/proc/%d/task", (int)w->pid);
    DIR *d = opendir(path);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && w->ntids < PYW_OWN_THREADS) {
        char *end;
        long tid = strtol(e->d_name, &end, 10);
        if (!*end && tid > 0)
            w->tids[w->ntids++] = (pid_t)tid;
    }
    closedir(d);
}

static int set_mask(pid_t tid, const unsigned long *mask, size_t len)
{
    if (syscall(SYS_sched_setaffinity, tid, len, mask) == 0 || errno == ESRCH)
        return 0; /* a thread that ended needs nothing */
    return errno == EINVAL ? CAP_EINVAL : -errno;
}

int pyw_worker_set_cpu(pyw_worker_t *w, int cpu)
{
    if (!w || cpu < -1 || cpu >= PYW_MASK_WORDS * (int)sizeof(unsigned long) * 8)
        return CAP_EINVAL;
    if (!w->ready || w->exited)
        return CAP_ECLOSED;
    if (cpu == w->cpu)
        return 0;
    int rc = 0;
    if (cpu >= 0) {
        unsigned long one[PYW_MASK_WORDS] = {0};
        one[cpu / (8 * sizeof(unsigned long))] = 1ul << (cpu % (8 * sizeof(unsigned long)));
        for (int i = 0; i < w->ntids && !rc; i++)
            rc = set_mask(w->tids[i], one, sizeof one);
        if (rc) {
            for (int i = 0; i < w->ntids; i++)
                (void)set_mask(w->tids[i], w->mask0, w->mask0_len);
            w->cpu = -1;
            return rc;
        }
    } else {
        /* every thread the process has now: those a cell started while pinned inherited the pin
         */
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", (int)w->pid);
        DIR *d = opendir(path);
        if (!d)
            return -errno;
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            char *end;
            long tid = strtol(e->d_name, &end, 10);
            if (!*end && tid > 0 && !rc)
                rc = set_mask((pid_t)tid, w->mask0, w->mask0_len);
        }
        closedir(d);
        if (rc)
            return rc;
    }
    w->cpu = cpu;
    return 0;
}

int pyw_worker_cpu(const pyw_worker_t *w)
{
    return w->ready && w->cpu >= 0 ? w->cpu : -1;
}

int pyw_worker_pid(const pyw_worker_t *w)
{
    return (int)w->pid;
}

int pyw_worker_exited(const pyw_worker_t *w)
{
    if (w->exited || w->closed || w->eof || !w->pid)
        return 1;
    if (w->pidfd < 0)
        return kill(w->pid, 0) != 0 && errno == ESRCH;
    struct pollfd p = {.fd = w->pidfd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

void *pyw_worker_data(const pyw_worker_t *w)
{
    return w->data;
}

const char *pyw_worker_python_version(const pyw_worker_t *w)
{
    return w->pyver;
}

int pyw_worker_is_ready(const pyw_worker_t *w)
{
    return w->ready && !w->exited;
}
