/*
 * test_repair - `capsule-replay repair` and `compact` (the real binary) on data directories
 * written by real engines: a clean dir, a dir left by kill -9 (nothing to repair), a dir with a
 * byte flipped in a record in the middle (report only; then --write: backup made, the tail from
 * that seq dropped, everything before kept, and an engine then starts on it with the session's
 * namespace whole), a live engine's dir (--write refused), compact with and without --write
 * (an engine started on the compacted dir restores the same namespaces), bad usage, and a dir
 * left by a power loss with acknowledged records only in the journal: --write applies them
 * first, so the cut is taken on the whole log and the journal brings nothing back afterwards.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "capsule.h"
#include "check.h"
#include "rtest.h"
#include "wal.h"

static eng_t *engine(const char *dir)
{
    eng_opts_t o = {.dir = dir, .map_size = 64u << 20, .pool_idle = 1};
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    return e;
}

/* The path after "backup: " in rt_out exists as a file. */
static void backup_exists(void)
{
    char *b = strstr(rt_out, "backup: ");
    CHECK(b);
    char path[4096];
    CHECK(sscanf(b + 8, "%4095s", path) == 1);
    struct stat st;
    CHECK_OK(stat(path, &st));
    CHECK(st.st_size > 0);
}

static const char *sum_code =
    "sum(v for k, v in globals().items() if k[:1] == 'v' and k[1:].isdigit())";

static void test_repair_flipped(void)
{
    char *dir = check_tmpdir("replay-repair");
    eng_t *e = engine(dir);
    CHECK_OK(eng_session_open(e, "r", NULL, NULL));
    rt_cells(e, "r", 0, 30);
    char *live = rt_eval(e, "r", sum_code);
    CHECK_STREQ(live, "870");
    /* a live engine holds the dir: report is fine, --write is refused */
    CHECK_EQ(RT_RUN("repair", dir), 0);
    CHECK(strstr(rt_out, "nothing to repair"));
    CHECK_EQ(RT_RUN("repair", "--write", dir), 2);
    eng_close(e);

    uint64_t last = 0, first = rt_stored_seq(dir, 0, &last);
    uint64_t bad = rt_stored_seq(dir, (first + last) / 2, &last);
    rt_damage(dir, bad, 1);
    char want[128];
    /* report only: names the seq and every record it would drop; changes nothing */
    CHECK_EQ(RT_RUN("repair", dir), 1);
    snprintf(want, sizeof want, "seq %llu: damaged record", (unsigned long long)bad);
    CHECK(strstr(rt_out, want));
    snprintf(want, sizeof want, "  drop seq %llu ", (unsigned long long)last);
    CHECK(strstr(rt_out, want));
    snprintf(want, sizeof want, "%llu record(s) from seq %llu to %llu would be dropped",
             (unsigned long long)(last - bad + 1), (unsigned long long)bad,
             (unsigned long long)last);
    CHECK(strstr(rt_out, want));
    CHECK(strstr(rt_out, "nothing changed"));
    CHECK_EQ(RT_RUN("verify", dir), 1);
    snprintf(want, sizeof want, "seq %llu: damaged record", (unsigned long long)bad);
    CHECK(strstr(rt_out, want));

    /* --write: backup first, the tail dropped, everything before kept */
    CHECK_EQ(RT_RUN("repair", "--write", dir), 0);
    backup_exists();
    CHECK(strstr(rt_out, "REPAIRED"));
    uint64_t last2 = 0;
    CHECK_EQ(rt_stored_seq(dir, 0, &last2), first);
    CHECK_EQ(last2, bad - 1);
    CHECK_EQ(RT_RUN("verify", dir), 1); /* rows whose records were dropped are named... */
    CHECK(strstr(rt_out, "damaged records: 0, sequence gaps: 0"));
    CHECK(strstr(rt_out, "has no record that wrote it"));
    CHECK_EQ(RT_RUN("repair", dir), 0); /* ...but the log itself is whole */

    /* an engine starts on it; the session's namespace is whole (from the derived tables) */
    e = engine(dir);
    char *after = rt_eval(e, "r", sum_code);
    CHECK_STREQ(after, live);
    rt_cells(e, "r", 30, 1);
    eng_close(e);
    CHECK_EQ(rt_stored_seq(dir, bad, &last2), bad); /* the sequence goes on densely */
    CHECK_EQ(RT_RUN("export", "--from", "1", dir), 0);
    cap_free(live);
    cap_free(after);
    check_rmtree(dir);
    cap_free(dir);
}

