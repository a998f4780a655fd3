/*
 * test_journal.c - the journal's scan rule and the checkpoint file, against damaged files.
 *
 * A child process opens a WAL_SYNC log with CAPSULE_TEST_CKPT_COPY set (it copies data.mdb at
 * every checkpoint, right after the sync), appends single-record batches (one journal block
 * each) and dies without closing (_exit). The parent then puts the last checkpoint's image in
 * place of data.mdb (all that a power loss could leave of the unflushed commits), damages the
 * journal as a test requires, reopens under another boot id and checks exactly which records the
 * journal brought back: every block before the first bad one, nothing from it on.
 * Covered: intact, torn block (frames checksum), flipped header byte, another epoch (stale
 * blocks of an earlier open), a stale lap, a zero-length block, the scan across a wrap to offset
 * 0, a full journal wrapped many times by concurrent writers, store.ckpt with one or both
 * slots damaged, and wal_journal_pending (what a read-only tool reports) in each case; and
 * checkpoint captures that fail are retried without losing anything.
 */
#include "check.h"
#include "wal.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define JHDR 64
#define JBLK 4096

static int g_boot;

static void put_rec(wal_log_t *log, uint64_t tag)
{
    char key[32];
    snprintf(key, sizeof key, "k%llu", (unsigned long long)(tag % 7));
    wal_field_t f[2] = {{.tag = 1, .u = tag}, {.tag = 2, .data = key, .len = strlen(key)}};
    wal_rec_t r = {.kind = 1, .key = key, .key_len = strlen(key), .fields = f, .nfields = 2};
    CHECK_OK(wal_log_append_sync(log, &r, 1, NULL));
}

struct writer {
    wal_log_t *log;
    int n;
    int id;
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    for (int i = 0; i < w->n; i++)
        put_rec(w->log, (uint64_t)w->id << 32 | (uint64_t)i);
    return NULL;
}

/* Child: opens the log, appends `n` records from `threads` threads, dies without closing. With
 * settle, it first waits until no checkpoint is in flight (the last one started is durable);
 * without, it may die while the checkpoint thread flushes beside the commits. settle 2: one
 * thread, and after each append it waits for the checkpoint it may have started, so that every
 * checkpoint starts exactly when the journal reaches half (not a batch later because the
 * previous one was still in flight: a slow checkpoint under ASan and load did that). */
static void child(const char *dir, const char *img, size_t jbytes, int n, int threads, int settle)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        store_env_t *env;
        wal_log_t *log;
        wal_opts_t wo = {.journal_bytes = jbytes};
        setenv("CAPSULE_TEST_CKPT_COPY", img, 1);
        if (store_env_open(dir, NULL, &env) || wal_log_open(env, &wo, &log))
            _exit(2);
        pthread_t th[8];
        struct writer w[8];
        wal_stats_t st;
        for (int i = 0; settle == 2 && i < n; i++) { /* each checkpoint durable before the next */
            put_rec(log, (uint64_t)i);
            for (wal_log_stats(log, &st); st.checkpoint_in_flight; wal_log_stats(log, &st))
                usleep(1000);
        }
        if (settle == 2)
            threads = 0;
        for (int t = 0; t < threads; t++) {
            w[t] = (struct writer){log, n / threads, t};
            pthread_create(&th[t], NULL, writer_main, &w[t]);
        }
        for (int t = 0; t < threads; t++)
            pthread_join(th[t], NULL);
        for (wal_log_stats(log, &st); settle && st.checkpoint_in_flight; wal_log_stats(log, &st))
            usleep(1000);
        _exit(0); /* a crash: no close, no final checkpoint */
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

static void copy_file(const char *from, const char *to)
{
    int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(in >= 0 && out >= 0);
    char buf[65536];
    ssize_t r;
    while ((r = read(in, buf, sizeof buf)) > 0)
        CHECK(write(out, buf, (size_t)r) == r);
    close(in);
    close(out);
}

