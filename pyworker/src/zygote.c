/*
 * zygote.c - the client of a zygote (fork server) process.
 *
 * The zygote is capsule-pyworker --zygote: one initialised interpreter (runtime, asyncio and the
 * namespace module imported, optional warm-up code run, gc.freeze()), single-threaded, forking
 * session workers on FORK frames. The new worker's socket travels with the FORK frame as
 * SCM_RIGHTS. The zygote double-forks and the intermediate child sends FORKED {pid} before it
 * exits, so the worker is reparented to this process (PR_SET_CHILD_SUBREAPER), which reaps it.
 * A FORK can be sent without waiting (pyw_zygote_request): the caller watches the control socket
 * (pyw_zygote_fd) and collects the worker when the answer came (pyw_zygote_collect), so a loop
 * never blocks on a fork. pyw_zygote_spawn is the same request followed by a bounded wait for its
 * answer; answers to other requests read meanwhile stay noted in theirs for collect.
 * Invariants: the control socket is used from one thread at a time, read without blocking into
 * z->in (waits are bounded polls); every request sent is in z->reqs until collected or the zygote
 * is closed, and a worker forked for a request that is never collected is killed and reaped (it
 * is our child); a zygote that stops answering is reported as CAP_EWORKER/CAP_ETIMEDOUT.
 */
#include "pyw_int.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cap.h"

/* A FORK sent and not answered yet (or answered and not collected). */
typedef struct zreq {
    struct zreq *next;
    uint64_t id;
    int sock;          /* our end of the worker's socket */
    pyw_options_t opt; /* a shallow copy: its pointers are the requester's */
    pyw_wopts_t wo;    /* wo.cgroup: created for this worker, removed if it never starts */
    int rc;            /* 1 while unanswered; then 0 (pid set) or the error */
    pid_t pid;
} zreq_t;

struct pyw_zygote {
    int sock;
    pid_t pid;
    uint64_t next_req;
    zreq_t *reqs; /* in the order sent */
    size_t nreqs;
    uint8_t *in; /* bytes read and not parsed yet */
    size_t in_len, in_cap;
    pid_t spare; /* the zygote's unused spare (SPARE), our child: reaped here if the zygote dies */
};

/* Appends what the socket has to z->in: waits (poll) until deadline_ns for something to read,
 * or not at all when deadline_ns is 0. 0 when bytes were read, -EAGAIN when none came in time,
 * CAP_EWORKER at EOF, -errno. */
static int zfill(pyw_zygote_t *z, uint64_t deadline_ns)
{
    for (;;) {
        if (deadline_ns) {
            uint64_t now = cap_now_ns();
            if (now >= deadline_ns)
                return -EAGAIN;
            struct pollfd pf = {z->sock, POLLIN, 0};
            int k = poll(&pf, 1, (int)((deadline_ns - now) / 1000000 + 1));
            if (k < 0 && errno != EINTR)
                return -errno;
            if (k <= 0)
                continue;
        }
        if (z->in_cap - z->in_len < 4096) {
            z->in_cap = z->in_cap ? z->in_cap * 2 : 8192;
            z->in = cap_realloc(z->in, z->in_cap);
        }
        ssize_t r = recv(z->sock, z->in + z->in_len, z->in_cap - z->in_len, MSG_DONTWAIT);
        if (r == 0)
            return CAP_EWORKER;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!deadline_ns)
                    return -EAGAIN;
                continue;
            }
            return -errno;
        }
        z->in_len += (size_t)r;
        return 0;
    }
}

/* Takes one whole frame out of z->in: 1 and type, id, a cap_malloc'd body; 0 if no whole frame
 * is there yet; CAP_EPROTO for a malformed header. */
static int znext(pyw_zygote_t *z, uint8_t *type, uint64_t *id, uint8_t **body, size_t *blen)
{
    uint32_t len;
    if (z->in_len < PYW_HDR_SIZE)
        return 0;
    int rc = pyw__hdr_parse(z->in, 1u << 20, &len, type, id);
    if (rc)
        return rc;
    size_t whole = (size_t)len + 4;
    if (z->in_len < whole)
        return 0;
    size_t n = len - 9;
    uint8_t *b = cap_malloc(n + 1);
    memcpy(b, z->in + PYW_HDR_SIZE, n);
    memmove(z->in, z->in + whole, z->in_len - whole);
    z->in_len -= whole;
    *body = b;
    *blen = n;
    return 1;
}

/* Reads one frame from the zygote, waiting until deadline_ns: type, id and a cap_malloc'd body.
 * CAP_ETIMEDOUT when none came in time. */
