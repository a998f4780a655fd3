/*
 * test_fuzz.c - a bounded fuzz run over everything capsule_http does with network bytes, with
 * any compiler (the libFuzzer build needs clang: fuzz/fuzz_libfuzzer.c). The targets are in
 * fuzz/fuzz_targets.c: HTTP request parsing (fed in random splits, pipelined), WebSocket framing
 * (frames mutated, fed in random splits, text messages parsed as JSON), JSON parsing + field
 * checking, and capsule-engine's WebSocket message validation (tools/wsmsg.c).
 *
 * usage: test_server_fuzz CORPUS_DIR
 * First every file of CORPUS_DIR/{http,ws,json,wsmsg}/ runs through its target: the seed corpus,
 * which also holds every input that ever crashed a target (regression tests). Then a random +
 * mutation loop (bit flips, byte overwrite/insert/delete, splices between seeds, repeated runs) for
 * CAPSULE_FUZZ_SECONDS (default 8) or CAPSULE_FUZZ_ITERS, whichever ends first; the seed is
 * printed (CAPSULE_FUZZ_SEED replays). CI runs it in the ASan+UBSan build too, where any memory
 * error aborts.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "fuzz_targets.h"

typedef struct buf {
    uint8_t *d;
    size_t n;
    int target;
} buf_t;

static buf_t *corpus;
static size_t ncorpus;

static void add_seed(int target, const void *d, size_t n)
{
    corpus = cap_realloc(corpus, (ncorpus + 1) * sizeof(buf_t));
    corpus[ncorpus].d = cap_memdup(d, n ? n : 1);
    corpus[ncorpus].n = n;
    corpus[ncorpus].target = target;
    ncorpus++;
}

/* Runs every file of dir/<target>/ and keeps it as a seed; returns how many. */
static size_t load_corpus(const char *dir)
{
    size_t total = 0;
    for (int t = 0; t < FUZZ_NTARGETS; t++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, fuzz_target_names[t]);
        DIR *dh = opendir(path);
        CHECK(dh != NULL);
        size_t here = 0;
        for (struct dirent *de; (de = readdir(dh));) {
            if (de->d_name[0] == '.')
                continue;
            char file[8192];
            snprintf(file, sizeof(file), "%s/%s", path, de->d_name);
            FILE *f = fopen(file, "rb");
            CHECK(f != NULL);
            uint8_t *b = cap_malloc(1 << 20);
            size_t n = fread(b, 1, 1 << 20, f);
            fclose(f);
            fuzz_reseed(cap_hash64(b, n)); /* the same splits as the libFuzzer entry point */
            fuzz_run(t, b, n);
            add_seed(t, b, n);
            cap_free(b);
            here++;
        }
        closedir(dh);
        CHECK(here > 0); /* every target has seeds */
        total += here;
    }
    return total;
}

