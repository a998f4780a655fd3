/*
 * fuzz_targets.h - the four fuzz targets over what the server does with network bytes, shared
 * by the standalone driver (test_fuzz.c, any compiler) and the libFuzzer entry points
 * (fuzz_libfuzzer.c, clang): HTTP request parsing, WebSocket framing (with every text message
 * parsed as JSON), JSON parsing + field checking, and capsule-engine's WebSocket messages (JSON
 * parsed, then validated into an action by tools/wsmsg.c, as the server does before the engine
 * is asked). Each target checks the limits hold on every accepted input and aborts (CHECK) when
 * one does not.
 */
#ifndef CAPSULE_FUZZ_TARGETS_H
#define CAPSULE_FUZZ_TARGETS_H

#include <stddef.h>
#include <stdint.h>

#include "srv_int.h"

typedef struct fuzz_counts {
    uint64_t http_done, http_err, ws_text, json_ok, wsmsg_ok;
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
/* A WebSocket text message of capsule-engine: JSON, then wsmsg_parse; the action's invariants. */
void fuzz_wsmsg(const uint8_t *d, size_t n);

enum { FUZZ_HTTP, FUZZ_WS, FUZZ_JSON, FUZZ_WSMSG, FUZZ_NTARGETS };
extern const char *const fuzz_target_names[FUZZ_NTARGETS]; /* "http", "ws", "json", "wsmsg" */
void fuzz_run(int target, const uint8_t *d, size_t n);

#endif
