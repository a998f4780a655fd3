/*
 * common.c - capsule-replay's shared parts: opening a data directory, bounded-snapshot table
 * walks, progress line, kind names, time and number parsing.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "capsule.h"
#include "promise.h"
#include "replay.h"

const char *const rp_table_names[RP_T_N] = {"wal.log",     "wal.meta",  "prom.docs",
                                            "prom.outbox", "prom.meta", "eng.results",
                                            "eng.deltas",  "eng.ckpt",  "eng.base"};

int rp_dir_busy(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/lock.mdb", dir);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return 0;
    struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    int busy = fcntl(fd, F_SETLK, &l) != 0 && (errno == EAGAIN || errno == EACCES);
    close(fd); /* drops the probe lock; no env of this process is open on dir yet */
    return busy;
}

/* Before a command writes: what a WAL_SYNC log's journal holds past the last checkpoint is
 * acknowledged but may be missing from data.mdb (after a power loss), and the next log open
 * re-applies it by sequence number. A command that cut or moved records first would see an
 * incomplete log, back up an incomplete data.mdb, and have the journal bring dropped records
 * back. So the log is opened once, as an engine would (journal applied, a new journal epoch,
 * then a clean checkpoint at close), and every command works on the whole, settled log. Only
 * when store.ckpt exists: a log that never had a journal is not given one. */
static int apply_journal(rp_ctx_t *c)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/store.ckpt", c->dir);
    if (access(path, F_OK) != 0)
        return 0;
    wal_log_t *log = NULL;
    wal_opts_t wo = {0};
    int rc = wal_log_open(c->env, &wo, &log);
    if (rc)
        return rc;
    wal_stats_t st;
    wal_log_stats(log, &st);
    wal_log_close(log);
    if (st.replayed)
        printf("journal: %" PRIu64 " acknowledged record(s) applied to data.mdb first (as an "
               "engine's open would)\n",
               st.replayed);
    return 0;
}

int rp_open(rp_ctx_t *c, const char *dir, int write)
{
    store_env_opts_t so = {.readonly = !write};
    store_txn_t *txn = NULL;
    int rc;
    c->dir = dir;
    if (write && rp_dir_busy(dir)) {
        fprintf(stderr,
                "capsule-replay: %s is open in another process (a running engine?): stop it "
                "before writing\n",
                dir);
        return RP_EXIT_OPEN;
    }
    rc = store_env_open(dir, &so, &c->env);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot open data directory %s: %s\n", dir,
                cap_strerror(rc));
        return RP_EXIT_OPEN;
    }
    rc = store_txn_begin(c->env, 1, &txn);
    if (rc == 0) {
        for (int t = 0; t < RP_T_N; t++)
            c->have[t] = store_dbi_open(txn, rp_table_names[t], 0, &c->dbi[t]) == 0;
        rc = store_txn_commit(txn); /* committed: LMDB keeps the handles */
    }
    if (rc == 0 && !c->have[RP_T_LOG])
        rc = CAP_ENOTFOUND;
    if (rc) {
        fprintf(stderr, "capsule-replay: no capsule log in %s: %s\n", dir, cap_strerror(rc));
        store_env_close(c->env);
        c->env = NULL;
        return RP_EXIT_OPEN;
    }
    if (write && (rc = apply_journal(c)) != 0) {
        fprintf(stderr,
                "capsule-replay: cannot apply the journal of %s (%s): nothing changed; start an "
                "engine on it once, or look at it with verify\n",
                dir, cap_strerror(rc));
        store_env_close(c->env);
        c->env = NULL;
        return RP_EXIT_OPEN;
    }
    return 0;
}

void rp_close(rp_ctx_t *c)
{
    store_env_close(c->env);
    c->env = NULL;
}