static int zread(pyw_zygote_t *z, uint64_t deadline_ns, uint8_t *type, uint64_t *id, uint8_t **body,
                 size_t *blen)
{
    for (;;) {
        int rc = znext(z, type, id, body, blen);
        if (rc)
            return rc < 0 ? rc : 0;
        rc = zfill(z, deadline_ns);
        if (rc)
            return rc == -EAGAIN ? CAP_ETIMEDOUT : rc;
    }
}

static void zreq_free(zreq_t *q)
{
    if (q->sock >= 0)
        close(q->sock);
    if (q->rc == 0 && q->pid > 0) {
        /* answered, never attached: the worker is our child (subreaper); it exits at the EOF of
         * its socket, but make sure and reap it */
        int st;
        kill(q->pid, SIGKILL);
        while (waitpid(q->pid, &st, 0) < 0 && errno == EINTR)
            ;
    }
    pyw__cgroup_destroy(q->wo.cgroup);
    cap_free(q);
}

static zreq_t *zreq_unlink(pyw_zygote_t *z, uint64_t id)
{
    for (zreq_t **pp = &z->reqs; *pp; pp = &(*pp)->next) {
        if ((*pp)->id == id) {
            zreq_t *q = *pp;
            *pp = q->next;
            z->nreqs--;
            return q;
        }
    }
    return NULL;
}

/* Handles one frame of the zygote: an answer to a FORK (FORKED or ERROR) is noted in its
 * request; a spare that died unused (FORKED, id 0) is reaped; a new spare (SPARE) is noted.
 * Anything else is ignored. */
static void zhandle(pyw_zygote_t *z, uint8_t type, uint64_t id, const uint8_t *body, size_t blen)
{
    pyw_rd_t r;
    uint32_t v;
    pyw__rd_init(&r, body, blen);
    if (type == PYW_F_SPARE) {
        if (pyw__get_u32(&r, &v) == 0 && pyw__rd_end(&r) == 0 && v > 0)
            z->spare = (pid_t)v;
        return;
    }
    if (type == PYW_F_FORKED && id == 0) {
        if (pyw__get_u32(&r, &v) == 0 && v > 0) {
            int st;
            while (waitpid((pid_t)v, &st, 0) < 0 && errno == EINTR)
                ;
            if (z->spare == (pid_t)v)
                z->spare = 0;
        }
        return;
    }
    zreq_t *q = NULL;
    for (zreq_t *p = z->reqs; p; p = p->next)
        if (p->id == id && p->rc == 1)
            q = p;
    if (!q || (type != PYW_F_FORKED && type != PYW_F_ERROR))
        return;
    if (type == PYW_F_ERROR) {
        q->rc = pyw__get_u32(&r, &v) || v == 0 ? CAP_EWORKER : -(int)v;
    } else if (pyw__get_u32(&r, &v) || pyw__rd_end(&r) || v == 0) {
        q->rc = CAP_EWORKER;
    } else {
        q->pid = (pid_t)v;
        q->rc = 0;
        if (z->spare == q->pid)
            z->spare = 0; /* handed out: the request's worker now */
    }
}

/* Parses what was read: every whole frame is handled. 0, or CAP_EWORKER (a malformed stream: the
 * zygote cannot be trusted any more). */
static int zparse(pyw_zygote_t *z)
{
    for (;;) {
        uint8_t type = 0, *body = NULL;
        uint64_t id = 0;
        size_t blen = 0; /* (set by znext; initialised for -O3's flow analysis) */
        int rc = znext(z, &type, &id, &body, &blen);
        if (rc <= 0)
            return rc ? CAP_EWORKER : 0;
        zhandle(z, type, id, body, blen);
        cap_free(body);
    }
}

/* The zygote is gone or broken: its socket is closed and every request fails. */
static void zfail(pyw_zygote_t *z)
{
    if (z->sock >= 0)
        close(z->sock);
    z->sock = -1;
    for (zreq_t *q = z->reqs; q; q = q->next)
        if (q->rc == 1)
            q->rc = CAP_EWORKER;
}

