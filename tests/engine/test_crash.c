/*
 * test_crash.c - the crash matrix. A child process embeds the engine as a batch pipeline would
 * (this file re-executed with "child"), runs a workload of executions in one session (plain
 * cells, sleeping cells, cells that ask for input, checkpoints with log truncation) and reports
 * on a pipe what it submitted and what was acknowledged. The parent kill -9s it at a named or a
 * random point: (a) idle, (b) during an execution, (c) while an input request is pending, (d)
 * after the reply was given but before the execution finished, (e) in the middle of a group
 * commit (a random few hundred microseconds after a submission), (f) during a checkpoint, and
 * (g) at a random time. Then the parent opens the same data directory (recovery re-runs what was
 * interrupted), re-submits every execution the child submitted by its id (attaching to a re-run,
 * getting a recorded result, or running one that never became durable) and checks:
 *   - every acknowledged result is there, unchanged;
 *   - the namespace is exactly what the executions produced, each once: acc == list(range(n));
 *   - the engine serves the session afterwards.
 * Rounds alternate sync and nosync. CAPSULE_CRASH_ROUNDS overrides the number of rounds (112).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "eng_test.h"

static void code_for(int i, char *buf, size_t n)
{
    switch (i % 4) {
    case 0:
        snprintf(buf, n, "acc.append(%d)\nlen(acc)", i);
        break;
    case 1:
        snprintf(buf, n, "import time\ntime.sleep(0.02)\nacc.append(%d)\nlen(acc)", i);
        break;
    case 2:
        snprintf(buf, n,
                 "import time\nv = int(input('v? '))\ntime.sleep(0.05)\nacc.append(v)\nlen(acc)");
        break;
    default:
        snprintf(buf, n, "acc.append(%d)\nprint('cell', %d)\nlen(acc)", i, i);
        break;
    }
}

/* ---------- the child: the embedding program ---------- */
typedef struct kid {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int input, done;
    eng_result_t *r;
} kid_t;

static void k_input(void *arg, const char *eid, const char *prompt, int pw)
{
    (void)eid;
    (void)prompt;
    (void)pw;
    kid_t *k = arg;
    pthread_mutex_lock(&k->mu);
    k->input = 1;
    pthread_cond_signal(&k->cv);
    pthread_mutex_unlock(&k->mu);
}

static void k_done(void *arg, const eng_result_t *r)
{
    kid_t *k = arg;
    pthread_mutex_lock(&k->mu);
    k->done = 1;
    k->input = 0;
    if (r->status == ENG_ST_OK && r->repr)
        k->r = (eng_result_t *)(intptr_t)atoi(r->repr);
    else
        k->r = (eng_result_t *)(intptr_t)-1;
    pthread_cond_signal(&k->cv);
    pthread_mutex_unlock(&k->mu);
}

static void say(const char *fmt, int i)
{
    char b[64];
    int n = snprintf(b, sizeof(b), fmt, i);
    if (write(1, b, (size_t)n) != n)
        _exit(3);
}

