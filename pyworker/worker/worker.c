/*
 * worker.c - capsule-pyworker: the worker executable embedding Debian's libpython3.11. When
 * capsule-pyworker-host.so (this file built with PYW_HOSTED) sits next to it, it exec()s
 * /usr/bin/python3.11 on that module instead, so cells run on Debian's PGO+LTO interpreter (see
 * "running on /usr/bin/python3.11's interpreter" at the end).
 *
 * Two modes:
 *   capsule-pyworker --fd N [--opts LIST]      a session worker on the inherited socket N
 *   capsule-pyworker --zygote --fd N [--warmup CODE]
 *                                              a fork server: forks session workers on request
 *
 * Threads of a session worker (none exist in a zygote, which must be single-threaded to fork):
 *   - the main thread is Python's main thread: it runs cells, snapshots and applies from a job
 *     queue (so SIGINT-driven KeyboardInterrupt, signal handlers and asyncio work as in a script),
 *     and reads the socket itself while it is idle (a short cell costs one wake-up);
 *   - the protocol thread reads the socket while a job has run 10 ms or waits for input or a
 *     step (see "socket ownership"): it answers PING, queues work, routes input replies and
 *     cancels (a cancel sets a flag and sends SIGINT to the main thread: blocking syscalls return
 *     EINTR and the runtime's handler raises KeyboardInterrupt, or cancels an async cell's task;
 *     an interrupt the runtime has not acknowledged is re-delivered every 50 ms);
 *   - the fd reader thread forwards what C code and child processes write to fds 1 and 2 (pipes)
 *     and flushes partial lines of sys.stdout/sys.stderr after 1 ms.
 * The zygote keeps one pre-forked spare worker, handed the socket and options on FORK.
 * Invariants: frames are written whole under send_mu and never exceed the frame limit; one
 * thread at a time reads the socket, whole frames only; the protocol and reader threads block
 * SIGINT and never take the GIL; a process forked by user code
 * (os.fork) is not the worker: it closes the socket and its sys.stdout writes go to fd 1 (the
 * capture pipe) instead; malformed frames are answered with ERROR frames and skipped, never
 * fatal; the zygote never holds a worker's socket when it forks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cap.h"
#include "pyw_proto.h"

#include <marshal.h>
#ifdef CAPSULE_SANITIZE
#include <sanitizer/common_interface_defs.h>
#endif

#include "pyw_embedded.h" /* generated: sources and marshalled code (NULL when absent) */

/* ---- process state ---- */
static int g_sock = -1;                 /* the engine socket */
static int g_logfd = 2;                 /* the original stderr, kept for our own diagnostics */
static int g_pipe_rd[3] = {-1, -1, -1}; /* read ends of the fd 1 / fd 2 capture pipes */
static uint32_t g_max_frame = PYW_DEFAULT_MAX_FRAME;
static pyw_wopts_t g_opts;
static pthread_t g_main_thread;
static atomic_int g_is_worker;    /* 1 in a session worker (not the zygote, not a forked child) */
static atomic_int g_forked_child; /* 1 in a process forked by user code */
static pthread_mutex_t g_send_mu = PTHREAD_MUTEX_INITIALIZER;

/* fd capture, under g_cap_mu: the bytes the reader thread has read from each capture pipe ([0]
 * fd 1, [1] fd 2) and the bytes of those it has sent; whether the reader thread has stopped.
 * g_out_id: the execution id output is sent under (set when a cell starts, cleared when its last
 * output is out: see capture_end_exec) */
static pthread_mutex_t g_cap_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cap_cv = PTHREAD_COND_INITIALIZER;
static uint64_t g_cap_read[2], g_cap_sent[2];
static int g_cap_dead;
static _Atomic uint64_t g_out_id;

/* the job queue (main thread consumes) */
typedef struct job {
    struct job *next;
    uint8_t type;
    uint64_t id;
    char *cell_id;
    char *data;
    size_t len;
} job_t;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static job_t *g_head, **g_tail = &g_head;
static uint64_t g_running_id;     /* execution id of the running cell, 0 if none */
static int g_running;             /* a cell is running */
static atomic_int g_cancel_flag;  /* the running cell was asked to stop */
static atomic_int g_interrupt;    /* one KeyboardInterrupt owed to the running cell */
static atomic_int g_cancel_acked; /* the runtime caught the interrupt (no re-delivery) */
static uint64_t g_interrupt_at;   /* when the last interrupt was sent (g_mu) */
#define REARM_NS 50000000ull      /* re-deliver an unacknowledged interrupt after 50 ms */
/* Who reads the socket (see "socket ownership" below); all under g_mu. */
enum { READER_MAIN, READER_PROTO };
static int g_reader = READER_MAIN;
static int g_busy;      /* the main thread is running a job (a cell, snapshot, apply) */
static int g_want_back; /* the main thread asked the protocol thread to hand the socket back */
static int g_engage_tfd = -1; /* timerfd: the protocol thread takes the socket when it fires */
static int g_back_efd = -1;   /* eventfd: the main thread wants the socket back */
#define ENGAGE_NS 10000000ull /* a job running this long gets the protocol thread reading */
/* input: one request outstanding at a time (input_mu serialises requesters) */
static pthread_mutex_t g_input_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_input_waiting, g_input_done, g_input_eof;
static uint64_t g_input_id;
static char *g_input_text;
static size_t g_input_len;

/* durable steps: one PROMISE outstanding at a time (g_prom_mu serialises requesters); the reply
 * fields are guarded by g_mu like input's */
static pthread_mutex_t g_prom_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_prom_waiting, g_prom_done;
static uint64_t g_prom_id, g_prom_num;
static uint8_t g_prom_state;
static uint32_t g_prom_attempts;
static char *g_prom_data;
static size_t g_prom_len;

static void wlog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void proto_engage_now(void);
static void wlog(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    int n = snprintf(buf, sizeof buf, "capsule[%d] WARN pyworker: ", (int)getpid());
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(g_logfd, buf, (size_t)n);
    (void)w;
}

/* ---- sending ---- */

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Sends a finished frame buffer. Thread-safe. A dead engine makes the worker exit. */
static void send_buf(pyw_buf_t *b)
{
    if (atomic_load(&g_forked_child) || g_sock < 0)
        return;
    pthread_mutex_lock(&g_send_mu);
    int rc = write_all(g_sock, b->p, b->len);
    pthread_mutex_unlock(&g_send_mu);
    if (rc < 0 && !atomic_load(&g_forked_child))
        _exit(0); /* the engine is gone: nothing to serve */
}

/* An ERROR frame about a frame of type `about` (0: none in particular) with id `id`. */
static void send_error(uint8_t about, uint64_t id, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void send_error(uint8_t about, uint64_t id, int code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_ERROR, id);
    pyw__put_u32(&b, (uint32_t)-code);
    pyw__put_cstr(&b, msg);
    pyw__put_u8(&b, about);
    pyw__frame_end(&b, 0);
    send_buf(&b);
    pyw__buf_free(&b);
}

static void send_empty(uint8_t type, uint64_t id)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, type, id);
    pyw__frame_end(&b, 0);
    send_buf(&b);
    pyw__buf_free(&b);
}

/* ---- fd 1 / fd 2 capture ---- */

static void send_stream(uint64_t id, int stream, const void *data, size_t len)
{
    pyw_buf_t b;
    /* split to stay below the frame limit (and at 1 MiB) */
    size_t chunk = 1u << 20;
    if (chunk > g_max_frame - 64)
        chunk = g_max_frame - 64;
    pyw__buf_init(&b);
    for (size_t off = 0; off < len || (len == 0 && off == 0); off += chunk) {
        size_t n = len - off < chunk ? len - off : chunk;
        b.len = 0;
        pyw__frame_begin(&b, PYW_F_STREAM, id);
        pyw__put_u8(&b, (uint8_t)stream);
        pyw__put_str(&b, (const uint8_t *)data + off, n);
        pyw__frame_end(&b, 0);
        send_buf(&b);
        if (len == 0)
            break;
    }
    pyw__buf_free(&b);
}

static uint64_t current_exec_id(void)
{
    pthread_mutex_lock(&g_mu);
    uint64_t id = g_running ? g_running_id : 0;
    pthread_mutex_unlock(&g_mu);
    return id;
}

/* sys.stdout/sys.stderr writes are coalesced per line: a write containing a newline (or 64 KiB
 * pending) goes out at once, a partial line within PEND_FLUSH_NS. Only one stream has pending
 * bytes at a time (the other is flushed first), so order holds.
 * The partial-line deadline is a timerfd in the reader thread's poll set, armed by the writer
 * when bytes become pending and disarmed when they are sent: print() writes its text and its
 * newline separately, and this way neither write wakes another thread (a wake-up pipe cost the
 * reader thread two wake-ups per print). g_cap_mu guards g_pend, g_timer_armed. */
#define PEND_FLUSH_NS 1000000ull
static pyw_buf_t g_pend[3];
static uint64_t g_pend_since;
static int g_flush_tfd = -1; /* timerfd: a partial line is due */
static int g_timer_armed;

static void flush_timer_set(uint64_t ns)
{
    struct itimerspec it = {{0, 0}, {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)}};
    (void)timerfd_settime(g_flush_tfd, 0, &it, NULL);
    g_timer_armed = ns != 0;
}

/* Output written while no cell runs (a thread that a cell started, printing after the cell
 * ended) is held here in order and sent under the next cell's id, before anything of that cell:
 * the engine drops output of no execution, and an execution's recorded output does not change
 * once it finished. At most BETWEEN_MAX bytes are held; the rest is counted, and a line on
 * stderr says how much was dropped. Chunks are [stream u8][length u32 LE][bytes]. g_cap_mu. */
#define BETWEEN_MAX 65536u
static pyw_buf_t g_between;
static size_t g_between_bytes;
static uint64_t g_between_dropped;

static void between_put_locked(int stream, const void *p, size_t n)
{
    if (n > BETWEEN_MAX - g_between_bytes) {
        g_between_dropped += n - (BETWEEN_MAX - g_between_bytes);
        n = BETWEEN_MAX - g_between_bytes;
    }
    if (n == 0)
        return;
    uint8_t h[5] = {(uint8_t)stream};
    cap_put_le32(h + 1, (uint32_t)n);
    pyw__put_raw(&g_between, h, sizeof h);
    pyw__put_raw(&g_between, p, n);
    g_between_bytes += n;
}

