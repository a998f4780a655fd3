/*
 * iter.c - reading the log: by sequence range, by kind (a scan of wal.log that verifies every
 * frame and skips other kinds), and by key (through the wal.key index, no full scan).
 *
 * Invariants:
 *   - Every frame is verified (wal_format.h's validity rule, including seq == its LMDB key)
 *     before anything of it is returned or filtered on; a damaged frame is reported as
 *     CAP_ECORRUPT with its sequence number, never skipped silently, and the iterator has already
 *     moved past it so the caller may continue.
 *   - By key: the wal.key range of XXH3-64(key) is walked in sequence order; records of another
 *     key with the same hash are skipped after their frame is verified.
 *   - An iterator is one read transaction (a snapshot); it holds the store's growth lock shared
 *     until closed, so keep iterators short-lived when writers are running.
 */
#include "wal_int.h"

#include <stdio.h>
#include <string.h>

struct wal_iter {
    wal_log_t *log;
    struct wal_dbs dbs;
    store_txn_t *txn;
    store_cursor_t *cur;  /* wal.log (scan mode) */
    store_cursor_t *kcur; /* wal.key (key mode) */
    wal_iter_opts_t o;
    void *key; /* copy of o.key */
    int started;
    int tail;         /* key mode: past the index, scanning wal.log after `indexed` */
    uint64_t indexed; /* the snapshot's "indexed" mark */
    uint8_t ikey[16]; /* key mode: the index key XXH3-64(key) || from_seq */
    uint64_t first_stored;
    wal_scratch_t *scratch;
    char err[200];
};

int wal_iter_open(wal_log_t *log, const wal_iter_opts_t *opts, wal_iter_t **out)
{
    wal_iter_t *it;
    store_val_t k, v;
    int rc;

    if (!log || !out)
        return CAP_EINVAL;
    if (opts && (opts->kind < 0 || opts->kind > 255 || opts->key_len > WAL_MAX_KEY ||
                 (opts->key && opts->key_len == 0)))
        return CAP_EINVAL;
    it = cap_calloc(1, sizeof(*it));
    it->log = log;
    it->dbs = wal__log_dbs(log);
    if (opts)
        it->o = *opts;
    if (it->o.key) {
        it->key = cap_memdup(it->o.key, it->o.key_len);
        it->o.key = it->key;
    }
    rc = store_txn_begin(wal_log_env(log), 1, &it->txn);
    if (rc)
        goto fail;
    rc = store_cursor_open(it->txn, it->dbs.log, &it->cur);
    if (rc)
        goto fail;
    rc = store_cursor_get(it->cur, &k, &v, STORE_FIRST);
    if (rc == 0 && k.len == 8)
        it->first_stored = cap_get_be64(k.data);
    else if (rc && rc != CAP_ENOTFOUND)
        goto fail;
    if (it->o.key) {
        rc = wal__meta_u64(it->txn, it->dbs.meta, WAL_META_INDEXED, &it->indexed);
        if (rc)
            goto fail;
        rc = store_cursor_open(it->txn, it->dbs.key, &it->kcur);
        if (rc)
            goto fail;
    }
    *out = it;
    return 0;
fail:
    wal_iter_close(it);
    return rc;
}

void wal_iter_close(wal_iter_t *it)
{
    if (!it)
        return;
    store_cursor_close(it->kcur);
    store_cursor_close(it->cur);
    store_txn_abort(it->txn);
    wal_scratch_free(it->scratch);
    cap_free(it->key);
    cap_free(it);
}

const char *wal_iter_error(const wal_iter_t *it)
{
    return it->err;
}

static int wal__iter_corrupt(wal_iter_t *it, uint64_t seq, const char *why, wal_entry_t *e)
{
    snprintf(it->err, sizeof(it->err), "%s: wal record seq %llu: %s",
             store_env_path(wal_log_env(it->log)), (unsigned long long)seq, why);
    memset(e, 0, sizeof(*e));
    e->seq = seq;
    return CAP_ECORRUPT;
}

/* Verifies (and decodes) the frame stored under seq. */
static int wal__iter_check(wal_iter_t *it, uint64_t seq, store_val_t v, wal_entry_t *e)
{
    const char *why = "damaged frame";
    int rc = wal__frame_decode(v.data, v.len, it->o.decode, &it->scratch, e, &why);
    if (rc == CAP_ECORRUPT)
        return wal__iter_corrupt(it, seq, why, e);
    if (rc)
        return rc;
    if (e->seq != seq)
        return wal__iter_corrupt(it, seq, "frame's sequence number differs from its key", e);
    return 0;
}

