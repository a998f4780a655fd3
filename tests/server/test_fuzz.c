/*
 * test_fuzz.c - a bounded fuzz run over everything capsule_http does with network bytes: HTTP
 * request parsing (srv__hparser, fed in random splits, pipelined), WebSocket framing (srv__wsproto,
 * frames built and then mutated, fed in random splits) and JSON parsing + field checking.
 *
 * Only gcc is on the build machine, so this is a standalone driver: seeds, then a random +
 * mutation loop (bit flips, byte overwrite/insert/delete, splices between seeds, repeated runs)
 * for CAPSULE_FUZZ_SECONDS (default 8) or CAPSULE_FUZZ_ITERS, whichever ends first; the seed is
 * printed (CAPSULE_FUZZ_SEED replays). CI runs it in the ASan+UBSan build, where any memory error
 * aborts. Built with -DCAPSULE_LIBFUZZER and -fsanitize=fuzzer, the same fuzz_one() is the
 * libFuzzer entry point. Besides "no crash", it checks the limits hold on every accepted input.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "srv_int.h"

static srv_limits_t lim;
static uint64_t rng;
static uint64_t n_http_done, n_http_err, n_ws_text, n_json_ok;

static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static size_t rnd_below(size_t n)
{
    return n ? (size_t)(rnd() % n) : 0;
}

/* ---- the three targets ---- */

static void fuzz_json(const uint8_t *d, size_t n)
{
    json_t *v = NULL;
    char err[256];
    int rc = srv_json_parse((const char *)d, n, lim.json_max_depth, &v, err, sizeof(err));
    CHECK(rc == 0 || rc == CAP_EPROTO || rc == CAP_ETOOBIG);
    CHECK(strlen(err) < sizeof(err));
    if (rc == 0) {
        static const srv_field_t f[] = {
            {"a", SRV_JSTRING, 1}, {"b", SRV_JINT, 0}, {"c", SRV_JOBJECT, 0}, {NULL, 0, 0}};
        srv_json_check(v, f, err, sizeof(err));
        n_json_ok++;
        json_decref(v);
    } else {
        CHECK(err[0] != 0);
    }
}

static void fuzz_http(const uint8_t *d, size_t n)
{
    srv__hparser_t *p;
    srv__hparser_new(&lim, &p);
    size_t off = 0;
    int guard = 0;
    while (off < n && guard++ < 10000) {
        size_t piece = 1 + rnd_below(n - off);
        size_t used = 0;
        int status = 0;
        int ev = srv__hparser_feed(p, (const char *)d + off, piece, &used, &status);
        CHECK(used <= piece);
        off += used;
        if (ev == SRV__HP_ERROR) {
            CHECK(status == 400 || status == 413 || status == 414 || status == 431 ||
                  status == 417 || status == 505);
            CHECK(srv__hparser_error(p)[0] != 0);
            n_http_err++;
            break;
        }
        if (ev == SRV__HP_DONE) {
            srv__hmsg_t *m = srv__hparser_msg(p);
            CHECK(m->url && m->url_len <= lim.max_url_bytes);
            CHECK(m->body_len <= lim.max_body_bytes);
            CHECK(m->nhdrs <= lim.max_headers);
            CHECK(m->method[0] != 0);
            n_http_done++;
            if (m->upgrade)
                break; /* the rest would be another protocol's */
            srv__hparser_next(p);
            continue;
        }
        if (used == 0 && piece == n - off)
            break; /* needs more than there is */
    }
    srv__hparser_free(p);
}

typedef struct wsctx {
    size_t written;
    srv__wsproto_t *ws;
} wsctx_t;

static void ws_text(void *arg, const uint8_t *data, size_t len)
{
    wsctx_t *c = arg;
    CHECK(len <= lim.ws_max_msg);
    n_ws_text++;
    fuzz_json(data, len);
    if (len & 1) /* answer some, as an application would, from inside the callback */
        srv__wsproto_send_text(c->ws, "{\"ok\":1}", 8);
}

static void ws_binary(void *arg, size_t len)
{
    (void)arg;
    CHECK(len <= lim.ws_max_msg);
}

static void ws_write(void *arg, const uint8_t *data, size_t len)
{
    wsctx_t *c = arg;
    CHECK(data != NULL || len == 0);
    c->written += len;
}

static void fuzz_ws(const uint8_t *d, size_t n)
{
    wsctx_t c = {0};
    srv__wsproto_cb_t cb = {ws_text, ws_binary, ws_write};
    srv__wsproto_new(&lim, &cb, &c, &c.ws);
    size_t off = 0;
    while (off < n) {
        size_t piece = 1 + rnd_below(n - off);
        if (srv__wsproto_feed(c.ws, d + off, piece) != 0)
            break;
        off += piece;
        if (srv__wsproto_done(c.ws))
            break;
    }
    srv__wsproto_send_text(c.ws, "{}", 2);
    srv__wsproto_close(c.ws, 1000, "end");
    srv__wsproto_free(c.ws);
}

