/*
 * replay.h - internals shared by the files of capsule-replay (tools/replay/): the opened data
 * directory, bounded-snapshot walks over its tables, record decoding, output helpers.
 *
 * Consistency: every long scan runs in read transactions of at most RP_CHUNK entries each
 * (re-positioned by key between them), so a live engine's writer never finds old pages pinned
 * for the length of a whole scan. Each chunk is a consistent snapshot; a whole scan is not: it
 * sees the log as appended up to the moment each chunk began (log records never change once
 * written, so a scan of the log is a prefix of it plus whatever was appended while it ran).
 * Cross-checks between the log and the derived tables are made inside one chunk's snapshot.
 */
#ifndef REPLAY_H
#define REPLAY_H

#include <stdint.h>
#include <stdio.h>

#include "cap.h"
#include "store.h"
#include "wal.h"

#define RP_EXIT_CLEAN   0
#define RP_EXIT_PROBLEM 1
#define RP_EXIT_OPEN    2
#define RP_EXIT_USAGE   64
#define RP_CHUNK        65536 /* entries read per read transaction at most */

/* The derived tables a data directory may hold (absent ones have ok = 0). */
enum {
    RP_T_LOG,
    RP_T_META,
    RP_T_DOCS,
    RP_T_OUTBOX,
    RP_T_PMETA,
    RP_T_RESULTS,
    RP_T_DELTAS,
    RP_T_CKPT,
    RP_T_BASE,
    RP_T_N
};
extern const char *const rp_table_names[RP_T_N];

typedef struct rp_ctx {
    const char *dir;
    store_env_t *env;
    store_dbi_t dbi[RP_T_N];
    int have[RP_T_N];
    int json; /* --json: JSON lines */
} rp_ctx_t;

/* Opens dir read-only (write = 0) or for writing; prints the reason and returns RP_EXIT_OPEN when
 * it cannot (no data.mdb, not LMDB, no wal.log). write = 1 refuses a directory that another
 * process holds open (a running engine). */
int rp_open(rp_ctx_t *c, const char *dir, int write);
void rp_close(rp_ctx_t *c);
/* 1 if another process has dir's LMDB environment open (its lock file is locked). */
int rp_dir_busy(const char *dir);

/* Calls fn(arg, txn, key, val) for every entry of table t with key >= from (NULL = the first), in
 * key order, in read transactions of at most RP_CHUNK entries. fn returns 0 to go on, 1 to stop
 * (the walk then returns 0), or an error (returned). Returns CAP_ENOTFOUND if t is absent. */
typedef int (*rp_walk_fn)(void *arg, store_txn_t *txn, store_val_t k, store_val_t v);
int rp_walk(rp_ctx_t *c, int t, const void *from, size_t from_len, rp_walk_fn fn, void *arg);

/* Walks wal.log from seq `from` (0 = the first) to `to` (0 = the end) in bounded snapshots and
 * calls fn for every stored record: rc 0 with e decoded (fields decoded when `decode` says so:
 * RP_DECODE_ALL, RP_DECODE_DERIVED = only the promise and engine kinds, RP_DECODE_NONE), or rc
 * CAP_ECORRUPT with e->seq = the key it is stored under and `why` saying what is wrong. fn's
 * return as in rp_walk. */
enum { RP_DECODE_NONE, RP_DECODE_DERIVED, RP_DECODE_ALL };
typedef int (*rp_rec_fn)(void *arg, store_txn_t *txn, int rc, const wal_entry_t *e,
                         const char *why);
int rp_log_walk(rp_ctx_t *c, uint64_t from, uint64_t to, int decode, rp_rec_fn fn, void *arg);
/* Decodes the stored frame v under key k into e (scratch reused); same contract as above. */
int rp_frame_decode(store_val_t k, store_val_t v, int decode, wal_scratch_t **scratch,
                    wal_entry_t *e, const char **why);
/* 1 if kind belongs to promise/ or engine/ (its records feed derived tables). */
int rp_kind_derived(int kind);

/* First and last stored seq of wal.log (0, 0 when empty) and wal.meta "high"; in txn. */
int rp_log_bounds(rp_ctx_t *c, store_txn_t *txn, uint64_t *first, uint64_t *last, uint64_t *high);

/* A progress line on stderr (only when stderr is a terminal): label, done/total, rate, ETA. */
typedef struct rp_progress {
    const char *label;
    uint64_t total, done, t0, shown;
    int tty;
} rp_progress_t;
void rp_progress_start(rp_progress_t *p, const char *label, uint64_t total);
void rp_progress_step(rp_progress_t *p, uint64_t n);
void rp_progress_end(rp_progress_t *p);

/* Names of record kinds ("prom.doc", "eng.finish", ...; "kind-0xNN" otherwise). */
const char *rp_kind_name(int kind, char buf[16]);
/* Parses a kind given by name or number; -1 when neither. */
int rp_kind_parse(const char *s);
/* Parses a time: integer milliseconds since the epoch, or ISO-8601 UTC "YYYY-MM-DD[THH:MM[:SS]]Z?".
 * Returns 0 or CAP_EINVAL. */
int rp_time_parse(const char *s, int64_t *ms);
/* Formats ms since the epoch as "YYYY-MM-DDTHH:MM:SS.mmmZ" ("-" for 0). */
const char *rp_time_fmt(int64_t ms, char buf[32]);
/* Parses an unsigned decimal; 0 or CAP_EINVAL. */
int rp_u64_parse(const char *s, uint64_t *out);

/* Usage error: prints "capsule-replay CMD: msg" and the command's usage on stderr; returns 64. */
int rp_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prints the usage of cmd (NULL: all) to f. */
void rp_usage_print(FILE *f, const char *cmd);
/* 1 if argv holds -h/--help. */
int rp_wants_help(int argc, char **argv);

/* The executions of session sid in submission order, each with its recorded result (NULL if
 * none; the engine's eng_result_t) and the replies of its input requests (inspect.c). */
struct eng_result;
typedef struct rp_exec {
    char *eid, *code;
    size_t code_len;
    struct eng_result *r;
    char **inputs; /* replies in order; a NULL entry = EOF or unanswered */
    size_t ninputs;
} rp_exec_t;
int rp_session_execs(rp_ctx_t *c, const char *sid, rp_exec_t **out, size_t *n);
void rp_session_execs_free(rp_exec_t *x, size_t n);

/* The subcommands: argc/argv start at the subcommand's name. Each returns the exit status. */
int rp_cmd_verify(int argc, char **argv);
int rp_cmd_export(int argc, char **argv);
int rp_cmd_list(int argc, char **argv); /* sessions | executions | promises */
int rp_cmd_show(int argc, char **argv);
int rp_cmd_repair(int argc, char **argv);
int rp_cmd_compact(int argc, char **argv);
int rp_cmd_replay(int argc, char **argv);

#endif /* REPLAY_H */
