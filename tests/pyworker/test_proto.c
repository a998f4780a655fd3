/*
 * test_proto.c - the protocol codec on its own: frame headers (minimum, limit), every field
 * getter at and past the end of a body, sticky errors, impossible list counts rejected before
 * allocation, and the worker-options parser (valid, every kind of bad input, round trip).
 */
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "pyw_proto.h"

static void test_frames(void)
{
    pyw_buf_t b;
    pyw__buf_init(&b);
    pyw__frame_begin(&b, 0x81, 0x1122334455667788ull);
    pyw__put_u8(&b, 2);
    pyw__put_cstr(&b, "hello");
    pyw__put_u32(&b, 7);
    pyw__put_u64(&b, 1ull << 40);
    pyw__frame_end(&b, 0);
    CHECK_EQ(b.len, 13 + 1 + 4 + 5 + 4 + 8);
    uint32_t len;
    uint8_t type;
    uint64_t id;
    CHECK_OK(pyw__hdr_parse(b.p, 1000, &len, &type, &id));
    CHECK_EQ(len, b.len - 4);
    CHECK_EQ(type, 0x81);
    CHECK(id == 0x1122334455667788ull);
    CHECK_ERR(pyw__hdr_parse(b.p, len - 1, &len, &type, &id), CAP_ETOOBIG);
    uint8_t shorth[13] = {8, 0, 0, 0};
    CHECK_ERR(pyw__hdr_parse(shorth, 1000, &len, &type, &id), CAP_EPROTO);

    pyw_rd_t r;
    uint8_t u8;
    uint32_t u32;
    uint64_t u64;
    const uint8_t *s;
    size_t n;
    pyw__rd_init(&r, b.p + 13, b.len - 13);
    CHECK_OK(pyw__get_u8(&r, &u8));
    CHECK_EQ(u8, 2);
    CHECK_OK(pyw__get_str(&r, &s, &n));
    CHECK_EQ(n, 5);
    CHECK(memcmp(s, "hello", 5) == 0);
    CHECK_OK(pyw__get_u32(&r, &u32));
    CHECK_EQ(u32, 7);
    CHECK_ERR(pyw__rd_end(&r), CAP_EPROTO); /* bytes left */
    CHECK_OK(pyw__get_u64(&r, &u64));
    CHECK(u64 == 1ull << 40);
    CHECK_OK(pyw__rd_end(&r));
    /* past the end: fails and stays failed, outputs untouched */
    u8 = 99;
    CHECK_ERR(pyw__get_u8(&r, &u8), CAP_EPROTO);
    CHECK_EQ(u8, 99);
    CHECK_ERR(pyw__rd_end(&r), CAP_EPROTO);

    /* a str whose length runs past the body */
    uint8_t bad[8] = {10, 0, 0, 0, 'a', 'b', 'c', 'd'};
    pyw__rd_init(&r, bad, sizeof bad);
    CHECK_ERR(pyw__get_str(&r, &s, &n), CAP_EPROTO);
    /* a partial fixed-size field */
    pyw__rd_init(&r, bad, 3);
    CHECK_ERR(pyw__get_u32(&r, &u32), CAP_EPROTO);
    pyw__rd_init(&r, bad, 7);
    CHECK_ERR(pyw__get_u64(&r, &u64), CAP_EPROTO);

    /* names and pairs: round trip, and an impossible count is rejected before allocating */
    pyw_buf_t l;
    pyw__buf_init(&l);
    pyw__put_u32(&l, 2);
    pyw__put_cstr(&l, "a");
    pyw__put_cstr(&l, "bc");
    pyw__put_u32(&l, 1);
    pyw__put_cstr(&l, "f");
    pyw__put_cstr(&l, "reason");
    char **names, **pairs;
    size_t nn, np;
    pyw__rd_init(&r, l.p, l.len);
    CHECK_OK(pyw__get_names(&r, &names, &nn));
    CHECK_EQ(nn, 2);
    CHECK_STREQ(names[1], "bc");
    CHECK_OK(pyw__get_pairs(&r, &pairs, &np));
    CHECK_EQ(np, 1);
    CHECK_STREQ(pairs[1], "reason");
    CHECK_OK(pyw__rd_end(&r));
    pyw__names_free(names, nn);
    pyw__names_free(pairs, np * 2);
    uint8_t huge[8] = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0};
    pyw__rd_init(&r, huge, sizeof huge);
    CHECK_ERR(pyw__get_names(&r, &names, &nn), CAP_EPROTO);
    /* a list cut short in the middle frees what it had */
    pyw__rd_init(&r, l.p, l.len - 12);
    CHECK_OK(pyw__get_names(&r, &names, &nn));
    pyw__names_free(names, nn);
    CHECK_ERR(pyw__get_pairs(&r, &pairs, &np), CAP_EPROTO);
    pyw__buf_free(&l);
    pyw__buf_free(&b);
}

static void test_wopts(void)
{
    pyw_wopts_t o;
    char buf[512];
    CHECK_OK(pyw__wopts_parse("", &o));
    CHECK_EQ(o.mem, 0);
    CHECK_OK(pyw__wopts_parse("mem=536870912,cpu=2,nofile=64,fsize=1048576,nproc=5,maxframe=4096,"
                              "cgroup=/sys/fs/cgroup/pids/x",
                              &o));
    CHECK(o.mem == 536870912ull);
    CHECK_EQ(o.cpu, 2);
    CHECK_EQ(o.nofile, 64);
    CHECK_EQ(o.fsize, 1048576);
    CHECK_EQ(o.nproc, 5);
    CHECK_EQ(o.max_frame, 4096);
    CHECK_STREQ(o.cgroup, "/sys/fs/cgroup/pids/x");
    pyw_wopts_t o2;
    CHECK_OK(pyw__wopts_format(&o, buf, sizeof buf));
    CHECK_OK(pyw__wopts_parse(buf, &o2));
    CHECK(memcmp(&o, &o2, sizeof o) == 0);
    CHECK_OK(pyw__wopts_parse("mem=18446744073709551615", &o));
    CHECK(o.mem == UINT64_MAX);
    const char *bad[] = {
        "mem",                      /* no '=' */
        "=5",                       /* empty key */
        "mem=",                     /* empty value */
        "mem=-1",                   /* sign */
        "mem=1x",                   /* junk */
        "mem=18446744073709551616", /* overflow */
        "cpu=4294967296",           /* overflow of a 32-bit field */
        "colour=blue",              /* unknown key */
        "cgroup=relative",          /* not absolute */
        "mem=1,,cpu=2",             /* empty item */
        "mem=1,cpu",                /* second item broken */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&o, 0x5a, sizeof o);
        pyw_wopts_t before = o;
        if (pyw__wopts_parse(bad[i], &o) != CAP_EINVAL) {
            fprintf(stderr, "accepted: %s\n", bad[i]);
            CHECK(0);
        }
        CHECK(memcmp(&o, &before, sizeof o) == 0); /* outputs written only on success */
    }
    char longcg[400];
    memset(longcg, 'a', sizeof longcg);
    memcpy(longcg, "cgroup=/", 8);
    longcg[sizeof longcg - 1] = 0;
    CHECK_ERR(pyw__wopts_parse(longcg, &o), CAP_EINVAL);
    CHECK_OK(pyw__wopts_parse("cpu=1", &o));
    CHECK_ERR(pyw__wopts_format(&o, buf, 10), CAP_ETOOBIG);
}

int main(void)
{
    test_frames();
    test_wopts();
    printf("ok\n");
    return 0;
}
