/*
 * base.c - error names, logging, allocation and clocks for every module (see cap.h).
 * Invariant: nothing here allocates through anything but libc, and nothing here can fail
 * silently: allocation failure aborts with a log line.
 */
#define _GNU_SOURCE
#include "cap.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

struct cap_err {
    int code;
    const char *name;
    const char *msg;
};

static const struct cap_err cap_errs[] = {
    {CAP_ECORRUPT, "CAP_ECORRUPT", "stored data is corrupted (checksum or structure check failed)"},
    {CAP_EMAPFULL, "CAP_EMAPFULL", "the store's map is full and could not grow"},
    {CAP_ENOTFOUND, "CAP_ENOTFOUND", "not found"},
    {CAP_EEXIST, "CAP_EEXIST", "already exists"},
    {CAP_EVERSION, "CAP_EVERSION", "unsupported format or protocol version"},
    {CAP_ETOOBIG, "CAP_ETOOBIG", "size limit exceeded"},
    {CAP_EINVAL, "CAP_EINVAL", "invalid argument"},
    {CAP_ECLOSED, "CAP_ECLOSED", "closing or closed"},
    {CAP_EPROTO, "CAP_EPROTO", "protocol error (malformed message)"},
    {CAP_ESTORE, "CAP_ESTORE", "unexpected storage engine failure"},
    {CAP_ECONFLICT, "CAP_ECONFLICT", "state or version conflict"},
    {CAP_EBUSY, "CAP_EBUSY", "busy: queue or resource full"},
    {CAP_ETIMEDOUT, "CAP_ETIMEDOUT", "timed out"},
    {CAP_ECANCELED, "CAP_ECANCELED", "canceled"},
    {CAP_EWORKER, "CAP_EWORKER", "worker process died or misbehaved"},
    {CAP_ELIMIT, "CAP_ELIMIT", "resource limit exceeded"},
    {CAP_EUNPROCESSABLE, "CAP_EUNPROCESSABLE", "request cannot be processed in this state"},
};

static const struct cap_err *cap_err_find(int err)
{
    for (size_t i = 0; i < sizeof(cap_errs) / sizeof(cap_errs[0]); i++)
        if (cap_errs[i].code == err)
            return &cap_errs[i];
    return NULL;
}

const char *cap_strerror(int err)
{
    if (err == 0)
        return "success";
    const struct cap_err *e = cap_err_find(err);
    if (e)
        return e->msg;
    if (err < 0 && err > -4096)
        return strerror(-err);
    return "unknown error";
}

const char *cap_errname(int err)
{
    if (err == 0)
        return "OK";
    const struct cap_err *e = cap_err_find(err);
    if (e)
        return e->name;
    if (err < 0 && err > -4096) {
        const char *n = strerrorname_np(-err);
        return n ? n : "EUNKNOWN";
    }
    return "EUNKNOWN";
}

/* ---- logging ---- */

static int cap_log_min = -1; /* -1: not yet read from the environment */
static pthread_mutex_t cap_log_mu = PTHREAD_MUTEX_INITIALIZER;

void cap_log_set_level(cap_log_level_t level)
{
    __atomic_store_n(&cap_log_min, (int)level, __ATOMIC_RELAXED);
}

static int cap_log_level_now(void)
{
    int lv = __atomic_load_n(&cap_log_min, __ATOMIC_RELAXED);
    if (lv >= 0)
        return lv;
    lv = CAP_LOG_INFO;
    const char *env = getenv("CAPSULE_LOG_LEVEL");
    if (env) {
        if (!strcasecmp(env, "debug"))
            lv = CAP_LOG_DEBUG;
        else if (!strcasecmp(env, "warn"))
            lv = CAP_LOG_WARN;
        else if (!strcasecmp(env, "error"))
            lv = CAP_LOG_ERROR;
    }
    __atomic_store_n(&cap_log_min, lv, __ATOMIC_RELAXED);
    return lv;
}

static void cap_vlog(cap_log_level_t level, const char *module, const char *fmt, va_list ap)
{
    static const char *names[] = {"DEBUG", "INFO", "WARN", "ERROR"};
    char line[2048];
    int n = snprintf(line, sizeof(line), "capsule[%d] %s %s: ", (int)getpid(),
                     names[level & 3], module ? module : "-");
    if (n < 0)
        return;
    if ((size_t)n < sizeof(line))
        vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    pthread_mutex_lock(&cap_log_mu);
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
    pthread_mutex_unlock(&cap_log_mu);
}

void cap_log(cap_log_level_t level, const char *module, const char *fmt, ...)
{
    if ((int)level < cap_log_level_now())
        return;
    va_list ap;
    va_start(ap, fmt);
    cap_vlog(level, module, fmt, ap);
    va_end(ap);
}

_Noreturn void cap_fatal(const char *module, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    cap_vlog(CAP_LOG_ERROR, module, fmt, ap);
    va_end(ap);
    abort();
}

/* ---- allocation ---- */

static _Noreturn void cap_oom(size_t n)
{
    cap_fatal("base", "out of memory allocating %zu bytes", n);
}

void *cap_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        cap_oom(n);
    return p;
}

void *cap_calloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        cap_oom(n * size);
    return p;
}

void *cap_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        cap_oom(n);
    return q;
}

char *cap_strdup(const char *s)
{
    return cap_memdup(s, strlen(s) + 1);
}

void *cap_memdup(const void *p, size_t n)
{
    void *q = cap_malloc(n);
    if (n)
        memcpy(q, p, n);
    return q;
}

void cap_free(void *p)
{
    free(p);
}

/* ---- clocks ---- */

uint64_t cap_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t cap_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
