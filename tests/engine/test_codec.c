/*
 * test_codec.c - the engine's parsers and limits without workers: the recorded-result TLV (every
 * truncation, flipped byte, unknown/duplicate tag and bad length is rejected or decodes to a
 * valid result, never crashes), id validation (charset and length bound), and the derived tables:
 * eng__apply of FINISH/CHECKPOINT/SESSION records into a real LMDB store, then the restore chain
 * (deltas in order, the latest checkpoint, a fork's parent chain, the fork-depth bound).
 */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "eng_int.h"

static void test_ids(void)
{
    CHECK(eng__id_valid("a"));
    CHECK(eng__id_valid("Sess-1_2.3:x"));
    CHECK(!eng__id_valid(""));
    CHECK(!eng__id_valid(NULL));
    CHECK(!eng__id_valid("a b"));
    CHECK(!eng__id_valid("a/b"));
    CHECK(!eng__id_valid("\xc3\xa9"));
    char id[ENG_MAX_ID + 2];
    memset(id, 'a', sizeof(id));
    id[ENG_MAX_ID] = 0;
    CHECK(eng__id_valid(id));
    id[ENG_MAX_ID] = 'a';
    id[ENG_MAX_ID + 1] = 0;
    CHECK(!eng__id_valid(id));
}

static void test_result_codec(void)
{
    eng_result_t r = {0};
    r.eid = "e1";
    r.sid = "s1";
    r.status = ENG_ST_ERROR;
    r.err = CAP_EWORKER;
    r.repr = "42";
    r.etype = "ValueError";
    r.emsg = "boom";
    r.traceback = "Traceback...";
    r.output = "out\0put";
    r.output_len = 7;
    r.truncated = 1;
    r.committed = 1;
    r.ordinal = 77;
    r.restore_failed = "f:unpicklable;";
    r.unrecorded = "lk:_thread.lock (thread primitive);g:generator, re-create it;";
    uint8_t *p;
    size_t n;
    eng__result_encode(&r, &p, &n);
    eng_result_t *d = NULL;
    CHECK_OK(eng__result_decode(p, n, &d));
    CHECK_STREQ(d->eid, "e1");
    CHECK_STREQ(d->sid, "s1");
    CHECK_EQ(d->status, ENG_ST_ERROR);
    CHECK_EQ(d->err, CAP_EWORKER);
    CHECK_STREQ(d->repr, "42");
    CHECK(d->json == NULL);
    CHECK_EQ(d->output_len, 7);
    CHECK(memcmp(d->output, "out\0put", 7) == 0);
    CHECK(d->truncated && d->committed && !d->restarted);
    CHECK_EQ(d->ordinal, 77);
    CHECK_STREQ(d->restore_failed, "f:unpicklable;");
    CHECK_STREQ(d->unrecorded, "lk:_thread.lock (thread primitive);g:generator, re-create it;");
    eng_result_free(d);
    /* every truncation is rejected or (at a field boundary) still a complete, valid result */
    for (size_t cut = 0; cut < n; cut++) {
        d = NULL;
        int rc = eng__result_decode(p, cut, &d);
        if (rc == 0) {
            CHECK(d->eid != NULL);
            eng_result_free(d);
        } else {
            CHECK_EQ(rc, CAP_ECORRUPT);
        }
    }
    /* every single-byte change: rejected or decoded, never a crash */
    uint8_t *m = cap_malloc(n);
    int rejected = 0;
    for (size_t i = 0; i < n; i++) {
        for (int v = 0; v < 256; v += 37) {
            memcpy(m, p, n);
            m[i] ^= (uint8_t)(v | 1);
            d = NULL;
            int rc = eng__result_decode(m, n, &d);
            if (rc == 0)
                eng_result_free(d);
            else {
                CHECK_EQ(rc, CAP_ECORRUPT);
                rejected++;
            }
        }
    }
    CHECK(rejected > 0);
    cap_free(m);
    /* a duplicate tag, an unknown tag, a short number, a missing eid */
    uint8_t dup[] = {1, 1, 0, 0, 0, 'a', 1, 1, 0, 0, 0, 'b'};
    CHECK_ERR(eng__result_decode(dup, sizeof(dup), &d), CAP_ECORRUPT);
    uint8_t unk[] = {99, 0, 0, 0, 0};
    CHECK_ERR(eng__result_decode(unk, sizeof(unk), &d), CAP_ECORRUPT);
    uint8_t shortnum[] = {1, 1, 0, 0, 0, 'a', 3, 4, 0, 0, 0, 1, 0, 0, 0};
    CHECK_ERR(eng__result_decode(shortnum, sizeof(shortnum), &d), CAP_ECORRUPT);
    uint8_t noeid[] = {3, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    CHECK_ERR(eng__result_decode(noeid, sizeof(noeid), &d), CAP_ECORRUPT);
    uint8_t huge[] = {1, 0xff, 0xff, 0xff, 0xff, 'a'};
    CHECK_ERR(eng__result_decode(huge, sizeof(huge), &d), CAP_ECORRUPT);
    uint8_t badstatus[] = {1, 1, 0, 0, 0, 'a', 3, 8, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0};
    CHECK_ERR(eng__result_decode(badstatus, sizeof(badstatus), &d), CAP_ECORRUPT);
    cap_free(p);
}

typedef struct apply_ctx {
    eng_tables_t *t;
    const wal_entry_t *e;
    size_t n;
} apply_ctx_t;

static int apply_fn(store_txn_t *txn, void *arg)
{
    apply_ctx_t *a = arg;
    for (size_t i = 0; i < a->n; i++) {
        int rc = eng__apply(a->t, txn, &a->e[i]);
        if (rc)
            return rc;
    }
    return 0;
}

static wal_entry_t finish(const char *sid, const char *eid, uint64_t ord, const char *blob,
                          wal_field_t *f, uint8_t **enc)
{
    eng_result_t r = {0};
    r.eid = (char *)eid;
    r.sid = (char *)sid;
    r.committed = ord > 0;
    r.ordinal = ord;
    size_t n;
    eng__result_encode(&r, enc, &n);
    f[0] = (wal_field_t){ENG_F_SID, 0, sid, strlen(sid)};
    f[1] = (wal_field_t){ENG_F_ORDINAL, ord, NULL, 0};
    f[2] = (wal_field_t){ENG_F_RESULT, 0, *enc, n};
    f[3] = (wal_field_t){ENG_F_DELTA, 0, blob, blob ? strlen(blob) : 0};
    wal_entry_t e = {0};
    e.kind = ENG_REC_FINISH;
    e.key = eid;
    e.key_len = strlen(eid);
    e.fields = f;
    e.nfields = 4;
    return e;
}

static void expect_chain(eng_tables_t *t, const char *sid, uint64_t upto, const char *want)
{
    eng_blob_t *b = NULL;
    size_t n = 0;
    CHECK_OK(eng__chain_read(t, sid, upto, &b, &n));
    char got[256] = "";
    for (size_t i = 0; i < n; i++) {
        strncat(got, (const char *)b[i].p, b[i].n);
        strcat(got, "|");
    }
    CHECK_STREQ(got, want);
    eng__blobs_free(b, n);
}

static void test_tables(void)
{
    char *dir = check_tmpdir("eng-codec");
    store_env_t *env = NULL;
    store_env_opts_t eo = {0};
    eo.map_size = 16u << 20;
    CHECK_OK(store_env_open(dir, &eo, &env));
    eng_tables_t t;
    CHECK_OK(eng__tables_open(env, &t));
    wal_field_t f[8][4];
    uint8_t *enc[8] = {0};
    wal_entry_t es[8];
    es[0] = finish("s", "e1", 1, "d1", f[0], &enc[0]);
    es[1] = finish("s", "e2", 0, NULL, f[1], &enc[1]); /* rolled back: no delta */
    es[2] = finish("s", "e3", 2, "d2", f[2], &enc[2]);
    es[3] = finish("s2", "e4", 1, "x1", f[3], &enc[3]); /* another session, sorts after "s" */
    es[4] = finish("s", "e5", 3, "d3", f[4], &enc[4]);
    apply_ctx_t a = {&t, es, 5};
    CHECK_OK(store_env_write(env, apply_fn, &a));
    CHECK_OK(store_env_write(env, apply_fn, &a)); /* re-runnable */
    uint64_t last;
    CHECK_OK(eng__last_ordinal(&t, "s", &last));
    CHECK_EQ(last, 3);
    CHECK_OK(eng__last_ordinal(&t, "none", &last));
    CHECK_EQ(last, 0);
    expect_chain(&t, "s", 0, "d1|d2|d3|");
    expect_chain(&t, "s", 2, "d1|d2|");
    expect_chain(&t, "s2", 0, "x1|");
    expect_chain(&t, "none", 0, "");
    eng_result_t *r = NULL;
    CHECK_OK(eng__result_read(&t, "e2", &r));
    CHECK(!r->committed);
    eng_result_free(r);
    CHECK_ERR(eng__result_read(&t, "zz", &r), CAP_ENOTFOUND);
    /* a checkpoint after ordinal 2: the chain starts from it */
    wal_field_t cf[2] = {{ENG_C_BLOB, 0, "C2", 2}, {ENG_C_ORDINAL, 2, NULL, 0}};
    wal_entry_t ce = {0};
    ce.kind = ENG_REC_CHECKPOINT;
    ce.key = "s";
    ce.key_len = 1;
    ce.fields = cf;
    ce.nfields = 2;
    /* a fork of s after ordinal 1, with one delta of its own */
    wal_field_t sf[2] = {{ENG_S_PARENT, 0, "s", 1}, {ENG_S_PORD, 1, NULL, 0}};
    wal_entry_t se = {0};
    se.kind = ENG_REC_SESSION;
    se.key = "fk";
    se.key_len = 2;
    se.fields = sf;
    se.nfields = 2;
    es[0] = ce;
    es[1] = se;
    es[2] = finish("fk", "e6", 1, "k1", f[5], &enc[5]);
    a.n = 3;
    CHECK_OK(store_env_write(env, apply_fn, &a));
    expect_chain(&t, "s", 0, "C2|d3|");
    expect_chain(&t, "s", 2, "C2|");
    expect_chain(&t, "s", 1, "d1|");
    expect_chain(&t, "fk", 0, "d1|k1|");
    /* a missing field is a broken invariant */
    wal_entry_t bad = es[2];
    bad.nfields = 1;
    CHECK_ERR(eng__apply(&t, NULL, &bad), CAP_ECORRUPT);
    for (int i = 0; i < 8; i++)
        cap_free(enc[i]);
    store_env_close(env);
    check_rmtree(dir);
    cap_free(dir);
}

int main(void)
{
    test_ids();
    test_result_codec();
    test_tables();
    fprintf(stderr, "engine.codec ok\n");
    return 0;
}
