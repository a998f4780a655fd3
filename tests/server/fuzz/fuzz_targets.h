/*
 * fuzz_targets.h - the three fuzz targets over what capsule_http does with network bytes, shared
 * by the standalone driver (test_fuzz.c, any compiler) and the libFuzzer entry points
 * (fuzz_libfuzzer.c, clang): HTTP request parsing, WebSocket framing (with every text message
 * parsed as JSON), JSON parsing + field checking. Each target checks the limits hold on every
 * accepted input and aborts (CHECK) when one does not.
 */
#ifndef CAPSULE_FUZZ_TARGETS_H
#define CAPSULE_FUZZ_TARGETS_H

#include <stddef.h>
#include <stdint.h>

#include "srv_int.h"

typedef struct fuzz_counts {
    uint64_t http_done, http_err, ws_text, json_ok;
} fuzz_counts_t;

extern fuzz_counts_t fuzz_counts;
extern srv_limits_t fuzz_lim;

/* Small limits (so inputs reach every limit path) and the split-point generator's state. */
void fuzz_init(uint64_t seed);
void fuzz_reseed(uint64_t seed);
uint64_t fuzz_rnd(void);
size_t fuzz_rnd_below(size_t n);

/* The bytes are fed in random splits (fuzz_rnd), pipelined requests one after the other. */
void fuzz_http(const uint8_t *d, size_t n);
/* Client frames, in random splits; text messages go through fuzz_json and are answered. */
void fuzz_ws(const uint8_t *d, size_t n);
void fuzz_json(const uint8_t *d, size_t n);

enum { FUZZ_HTTP, FUZZ_WS, FUZZ_JSON, FUZZ_NTARGETS };
extern const char *const fuzz_target_names[FUZZ_NTARGETS]; /* "http", "ws", "json" */
void fuzz_run(int target, const uint8_t *d, size_t n);

#endif
