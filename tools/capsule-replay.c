/*
 * capsule-replay - offline recovery and inspection of a capsule data directory.
 *
 * Implemented subcommand: `verify [--deep] DIR`. It opens the directory read-only (an LMDB
 * reader: safe on the directory of a running engine, whose writer it never blocks), walks the
 * whole write-ahead log through the public wal API in one snapshot, and checks every frame (the
 * wal's validity rule: length, header, checksum over key and body, stored under its own seq) and
 * that sequence numbers are dense from the first stored to the last. --deep also decodes every
 * body into its fields (tpl; about 5x slower): the checksum already catches damaged bytes, so
 * --deep only adds a check against a writer that sealed a malformed body. It prints a summary
 * (records per kind, bytes, problems) on stdout.
 *
 * Invariants: the tool never writes to DIR; every problem is named with its sequence number;
 * exit status 0 = clean, 1 = problems found, 2 = cannot open (message on stderr), 64 = usage.
 * The derived tables (prom.docs, eng.*) are NOT cross-checked yet; the summary says so.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cap.h"
#include "store.h"
#include "wal.h"

#define REPLAY_EXIT_CLEAN   0
#define REPLAY_EXIT_PROBLEM 1
#define REPLAY_EXIT_OPEN    2
#define REPLAY_EXIT_USAGE   64
#define REPLAY_MAX_LISTED   1000 /* problems printed one by one at most; the rest are counted */

typedef struct replay_verify {
    uint64_t records, bytes, problems, corrupt, gaps;
    uint64_t first, last, prev;
    uint64_t per_kind[256];
} replay_verify_t;

static void replay_problem_print(replay_verify_t *v, const char *fmt, uint64_t seq,
                                 const char *what)
{
    v->problems++;
    if (v->problems <= REPLAY_MAX_LISTED)
        printf(fmt, seq, what);
    else if (v->problems == REPLAY_MAX_LISTED + 1)
        printf("(further problems counted, not listed)\n");
}

static void replay_progress_print(const replay_verify_t *v, uint64_t total, uint64_t t0, int done)
{
    double secs = (double)(cap_now_ns() - t0) / 1e9;
    double rate = secs > 0 ? (double)v->records / secs : 0;
    double eta = rate > 0 && total > v->records ? (double)(total - v->records) / rate : 0;
    fprintf(stderr, "\rverify: %" PRIu64 "/%" PRIu64 " records  %.0f rec/s  ETA %.0fs   %s",
            v->records, total, rate, eta, done ? "\n" : "");
}

/* Walks the log (deep: also decodes every body with tpl); fills *v. Returns 0 (problems are in v)
 * or a CAP_E* code (cannot read). */
static int replay_verify_walk(wal_log_t *log, int deep, replay_verify_t *v)
{
    wal_stats_t st;
    wal_iter_t *it = NULL;
    wal_iter_opts_t io = {.decode = deep};
    int tty = isatty(STDERR_FILENO), rc;
    uint64_t t0 = cap_now_ns();

    wal_log_stats(log, &st);
    uint64_t total =
        st.last_seq >= st.first_seq && st.first_seq ? st.last_seq - st.first_seq + 1 : 0;
    rc = wal_iter_open(log, &io, &it);
    if (rc)
        goto out;
    for (;;) {
        wal_entry_t e;
        memset(&e, 0, sizeof e);
        rc = wal_iter_next(it, &e);
        if (rc == CAP_ENOTFOUND) {
            rc = 0;
            break;
        }
        if (rc != 0 && rc != CAP_ECORRUPT)
            goto out;
        if (v->prev && e.seq != v->prev + 1 && e.seq > v->prev + 1) {
            char what[96];
            snprintf(what, sizeof what, "%" PRIu64 " record(s) missing after seq %" PRIu64,
                     e.seq - v->prev - 1, v->prev);
            v->gaps++;
            replay_problem_print(v, "seq %" PRIu64 ": gap: %s\n", e.seq, what);
        } else if (v->prev && e.seq <= v->prev) {
            v->gaps++;
            replay_problem_print(v, "seq %" PRIu64 ": %s\n", e.seq, "sequence goes backwards");
        }
        if (!v->first)
            v->first = e.seq;
        v->prev = v->last = e.seq;
        v->records++;
        if (rc == CAP_ECORRUPT) {
            v->corrupt++;
            replay_problem_print(v, "seq %" PRIu64 ": damaged record: %s\n", e.seq,
                                 wal_iter_error(it));
        } else {
            v->bytes += e.frame_len;
            v->per_kind[e.kind]++;
        }
        if (tty && (v->records & 0xFFFF) == 0)
            replay_progress_print(v, total, t0, 0);
    }
    if (tty && v->records >= 0x10000)
        replay_progress_print(v, total, t0, 1);
    if (st.last_seq && v->last < st.last_seq) {
        char what[64];
        snprintf(what, sizeof what, "last stored record is seq %" PRIu64, v->last);
        replay_problem_print(v, "seq %" PRIu64 ": missing at the end: %s\n", st.last_seq, what);
    }
out:
    wal_iter_close(it);
    return rc;
}