/* The power loss: data.mdb as of the last checkpoint, and another boot id. */
static void lose_power(const char *dir, const char *img)
{
    char p[4200], b[32];
    snprintf(p, sizeof p, "%s/data.mdb", dir);
    copy_file(img, p);
    snprintf(b, sizeof b, "boot-%d", ++g_boot);
    setenv("CAPSULE_TEST_BOOT_ID", b, 1);
}

/* Reopens; checks the log is exactly seqs 1..last, all valid; returns last. */
static uint64_t reopen(const char *dir, size_t jbytes, uint64_t *replayed)
{
    store_env_t *env;
    wal_log_t *log;
    wal_opts_t wo = {.journal_bytes = jbytes};
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(wal_log_open(env, &wo, &log));
    wal_iter_t *it;
    wal_iter_opts_t o = {.decode = 1};
    wal_entry_t e;
    uint64_t n = 0;
    int rc;
    CHECK_OK(wal_iter_open(log, &o, &it));
    while ((rc = wal_iter_next(it, &e)) == 0)
        CHECK_EQ(e.seq, ++n);
    CHECK_ERR(rc, CAP_ENOTFOUND);
    wal_iter_close(it);
    wal_stats_t st;
    wal_log_stats(log, &st);
    CHECK_EQ(st.last_seq, n);
    if (replayed)
        *replayed = st.replayed;
    wal_log_close(log);
    store_env_close(env);
    return n;
}

static void jpath(const char *dir, char *p, size_t n)
{
    snprintf(p, n, "%s/wal.journal", dir);
}

/* Edits the header of the block at `off` with fn, then (fix) recomputes its checksum. */
static void edit_header(const char *dir, uint64_t off, void (*fn)(uint8_t *h), int fix)
{
    char p[4200];
    uint8_t h[JHDR];
    jpath(dir, p, sizeof p);
    int fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    CHECK(pread(fd, h, JHDR, (off_t)off) == JHDR);
    CHECK_EQ(cap_get_le32(h), 0x4C4E4A43u); /* a block is there */
    fn(h);
    if (fix)
        cap_put_le64(h + 56, cap_hash64(h, 56));
    CHECK(pwrite(fd, h, JHDR, (off_t)off) == JHDR);
    close(fd);
}

static void flip_byte(const char *dir, uint64_t off)
{
    char p[4200];
    uint8_t b;
    jpath(dir, p, sizeof p);
    int fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    CHECK(pread(fd, &b, 1, (off_t)off) == 1);
    b ^= 0x20;
    CHECK(pwrite(fd, &b, 1, (off_t)off) == 1);
    close(fd);
}

static void h_epoch(uint8_t *h)
{
    cap_put_le64(h + 8, cap_get_le64(h + 8) ^ 1);
}
static void h_lap(uint8_t *h)
{
    cap_put_le64(h + 16, cap_get_le64(h + 16) + 1);
}
static void h_zero(uint8_t *h)
{
    cap_put_le32(h + 32, 0);
    cap_put_le64(h + 40, 0);
    cap_put_le64(h + 48, cap_hash64("", 0));
}

/* One case: 12 blocks written from offset 0, damage at block `bad` (or none), expect bad
 * records back (every block before it). */
static void one_case(const char *what, void (*damage)(const char *dir, uint64_t off), int bad)
{
    char *dir = check_tmpdir("wal-journal");
    char img[4200];
    const size_t jb = 1 << 20; /* no checkpoint during 12 blocks */
    snprintf(img, sizeof img, "%s.img", dir);
    child(dir, img, jb, 12, 1, 1);
    lose_power(dir, img);
    if (damage)
        damage(dir, (uint64_t)bad * JBLK);
    uint64_t replayed, pending;
    uint64_t want = damage ? (uint64_t)bad : 12;
    /* a read-only open (a tool) sees the records only in the journal, touching nothing */
    store_env_t *ro;
    store_env_opts_t roo = {.readonly = 1};
    CHECK_OK(store_env_open(dir, &roo, &ro));
    CHECK_OK(wal_journal_pending(ro, 0, &pending));
    CHECK_EQ(pending, want);
    store_env_close(ro);
    uint64_t last = reopen(dir, jb, &replayed);
    if (last != want)
        fprintf(stderr, "case %s: %llu records back, expected %llu\n", what,
                (unsigned long long)last, (unsigned long long)want);
    CHECK_EQ(last, want);
    CHECK_EQ(replayed, want);
    /* the log keeps working after the recovery, from the next seq */
    store_env_t *env;
    wal_log_t *log;
    wal_opts_t wo = {.journal_bytes = jb};
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(wal_log_open(env, &wo, &log));
    put_rec(log, 99);
    wal_log_close(log);
    store_env_close(env);
    CHECK_EQ(reopen(dir, jb, NULL), want + 1);
    unlink(img);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "journal: %s: ok (%llu of 12 blocks re-applied)\n", what,
            (unsigned long long)want);
}