static void between_send_locked(uint64_t id)
{
    for (size_t off = 0; off + 5 <= g_between.len;) {
        uint32_t n = cap_get_le32(g_between.p + off + 1);
        send_stream(id, g_between.p[off], (const char *)g_between.p + off + 5, n);
        off += 5 + (size_t)n;
    }
    if (g_between_dropped) {
        char m[160];
        int k = snprintf(m, sizeof m,
                         "[capsule: %llu more bytes written between executions were dropped]\n",
                         (unsigned long long)g_between_dropped);
        send_stream(id, 2, m, (size_t)k);
    }
    g_between.len = 0;
    g_between_bytes = 0;
    g_between_dropped = 0;
}

static void pend_flush_locked(void)
{
    uint64_t id = atomic_load(&g_out_id);
    for (int i = 1; i <= 2; i++) {
        if (g_pend[i].len) {
            if (id)
                send_stream(id, i, g_pend[i].p, g_pend[i].len);
            else
                between_put_locked(i, g_pend[i].p, g_pend[i].len);
            g_pend[i].len = 0;
        }
    }
    if (g_timer_armed)
        flush_timer_set(0);
}

/* Waits until every byte written to fd 1/2 before this call has been sent, so fd-level output
 * written before a sys.stdout write, an input request or a result reaches the engine first.
 * Exact, no timing guess: the reader reads the pipes only under g_cap_mu and counts what it
 * reads, so (held here) what it has read plus what the pipes hold (FIONREAD) is all that was
 * written so far; the wait ends when it has sent that much. Bytes written after this call do not
 * count, so a child writing all the time does not hold the cell up, and the wait is bounded by
 * the bytes present now (at most the two pipes' capacity and the reader's 64 KiB buffer). With
 * no fd-level output it costs one poll. Holds g_cap_mu. */
static void drain_locked(void)
{
    if (g_pipe_rd[1] < 0)
        return;
    uint64_t want[2] = {g_cap_read[0], g_cap_read[1]};
    struct pollfd pf[2] = {{g_pipe_rd[1], POLLIN, 0}, {g_pipe_rd[2], POLLIN, 0}};
    if (poll(pf, 2, 0) > 0) {
        for (int i = 0; i < 2; i++) {
            int n = 0;
            if ((pf[i].revents & POLLIN) && ioctl(pf[i].fd, FIONREAD, &n) == 0 && n > 0)
                want[i] += (uint64_t)n;
        }
    }
    while (!g_cap_dead && (g_cap_sent[0] < want[0] || g_cap_sent[1] < want[1]))
        pthread_cond_wait(&g_cap_cv, &g_cap_mu);
}

/* Everything written so far (fds and sys.stdout/err) is sent: before input requests and
 * results. */
static void capture_drain(void)
{
    pthread_mutex_lock(&g_cap_mu);
    drain_locked();
    pend_flush_locked();
    pthread_mutex_unlock(&g_cap_mu);
}

/* The end of a cell: everything it wrote is sent under its id, then output is no execution's
 * (id 0: held for the next cell, see g_between). Clearing the id before this wait sent what the
 * reader forwarded during it under id 0. */
static void capture_end_exec(void)
{
    pthread_mutex_lock(&g_cap_mu);
    drain_locked();
    pend_flush_locked();
    atomic_store(&g_out_id, 0);
    pthread_mutex_unlock(&g_cap_mu);
}

/* A sys.stdout (1) / sys.stderr (2) write. */
static void capture_write(int stream, const char *data, size_t len)
{
    pthread_mutex_lock(&g_cap_mu);
    drain_locked();
    int other = stream == 1 ? 2 : 1;
    if (g_pend[other].len)
        pend_flush_locked();
    int was_empty = g_pend[stream].len == 0;
    pyw__put_raw(&g_pend[stream], data, len);
    if (memchr(data, '\n', len) || g_pend[stream].len >= 65536) {
        pend_flush_locked();
    } else if (was_empty) {
        g_pend_since = cap_now_ns();
        flush_timer_set(PEND_FLUSH_NS);
    }
    pthread_mutex_unlock(&g_cap_mu);
}

static void *reader_main(void *arg)
{
    (void)arg;
    char buf[65536];
    struct pollfd pf[3] = {
        {g_pipe_rd[1], POLLIN, 0}, {g_pipe_rd[2], POLLIN, 0}, {g_flush_tfd, POLLIN, 0}};
    for (;;) {
        int n = poll(pf, 3, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == ENOMEM || errno == EAGAIN) { /* a memory limit: try again */
                usleep(1000);
                continue;
            }
            wlog("the fd capture stops: poll: %s", strerror(errno));
            break;
        }
        if (pf[2].revents & POLLIN) {
            uint64_t expirations;
            ssize_t r = read(g_flush_tfd, &expirations, sizeof expirations);
            (void)r;
            pthread_mutex_lock(&g_cap_mu);
            if (g_pend[1].len || g_pend[2].len) {
                uint64_t el = cap_now_ns() - g_pend_since;
                if (el >= PEND_FLUSH_NS)
                    pend_flush_locked();
                else
                    flush_timer_set(PEND_FLUSH_NS - el);
            } else {
                g_timer_armed = 0;
            }
            pthread_mutex_unlock(&g_cap_mu);
        }
        for (int i = 0; i < 2; i++) {
            if (!(pf[i].revents & (POLLIN | POLLHUP)))
                continue;
            /* the read (non-blocking) and its count happen under g_cap_mu: see drain_locked */
            pthread_mutex_lock(&g_cap_mu);
            pend_flush_locked();
            ssize_t r = read(pf[i].fd, buf, sizeof buf);
            if (r > 0)
                g_cap_read[i] += (uint64_t)r;
            uint64_t id = atomic_load(&g_out_id);
            if (r > 0 && id == 0) { /* no cell runs: held for the next one */
                between_put_locked(i + 1, buf, (size_t)r);
                g_cap_sent[i] += (uint64_t)r;
                pthread_cond_broadcast(&g_cap_cv);
                pthread_mutex_unlock(&g_cap_mu);
                continue;
            }
            pthread_mutex_unlock(&g_cap_mu);
            if (r == 0) {
                pf[i].fd = -1; /* every write end is closed (user code closed fd 1/2): no more */
                continue;
            }
            if (r < 0)
                continue; /* EAGAIN, EINTR */
            send_stream(id, i + 1, buf, (size_t)r);
            pthread_mutex_lock(&g_cap_mu);
            g_cap_sent[i] += (uint64_t)r;
            pthread_cond_broadcast(&g_cap_cv);
            pthread_mutex_unlock(&g_cap_mu);
        }
    }
    pthread_mutex_lock(&g_cap_mu);
    g_cap_dead = 1;
    pthread_cond_broadcast(&g_cap_cv);
    pthread_mutex_unlock(&g_cap_mu);
    return NULL;
}

/* Replaces fds 1 and 2 with pipes read by the reader thread; keeps the old stderr for logs. */
static int capture_start(void)
{
    int rc = 0;
    g_between.len = g_between_bytes = 0; /* nothing of the process this one was forked from */
    g_between_dropped = 0;
    g_logfd = fcntl(2, F_DUPFD_CLOEXEC, 10);
    if (g_logfd < 0)
        g_logfd = 2;
#ifdef CAPSULE_SANITIZE
    /* sanitizer reports must not vanish into the capture pipe of a dying worker */
    __sanitizer_set_report_fd((void *)(intptr_t)g_logfd);
#endif
    for (int i = 1; i <= 2; i++) {
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0) {
            rc = -errno;
            goto out;
        }
        if (i == 1 &&
            (g_flush_tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK)) < 0) {
            rc = -errno;
            goto out;
        }
        if (dup2(p[1], i) < 0) {
            rc = -errno;
            close(p[0]);
            close(p[1]);
            goto out;
        }
        close(p[1]);
        g_pipe_rd[i] = p[0];
        /* the reader reads under g_cap_mu: a read must never block */
        if (fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK) < 0) {
            rc = -errno;
            goto out;
        }
    }
out:
    return rc;
}

/* ---- the _capsule module (called by _capsule_rt) ---- */

static PyObject *capmod_write(PyObject *self, PyObject *args)
{
    (void)self;
    int stream;
    PyObject *obj;
    const char *data;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "iO", &stream, &obj))
        return NULL;
    if (PyUnicode_Check(obj)) {
        data = PyUnicode_AsUTF8AndSize(obj, &len);
        if (!data)
            return NULL;
    } else if (PyBytes_Check(obj)) {
        data = PyBytes_AS_STRING(obj);
        len = PyBytes_GET_SIZE(obj);
    } else {
        PyErr_SetString(PyExc_TypeError, "str or bytes expected");
        return NULL;
    }
    if (stream != 1 && stream != 2)
        stream = 2;
    if (atomic_load(&g_forked_child) || !atomic_load(&g_is_worker)) {
        /* not the worker: plain fd writes (a forked child's go through the capture pipes) */
        Py_BEGIN_ALLOW_THREADS;
        (void)write_all(stream, (const uint8_t *)data, (size_t)len);
        Py_END_ALLOW_THREADS;
        Py_RETURN_NONE;
    }
    /* `obj` keeps `data` alive; the GIL is released for the socket write */
    Py_INCREF(obj);
    Py_BEGIN_ALLOW_THREADS;
    capture_write(stream, data, (size_t)len);
    Py_END_ALLOW_THREADS;
    Py_DECREF(obj);
    Py_RETURN_NONE;
}

