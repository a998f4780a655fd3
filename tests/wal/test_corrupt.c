/*
 * test_corrupt.c - damaged frames in a real log. Bytes of stored records are flipped through the
 * store API and, separately, in data.mdb itself; the iterator reports CAP_ECORRUPT with the
 * damaged record's sequence number and a reason, then steps on to the next record. Frames whose
 * checksum is valid but whose body is not what the codec writes (crafted with cap_hash64, which
 * is the same XXH3-64) are rejected by the structural checks before tpl unpacks anything.
 * A damaged log metadata (format version, high mark) is a clear error at open.
 */
#include "check.h"
#include "wal.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#define NREC 100

static void fill(wal_log_t *log)
{
    for (uint64_t i = 1; i <= NREC; i++) {
        char key[16], data[80];
        snprintf(key, sizeof(key), "key%llu", (unsigned long long)(i % 4));
        snprintf(data, sizeof(data), "MARKER-%04llu-payload-bytes-for-record",
                 (unsigned long long)i);
        wal_field_t f[2] = {{.tag = 1, .u = i}, {.tag = 2, .data = data, .len = strlen(data)}};
        wal_rec_t r = {.kind = 1, .key = key, .key_len = strlen(key), .fields = f, .nfields = 2};
        uint64_t s;
        CHECK_OK(wal_log_append_sync(log, &r, 1, &s));
        CHECK_EQ(s, i);
    }
    /* The key index is written by the writer behind the log (about 20 ms after the last
     * append), from the frames as they are then. Damage a frame only once it is indexed, or a
     * flipped key byte would index it under another key and a read by "key2" would not see it
     * (a full scan still reports it). */
    wal_stats_t st;
    for (int waited_ms = 0;; waited_ms++) {
        wal_log_stats(log, &st);
        if (st.indexed_seq >= NREC)
            break;
        CHECK(waited_ms < 10000);
        usleep(1000);
    }
}

/* Replaces the frame stored under seq by (data, len), through the store API. */
struct put_ctx {
    uint64_t seq;
    const void *data;
    size_t len;
};

static int put_raw(store_txn_t *txn, void *arg)
{
    struct put_ctx *c = arg;
    store_dbi_t dbi;
    uint8_t kb[8];
    int rc = store_dbi_open(txn, "wal.log", 0, &dbi);
    if (rc)
        return rc;
    store_val_t v = {c->data, c->len};
    return store_put(txn, dbi, store_key_u64(kb, c->seq), v, 0);
}

static uint8_t *get_raw(store_env_t *env, uint64_t seq, size_t *len)
{
    store_txn_t *txn;
    store_dbi_t dbi;
    store_val_t v;
    uint8_t kb[8];
    CHECK_OK(store_txn_begin(env, 1, &txn));
    CHECK_OK(store_dbi_open(txn, "wal.log", 0, &dbi));
    CHECK_OK(store_get(txn, dbi, store_key_u64(kb, seq), &v));
    uint8_t *copy = cap_memdup(v.data, v.len);
    *len = v.len;
    store_txn_abort(txn);
    return copy;
}

static void set_raw(store_env_t *env, uint64_t seq, const void *data, size_t len)
{
    struct put_ctx c = {seq, data, len};
    CHECK_OK(store_env_write(env, put_raw, &c));
}

/* Iterates everything (decode on/off, or by key) and expects exactly one CAP_ECORRUPT, at bad. */
static void expect_one_bad(wal_log_t *log, uint64_t bad, int decode, const char *key)
{
    wal_iter_opts_t o = {.decode = decode};
    if (key) {
        o.key = key;
        o.key_len = strlen(key);
    }
    wal_iter_t *it;
    wal_entry_t e;
    int rc, corrupt = 0;
    uint64_t good = 0, prev = 0;
    CHECK_OK(wal_iter_open(log, &o, &it));
    while ((rc = wal_iter_next(it, &e)) != CAP_ENOTFOUND) {
        if (rc == CAP_ECORRUPT) {
            CHECK_EQ(e.seq, bad);
            CHECK(strstr(wal_iter_error(it), "seq") != NULL);
            corrupt++;
            continue;
        }
        CHECK_OK(rc);
        CHECK(e.seq > prev && e.seq != bad);
        prev = e.seq;
        if (decode) {
            const wal_field_t *f = wal_entry_field(&e, 1);
            CHECK(f && f->u == e.seq);
        }
        good++;
    }
    CHECK_EQ(corrupt, 1);
    CHECK_EQ(good, key ? NREC / 4 - 1 : NREC - 1);
    wal_iter_close(it);
}

