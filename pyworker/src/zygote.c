/*
 * zygote.c - the client of a zygote (fork server) process.
 *
 * The zygote is capsule-pyworker --zygote: one initialised interpreter (runtime, asyncio and the
 * namespace module imported, optional warm-up code run, gc.freeze()), single-threaded, forking
 * session workers on FORK frames. The new worker's socket travels with the FORK frame as
 * SCM_RIGHTS. The zygote double-forks and the intermediate child sends FORKED {pid} before it
 * exits, so the worker is reparented to this process (PR_SET_CHILD_SUBREAPER), which reaps it.
 * Invariants: the control socket is used from one thread at a time with blocking I/O and bounded
 * waits (poll); a zygote that stops answering is reported as CAP_EWORKER/CAP_ETIMEDOUT.
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

struct pyw_zygote {
    int sock;
    pid_t pid;
    uint64_t next_req;
};

/* Reads exactly n bytes with a deadline. */
static int read_deadline(int fd, void *p, size_t n, uint64_t deadline_ns)
{
    uint8_t *q = p;
    while (n) {
        uint64_t now = cap_now_ns();
        if (now >= deadline_ns)
            return CAP_ETIMEDOUT;
        struct pollfd pf = {fd, POLLIN, 0};
        int k = poll(&pf, 1, (int)((deadline_ns - now) / 1000000 + 1));
        if (k < 0 && errno != EINTR)
            return -errno;
        if (k <= 0)
            continue;
        ssize_t r = read(fd, q, n);
        if (r == 0)
            return CAP_EWORKER;
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        q += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Reads one frame from the zygote: type, id and a cap_malloc'd body. */
static int zread(pyw_zygote_t *z, uint64_t deadline, uint8_t *type, uint64_t *id, uint8_t **body,
                 size_t *blen)
{
    uint8_t h[PYW_HDR_SIZE];
    uint32_t len;
    int rc = read_deadline(z->sock, h, sizeof h, deadline);
    if (rc)
        return rc;
    if ((rc = pyw__hdr_parse(h, 1u << 20, &len, type, id)))
        return rc;
    uint8_t *b = cap_malloc(len - 9 + 1);
    if ((rc = read_deadline(z->sock, b, len - 9, deadline))) {
        cap_free(b);
        return rc;
    }
    *body = b;
    *blen = len - 9;
    return 0;
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
    if ((rc = zread(z, deadline, &type, &id, &body, &blen)))
        goto out;
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

int pyw_zygote_spawn(pyw_zygote_t *z, uv_loop_t *loop, const pyw_options_t *opt, pyw_worker_t **out)
{
    static const pyw_options_t defaults;
    pyw_wopts_t wo;
    char optstr[512];
    int sv[2] = {-1, -1}, rc;
    pyw_buf_t b;
    uint8_t *body = NULL;
    pyw__buf_init(&b);
    if (!opt)
        opt = &defaults;
    if (!z || z->sock < 0)
        return CAP_EWORKER;
    if ((rc = pyw__wopts_prepare(opt, &wo)))
        return rc;
    if ((rc = pyw__wopts_format(&wo, optstr, sizeof optstr)))
        goto out;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        rc = -errno;
        goto out;
    }
    uint64_t req = ++z->next_req;
    pyw__frame_begin(&b, PYW_F_FORK, req);
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
    close(sv[1]);
    sv[1] = -1;
    uint8_t type;
    uint64_t id;
    size_t blen;
    uint64_t deadline = cap_now_ns() + 5000000000ull;
    pyw_rd_t r;
    for (;;) {
        if ((rc = zread(z, deadline, &type, &id, &body, &blen))) {
            rc = CAP_EWORKER;
            goto out;
        }
        pyw__rd_init(&r, body, blen);
        uint32_t dead;
        if (!(type == PYW_F_FORKED && id == 0))
            break;
        /* a spare that died unused: it is our child (subreaper); reap it */
        if (pyw__get_u32(&r, &dead) == 0 && dead > 0) {
            int st;
            while (waitpid((pid_t)dead, &st, 0) < 0 && errno == EINTR)
                ;
        }
        cap_free(body);
        body = NULL;
    }
    if (type == PYW_F_ERROR) {
        uint32_t code;
        rc = pyw__get_u32(&r, &code) ? CAP_EWORKER : -(int)code;
        goto out;
    }
    uint32_t pid;
    if (type != PYW_F_FORKED || id != req || pyw__get_u32(&r, &pid) || pyw__rd_end(&r) ||
        pid == 0) {
        rc = CAP_EWORKER;
        goto out;
    }
    rc = pyw__worker_attach(loop, opt, sv[0], (pid_t)pid, wo.cgroup, out);
    sv[0] = -1;
    wo.cgroup[0] = 0; /* owned by the worker now */
out:
    pyw__buf_free(&b);
    cap_free(body);
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    pyw__cgroup_destroy(wo.cgroup);
    return rc;
}

int pyw_zygote_pid(const pyw_zygote_t *z)
{
    return (int)z->pid;
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
            uint8_t type, *body = NULL;
            uint64_t id;
            size_t blen;
            if (zread(z, deadline, &type, &id, &body, &blen))
                break;
            pyw_rd_t r;
            uint32_t pid;
            pyw__rd_init(&r, body, blen);
            if (type == PYW_F_FORKED && id == 0 && pyw__get_u32(&r, &pid) == 0 && pid > 0)
                spare = (pid_t)pid;
            cap_free(body);
        }
        close(z->sock); /* the zygote exits on EOF too */
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
    if (spare > 0) {
        int st;
        kill(spare, SIGKILL);
        while (waitpid(spare, &st, 0) < 0 && errno == EINTR)
            ;
    }
    cap_free(z);
}