static void test_repair_killed(void)
{
    char *dir = check_tmpdir("replay-repair-kill");
    rt_killed_engine(dir);
    CHECK_EQ(RT_RUN("repair", "--write", dir), 0);
    CHECK(strstr(rt_out, "nothing to repair"));
    CHECK(!strstr(rt_out, "backup: "));
    check_rmtree(dir);
    cap_free(dir);
}

static void test_compact(void)
{
    char *dir = check_tmpdir("replay-compact");
    eng_t *e = engine(dir);
    CHECK_OK(eng_session_open(e, "c", NULL, NULL));
    CHECK_OK(eng_session_open(e, "d", NULL, NULL));
    CHECK_EQ(RT_RUN("compact", dir), 0);
    CHECK(strstr(rt_out, "no checkpoint in the log"));
    rt_cells(e, "c", 0, 10);
    rt_cells(e, "d", 0, 3);
    size_t bytes = 0;
    CHECK_OK(eng_checkpoint(e, "c", 0, &bytes));
    rt_cells(e, "c", 10, 5);
    char *c_before = rt_eval(e, "c", sum_code), *d_before = rt_eval(e, "d", sum_code);
    CHECK_EQ(RT_RUN("compact", "--write", dir), 2); /* live: refused */
    eng_close(e);

    uint64_t last = 0, first = rt_stored_seq(dir, 0, &last);
    CHECK_EQ(first, 1);
    CHECK_EQ(RT_RUN("compact", dir), 0);
    CHECK(strstr(rt_out, "would drop") && strstr(rt_out, "nothing changed"));
    CHECK_EQ(rt_stored_seq(dir, 0, &last), 1);
    CHECK_EQ(RT_RUN("compact", "--write", dir), 0);
    backup_exists();
    CHECK(strstr(rt_out, "COMPACTED"));
    uint64_t now_first = rt_stored_seq(dir, 0, &last);
    CHECK(now_first > 1);
    CHECK_EQ(RT_RUN("export", "--kind", "eng.checkpoint", dir), 0);
    char want[64];
    snprintf(want, sizeof want, "{\"seq\":%llu,", (unsigned long long)now_first);
    CHECK(strstr(rt_out, want)); /* the log now starts at the checkpoint record */
    CHECK_EQ(RT_RUN("verify", dir), 0);
    CHECK_EQ(RT_RUN("compact", dir), 0);
    CHECK(strstr(rt_out, "no record before the latest checkpoint"));

    /* an engine on the compacted dir restores the same namespaces */
    e = engine(dir);
    char *c_after = rt_eval(e, "c", sum_code), *d_after = rt_eval(e, "d", sum_code);
    CHECK_STREQ(c_after, c_before);
    CHECK_STREQ(d_after, d_before);
    eng_close(e);
    cap_free(c_before);
    cap_free(d_before);
    cap_free(c_after);
    cap_free(d_after);
    check_rmtree(dir);
    cap_free(dir);
}

/* A raw WAL_SYNC log of n records written by a child that dies without closing, with data.mdb
 * then put back to its last checkpoint's image and another boot id: a power loss. */
static void power_lost_log(const char *dir, const char *img, int n)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        store_env_t *env;
        wal_log_t *log;
        wal_opts_t wo = {.journal_bytes = 1u << 20}; /* a checkpoint every 512 KiB */
        setenv("CAPSULE_TEST_CKPT_COPY", img, 1);
        if (store_env_open(dir, NULL, &env) || wal_log_open(env, &wo, &log))
            _exit(2);
        for (int i = 0; i < n; i++) {
            char key[16];
            snprintf(key, sizeof key, "k%d", i % 5);
            wal_field_t f = {.tag = 1, .u = (uint64_t)i};
            wal_rec_t r = {
                .kind = 1, .key = key, .key_len = strlen(key), .fields = &f, .nfields = 1};
            if (wal_log_append_sync(log, &r, 1, NULL))
                _exit(3);
        }
        _exit(0); /* no close, no final checkpoint */
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char p[4200], buf[65536];
    snprintf(p, sizeof p, "%s/data.mdb", dir);
    int in = open(img, O_RDONLY), out = open(p, O_WRONLY | O_TRUNC);
    CHECK(in >= 0 && out >= 0);
    ssize_t r;
    while ((r = read(in, buf, sizeof buf)) > 0)
        CHECK(write(out, buf, (size_t)r) == r);
    close(in);
    close(out);
    CHECK_OK(setenv("CAPSULE_TEST_BOOT_ID", "replay-after-power-loss", 1));
}