static void d_torn(const char *dir, uint64_t off)
{
    flip_byte(dir, off + JHDR + 40); /* inside the frame: frames checksum fails */
}
static void d_header(const char *dir, uint64_t off)
{
    flip_byte(dir, off + 25); /* first_seq byte, checksum not fixed */
}
static void d_epoch(const char *dir, uint64_t off)
{
    edit_header(dir, off, h_epoch, 1);
}
static void d_lap(const char *dir, uint64_t off)
{
    edit_header(dir, off, h_lap, 1);
}
static void d_zero(const char *dir, uint64_t off)
{
    edit_header(dir, off, h_zero, 1);
}

/* The scan follows the writer across the end of the file: 64 KiB journal (16 blocks, a
 * checkpoint every 8); 19 blocks leave the last checkpoint at the very end of lap 0 and three
 * blocks at offset 0 of lap 1. Then a full journal wrapped many times by 4 concurrent writers. */
static void test_wrap(void)
{
    char *dir = check_tmpdir("wal-journal-wrap");
    char img[4200];
    const size_t jb = 64 << 10;
    snprintf(img, sizeof img, "%s.img", dir);
    child(dir, img, jb, 19, 1, 2);
    lose_power(dir, img);
    uint64_t replayed;
    CHECK_EQ(reopen(dir, jb, &replayed), 19);
    CHECK_EQ(replayed, 3);
    fprintf(stderr, "journal: wrap to offset 0: ok\n");

    /* 4 writers, 2000 records: the 64 KiB journal wraps dozens of times, checkpoints run beside
     * the writers' commits (and the child may die with one in flight: the previous checkpoint
     * is then in force, its journal space never reused); every acknowledged record comes back
     * after the power loss */
    child(dir, img, jb, 2000, 4, 0);
    lose_power(dir, img);
    CHECK_EQ(reopen(dir, jb, &replayed), 19 + 2000);
    fprintf(stderr, "journal: full journal under 4 writers: ok (%llu re-applied)\n",
            (unsigned long long)replayed);
    unlink(img);
    check_rmtree(dir);
    cap_free(dir);
}

/* store.ckpt: two alternating slots; one damaged -> the other is used; both -> a clear error. */
static void test_ckpt_slots(void)
{
    char *dir = check_tmpdir("wal-journal-ckpt");
    char p[4200];
    store_env_t *env;
    uint8_t u[STORE_CKPT_USER], got[STORE_CKPT_USER];
    snprintf(p, sizeof p, "%s/store.ckpt", dir);
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_ERR(store_env_ckpt_user(env, got), CAP_ENOTFOUND); /* none yet */
    memset(u, 0xA1, sizeof u);
    CHECK_OK(store_env_checkpoint(env, u, 0)); /* slot 0 */
    memset(u, 0xB2, sizeof u);
    CHECK_OK(store_env_checkpoint(env, u, 0)); /* slot 1, the newest */
    store_env_close(env);                      /* a clean one in slot 0, user kept (B2) */

    /* damage slot 0 (the newest): slot 1 (B2, not clean) is used */
    int fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    uint8_t b = 0xFF;
    CHECK(pwrite(fd, &b, 1, 200) == 1);
    close(fd);
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(store_env_ckpt_user(env, got));
    CHECK(got[0] == 0xB2);
    store_env_close(env);

    /* both damaged: refused, naming the file */
    fd = open(p, O_RDWR);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, &b, 1, 200) == 1);
    CHECK(pwrite(fd, &b, 1, 16384 + 200) == 1);
    close(fd);
    CHECK_ERR(store_env_open(dir, NULL, &env), CAP_ECORRUPT);
    /* a truncated file: the same */
    CHECK(truncate(p, 100) == 0);
    CHECK_ERR(store_env_open(dir, NULL, &env), CAP_ECORRUPT);
    /* an empty one too (never a silent skip) */
    CHECK(truncate(p, 0) == 0);
    CHECK_ERR(store_env_open(dir, NULL, &env), CAP_ECORRUPT);
    /* read-only opens do not look at it */
    store_env_opts_t ro = {.readonly = 1};
    CHECK_OK(store_env_open(dir, &ro, &env));
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "journal: store.ckpt slots: ok\n");
}

