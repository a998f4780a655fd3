/*
 * test_crash.c - kill -9 at random moments. Each round forks a child that opens the log (sync
 * mode on even rounds, nosync on odd ones: both promise that acknowledged records survive the
 * death of the process) and appends from 4 threads, groups of 1 or 3 records, reporting each
 * acknowledged append to the parent over a pipe. The parent kills it after a random delay
 * (0-60 ms, so some kills land during open), reopens the log and checks:
 *   - every frame decodes (no damaged record), sequence numbers are dense from first to last;
 *   - every acknowledged append is present, intact and in place (unless truncated away);
 *   - groups are all-or-nothing: no partial multi-record append is visible;
 *   - each (round, thread)'s records appear in the order the thread appended them.
 * The parent also truncates between rounds, so truncation is crash-tested too.
 * CRASH_ROUNDS (default 220) sets the number of kill points.
 *
 * `test_wal_crash powerloss` (ctest wal.powerloss) simulates power losses instead: every round
 * is WAL_SYNC with a small journal (a checkpoint every 64 KiB), and the child copies data.mdb at
 * each checkpoint right after its sync (CAPSULE_TEST_CKPT_COPY: the image on disk then). After
 * the kill -9 the parent builds what a power loss could leave: each 4 KiB page of data.mdb
 * (meta pages included) is, at random, the current page or the checkpoint image's (pages past
 * the image: current or zeros); then it reopens under another boot id (CAPSULE_TEST_BOOT_ID), so
 * the store restores the checkpoint's meta pages and the journal re-applies the rest, and runs
 * the same checks. POWERLOSS_ROUNDS (default 60). Checkpoints are flushed by the log's
 * checkpoint thread while the writer goes on committing; two rounds in three hold that flush
 * open 3 or 40 ms (CAPSULE_TEST_CKPT_DELAY_MS), so kills land with a checkpoint in flight (its
 * image copied, its slot not yet written) and with the writer waiting for journal space. The
 * children report both with each ack; with 30 rounds or more the test requires that they
 * happened (going on for up to 3 times the rounds until they have). Powerloss kills come 20-300 ms
 * after the fork in one round in four, after the child's first ack in the others.
 */
#include "check.h"
#include "wal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define NPROD    4
#define MAP_SIZE (512 << 10)

/* One pipe message: an acknowledged append. 40 bytes, below PIPE_BUF, so writes are atomic. */
struct ack_msg {
    uint64_t first_seq;
    uint64_t n;
    uint64_t thread;
    uint64_t counter;
    uint64_t ckpt; /* ACK_CKPT_* seen in the log's stats right after the ack */
};
#define ACK_CKPT_IN_FLIGHT 1u /* a checkpoint was being flushed beside the commits */
#define ACK_CKPT_WAITED    2u /* the writer has waited for one (journal space) since open */

static void payload(uint64_t round, uint64_t thread, uint64_t counter, uint64_t idx, uint8_t *p,
                    size_t *len)
{
    uint64_t h = cap_hash64((uint64_t[]){round, thread, counter, idx}, 32);
    *len = 40 + h % 200;
    for (size_t i = 0; i < *len; i++)
        p[i] = (uint8_t)(h >> (i % 8 * 8)) ^ (uint8_t)i;
}

struct child {
    wal_log_t *log;
    uint64_t round;
    int wfd;
    pid_t parent;
};

static struct child child_ctx;
static int powerloss;

static void *child_producer(void *arg)
{
    uint64_t thread = (uint64_t)(uintptr_t)arg, counter = 0;
    uint8_t data[3][256];
    char key[32];
    snprintf(key, sizeof(key), "r%llu-t%llu", (unsigned long long)child_ctx.round,
             (unsigned long long)thread);
    for (;;) {
        if (getppid() != child_ctx.parent)
            _exit(3);
        uint64_t n = (counter % 3 == 1) ? 3 : 1;
        wal_rec_t r[3];
        wal_field_t f[3][5];
        for (uint64_t i = 0; i < n; i++) {
            size_t len;
            payload(child_ctx.round, thread, counter, i, data[i], &len);
            f[i][0] = (wal_field_t){.tag = 1, .u = child_ctx.round};
            f[i][1] = (wal_field_t){.tag = 2, .u = thread};
            f[i][2] = (wal_field_t){.tag = 3, .u = counter};
            f[i][3] = (wal_field_t){.tag = 4, .u = n << 8 | i};
            f[i][4] = (wal_field_t){.tag = 5, .data = data[i], .len = len};
            r[i] = (wal_rec_t){.kind = (uint8_t)(1 + i),
                               .key = key,
                               .key_len = strlen(key),
                               .fields = f[i],
                               .nfields = 5};
        }
        uint64_t first;
        int rc = wal_log_append_sync(child_ctx.log, r, n, &first);
        if (rc)
            _exit(4);
        wal_stats_t st;
        wal_log_stats(child_ctx.log, &st);
        uint64_t ck = (st.checkpoint_in_flight ? ACK_CKPT_IN_FLIGHT : 0) |
                      (st.checkpoint_wait_ns ? ACK_CKPT_WAITED : 0);
        struct ack_msg m = {first, n, thread, counter, ck};
        if (write(child_ctx.wfd, &m, sizeof(m)) != (ssize_t)sizeof(m))
            _exit(5);
        counter++;
    }
    return NULL;
}

