/*
 * repair.c - the two writing commands of capsule-replay.
 *
 * `repair [--write] DIR`: finds the first stored record that fails the wal's validity rule, or
 * the first gap in the sequence, and reports every record from there to the end (the damaged
 * tail). With --write it first copies data.mdb into DIR/backup-<UTC time>/, then deletes those
 * records and their wal.key entries and moves the marks that point into the dropped range
 * (wal.meta "high" and "indexed", prom.meta "docs_seq") back before it: the next record reuses
 * the first dropped seq, as after a crash that lost unacknowledged appends (the wal's rule), so
 * the sequence stays dense. The derived tables are left as they are: they were written in the
 * same transactions as the records, before the damage, and recovery reads them, not the log
 * (verify then lists their rows whose records were dropped as "no record wrote it").
 *
 * `compact [--write] DIR`: drops the log records a checkpoint made redundant, by the engine's
 * own truncation rule (eng_checkpoint with truncate: everything before the latest checkpoint
 * record, since the engine and promise/ recover from their derived tables), bounded by the
 * promise store: a prom.doc record after prom.meta docs_seq (checkpoint mode, not yet in
 * prom.docs) and everything after it is kept. The deletion is the wal's own wal_log_truncate.
 *
 * With --write, rp_open first applies what the journal holds past the last checkpoint (the log
 * opened and closed once, as an engine's open does), so both work on the whole log, the backup
 * of data.mdb alone is complete, and the journal brings nothing back after the cut.
 * Both refuse --write while another process holds the directory (rp_open), print what they do,
 * and exit 0 (clean / done), 1 (damage found and not repaired), 2 (cannot open / write), 64.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "capsule.h"
#include "promise.h"
#include "replay.h"

/* Copies DIR/data.mdb into a new DIR/backup-<time>/; the path in out. 0 or -errno. */
static int backup(const char *dir, char *out, size_t cap)
{
    char src[4096], dst[4200];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    char ts[32];
    strftime(ts, sizeof ts, "%Y%m%dT%H%M%SZ", &tm);
    snprintf(out, cap, "%s/backup-%s", dir, ts);
    for (int i = 1; mkdir(out, 0700) != 0; i++) {
        if (errno != EEXIST || i > 99)
            return -errno;
        snprintf(out, cap, "%s/backup-%s-%d", dir, ts, i);
    }
    snprintf(src, sizeof src, "%s/data.mdb", dir);
    snprintf(dst, sizeof dst, "%s/data.mdb", out);
    int in = open(src, O_RDONLY | O_CLOEXEC), rc = 0;
    int fd = in < 0 ? -1 : open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (in < 0 || fd < 0) {
        rc = -errno;
        goto out;
    }
    static char buf[1 << 20];
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            rc = -errno;
            goto out;
        }
        for (ssize_t w = 0; w < n;) {
            ssize_t m = write(fd, buf + w, (size_t)(n - w));
            if (m < 0) {
                rc = -errno;
                goto out;
            }
            w += m;
        }
    }
    if (fsync(fd) != 0)
        rc = -errno;
out:
    if (in >= 0)
        close(in);
    if (fd >= 0 && close(fd) != 0 && !rc)
        rc = -errno;
    return rc;
}

static int parse_write_dir(const char *cmd, int argc, char **argv, int *write, const char **dir)
{
    *write = 0;
    *dir = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--write"))
            *write = 1;
        else if (argv[i][0] == '-')
            return rp_usage_error(cmd, "unknown option %s", argv[i]);
        else if (*dir)
            return rp_usage_error(cmd, "one DIR only");
        else
            *dir = argv[i];
    }
    return *dir ? 0 : rp_usage_error(cmd, "DIR is missing");
}

/* ---------- repair ---------- */
typedef struct damage {
    uint64_t prev, cut, dropped, last;
    rp_progress_t pr;
} damage_t;

static int damage_one(void *arg, store_txn_t *txn, int rc, const wal_entry_t *e, const char *why)
{
    (void)txn;
    damage_t *d = arg;
    rp_progress_step(&d->pr, 1);
    char kb[16];
    if (!d->cut && d->prev && e->seq > d->prev + 1) {
        d->cut = d->prev + 1;
        printf("seq %" PRIu64 ": gap: %" PRIu64 " record(s) missing after seq %" PRIu64
               "; the tail from here is dropped\n",
               e->seq, e->seq - d->prev - 1, d->prev);
    }
    if (!d->cut && rc) {
        d->cut = e->seq;
        printf("seq %" PRIu64 ": damaged record: %s; the tail from here is dropped\n", e->seq, why);
    }
    d->prev = d->last = e->seq;
    if (!d->cut)
        return 0;
    d->dropped++;
    if (rc)
        printf("  drop seq %" PRIu64 " (damaged, %zu bytes)\n", e->seq, e->frame_len);
    else
        printf("  drop seq %" PRIu64 " %s key \"%.*s\" (%zu bytes)\n", e->seq,
               rp_kind_name(e->kind, kb), (int)(e->key_len > 80 ? 80 : e->key_len),
               (const char *)e->key, e->frame_len);
    return 0;
}