int rp_walk(rp_ctx_t *c, int t, const void *from, size_t from_len, rp_walk_fn fn, void *arg)
{
    if (!c->have[t])
        return CAP_ENOTFOUND;
    uint8_t *last = NULL;
    size_t last_len = 0;
    int rc = 0, started = 0, done = 0;
    while (!done && rc == 0) {
        store_txn_t *txn = NULL;
        store_cursor_t *cur = NULL;
        rc = store_txn_begin(c->env, 1, &txn);
        if (rc == 0)
            rc = store_cursor_open(txn, c->dbi[t], &cur);
        store_val_t k = {0}, v = {0};
        if (rc == 0) {
            if (started) {
                k = (store_val_t){last, last_len};
                rc = store_cursor_get(cur, &k, &v, STORE_SET_RANGE);
                if (rc == 0 && k.len == last_len && memcmp(k.data, last, last_len) == 0)
                    rc = store_cursor_get(cur, &k, &v, STORE_NEXT);
            } else if (from && from_len) {
                k = (store_val_t){(void *)from, from_len};
                rc = store_cursor_get(cur, &k, &v, STORE_SET_RANGE);
            } else {
                rc = store_cursor_get(cur, &k, &v, STORE_FIRST);
            }
        }
        started = 1;
        for (uint32_t n = 0; rc == 0; n++) {
            int r = fn(arg, txn, k, v);
            if (r == 1) {
                done = 1;
                break;
            }
            if (r) {
                rc = r;
                break;
            }
            if (n + 1 == RP_CHUNK) { /* end this snapshot; the next one resumes after k */
                last = cap_realloc(last, k.len ? k.len : 1);
                memcpy(last, k.data, k.len);
                last_len = k.len;
                break;
            }
            rc = store_cursor_get(cur, &k, &v, STORE_NEXT);
        }
        if (rc == CAP_ENOTFOUND) {
            rc = 0;
            done = 1;
        }
        store_cursor_close(cur);
        store_txn_abort(txn);
    }
    cap_free(last);
    return rc;
}

int rp_log_bounds(rp_ctx_t *c, store_txn_t *txn, uint64_t *first, uint64_t *last, uint64_t *high)
{
    store_cursor_t *cur = NULL;
    store_val_t k, v;
    *first = *last = *high = 0;
    int rc = store_cursor_open(txn, c->dbi[RP_T_LOG], &cur);
    if (rc)
        return rc;
    if (store_cursor_get(cur, &k, &v, STORE_FIRST) == 0 && k.len == 8)
        *first = cap_get_be64(k.data);
    if (store_cursor_get(cur, &k, &v, STORE_LAST) == 0 && k.len == 8)
        *last = cap_get_be64(k.data);
    store_cursor_close(cur);
    if (c->have[RP_T_META] &&
        store_get(txn, c->dbi[RP_T_META], (store_val_t){"high", 4}, &v) == 0 && v.len == 8)
        *high = cap_get_be64(v.data);
    return 0;
}

/* ---------- progress ---------- */
void rp_progress_start(rp_progress_t *p, const char *label, uint64_t total)
{
    memset(p, 0, sizeof *p);
    p->label = label;
    p->total = total;
    p->t0 = cap_now_ns();
    p->tty = isatty(STDERR_FILENO);
}

static void progress_show(rp_progress_t *p, int end)
{
    double secs = (double)(cap_now_ns() - p->t0) / 1e9;
    double rate = secs > 0 ? (double)p->done / secs : 0;
    double eta = rate > 0 && p->total > p->done ? (double)(p->total - p->done) / rate : 0;
    fprintf(stderr, "\r%s: %" PRIu64 "/%" PRIu64 "  %.0f/s  ETA %.0fs   %s", p->label, p->done,
            p->total, rate, eta, end ? "\n" : "");
    p->shown = 1;
}

void rp_progress_step(rp_progress_t *p, uint64_t n)
{
    uint64_t before = p->done;
    p->done += n;
    if (p->tty && (before >> 16) != (p->done >> 16))
        progress_show(p, 0);
}

void rp_progress_end(rp_progress_t *p)
{
    if (p->tty && p->shown)
        progress_show(p, 1);
}

/* ---------- names and parsing ---------- */
static const struct {
    int kind;
    const char *name;
} kind_names[] = {
    {PROM_REC_DOC, "prom.doc"},
    {PROM_REC_MSG_ADD, "prom.msg_add"},
    {PROM_REC_MSG_DEL, "prom.msg_del"},
    {ENG_REC_FINISH, "eng.finish"},
    {ENG_REC_CHECKPOINT, "eng.checkpoint"},
    {ENG_REC_SESSION, "eng.session"},
};

