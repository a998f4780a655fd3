/*
 * test_acquire.c - opening a session does not wait for a commit (a pop from the warm pool), and
 * what that means after kill -9. A child process embeds the engine and opens sessions one after
 * the other; each kind of session then does one thing: nothing (kind 0), one execution waited for
 * (1), a close (2), or an execution submitted at once after the open and waited for (3). It says
 * on a pipe what was acknowledged. The parent kill -9s it a random few hundred microseconds after
 * a random open returned (the window where the open's record may not be committed yet), reopens
 * the data directory and checks:
 *   - the engine lists only sessions the child opened (nothing of the pool or of other rounds
 *     appears as a user session) and no acknowledged close;
 *   - a session with an acknowledged execution is there with its namespace (x == its number);
 *   - a session whose close was acknowledged stays closed (its id is refused: CAP_EEXIST);
 *   - an opened session nobody acknowledged anything about is either there (empty and usable:
 *     if it had an execution submitted and durable, that re-ran) or absent (and its id can be
 *     opened again, empty); it never comes back half: every session listed answers.
 * It also checks, without a crash, that an open followed at once by a close and by executions
 * keeps their order in the log (the session record first).
 * Rounds alternate sync and nosync. CAPSULE_ACQ_ROUNDS overrides the number of rounds (24).
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "eng_test.h"

#define PER_ROUND 24

static void say(const char *w, int i)
{
    char b[64];
    int n = snprintf(b, sizeof(b), "%s %d\n", w, i);
    if (write(1, b, (size_t)n) != n)
        _exit(3);
}

static void sid_of(int round, int i, char *b, size_t n)
{
    snprintf(b, n, "r%d-%d", round, i);
}

/* ---------- the child ---------- */
static int child(const char *dir, int round, int nosync)
{
    eng_t *e = etest_open(dir, nosync);
    say("ready", 0);
    char sid[32], code[64];
    for (int i = 0; i < PER_ROUND; i++) {
        sid_of(round, i, sid, sizeof(sid));
        CHECK_OK(eng_session_open(e, sid, NULL, NULL));
        say("open", i);
        snprintf(code, sizeof(code), "x = %d", i);
        switch (i % 4) {
        case 0:
            break;
        case 1:
        case 3: {
            eng_result_t *r = etest_run(e, sid, NULL, code);
            CHECK_EQ(r->status, ENG_ST_OK);
            eng_result_free(r);
            say("ack", i);
            break;
        }
        default:
            CHECK_OK(eng_session_close(e, sid));
            say("closed", i);
            break;
        }
        if (i % 4 == 1) /* its worker back to the OS: many rounds' sessions stay open */
            CHECK_OK(eng_session_release(e, sid));
    }
    say("finished", 0);
    eng_close(e);
    return 0;
}

/* ---------- the parent ---------- */
/* What the child said. */
typedef struct told {
    int opened; /* the last session whose open returned */
    int ack[PER_ROUND], closed[PER_ROUND];
} told_t;

/* Notes one line: returns its number, -2 for "finished", -1 for anything else. */
static int tell(told_t *t, const char *line)
{
    int v = -1;
    char w[32];
    if (sscanf(line, "%31s %d", w, &v) != 2)
        return -1;
    if (strcmp(w, "finished") == 0)
        return -2;
    if (v < 0 || v >= PER_ROUND)
        return -1;
    if (strcmp(w, "open") == 0)
        t->opened = v;
    else if (strcmp(w, "ack") == 0)
        t->ack[v] = 1;
    else if (strcmp(w, "closed") == 0)
        t->closed[v] = 1;
    else
        return -1;
    return v;
}

/* 1 if sid is listed. */
static int listed(char **v, size_t n, const char *sid)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i], sid) == 0)
            return 1;
    return 0;
}

/* Without a crash: open, execute and close submitted back to back keep their order. */
static void ordered_without_crash(void)
{
    char *dir = check_tmpdir("eng-acq-order");
    eng_t *e = etest_open(dir, 0);
    for (int i = 0; i < 20; i++) {
        char sid[32];
        snprintf(sid, sizeof(sid), "o%d", i);
        CHECK_OK(eng_session_open(e, sid, NULL, NULL));
        CHECK_OK(eng_session_open(e, sid, NULL, NULL)); /* open again: the same session */
        etest_expect(e, sid, "y = 1\ny", "1");
        if (i % 2)
            CHECK_OK(eng_session_close(e, sid));
    }
    CHECK_EQ(eng_session_open(e, "o1", NULL, NULL), CAP_EEXIST); /* closed: not reused */
    eng_close(e);
    e = etest_open(dir, 0);
    char **v = NULL;
    size_t n = 0;
    CHECK_OK(eng_session_list(e, &v, &n));
    CHECK_EQ(n, 10u);
    for (int i = 0; i < 20; i += 2) {
        char sid[32];
        snprintf(sid, sizeof(sid), "o%d", i);
        CHECK(listed(v, n, sid));
        etest_expect(e, sid, "y", "1");
    }
    for (size_t i = 0; i < n; i++)
        cap_free(v[i]);
    cap_free(v);
    CHECK_EQ(eng_session_open(e, "o3", NULL, NULL), CAP_EEXIST);
    eng_close(e);
    check_rmtree(dir);
    cap_free(dir);
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "child") == 0)
        return child(argv[2], atoi(argv[3]), atoi(argv[4]));
    ordered_without_crash();