static PyObject *capmod_input(PyObject *self, PyObject *args)
{
    (void)self;
    const char *prompt;
    Py_ssize_t plen;
    int password;
    PyObject *ret = NULL;
    if (!PyArg_ParseTuple(args, "s#p", &prompt, &plen, &password))
        return NULL;
    if (atomic_load(&g_forked_child) || !atomic_load(&g_is_worker)) {
        PyErr_SetString(PyExc_EOFError, "no input in this process");
        return NULL;
    }
    char *text = NULL;
    size_t tlen = 0;
    int eof = 0, cancelled = 0;
    Py_BEGIN_ALLOW_THREADS;
    pthread_mutex_lock(&g_input_mu);
    capture_drain();
    uint64_t id = current_exec_id();
    pthread_mutex_lock(&g_mu);
    g_input_waiting = 1;
    g_input_done = 0;
    g_input_id = id;
    pthread_mutex_unlock(&g_mu);
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_INPUT_REQ, id);
    pyw__put_u8(&b, (uint8_t)(password != 0));
    pyw__put_str(&b, prompt, (size_t)plen < 65536 ? (size_t)plen : 65536); /* bounded */
    pyw__frame_end(&b, 0);
    send_buf(&b);
    pyw__buf_free(&b);
    proto_engage_now(); /* the reply is read by the protocol thread */
    pthread_mutex_lock(&g_mu);
    while (!g_input_done && !atomic_load(&g_cancel_flag))
        pthread_cond_wait(&g_cv, &g_mu);
    if (g_input_done) {
        text = g_input_text;
        tlen = g_input_len;
        eof = g_input_eof;
        g_input_text = NULL;
    } else {
        cancelled = 1;
    }
    g_input_waiting = 0;
    pthread_mutex_unlock(&g_mu);
    pthread_mutex_unlock(&g_input_mu);
    Py_END_ALLOW_THREADS;
    if (cancelled) {
        atomic_store(&g_interrupt, 0); /* delivered here: the SIGINT handler owes nothing */
        PyErr_SetNone(PyExc_KeyboardInterrupt);
    } else if (eof) {
        ret = Py_NewRef(Py_None);
    } else {
        ret = PyUnicode_DecodeUTF8(text ? text : "", (Py_ssize_t)tlen, "replace");
    }
    cap_free(text);
    return ret;
}

static void prom_frame(pyw_buf_t *b, uint64_t id, int op, unsigned int attempts,
                       unsigned long long num, const char *name, size_t nlen, const char *label,
                       size_t llen, const Py_buffer *data)
{
    pyw__frame_begin(b, PYW_F_PROMISE, id);
    pyw__put_u8(b, (uint8_t)op);
    pyw__put_u32(b, attempts);
    pyw__put_u64(b, num);
    pyw__put_str(b, name, nlen);
    pyw__put_str(b, label, llen);
    pyw__put_str(b, data->buf, (size_t)data->len);
    pyw__frame_end(b, 0);
}

/* promise(op, name, label, attempts, num, data) -> (state, attempts, num, data bytes): one durable
 * step operation of the running cell, answered by the engine once its effect is durable (a PROMISE
 * frame, then a wait like input()'s; a cancel raises KeyboardInterrupt). START (the running mark)
 * is sent without waiting and returns None. */
static PyObject *capmod_promise(PyObject *self, PyObject *args)
{
    (void)self;
    int op;
    unsigned int attempts;
    unsigned long long num;
    const char *name, *label;
    Py_ssize_t nlen, llen;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "is#s#IKy*", &op, &name, &nlen, &label, &llen, &attempts, &num,
                          &data))
        return NULL;
    if (atomic_load(&g_forked_child) || !atomic_load(&g_is_worker) || !current_exec_id()) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "durable steps run only inside a capsule execution");
        return NULL;
    }
    if ((size_t)data.len + (size_t)nlen + (size_t)llen + 64 > g_max_frame) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "step value of %zd bytes exceeds the frame limit (%u)",
                     data.len, g_max_frame);
        return NULL;
    }
    char *rdata = NULL;
    size_t rlen = 0;
    uint8_t state = 0;
    uint32_t rattempts = 0;
    uint64_t rnum = 0;
    int cancelled = 0;
    if (op == PYW_PO_START) { /* the running mark: no answer comes, nothing to wait for */
        uint64_t id = current_exec_id();
        Py_BEGIN_ALLOW_THREADS;
        pyw_buf_t b;
        pyw__buf_init(&b);
        prom_frame(&b, id, op, attempts, num, name, (size_t)nlen, label, (size_t)llen, &data);
        send_buf(&b);
        pyw__buf_free(&b);
        Py_END_ALLOW_THREADS;
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS;
    pthread_mutex_lock(&g_prom_mu);
    uint64_t id = current_exec_id();
    pthread_mutex_lock(&g_mu);
    g_prom_waiting = 1;
    g_prom_done = 0;
    g_prom_id = id;
    pthread_mutex_unlock(&g_mu);
    pyw_buf_t b;
    pyw__buf_init(&b);
    prom_frame(&b, id, op, attempts, num, name, (size_t)nlen, label, (size_t)llen, &data);
    send_buf(&b);
    pyw__buf_free(&b);
    proto_engage_now();
    pthread_mutex_lock(&g_mu);
    while (!g_prom_done && !atomic_load(&g_cancel_flag))
        pthread_cond_wait(&g_cv, &g_mu);
    if (g_prom_done) {
        state = g_prom_state;
        rattempts = g_prom_attempts;
        rnum = g_prom_num;
        rdata = g_prom_data;
        rlen = g_prom_len;
        g_prom_data = NULL;
    } else {
        cancelled = 1;
    }
    g_prom_waiting = 0;
    pthread_mutex_unlock(&g_mu);
    pthread_mutex_unlock(&g_prom_mu);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&data);
    PyObject *ret = NULL;
    if (cancelled) {
        atomic_store(&g_interrupt, 0);
        PyErr_SetNone(PyExc_KeyboardInterrupt);
    } else {
        ret = Py_BuildValue("iIKy#", (int)state, rattempts, rnum, rdata ? rdata : "",
                            (Py_ssize_t)rlen);
    }
    cap_free(rdata);
    return ret;
}

static PyObject *capmod_exec_id(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromUnsignedLongLong(current_exec_id());
}

static PyObject *capmod_flush(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    if (atomic_load(&g_is_worker) && !atomic_load(&g_forked_child)) {
        Py_BEGIN_ALLOW_THREADS;
        pthread_mutex_lock(&g_cap_mu);
        pend_flush_locked();
        pthread_mutex_unlock(&g_cap_mu);
        Py_END_ALLOW_THREADS;
    }
    Py_RETURN_NONE;
}

static PyObject *capmod_cancel_requested(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(atomic_load(&g_cancel_flag));
}

static PyObject *capmod_take_interrupt(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(atomic_exchange(&g_interrupt, 0));
}

static PyObject *capmod_cancel_ack(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    if (atomic_load(&g_cancel_flag)) {
        atomic_store(&g_cancel_acked, 1);
        atomic_store(&g_interrupt, 0);
    }
    Py_RETURN_NONE;
}