const char *rp_kind_name(int kind, char buf[16])
{
    for (size_t i = 0; i < sizeof kind_names / sizeof kind_names[0]; i++)
        if (kind_names[i].kind == kind)
            return kind_names[i].name;
    snprintf(buf, 16, "kind-0x%02x", kind & 0xFF);
    return buf;
}

int rp_kind_parse(const char *s)
{
    for (size_t i = 0; i < sizeof kind_names / sizeof kind_names[0]; i++)
        if (strcmp(kind_names[i].name, s) == 0)
            return kind_names[i].kind;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (!strncmp(s, "kind-0x", 7))
        v = strtol(s + 5, &end, 16);
    if (errno || *end || end == s || v < 1 || v > 255)
        return -1;
    return (int)v;
}

int rp_u64_parse(const char *s, uint64_t *out)
{
    if (!s || !*s || *s < '0' || *s > '9')
        return CAP_EINVAL;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return CAP_EINVAL;
    *out = v;
    return 0;
}

int rp_time_parse(const char *s, int64_t *ms)
{
    uint64_t u;
    if (rp_u64_parse(s, &u) == 0 && strlen(s) > 10) { /* ms since the epoch */
        *ms = (int64_t)u;
        return 0;
    }
    struct tm tm = {0};
    int n = 0, y, mo, d, h = 0, mi = 0, sec = 0;
    size_t len = strlen(s);
    if (sscanf(s, "%4d-%2d-%2d%n", &y, &mo, &d, &n) != 3 || n != 10)
        return CAP_EINVAL;
    const char *r = s + 10;
    if (*r == 'T' || *r == ' ') {
        int m = 0;
        if (sscanf(r + 1, "%2d:%2d%n", &h, &mi, &m) != 2 || m != 5)
            return CAP_EINVAL;
        r += 6;
        if (*r == ':') {
            if (sscanf(r + 1, "%2d%n", &sec, &m) != 1 || m != 2)
                return CAP_EINVAL;
            r += 3;
        }
    }
    if (*r == 'Z')
        r++;
    if (r != s + len || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
        return CAP_EINVAL;
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    *ms = (int64_t)timegm(&tm) * 1000;
    return 0;
}

const char *rp_time_fmt(int64_t ms, char buf[32])
{
    if (ms <= 0)
        return "-";
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    size_t n = strftime(buf, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, 32 - n, ".%03dZ", (int)(ms % 1000));
    return buf;
}

/* ---------- usage ---------- */
static const struct {
    const char *cmd, *text;
} usages[] = {
    {"verify", "verify [--deep] DIR\n"
               "    Check every log record (frame, checksum, seq continuity) and the derived\n"
               "    tables (prom.docs, prom.outbox, eng.*) against the records. --deep also\n"
               "    decodes every record's fields. Exit 0 clean, 1 problems (each named with\n"
               "    its seq), 2 cannot open.\n"},
    {"sessions",
     "sessions [--json] [--state open|closed] [--since T] [--until T] [--limit N] DIR\n"
     "    List sessions (from prom.docs). T: ms since the epoch or YYYY-MM-DD[THH:MM[:SS]]Z.\n"},
    {"executions", "executions [--json] [--session SID] [--state "
                   "pending|done|ok|error|cancelled|timeout|died|refused]\n"
                   "           [--since T] [--until T] [--limit N] DIR\n"
                   "    List executions in submission order with their recorded result.\n"},
    {"promises", "promises [--json] [--state pending|resolved|rejected] [--prefix ID] [--since T]\n"
                 "         [--until T] [--limit N] DIR\n"
                 "    List durable promises (every kind).\n"},
    {"show", "show [--json] DIR SESSION|EXECUTION\n"
             "    A session's timeline (executions, inputs, deltas, checkpoints, worker deaths)\n"
             "    or one execution (code, inputs with replies, output, result).\n"},
    {"replay", "replay [--rerun] DIR SESSION\n"
               "    Rebuild SESSION offline in a fresh worker from its checkpoint + deltas (the\n"
               "    engine's restore chain) and compare with all its deltas name by name; --rerun\n"
               "    also re-runs its committed executions with their recorded input replies and\n"
               "    compares. Exit 1 if anything differs or fails to restore.\n"},
    {"export", "export [--from SEQ] [--to SEQ] [--kind K] DIR\n"
               "    NDJSON of log records, decoded (kind names, fields). K: a name\n"
               "    (prom.doc, eng.finish, ...) or a number.\n"},
    {"repair", "repair [--write] DIR\n"
               "    Find the first damaged record or gap; report every record after the last\n"
               "    valid one. With --write: back up data.mdb to DIR/backup-<time>/ first, then\n"
               "    drop those records. Without --write nothing is changed.\n"},
    {"compact", "compact [--write] DIR\n"
                "    Drop the log records that a checkpoint made redundant (recovery reads the\n"
                "    derived tables, not them); report what would be / was dropped. --write\n"
                "    backs up data.mdb first and needs the engine stopped.\n"},
};

void rp_usage_print(FILE *f, const char *cmd)
{
    fprintf(f, "usage: capsule-replay COMMAND [options] ...\n");
    for (size_t i = 0; i < sizeof usages / sizeof usages[0]; i++)
        if (!cmd || strcmp(cmd, usages[i].cmd) == 0)
            fprintf(f, "  capsule-replay %s", usages[i].text);
    if (!cmd)
        fprintf(f, "Every command is read-only unless given --write, and safe on the directory of\n"
                   "a running engine (bounded LMDB read transactions). Exit 64 on bad usage.\n");
}

int rp_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "capsule-replay %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    rp_usage_print(stderr, cmd);
    return RP_EXIT_USAGE;
}