static void test_flip_via_store(void)
{
    char *dir = check_tmpdir("wal-corrupt");
    store_env_t *env;
    wal_log_t *log;
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(wal_log_open(env, NULL, &log));
    fill(log);

    const uint64_t bad = 50; /* key "key2" */
    size_t len;
    uint8_t *orig = get_raw(env, bad, &len);
    uint8_t *mut = cap_malloc(len + 16);
    /* every single byte position, one bit each; and a whole-byte change */
    for (size_t pos = 0; pos < len; pos++) {
        for (int variant = 0; variant < 2; variant++) {
            memcpy(mut, orig, len);
            mut[pos] ^= variant ? 0xff : (uint8_t)(1u << (pos % 8));
            set_raw(env, bad, mut, len);
            expect_one_bad(log, bad, (int)(pos & 1), NULL);
        }
    }
    /* by key, and with a kind filter that the damaged record would not match */
    expect_one_bad(log, bad, 1, "key2");
    /* truncated frames, an extended frame, an empty value */
    size_t cuts[] = {0, 1, 31, 32, 33, len - 1};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        if (cuts[i] == 0)
            continue; /* LMDB stores empty values; test separately below */
        set_raw(env, bad, orig, cuts[i]);
        expect_one_bad(log, bad, 1, NULL);
    }
    memcpy(mut, orig, len);
    memset(mut + len, 0, 16);
    set_raw(env, bad, mut, len + 16);
    expect_one_bad(log, bad, 1, NULL);
    set_raw(env, bad, "", 0);
    expect_one_bad(log, bad, 0, NULL);
    /* a valid frame stored under the wrong sequence number */
    size_t len49;
    uint8_t *f49 = get_raw(env, 49, &len49);
    set_raw(env, bad, f49, len49);
    expect_one_bad(log, bad, 1, NULL);
    cap_free(f49);

    /* restore: everything reads clean again */
    set_raw(env, bad, orig, len);
    wal_iter_opts_t o = {.decode = 1};
    wal_iter_t *it;
    wal_entry_t e;
    uint64_t n = 0;
    int rc;
    CHECK_OK(wal_iter_open(log, &o, &it));
    while ((rc = wal_iter_next(it, &e)) == 0)
        n++;
    CHECK_ERR(rc, CAP_ENOTFOUND);
    CHECK_EQ(n, NREC);
    wal_iter_close(it);

    /* crafted frames with a VALID checksum but a body that is not A(uUB) */
    const size_t hdr = 32, kl = 4;
    uint8_t craft[512];
    struct {
        const char *name;
        size_t body_len;
    } cases[] = {{"random body", 64}, {"tpl of another format", 0}, {"huge count", 0}};
    for (size_t ci = 0; ci < 3; ci++) {
        size_t bl = cases[ci].body_len;
        memcpy(craft, orig, hdr + kl); /* header and key "key2" */
        uint8_t *body = craft + hdr + kl;
        if (ci == 0) {
            for (size_t i = 0; i < bl; i++)
                body[i] = (uint8_t)(i * 37 + 11);
        } else {
            /* start from the real body and damage its inside: tpl's format string / counts */
            size_t obl = len - hdr - kl;
            memcpy(body, orig + hdr + kl, obl);
            bl = obl;
            if (ci == 1) {
                char *fmt = memchr(body, 'A', bl);
                CHECK(fmt != NULL);
                fmt[0] = 'S'; /* "S(uUB)": a structure, not an array */
            } else {
                /* the array count follows the format string's NUL: make it enormous */
                char *fmt = memchr(body, 'A', bl);
                CHECK(fmt != NULL);
                uint8_t *after = (uint8_t *)memchr(fmt, 0, bl - (size_t)((uint8_t *)fmt - body));
                CHECK(after != NULL);
                size_t off = (size_t)(after - body) + 1;
                for (size_t i = off; i < bl && i < off + 16; i++)
                    body[i] = 0xff;
            }
        }
        cap_put_le32(craft + 16, (uint32_t)bl);
        uint8_t c[32];
        memcpy(c, craft, 24);
        cap_put_le64(c + 24, cap_hash64(craft + hdr, kl + bl));
        cap_put_le64(craft + 24, cap_hash64(c, 32));
        /* checksum-valid: the header check passes, so the structural checks must refuse it */
        wal_entry_t ce;
        CHECK_OK(wal_frame_decode(craft, hdr + kl + bl, 0, NULL, &ce));
        wal_scratch_t *sc = NULL;
        CHECK_ERR(wal_frame_decode(craft, hdr + kl + bl, 1, &sc, &ce), CAP_ECORRUPT);
        wal_scratch_free(sc);
        set_raw(env, bad, craft, hdr + kl + bl);
        expect_one_bad(log, bad, 1, NULL);
        fprintf(stderr, "crafted '%s' rejected\n", cases[ci].name);
    }
    set_raw(env, bad, orig, len);
    cap_free(mut);
    cap_free(orig);
    wal_log_close(log);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

