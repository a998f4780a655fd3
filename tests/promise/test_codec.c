/*
 * test_codec.c - the promise document and outbox message byte formats (prom_codec.c): round
 * trips, every truncation and trailing bytes are CAP_ECORRUPT, random damage never crashes;
 * a damaged stored document makes prom_store_open fail with CAP_ECORRUPT (and loses nothing
 * else); the preload limit.
 */
#include <stdlib.h>
#include <string.h>

#include "prom_int.h"
#include "prom_test.h"

static prom__doc_t *sample_doc(void)
{
    prom__doc_t *d = cap_calloc(1, sizeof(*d));
    prom_kv_t tags[2] = {{"resonate:target", "poll://any@default"}, {"k", ""}};
    prom_kv_t hdr[1] = {{"h", "v"}};
    prom_value_t param = {hdr, 1, "\0bin\xff", 5};
    d->p.id = cap_strdup("wf-1:0");
    d->p.state = PROM_REJECTED_CANCELED;
    prom__value_copy(&d->p.param, &param);
    prom__value_copy(&d->p.value, NULL);
    prom__kvs_copy(&d->p.tags, &d->p.ntags, tags, 2);
    d->p.timeout_at = 1795508921914;
    d->p.created_at = 1795422521933;
    d->p.settled_at = 1795422522305;
    d->has_task = 1;
    d->tstate = PROM_TASK_ACQUIRED;
    d->tversion = 7;
    d->tresumes = 2;
    d->tpid = cap_strdup("worker1");
    d->tttl = 60000;
    d->ttimer = 1795422582305;
    d->nawaiters = 2;
    d->awaiters = cap_calloc(2, sizeof(char *));
    d->awaiters[0] = cap_strdup("a");
    d->awaiters[1] = cap_strdup("bb");
    d->nlisteners = 1;
    d->listeners = cap_calloc(1, sizeof(char *));
    d->listeners[0] = cap_strdup("poll://uni@default/w1");
    return d;
}

static void same_doc(const prom__doc_t *a, const prom__doc_t *b)
{
    CHECK_STREQ(a->p.id, b->p.id);
    CHECK_EQ(a->p.state, b->p.state);
    CHECK_EQ(a->p.param.len, b->p.param.len);
    CHECK(memcmp(a->p.param.data, b->p.param.data, a->p.param.len) == 0);
    CHECK_EQ(a->p.param.nheaders, b->p.param.nheaders);
    CHECK_STREQ(a->p.param.headers[0].value, b->p.param.headers[0].value);
    CHECK_EQ(a->p.value.len, b->p.value.len);
    CHECK_EQ(a->p.ntags, b->p.ntags);
    for (size_t i = 0; i < a->p.ntags; i++) {
        CHECK_STREQ(a->p.tags[i].key, b->p.tags[i].key);
        CHECK_STREQ(a->p.tags[i].value, b->p.tags[i].value);
    }
    CHECK_EQ(a->p.timeout_at, b->p.timeout_at);
    CHECK_EQ(a->p.created_at, b->p.created_at);
    CHECK_EQ(a->p.settled_at, b->p.settled_at);
    CHECK_EQ(a->has_task, b->has_task);
    CHECK_EQ(a->tstate, b->tstate);
    CHECK_EQ(a->tversion, b->tversion);
    CHECK_EQ(a->tresumes, b->tresumes);
    CHECK_STREQ(a->tpid, b->tpid);
    CHECK_EQ(a->tttl, b->tttl);
    CHECK_EQ(a->ttimer, b->ttimer);
    CHECK_EQ(a->nawaiters, b->nawaiters);
    CHECK_STREQ(a->awaiters[1], b->awaiters[1]);
    CHECK_EQ(a->nlisteners, b->nlisteners);
    CHECK_STREQ(a->listeners[0], b->listeners[0]);
}

static void test_doc_codec(void)
{
    prom__doc_t *d = sample_doc(), *e;
    uint8_t *buf;
    size_t len;
    prom__doc_encode(d, &buf, &len);
    CHECK_OK(prom__doc_decode(buf, len, &e));
    same_doc(d, e);
    prom__doc_free(e);
    /* every truncation is refused */
    for (size_t n = 0; n < len; n++)
        CHECK_ERR(prom__doc_decode(buf, n, &e), CAP_ECORRUPT);
    /* trailing bytes */
    uint8_t *big = cap_malloc(len + 1);
    memcpy(big, buf, len);
    big[len] = 0;
    CHECK_ERR(prom__doc_decode(big, len + 1, &e), CAP_ECORRUPT);
    /* version, states out of range */
    memcpy(big, buf, len);
    big[0] = 99;
    CHECK_ERR(prom__doc_decode(big, len, &e), CAP_ECORRUPT);
    /* random damage: refused or decoded, never a crash or a leak (ASan) */
    uint64_t rng = 42;
    for (int k = 0; k < 20000; k++) {
        memcpy(big, buf, len);
        int flips = 1 + k % 4;
        for (int f = 0; f < flips; f++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            big[(rng >> 33) % len] ^= (uint8_t)(1u << ((rng >> 20) % 8));
        }
        int rc = prom__doc_decode(big, len, &e);
        CHECK(rc == 0 || rc == CAP_ECORRUPT);
        if (rc == 0) {
            CHECK(e->p.state <= PROM_REJECTED_TIMEDOUT && e->tstate <= PROM_TASK_FULFILLED);
            prom__doc_free(e);
        }
    }
    cap_free(big);
    cap_free(buf);
    prom__doc_free(d);
}

