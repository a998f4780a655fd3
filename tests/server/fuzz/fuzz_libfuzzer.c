/*
 * fuzz_libfuzzer.c - the libFuzzer entry point of one target, chosen at compile time by
 * FUZZ_TARGET (FUZZ_HTTP, FUZZ_WS, FUZZ_JSON or FUZZ_WSMSG): fuzz_http, fuzz_ws, fuzz_json,
 * fuzz_wsmsg. Built only with clang (-DCAPSULE_FUZZ=ON, see tests/server/fuzz/CMakeLists.txt); tools/dev.sh fuzz runs
 * each for a bounded time from the seed corpus in tests/server/fuzz/corpus/<target>/.
 */
#include "cap.h"
#include "fuzz_targets.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_init(1);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
    /* split points from the input itself: a crashing input replays exactly */
    fuzz_reseed(cap_hash64(d, n));
    fuzz_run(FUZZ_TARGET, d, n);
    return 0;
}