static void mutate(buf_t *b)
{
    int rounds = 1 + (int)fuzz_rnd_below(8);
    for (int r = 0; r < rounds; r++) {
        size_t n = b->n;
        switch (fuzz_rnd_below(7)) {
        case 0: /* bit flip */
            if (n > 0)
                b->d[fuzz_rnd_below(n)] ^= (uint8_t)(1u << fuzz_rnd_below(8));
            break;
        case 1: /* interesting byte */
            if (n > 0) {
                static const uint8_t v[] = {0,   0xff, 0x7f, 0x80, '\r', '\n', ':', '{', '[',
                                            '"', '\\', '%',  ' ',  0x7e, 0x7f, 126, 127};
                b->d[fuzz_rnd_below(n)] = v[fuzz_rnd_below(sizeof(v))];
            }
            break;
        case 2: /* insert random bytes */
        {
            size_t add = 1 + fuzz_rnd_below(16), at = fuzz_rnd_below(n + 1);
            b->d = cap_realloc(b->d, n + add);
            memmove(b->d + at + add, b->d + at, n - at);
            for (size_t i = 0; i < add; i++)
                b->d[at + i] = (uint8_t)fuzz_rnd();
            b->n += add;
            break;
        }
        case 3: /* delete a range */
            if (n > 1) {
                size_t at = fuzz_rnd_below(n), del = 1 + fuzz_rnd_below(n - at);
                memmove(b->d + at, b->d + at + del, n - at - del);
                b->n -= del;
            }
            break;
        case 4: /* splice a piece of another seed */
        {
            const buf_t *o = &corpus[fuzz_rnd_below(ncorpus)];
            if (o->n > 0) {
                size_t from = fuzz_rnd_below(o->n), len = 1 + fuzz_rnd_below(o->n - from);
                size_t at = fuzz_rnd_below(n + 1);
                b->d = cap_realloc(b->d, n + len);
                memmove(b->d + at + len, b->d + at, n - at);
                memcpy(b->d + at, o->d + from, len);
                b->n += len;
            }
            break;
        }
        case 5: /* duplicate a range (repeated headers, frames) */
            if (n > 1 && n < 1 << 16) {
                size_t at = fuzz_rnd_below(n), len = 1 + fuzz_rnd_below(n - at);
                b->d = cap_realloc(b->d, n + len);
                memcpy(b->d + n, b->d + at, len);
                b->n += len;
            }
            break;
        default: /* truncate */
            if (n > 1)
                b->n = fuzz_rnd_below(n);
            break;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
        return 2;
    }
    const char *e = getenv("CAPSULE_FUZZ_SEED");
    uint64_t seed = e ? strtoull(e, NULL, 0) : ((uint64_t)time(NULL) * 2654435761u) | 1;
    fuzz_init(seed);
    size_t nfiles = load_corpus(argv[1]);
    fuzz_reseed(seed);
    double secs = getenv("CAPSULE_FUZZ_SECONDS") ? atof(getenv("CAPSULE_FUZZ_SECONDS")) : 8.0;
    uint64_t iters =
        getenv("CAPSULE_FUZZ_ITERS") ? strtoull(getenv("CAPSULE_FUZZ_ITERS"), NULL, 0) : UINT64_MAX;
    fprintf(stderr, "fuzz: %zu corpus files ran; seed %llu, %.1f s\n", nfiles,
            (unsigned long long)seed, secs);
    uint64_t t_end = cap_now_ns() + (uint64_t)(secs * 1e9), i = 0;
    for (; i < iters && (i % 256 || cap_now_ns() < t_end); i++) {
        buf_t b;
        if (fuzz_rnd_below(16) == 0) { /* pure random, any target */
            b.n = 1 + fuzz_rnd_below(512);
            b.d = cap_malloc(b.n);
            for (size_t k = 0; k < b.n; k++)
                b.d[k] = (uint8_t)fuzz_rnd();
            b.target = (int)fuzz_rnd_below(FUZZ_NTARGETS);
        } else {
            const buf_t *s = &corpus[fuzz_rnd_below(ncorpus)];
            b.d = cap_memdup(s->d, s->n ? s->n : 1);
            b.n = s->n;
            b.target = s->target;
            mutate(&b);
        }
        fuzz_run(b.target, b.d, b.n);
        /* Keep some mutants as new seeds, so mutations stack (bounded corpus). */
        if (ncorpus < 512 && fuzz_rnd_below(64) == 0)
            add_seed(b.target, b.d, b.n);
        cap_free(b.d);
    }
    fprintf(stderr,
            "fuzz: %llu inputs; http requests parsed %llu, refused %llu; ws text %llu; json ok "
            "%llu; engine ws messages accepted %llu\n",
            (unsigned long long)i, (unsigned long long)fuzz_counts.http_done,
            (unsigned long long)fuzz_counts.http_err, (unsigned long long)fuzz_counts.ws_text,
            (unsigned long long)fuzz_counts.json_ok, (unsigned long long)fuzz_counts.wsmsg_ok);
    /* The run must have reached each target's accepting paths, or it fuzzed nothing useful. */
    CHECK(fuzz_counts.http_done > 0 && fuzz_counts.http_err > 0 && fuzz_counts.ws_text > 0 &&
          fuzz_counts.json_ok > 0 && fuzz_counts.wsmsg_ok > 0);
    for (size_t k = 0; k < ncorpus; k++)
        cap_free(corpus[k].d);
    cap_free(corpus);
    return 0;
}