int pyw_zygote_open(const pyw_zygote_options_t *opt, pyw_zygote_t **out)
{
    static const pyw_zygote_options_t defaults;
    int sv[2] = {-1, -1}, rc;
    pyw_zygote_t *z = NULL;
    uint8_t *body = NULL;
    if (!opt)
        opt = &defaults;
    const char *path = pyw__worker_path(opt->worker_path);
    if (access(path, X_OK) < 0)
        return -errno;
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        return -errno;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    char *argv[] = {(char *)path, "--zygote", "--fd", "3", NULL, NULL, NULL};
    if (opt->warmup) {
        argv[4] = "--warmup";
        argv[5] = (char *)opt->warmup;
    }
    pid_t pid = fork();
    if (pid < 0) {
        rc = -errno;
        goto out;
    }
    if (pid == 0) {
        if (dup2(sv[1], 3) < 0)
            _exit(127);
        setpgid(0, 0);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv(path, argv);
        _exit(127);
    }
    close(sv[1]);
    sv[1] = -1;
    z = cap_calloc(1, sizeof *z);
    z->sock = sv[0];
    sv[0] = -1;
    z->pid = pid;
    uint8_t type;
    uint64_t id;
    size_t blen;
    uint64_t deadline =
        cap_now_ns() + (uint64_t)(opt->start_timeout_ms ? opt->start_timeout_ms : 10000) * 1000000;
    for (;;) { /* READY, after the SPARE that names the first spare */
        if ((rc = zread(z, deadline, &type, &id, &body, &blen)))
            goto out;
        if (type != PYW_F_SPARE)
            break;
        zhandle(z, type, id, body, blen);
        cap_free(body);
        body = NULL;
    }
    pyw_rd_t r;
    uint32_t ver, zpid, maxf;
    const uint8_t *pv;
    size_t pvn;
    pyw__rd_init(&r, body, blen);
    if (type != PYW_F_READY || pyw__get_u32(&r, &ver) || pyw__get_u32(&r, &zpid) ||
        pyw__get_u32(&r, &maxf) || pyw__get_str(&r, &pv, &pvn) || pyw__rd_end(&r)) {
        rc = CAP_EPROTO;
        goto out;
    }
    if (ver != PYW_PROTOCOL_VERSION) {
        rc = CAP_EVERSION;
        goto out;
    }
    *out = z;
    z = NULL;
    rc = 0;
out:
    cap_free(body);
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    if (z) {
        if (rc == CAP_ETIMEDOUT || rc == CAP_EWORKER || rc == CAP_EPROTO)
            rc = rc == CAP_ETIMEDOUT ? rc : CAP_EWORKER;
        pyw_zygote_close(z);
    }
    return rc;
}

int pyw_zygote_request(pyw_zygote_t *z, const pyw_options_t *opt, uint64_t *req)
{
    static const pyw_options_t defaults;
    char optstr[512];
    int sv[2] = {-1, -1}, rc;
    pyw_buf_t b;
    if (!opt)
        opt = &defaults;
    if (!z || z->sock < 0)
        return CAP_EWORKER;
    zreq_t *q = cap_calloc(1, sizeof *q);
    q->sock = -1;
    q->opt = *opt;
    pyw__buf_init(&b);
    if ((rc = pyw__wopts_prepare(opt, &q->wo))) {
        cap_free(q);
        return rc;
    }
    if ((rc = pyw__wopts_format(&q->wo, optstr, sizeof optstr)))
        goto out;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        rc = -errno;
        goto out;
    }
    q->id = ++z->next_req;
    pyw__frame_begin(&b, PYW_F_FORK, q->id);
    pyw__put_cstr(&b, optstr);
    pyw__frame_end(&b, 0);
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = {b.p, b.len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &sv[1], sizeof(int));
    ssize_t k;
    do {
        k = sendmsg(z->sock, &msg, MSG_NOSIGNAL);
    } while (k < 0 && errno == EINTR);
    if (k < 0 || (size_t)k != b.len) {
        rc = CAP_EWORKER;
        goto out;
    }
    q->sock = sv[0];
    sv[0] = -1;
    q->rc = 1;
    zreq_t **pp = &z->reqs;
    while (*pp)
        pp = &(*pp)->next;
    *pp = q;
    z->nreqs++;
    if (req)
        *req = q->id;
    q = NULL;
    rc = 0;
out:
    pyw__buf_free(&b);
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    if (q)
        zreq_free(q);
    return rc;
}

int pyw_zygote_fd(const pyw_zygote_t *z)
{
    return z ? z->sock : -1;
}

size_t pyw_zygote_pending(const pyw_zygote_t *z)
{
    return z ? z->nreqs : 0;
}

/* Turns the answered request q (unlinked) into its worker, or its error. */
static int zreq_finish(zreq_t *q, uv_loop_t *loop, pyw_worker_t **out)
{
    int rc = q->rc;
    if (rc == 0) {
        rc = pyw__worker_attach(loop, &q->opt, q->sock, q->pid, q->wo.cgroup, out);
        q->sock = -1;        /* the worker's now (closed by attach on failure) */
        q->pid = 0;          /* reaped by the worker's handle */
        q->wo.cgroup[0] = 0; /* owned by the worker now */
    }
    zreq_free(q);
    return rc;
}

