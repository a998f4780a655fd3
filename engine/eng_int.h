/*
 * eng_int.h - internals shared by the engine's files: the engine's derived tables, the codec of a
 * recorded result, and the reads a restore needs.
 *
 * Tables (LMDB named databases, written only by eng__apply inside the wal's group-commit
 * transaction, so they never disagree with the log and survive its truncation):
 *   eng.results  key eid                        -> result TLV (eng__result_encode)
 *   eng.deltas   key sid 0x00 BE64(ordinal)     -> namespace delta blob of that execution
 *   eng.ckpt     key sid 0x00 BE64(ordinal)     -> full snapshot blob: the state after ordinal
 *   eng.base     key sid                        -> BE64(parent ordinal) + parent sid (forks)
 * A session's ordinals count its committed executions from 1, without gaps.
 */
#ifndef ENG_INT_H
#define ENG_INT_H

#include <stddef.h>
#include <stdint.h>

#include "capsule.h"
#include "promise.h"
#include "store.h"
#include "wal.h"

/* Field tags of ENG_REC_FINISH. */
enum { ENG_F_SID = 1, ENG_F_DELTA = 2, ENG_F_ORDINAL = 3, ENG_F_RESULT = 4 };
/* Field tags of ENG_REC_CHECKPOINT. */
enum { ENG_C_BLOB = 1, ENG_C_ORDINAL = 2 };
/* Field tags of ENG_REC_SESSION. */
enum { ENG_S_PARENT = 1, ENG_S_PORD = 2 };
#define ENG_MAX_FORK_DEPTH 64

/* Bounds a parser enforces. */
#define ENG_MAX_ID 200 /* session and execution ids: bytes, [A-Za-z0-9._:-] */

typedef struct eng_tables {
    store_env_t *env;
    store_dbi_t results, deltas, ckpt, base;
} eng_tables_t;

/* Creates/opens the tables (a write txn). */
int eng__tables_open(store_env_t *env, eng_tables_t *t);
/* The wal apply callback for kinds 0x40.. (arg: eng_tables_t *). Unknown kinds: ignored. */
int eng__apply(void *arg, store_txn_t *txn, const wal_entry_t *e);

/* 1 if id is a valid session/execution id. */
int eng__id_valid(const char *id);
/* The CPU that takes the completion interrupts of the disk holding dir, or -1 (eng_iocpu.c). */
int eng__io_cpu(const char *dir);
/* A haltpoll guest's guest_halt_poll_ns, or -1 (not that cpuidle driver) (eng_iocpu.c). */
long eng__halt_poll_ns(void);

/* Result TLV: repeated (u8 tag, u32 LE length, bytes). Encode: caller frees *out (cap_free). */
void eng__result_encode(const eng_result_t *r, uint8_t **out, size_t *len);
/* Strict decode: CAP_ECORRUPT on any truncated/overlong/unknown-tag/duplicate input. */
int eng__result_decode(const void *p, size_t len, eng_result_t **out);
/* Deep copy. */
eng_result_t *eng__result_dup(const eng_result_t *r);
/* Frees what a result owns and zeroes it (eng_result_free also frees the struct). */
void eng__result_clear(eng_result_t *r);

/* A blob read from the tables (owned). */
typedef struct eng_blob {
    uint8_t *p;
    size_t n;
} eng_blob_t;
void eng__blobs_free(eng_blob_t *b, size_t n);

/* The highest committed ordinal of sid (0 if none). */
int eng__last_ordinal(eng_tables_t *t, const char *sid, uint64_t *out);
/* The blobs that rebuild sid's namespace as it was right after ordinal `upto` (0 = the latest),
 * in apply order: the latest checkpoint of sid <= upto if any, else the parent's chain (eng.base,
 * for a fork); then sid's deltas after that. CAP_ELIMIT beyond ENG_MAX_FORK_DEPTH. */
int eng__chain_read(eng_tables_t *t, const char *sid, uint64_t upto, eng_blob_t **blobs, size_t *n);
/* The recorded result of eid: 0, CAP_ENOTFOUND, CAP_ECORRUPT. */
int eng__result_read(eng_tables_t *t, const char *eid, eng_result_t **out);