/* The first byte picks the target, so one corpus covers all three (and libFuzzer can use it). */
int fuzz_one(const uint8_t *d, size_t n);
int fuzz_one(const uint8_t *d, size_t n)
{
    if (n == 0)
        return 0;
    switch (d[0] % 3) {
    case 0:
        fuzz_http(d + 1, n - 1);
        break;
    case 1:
        fuzz_ws(d + 1, n - 1);
        break;
    default:
        fuzz_json(d + 1, n - 1);
        break;
    }
    return 0;
}

#ifdef CAPSULE_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);
int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
    if (!lim.max_conns) {
        srv_limits_default(&lim);
        lim.max_body_bytes = 4096;
        lim.json_max_depth = 16;
        rng = 88172645463325252ULL;
    }
    return fuzz_one(d, n);
}
#else

/* ---- seeds ---- */
typedef struct buf {
    uint8_t *d;
    size_t n;
} buf_t;

static buf_t *corpus;
static size_t ncorpus;

static void add_seed(const void *d, size_t n)
{
    corpus = cap_realloc(corpus, (ncorpus + 1) * sizeof(buf_t));
    corpus[ncorpus].d = cap_memdup(d, n);
    corpus[ncorpus].n = n;
    ncorpus++;
}

static void add_str(uint8_t target, const char *s)
{
    size_t n = strlen(s);
    uint8_t *b = cap_malloc(n + 1);
    b[0] = target;
    memcpy(b + 1, s, n);
    add_seed(b, n + 1);
    cap_free(b);
}