static void child_main(const char *dir, uint64_t round, int wfd, pid_t parent)
{
    store_env_t *env;
    int nosync = powerloss ? 0 : (int)(round & 1);
    store_env_opts_t eo = {.map_size = MAP_SIZE, .nosync = nosync};
    wal_opts_t wo = {.durability = nosync ? WAL_NOSYNC : WAL_SYNC,
                     .sync_interval_ms = 10,
                     .journal_bytes = powerloss ? (128 << 10) : 0};
    alarm(20); /* never outlive a broken parent */
    if (powerloss && round % 3) {
        /* a checkpoint's flush held open 3 or 40 ms (the 40 ms ones make the writer wait for
         * journal space): kills land while commits run beside a checkpoint in flight */
        if (setenv("CAPSULE_TEST_CKPT_DELAY_MS", round % 3 == 1 ? "3" : "40", 1) != 0)
            _exit(9);
    }
    if (store_env_open(dir, &eo, &env) != 0)
        _exit(6);
    child_ctx = (struct child){.round = round, .wfd = wfd, .parent = parent};
    if (wal_log_open(env, &wo, &child_ctx.log) != 0)
        _exit(7);
    pthread_t th[NPROD];
    for (uintptr_t i = 0; i < NPROD; i++)
        if (pthread_create(&th[i], NULL, child_producer, (void *)i) != 0)
            _exit(8);
    for (;;)
        pause();
}

struct acks {
    struct ack_msg *v;
    size_t n, cap;
    uint64_t *round; /* the round of each ack */
};

static void acks_add(struct acks *a, const struct ack_msg *m, uint64_t round)
{
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 1024;
        a->v = cap_realloc(a->v, a->cap * sizeof(*a->v));
        a->round = cap_realloc(a->round, a->cap * sizeof(*a->round));
    }
    a->v[a->n] = *m;
    a->round[a->n++] = round;
}

static uint64_t field_u(const wal_entry_t *e, uint32_t tag)
{
    const wal_field_t *f = wal_entry_field(e, tag);
    CHECK(f != NULL);
    return f->u;
}

