/*
 * bench.c - the shared benchmark helpers declared in bench.h: samples, percentiles, medians with
 * their spread, the figure JSON line, raw sample files for bench/run's plots, scratch directories.
 */
#define _XOPEN_SOURCE 700
#include "bench.h"

#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cap.h"

static const char *bench_name = "?";

void bench_lat_add(bench_lat_t *l, uint64_t x)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 4096;
        l->v = cap_realloc(l->v, l->cap * sizeof(*l->v));
    }
    l->v[l->n++] = x;
}

double bench_lat_pct(bench_lat_t *l, double p)
{
    return bench_pct_u64(l->v, l->n, p);
}

void bench_lat_free(bench_lat_t *l)
{
    cap_free(l->v);
    memset(l, 0, sizeof(*l));
}

void bench_lat_merge(bench_lat_t *dst, bench_lat_t *src)
{
    for (size_t k = 0; k < src->n; k++)
        bench_lat_add(dst, src->v[k]);
    bench_lat_free(src);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double bench_pct_u64(uint64_t *v, size_t n, double p)
{
    if (!n)
        return 0;
    qsort(v, n, sizeof(*v), cmp_u64);
    return (double)v[(size_t)(p * (double)(n - 1) + 0.5)];
}

double bench_median(double *v, size_t n, double *lo, double *hi)
{
    if (!n) {
        if (lo)
            *lo = 0;
        if (hi)
            *hi = 0;
        return 0;
    }
    qsort(v, n, sizeof(*v), cmp_d);
    if (lo)
        *lo = v[0];
    if (hi)
        *hi = v[n - 1];
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

double bench_secs_since(uint64_t t0)
{
    return (double)(cap_now_ns() - t0) / 1e9;
}

int bench_quick_arg(int argc, char **argv)
{
    if (argc == 1)
        return 0;
    if (argc == 2 && strcmp(argv[1], "--quick") == 0)
        return 1;
    if (argc == 2 && strcmp(argv[1], "--help") == 0) {
        printf("usage: %s [--quick]\n", argv[0]);
        exit(0);
    }
    fprintf(stderr, "usage: %s [--quick] (unknown argument: %s)\n", argv[0],
            argv[argc > 2 && strcmp(argv[1], "--quick") == 0 ? 2 : 1]);
    exit(64);
}

void bench_begin(const char *name)
{
    bench_name = name;
}

/* JSON string body: the names are ours, but a quote or backslash must not break the line */
static void put_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            putchar('\\');
        if ((unsigned char)*s >= 0x20)
            putchar(*s);
    }
    putchar('"');
}

void bench_emit(const char *metric, double value, const char *unit, const char *peer,
                double peer_value, double goal, int flags)
{
    int lower = flags & BENCH_LOWER, on_ratio = flags & BENCH_GOAL_RATIO;
    int has_ratio = peer && peer_value > 0;
    double ratio = has_ratio ? value / peer_value : 0;
    fputs("{\"bench\":", stdout);
    put_str(bench_name);
    fputs(",\"metric\":", stdout);
    put_str(metric);
    printf(",\"value\":%.9g,\"unit\":", value);
    put_str(unit);
    fputs(",\"peer\":", stdout);
    if (peer) {
        put_str(peer);
        printf(",\"peer_value\":%.9g,", peer_value);
    } else {
        fputs("null,\"peer_value\":null,", stdout);
    }
    if (has_ratio)
        printf("\"ratio\":%.9g,", ratio);
    else
        fputs("\"ratio\":null,", stdout);
    if (goal > 0 && (!on_ratio || has_ratio)) {
        double x = on_ratio ? ratio : value;
        printf("\"goal\":%.9g,\"met\":%s,", goal,
               (lower ? x <= goal : x >= goal) ? "true" : "false");
    } else if (goal > 0) {
        printf("\"goal\":%.9g,\"met\":null,", goal); /* a goal on the ratio with no peer value */
    } else {
        fputs("\"goal\":null,\"met\":null,", stdout);
    }
    printf("\"better\":\"%s\",\"goal_on\":\"%s\"}\n", lower ? "lower" : "higher",
           on_ratio ? "ratio" : "value");
    fflush(stdout);
}

int bench_samples_save(const char *name, const uint64_t *v, size_t n, double div)
{
    const char *dir = getenv("CAPSULE_BENCH_SAMPLES");
    if (!dir || !*dir)
        return 0;
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s.%s.txt", dir, bench_name, name);
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%.9g\n", (double)v[i] / div);
    if (fclose(f) != 0)
        return -errno;
    return 0;
}

static int rm_one(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(p);
}

void bench_rmtree(const char *dir)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

void bench_fresh_dir(char *out, size_t n, const char *base, const char *tag)
{
    snprintf(out, n, "%s/%s", base, tag);
    bench_rmtree(out);
    if (mkdir(out, 0700) != 0) {
        fprintf(stderr, "bench_%s: cannot create %s: %s\n", bench_name, out, strerror(errno));
        exit(1);
    }
}