int rp_wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help"))
            return 1;
    return 0;
}

/* ---------- the log ---------- */
int rp_kind_derived(int kind)
{
    return (kind >= PROM_REC_FIRST && kind <= PROM_REC_LAST) ||
           (kind >= ENG_REC_FINISH && kind <= ENG_REC_SESSION);
}

int rp_frame_decode(store_val_t k, store_val_t v, int decode, wal_scratch_t **scratch,
                    wal_entry_t *e, const char **why)
{
    memset(e, 0, sizeof *e);
    uint64_t seq = k.len == 8 ? cap_get_be64(k.data) : 0;
    const uint8_t *f = v.data;
    int full = decode == RP_DECODE_ALL ||
               (decode == RP_DECODE_DERIVED && v.len > 5 && rp_kind_derived(f[5]));
    int rc = wal_frame_decode(v.data, v.len, full, scratch, e);
    *why = NULL;
    if (k.len != 8) {
        *why = "key is not an 8-byte sequence number";
        rc = CAP_ECORRUPT;
    } else if (rc) {
        *why = full ? "frame fails the validity rule (length, header, checksum or field encoding)"
                    : "frame fails the validity rule (length, header or checksum)";
        rc = CAP_ECORRUPT;
    } else if (e->seq != seq) {
        *why = "frame names another sequence number than the one it is stored under";
        rc = CAP_ECORRUPT;
    }
    if (rc) {
        memset(e, 0, sizeof *e);
        e->seq = seq;
        e->frame_len = v.len;
    }
    return rc;
}

typedef struct log_walk {
    uint64_t to;
    int decode;
    wal_scratch_t *scratch;
    rp_rec_fn fn;
    void *arg;
} log_walk_t;

static int log_walk_one(void *arg, store_txn_t *txn, store_val_t k, store_val_t v)
{
    log_walk_t *w = arg;
    if (w->to && k.len == 8 && cap_get_be64(k.data) > w->to)
        return 1;
    wal_entry_t e;
    const char *why;
    int rc = rp_frame_decode(k, v, w->decode, &w->scratch, &e, &why);
    return w->fn(w->arg, txn, rc, &e, why);
}

int rp_log_walk(rp_ctx_t *c, uint64_t from, uint64_t to, int decode, rp_rec_fn fn, void *arg)
{
    log_walk_t w = {.to = to, .decode = decode, .fn = fn, .arg = arg};
    uint8_t kb[8];
    cap_put_be64(kb, from);
    int rc = rp_walk(c, RP_T_LOG, kb, 8, log_walk_one, &w);
    wal_scratch_free(w.scratch);
    return rc;
}