/* Checks the whole log and every ack; returns the last stored seq. */
static uint64_t verify(wal_log_t *log, const struct acks *a, uint64_t cut)
{
    wal_iter_t *it;
    wal_entry_t e;
    wal_iter_opts_t o = {.decode = 1};
    int rc;
    uint64_t prev = 0, first = 0, count = 0;
    /* group state: the group being read must continue with idx+1 */
    uint64_t g_round = 0, g_thread = 0, g_counter = 0, g_n = 0, g_next = 0;
    char e_last_key[32];
    size_t e_last_key_len = 0;
    int in_group = 0;
    /* per (round, thread) last counter, for the order check: small open-addressing table */
    enum { TAB = 4096 };
    static uint64_t tab_key[TAB], tab_val[TAB];
    memset(tab_key, 0, sizeof(tab_key));

    CHECK_OK(wal_iter_open(log, &o, &it));
    while ((rc = wal_iter_next(it, &e)) == 0) {
        CHECK(e.key_len > 0 && e.key_len < sizeof(e_last_key));
        memcpy(e_last_key, e.key, e.key_len);
        e_last_key_len = e.key_len;
        if (!first)
            first = e.seq;
        else
            CHECK_EQ(e.seq, prev + 1); /* dense */
        prev = e.seq;
        count++;
        uint64_t round = field_u(&e, 1), thread = field_u(&e, 2), counter = field_u(&e, 3);
        uint64_t gi = field_u(&e, 4), n = gi >> 8, idx = gi & 0xff;
        CHECK(idx < n && (n == 1 || n == 3));
        CHECK_EQ(e.kind, 1 + idx);
        const wal_field_t *pf = wal_entry_field(&e, 5);
        uint8_t want[256];
        size_t wl;
        payload(round, thread, counter, idx, want, &wl);
        CHECK(pf && pf->len == wl && memcmp(pf->data, want, wl) == 0);
        if (in_group) {
            /* the previous group must continue here */
            CHECK(round == g_round && thread == g_thread && counter == g_counter && n == g_n &&
                  idx == g_next);
        } else {
            /* a new group starts at idx 0, except the very first record after a truncation */
            if (idx != 0)
                CHECK(count == 1 && e.seq - idx >= 1 && e.seq < cut + 3);
        }
        g_round = round;
        g_thread = thread;
        g_counter = counter;
        g_n = n;
        g_next = idx + 1;
        in_group = g_next < n;
        if (idx == 0) {
            uint64_t k = (round << 8 | thread) + 1;
            size_t h = (size_t)(k * 0x9E3779B97F4A7C15ull >> 52) % TAB;
            while (tab_key[h] && tab_key[h] != k)
                h = (h + 1) % TAB;
            if (tab_key[h])
                CHECK(counter > tab_val[h]); /* a thread's appends in its order */
            tab_key[h] = k;
            tab_val[h] = counter;
        }
    }
    CHECK_ERR(rc, CAP_ENOTFOUND); /* no damaged record anywhere */
    wal_iter_close(it);
    CHECK(!in_group); /* no partial group at the end: all-or-nothing */

    /* reads by key (index + unindexed tail) agree with the scan, for the last record's key */
    if (count) {
        char key[32];
        size_t kl = e_last_key_len;
        memcpy(key, e_last_key, kl);
        uint64_t by_scan = 0, by_key = 0;
        wal_iter_opts_t so = {0};
        CHECK_OK(wal_iter_open(log, &so, &it));
        while ((rc = wal_iter_next(it, &e)) == 0)
            if (e.key_len == kl && memcmp(e.key, key, kl) == 0)
                by_scan++;
        CHECK_ERR(rc, CAP_ENOTFOUND);
        wal_iter_close(it);
        wal_iter_opts_t ko = {.key = key, .key_len = kl};
        CHECK_OK(wal_iter_open(log, &ko, &it));
        while ((rc = wal_iter_next(it, &e)) == 0)
            by_key++;
        CHECK_ERR(rc, CAP_ENOTFOUND);
        wal_iter_close(it);
        CHECK(by_scan > 0);
        CHECK_EQ(by_key, by_scan);
    }

    /* every acknowledged append is there and is what was acknowledged */
    for (size_t i = 0; i < a->n; i++) {
        const struct ack_msg *m = &a->v[i];
        if (m->first_seq < cut)
            continue; /* truncated away on purpose */
        if (!(m->first_seq >= first && m->first_seq + m->n - 1 <= prev)) {
            fprintf(stderr,
                    "ack %zu of round %llu (seq %llu, n %llu) outside the log [%llu, %llu]\n", i,
                    (unsigned long long)a->round[i], (unsigned long long)m->first_seq,
                    (unsigned long long)m->n, (unsigned long long)first, (unsigned long long)prev);
            fprintf(stderr, "cut %llu; acks of that round:", (unsigned long long)cut);
            for (size_t j = 0; j < a->n; j++)
                if (a->round[j] == a->round[i])
                    fprintf(stderr, " %llu+%llu", (unsigned long long)a->v[j].first_seq,
                            (unsigned long long)a->v[j].n);
            fprintf(stderr, "\n");
            CHECK(0);
        }
        wal_iter_opts_t one = {
            .from_seq = m->first_seq, .to_seq = m->first_seq + m->n - 1, .decode = 1};
        uint64_t got = 0;
        CHECK_OK(wal_iter_open(log, &one, &it));
        while ((rc = wal_iter_next(it, &e)) == 0) {
            CHECK_EQ(e.seq, m->first_seq + got);
            CHECK_EQ(field_u(&e, 1), a->round[i]);
            CHECK_EQ(field_u(&e, 2), m->thread);
            CHECK_EQ(field_u(&e, 3), m->counter);
            CHECK_EQ(field_u(&e, 4), m->n << 8 | got);
            got++;
        }
        CHECK_ERR(rc, CAP_ENOTFOUND);
        wal_iter_close(it);
        CHECK_EQ(got, m->n);
    }
    return prev;
}

/* Reads a whole file (NULL when missing); *len its size. */
static uint8_t *slurp(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return NULL;
    off_t end = lseek(fd, 0, SEEK_END);
    CHECK(end >= 0);
    uint8_t *b = cap_malloc((size_t)end + 1);
    CHECK(pread(fd, b, (size_t)end, 0) == end);
    close(fd);
    *len = (size_t)end;
    return b;
}