#ifdef __SANITIZE_ADDRESS__
    int rounds = 8;
#else
    int rounds = 24;
#endif
    if (getenv("CAPSULE_ACQ_ROUNDS"))
        rounds = atoi(getenv("CAPSULE_ACQ_ROUNDS"));
    unsigned seed = (unsigned)time(NULL);
    if (getenv("CAPSULE_ACQ_SEED"))
        seed = (unsigned)atoi(getenv("CAPSULE_ACQ_SEED"));
    fprintf(stderr, "acquire: %d rounds, seed %u\n", rounds, seed);
    srand(seed);
    char *dir = check_tmpdir("eng-acq");
    char self[4096];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof(self) - 1);
    CHECK(sl > 0);
    self[sl] = 0;
    int kept = 0, lost = 0, acked = 0, closed_n = 0;
    for (int round = 0; round < rounds; round++) {
        int nosync = round & 1;
        char a1[16], a2[16];
        snprintf(a1, sizeof(a1), "%d", round);
        snprintf(a2, sizeof(a2), "%d", nosync);
        char *args[] = {self, "child", dir, a1, a2, NULL};
        pid_t pid;
        int fd = etest_child(args, &pid);
        int target = rand() % PER_ROUND, killed = 0;
        char line[128];
        told_t t = {-1, {0}, {0}};
        while (etest_read_line(fd, line, sizeof(line), 20000) == 0) {
            int v = tell(&t, line);
            if (v == -2)
                break;
            if (!killed && v == target && t.opened == target) {
                usleep((useconds_t)(rand() % 800));
                kill(pid, SIGKILL);
                killed = 1;
            }
        }
        if (!killed)
            kill(pid, SIGKILL);
        while (etest_read_line(fd, line, sizeof(line), 2000) == 0)
            tell(&t, line);
        close(fd);
        int opened = t.opened, *ack = t.ack, *closed = t.closed;
        int st;
        CHECK(waitpid(pid, &st, 0) == pid);
        etest_reap_orphans();

        eng_t *e = etest_open(dir, 0);
        char **v = NULL;
        size_t n = 0;
        CHECK_OK(eng_session_list(e, &v, &n));
        /* every listed session was opened by a child in this or an earlier round */
        for (size_t k = 0; k < n; k++) {
            int r = -1, i = -1;
            CHECK(sscanf(v[k], "r%d-%d", &r, &i) == 2);
            CHECK(r >= 0 && r <= round && i >= 0 && i < PER_ROUND);
            CHECK(r < round || i <= opened + 1); /* +1: opened, killed before it said so */
            CHECK(r < round || !closed[i]);
        }
        char sid[32], code[64], want[16];
        for (int i = 0; i <= opened; i++) {
            sid_of(round, i, sid, sizeof(sid));
            int is = listed(v, n, sid);
            if (closed[i]) {
                CHECK(!is);
                CHECK_EQ(eng_session_open(e, sid, NULL, NULL), CAP_EEXIST);
                closed_n++;
                continue;
            }
            if (ack[i]) {
                CHECK(is);
                snprintf(want, sizeof(want), "%d", i);
                etest_expect(e, sid, "x", want);
                acked++;
            } else if (is) {
                /* there, empty or with its re-run execution: it answers */
                snprintf(code, sizeof(code), "globals().get('x', %d)", i);
                snprintf(want, sizeof(want), "%d", i);
                etest_expect(e, sid, code, want);
                kept++;
            } else {
                /* lost with the crash: the id opens again, empty (unless its close, not
                 * acknowledged, was durable) */
                int orc = eng_session_open(e, sid, NULL, NULL);
                if (i % 4 == 2 && orc == CAP_EEXIST)
                    continue;
                CHECK_OK(orc);
                etest_expect(e, sid, "'x' in globals()", "False");
                lost++;
            }
            CHECK_OK(eng_session_release(e, sid));
        }
        for (size_t k = 0; k < n; k++)
            cap_free(v[k]);
        cap_free(v);
        eng_close(e);
        etest_reap_orphans();
    }
    fprintf(stderr,
            "acquire: %d acknowledged executions found, %d closes kept, unacknowledged opens: %d "
            "kept, %d lost with the crash\n",
            acked, closed_n, kept, lost);
    CHECK(acked > 0);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "engine.acquire ok\n");
    return 0;
}
