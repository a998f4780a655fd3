/*
 * pyw_proto.h - the worker protocol's frame layout and body codec, shared by the worker
 * executable and the client library (no Python, no libuv here).
 *
 * A frame on the wire (all integers little-endian):
 *   u32 length   bytes that follow this field: 9 + body length; 9 <= length <= max frame
 *   u8  type     PYW_F_* below
 *   u64 id       the execution id (cell frames) or the request id (others)
 *   body         length - 9 bytes: a sequence of fields
 * Body fields: u8, u32, u64 as fixed-size integers; "str" = u32 byte count + bytes (no NUL on
 * the wire); "names" = u32 count + that many str; "pairs" = u32 count + count * (str, str).
 * Invariants: the decoder never reads past the body; a frame whose fields overrun its body, or
 * with bytes left over, is malformed (CAP_EPROTO). Any length field is checked against what
 * remains before anything is allocated.
 */
#ifndef PYW_PROTO_H
#define PYW_PROTO_H

#include <stddef.h>
#include <stdint.h>

/* Also in pyworker.h (the client's public header); the client checks they agree. */
#ifndef PYW_PROTOCOL_VERSION
#define PYW_PROTOCOL_VERSION  1
#define PYW_DEFAULT_MAX_FRAME (64u << 20)
#endif

#define PYW_MIN_MAX_FRAME 1024 /* the smallest frame limit a worker accepts */
#define PYW_HDR_SIZE      13   /* u32 length + u8 type + u64 id */
#define PYW_MIN_LEN       9    /* smallest legal value of the length field */

/* Frame types. Client -> worker: */
enum {
    PYW_F_EXECUTE = 0x01,       /* str cell_id, str source */
    PYW_F_INPUT_REPLY = 0x02,   /* u8 eof, str text */
    PYW_F_CANCEL = 0x03,        /* (empty) id = execution to interrupt */
    PYW_F_SNAPSHOT = 0x04,      /* (empty) */
    PYW_F_APPLY = 0x05,         /* str blob */
    PYW_F_PING = 0x06,          /* (empty) */
    PYW_F_SHUTDOWN = 0x07,      /* (empty) */
    PYW_F_FORK = 0x08,          /* to a zygote: str options; SCM_RIGHTS carries the worker socket */
    PYW_F_PROMISE_REPLY = 0x09, /* u8 state (PYW_PS_*), u32 attempts, u64 num, str data: the
                                 * answer to the execution's outstanding PROMISE (id = exec) */
    /* Worker -> client: */
    PYW_F_READY = 0x80,         /* u32 protocol, u32 pid, u32 max_frame, str python version */
    PYW_F_STREAM = 0x81,        /* u8 stream (1 stdout, 2 stderr), str data */
    PYW_F_INPUT_REQ = 0x82,     /* u8 password, str prompt */
    PYW_F_RESULT = 0x83,        /* u8 status, u32 cell_no, u64 duration_ns, str repr, str json,
                                 * str etype, str emsg, str traceback, u8 flags (bit0 repr, bit1
                                 * json, bit2 error), str delta_error */
    PYW_F_DELTA = 0x84,         /* u8 ok, str error, str blob, names added, changed, mutated,
                                 * deleted, pairs unpicklable; sent before the RESULT of its cell */
    PYW_F_APPLIED = 0x85,       /* u8 ok, str error, names restored, names deleted, pairs failed */
    PYW_F_PONG = 0x86,          /* (empty) */
    PYW_F_ERROR = 0x87,         /* u32 code (negated CAP_E* / errno), str message, u8 type of the
                                 * offending frame (0 if none in particular) */
    PYW_F_FORKED = 0x88,        /* from a zygote: u32 pid of the new worker */
    PYW_F_SNAPSHOT_DATA = 0x89, /* answer to SNAPSHOT: the DELTA body layout */
    PYW_F_PROMISE = 0x8A,       /* u8 op (PYW_PO_*), u32 attempts, u64 num, str name, str label
                                 * (open: the task's name), str data:
                                 * a durable step of the running cell (id = exec); one at a time
                                 * per worker, answered by PROMISE_REPLY */
    PYW_F_SPARE = 0x8B,         /* from a zygote, id 0: u32 pid of the spare it just made (the
                                 * client's child: the client kills and reaps it if the zygote
                                 * dies without handing it out or naming it in FORKED id 0) */
};

/* PROMISE operations (see ARCHITECTURE.md, "Durable steps"). name is the step's path below the
 * execution ("1", "2.1"); the engine's promise id is "capsule/x/<eid>." + name. */