/* Rewrites dir/data.mdb as a power loss could leave it: every page either the current one or
 * the one of the last checkpoint's image (beyond the image: current or zeros). */
static void power_loss(const char *dir, const char *img_path, uint64_t *mixed)
{
    char path[4200];
    size_t cl = 0, il = 0;
    snprintf(path, sizeof path, "%s/data.mdb", dir);
    uint8_t *cur = slurp(path, &cl), *img = slurp(img_path, &il);
    CHECK(cur != NULL);
    if (!img)
        return; /* killed before the first checkpoint finished: nothing unflushed to lose */
    const size_t pg = 4096;
    for (size_t off = 0; off + pg <= cl; off += pg) {
        if (rand() % 2)
            continue;
        if (off + pg <= il) {
            if (memcmp(cur + off, img + off, pg) != 0)
                (*mixed)++;
            memcpy(cur + off, img + off, pg);
        } else {
            memset(cur + off, 0, pg);
            (*mixed)++;
        }
    }
    int fd = open(path, O_WRONLY);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, cur, cl, 0) == (ssize_t)cl);
    close(fd);
    cap_free(cur);
    cap_free(img);
}

int main(int argc, char **argv)
{
    powerloss = argc > 1 && strcmp(argv[1], "powerloss") == 0;
    const char *env_rounds = getenv(powerloss ? "POWERLOSS_ROUNDS" : "CRASH_ROUNDS");
    int rounds = env_rounds ? atoi(env_rounds) : powerloss ? 60 : 220;
    char *dir = check_tmpdir(powerloss ? "wal-powerloss" : "wal-crash");
    char img[4200], boot[64];
    uint64_t mixed = 0, restored = 0;
    snprintf(img, sizeof img, "%s.ckpt-image", dir);
    if (powerloss) {
        CHECK(setenv("CAPSULE_TEST_CKPT_COPY", img, 1) == 0);
        CHECK(setenv("CAPSULE_TEST_BOOT_ID", "boot-0", 1) == 0);
    }
    struct acks acks = {0};
    uint64_t cut = 0, total_acks_at_kill = 0, kills_before_ack = 0;
    uint64_t acks_in_ckpt = 0, kills_in_ckpt = 0, rounds_waited = 0;
    const char *env_seed = getenv("CRASH_SEED");
    unsigned seed = env_seed ? (unsigned)strtoul(env_seed, NULL, 0) : (unsigned)cap_now_ns();
    fprintf(stderr, "crash: %d rounds, seed %u, dir %s\n", rounds, seed, dir);
    srand(seed);
    uint64_t t0 = cap_now_ns();
    int round;

    /* powerloss: with 30 rounds or more, rounds go on (up to 3 times as many) until the
     * interleavings the test is for have happened (the machine's load decides how far a child
     * gets before its kill) */
    for (round = 1; round <= rounds || (powerloss && rounds >= 30 && round <= 3 * rounds &&
                                        !(acks_in_ckpt && kills_in_ckpt && rounds_waited));
         round++) {
        int fds[2];
        CHECK(pipe(fds) == 0);
        pid_t parent = getpid();
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            close(fds[0]);
            child_main(dir, (uint64_t)round, fds[1], parent);
            _exit(0);
        }
        close(fds[1]);
        /* read acks until the random kill moment: from the fork, or (powerloss, 3 rounds in 4)
         * from the child's first ack (its open can take 100s of ms on a loaded machine: 45 of 60
         * rounds were killed before their first ack at load 11) */
        uint64_t delay_us =
            powerloss ? 20000 + (uint64_t)(rand() % 280000) : (uint64_t)(rand() % 60000);
        int from_ack = powerloss && round % 4 != 0;
        uint64_t deadline = cap_now_ns() + (from_ack ? 60000000000ull : delay_us * 1000u);
        uint8_t buf[sizeof(struct ack_msg) * 256];
        size_t have = 0;
        size_t before = acks.n;
        for (;;) {
            uint64_t now = cap_now_ns();
            if (from_ack && acks.n > before) {
                deadline = now + delay_us * 1000u;
                from_ack = 0;
            }
            if (now >= deadline)
                break;
            struct pollfd p = {fds[0], POLLIN, 0};
            int ms = (int)((deadline - now) / 1000000u);
            if (poll(&p, 1, ms) <= 0)
                continue;
            ssize_t r = read(fds[0], buf + have, sizeof(buf) - have);
            if (r <= 0)
                break; /* the child died on its own: caught by waitpid below */
            have += (size_t)r;
            size_t used = 0;
            while (have - used >= sizeof(struct ack_msg)) {
                struct ack_msg m;
                memcpy(&m, buf + used, sizeof(m));
                acks_add(&acks, &m, (uint64_t)round);
                used += sizeof(m);
            }
            memmove(buf, buf + used, have - used);
            have -= used;
        }
        CHECK(kill(pid, SIGKILL) == 0);
        int status;
        CHECK(waitpid(pid, &status, 0) == pid);
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
            fprintf(stderr, "round %d: child exited by itself (status 0x%x)\n", round, status);
            CHECK(0);
        }
        /* acks written before the kill are still in the pipe */
        for (;;) {
            ssize_t r = read(fds[0], buf + have, sizeof(buf) - have);
            if (r <= 0)
                break;
            have += (size_t)r;
            size_t used = 0;
            while (have - used >= sizeof(struct ack_msg)) {
                struct ack_msg m;
                memcpy(&m, buf + used, sizeof(m));
                acks_add(&acks, &m, (uint64_t)round);
                used += sizeof(m);
            }
            memmove(buf, buf + used, have - used);
            have -= used;
        }
        close(fds[0]);
        if (acks.n == before)
            kills_before_ack++;
        for (size_t i = before; i < acks.n; i++)
            acks_in_ckpt += (acks.v[i].ckpt & ACK_CKPT_IN_FLIGHT) != 0;
        if (acks.n > before) {
            kills_in_ckpt += (acks.v[acks.n - 1].ckpt & ACK_CKPT_IN_FLIGHT) != 0;
            rounds_waited += (acks.v[acks.n - 1].ckpt & ACK_CKPT_WAITED) != 0;
        }
        total_acks_at_kill += acks.n - before;

        if (powerloss) {
            /* the machine "restarts": another boot id, data.mdb as the disk could hold it */
            power_loss(dir, img, &mixed);
            snprintf(boot, sizeof boot, "boot-%d", round);
            CHECK(setenv("CAPSULE_TEST_BOOT_ID", boot, 1) == 0);
        }

        /* reopen (as the engine would after a crash) and verify */
        store_env_t *env;
        wal_log_t *log;
        store_env_opts_t eo = {.map_size = MAP_SIZE};
        wal_opts_t wo = {.journal_bytes = powerloss ? (128 << 10) : 0};
        CHECK_OK(store_env_open(dir, &eo, &env));
        CHECK_OK(wal_log_open(env, &wo, &log));
        wal_stats_t st;
        wal_log_stats(log, &st);
        restored += st.replayed;
        uint64_t last = verify(log, &acks, cut);
        CHECK(last == 0 || st.last_seq == last);
        /* keep the log short: truncate all but the last ~1000 records */
        if (last > 1000 && rand() % 2) {
            uint64_t c = last - 1000 + (uint64_t)(rand() % 3); /* may split a group */
            CHECK_OK(wal_log_truncate(log, c));
            if (c > cut)
                cut = c; /* a lower cut than an earlier one deletes nothing */
        }
        wal_log_close(log);
        store_env_close(env);
    }
    double secs = (double)(cap_now_ns() - t0) / 1e9;
    fprintf(stderr,
            "%s: %d kill -9 points in %.1f s, %zu acknowledged appends verified "
            "(%llu rounds killed before their first ack)\n",
            powerloss ? "powerloss" : "crash", round - 1, secs, acks.n,
            (unsigned long long)kills_before_ack);
    fprintf(stderr,
            "%s: %llu acks while a checkpoint was in flight; %llu kills after such an ack; "
            "%llu rounds where the writer waited for a checkpoint\n",
            powerloss ? "powerloss" : "crash", (unsigned long long)acks_in_ckpt,
            (unsigned long long)kills_in_ckpt, (unsigned long long)rounds_waited);
    if (powerloss) {
        fprintf(stderr,
                "powerloss: %llu pages rolled back to a checkpoint image or zeroed, %llu records "
                "re-applied from the journal\n",
                (unsigned long long)mixed, (unsigned long long)restored);
        CHECK(mixed > 0 && restored > 0);
        if (rounds >= 30) /* the interleavings this test is for did happen */
            CHECK(acks_in_ckpt > 0 && kills_in_ckpt > 0 && rounds_waited > 0);
        unlink(img);
    }
    CHECK(acks.n > 0);
    CHECK(total_acks_at_kill == acks.n);
    cap_free(acks.v);
    cap_free(acks.round);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "%s: ok\n", powerloss ? "wal.powerloss" : "wal.crash");
    return 0;
}