static PyObject *capmod_forked_child(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    if (atomic_load(&g_is_worker)) {
        atomic_store(&g_forked_child, 1);
        if (g_sock >= 0)
            close(g_sock);
        g_sock = -1;
        for (int i = 1; i <= 2; i++)
            if (g_pipe_rd[i] >= 0)
                close(g_pipe_rd[i]);
        g_pipe_rd[1] = g_pipe_rd[2] = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *capmod_hash64(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint64_t h = cap_hash64(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

/* same_items(d, keys, values): True when dict d holds, in its iteration order, exactly the
 * objects of list keys, each bound to the object at the same index of list values (identity
 * only: no __eq__ or __hash__ of user objects runs). The namespace module's test for "no name
 * was added, deleted or rebound since the last cell" in one pass instead of three lists. */
static PyObject *capmod_same_items(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyDict_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "same_items(dict, list, list)");
        return NULL;
    }
    PyObject *keys = args[1], *vals = args[2], *k, *v;
    Py_ssize_t n = PyList_GET_SIZE(keys), pos = 0, i = 0;
    if (PyDict_GET_SIZE(args[0]) != n || PyList_GET_SIZE(vals) != n)
        Py_RETURN_FALSE;
    while (PyDict_Next(args[0], &pos, &k, &v)) {
        if (i >= n || k != PyList_GET_ITEM(keys, i) || v != PyList_GET_ITEM(vals, i))
            Py_RETURN_FALSE;
        i++;
    }
    return PyBool_FromLong(i == n);
}

static PyMethodDef capmod_methods[] = {
    {"write", capmod_write, METH_VARARGS, "write(stream, str|bytes): send an output chunk"},
    {"input", capmod_input, METH_VARARGS, "input(prompt, password) -> str, or None at EOF"},
    {"flush", capmod_flush, METH_NOARGS, "send a pending partial line now"},
    {"cancel_requested", capmod_cancel_requested, METH_NOARGS, "the running cell was cancelled"},
    {"take_interrupt", capmod_take_interrupt, METH_NOARGS, "consume the owed interrupt"},
    {"cancel_ack", capmod_cancel_ack, METH_NOARGS, "the interrupt reached the runtime"},
    {"forked_child", capmod_forked_child, METH_NOARGS, "os.register_at_fork child hook"},
    {"hash64", capmod_hash64, METH_O, "XXH3-64 of a bytes-like object"},
    {"same_items", (PyCFunction)(void (*)(void))capmod_same_items, METH_FASTCALL,
     "same_items(dict, keys, values): the dict holds exactly these items, by identity"},
    {"promise", capmod_promise, METH_VARARGS,
     "promise(op, name, label, attempts, num, data) -> (state, attempts, num, data): a durable "
     "step"},
    {"exec_id", capmod_exec_id, METH_NOARGS, "the running cell's execution id (0 if none)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef capmod_def = {
    PyModuleDef_HEAD_INIT,
    "_capsule",
    "capsule worker internals",
    -1,
    capmod_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

static PyObject *capmod_init(void)
{
    return PyModule_Create(&capmod_def);
}

/* ---- interpreter start-up ---- */

static PyObject *g_rt; /* the _capsule_rt module */

static int py_status_check(PyStatus st, const char *what) __attribute__((unused));
static int py_status_check(PyStatus st, const char *what)
{
    if (PyStatus_Exception(st)) {
        wlog("%s: %s", what, st.err_msg ? st.err_msg : "failed");
        return CAP_EWORKER;
    }
    return 0;
}

/* Creates module `name` from its embedded marshalled code when the bytecode magic matches this
 * libpython, else from its embedded source, and registers it in sys.modules. */
static int load_embedded(const char *name, const char *src, const unsigned char *code_bytes,
                         size_t code_len, const char *filename)
{
    int rc = CAP_EWORKER;
    PyObject *code = NULL, *mod = NULL;
    long magic = PyImport_GetMagicNumber();
    if (code_bytes && code_len > 4 && magic != -1 && (long)cap_get_le32(code_bytes) == magic) {
        code = PyMarshal_ReadObjectFromString((const char *)code_bytes + 4,
                                              (Py_ssize_t)(code_len - 4));
        if (!code)
            PyErr_Clear();
    }
    if (!code)
        code = Py_CompileString(src, filename, Py_file_input);
    if (!code)
        goto out;
    mod = PyImport_ExecCodeModuleEx(name, code, filename);
    if (!mod)
        goto out;
    rc = 0;
out:
    if (rc)
        PyErr_Print();
    Py_XDECREF(mod);
    Py_XDECREF(code);
    return rc;
}

static const wchar_t *const g_paths[] = {
    L"/usr/lib/python311.zip",          L"/usr/lib/python3.11",
    L"/usr/lib/python3.11/lib-dynload", L"/usr/local/lib/python3.11/dist-packages",
    L"/usr/lib/python3/dist-packages",
};

#ifdef PYW_HOSTED
/* The interpreter is /usr/bin/python3.11's own, already running (-I -S -B, see host_exec): give
 * it the state py_start's PyConfig gives the standalone worker: the same module search path,
 * sys.argv [''], a __main__ without the bootstrap's names, and the _capsule module. */
static int py_host_setup(void)
{
    PyObject *path = PyList_New(0), *argv = Py_BuildValue("[s]", "");
    int ok = path && argv;
    for (size_t i = 0; ok && i < sizeof g_paths / sizeof g_paths[0]; i++) {
        PyObject *u = PyUnicode_FromWideChar(g_paths[i], -1);
        ok = u && PyList_Append(path, u) == 0;
        Py_XDECREF(u);
    }
    ok = ok && PySys_SetObject("path", path) == 0 && PySys_SetObject("argv", argv) == 0;
    Py_XDECREF(path);
    Py_XDECREF(argv);
    PyObject *main_dict = PyModule_GetDict(PyImport_AddModule("__main__")); /* borrowed */
    PyObject *keys = ok ? PyDict_Keys(main_dict) : NULL;
    for (Py_ssize_t i = 0; keys && i < PyList_GET_SIZE(keys); i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        const char *c = PyUnicode_Check(k) ? PyUnicode_AsUTF8(k) : NULL;
        if (c && !(c[0] == '_' && c[1] == '_'))
            ok = ok && PyDict_DelItem(main_dict, k) == 0;
    }
    Py_XDECREF(keys);
    PyObject *mod = ok ? capmod_init() : NULL;
    ok = mod && PyDict_SetItemString(PyImport_GetModuleDict(), "_capsule", mod) == 0;
    Py_XDECREF(mod);
    if (!ok) {
        PyErr_Print();
        return CAP_EWORKER;
    }
    return 0;
}
#endif

static int py_start(int preload)
{
    int rc;
#ifdef PYW_HOSTED
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config); /* cleared at out: (nothing set) */
    if ((rc = py_host_setup()))
        goto out;
#else
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.install_signal_handlers = 0;
    config.site_import = 0;
    config.parse_argv = 0;
    config.write_bytecode = 0;
    config.user_site_directory = 0;
    config.module_search_paths_set = 1;
    for (size_t i = 0; i < sizeof g_paths / sizeof g_paths[0]; i++) {
        if ((rc = py_status_check(PyWideStringList_Append(&config.module_search_paths, g_paths[i]),
                                  "module search path")))
            goto out;
    }
    if ((rc = py_status_check(PyConfig_SetString(&config, &config.home, L"/usr"), "home")))
        goto out;
    if ((rc = py_status_check(
             PyConfig_SetString(&config, &config.executable, L"/usr/bin/python3.11"), "exe")))
        goto out;
    if ((rc = py_status_check(
             PyConfig_SetString(&config, &config.program_name, L"/usr/bin/python3.11"),
             "program name")))
        goto out;
    if (PyImport_AppendInittab("_capsule", capmod_init) < 0) {
        rc = CAP_EWORKER;
        goto out;
    }
    if ((rc = py_status_check(Py_InitializeFromConfig(&config), "Py_InitializeFromConfig")))
        goto out;
#endif
    if (pyw_src_ns && (rc = load_embedded("_capsule_ns", pyw_src_ns, pyw_code_ns, pyw_code_ns_len,
                                          "<capsule-ns>"))) {
        /* the namespace module failed to import: the runtime reports it with every delta */
        PyErr_Clear();
        rc = 0;
    }
    if (pyw_src_tk && (rc = load_embedded("capsule", pyw_src_tk, pyw_code_tk, pyw_code_tk_len,
                                          "<capsule-task>"))) {
        /* durable tasks unavailable: `import capsule` then fails in sessions */
        PyErr_Clear();
        rc = 0;
    }
    if ((rc = load_embedded("_capsule_rt", pyw_src_rt, pyw_code_rt, pyw_code_rt_len,
                            "<capsule-rt>")))
        goto out;
    g_rt = PyImport_ImportModule("_capsule_rt");
    if (!g_rt) {
        PyErr_Print();
        rc = CAP_EWORKER;
        goto out;
    }
    PyObject *main_mod = PyImport_AddModule("__main__"); /* borrowed */
    PyObject *limits = PyDict_New();
    PyObject *r =
        PyObject_CallMethod(g_rt, "init", "ONi", PyModule_GetDict(main_mod), limits, preload);
    if (!r) {
        PyErr_Print();
        rc = CAP_EWORKER;
        goto out;
    }
    Py_DECREF(r);
out:
    PyConfig_Clear(&config);
    return rc;
}

/* ---- limits ---- */

static int write_file(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = write_all(fd, (const uint8_t *)s, strlen(s));
    close(fd);
    return rc;
}

/* Joins the cgroup named in the options (the client created it and set pids.max). */
static int join_cgroup(void)
{
    char path[300], pid[32];
    if (!g_opts.cgroup[0])
        return 0;
    snprintf(path, sizeof path, "%s/cgroup.procs", g_opts.cgroup);
    snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    return write_file(path, pid);
}

static int set_limit(int res, uint64_t soft, uint64_t hard)
{
    struct rlimit rl = {.rlim_cur = soft, .rlim_max = hard};
    return setrlimit(res, &rl) < 0 ? -errno : 0;
}

static int apply_limits(void)
{
    int rc = 0;
    if (g_opts.mem && (rc = set_limit(RLIMIT_AS, g_opts.mem, g_opts.mem)))
        goto out;
    if (g_opts.cpu && (rc = set_limit(RLIMIT_CPU, g_opts.cpu, (uint64_t)g_opts.cpu + 2)))
        goto out;
    if (g_opts.nofile && (rc = set_limit(RLIMIT_NOFILE, g_opts.nofile, g_opts.nofile)))
        goto out;
    if (g_opts.fsize && (rc = set_limit(RLIMIT_FSIZE, g_opts.fsize, g_opts.fsize)))
        goto out;
    /* without a cgroup the client asked for RLIMIT_NPROC (it checked we are not root) */
    if (g_opts.nproc && !g_opts.cgroup[0] &&
        (rc = set_limit(RLIMIT_NPROC, g_opts.nproc, g_opts.nproc)))
        goto out;
    /* Tell the runtime the limits so it can name them in error messages. */
    PyGILState_STATE gs = PyGILState_Ensure();
    PyObject *d = Py_BuildValue("{s:K,s:I,s:I,s:K,s:I,s:I}", "mem", (unsigned long long)g_opts.mem,
                                "cpu", g_opts.cpu, "nofile", g_opts.nofile, "fsize",
                                (unsigned long long)g_opts.fsize, "nproc", g_opts.nproc, "maxframe",
                                g_max_frame);
    PyObject *r = d ? PyObject_CallMethod(g_rt, "set_limits", "O", d) : NULL;
    if (!r)
        PyErr_Clear();
    Py_XDECREF(r);
    Py_XDECREF(d);
    PyGILState_Release(gs);
out:
    return rc;
}

/* ---- the protocol thread ---- */

static int read_full(int fd, void *p, size_t n)
{
    uint8_t *q = p;
    while (n) {
        ssize_t r = read(fd, q, n);
        if (r == 0)
            return CAP_ECLOSED;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        q += r;
        n -= (size_t)r;
    }
    return 0;
}

static int skip_bytes(int fd, uint64_t n)
{
    uint8_t buf[4096];
    while (n) {
        size_t k = n < sizeof buf ? (size_t)n : sizeof buf;
        int rc = read_full(fd, buf, k);
        if (rc)
            return rc;
        n -= k;
    }
    return 0;
}

static void job_push(job_t *j)
{
    pthread_mutex_lock(&g_mu);
    *g_tail = j;
    g_tail = &j->next;
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

static void job_free(job_t *j)
{
    if (!j)
        return;
    cap_free(j->cell_id);
    cap_free(j->data);
    cap_free(j);
}

static void send_result_simple(uint64_t id, int status, const char *etype, const char *emsg)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_RESULT, id);
    pyw__put_u8(&b, (uint8_t)status);
    pyw__put_u32(&b, 0);
    pyw__put_u64(&b, 0);
    pyw__put_cstr(&b, NULL);
    pyw__put_cstr(&b, NULL);
    pyw__put_cstr(&b, etype);
    pyw__put_cstr(&b, emsg);
    pyw__put_cstr(&b, NULL);
    pyw__put_u8(&b, PYW_RF_ERROR | PYW_RF_NOT_RUN);
    pyw__put_cstr(&b, "the cell did not run");
    pyw__frame_end(&b, 0);
    send_buf(&b);
    pyw__buf_free(&b);
}

static void handle_cancel(uint64_t id)
{
    job_t *dropped = NULL;
    pthread_mutex_lock(&g_mu);
    if (g_running && g_running_id == id && !atomic_load(&g_cancel_flag)) {
        atomic_store(&g_interrupt, 1);
        atomic_store(&g_cancel_flag, 1);
        g_interrupt_at = cap_now_ns();
        pthread_cond_broadcast(&g_cv); /* wakes an input() wait */
        pthread_kill(g_main_thread, SIGINT);
    } else {
        for (job_t **pp = &g_head; *pp; pp = &(*pp)->next) {
            if ((*pp)->type == PYW_F_EXECUTE && (*pp)->id == id) {
                dropped = *pp;
                *pp = dropped->next;
                if (g_tail == &dropped->next)
                    g_tail = pp;
                break;
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (dropped) {
        send_result_simple(id, PYW_RS_CANCELLED, "KeyboardInterrupt", "cancelled before it ran");
        job_free(dropped);
    }
}

/* Handles one well-framed message. Malformed bodies get an ERROR frame. */
static void dispatch(uint8_t type, uint64_t id, const uint8_t *body, size_t len)
{
    pyw_rd_t r;
    pyw__rd_init(&r, body, len);
    switch (type) {
    case PYW_F_EXECUTE: {
        job_t *j = cap_calloc(1, sizeof *j);
        const uint8_t *src;
        size_t n;
        j->type = type;
        j->id = id;
        if (pyw__get_strdup(&r, &j->cell_id) || pyw__get_str(&r, &src, &n) || pyw__rd_end(&r)) {
            job_free(j);
            send_error(type, id, CAP_EPROTO, "malformed EXECUTE body");
            return;
        }
        j->data = cap_malloc(n + 1);
        memcpy(j->data, src, n);
        j->data[n] = 0;
        j->len = n;
        if (memchr(j->data, 0, n)) {
            job_free(j);
            send_error(type, id, CAP_EINVAL, "cell source contains a NUL byte");
            return;
        }
        job_push(j);
        return;
    }
    case PYW_F_APPLY: {
        const uint8_t *blob;
        size_t n;
        if (pyw__get_str(&r, &blob, &n) || pyw__rd_end(&r)) {
            send_error(type, id, CAP_EPROTO, "malformed APPLY body");
            return;
        }
        job_t *j = cap_calloc(1, sizeof *j);
        j->type = type;
        j->id = id;
        j->data = pyw__memdup0(blob, n);
        j->len = n;
        job_push(j);
        return;
    }
    case PYW_F_SNAPSHOT:
    case PYW_F_SHUTDOWN: {
        if (pyw__rd_end(&r)) {
            send_error(type, id, CAP_EPROTO, "unexpected body");
            return;
        }
        job_t *j = cap_calloc(1, sizeof *j);
        j->type = type;
        j->id = id;
        job_push(j);
        return;
    }
    case PYW_F_PING:
    case PYW_F_CANCEL:
        if (pyw__rd_end(&r)) {
            send_error(type, id, CAP_EPROTO, "unexpected body");
            return;
        }
        if (type == PYW_F_PING)
            send_empty(PYW_F_PONG, id);
        else
            handle_cancel(id);
        return;
    case PYW_F_INPUT_REPLY: {
        uint8_t eof;
        const uint8_t *text;
        size_t n;
        if (pyw__get_u8(&r, &eof) || pyw__get_str(&r, &text, &n) || pyw__rd_end(&r)) {
            send_error(type, id, CAP_EPROTO, "malformed INPUT_REPLY body");
            return;
        }
        int ok = 0;
        pthread_mutex_lock(&g_mu);
        if (g_input_waiting && !g_input_done && g_input_id == id) {
            cap_free(g_input_text);
            g_input_text = pyw__memdup0(text, n);
            g_input_len = n;
            g_input_eof = eof != 0;
            g_input_done = 1;
            pthread_cond_broadcast(&g_cv);
            ok = 1;
        }
        pthread_mutex_unlock(&g_mu);
        if (!ok)
            send_error(type, id, CAP_ECONFLICT, "no input request pending for execution %llu",
                       (unsigned long long)id);
        return;
    }
    case PYW_F_PROMISE_REPLY: {
        uint8_t st;
        uint32_t att;
        uint64_t num;
        const uint8_t *d;
        size_t n;
        if (pyw__get_u8(&r, &st) || pyw__get_u32(&r, &att) || pyw__get_u64(&r, &num) ||
            pyw__get_str(&r, &d, &n) || pyw__rd_end(&r) || st > PYW_PS_FAILED) {
            send_error(type, id, CAP_EPROTO, "malformed PROMISE_REPLY body");
            return;
        }
        int ok = 0;
        pthread_mutex_lock(&g_mu);
        if (g_prom_waiting && !g_prom_done && g_prom_id == id) {
            cap_free(g_prom_data);
            g_prom_data = pyw__memdup0(d, n);
            g_prom_len = n;
            g_prom_state = st;
            g_prom_attempts = att;
            g_prom_num = num;
            g_prom_done = 1;
            pthread_cond_broadcast(&g_cv);
            ok = 1;
        }
        pthread_mutex_unlock(&g_mu);
        if (!ok)
            send_error(type, id, CAP_ECONFLICT, "no promise request pending for execution %llu",
                       (unsigned long long)id);
        return;
    }
    default:
        send_error(type, id, CAP_EPROTO, "unknown frame type 0x%02x", type);
        return;
    }
}

/* ---- socket ownership ----
 * One thread at a time reads the engine socket, whole frames only. An idle main thread reads it
 * itself, so a short job costs one wake-up (the main thread's read) instead of two (the protocol
 * thread's read, then the hand-off to the main thread). While a job runs, someone must still
 * answer PING, route input replies and deliver cancels: the main thread arms g_engage_tfd for
 * ENGAGE_NS when it starts a job (and fires it at once when the job waits for input or a step),
 * and the protocol thread, woken by it, takes the socket (g_reader = READER_PROTO) if a job is
 * still running. When that job ends, the main thread asks for the socket back (g_want_back and
 * g_back_efd); the protocol thread gives it back between two frames, unless a job runs again.
 * g_reader changes only under g_mu, from MAIN to PROTO only while g_busy (the main thread is
 * then not reading), from PROTO to MAIN only by the protocol thread between frames. */

/* Reads one frame and dispatches it. *body: the reader's buffer (grown as needed). Returns 0, or
 * nonzero when the socket is closed. */
static int serve_frame(uint8_t **body)
{
    uint8_t lenb[4];
    if (read_full(g_sock, lenb, 4))
        return -1;
    uint32_t len = cap_get_le32(lenb);
    if (len < PYW_MIN_LEN) {
        if (skip_bytes(g_sock, len))
            return -1;
        send_error(0, 0, CAP_EPROTO, "frame length %u below the minimum %u", len, PYW_MIN_LEN);
        return 0;
    }
    if (len > g_max_frame) {
        if (skip_bytes(g_sock, len))
            return -1;
        send_error(0, 0, CAP_ETOOBIG, "frame of %u bytes exceeds the limit of %u", len,
                   g_max_frame);
        return 0;
    }
    *body = cap_realloc(*body, len);
    if (read_full(g_sock, *body, len))
        return -1;
    dispatch((*body)[0], cap_get_le64(*body + 1), *body + 9, len - 9);
    return 0;
}

static void engage_timer_set(uint64_t ns)
{
    struct itimerspec it = {{0, 0}, {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)}};
    (void)timerfd_settime(g_engage_tfd, 0, &it, NULL);
}

/* A job waits on the engine (input, a step): the protocol thread must read now. */
static void proto_engage_now(void)
{
    pthread_mutex_lock(&g_mu);
    int need = g_reader == READER_MAIN && g_busy;
    pthread_mutex_unlock(&g_mu);
    if (need)
        engage_timer_set(1);
}

/* Serves the socket until the main thread takes it back. */
static void proto_serve(uint8_t **body)
{
    for (;;) {
        /* A KeyboardInterrupt raised where Python swallows it (a __del__, a GC callback) is lost:
         * while a cancelled cell has not acknowledged it, deliver it again every REARM_NS. */
        int pending, timeout = -1;
        pthread_mutex_lock(&g_mu);
        pending = g_running && atomic_load(&g_cancel_flag) && !atomic_load(&g_cancel_acked);
        if (pending && !atomic_load(&g_interrupt) && cap_now_ns() - g_interrupt_at >= REARM_NS) {
            atomic_store(&g_interrupt, 1);
            g_interrupt_at = cap_now_ns();
            pthread_kill(g_main_thread, SIGINT);
        }
        pthread_mutex_unlock(&g_mu);
        if (pending)
            timeout = (int)(REARM_NS / 1000000);
        struct pollfd pf[2] = {{g_sock, POLLIN, 0}, {g_back_efd, POLLIN, 0}};
        int n = poll(pf, 2, timeout);
        if (n < 0 && errno != EINTR)
            _exit(0);
        if (n > 0 && (pf[0].revents & (POLLIN | POLLHUP | POLLERR)) && serve_frame(body))
            _exit(0); /* the engine closed the socket (or died): nothing left to serve */
        if (n > 0 && (pf[1].revents & POLLIN)) {
            uint64_t v;
            ssize_t r = read(g_back_efd, &v, sizeof v);
            (void)r;
        }
        pthread_mutex_lock(&g_mu);
        int back = g_want_back && !g_busy;
        if (back) {
            g_want_back = 0;
            g_reader = READER_MAIN;
            pthread_cond_broadcast(&g_cv);
        }
        pthread_mutex_unlock(&g_mu);
        if (back)
            return;
    }
}

static void *proto_main(void *arg)
{
    (void)arg;
    uint8_t *body = NULL;
    for (;;) {
        struct pollfd pf = {g_engage_tfd, POLLIN, 0};
        if (poll(&pf, 1, -1) < 0 && errno != EINTR)
            break;
        uint64_t expirations;
        if (read(g_engage_tfd, &expirations, sizeof expirations) <= 0)
            continue;
        pthread_mutex_lock(&g_mu);
        int take = g_reader == READER_MAIN && g_busy;
        if (take)
            g_reader = READER_PROTO;
        pthread_mutex_unlock(&g_mu);
        if (take)
            proto_serve(&body);
    }
    _exit(0);
    return NULL;
}

/* ---- the main (execution) thread ---- */

static void put_names(pyw_buf_t *b, PyObject *list)
{
    Py_ssize_t n = list && PyList_Check(list) ? PyList_GET_SIZE(list) : 0;
    pyw__put_u32(b, (uint32_t)n);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t k = 0;
        const char *s = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(list, i), &k); /* borrowed */
        if (!s) {
            PyErr_Clear();
            s = "?";
            k = 1;
        }
        pyw__put_str(b, s, (size_t)k);
    }
}

static void put_pairs(pyw_buf_t *b, PyObject *list)
{
    Py_ssize_t n = list && PyList_Check(list) ? PyList_GET_SIZE(list) : 0;
    pyw__put_u32(b, (uint32_t)n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(list, i); /* borrowed */
        for (int k = 0; k < 2; k++) {
            PyObject *s =
                PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 2 ? PyTuple_GET_ITEM(t, k) : NULL;
            const char *c = s && PyUnicode_Check(s) ? PyUnicode_AsUTF8(s) : "?";
            if (!c) {
                PyErr_Clear();
                c = "?";
            }
            pyw__put_cstr(b, c);
        }
    }
}

static const char *opt_str(PyObject *o, Py_ssize_t *n)
{
    if (!o || o == Py_None || !PyUnicode_Check(o)) {
        *n = 0;
        return NULL;
    }
    const char *s = PyUnicode_AsUTF8AndSize(o, n);
    if (!s)
        PyErr_Clear();
    return s;
}

/* Encodes a delta tuple (blob, added, changed, mutated, deleted, unpicklable) or its absence. */
static void put_delta(pyw_buf_t *b, PyObject *delta, PyObject *err)
{
    int ok = delta && PyTuple_Check(delta) && PyTuple_GET_SIZE(delta) == 6 &&
             PyBytes_Check(PyTuple_GET_ITEM(delta, 0));
    Py_ssize_t n;
    const char *e = opt_str(err, &n);
    pyw__put_u8(b, (uint8_t)ok);
    pyw__put_str(b, e ? e : (ok ? "" : "no delta"), e ? (size_t)n : (ok ? 0 : 8));
    if (ok) {
        PyObject *blob = PyTuple_GET_ITEM(delta, 0);
        pyw__put_str(b, PyBytes_AS_STRING(blob), (size_t)PyBytes_GET_SIZE(blob));
        for (int i = 1; i <= 4; i++)
            put_names(b, PyTuple_GET_ITEM(delta, i));
        put_pairs(b, PyTuple_GET_ITEM(delta, 5));
    } else {
        pyw__put_str(b, "", 0);
        for (int i = 0; i < 5; i++)
            pyw__put_u32(b, 0);
    }
}

static void run_execute(job_t *j, uint32_t cell_no)
{
    pyw_buf_t b;
    pthread_mutex_lock(&g_cap_mu);
    atomic_store(&g_out_id, j->id); /* output from here on is this cell's */
    if (g_between.len || g_between_dropped)
        between_send_locked(j->id); /* first what was written since the last cell ended */
    pthread_mutex_unlock(&g_cap_mu);
    uint64_t t0 = cap_now_ns();
    PyObject *res = PyObject_CallMethod(g_rt, "run_cell", "Iss", cell_no, j->cell_id, j->data);
    uint64_t dt = cap_now_ns() - t0;
    if (atomic_load(&g_forked_child))
        _exit(0); /* a process forked by the cell: it is not the worker (locks may be held by
                   * threads that do not exist here, so touch nothing) */
    /* a cancel that arrives from here on must not interrupt anything else */
    pthread_mutex_lock(&g_mu);
    g_running = 0;
    int was_cancelled = atomic_load(&g_cancel_flag);
    atomic_store(&g_cancel_flag, 0);
    atomic_store(&g_interrupt, 0);
    atomic_store(&g_cancel_acked, 0);
    pthread_mutex_unlock(&g_mu);
    fflush(stdout);
    fflush(stderr);
    Py_BEGIN_ALLOW_THREADS;
    capture_end_exec();
    Py_END_ALLOW_THREADS;
    pyw__buf_init(&b);
    if (!res || !PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 9) {
        PyObject *et, *ev, *etb;
        /* a re-delivered interrupt that hit the runtime's own error path: still a cancel */
        int interrupted = was_cancelled && PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
        PyErr_Fetch(&et, &ev, &etb);
        PyObject *s = ev ? PyObject_Str(ev) : NULL;
        const char *msg = s ? PyUnicode_AsUTF8(s) : "internal error in the worker runtime";
        if (!msg) {
            PyErr_Clear();
            msg = "internal error";
        }
        if (!interrupted)
            wlog("run_cell failed: %s", msg);
        pyw__frame_begin(&b, PYW_F_RESULT, j->id);
        pyw__put_u8(&b, interrupted ? PYW_RS_CANCELLED : PYW_RS_ERROR);
        pyw__put_u32(&b, cell_no);
        pyw__put_u64(&b, dt);
        pyw__put_cstr(&b, NULL);
        pyw__put_cstr(&b, NULL);
        pyw__put_cstr(&b, et ? ((PyTypeObject *)et)->tp_name : "SystemError");
        pyw__put_cstr(&b, msg);
        pyw__put_cstr(&b, NULL);
        pyw__put_u8(&b, 4);
        pyw__put_cstr(&b, interrupted ? "interrupted while finishing the cell: no delta"
                                      : "the worker runtime failed");
        pyw__frame_end(&b, 0);
        Py_XDECREF(s);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(etb);
        goto out;
    }
    /* the delta first, then the result */
    PyObject *delta = PyTuple_GET_ITEM(res, 6), *derr = PyTuple_GET_ITEM(res, 7); /* borrowed */
    char too_big[160] = "";
    if (delta != Py_None) {
        pyw__frame_begin(&b, PYW_F_DELTA, j->id);
        put_delta(&b, delta, NULL);
        pyw__frame_end(&b, 0);
        if (b.len - 4 > g_max_frame) {
            /* never send a frame the engine must reject: report the delta as missing */
            snprintf(too_big, sizeof too_big,
                     "the delta (%zu bytes) exceeds the frame limit (%u bytes): not sent",
                     b.len - 4, g_max_frame);
            b.len = 0;
        }
    }
    size_t start = b.len;
    long status = PyLong_AsLong(PyTuple_GET_ITEM(res, 0));
    Py_ssize_t n;
    const char *s;
    uint8_t flags = 0;
    pyw__frame_begin(&b, PYW_F_RESULT, j->id);
    pyw__put_u8(&b, (uint8_t)status);
    pyw__put_u32(&b, cell_no);
    pyw__put_u64(&b, dt);
    for (int i = 1; i <= 5; i++) {
        s = opt_str(PyTuple_GET_ITEM(res, i), &n);
        if (s && i == 1)
            flags |= PYW_RF_REPR;
        if (s && i == 2)
            flags |= PYW_RF_JSON;
        if (s && i == 3)
            flags |= PYW_RF_ERROR;
        pyw__put_str(&b, s ? s : "", s ? (size_t)n : 0);
    }
    if (PyTuple_GET_ITEM(res, 8) == Py_False)
        flags |= PYW_RF_NOT_RUN;
    pyw__put_u8(&b, flags);
    s = too_big[0] ? too_big : opt_str(derr, &n);
    if (too_big[0])
        n = (Py_ssize_t)strlen(too_big);
    pyw__put_str(&b, s ? s : "", s ? (size_t)n : 0);
    pyw__frame_end(&b, start);
    if (b.len - start - 4 > g_max_frame) {
        /* the runtime bounds every text, so this is a last resort */
        b.len = start;
        pyw__frame_begin(&b, PYW_F_RESULT, j->id);
        pyw__put_u8(&b, PYW_RS_ERROR);
        pyw__put_u32(&b, cell_no);
        pyw__put_u64(&b, dt);
        pyw__put_cstr(&b, NULL);
        pyw__put_cstr(&b, NULL);
        pyw__put_cstr(&b, "ResultTooLarge");
        pyw__put_cstr(&b, "the result exceeds the frame limit");
        pyw__put_cstr(&b, NULL);
        pyw__put_u8(&b, 4);
        pyw__put_cstr(&b, too_big[0] ? too_big : NULL);
        pyw__frame_end(&b, start);
    }
out:
    Py_XDECREF(res);
    PyErr_Clear();
    Py_BEGIN_ALLOW_THREADS;
    send_buf(&b);
    Py_END_ALLOW_THREADS;
    pyw__buf_free(&b);
}

static void run_snapshot(job_t *j)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    PyObject *res = PyObject_CallMethod(g_rt, "snapshot", NULL);
    pyw__frame_begin(&b, PYW_F_SNAPSHOT_DATA, j->id);
    if (res && PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2) {
        put_delta(&b, PyTuple_GET_ITEM(res, 0), PyTuple_GET_ITEM(res, 1));
    } else {
        PyErr_Clear();
        put_delta(&b, NULL, NULL);
    }
    pyw__frame_end(&b, 0);
    if (b.len - 4 > g_max_frame) {
        char msg[160];
        snprintf(msg, sizeof msg, "the snapshot (%zu bytes) exceeds the frame limit (%u bytes)",
                 b.len - 4, g_max_frame);
        PyObject *m = PyUnicode_FromString(msg);
        b.len = 0;
        pyw__frame_begin(&b, PYW_F_SNAPSHOT_DATA, j->id);
        put_delta(&b, NULL, m);
        pyw__frame_end(&b, 0);
        Py_XDECREF(m);
    }
    Py_XDECREF(res);
    Py_BEGIN_ALLOW_THREADS;
    send_buf(&b);
    Py_END_ALLOW_THREADS;
    pyw__buf_free(&b);
}

static void run_apply(job_t *j)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    PyObject *blob = PyBytes_FromStringAndSize(j->data, (Py_ssize_t)j->len);
    PyObject *res = blob ? PyObject_CallMethod(g_rt, "apply", "O", blob) : NULL;
    pyw__frame_begin(&b, PYW_F_APPLIED, j->id);
    if (res && PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 4) {
        Py_ssize_t n;
        const char *e = opt_str(PyTuple_GET_ITEM(res, 0), &n);
        pyw__put_u8(&b, e == NULL);
        pyw__put_str(&b, e ? e : "", e ? (size_t)n : 0);
        put_names(&b, PyTuple_GET_ITEM(res, 1));
        put_names(&b, PyTuple_GET_ITEM(res, 2));
        put_pairs(&b, PyTuple_GET_ITEM(res, 3));
    } else {
        PyErr_Clear();
        pyw__put_u8(&b, 0);
        pyw__put_cstr(&b, "the worker runtime failed to apply");
        put_names(&b, NULL);
        put_names(&b, NULL);
        put_pairs(&b, NULL);
    }
    pyw__frame_end(&b, 0);
    Py_XDECREF(res);
    Py_XDECREF(blob);
    Py_BEGIN_ALLOW_THREADS;
    send_buf(&b);
    Py_END_ALLOW_THREADS;
    pyw__buf_free(&b);
}

