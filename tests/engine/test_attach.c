/*
 * test_attach.c - a listener that attaches to a running execution by its id gets every byte of
 * the output, at the run's offsets: first what the run printed before the listener came (one
 * chunk, stream 0), then the rest as it comes. Two ways to get there:
 *   (a) a second listener attaches in the middle of a run in the same process;
 *   (b) the process is killed -9 in the middle of a run; a new process opens the directory
 *       (recovery re-runs the execution at once) and attaches only after the re-run has printed
 *       some lines, by its id alone (the session from eng_exec_session, no code): the case of a
 *       client re-attaching after a server restart (issues 5-7: the server's offsets were
 *       shifted by the output printed before the attach).
 * In both, the listener's bytes must equal the durable result's output. Also: on_accepted comes
 * first and once for a taken execution, never for a refused one; eng_session_info gives the
 * recovered session's options back; an execution's own timeout survives the restart (its re-run
 * times out).
 */
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "eng_test.h"

#define CODE                                                                                       \
    "import time\n"                                                                                \
    "for i in range(12):\n"                                                                        \
    "    print('line', i, flush=True)\n"                                                           \
    "    time.sleep(0.05)\n"                                                                       \
    "'end'"

/* (b)'s code: the same lines, and after each one the worker's pid appended as a line to a marker
 * file, so the test can see that the re-run after recovery has printed without guessing how long
 * recovery takes (the killed run's worker may go on for a while; its lines carry another pid) */
static char code_b[8192];
static char mark_b[4096];

static void code_b_init(const char *dir)
{
    snprintf(mark_b, sizeof(mark_b), "%s.mark", dir);
    snprintf(code_b, sizeof(code_b),
             "import time\n"
             "for i in range(12):\n"
             "    print('line', i, flush=True)\n"
             "    with open(%s%s%s, 'a') as f: f.write('%%d\\n' %% __import__('os').getpid())\n"
             "    time.sleep(0.05)\n"
             "'end'",
             "'", mark_b, "'");
}

/* lines in the marker file written by a pid other than the first line's: the re-run's */
static int rerun_marks(void)
{
    FILE *f = fopen(mark_b, "r");
    if (!f)
        return 0;
    long first = -1, pid;
    int n = 0;
    while (fscanf(f, "%ld", &pid) == 1) {
        if (first < 0)
            first = pid;
        else if (pid != first)
            n++;
    }
    fclose(f);
    return n;
}

typedef struct lis {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char out[4096];
    size_t len;
    int chunks, replays, restarted, done, accepted;
    int status, r_restarted; /* of the result */
    char *repr, *output;
} lis_t;

static void lis_init(lis_t *l)
{
    memset(l, 0, sizeof(*l));
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
}

