/*
 * cap.h - the project's leaf header: error codes, logging, allocation, clocks, hashing.
 *
 * Every module links capsule_base (store/base/). It depends on nothing of the project and on
 * nothing third-party in its interface, so no dependency arrow points upward: store/, wal/,
 * promise/, pyworker/ (both the worker and its client), engine/ and tools/ may all include it.
 *
 * Conventions kept by every module:
 *   - functions return int: 0 ok; -errno for a system failure; CAP_E* (the reserved range
 *     -30000..-30999) for the project's own conditions. cap_strerror() names both.
 *   - out-of-memory aborts (cap_malloc and friends never return NULL).
 *   - cap_log() writes one line to stderr: "capsule[pid] LEVEL module: message".
 */
#ifndef CAP_H
#define CAP_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The project's own error codes. Keep cap_strerror() in base.c in step. */
enum {
    CAP_EFIRST = -30000,
    CAP_ECORRUPT = -30000,   /* stored data failed its checksum or structure check */
    CAP_EMAPFULL = -30001,   /* the store's map is full and could not grow */
    CAP_ENOTFOUND = -30002,  /* no such key / record / object */
    CAP_EEXIST = -30003,     /* already exists */
    CAP_EVERSION = -30004,   /* unsupported format or protocol version */
    CAP_ETOOBIG = -30005,    /* a size limit was exceeded */
    CAP_EINVAL = -30006,     /* invalid argument (a caller error, not a system one) */
    CAP_ECLOSED = -30007,    /* the object is closing or closed */
    CAP_EPROTO = -30008,     /* a peer broke the protocol (malformed frame) */
    CAP_ESTORE = -30009,     /* an unexpected storage-engine failure */
    CAP_ECONFLICT = -30010,  /* a state or version conflict (HTTP 409 equivalent) */
    CAP_EBUSY = -30011,      /* the resource is busy / queue full */
    CAP_ETIMEDOUT = -30012,  /* a deadline passed */
    CAP_ECANCELED = -30013,  /* the operation was canceled */
    CAP_EWORKER = -30014,    /* a worker process died or misbehaved */
    CAP_ELIMIT = -30015,     /* a configured resource limit was hit */
    CAP_EUNPROCESSABLE = -30016, /* a well-formed request that cannot be processed (422) */
    CAP_ELAST = -30016,
};

/* Returns a static, human-readable message for a return code (0, -errno or CAP_E*). */
const char *cap_strerror(int err);
/* Returns the symbolic name ("CAP_ECORRUPT", "ENOENT", ...) of a return code. */
const char *cap_errname(int err);

/* ---- logging ---- */
typedef enum { CAP_LOG_DEBUG = 0, CAP_LOG_INFO, CAP_LOG_WARN, CAP_LOG_ERROR } cap_log_level_t;

/* Sets the minimum level printed (default INFO; CAPSULE_LOG_LEVEL=debug|info|warn|error). */
void cap_log_set_level(cap_log_level_t level);
/* Thread-safe; one line per call. `module` is a short static string such as "wal". */
void cap_log(cap_log_level_t level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Logs at ERROR and aborts the process. For conditions that must never be continued past
 * (a failed WAL commit or fsync). */
_Noreturn void cap_fatal(const char *module, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- allocation: abort on out-of-memory, never return NULL ---- */
void *cap_malloc(size_t n);
void *cap_calloc(size_t n, size_t size);
void *cap_realloc(void *p, size_t n);
char *cap_strdup(const char *s);
void *cap_memdup(const void *p, size_t n);
void cap_free(void *p);

/* ---- clocks ---- */
uint64_t cap_now_ns(void);      /* CLOCK_MONOTONIC, nanoseconds */
int64_t cap_wall_ms(void);      /* CLOCK_REALTIME, milliseconds since the epoch */

/* ---- hashing: XXH3-64 (the only use of xxhash.h outside the WAL codec; see ARCHITECTURE) --- */
uint64_t cap_hash64(const void *data, size_t len);

/* ---- byte order helpers for on-disk and on-wire integers ---- */
static inline void cap_put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline uint32_t cap_get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline void cap_put_le64(uint8_t *p, uint64_t v)
{
    cap_put_le32(p, (uint32_t)v);
    cap_put_le32(p + 4, (uint32_t)(v >> 32));
}
static inline uint64_t cap_get_le64(const uint8_t *p)
{
    return (uint64_t)cap_get_le32(p) | (uint64_t)cap_get_le32(p + 4) << 32;
}
static inline void cap_put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}
static inline uint64_t cap_get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

#ifdef __cplusplus
}
#endif
#endif /* CAP_H */