static void send_ready(void)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_READY, 0);
    pyw__put_u32(&b, PYW_PROTOCOL_VERSION);
    pyw__put_u32(&b, (uint32_t)getpid());
    pyw__put_u32(&b, g_max_frame);
    pyw__put_cstr(&b, Py_GetVersion());
    pyw__frame_end(&b, 0);
    send_buf(&b);
    pyw__buf_free(&b);
}

/* Everything after the interpreter is up, in a cold worker or in a freshly forked one. Holds the
 * GIL on entry; never returns. */
static _Noreturn void worker_run(void)
{
    int rc;
    uint32_t cell_no = 0;
    pthread_t th;
    sigset_t block, old;

    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN); /* writes past RLIMIT_FSIZE fail with EFBIG instead of killing */
    if (g_opts.max_frame)
        g_max_frame = g_opts.max_frame < PYW_MIN_MAX_FRAME ? PYW_MIN_MAX_FRAME : g_opts.max_frame;
    if ((rc = apply_limits())) {
        send_error(0, 0, rc, "cannot apply the resource limits: %s", cap_strerror(rc));
        _exit(3);
    }
    if ((rc = capture_start())) {
        wlog("cannot capture fds 1 and 2: %s", cap_strerror(rc));
        _exit(3);
    }
    g_main_thread = pthread_self();
    atomic_store(&g_is_worker, 1);
    g_engage_tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    g_back_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (g_engage_tfd < 0 || g_back_efd < 0) {
        wlog("cannot create the worker's timerfd/eventfd: %s", strerror(errno));
        _exit(3);
    }
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    if (pthread_create(&th, NULL, reader_main, NULL) != 0 ||
        pthread_create(&th, NULL, proto_main, NULL) != 0) {
        wlog("cannot start the worker threads");
        _exit(3);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    send_ready();

    uint8_t *body = NULL; /* the main thread's frame buffer, while it reads the socket */
    for (;;) {
        job_t *j;
        int armed;
        Py_BEGIN_ALLOW_THREADS;
        pthread_mutex_lock(&g_mu);
        if (g_reader == READER_PROTO && !g_head) { /* idle: take the socket back */
            g_want_back = 1;
            pthread_mutex_unlock(&g_mu);
            uint64_t one = 1;
            ssize_t w = write(g_back_efd, &one, sizeof one);
            (void)w;
            pthread_mutex_lock(&g_mu);
        }
        while (!g_head) {
            if (g_reader == READER_MAIN) {
                pthread_mutex_unlock(&g_mu);
                if (serve_frame(&body))
                    _exit(0); /* the engine closed the socket (or died): nothing left to serve */
                pthread_mutex_lock(&g_mu);
            } else {
                pthread_cond_wait(&g_cv, &g_mu);
            }
        }
        j = g_head;
        g_head = j->next;
        if (!g_head)
            g_tail = &g_head;
        if (j->type == PYW_F_EXECUTE) {
            g_running = 1;
            g_running_id = j->id;
            atomic_store(&g_cancel_flag, 0);
            atomic_store(&g_cancel_acked, 0);
        }
        g_busy = 1;
        armed = g_reader == READER_MAIN;
        pthread_mutex_unlock(&g_mu);
        if (armed)
            engage_timer_set(ENGAGE_NS);
        Py_END_ALLOW_THREADS;
        switch (j->type) {
        case PYW_F_EXECUTE:
            run_execute(j, ++cell_no);
            break;
        case PYW_F_SNAPSHOT:
            run_snapshot(j);
            break;
        case PYW_F_APPLY:
            run_apply(j);
            break;
        case PYW_F_SHUTDOWN:
            fflush(NULL);
            Py_BEGIN_ALLOW_THREADS;
            capture_drain();
            Py_END_ALLOW_THREADS;
            _exit(0);
        }
        pthread_mutex_lock(&g_mu);
        g_busy = 0;
        pthread_mutex_unlock(&g_mu);
        if (armed)
            engage_timer_set(0);
        job_free(j);
        if (atomic_load(&g_forked_child))
            _exit(0); /* a process forked by the cell finished the cell: it is not the worker */
    }
}