/* The log's journal is gone while store.ckpt refers to it: refused, not silently skipped. */
static void test_missing_journal(void)
{
    char *dir = check_tmpdir("wal-journal-missing");
    char img[4200], p[4200];
    snprintf(img, sizeof img, "%s.img", dir);
    child(dir, img, 1 << 20, 3, 1, 1);
    jpath(dir, p, sizeof p);
    CHECK(unlink(p) == 0);
    store_env_t *env;
    wal_log_t *log;
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_ERR(wal_log_open(env, NULL, &log), CAP_ECORRUPT);
    store_env_close(env);
    unlink(img);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "journal: missing journal refused: ok\n");
}

/* Checkpoint captures that fail (CAPSULE_TEST_CKPT_CAPTURE_FAIL) do not stop the log: each is
 * counted and tried again after the next batch while the previous checkpoint stays in force; a
 * later one succeeds and the journal wraps as usual. Killed without a close, then the power lost
 * (the last checkpoint's image in place of data.mdb): every acknowledged record is back. */
static void test_capture_retry(void)
{
    char *dir = check_tmpdir("wal-journal-capture");
    char img[4200];
    snprintf(img, sizeof img, "%s.img", dir);
    const int n = 900; /* ~3.5 journals of 1 MiB: single-record batches, one 4 KiB block each */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        store_env_t *env;
        wal_log_t *log;
        wal_opts_t wo = {.journal_bytes = 1 << 20};
        setenv("CAPSULE_TEST_CKPT_COPY", img, 1);
        if (store_env_open(dir, NULL, &env) || wal_log_open(env, &wo, &log))
            _exit(2);
        setenv("CAPSULE_TEST_CKPT_CAPTURE_FAIL", "5", 1); /* after the open's own checkpoint */
        for (int i = 0; i < n; i++)
            put_rec(log, (uint64_t)i);
        wal_stats_t st;
        for (wal_log_stats(log, &st); st.checkpoint_in_flight; wal_log_stats(log, &st))
            usleep(1000);
        fprintf(stderr, "journal: capture retry: %llu checkpoints, %llu captures skipped\n",
                (unsigned long long)st.checkpoints, (unsigned long long)st.checkpoints_skipped);
        if (st.checkpoints_skipped != 5 || st.checkpoints < 4)
            _exit(3);
        _exit(0); /* a crash: no close, no final checkpoint */
    }
    int ws;
    CHECK(waitpid(pid, &ws, 0) == pid);
    CHECK(WIFEXITED(ws));
    CHECK_EQ(WEXITSTATUS(ws), 0);
    lose_power(dir, img);
    CHECK_EQ(reopen(dir, 1 << 20, NULL), (uint64_t)n);
    unlink(img);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "journal: failed captures retried, nothing lost: ok\n");
}

int main(void)
{
    one_case("intact", NULL, 0);
    one_case("torn block", d_torn, 11);
    one_case("flipped header byte", d_header, 5);
    one_case("another epoch (stale open)", d_epoch, 5);
    one_case("stale lap", d_lap, 7);
    one_case("zero-length block", d_zero, 3);
    test_wrap();
    test_ckpt_slots();
    test_missing_journal();
    test_capture_retry();
    fprintf(stderr, "wal.journal: ok\n");
    return 0;
}