typedef struct cutw {
    rp_ctx_t *c;
    store_dbi_t key;
    uint64_t cut, deleted;
} cutw_t;

/* One write transaction: deletes up to 4096 log records >= cut and index entries of seq >= cut;
 * sets deleted to 0 when nothing was left. */
static int cut_fn(store_txn_t *txn, void *arg)
{
    cutw_t *w = arg;
    store_cursor_t *cur = NULL;
    uint8_t kb[8];
    store_val_t k = store_key_u64(kb, w->cut), v;
    w->deleted = 0;
    int rc = store_cursor_open(txn, w->c->dbi[RP_T_LOG], &cur);
    for (rc = rc ? rc : store_cursor_get(cur, &k, &v, STORE_SET_RANGE);
         rc == 0 && w->deleted < 4096; rc = store_cursor_get(cur, &k, &v, STORE_SET_RANGE)) {
        rc = store_cursor_del(cur);
        if (rc)
            break;
        w->deleted++;
        k = store_key_u64(kb, w->cut);
    }
    store_cursor_close(cur);
    if (rc && rc != CAP_ENOTFOUND)
        return rc;
    if (w->deleted)
        return 0;
    /* the log is cut: now the index entries and the marks, in this transaction */
    rc = store_cursor_open(txn, w->key, &cur);
    for (rc = rc ? rc : store_cursor_get(cur, &k, &v, STORE_FIRST); rc == 0;
         rc = store_cursor_get(cur, &k, &v, STORE_NEXT))
        if (k.len == 16 && cap_get_be64((const uint8_t *)k.data + 8) >= w->cut &&
            (rc = store_cursor_del(cur)) != 0)
            break;
    store_cursor_close(cur);
    if (rc && rc != CAP_ENOTFOUND)
        return rc;
    rc = 0;
    /* marks that point into the dropped range move back before it */
    const struct {
        int t;
        const char *name;
    } marks[] = {{RP_T_META, "high"}, {RP_T_META, "indexed"}, {RP_T_PMETA, "docs_seq"}};
    for (size_t i = 0; i < sizeof marks / sizeof marks[0] && rc == 0; i++) {
        store_val_t mk = {(void *)marks[i].name, strlen(marks[i].name)};
        if (!w->c->have[marks[i].t] || store_get(txn, w->c->dbi[marks[i].t], mk, &v) != 0 ||
            v.len != 8 || cap_get_be64(v.data) < w->cut)
            continue;
        rc = store_put(txn, w->c->dbi[marks[i].t], mk, store_key_u64(kb, w->cut - 1), 0);
    }
    return rc;
}

int rp_cmd_repair(int argc, char **argv)
{
    int write;
    const char *dir;
    int st = parse_write_dir("repair", argc, argv, &write, &dir);
    if (st)
        return st;
    rp_ctx_t c = {0};
    if ((st = rp_open(&c, dir, write)))
        return st;
    damage_t d = {0};
    rp_progress_start(&d.pr, "repair scan", 0);
    int rc = rp_log_walk(&c, 0, 0, RP_DECODE_NONE, damage_one, &d);
    rp_progress_end(&d.pr);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read %s: %s\n", dir, cap_strerror(rc));
        rp_close(&c);
        return RP_EXIT_OPEN;
    }
    if (!d.cut) {
        printf("OK: no damaged record and no gap in %s; nothing to repair\n", dir);
        rp_close(&c);
        return RP_EXIT_CLEAN;
    }
    printf("%" PRIu64 " record(s) from seq %" PRIu64 " to %" PRIu64
           " would be dropped; the %" PRIu64 " before them are kept\n",
           d.dropped, d.cut, d.last, d.cut - 1);
    if (!write) {
        printf("nothing changed (run with --write to back up data.mdb and drop them)\n");
        rp_close(&c);
        return RP_EXIT_PROBLEM;
    }
    char bdir[4300];
    rc = backup(dir, bdir, sizeof bdir);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot back up %s/data.mdb (%s): nothing changed\n", dir,
                cap_strerror(rc));
        rp_close(&c);
        return RP_EXIT_OPEN;
    }
    printf("backup: %s/data.mdb\n", bdir);
    cutw_t w = {.c = &c, .cut = d.cut};
    store_txn_t *txn = NULL;
    if ((rc = store_txn_begin(c.env, 1, &txn)) == 0) {
        rc = store_dbi_open(txn, "wal.key", 0, &w.key);
        if (rc == 0)
            rc = store_txn_commit(txn);
        else
            store_txn_abort(txn);
    }
    if (rc == 0 && !c.have[RP_T_META])
        rc = CAP_ENOTFOUND;
    do
        rc = rc ? rc : store_env_write(c.env, cut_fn, &w);
    while (rc == 0 && w.deleted);
    if (rc == 0)
        rc = store_env_sync(c.env);
    rp_close(&c);
    if (rc) {
        fprintf(stderr, "capsule-replay: repair of %s failed: %s (the backup in %s is untouched)\n",
                dir, cap_strerror(rc), bdir);
        return RP_EXIT_OPEN;
    }
    printf("REPAIRED: dropped %" PRIu64 " record(s) (seq %" PRIu64 "..%" PRIu64
           "); the next record will be seq %" PRIu64 "\n",
           d.dropped, d.cut, d.last, d.cut);
    return RP_EXIT_CLEAN;
}