static void test_repair_journal(void)
{
    char *dir = check_tmpdir("replay-repair-journal");
    char img[4200];
    snprintf(img, sizeof img, "%s.ckpt-image", dir);
    const int n = 1200; /* one 4 KiB journal block each: two checkpoints, ~170 records after */
    power_lost_log(dir, img, n);
    uint64_t last = 0, first = rt_stored_seq(dir, 0, &last);
    CHECK_EQ(first, 1);
    CHECK(last < (uint64_t)n); /* the image lacks what only the journal holds */
    CHECK_EQ(RT_RUN("verify", dir), 0);
    char want[128];
    snprintf(want, sizeof want, "%llu records in the journal not yet applied",
             (unsigned long long)(n - last));
    CHECK(strstr(rt_out, want));
    uint64_t bad = last / 2; /* damaged before the checkpoint: the cut is there */
    rt_damage(dir, bad, 1);
    CHECK_EQ(RT_RUN("repair", "--write", dir), 0);
    /* at least what the image lacks: data.mdb is copied when the checkpoint thread syncs, so it
     * may hold a few records past the checkpoint's own snapshot, which the open rolls back to */
    char *applied = strstr(rt_out, "journal: ");
    unsigned long long napplied = 0;
    CHECK(applied &&
          sscanf(applied, "journal: %llu acknowledged record(s) applied", &napplied) == 1);
    CHECK(napplied >= (unsigned long long)(n - last));
    snprintf(want, sizeof want, "%llu record(s) from seq %llu to %d",
             (unsigned long long)(n - bad + 1), (unsigned long long)bad, n);
    CHECK(strstr(rt_out, want)); /* the cut saw the whole log, journal records included */
    backup_exists();
    CHECK(strstr(rt_out, "REPAIRED"));
    /* nothing comes back from the journal: an open (another boot id again) finds seq 1..bad-1 */
    CHECK_OK(setenv("CAPSULE_TEST_BOOT_ID", "replay-after-repair", 1));
    store_env_t *env;
    wal_log_t *log;
    wal_opts_t wo = {.journal_bytes = 1u << 20};
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(wal_log_open(env, &wo, &log));
    wal_stats_t st;
    wal_log_stats(log, &st);
    CHECK_EQ(st.replayed, 0);
    CHECK_EQ(st.last_seq, bad - 1);
    wal_log_close(log);
    store_env_close(env);
    CHECK_EQ(RT_RUN("repair", dir), 0);
    CHECK(strstr(rt_out, "nothing to repair"));
    CHECK_OK(unsetenv("CAPSULE_TEST_BOOT_ID"));
    unlink(img);
    check_rmtree(dir);
    cap_free(dir);
}

static void test_usage(void)
{
    CHECK_EQ(RT_RUN("repair"), 64);
    CHECK_EQ(RT_RUN("repair", "--force", "/tmp"), 64);
    CHECK_EQ(RT_RUN("compact", "/tmp", "/tmp"), 64);
    CHECK_EQ(RT_RUN("compact", "--help"), 0);
    CHECK(strstr(rt_out, "compact [--write] DIR"));
    CHECK_EQ(RT_RUN("repair", "--write", "/dev/null/nowhere"), 2);
}

int main(void)
{
    CHECK_OK(prctl(PR_SET_CHILD_SUBREAPER, 1));
    test_usage();
    test_repair_flipped();
    test_repair_killed();
    test_compact();
    test_repair_journal();
    printf("replay repair: ok\n");
    return 0;
}