/* ---- zygote ---- */

/* Reads one frame from the zygote's control socket; an SCM_RIGHTS fd, if any, into *fd. */
static int zygote_read(uint8_t *type, uint64_t *id, uint8_t **body, uint32_t *blen, int *fd)
{
    uint8_t lenb[4];
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {lenb, 4};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    *fd = -1;
    ssize_t r;
    do {
        r = recvmsg(g_sock, &msg, MSG_WAITALL | MSG_CMSG_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    if (r <= 0)
        return CAP_ECLOSED;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(fd, CMSG_DATA(c), sizeof(int));
    if (r < 4 && read_full(g_sock, lenb + r, (size_t)(4 - r)))
        return CAP_ECLOSED;
    uint32_t len = cap_get_le32(lenb);
    if (len < PYW_MIN_LEN || len > (1u << 20)) {
        if (skip_bytes(g_sock, len))
            return CAP_ECLOSED;
        return CAP_EPROTO;
    }
    uint8_t *b = cap_malloc(len);
    if (read_full(g_sock, b, len)) {
        cap_free(b);
        return CAP_ECLOSED;
    }
    *type = b[0];
    *id = cap_get_le64(b + 1);
    *body = b;
    *blen = len;
    return 0;
}

/* ---- the pre-forked spare worker ----
 * The zygote keeps one spare: a process forked (through an intermediate, so it is already the
 * engine's child) and past PyOS_AfterFork_Child, blocked on a SOCK_SEQPACKET pair until a FORK
 * hands it the worker socket (SCM_RIGHTS) and the options. Forking two processes and the
 * after-fork work are then off the critical path of a spawn; the next spare is made right after. */
static pid_t g_spare_pid = -1;
#define SPARE_IDLE_MS 5
static int g_spare_sock = -1;

static int send_with_fd(int sock, const void *data, size_t len, int fd)
{
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = {(void *)data, len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    ssize_t k;
    do {
        k = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (k < 0 && errno == EINTR);
    return k == (ssize_t)len ? 0 : -EPIPE;
}

/* In the spare: wait for activation, then become the worker. Never returns. */
static _Noreturn void spare_wait(int sp)
{
    char opts[600];
    int fd = -1;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {opts, sizeof opts - 1};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    ssize_t k;
    do {
        k = recvmsg(sp, &msg, MSG_CMSG_CLOEXEC);
    } while (k < 0 && errno == EINTR);
    if (k <= 0)
        _exit(0); /* the zygote is gone or retired this spare */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(c), sizeof(int));
    opts[k] = 0;
    close(sp);
    if (fd < 0 || pyw__wopts_parse(opts, &g_opts) != 0)
        _exit(4);
    g_sock = fd;
    if (join_cgroup() != 0)
        _exit(4);
    worker_run();
}

/* Throwaway cells in a scratch namespace (_capsule_rt.rehearse): the first-use work of a cell is
 * done here rather than in a session's first cell. */
static void rehearse(void)
{
    PyObject *r = PyObject_CallMethod(g_rt, "rehearse", NULL);
    if (!r)
        PyErr_Clear();
    Py_XDECREF(r);
}

/* Forks (zygote -> intermediate -> spare); the intermediate reports the spare's pid and exits.
 * The spare rehearses a cell before it waits (its copy-on-write faults off a session's path). */
static void spare_make(void)
{
    int sp[2];
    pid_t pid = -1;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0)
        return;
    PyOS_BeforeFork();
    pid_t a = fork();
    if (a == 0) {
        pid_t b = fork();
        if (b == 0) {
            PyOS_AfterFork_Child();
            setpgid(0, 0); /* its own process group, as a cold worker has */
            close(g_sock);
            close(sp[0]);
            rehearse();
            spare_wait(sp[1]);
        }
        ssize_t w = write(sp[1], &b, sizeof b);
        _exit(w == (ssize_t)sizeof b ? 0 : 1);
    }
    PyOS_AfterFork_Parent();
    close(sp[1]);
    if (a > 0) {
        int st;
        while (waitpid(a, &st, 0) < 0 && errno == EINTR)
            ;
        ssize_t r;
        do {
            r = read(sp[0], &pid, sizeof pid);
        } while (r < 0 && errno == EINTR);
        if (r != (ssize_t)sizeof pid)
            pid = -1;
    }
    if (pid > 0) {
        g_spare_pid = pid;
        g_spare_sock = sp[0];
    } else {
        close(sp[0]);
    }
}

static void send_forked(uint64_t id, pid_t pid)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_FORKED, id);
    pyw__put_u32(&b, (uint32_t)pid);
    pyw__frame_end(&b, 0);
    send_buf(&b);
    pyw__buf_free(&b);
}