static int wal__iter_next_scan(wal_iter_t *it, wal_entry_t *e)
{
    store_val_t k, v;
    uint8_t kb[8];
    int rc;

    for (;;) {
        if (!it->started) {
            it->started = 1;
            if (it->o.from_seq) {
                k = store_key_u64(kb, it->o.from_seq);
                rc = store_cursor_get(it->cur, &k, &v, STORE_SET_RANGE);
            } else {
                rc = store_cursor_get(it->cur, &k, &v, STORE_FIRST);
            }
        } else {
            rc = store_cursor_get(it->cur, &k, &v, STORE_NEXT);
        }
        if (rc)
            return rc;
        if (k.len != 8)
            return wal__iter_corrupt(it, 0, "wal.log key is not 8 bytes", e);
        uint64_t seq = cap_get_be64(k.data);
        if (it->o.to_seq && seq > it->o.to_seq)
            return CAP_ENOTFOUND;
        rc = wal__iter_check(it, seq, v, e);
        if (rc)
            return rc;
        if (it->o.kind && e->kind != it->o.kind)
            continue;
        return 0;
    }
}

static int wal__iter_next_key(wal_iter_t *it, wal_entry_t *e)
{
    store_val_t k, v;
    uint8_t kb[8];
    int rc;

    for (;;) {
        if (!it->started) {
            it->started = 1;
            k = wal__index_key(it->ikey, it->o.key, it->o.key_len, it->o.from_seq);
            rc = store_cursor_get(it->kcur, &k, &v, STORE_SET_RANGE);
        } else {
            rc = store_cursor_get(it->kcur, &k, &v, STORE_NEXT);
        }
        if (rc)
            return rc;
        if (k.len != 16)
            return wal__iter_corrupt(it, 0, "wal.key entry is not 16 bytes", e);
        if (memcmp(k.data, it->ikey, 8) != 0)
            return CAP_ENOTFOUND; /* past this key's range */
        uint64_t seq = cap_get_be64((const uint8_t *)k.data + 8);
        if (seq > it->indexed)
            return CAP_ENOTFOUND; /* an entry past the snapshot's mark: the tail scan has it */
        if (it->o.to_seq && seq > it->o.to_seq)
            return CAP_ENOTFOUND;
        store_val_t lk = store_key_u64(kb, seq), lv;
        rc = store_get(it->txn, it->dbs.log, lk, &lv);
        if (rc == CAP_ENOTFOUND) {
            if (seq < it->first_stored || !it->first_stored)
                continue; /* an index entry of a truncated record */
            return wal__iter_corrupt(it, seq, "indexed by key but missing from wal.log", e);
        }
        if (rc)
            return rc;
        rc = wal__iter_check(it, seq, lv, e);
        if (rc)
            return rc;
        if (e->key_len != it->o.key_len || memcmp(e->key, it->o.key, e->key_len) != 0)
            continue; /* another key with the same hash */
        if (it->o.kind && e->kind != it->o.kind)
            continue;
        return 0;
    }
}

/* Key mode: the index up to the `indexed` mark, then a scan of wal.log after it (bounded by the
 * log's index_lag), keeping the records whose verified frame carries the key. */
static int wal__iter_next_bykey(wal_iter_t *it, wal_entry_t *e)
{
    int rc;
    if (!it->tail) {
        rc = wal__iter_next_key(it, e);
        if (rc != CAP_ENOTFOUND)
            return rc;
        it->tail = 1;
        it->started = 0;
        if (it->o.from_seq <= it->indexed)
            it->o.from_seq = it->indexed + 1;
        if (it->o.to_seq && it->o.to_seq < it->o.from_seq)
            return CAP_ENOTFOUND;
    }
    for (;;) {
        rc = wal__iter_next_scan(it, e);
        if (rc)
            return rc;
        if (e->key_len == it->o.key_len && memcmp(e->key, it->o.key, e->key_len) == 0)
            return 0;
    }
}

int wal_iter_next(wal_iter_t *it, wal_entry_t *e)
{
    it->err[0] = 0;
    return it->kcur ? wal__iter_next_bykey(it, e) : wal__iter_next_scan(it, e);
}