/* Flip a byte of a record inside data.mdb on disk. */
static void test_flip_in_file(void)
{
    char *dir = check_tmpdir("wal-corrupt-file");
    char path[4200];
    store_env_t *env;
    wal_log_t *log;
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(wal_log_open(env, NULL, &log));
    fill(log);
    wal_log_close(log);
    store_env_close(env);

    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0);
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    uint8_t *buf = cap_malloc((size_t)st.st_size);
    CHECK(pread(fd, buf, (size_t)st.st_size, 0) == st.st_size);
    /* every copy: LMDB's copy-on-write leaves stale copies of a page in free pages */
    const char *marker = "MARKER-0077-";
    int hits = 0;
    for (off_t i = 0; i + 12 <= st.st_size; i++)
        if (memcmp(buf + i, marker, 12) == 0) {
            uint8_t b = (uint8_t)(buf[i + 8] ^ 0x20);
            CHECK(pwrite(fd, &b, 1, i + 8) == 1);
            hits++;
        }
    CHECK(hits > 0);
    CHECK(fsync(fd) == 0);
    close(fd);
    cap_free(buf);

    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(wal_log_open(env, NULL, &log));
    expect_one_bad(log, 77, 1, NULL);
    expect_one_bad(log, 77, 0, NULL);
    wal_log_close(log);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

static int put_meta(store_txn_t *txn, void *arg)
{
    store_dbi_t dbi;
    const char *which = arg;
    int rc = store_dbi_open(txn, "wal.meta", 0, &dbi);
    if (rc)
        return rc;
    uint8_t v[8] = {0};
    cap_put_le32(v, 99);
    store_val_t k = {"format", 6}, val = {v, which[0] == 'v' ? 4 : 3};
    if (which[0] == 'h') {
        k = (store_val_t){"high", 4};
        val.len = 5;
    }
    return store_put(txn, dbi, k, val, 0);
}

static void test_bad_meta(void)
{
    const char *cases[] = {"version", "short", "high"};
    int want[] = {CAP_EVERSION, CAP_ECORRUPT, CAP_ECORRUPT};
    for (int i = 0; i < 3; i++) {
        char *dir = check_tmpdir("wal-meta");
        store_env_t *env;
        wal_log_t *log = NULL;
        CHECK_OK(store_env_open(dir, NULL, &env));
        CHECK_OK(wal_log_open(env, NULL, &log));
        wal_log_close(log);
        CHECK_OK(store_env_write(env, put_meta, (void *)cases[i]));
        log = NULL;
        CHECK_ERR(wal_log_open(env, NULL, &log), want[i]);
        CHECK(log == NULL);
        store_env_close(env);
        /* read-only opens report the same */
        store_env_opts_t ro = {.readonly = 1};
        CHECK_OK(store_env_open(dir, &ro, &env));
        CHECK_ERR(wal_log_open(env, NULL, &log), want[i]);
        store_env_close(env);
        check_rmtree(dir);
        cap_free(dir);
    }
    /* a read-only env without a log */
    char *dir = check_tmpdir("wal-nolog");
    store_env_t *env;
    wal_log_t *log = NULL;
    CHECK_OK(store_env_open(dir, NULL, &env));
    store_env_close(env);
    store_env_opts_t ro = {.readonly = 1};
    CHECK_OK(store_env_open(dir, &ro, &env));
    CHECK_ERR(wal_log_open(env, NULL, &log), CAP_ENOTFOUND);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

/* An index entry under the hash of "key2" that points at a record of "key3" (what a hash
 * collision looks like): a read by key2 verifies that frame, sees another key and skips it. */
static int put_alias(store_txn_t *txn, void *arg)
{
    store_dbi_t dbi;
    (void)arg;
    int rc = store_dbi_open(txn, "wal.key", 0, &dbi);
    if (rc)
        return rc;
    uint8_t ik[16];
    cap_put_be64(ik, cap_hash64("key2", 4));
    cap_put_be64(ik + 8, 51); /* record 51 has key "key3" */
    store_val_t k = {ik, 16}, v = {"", 0};
    return store_put(txn, dbi, k, v, 0);
}

static void test_hash_alias(void)
{
    char *dir = check_tmpdir("wal-alias");
    store_env_t *env;
    wal_log_t *log;
    wal_opts_t wo = {.index_lag = 1};
    CHECK_OK(store_env_open(dir, NULL, &env));
    CHECK_OK(wal_log_open(env, &wo, &log));
    fill(log);
    wal_stats_t st;
    for (int i = 0; i < 2000; i++) {
        wal_log_stats(log, &st);
        if (st.indexed_seq == NREC)
            break;
        usleep(1000);
    }
    CHECK_EQ(st.indexed_seq, NREC);
    CHECK_OK(store_env_write(env, put_alias, NULL));
    wal_iter_opts_t o = {.key = "key2", .key_len = 4, .decode = 1};
    wal_iter_t *it;
    wal_entry_t e;
    int rc, n = 0;
    CHECK_OK(wal_iter_open(log, &o, &it));
    while ((rc = wal_iter_next(it, &e)) == 0) {
        CHECK_EQ(e.seq % 4, 2);
        CHECK(e.key_len == 4 && memcmp(e.key, "key2", 4) == 0);
        n++;
    }
    CHECK_ERR(rc, CAP_ENOTFOUND);
    CHECK_EQ(n, NREC / 4);
    wal_iter_close(it);
    wal_log_close(log);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

int main(void)
{
    test_hash_alias();
    test_flip_via_store();
    test_flip_in_file();
    test_bad_meta();
    fprintf(stderr, "wal.corrupt: ok\n");
    return 0;
}