static int child(const char *dir, int start, int nosync, unsigned seed)
{
    srand(seed);
    eng_opts_t o = {0};
    o.dir = dir;
    o.nosync = nosync;
    o.map_size = 64u << 20;
    o.dur_threads = 4;
    o.checkpoint_every = 5; /* automatic checkpoints too, between the explicit ones */
    eng_t *e = NULL;
    CHECK_OK(eng_open(&o, &e));
    say("ready %d\n", start);
    kid_t k = {0};
    pthread_mutex_init(&k.mu, NULL);
    pthread_cond_init(&k.cv, NULL);
    eng_exec_cb_t cb = {0};
    cb.on_input = k_input;
    cb.on_done = k_done;
    char code[256], eid[32];
    for (int i = start; i < start + 40; i++) {
        code_for(i, code, sizeof(code));
        snprintf(eid, sizeof(eid), "c-%d", i);
        eng_exec_req_t rq = {0};
        rq.sid = "c";
        rq.eid = eid;
        rq.code = code;
        k.done = 0;
        k.input = 0;
        say("sub %d\n", i);
        CHECK_OK(eng_execute(e, &rq, &cb, &k));
        pthread_mutex_lock(&k.mu);
        while (!k.done) {
            if (k.input) {
                k.input = 0;
                pthread_mutex_unlock(&k.mu);
                say("inwait %d\n", i);
                usleep((useconds_t)(rand() % 30000));
                char v[16];
                snprintf(v, sizeof(v), "%d", i);
                CHECK_OK(eng_input_reply(e, eid, v, strlen(v), 0));
                say("replied %d\n", i);
                pthread_mutex_lock(&k.mu);
                continue;
            }
            pthread_cond_wait(&k.cv, &k.mu);
        }
        int got = (int)(intptr_t)k.r;
        pthread_mutex_unlock(&k.mu);
        if (got != i + 1) {
            fprintf(stderr, "child: c-%d answered %d\n", i, got);
            _exit(4);
        }
        say("ack %d\n", i);
        if (i % 4 == 3) {
            say("ckpt %d\n", i);
            int crc;
            /* an automatic checkpoint may be under way: then the session is busy for a moment */
            while ((crc = eng_checkpoint(e, "c", (i % 8) == 7, NULL)) == CAP_EBUSY)
                usleep(1000);
            CHECK_OK(crc);
            say("ckptdone %d\n", i);
        }
        if (i % 10 == 9) {
            say("idle %d\n", i);
            usleep(50000);
        }
    }
    say("finished %d\n", 0);
    eng_close(e);
    return 0;
}

/* ---------- the parent ---------- */
static const char *const scen_names = "abcdefg";

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "child") == 0)
        return child(argv[2], atoi(argv[3]), atoi(argv[4]), (unsigned)atoi(argv[5]));
#ifdef __SANITIZE_ADDRESS__
    int rounds = 21; /* the sanitized build checks memory on fewer, slower rounds */
#else
    int rounds = 112;
