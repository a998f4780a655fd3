/*
 * test_mutation.c - the codec under 100,000 randomly corrupted frames: bit flips, byte
 * overwrites, random runs, truncations, extensions, swapped header fields, frames spliced from two
 * records. Every one must be rejected (CAP_ECORRUPT) or decode to exactly the original record;
 * nothing may crash (run under ASan+UBSan in CI). Deterministic seed, printed, overridable with
 * WAL_MUTATION_SEED.
 */
#include "check.h"
#include "wal.h"

#include <stdio.h>
#include <stdlib.h>

#define NORIG 64
#define NMUT  100000

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

struct orig {
    wal_rec_t rec;
    wal_field_t fields[8];
    uint8_t key[64];
    uint8_t data[8][300];
    uint64_t seq;
    uint8_t *frame;
    size_t len;
};

static void make_orig(struct orig *o, uint64_t seq)
{
    memset(o, 0, sizeof(*o));
    o->seq = seq;
    size_t kl = rnd() % 40;
    for (size_t i = 0; i < kl; i++)
        o->key[i] = (uint8_t)rnd();
    size_t nf = rnd() % 8;
    for (size_t i = 0; i < nf; i++) {
        size_t dl = rnd() % 300;
        for (size_t j = 0; j < dl; j++)
            o->data[i][j] = (uint8_t)rnd();
        o->fields[i] = (wal_field_t){
            .tag = (uint32_t)rnd(), .u = rnd(), .data = dl ? o->data[i] : NULL, .len = dl};
    }
    o->rec = (wal_rec_t){.kind = (uint8_t)(1 + rnd() % 255),
                         .key = kl ? o->key : NULL,
                         .key_len = kl,
                         .fields = o->fields,
                         .nfields = nf};
    CHECK_OK(wal_frame_encode(&o->rec, seq, &o->frame, &o->len));
}

static void check_same(const struct orig *o, const wal_entry_t *e, int decoded)
{
    CHECK_EQ(e->seq, o->seq);
    CHECK_EQ(e->kind, o->rec.kind);
    CHECK_EQ(e->key_len, o->rec.key_len);
    CHECK(e->key_len == 0 || memcmp(e->key, o->key, e->key_len) == 0);
    CHECK_EQ(e->frame_len, o->len);
    if (!decoded)
        return;
    CHECK_EQ(e->nfields, o->rec.nfields);
    for (size_t i = 0; i < e->nfields; i++) {
        CHECK_EQ(e->fields[i].tag, o->fields[i].tag);
        CHECK(e->fields[i].u == o->fields[i].u);
        CHECK_EQ(e->fields[i].len, o->fields[i].len);
        CHECK(e->fields[i].len == 0 ||
              memcmp(e->fields[i].data, o->fields[i].data, e->fields[i].len) == 0);
    }
}

int main(void)
{
    const char *s = getenv("WAL_MUTATION_SEED");
    uint64_t seed = s ? strtoull(s, NULL, 0) : 0x5eed2026ull;
    rng_state = seed;
    fprintf(stderr, "mutation seed 0x%llx\n", (unsigned long long)seed);

    static struct orig origs[NORIG];
    for (int i = 0; i < NORIG; i++)
        make_orig(&origs[i], 1 + rnd() % 1000000);

    /* the originals decode */
    wal_scratch_t *sc = NULL;
    wal_entry_t e;
    for (int i = 0; i < NORIG; i++) {
        CHECK_OK(wal_frame_decode(origs[i].frame, origs[i].len, 1, &sc, &e));
        check_same(&origs[i], &e, 1);
    }

    size_t cap = 4096;
    uint8_t *buf = cap_malloc(cap);
    uint64_t rejected = 0, identical = 0, kinds[8] = {0};
    for (int m = 0; m < NMUT; m++) {
        struct orig *o = &origs[rnd() % NORIG];
        size_t len = o->len;
        CHECK(len + 512 <= cap);
        memcpy(buf, o->frame, len);
        int kind = (int)(rnd() % 8);
        kinds[kind]++;
        switch (kind) {
        case 0: /* 1..4 bit flips anywhere */
        case 1: {
            int flips = 1 + (int)(rnd() % 4);
            for (int f = 0; f < flips; f++) {
                size_t p = rnd() % len;
                buf[p] ^= (uint8_t)(1u << (rnd() % 8));
            }
            break;
        }
        case 2: /* random byte overwrites in the header */
            for (int f = 0; f < 3; f++)
                buf[rnd() % 32] = (uint8_t)rnd();
            break;
        case 3: { /* a random run */
            size_t p = rnd() % len, n = 1 + rnd() % 64;
            for (size_t i = p; i < len && i < p + n; i++)
                buf[i] = (uint8_t)rnd();
            break;
        }
        case 4: /* truncate */
            len = rnd() % len;
            break;
        case 5: { /* extend with random bytes, and maybe fix body_len to match */
            size_t extra = 1 + rnd() % 256;
            for (size_t i = 0; i < extra; i++)
                buf[len + i] = (uint8_t)rnd();
            len += extra;
            if (rnd() & 1)
                cap_put_le32(buf + 16, cap_get_le32(buf + 16) + (uint32_t)extra);
            break;
        }
        case 6: { /* splice: header of one frame, rest of another */
            struct orig *o2 = &origs[rnd() % NORIG];
            memcpy(buf + 32, o2->frame + 32, o2->len - 32);
            len = o2->len;
            break;
        }
        case 7: /* lengths and key_len rewritten to plausible values */
            cap_put_le32(buf + 16, (uint32_t)(rnd() % (len + 8)));
            buf[6] = (uint8_t)rnd();
            buf[7] = (uint8_t)(rnd() % 3);
            break;
        }
        /* decode from an exact-size heap copy so ASan sees any over-read */
        uint8_t *exact = cap_malloc(len ? len : 1);
        memcpy(exact, buf, len);
        int decode = (int)(rnd() % 4 != 0);
        int rc = wal_frame_decode(exact, len, decode, &sc, &e);
        if (rc == 0) {
            check_same(o, &e, decode);
            identical++;
        } else {
            CHECK_ERR(rc, CAP_ECORRUPT);
            rejected++;
        }
        cap_free(exact);
    }
    fprintf(stderr,
            "%d mutated frames: %llu rejected, %llu decoded to the original (no-op "
            "mutations)\n",
            NMUT, (unsigned long long)rejected, (unsigned long long)identical);
    CHECK_EQ(rejected + identical, NMUT);
    CHECK(rejected > NMUT * 9 / 10);

    /* degenerate inputs */
    CHECK_ERR(wal_frame_decode(NULL, 0, 1, &sc, &e), CAP_ECORRUPT);
    CHECK_ERR(wal_frame_decode(buf, 31, 0, NULL, &e), CAP_ECORRUPT);

    cap_free(buf);
    wal_scratch_free(sc);
    for (int i = 0; i < NORIG; i++)
        cap_free(origs[i].frame);
    fprintf(stderr, "wal.mutation: ok\n");
    return 0;
}