/* Names the spare just made to the client (SPARE): should the zygote die, the client, the
 * spare's parent, kills and reaps it. */
static void spare_announce(void)
{
    if (g_spare_pid <= 0)
        return;
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, PYW_F_SPARE, 0);
    pyw__put_u32(&b, (uint32_t)g_spare_pid);
    pyw__frame_end(&b, 0);
    send_buf(&b);
    pyw__buf_free(&b);
}

/* Hands the FORK to the spare. Returns its pid, or -1 (no spare, or it is gone). */
static pid_t spare_use(const char *opts, int fd)
{
    pid_t pid = g_spare_pid;
    if (pid <= 0)
        return -1;
    int rc = send_with_fd(g_spare_sock, opts, strlen(opts), fd);
    close(g_spare_sock);
    g_spare_sock = -1;
    g_spare_pid = -1;
    if (rc != 0) {
        /* the spare died: the client, its parent, must reap it (FORKED with id 0) */
        kill(pid, SIGKILL);
        send_forked(0, pid);
        return -1;
    }
    return pid;
}

/* Leaving: the spare exits once its socket closes; tell the client its pid (FORKED with id 0)
 * so that the client, its parent, reaps it. */
static _Noreturn void zygote_exit(void)
{
    if (g_spare_pid > 0) {
        send_forked(0, g_spare_pid);
        kill(g_spare_pid, SIGKILL);
    }
    _exit(0);
}