#endif
    if (getenv("CAPSULE_CRASH_ROUNDS"))
        rounds = atoi(getenv("CAPSULE_CRASH_ROUNDS"));
    unsigned seed = (unsigned)time(NULL);
    if (getenv("CAPSULE_CRASH_SEED"))
        seed = (unsigned)atoi(getenv("CAPSULE_CRASH_SEED"));
    fprintf(stderr, "crash: %d rounds, seed %u\n", rounds, seed);
    srand(seed);
    char *dir = check_tmpdir("eng-crash");
    /* the session and its accumulator */
    eng_t *e = etest_open(dir, 0);
    CHECK_OK(eng_session_open(e, "c", NULL, NULL));
    etest_expect(e, "c", "acc = []", NULL);
    eng_close(e);
    int next = 0; /* executions 0..next-1 are all finished and verified */
    int kills[7] = {0}, restarted = 0;
    char self[4096];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof(self) - 1);
    CHECK(sl > 0);
    self[sl] = 0;
    for (int round = 0; round < rounds; round++) {
        int scen = round % 7;
        int nosync = round & 1;
        char a1[16], a2[16], a3[16];
        snprintf(a1, sizeof(a1), "%d", next);
        snprintf(a2, sizeof(a2), "%d", nosync);
        snprintf(a3, sizeof(a3), "%u", seed + (unsigned)round);
        char *args[] = {self, "child", dir, a1, a2, a3, NULL};
        pid_t pid;
        int fds[1] = {etest_child(args, &pid)};
        /* choose the kill point */
        int target = 1 + rand() % 6; /* kill at the target-th matching event */
        const char *want = NULL;
        switch (scen) {
        case 0:
            want = "idle";
            target = 1;
            break;
        case 1:
            want = "sub";
            break;
        case 2:
            want = "inwait";
            target = 1 + rand() % 2;
            break;
        case 3:
            want = "replied";
            target = 1 + rand() % 2;
            break;
        case 4:
            want = "sub";
            break;
        case 5:
            want = "ckpt";
            target = 1 + rand() % 3;
            break;
        default:
            want = "ready";
            target = 1;
            break;
        }
        int last_sub = next - 1, seen = 0;
        char line[128];
        int killed = 0;
        while (!killed && etest_read_line(fds[0], line, sizeof(line), 20000) == 0) {
            int v = -1;
            char w[32];
            if (sscanf(line, "%31s %d", w, &v) != 2)
                continue;
            if (strcmp(w, "sub") == 0)
                last_sub = v;
            if (strcmp(w, "finished") == 0)
                break;
            if (strcmp(w, want) == 0 && ++seen == target) {
                if (scen == 1)
                    usleep(5000 + (useconds_t)(rand() % 10000)); /* inside the cell */
                else if (scen == 3)
                    usleep((useconds_t)(rand() % 40000)); /* reply recorded, cell sleeping */
                else if (scen == 4)
                    usleep((useconds_t)(rand() % 1500)); /* around the commit */
                else if (scen == 6)
                    usleep((useconds_t)(rand() % 300000));
                kill(pid, SIGKILL);
                killed = 1;
            }
        }
        if (!killed)
            kill(pid, SIGKILL);
        /* drain what the child said before it died */
        while (etest_read_line(fds[0], line, sizeof(line), 2000) == 0) {
            int v;
            char w[32];
            if (sscanf(line, "%31s %d", w, &v) == 2 && strcmp(w, "sub") == 0)
                last_sub = v;
        }
        close(fds[0]);
        int st;
        CHECK(waitpid(pid, &st, 0) == pid);
        /* a child that was not killed must have finished cleanly (a failed CHECK aborts it) */
        if (killed)
            CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        else
            CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        if (killed)
            kills[scen]++;
        etest_reap_orphans();

        /* recovery: every submitted execution by id, in order */
        e = etest_open(dir, 0);
        char code[256], eid[32], in[16], want_repr[16];
        for (int i = next; i <= last_sub; i++) {
            code_for(i, code, sizeof(code));
            snprintf(eid, sizeof(eid), "c-%d", i);
            snprintf(in, sizeof(in), "%d", i);
            const char *ins[1] = {in};
            eng_exec_req_t rq = {0};
            rq.sid = "c";
            rq.eid = eid;
            rq.code = code;
            eng_result_t *r = NULL;
            CHECK_OK(eng_execute_sync(e, &rq, ins, 1, &r));
            snprintf(want_repr, sizeof(want_repr), "%d", i + 1);
            if (r->status != ENG_ST_OK || !r->repr || strcmp(r->repr, want_repr) != 0) {
                fprintf(stderr, "round %d (%c): %s: status %d repr %s emsg %s\n", round,
                        scen_names[scen], eid, r->status, r->repr ? r->repr : "-",
                        r->emsg ? r->emsg : "-");
                CHECK(0);
            }
            restarted += r->restarted;
            eng_result_free(r);
        }
        next = last_sub + 1;
        char check[64];
        snprintf(check, sizeof(check), "acc == list(range(%d))", next);
        etest_expect(e, "c", check, "True");
        eng_close(e);
        etest_reap_orphans();
    }
    fprintf(stderr,
            "crash: %d executions verified, %d re-run after a crash; kills a=%d b=%d c=%d d=%d "
            "e=%d f=%d g=%d\n",
            next, restarted, kills[0], kills[1], kills[2], kills[3], kills[4], kills[5], kills[6]);
    for (int s = 0; s < 7; s++)
        CHECK(kills[s] > 0 || rounds < 7);
    check_rmtree(dir);
    cap_free(dir);
    fprintf(stderr, "engine.crash ok\n");
    return 0;
}