/* ---------- compact ---------- */
typedef struct compact {
    uint64_t last_ckpt, docs_seq, first_unflushed, records, before;
    rp_progress_t pr;
} compact_t;

static int compact_one(void *arg, store_txn_t *txn, int rc, const wal_entry_t *e, const char *why)
{
    (void)txn;
    (void)why;
    compact_t *x = arg;
    rp_progress_step(&x->pr, 1);
    x->records++;
    if (rc)
        return 0; /* verify/repair name damaged records; compact only moves the front */
    if (e->kind == ENG_REC_CHECKPOINT)
        x->last_ckpt = e->seq;
    if (e->kind == PROM_REC_DOC && e->seq > x->docs_seq && !x->first_unflushed)
        x->first_unflushed = e->seq;
    return 0;
}

static int count_before(void *arg, store_txn_t *txn, int rc, const wal_entry_t *e, const char *why)
{
    (void)txn, (void)rc, (void)e, (void)why;
    ((compact_t *)arg)->before++;
    return 0;
}

int rp_cmd_compact(int argc, char **argv)
{
    int write;
    const char *dir;
    int st = parse_write_dir("compact", argc, argv, &write, &dir);
    if (st)
        return st;
    rp_ctx_t c = {0};
    if ((st = rp_open(&c, dir, write)))
        return st;
    compact_t x = {0};
    store_txn_t *txn = NULL;
    store_val_t v;
    int rc = store_txn_begin(c.env, 1, &txn);
    if (rc == 0) {
        if (c.have[RP_T_PMETA] &&
            store_get(txn, c.dbi[RP_T_PMETA], (store_val_t){"docs_seq", 8}, &v) == 0 && v.len == 8)
            x.docs_seq = cap_get_be64(v.data);
        store_txn_abort(txn);
    }
    rp_progress_start(&x.pr, "compact scan", 0);
    if (rc == 0)
        rc = rp_log_walk(&c, 0, 0, RP_DECODE_NONE, compact_one, &x);
    rp_progress_end(&x.pr);
    uint64_t cut = x.last_ckpt;
    if (x.first_unflushed && x.first_unflushed < cut)
        cut = x.first_unflushed;
    if (rc == 0 && cut)
        rc = rp_log_walk(&c, 0, cut - 1, RP_DECODE_NONE, count_before, &x);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read %s: %s\n", dir, cap_strerror(rc));
        rp_close(&c);
        return RP_EXIT_OPEN;
    }
    if (!x.last_ckpt || !x.before) {
        printf("nothing to compact: %s (%" PRIu64 " records)\n",
               x.last_ckpt ? "no record before the latest checkpoint" : "no checkpoint in the log",
               x.records);
        rp_close(&c);
        return RP_EXIT_CLEAN;
    }
    printf("latest checkpoint record: seq %" PRIu64 "%s\n", x.last_ckpt,
           cut < x.last_ckpt ? " (bounded by a prom.doc record not yet in prom.docs)" : "");
    printf("%s %" PRIu64 " of %" PRIu64 " record(s) before seq %" PRIu64
           " (their effects are in the derived tables); %" PRIu64 " kept\n",
           write ? "dropping" : "would drop", x.before, x.records, cut, x.records - x.before);
    if (!write) {
        printf("nothing changed (run with --write)\n");
        rp_close(&c);
        return RP_EXIT_CLEAN;
    }
    char bdir[4300];
    if ((rc = backup(dir, bdir, sizeof bdir)) != 0) {
        fprintf(stderr, "capsule-replay: cannot back up %s/data.mdb (%s): nothing changed\n", dir,
                cap_strerror(rc));
        rp_close(&c);
        return RP_EXIT_OPEN;
    }
    printf("backup: %s/data.mdb\n", bdir);
    wal_log_t *log = NULL;
    wal_opts_t wo = {0};
    rc = wal_log_open(c.env, &wo, &log);
    if (rc == 0)
        rc = wal_log_truncate(log, cut);
    wal_log_close(log);
    if (rc == 0)
        rc = store_env_sync(c.env);
    rp_close(&c);
    if (rc) {
        fprintf(stderr, "capsule-replay: compact of %s failed: %s (backup in %s)\n", dir,
                cap_strerror(rc), bdir);
        return RP_EXIT_OPEN;
    }
    printf("COMPACTED: the log now starts at seq %" PRIu64 "\n", cut);
    return RP_EXIT_CLEAN;
}