static _Noreturn void zygote_run(void)
{
    /* single-threaded from here on: fork is safe */
    signal(SIGPIPE, SIG_IGN);
    rehearse(); /* what it makes lazily is inherited by every worker */
    PyObject *gc = PyImport_ImportModule("gc");
    PyObject *r = gc ? PyObject_CallMethod(gc, "freeze", NULL) : NULL;
    if (!r)
        PyErr_Clear();
    Py_XDECREF(r);
    Py_XDECREF(gc);
    spare_make();
    spare_announce(); /* before READY: the client knows the spare from its open on */
    send_ready();
    for (;;) {
        uint8_t type = 0, *body = NULL;
        uint64_t id = 0;
        uint32_t blen = 0;
        int fd = -1;
        /* Make the next spare after SPARE_IDLE_MS without requests: not at once, so that the
         * fork does not compete for the CPU with the worker that was just handed out (a burst of
         * requests is served by direct forks meanwhile). */
        if (g_spare_pid <= 0) {
            struct pollfd pf = {g_sock, POLLIN, 0};
            if (poll(&pf, 1, SPARE_IDLE_MS) == 0) {
                spare_make();
                spare_announce();
            }
        }
        int rc = zygote_read(&type, &id, &body, &blen, &fd);
        if (rc == CAP_ECLOSED)
            zygote_exit();
        if (rc) {
            send_error(0, 0, rc, "malformed frame");
            goto next;
        }
        if (type == PYW_F_SHUTDOWN)
            zygote_exit();
        if (type == PYW_F_PING) {
            send_empty(PYW_F_PONG, id);
            goto next;
        }
        if (type != PYW_F_FORK) {
            send_error(type, id, CAP_EPROTO, "unknown frame type 0x%02x for a zygote", type);
            goto next;
        }
        pyw_rd_t rd;
        char *opts = NULL;
        pyw_wopts_t wo;
        pyw__rd_init(&rd, body + 9, blen - 9);
        if (fd < 0 || pyw__get_strdup(&rd, &opts) || pyw__rd_end(&rd) ||
            pyw__wopts_parse(opts, &wo) || strlen(opts) >= 512) {
            send_error(PYW_F_FORK, id, CAP_EPROTO, "malformed FORK (options or socket missing)");
            cap_free(opts);
            goto next;
        }
        pid_t spare = spare_use(opts, fd);
        cap_free(opts);
        if (spare > 0) {
            send_forked(id, spare);
            goto next; /* the next spare is made once the zygote has been idle a moment */
        }
        /* no spare: fork one for this request directly. The intermediate child reports the
         * worker's pid to the zygote, which sends FORKED once it has reaped the intermediate:
         * the worker is then already reparented to the subreaper (the engine) when the client
         * adopts it (its getppid() is the engine from its first cell on). */
        int ip[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ip) < 0) {
            send_error(PYW_F_FORK, id, -errno, "socketpair failed");
            goto next;
        }
        PyOS_BeforeFork();
        pid_t a = fork();
        if (a == 0) {
            pid_t w = fork();
            if (w == 0) {
                PyOS_AfterFork_Child();
                setpgid(0, 0); /* its own process group, as a cold worker has */
                close(g_sock);
                close(ip[0]);
                close(ip[1]);
                if (g_spare_sock >= 0)
                    close(g_spare_sock);
                g_sock = fd;
                g_opts = wo;
                if (join_cgroup() != 0)
                    _exit(4);
                worker_run();
            }
            int v = w < 0 ? -errno : (int)w;
            ssize_t k = write(ip[1], &v, sizeof v);
            _exit(k == (ssize_t)sizeof v ? 0 : 1);
        }
        PyOS_AfterFork_Parent();
        close(ip[1]);
        if (a < 0) {
            send_error(PYW_F_FORK, id, -errno, "fork failed");
        } else {
            int st, v = -EIO;
            while (waitpid(a, &st, 0) < 0 && errno == EINTR)
                ;
            ssize_t k;
            do {
                k = read(ip[0], &v, sizeof v);
            } while (k < 0 && errno == EINTR);
            if (k != (ssize_t)sizeof v)
                v = -EIO;
            if (v > 0)
                send_forked(id, (pid_t)v);
            else
                send_error(PYW_F_FORK, id, v, "fork failed");
        }
        close(ip[0]);
    next:
        if (fd >= 0)
            close(fd);
        cap_free(body);
    }
}

/* The number of threads of this process (entries of /proc/self/task), or -1. */
static int count_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* ---- main ---- */

static void usage(void)
{
    fprintf(stderr, "usage: capsule-pyworker --fd N [--opts LIST]\n"
                    "       capsule-pyworker --zygote --fd N [--warmup CODE]\n");
}

static int worker_main(int argc, char **argv)
{
    int fd = -1, zygote = 0, rc;
    const char *opts = "", *warm = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--zygote") == 0) {
            zygote = 1;
        } else if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 0 || v > 65535) {
                usage();
                return 2;
            }
            fd = (int)v;
        } else if (strcmp(argv[i], "--opts") == 0 && i + 1 < argc) {
            opts = argv[++i];
        } else if (strcmp(argv[i], "--warmup") == 0 && i + 1 < argc) {
            warm = argv[++i];
        } else {
            usage();
            return 2;
        }
    }
    if (fd < 0 || fcntl(fd, F_GETFD) < 0) {
        usage();
        return 2;
    }
    if ((rc = pyw__wopts_parse(opts, &g_opts))) {
        fprintf(stderr, "capsule-pyworker: bad --opts '%s'\n", opts);
        return 2;
    }
    g_sock = fd;
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (!zygote && (rc = join_cgroup())) {
        fprintf(stderr, "capsule-pyworker: cannot join cgroup %s: %s\n", g_opts.cgroup,
                cap_strerror(rc));
        return 3;
    }
    if ((rc = py_start(zygote)))
        return 3;
    if (zygote) {
        if (warm) {
            PyObject *r = PyObject_CallMethod(g_rt, "warmup", "s", warm);
            if (!r) {
                PyErr_Print();
                return 4;
            }
            Py_DECREF(r);
        }
        int nthreads = count_threads();
        if (nthreads != 1) {
            fprintf(stderr,
                    "capsule-pyworker: the zygote must be single-threaded to fork, but %d "
                    "threads run (did the warm-up code start one?)\n",
                    nthreads);
            return 4;
        }
        zygote_run();
    }
    worker_run();
}

/* ---- running on /usr/bin/python3.11's interpreter ----
 * Debian's /usr/bin/python3.11 is built with PGO and LTO; the libpython3.11.a the standalone
 * worker links is not the same code: a CPU-bound loop executes ~6 % more instructions on it
 * (callgrind) and takes 6-11 % more CPU time. So the worker runs its Python on that executable:
 * the same C code built as an extension module (capsule-pyworker-host.so, PYW_HOSTED), which
 * capsule-pyworker exec()s into with a bootstrap that loads it and calls main(argv) (the pid,
 * the fds and the arguments stay; the process is renamed back to capsule-pyworker). Without the
 * module (the sanitizer build), or with CAPSULE_PYWORKER_HOST=0, the executable runs standalone
 * on the static library. */
#define PYW_HOST_PYTHON "/usr/bin/python3.11"

#ifdef PYW_HOSTED
#include <sys/prctl.h>

static PyObject *host_main(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyList_Check(arg) || PyList_GET_SIZE(arg) > 64) {
        PyErr_SetString(PyExc_TypeError, "main() wants the argument list");
        return NULL;
    }
    int argc = (int)PyList_GET_SIZE(arg) + 1;
    char *argv[66] = {"capsule-pyworker"};
    for (int i = 1; i < argc; i++) {
        PyObject *a = PyList_GET_ITEM(arg, i - 1);
        if (!PyUnicode_Check(a) || !(argv[i] = (char *)PyUnicode_AsUTF8(a)))
            return PyErr_Format(PyExc_TypeError, "argument %d is not a string", i);
    }
    argv[argc] = NULL;
    (void)prctl(PR_SET_NAME, "capsule-pyworker", 0, 0, 0);
    fflush(NULL);
    _exit(worker_main(argc, argv)); /* a worker never returns to the bootstrap */
}

static PyMethodDef host_methods[] = {
    {"main", host_main, METH_O, "Runs capsule-pyworker with these arguments; never returns."},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef host_def = {
    PyModuleDef_HEAD_INIT, "_capsule_worker", NULL, -1, host_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__capsule_worker(void);
PyMODINIT_FUNC PyInit__capsule_worker(void)
{
    return PyModule_Create(&host_def);
}
#else
/* exec()s /usr/bin/python3.11 on the host module next to this executable; returns if it cannot
 * (no module, CAPSULE_PYWORKER_HOST=0, exec failed): the worker then runs standalone. */
static void host_exec(int argc, char **argv)
{
    const char *env = getenv("CAPSULE_PYWORKER_HOST");
    char exe[4096], mod[4200];
    if (env && strcmp(env, "0") == 0)
        return;
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0 || argc > 60)
        return;
    exe[n] = 0;
    char *slash = strrchr(exe, '/');
    if (!slash)
        return;
    *slash = 0;
    snprintf(mod, sizeof mod, "%s/capsule-pyworker-host.so", exe);
    if (access(mod, R_OK) != 0 || access(PYW_HOST_PYTHON, X_OK) != 0)
        return;
    /* the bootstrap's names are removed from __main__ by py_host_setup */
    static const char boot[] = "import _imp, sys\n"
                               "class S:\n"
                               "    name = '_capsule_worker'\n"
                               "    origin = sys.argv[1]\n"
                               "_imp.create_dynamic(S).main(sys.argv[2:])\n";
    char *av[72];
    int k = 0;
    av[k++] = (char *)PYW_HOST_PYTHON;
    av[k++] = (char *)"-I";
    av[k++] = (char *)"-S";
    av[k++] = (char *)"-B";
    av[k++] = (char *)"-c";
    av[k++] = (char *)boot;
    av[k++] = mod;
    for (int i = 1; i < argc; i++)
        av[k++] = argv[i];
    av[k] = NULL;
    execv(PYW_HOST_PYTHON, av);
}

int main(int argc, char **argv)
{
    host_exec(argc, argv);
    return worker_main(argc, argv);
}
#endif