static void l_output(void *arg, const char *eid, int stream, const char *d, size_t n)
{
    (void)eid;
    lis_t *l = arg;
    pthread_mutex_lock(&l->mu);
    CHECK(l->len + n < sizeof(l->out));
    CHECK(stream == 0 || stream == 1 || stream == 2);
    if (stream == 0) {
        CHECK_EQ(l->chunks, 0); /* the output so far comes first, once */
        l->replays++;
    }
    memcpy(l->out + l->len, d, n);
    l->len += n;
    l->out[l->len] = 0;
    l->chunks++;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

static void l_accepted(void *arg, const char *eid)
{
    (void)eid;
    lis_t *l = arg;
    pthread_mutex_lock(&l->mu);
    CHECK(l->chunks == 0 && !l->restarted && !l->done); /* before anything else */
    l->accepted++;
    pthread_mutex_unlock(&l->mu);
}

static void l_restarted(void *arg, const char *eid)
{
    (void)eid;
    lis_t *l = arg;
    pthread_mutex_lock(&l->mu);
    l->restarted++;
    pthread_mutex_unlock(&l->mu);
}

static void l_done(void *arg, const eng_result_t *r)
{
    lis_t *l = arg;
    pthread_mutex_lock(&l->mu);
    l->status = r->status;
    l->r_restarted = r->restarted;
    l->repr = r->repr ? cap_strdup(r->repr) : NULL;
    l->output = r->output ? cap_strdup(r->output) : NULL;
    l->done = 1;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

/* waits until the listener has n lines (or is done) */
static void lis_wait_lines(lis_t *l, int n)
{
    pthread_mutex_lock(&l->mu);
    for (;;) {
        int lines = 0;
        for (size_t i = 0; i < l->len; i++)
            lines += l->out[i] == '\n';
        if (lines >= n || l->done)
            break;
        pthread_cond_wait(&l->cv, &l->mu);
    }
    pthread_mutex_unlock(&l->mu);
}

static void lis_wait_done(lis_t *l)
{
    pthread_mutex_lock(&l->mu);
    while (!l->done)
        pthread_cond_wait(&l->cv, &l->mu);
    pthread_mutex_unlock(&l->mu);
}

static const eng_exec_cb_t lcb = {l_output, NULL, l_restarted, l_done, l_accepted};

static void want_all(lis_t *l)
{
    char want[512] = "";
    for (int i = 0; i < 12; i++)
        snprintf(want + strlen(want), sizeof(want) - strlen(want), "line %d\n", i);
    CHECK_EQ(l->status, ENG_ST_OK);
    CHECK(l->repr && l->output);
    CHECK_STREQ(l->repr, "'end'");
    CHECK_STREQ(l->output, want);
    if (strcmp(l->out, want) != 0)
        fprintf(stderr, "listener saw:\n%s\n", l->out);
    CHECK_STREQ(l->out, want);
}

static void lis_free(lis_t *l)
{
    cap_free(l->repr);
    cap_free(l->output);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
}

/* (a) the same process: a second listener comes after three lines */
static void test_attach_mid_run(const char *dir)
{
    eng_t *e = etest_open(dir, 0);
    CHECK_OK(eng_session_open(e, "a", NULL, NULL));
    lis_t first, late;
    lis_init(&first);
    lis_init(&late);
    eng_exec_req_t rq = {.sid = "a", .eid = "a-1", .code = CODE};
    CHECK_OK(eng_execute(e, &rq, &lcb, &first));
    lis_wait_lines(&first, 3);
    CHECK_OK(eng_execute(e, &rq, &lcb, &late)); /* the same id: attach */
    lis_wait_done(&first);
    lis_wait_done(&late);
    want_all(&first);
    want_all(&late);
    CHECK_EQ(first.replays, 0);
    CHECK_EQ(late.replays, 1); /* it came after output had begun */
    CHECK_EQ(late.restarted, 0);
    CHECK_EQ(first.accepted, 1);
    CHECK_EQ(late.accepted, 1);
    /* a refusal is answered by on_done alone */
    lis_t no;
    lis_init(&no);
    eng_exec_req_t nrq = {.sid = "nosuch", .eid = "a-2", .code = "1"};
    CHECK_OK(eng_execute(e, &nrq, &lcb, &no));
    lis_wait_done(&no);
    CHECK_EQ(no.status, ENG_ST_REFUSED);
    CHECK_EQ(no.accepted, 0);
    lis_free(&no);
    lis_free(&first);
    lis_free(&late);
    eng_close(e);
}

/* (b) the child: start the execution, say "go" after its third line, wait to be killed */
static int child(const char *dir)
{
    eng_t *e = etest_open(dir, 0);
    eng_session_opts_t so = {.tx = ENG_TX_COMMIT_ALWAYS, .timeout_ms = 60000, .retry_on_death = 1};
    CHECK_OK(eng_session_open(e, "b", &so, NULL));
    /* c-1's own timeout (its session has none) is recorded with its request: the re-run after
     * the restart times out too instead of sleeping its minute */
    CHECK_OK(eng_session_open(e, "c", NULL, NULL));
    lis_t lc;
    lis_init(&lc);
    eng_exec_req_t rc = {.sid = "c",
                         .eid = "c-1",
                         .code = "import time\nprint('c', flush=True)\ntime.sleep(60)",
                         .timeout_ms = 4000};
    CHECK_OK(eng_execute(e, &rc, &lcb, &lc));
    lis_wait_lines(&lc, 1);
    CHECK(!lc.done);
    lis_t l;
    lis_init(&l);
    code_b_init(dir);
    eng_exec_req_t rq = {.sid = "b", .eid = "b-1", .code = code_b};
    CHECK_OK(eng_execute(e, &rq, &lcb, &l));
    lis_wait_lines(&l, 3);
    CHECK(write(1, "go\n", 3) == 3);
    pause();
    return 0;
}

static void test_attach_after_restart(const char *dir, const char *self)
{
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execl(self, self, "child", dir, (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    struct pollfd p = {fds[0], POLLIN, 0};
    CHECK(poll(&p, 1, 60000) == 1);
    char buf[8] = {0};
    CHECK(read(fds[0], buf, 3) == 3);
    CHECK_STREQ(buf, "go\n");
    CHECK(kill(pid, SIGKILL) == 0);
    CHECK(waitpid(pid, NULL, 0) == pid);
    close(fds[0]);
    while (waitpid(-1, NULL, WNOHANG) > 0) /* its workers, reparented here */
        ;
    /* recovery re-runs b-1 at once; attach only after the re-run has printed two lines (its
     * second marker byte comes 50 ms after its first line was flushed) */
    code_b_init(dir);
    CHECK_EQ(rerun_marks(), 0);
    eng_t *e = etest_open(dir, 0);
    for (int i = 0; i < 60000 && rerun_marks() < 2; i++)
        usleep(1000);
    CHECK(rerun_marks() >= 2);
    /* a caller that did not start b-1 learns its session from the log, and attaches with no
     * code (a known id runs nothing new) */
    char *sid = NULL;
    CHECK_OK(eng_exec_session(e, "b-1", &sid));
    CHECK_STREQ(sid, "b");
    lis_t l;
    lis_init(&l);
    eng_exec_req_t rq = {.sid = sid, .eid = "b-1", .code = ""};
    CHECK_OK(eng_execute(e, &rq, &lcb, &l));
    cap_free(sid);
    lis_wait_done(&l);
    want_all(&l);
    /* finished: the result has it, eng_exec_session not; unknown and invalid ids */
    CHECK_ERR(eng_exec_session(e, "b-1", &sid), CAP_ENOTFOUND);
    CHECK(sid == NULL);
    CHECK_ERR(eng_exec_session(e, "nosuch", &sid), CAP_ENOTFOUND);
    CHECK_ERR(eng_exec_session(e, "bad id", &sid), CAP_EINVAL);
    CHECK(l.r_restarted);
    CHECK_EQ(l.restarted, 1);
    CHECK_EQ(l.replays, 1); /* the re-run had printed before the attach */
    CHECK_EQ(l.accepted, 1);
    lis_free(&l);
    /* the session's options came back from its durable record */
    eng_session_info_t in;
    CHECK_OK(eng_session_info(e, "b", &in));
    CHECK_EQ(in.opts.tx, ENG_TX_COMMIT_ALWAYS);
    CHECK_EQ(in.opts.timeout_ms, 60000u);
    CHECK_EQ(in.opts.retry_on_death, 1);
    CHECK_EQ(in.opts.mem_bytes, 0u);
    CHECK(in.opts.warmup == NULL);
    CHECK_EQ(in.ordinal, 1u); /* b-1 committed */
    CHECK_EQ(in.queued, 0u);
    CHECK_EQ(in.running, 0);
    CHECK_ERR(eng_session_info(e, "nosuch", &in), CAP_ENOTFOUND);
    CHECK_ERR(eng_session_info(e, "bad id", &in), CAP_EINVAL);
    /* c-1 was re-run with its own 4 s timeout */
    eng_result_t *r = NULL;
    int rc;
    for (int i = 0; i < 30000 && (rc = eng_result_get(e, "c-1", &r)) == CAP_EBUSY; i++)
        usleep(1000);
    CHECK_OK(rc);
    CHECK_EQ(r->status, ENG_ST_TIMEOUT);
    CHECK(r->restarted);
    eng_result_free(r);
    eng_close(e);
    unlink(mark_b);
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "child") == 0)
        return child(argv[2]);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    char self[4096];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof(self) - 1);
    CHECK(sl > 0);
    self[sl] = 0;
    char *da = check_tmpdir("eng-attach-a");
    test_attach_mid_run(da);
    char *db = check_tmpdir("eng-attach-b");
    test_attach_after_restart(db, self);
    check_rmtree(da);
    check_rmtree(db);
    cap_free(da);
    cap_free(db);
    fprintf(stderr, "attach: ok\n");
    return 0;
}