enum {
    PYW_PO_OPEN = 1,    /* a read (nothing written): reply RESOLVED/REJECTED with the recorded
                         * value, or PENDING with attempts = the failed attempts recorded (run
                         * it). Needed only when the preload was not complete */
    PYW_PO_SETTLE = 2,  /* the step's result: num = PYW_PS_RESOLVED or PYW_PS_REJECTED, attempts
                         * = attempts made, label = the task's name, data = {u32 n, param (the
                         * pickled call), value (pickle)}: the promise created and settled in
                         * one record; reply after it is durable */
    PYW_PO_SLEEP = 3,   /* a timer step: num = delay ms, created with deadline now + num on the
                         * first call only; reply RESOLVED when due, else PENDING with num = the
                         * milliseconds that remain */
    PYW_PO_AWAIT = 4,   /* an external promise: name = the user's id ([A-Za-z0-9._-]{1,128}),
                         * created pending if missing (data = its param); the reply comes when it
                         * is settled (by anyone: REST, another protocol, a timeout) */
    PYW_PO_PRELOAD = 5, /* name "0": every settled step of the execution and every failed
                         * attempt record ("<path>#a<k>"), for a re-run to answer its replayed
                         * steps without a round trip each: reply RESOLVED, num = 1 if complete
                         * (a step not in it was never recorded), data = records {u32 n, path,
                         * u8 state, u32 n, value} (at most 8 MiB) */
    PYW_PO_START = 6,   /* NO REPLY: attempt `attempts` of step `name` starts (label, data =
                         * param): the running mark, written only if the step lasts */
    PYW_PO_ATTEMPT = 7, /* attempt `attempts` failed and will be retried: data as SETTLE's (value
                         * = the pickled error); reply after it is durable */
    PYW_PO_CHILD = 8,   /* an attempt of a task with its own limits: the engine runs data (a
                         * cell) as execution "<eid>-t<name>" in a session of that id with
                         * RLIMIT_CPU = num seconds (0: none); reply RESOLVED with the cell's
                         * repr, REJECTED with what ended it otherwise (a limit, an error) */
};
/* PROMISE_REPLY states. */
enum { PYW_PS_PENDING = 0, PYW_PS_RESOLVED = 1, PYW_PS_REJECTED = 2, PYW_PS_FAILED = 3 };

/* Result status on the wire (same values as pyw_status_t OK/ERROR/CANCELLED). */
enum { PYW_RS_OK = 0, PYW_RS_ERROR = 1, PYW_RS_CANCELLED = 2 };
/* RESULT flags: which strings are present, and whether the cell's code ran at all */
enum { PYW_RF_REPR = 1, PYW_RF_JSON = 2, PYW_RF_ERROR = 4, PYW_RF_NOT_RUN = 8 };

/* A growable output buffer. */
typedef struct pyw_buf {
    uint8_t *p;
    size_t len, cap;
} pyw_buf_t;

void pyw__buf_init(pyw_buf_t *b);
void pyw__buf_free(pyw_buf_t *b);
/* Starts a frame (reserves the header); finish with pyw__frame_end. */
void pyw__frame_begin(pyw_buf_t *b, uint8_t type, uint64_t id);
/* Writes the length field of the frame begun at offset `start`. */
void pyw__frame_end(pyw_buf_t *b, size_t start);
void pyw__put_raw(pyw_buf_t *b, const void *p, size_t n);
void pyw__put_u8(pyw_buf_t *b, uint8_t v);
void pyw__put_u32(pyw_buf_t *b, uint32_t v);
void pyw__put_u64(pyw_buf_t *b, uint64_t v);
void pyw__put_str(pyw_buf_t *b, const void *s, size_t n);
void pyw__put_cstr(pyw_buf_t *b, const char *s); /* NULL writes an empty string */

/* A cap_malloc'd copy of n bytes plus a NUL (n may be 0). */
void *pyw__memdup0(const void *p, size_t n);

/* A bounds-checked reader over one frame body. Errors stick: after the first failure every get
 * returns CAP_EPROTO and leaves outputs untouched. */
typedef struct pyw_rd {
    const uint8_t *p;
    size_t left;
    int err;
} pyw_rd_t;

void pyw__rd_init(pyw_rd_t *r, const void *body, size_t len);
int pyw__get_u8(pyw_rd_t *r, uint8_t *out);
int pyw__get_u32(pyw_rd_t *r, uint32_t *out);
int pyw__get_u64(pyw_rd_t *r, uint64_t *out);
/* A str as a pointer into the body (not NUL-terminated) and its length. */
int pyw__get_str(pyw_rd_t *r, const uint8_t **s, size_t *n);
/* A str copied into a fresh NUL-terminated cap_malloc'd string (*out, caller frees). */
int pyw__get_strdup(pyw_rd_t *r, char **out);
/* names: *out is a cap_malloc'd array of n cap_malloc'd strings (free with pyw__names_free). */
int pyw__get_names(pyw_rd_t *r, char ***out, size_t *n);
void pyw__names_free(char **v, size_t n);
/* pairs: 2n strings, name then reason. */
int pyw__get_pairs(pyw_rd_t *r, char ***out, size_t *n);
/* 0 when the whole body was consumed without error, else CAP_EPROTO. */
int pyw__rd_end(pyw_rd_t *r);

/* Parses a header: returns 0 and the fields, CAP_EPROTO if length < PYW_MIN_LEN, CAP_ETOOBIG if
 * length > max_frame (the caller may then skip length bytes to resynchronise). */
int pyw__hdr_parse(const uint8_t hdr[PYW_HDR_SIZE], uint32_t max_frame, uint32_t *length,
                   uint8_t *type, uint64_t *id);

/* Worker options, shared by the cold worker's command line (--opts) and the zygote's FORK frame:
 * comma-separated key=value, keys mem, cpu, nofile, fsize, nproc (decimal, 0 = unlimited),
 * maxframe (bytes), cgroup (a directory path; no commas). Unknown keys, bad numbers, overflow or
 * an empty key are CAP_EINVAL. */
typedef struct pyw_wopts {
    uint64_t mem, fsize;
    uint32_t cpu, nofile, nproc, max_frame;
    char cgroup[256];
} pyw_wopts_t;

int pyw__wopts_parse(const char *s, pyw_wopts_t *out);
/* Formats opts into buf (size n); returns 0 or CAP_ETOOBIG. */
int pyw__wopts_format(const pyw_wopts_t *o, char *buf, size_t n);

#endif /* PYW_PROTO_H */