static void test_msg_codec(void)
{
    prom__msg_t m = {5, PROM_MSG_EXECUTE, cap_strdup("poll://any@g"), cap_strdup("t1"), 3}, o;
    uint8_t *buf;
    size_t len;
    prom__msg_encode(&m, &buf, &len);
    CHECK_OK(prom__msg_decode(buf, len, 5, &o));
    CHECK_EQ(o.kind, PROM_MSG_EXECUTE);
    CHECK_EQ(o.version, 3);
    CHECK_STREQ(o.address, "poll://any@g");
    CHECK_STREQ(o.id, "t1");
    prom__msg_clear(&o);
    for (size_t n = 0; n < len; n++)
        CHECK_ERR(prom__msg_decode(buf, n, 5, &o), CAP_ECORRUPT);
    buf[1] = 9; /* unknown kind */
    CHECK_ERR(prom__msg_decode(buf, len, 5, &o), CAP_ECORRUPT);
    cap_free(buf);
    prom__msg_clear(&m);
}

/* A damaged live document in prom.docs: open refuses with CAP_ECORRUPT; the data stays as it
 * was. A damaged evicted (settled) one: open works (it loads only the live set) and an operation
 * that needs it fails with CAP_ECORRUPT instead of answering 404. */
static int put_garbage(store_txn_t *txn, void *arg)
{
    store_dbi_t dbi;
    int rc = store_dbi_open(txn, "prom.docs", 0, &dbi);
    if (rc == 0) {
        store_val_t k = {arg, strlen(arg)}, v = {"\x01\x02junk", 6};
        rc = store_put(txn, dbi, k, v, 0);
    }
    return rc;
}

static void test_damaged_table(void)
{
    ptest_t t;
    ptest_init(&t, "prom-codec");
    ptest_open(&t);
    prom_result_t r;
    prom_create_t c = {"p0", 2000000, NULL, NULL, 0};
    CHECK_OK(prom_promise_create(t.ps, &c, &r));
    prom_result_clear(&r);
    prom_create_t c2 = {"p2", 2000000, NULL, NULL, 0};
    CHECK_OK(prom_promise_create(t.ps, &c2, &r));
    prom_result_clear(&r);
    prom_settle_t st = {"p2", PROM_RESOLVED, NULL};
    CHECK_OK(prom_promise_settle(t.ps, &st, &r));
    prom_result_clear(&r);
    prom_store_close(t.ps);
    t.ps = NULL;
    CHECK_OK(store_env_write(t.env, put_garbage, "p2"));
    prom_opts_t po = {0};
    po.settled_cache = -1;
    prom_store_t *ps = NULL;
    CHECK_OK(prom_store_open(t.env, &po, &ps));
    CHECK_OK(prom_promise_get(ps, "p0", &r));
    CHECK(r.status == PROM_S_OK);
    prom_result_clear(&r);
    CHECK_ERR(prom_promise_get(ps, "p2", &r), CAP_ECORRUPT);
    CHECK(r.promise == NULL);
    CHECK_ERR(prom_promise_create(ps, &c2, &r), CAP_ECORRUPT);
    prom_search_t q = {-1, NULL, 0, 10, NULL};
    CHECK_ERR(prom_promise_search(ps, &q, &r), CAP_ECORRUPT);
    prom_store_close(ps);
    ps = NULL;
    CHECK_OK(store_env_write(t.env, put_garbage, "p0"));
    CHECK_ERR(prom_store_open(t.env, &po, &ps), CAP_ECORRUPT);
    CHECK(ps == NULL);
    store_env_close(t.env);
    t.env = NULL;
    ptest_fini(&t);
}

/* preload is capped by preload_limit and ordered by id */
static void test_preload_limit(void)
{
    ptest_t t;
    ptest_init(&t, "prom-preload");
    store_env_opts_t eo = {0};
    CHECK_OK(store_env_open(t.dir, &eo, &t.env));
    prom_opts_t po = {0};
    po.clock = fake_clock_read;
    po.clock_arg = &t.clock;
    po.preload_limit = 3;
    CHECK_OK(prom_store_open(t.env, &po, &t.ps));
    prom_kv_t tags[2] = {{"resonate:branch", "b"}, {"resonate:target", "poll://any@g"}};
    prom_result_t r;
    const char *ids[] = {"e", "d", "c", "b", "a"};
    for (int i = 0; i < 5; i++) {
        prom_create_t c = {ids[i], 2000000, NULL, tags, 1};
        CHECK_OK(prom_promise_create(t.ps, &c, &r));
        prom_result_clear(&r);
    }
    prom_create_t c = {"root", 2000000, NULL, tags, 2};
    CHECK_OK(prom_task_create(t.ps, "w", 1000, &c, &r));
    CHECK_EQ(r.status, 200);
    CHECK_EQ(r.npromises, 3);
    CHECK_STREQ(r.promises[0].id, "a");
    CHECK_STREQ(r.promises[2].id, "c");
    prom_result_clear(&r);
    ptest_fini(&t);
}

int main(void)
{
    test_doc_codec();
    test_msg_codec();
    test_damaged_table();
    test_preload_limit();
    fprintf(stderr, "promise codec: ok\n");
    return 0;
}
