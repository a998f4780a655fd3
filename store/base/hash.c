/*
 * hash.c - XXH3-64 for the modules that fingerprint bytes outside the WAL codec (the worker's
 * namespace fingerprints). xxhash.h is included here and in wal/codec.c only.
 */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "cap.h"

uint64_t cap_hash64(const void *data, size_t len)
{
    return XXH3_64bits(data, len);
}
