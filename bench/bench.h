/*
 * bench.h - the helpers every C benchmark shares (library capsule_bench, bench/bench.c).
 *
 * A benchmark is an executable build/bin/bench_NAME. It prints a human table on stderr and one
 * JSON object per figure on stdout (bench_emit); bench/run runs it R times, takes the median of
 * each figure over the runs, and the median of the per-run ratios (pair by pair: the capsule value
 * and the peer value of one run were measured side by side in that run).
 *
 * The figure line (stable; bench/run and bench/results.jsonl depend on it):
 *   {"bench":..., "metric":..., "value":..., "unit":..., "peer":..., "peer_value":...,
 *    "ratio":..., "goal":..., "met":..., "better":"lower"|"higher", "goal_on":"value"|"ratio"}
 * peer, peer_value and ratio are null when there is no peer; goal and met are null when there is
 * no goal. ratio = value / peer_value. "better" and "goal_on" let bench/run judge the goal again on
 * the median over runs.
 *
 * Percentiles are nearest rank: the element at index round(p * (n - 1)) of the sorted samples.
 * Raw samples for plots: bench_samples_save writes them when bench/run asks for them
 * (environment CAPSULE_BENCH_SAMPLES = a directory); otherwise it does nothing.
 */
#ifndef CAPSULE_BENCH_H
#define CAPSULE_BENCH_H

#include <stddef.h>
#include <stdint.h>

/* ---- samples and percentiles ---- */

/* A growing vector of samples (nanoseconds, or any unit the caller keeps). Zero-initialise. */
typedef struct bench_lat {
    uint64_t *v;
    size_t n, cap;
} bench_lat_t;

void bench_lat_add(bench_lat_t *l, uint64_t x);
/* The p-th percentile (0..1) of l, in l's unit; sorts l->v in place; 0 when l is empty. */
double bench_lat_pct(bench_lat_t *l, double p);
void bench_lat_free(bench_lat_t *l);
/* Appends every sample of src to dst, then frees src (merging per-thread samples). */
void bench_lat_merge(bench_lat_t *dst, bench_lat_t *src);

/* The p-th percentile (0..1) of v[0..n); sorts v in place; 0 when n is 0. */
double bench_pct_u64(uint64_t *v, size_t n, double p);
/* The median of v[0..n) (mean of the two middle values when n is even); sorts v; 0 when n is 0.
 * lo/hi (either may be NULL) get the minimum and maximum: the spread over runs. */
double bench_median(double *v, size_t n, double *lo, double *hi);

/* Seconds since t0 (a cap_now_ns() value). */
double bench_secs_since(uint64_t t0);

/* ---- figure output ---- */

/* bench_emit flags */
#define BENCH_HIGHER     0 /* a higher value is better (goal: value >= goal) */
#define BENCH_LOWER      1 /* a lower value is better (goal: value <= goal) */
#define BENCH_GOAL_RATIO 2 /* the goal applies to value / peer_value, not to value */

/* Names the benchmark ("engine", "wal", ...) for the "bench" key of every figure. Call first. */
void bench_begin(const char *name);
/* The arguments of a bench that takes only --quick: 1 with --quick, 0 with none; --help prints
 * the usage and exits 0, anything else prints it and exits 64. */
int bench_quick_arg(int argc, char **argv);

/* Prints one figure line on stdout (and flushes). peer NULL: no peer (peer_value ignored);
 * goal <= 0: no goal. The ratio is value / peer_value (null when peer_value is not > 0). */
void bench_emit(const char *metric, double value, const char *unit, const char *peer,
                double peer_value, double goal, int flags);

/* Writes the samples v[0..n), each divided by div (e.g. 1e3 for ns -> us), one per line, to
 * $CAPSULE_BENCH_SAMPLES/<bench>.<name>.txt, when that variable is set; returns 0, or -errno when
 * the file cannot be written (the benchmark reports it and goes on). */
int bench_samples_save(const char *name, const uint64_t *v, size_t n, double div);

/* ---- scratch directories ---- */

/* Removes dir and everything below it (no error when it does not exist). */
void bench_rmtree(const char *dir);
/* out = "base/tag", emptied and created (mode 0700); exits with a message when it cannot. */
void bench_fresh_dir(char *out, size_t n, const char *base, const char *tag);

#endif