/* ---- durable steps (eng_steps.c; the worker's PROMISE frames) ---- */
enum {
    ENG_STEP_OPEN = 1,
    ENG_STEP_SETTLE = 2,
    ENG_STEP_SLEEP = 3,
    ENG_STEP_AWAIT = 4,
    ENG_STEP_PRELOAD = 5,
    ENG_STEP_START = 6,   /* the running mark (no reply): held, see eng__mark_* */
    ENG_STEP_ATTEMPT = 7, /* a failed attempt that will be retried */
    ENG_STEP_CHILD = 8    /* an attempt of a task with its own limits, in its own session */
};
/* How long a running mark is held before it is written (a step that ends sooner writes only its
 * result: one record, one commit). */
#define ENG_MARK_DELAY_MS 50
#define ENG_PRELOAD_MAX   (8u << 20) /* bytes of recorded values one preload carries */
/* reply states: the PYW_PS_* values */
enum { ENG_STEP_PENDING = 0, ENG_STEP_RESOLVED = 1, ENG_STEP_REJECTED = 2, ENG_STEP_FAILED = 3 };
typedef struct eng_step {
    /* request */
    int op;
    char *eid, *path, *label;
    char *ext;         /* await: the external promise's id ("capsule/p/<principal:>name") */
    int recheck;       /* await: a re-read after the waiter was registered / a settle was seen */
    uint32_t attempts; /* settle: attempts made */
    uint64_t num;      /* settle: ENG_STEP_RESOLVED/REJECTED; sleep: delay ms */
    int64_t due;       /* start: when the held mark is written (ms, store clock) */
    struct eng_step *next; /* start: the held marks' list */
    uint8_t *in;
    size_t in_len;
    /* reply */
    int state;
    uint32_t out_attempts;
    uint64_t out_num; /* sleep pending: ms that remain */
    uint8_t *out;     /* value, or the message when FAILED */
    size_t out_len;
} eng_step_t;
/* "capsule/x/<eid>.<path>" (cap_malloc'd). */
char *eng__step_pid(const char *eid, const char *path);
/* The promise id of external promise `name` as seen from session sid: "capsule/p/" + the sid's
 * principal prefix (up to its last ':', if any) + name; the REST routes use the same form. */
char *eng__ext_pid(const char *sid, const char *name);
#define ENG_EXT_PREFIX "capsule/p/"
/* Performs st's operation on the promise store (blocks for the commit) and fills the reply. */
void eng__step_run(prom_store_t *ps, eng_step_t *st);
void eng__step_free(eng_step_t *st);
/* CHILD: the id of the session and of the execution that run an attempt of step `path` of eid
 * ("<eid>-t<path>", cap_malloc'd), NULL if it would not be a valid id. */
char *eng__child_id(const char *eid, const char *path);
/* CHILD: fills st's reply from the child execution's result: RESOLVED with its repr (the
 * pickled outcome the child cell returns), else REJECTED with what ended it. */
void eng__child_answer(eng_step_t *st, const eng_result_t *r);
/* Running marks (loop thread). hold: keeps START st (owned) until `due`. drop: forgets the mark
 * of eid/path (its result is being recorded). flush: writes every mark due at `now` as the
 * step's pending promise without waiting for durability, and returns the next due time
 * (INT64_MAX: none). free: forgets them all (engine close). */
void eng__mark_hold(eng_step_t **marks, eng_step_t *st);
void eng__mark_drop(eng_step_t **marks, const char *eid, const char *path);
int64_t eng__mark_flush(prom_store_t *ps, eng_step_t **marks, int64_t now);
void eng__marks_free(eng_step_t **marks);
/* The steps of execution eid, ordered by path. CAP_ENOTFOUND: no such execution. Blocking. */
int eng__tasks_list(prom_store_t *ps, const char *eid, eng_task_info_t **out, size_t *n);

#endif /* ENG_INT_H */