static int replay_verify_run(const char *dir, int deep)
{
    store_env_opts_t so = {.readonly = 1};
    store_env_t *env = NULL;
    wal_log_t *log = NULL;
    replay_verify_t *v = cap_calloc(1, sizeof *v);
    wal_opts_t wo = {0};
    int status = REPLAY_EXIT_OPEN, rc;
    uint64_t t0 = cap_now_ns();

    rc = store_env_open(dir, &so, &env);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot open data directory %s: %s\n", dir,
                cap_strerror(rc));
        goto out;
    }
    rc = wal_log_open(env, &wo, &log);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot open the log in %s: %s\n", dir, cap_strerror(rc));
        goto out;
    }
    rc = replay_verify_walk(log, deep, v);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read the log in %s: %s\n", dir, cap_strerror(rc));
        goto out;
    }
    double secs = (double)(cap_now_ns() - t0) / 1e9;
    printf("log: %" PRIu64 " records (seq %" PRIu64 "..%" PRIu64 "), %" PRIu64 " bytes, %.3f s\n",
           v->records, v->first, v->last, v->bytes, secs);
    for (int k = 1; k < 256; k++)
        if (v->per_kind[k])
            printf("  kind 0x%02x: %" PRIu64 "\n", k, v->per_kind[k]);
    printf("damaged records: %" PRIu64 ", sequence gaps: %" PRIu64 "\n", v->corrupt, v->gaps);
    printf("bodies decoded: %s\n", deep ? "yes (--deep)" : "no (checksums only; --deep decodes)");
    printf("derived tables (prom.docs, eng.*): not cross-checked by this version\n");
    printf("%s: %" PRIu64 " problem(s)\n", v->problems ? "PROBLEMS" : "OK", v->problems);
    status = v->problems ? REPLAY_EXIT_PROBLEM : REPLAY_EXIT_CLEAN;
out:
    wal_log_close(log);
    store_env_close(env);
    cap_free(v);
    return status;
}

static void replay_usage_print(FILE *f)
{
    fprintf(f,
            "usage: capsule-replay verify [--deep] DIR\n"
            "  verify   check every log record (frame, checksum) and sequence continuity;\n"
            "           --deep also decodes every record's fields.\n"
            "           exit 0 clean, 1 problems found (each named with its seq), 2 cannot open\n");
}

int main(int argc, char **argv)
{
    if (argc == 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        replay_usage_print(stdout);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "verify") && argv[2][0] != '-')
        return replay_verify_run(argv[2], 0);
    if (argc == 4 && !strcmp(argv[1], "verify") && !strcmp(argv[2], "--deep"))
        return replay_verify_run(argv[3], 1);
    replay_usage_print(stderr);
    return REPLAY_EXIT_USAGE;
}