int pyw_zygote_collect(pyw_zygote_t *z, uv_loop_t *loop, pyw_worker_t **out, uint64_t *req)
{
    *out = NULL;
    if (!z)
        return CAP_EWORKER;
    /* read what has come (never blocking), unless an answer is already there */
    int answered = 0;
    for (zreq_t *q = z->reqs; q; q = q->next)
        answered |= q->rc != 1;
    while (!answered && z->sock >= 0) {
        int rc = zfill(z, 0);
        if (rc == -EAGAIN)
            break;
        if (rc || zparse(z)) {
            zfail(z);
            break;
        }
        for (zreq_t *q = z->reqs; q; q = q->next)
            answered |= q->rc != 1;
    }
    for (zreq_t *q = z->reqs; q; q = q->next) {
        if (q->rc == 1)
            continue;
        if (req)
            *req = q->id;
        zreq_unlink(z, q->id);
        return zreq_finish(q, loop, out);
    }
    return z->sock < 0 ? CAP_EWORKER : -EAGAIN;
}

int pyw_zygote_spawn(pyw_zygote_t *z, uv_loop_t *loop, const pyw_options_t *opt, pyw_worker_t **out)
{
    uint64_t id;
    int rc = pyw_zygote_request(z, opt, &id);
    if (rc)
        return rc;
    /* answers to other requests that come first stay noted in theirs, for pyw_zygote_collect */
    uint64_t deadline = cap_now_ns() + 5000000000ull;
    zreq_t *q = NULL;
    for (;;) {
        for (zreq_t *p = z->reqs; p; p = p->next)
            if (p->id == id)
                q = p;
        if (q->rc != 1 || z->sock < 0)
            break;
        rc = zfill(z, deadline);
        if (rc == -EAGAIN) {
            q->rc = CAP_EWORKER; /* no answer in time */
            break;
        }
        if (rc || zparse(z))
            zfail(z);
    }
    zreq_unlink(z, id);
    return zreq_finish(q, loop, out);
}

int pyw_zygote_pid(const pyw_zygote_t *z)
{
    return (int)z->pid;
}

int pyw_zygote_spare(const pyw_zygote_t *z)
{
    return (int)z->spare;
}

void pyw_zygote_close(pyw_zygote_t *z)
{
    pid_t spare = -1;
    if (!z)
        return;
    if (z->sock >= 0) {
        /* SHUTDOWN: the zygote names its unused spare (FORKED, id 0), kills it and exits; the
         * spare is our child (subreaper), so we reap it */
        pyw_buf_t b;
        pyw__buf_init(&b);
        pyw__frame_begin(&b, PYW_F_SHUTDOWN, 0);
        pyw__frame_end(&b, 0);
        ssize_t k = send(z->sock, b.p, b.len, MSG_NOSIGNAL);
        pyw__buf_free(&b);
        uint64_t deadline = cap_now_ns() + 2000000000ull;
        while (k > 0) {
            uint8_t type = 0, *body = NULL;
            uint64_t id = 0;
            size_t blen = 0;
            if (zread(z, deadline, &type, &id, &body, &blen))
                break;
            pyw_rd_t r;
            uint32_t pid;
            pyw__rd_init(&r, body, blen);
            if (type == PYW_F_FORKED && id == 0 && pyw__get_u32(&r, &pid) == 0 && pid > 0)
                spare = (pid_t)pid;
            else
                zhandle(z, type, id, body, blen); /* a request's answer: its worker is reaped */
            cap_free(body);
        }
        close(z->sock); /* the zygote exits on EOF too */
    }
    while (z->reqs) {
        zreq_t *q = z->reqs;
        z->reqs = q->next;
        zreq_free(q);
    }
    if (z->pid > 0) {
        int st;
        uint64_t deadline = cap_now_ns() + 2000000000ull;
        while (waitpid(z->pid, &st, WNOHANG) == 0) {
            if (cap_now_ns() > deadline) {
                kill(z->pid, SIGKILL);
                waitpid(z->pid, &st, 0);
                break;
            }
            usleep(1000);
        }
    }
    cap_free(z->in);
    if (spare <= 0)
        spare = z->spare; /* the zygote died holding it (or never named it at the SHUTDOWN) */
    if (spare > 0) {
        int st;
        kill(spare, SIGKILL);
        while (waitpid(spare, &st, 0) < 0 && errno == EINTR)
            ;
    }
    cap_free(z);
    pyw_reap_wait(); /* workers closed before: their reaps are done when the zygote is closed */
}