/* A masked client frame. */
static size_t ws_frame(uint8_t *out, int fin, int op, const uint8_t *p, size_t n)
{
    size_t k = 0;
    out[k++] = (uint8_t)((fin ? 0x80 : 0) | op);
    if (n < 126) {
        out[k++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        out[k++] = 0x80 | 126;
        out[k++] = (uint8_t)(n >> 8);
        out[k++] = (uint8_t)n;
    } else {
        out[k++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            out[k++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    uint8_t mask[4] = {0x37, 0xfa, 0x21, 0x3d};
    memcpy(out + k, mask, 4);
    k += 4;
    for (size_t i = 0; i < n; i++)
        out[k + i] = p[i] ^ mask[i % 4];
    return k + n;
}

static void seeds(void)
{
    add_str(0, "GET /v1/ping HTTP/1.1\r\nHost: a\r\n\r\n");
    add_str(0, "POST /v1/echo HTTP/1.1\r\nContent-Length: 12\r\nContent-Type: "
               "application/json\r\n\r\n{\"text\":\"a\"}GET / HTTP/1.1\r\n\r\n");
    add_str(0, "POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
               "0\r\nTrailer: x\r\n\r\n");
    add_str(0, "GET /v1/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
               "\x81\x82\x01\x02\x03\x04zz");
    add_str(0, "GET /v1/a?b=c%20d&e HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: "
               "99999999999999999999\r\n\r\n");
    add_str(2, "{\"a\":\"x\",\"b\":1,\"c\":{\"d\":[1,2.5,true,null,\"\\u00e9\"]}}");
    add_str(2, "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]");
    add_str(2, "{\"a\":\"\\\"[[[[\",\"a\":2}");
    uint8_t f[1 << 13];
    size_t k = 0;
    f[k++] = 1;
    const char *m1 = "{\"op\":\"echo\",\"data\":[1,2,{\"x\":\"y\"}]}";
    k += ws_frame(f + k, 1, 1, (const uint8_t *)m1, strlen(m1));
    k += ws_frame(f + k, 0, 1, (const uint8_t *)"{\"a\":", 5);
    k += ws_frame(f + k, 1, 9, (const uint8_t *)"ping", 4); /* control frame mid-message */
    k += ws_frame(f + k, 1, 0, (const uint8_t *)"\"b\"}", 4);
    k += ws_frame(f + k, 1, 2, (const uint8_t *)"\x00\x01", 2);
    uint8_t big[3000];
    memset(big, 'a', sizeof(big));
    k += ws_frame(f + k, 1, 1, big, sizeof(big));
    k += ws_frame(f + k, 1, 8,
                  (const uint8_t *)"\x03\xe8"
                                   "bye",
                  5);
    add_seed(f, k);
}

static void mutate(buf_t *b)
{
    int rounds = 1 + (int)rnd_below(8);
    for (int r = 0; r < rounds; r++) {
        size_t n = b->n;
        switch (rnd_below(7)) {
        case 0: /* bit flip */
            if (n > 1)
                b->d[1 + rnd_below(n - 1)] ^= (uint8_t)(1u << rnd_below(8));
            break;
        case 1: /* interesting byte */
            if (n > 1) {
                static const uint8_t v[] = {0,   0xff, 0x7f, 0x80, '\r', '\n', ':', '{', '[',
                                            '"', '\\', '%',  ' ',  0x7e, 0x7f, 126, 127};
                b->d[1 + rnd_below(n - 1)] = v[rnd_below(sizeof(v))];
            }
            break;
        case 2: /* insert random bytes */
        {
            size_t add = 1 + rnd_below(16), at = 1 + rnd_below(n);
            b->d = cap_realloc(b->d, n + add);
            memmove(b->d + at + add, b->d + at, n - at);
            for (size_t i = 0; i < add; i++)
                b->d[at + i] = (uint8_t)rnd();
            b->n += add;
            break;
        }
        case 3: /* delete a range */
            if (n > 2) {
                size_t at = 1 + rnd_below(n - 1), del = 1 + rnd_below(n - at);
                memmove(b->d + at, b->d + at + del, n - at - del);
                b->n -= del;
            }
            break;
        case 4: /* splice a piece of another seed */
        {
            const buf_t *o = &corpus[rnd_below(ncorpus)];
            if (o->n > 1) {
                size_t from = 1 + rnd_below(o->n - 1), len = 1 + rnd_below(o->n - from);
                size_t at = 1 + rnd_below(n);
                b->d = cap_realloc(b->d, n + len);
                memmove(b->d + at + len, b->d + at, n - at);
                memcpy(b->d + at, o->d + from, len);
                b->n += len;
            }
            break;
        }
        case 5: /* duplicate a range (repeated headers, frames) */
            if (n > 2 && n < 1 << 16) {
                size_t at = 1 + rnd_below(n - 1), len = 1 + rnd_below(n - at);
                b->d = cap_realloc(b->d, n + len);
                memcpy(b->d + n, b->d + at, len);
                b->n += len;
            }
            break;
        default: /* truncate */
            if (n > 2)
                b->n = 1 + rnd_below(n - 1);
            break;
        }
    }
}

int main(void)
{
    srv_limits_default(&lim);
    lim.max_url_bytes = 256;
    lim.max_header_bytes = 1024;
    lim.max_headers = 16;
    lim.max_body_bytes = 4096;
    lim.ws_max_frame = 2048;
    lim.ws_max_msg = 6000;
    lim.json_max_depth = 16;
    const char *e = getenv("CAPSULE_FUZZ_SEED");
    rng = e ? strtoull(e, NULL, 0) : ((uint64_t)time(NULL) * 2654435761u) | 1;
    uint64_t seed = rng;
    double secs = getenv("CAPSULE_FUZZ_SECONDS") ? atof(getenv("CAPSULE_FUZZ_SECONDS")) : 8.0;
    uint64_t iters =
        getenv("CAPSULE_FUZZ_ITERS") ? strtoull(getenv("CAPSULE_FUZZ_ITERS"), NULL, 0) : UINT64_MAX;
    fprintf(stderr, "fuzz: seed %llu, %.1f s\n", (unsigned long long)seed, secs);
    seeds();
    for (size_t i = 0; i < ncorpus; i++)
        fuzz_one(corpus[i].d, corpus[i].n);
    uint64_t t_end = cap_now_ns() + (uint64_t)(secs * 1e9), i = 0;
    for (; i < iters && (i % 256 || cap_now_ns() < t_end); i++) {
        buf_t b;
        if (rnd_below(16) == 0) { /* pure random, any target */
            b.n = 1 + rnd_below(512);
            b.d = cap_malloc(b.n);
            for (size_t k = 0; k < b.n; k++)
                b.d[k] = (uint8_t)rnd();
        } else {
            const buf_t *s = &corpus[rnd_below(ncorpus)];
            b.d = cap_memdup(s->d, s->n);
            b.n = s->n;
            mutate(&b);
        }
        fuzz_one(b.d, b.n);
        /* Keep some mutants as new seeds, so mutations stack (bounded corpus). */
        if (ncorpus < 512 && rnd_below(64) == 0)
            add_seed(b.d, b.n);
        cap_free(b.d);
    }
    fprintf(stderr,
            "fuzz: %llu inputs; http requests parsed %llu, refused %llu; ws text %llu; json ok "
            "%llu\n",
            (unsigned long long)i, (unsigned long long)n_http_done, (unsigned long long)n_http_err,
            (unsigned long long)n_ws_text, (unsigned long long)n_json_ok);
    /* The run must have reached each target's accepting paths, or it fuzzed nothing useful. */
    CHECK(n_http_done > 0 && n_http_err > 0 && n_ws_text > 0 && n_json_ok > 0);
    for (size_t k = 0; k < ncorpus; k++)
        cap_free(corpus[k].d);
    cap_free(corpus);
    return 0;
}
#endif
