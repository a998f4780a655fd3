/*
 * test_env.c - store/: environments, named databases, transactions, cursors, DUPSORT, big-endian
 * sequence keys with append, map growth from a 64 KiB map, concurrent readers during growth.
 */
#include "check.h"
#include "store.h"

#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static int put_one(store_txn_t *txn, void *arg)
{
    store_dbi_t dbi;
    (void)arg;
    CHECK_OK(store_dbi_open(txn, "a", STORE_DB_CREATE, &dbi));
    store_val_t k = {"hello", 5}, v = {"world", 5};
    return store_put(txn, dbi, k, v, 0);
}

static void test_basic(void)
{
    char *dir = check_tmpdir("store-basic");
    store_env_t *env;
    store_txn_t *txn;
    store_dbi_t dbi;
    store_val_t v;

    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_STREQ(store_env_path(env), dir);
    CHECK_OK(store_env_write(env, put_one, NULL));
    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK(store_txn_env(txn) == env);
    CHECK_OK(store_dbi_open(txn, "a", 0, &dbi));
    store_val_t k = {"hello", 5};
    CHECK_OK(store_get(txn, dbi, k, &v));
    CHECK_EQ(v.len, 5);
    CHECK(memcmp(v.data, "world", 5) == 0);
    store_val_t nk = {"nope", 4};
    CHECK_ERR(store_get(txn, dbi, nk, &v), CAP_ENOTFOUND);
    CHECK_ERR(store_put(txn, dbi, nk, nk, 0), CAP_EINVAL); /* read txn */
    uint64_t n;
    CHECK_OK(store_dbi_count(txn, dbi, &n));
    CHECK_EQ(n, 1);
    store_dbi_t missing;
    CHECK_ERR(store_dbi_open(txn, "nosuch", 0, &missing), CAP_ENOTFOUND);
    store_txn_abort(txn);

    /* NOOVERWRITE, delete, manual write txn. */
    CHECK_OK(store_txn_begin(env, 0, &txn));
    store_val_t v2 = {"x", 1};
    CHECK_ERR(store_put(txn, dbi, k, v2, STORE_PUT_NOOVERWRITE), CAP_EEXIST);
    CHECK_OK(store_del(txn, dbi, k, NULL));
    CHECK_ERR(store_del(txn, dbi, k, NULL), CAP_ENOTFOUND);
    store_val_t empty = {"", 0};
    CHECK_ERR(store_put(txn, dbi, empty, v2, 0), CAP_EINVAL);
    char big[600];
    memset(big, 'k', sizeof(big));
    store_val_t bigk = {big, store_env_max_key(env) + 1};
    CHECK_ERR(store_put(txn, dbi, bigk, v2, 0), CAP_ETOOBIG);
    CHECK_OK(store_txn_commit(txn));

    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK_ERR(store_get(txn, dbi, k, &v), CAP_ENOTFOUND);
    store_txn_abort(txn);
    store_txn_abort(NULL);
    store_cursor_close(NULL);

    size_t map, used;
    CHECK_OK(store_env_info(env, &map, &used));
    CHECK_EQ(map, (size_t)1 << 30);
    CHECK(used > 0 && used < map);
    CHECK_OK(store_env_sync(env));
    store_env_close(env);
    store_env_close(NULL);

    /* Reopen read-only: data is there, writes are refused. */
    store_env_opts_t ro = {.readonly = 1};
    CHECK_OK(store_env_open(dir, &ro, &env));
    CHECK(store_env_readonly(env));
    CHECK_ERR(store_txn_begin(env, 0, &txn), CAP_EINVAL);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

struct seq_ctx {
    store_dbi_t dbi;
    uint64_t from, n;
    size_t vlen;
};

static int put_seqs(store_txn_t *txn, void *arg)
{
    struct seq_ctx *c = arg;
    uint8_t kb[8];
    uint8_t val[4096];
    CHECK(c->vlen <= sizeof(val));
    for (uint64_t i = 0; i < c->n; i++) {
        uint64_t s = c->from + i;
        memset(val, (int)(s & 0xff), c->vlen);
        store_val_t v = {val, c->vlen};
        int rc = store_put(txn, c->dbi, store_key_u64(kb, s), v, STORE_PUT_APPEND);
        if (rc)
            return rc;
    }
    return 0;
}

static int create_db(store_txn_t *txn, void *arg)
{
    return store_dbi_open(txn, "seq", STORE_DB_CREATE, (store_dbi_t *)arg);
}

static void test_seq_cursor(void)
{
    char *dir = check_tmpdir("store-seq");
    store_env_t *env;
    store_txn_t *txn;
    store_cursor_t *cur;
    store_val_t k, v;
    uint8_t kb[8];
    struct seq_ctx c = {.from = 1, .n = 1000, .vlen = 16};

    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(store_env_write(env, create_db, &c.dbi));
    CHECK_OK(store_env_write(env, put_seqs, &c));
    /* Appending a key that does not sort last is refused. */
    struct seq_ctx bad = {.dbi = c.dbi, .from = 500, .n = 1, .vlen = 16};
    CHECK_ERR(store_env_write(env, put_seqs, &bad), CAP_EINVAL);

    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK_OK(store_cursor_open(txn, c.dbi, &cur));
    CHECK_OK(store_cursor_get(cur, &k, &v, STORE_FIRST));
    CHECK_EQ(cap_get_be64(k.data), 1);
    CHECK_OK(store_cursor_get(cur, &k, &v, STORE_LAST));
    CHECK_EQ(cap_get_be64(k.data), 1000);
    CHECK_ERR(store_cursor_get(cur, &k, &v, STORE_NEXT), CAP_ENOTFOUND);
    k = store_key_u64(kb, 256); /* numeric order: 256 sorts after 255 even though byte 7 is 0 */
    CHECK_OK(store_cursor_get(cur, &k, &v, STORE_SET_RANGE));
    CHECK_EQ(cap_get_be64(k.data), 256);
    CHECK_OK(store_cursor_get(cur, &k, &v, STORE_PREV));
    CHECK_EQ(cap_get_be64(k.data), 255);
    uint64_t count = 0, prev = 0;
    for (int rc = store_cursor_get(cur, &k, &v, STORE_FIRST); rc == 0;
         rc = store_cursor_get(cur, &k, &v, STORE_NEXT)) {
        uint64_t s = cap_get_be64(k.data);
        CHECK(s == prev + 1);
        CHECK_EQ(((const uint8_t *)v.data)[0], s & 0xff);
        prev = s;
        count++;
    }
    CHECK_EQ(count, 1000);
    k = store_key_u64(kb, 5000);
    CHECK_ERR(store_cursor_get(cur, &k, &v, STORE_SET_RANGE), CAP_ENOTFOUND);
    store_cursor_close(cur);
    store_txn_abort(txn);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

static int dup_fill(store_txn_t *txn, void *arg)
{
    store_dbi_t *dbi = arg;
    uint8_t vb[8];
    int rc = store_dbi_open(txn, "dup", STORE_DB_CREATE | STORE_DB_DUPSORT, dbi);
    for (uint64_t s = 10; rc == 0 && s <= 100; s += 10) {
        store_val_t k = {s % 20 ? "odd" : "even", s % 20 ? 3 : 4};
        rc = store_put(txn, *dbi, k, store_key_u64(vb, s), 0);
    }
    return rc;
}

static void test_dupsort(void)
{
    char *dir = check_tmpdir("store-dup");
    store_env_t *env;
    store_txn_t *txn;
    store_cursor_t *cur;
    store_dbi_t dbi;
    uint8_t vb[8];

    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(store_env_write(env, dup_fill, &dbi));
    CHECK_OK(store_txn_begin(env, 0, &txn));
    CHECK_OK(store_cursor_open(txn, dbi, &cur));
    store_val_t k = {"odd", 3}, v = store_key_u64(vb, 35);
    CHECK_OK(store_cursor_get(cur, &k, &v, STORE_GET_BOTH_RANGE));
    CHECK_EQ(cap_get_be64(v.data), 50);
    CHECK_OK(store_cursor_get(cur, &k, &v, STORE_NEXT_DUP));
    CHECK_EQ(cap_get_be64(v.data), 70);
    CHECK_OK(store_cursor_get(cur, &k, &v, STORE_NEXT_DUP));
    CHECK_EQ(cap_get_be64(v.data), 90);
    CHECK_ERR(store_cursor_get(cur, &k, &v, STORE_NEXT_DUP), CAP_ENOTFOUND);
    store_val_t ek = {"even", 4};
    CHECK_OK(store_cursor_get(cur, &ek, &v, STORE_SET_KEY));
    CHECK_EQ(cap_get_be64(v.data), 20);
    CHECK_OK(store_cursor_del(cur));
    store_val_t dv = store_key_u64(vb, 60);
    CHECK_OK(store_del(txn, dbi, ek, &dv));
    CHECK_ERR(store_del(txn, dbi, ek, &dv), CAP_ENOTFOUND);
    store_cursor_close(cur);
    uint64_t n;
    CHECK_OK(store_dbi_count(txn, dbi, &n));
    CHECK_EQ(n, 8);
    CHECK_OK(store_txn_commit(txn));
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

/* Map growth: a 64 KiB map takes ~30 MB of records; concurrent readers keep reading. Both modes:
 * nosync commits write into the map itself (MDB_WRITEMAP), so each growth re-maps a file whose
 * pages the writer changes in place; its data then opens in the default mode too. */
struct reader_arg {
    store_env_t *env;
    store_dbi_t dbi;
    volatile int stop;
    uint64_t reads;
};

static void *reader_main(void *p)
{
    struct reader_arg *r = p;
    while (!r->stop) {
        store_txn_t *txn;
        store_cursor_t *cur;
        store_val_t k, v;
        CHECK_OK(store_txn_begin(r->env, 1, &txn));
        CHECK_OK(store_cursor_open(txn, r->dbi, &cur));
        int rc = store_cursor_get(cur, &k, &v, STORE_LAST);
        CHECK(rc == 0 || rc == CAP_ENOTFOUND);
        if (rc == 0)
            CHECK_EQ(((const uint8_t *)v.data)[0], cap_get_be64(k.data) & 0xff);
        store_cursor_close(cur);
        store_txn_abort(txn);
        r->reads++;
        usleep(200);
    }
    return NULL;
}

static void test_growth(int nosync)
{
    char *dir = check_tmpdir("store-grow");
    store_env_t *env;
    store_env_opts_t o = {.map_size = 64 << 10, .nosync = nosync};
    struct seq_ctx c = {.from = 1, .n = 100, .vlen = 3000};

    CHECK_OK(store_env_open(dir, &o, &env));
    CHECK_OK(store_env_write(env, create_db, &c.dbi));
    struct reader_arg r = {.env = env, .dbi = c.dbi};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, reader_main, &r) == 0);
    for (int i = 0; i < 100; i++) {
        CHECK_OK(store_env_write(env, put_seqs, &c));
        c.from += c.n;
    }
    r.stop = 1;
    pthread_join(th, NULL);
    size_t map, used;
    CHECK_OK(store_env_info(env, &map, &used));
    CHECK(map > (size_t)(30 << 20));
    CHECK(store_env_grow_count(env) >= 9);
    fprintf(stderr, "growth (%s): map %zu bytes after %llu grows, %llu concurrent reads\n",
            nosync ? "nosync" : "sync", map, (unsigned long long)store_env_grow_count(env),
            (unsigned long long)r.reads);
    store_txn_t *txn;
    uint64_t n;
    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK_OK(store_dbi_count(txn, c.dbi, &n));
    CHECK_EQ(n, 10000);
    store_txn_abort(txn);
    store_env_close(env);

    /* Reopen with the small size: the larger size recorded in the file is adopted. */
    CHECK_OK(store_env_open(dir, &o, &env));
    CHECK_OK(store_env_info(env, &map, &used));
    CHECK(map > (size_t)(30 << 20));
    store_env_close(env);
    /* and in the other mode: every record there */
    store_env_opts_t other = {.map_size = 64 << 10, .nosync = !nosync};
    CHECK_OK(store_env_open(dir, &other, &env));
    CHECK_OK(store_env_write(env, create_db, &c.dbi)); /* opens it: it exists */
    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK_OK(store_dbi_count(txn, c.dbi, &n));
    CHECK_EQ(n, 10000);
    store_txn_abort(txn);
    store_env_close(env);

    /* A ceiling: growth stops with CAP_EMAPFULL and the earlier data stays. */
    check_rmtree(dir);
    store_env_opts_t lim = {.map_size = 64 << 10, .max_map_size = 256 << 10, .nosync = nosync};
    CHECK_OK(store_env_open(dir, &lim, &env));
    struct seq_ctx c2 = {.from = 1, .n = 10, .vlen = 3000};
    CHECK_OK(store_env_write(env, create_db, &c2.dbi));
    int rc = 0;
    while ((rc = store_env_write(env, put_seqs, &c2)) == 0)
        c2.from += c2.n;
    CHECK_ERR(rc, CAP_EMAPFULL);
    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK_OK(store_dbi_count(txn, c2.dbi, &n));
    CHECK_EQ(n, c2.from - 1);
    store_txn_abort(txn);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

/* A process killed while it holds a read transaction leaves its reader slot behind (a stale slot
 * pins old pages, so the file would grow forever). When another process still has the env open,
 * LMDB keeps the reader table, and the next open must clear the dead slot. */
static pid_t spawn_reader(const char *dir, int with_txn)
{
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        store_env_t *env;
        store_txn_t *txn;
        if (store_env_open(dir, NULL, &env) != 0)
            _exit(1);
        if (with_txn && store_txn_begin(env, 1, &txn) != 0)
            _exit(1);
        if (write(fds[1], "r", 1) != 1)
            _exit(2);
        for (;;)
            pause();
    }
    char c;
    CHECK(read(fds[0], &c, 1) == 1);
    close(fds[0]);
    close(fds[1]);
    return pid;
}

static void test_stale_reader(void)
{
    char *dir = check_tmpdir("store-stale");
    store_env_t *env;
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(store_env_write(env, put_one, NULL));
    store_env_close(env); /* never fork with an open env */
    pid_t holder = spawn_reader(dir, 0), reader = spawn_reader(dir, 1);
    CHECK(kill(reader, SIGKILL) == 0);
    CHECK(waitpid(reader, NULL, 0) == reader);
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_EQ(store_env_stale_readers(env), 1);
    store_env_close(env);
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_EQ(store_env_stale_readers(env), 0);
    store_env_close(env);
    CHECK(kill(holder, SIGKILL) == 0);
    CHECK(waitpid(holder, NULL, 0) == holder);
    check_rmtree(dir);
    cap_free(dir);
}

int main(void)
{
    test_stale_reader();
    test_basic();
    test_seq_cursor();
    test_dupsort();
    test_growth(0);
    test_growth(1);
    fprintf(stderr, "store.env: ok\n");
    return 0;
}
