/*
 * store.h - the LMDB wrapper. store/ is the only code in capsule that includes lmdb.h.
 *
 * One store_env_t per data directory per process (LMDB's rule: never open the same environment
 * twice in one process, never use an env across fork()). Named databases ("dbi") are opened once,
 * in a write transaction, and stay valid until the env closes.
 *
 * Threads: the env is opened with MDB_NOTLS, so a read transaction may be used from any one thread
 * at a time. At most one write transaction exists at a time (LMDB serialises them; a second
 * store_txn_begin(write) blocks until the first ends).
 *
 * Map growth: when a write hits MDB_MAP_FULL, the write is aborted, the map is grown (doubled,
 * bounded by store_env_opts_t.max_map_size) and the write re-run. store_env_write() does this for
 * you: write all mutations through it. Growing waits until no transaction of this process is open.
 *
 * Returned data (store_val_t from get/cursor) points into the map and stays valid only until the
 * transaction ends or the next write in it; copy what you keep.
 */
#ifndef STORE_H
#define STORE_H

#include <stddef.h>
#include <stdint.h>

#include "cap.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct store_env store_env_t;
typedef struct store_txn store_txn_t;
typedef struct store_cursor store_cursor_t;
typedef unsigned int store_dbi_t;

typedef struct store_val {
    const void *data;
    size_t len;
} store_val_t;

typedef struct store_env_opts {
    size_t map_size;     /* initial map size in bytes; 0 = 1 GiB */
    size_t max_map_size; /* growth stops here (CAP_EMAPFULL); 0 = 1 TiB */
    unsigned max_dbs;    /* named databases; 0 = 32 */
    int nosync;          /* 1: commits do not fsync (MDB_NOSYNC); call store_env_sync() */
    int readonly;        /* 1: open read-only (tools); writes fail with CAP_EINVAL */
} store_env_opts_t;

/* Opens (creating if needed) the environment in directory `dir` (created if missing, mode 0700).
 * Clears stale reader slots left by dead processes. Errors: -errno, CAP_ECORRUPT (the data file is
 * not a valid LMDB environment; the message names the file), CAP_EVERSION. */
int store_env_open(const char *dir, const store_env_opts_t *opts, store_env_t **out);
void store_env_close(store_env_t *env); /* NULL is a no-op; no transaction may be open */
int store_env_sync(store_env_t *env);   /* fsync now (for nosync mode) */
const char *store_env_path(const store_env_t *env); /* borrowed; valid until close */
/* Current map size, and bytes in use (last page * page size). */
int store_env_info(store_env_t *env, size_t *map_size, size_t *used);
/* How the env was opened: 1 if with opts.nosync / opts.readonly, else 0. Any thread. */
int store_env_nosync(const store_env_t *env);
int store_env_readonly(const store_env_t *env);
/* Largest key (and DUPSORT value) the env accepts, in bytes (LMDB's compile-time limit, 511). */
size_t store_env_max_key(const store_env_t *env);
/* Times the map has been grown by this process since open (for tests and stats). */
uint64_t store_env_grow_count(const store_env_t *env);
/* Reader slots of dead processes cleared when this env was opened (for tests and logs). */
int store_env_stale_readers(const store_env_t *env);

/* ---- checkpoints (the journal's partner: see ARCHITECTURE.md, "store/: checkpoints") ----
 *
 * A journaled writer (the wal in WAL_SYNC) makes records durable in its own journal and commits
 * LMDB without a flush (store_env_set_deferred). store.ckpt in the data directory then says which
 * LMDB snapshot is known to be on disk: two alternating 16 KiB slots, each {magic, counter, txnid,
 * page size, flags, boot id, a 32-byte area owned by the caller, the raw bytes of data.mdb's two
 * meta pages, XXH3-64}; the valid slot with the highest counter wins. While a checkpoint is
 * current, the env holds a read transaction on its snapshot, so LMDB never reuses a page of it.
 *
 * store_env_open (not read-only) with a store.ckpt present: if its newest slot is not marked
 * clean and was written under another boot id (a power loss, or CAPSULE_TEST_BOOT_ID in tests),
 * the saved meta pages are written back into data.mdb before LMDB opens it (a WARNING says so):
 * LMDB then opens at the checkpoint's snapshot, whose pages the pin kept intact. Then (restored
 * or not) the env checkpoints at once, keeping the caller's area. Both slots damaged:
 * CAP_ECORRUPT, the message names the file. Read-only opens only read store.ckpt (for
 * store_env_ckpt_user), never restore or write. */
#define STORE_CKPT_USER 32

/* Syncs data.mdb (forced), saves its meta pages, the LMDB txnid, the boot id and `user` (NULL:
 * keep the current area, zeros when none) into the older slot of store.ckpt (created with its
 * directory entry synced when missing), fdatasyncs it, then moves the pin to this snapshot.
 * clean = 1: the env is in synced mode and nothing written later needs a restore (the pin is
 * released). Serialised with writers (it holds a write transaction). Not on a read-only env. */
int store_env_checkpoint(store_env_t *env, const uint8_t *user, int clean);
/* The same checkpoint in two steps, so that commits go on while data.mdb is flushed.
 * store_env_ckpt_begin captures the snapshot committed now, under a brief write transaction (no
 * flush: data.mdb's meta pages are read from the page cache), and opens a read transaction on it,
 * which from then on keeps LMDB from reusing any of its pages. store_env_ckpt_finish (any
 * thread, while others commit) syncs data.mdb (forced), writes and fdatasyncs the slot, then
 * makes that read transaction the pin and releases the previous one; it frees ck, also on error
 * (the previous checkpoint then stays in force). `user` is saved as with store_env_checkpoint.
 * At most one checkpoint of an env at a time: no store_env_checkpoint, ckpt_remove,
 * set_deferred or close between begin and finish. Not on a read-only or nosync env. */
typedef struct store_ckpt store_ckpt_t;
int store_env_ckpt_begin(store_env_t *env, const uint8_t *user, store_ckpt_t **ck);
int store_env_ckpt_finish(store_ckpt_t *ck);
/* The caller area of the current checkpoint: 0, CAP_ENOTFOUND when the env has no store.ckpt.
 * On a read-only env: the newest valid slot as found at open (read only). */
int store_env_ckpt_user(store_env_t *env, uint8_t user[STORE_CKPT_USER]);
/* Removes store.ckpt (after syncing data.mdb) and releases the pin: the env is back to LMDB's
 * own durability. For a WAL_NOSYNC log, which keeps no journal. */
int store_env_ckpt_remove(store_env_t *env);
/* on = 1: commits no longer flush (MDB_NOSYNC) - only for a writer whose own journal makes its
 * commits durable and which checkpoints; on = 0: back to the mode the env was opened with. */
int store_env_set_deferred(store_env_t *env, int on);

/* Database flags for store_dbi_open. */
enum {
    STORE_DB_CREATE = 1 << 0, /* create if missing (needs a write txn) */
    STORE_DB_DUPSORT = 1 << 1 /* sorted duplicate values per key */
};
/* Opens a named database inside `txn` (a write txn when creating). The handle stays valid for
 * the life of the env once txn commits. */
int store_dbi_open(store_txn_t *txn, const char *name, unsigned flags, store_dbi_t *out);
/* Number of entries in a database. */
int store_dbi_count(store_txn_t *txn, store_dbi_t dbi, uint64_t *out);

/* Transactions. A read txn: store_txn_begin(env, 1, &t). */
int store_txn_begin(store_env_t *env, int readonly, store_txn_t **out);
int store_txn_commit(store_txn_t *txn); /* frees txn whatever the result */
void store_txn_abort(store_txn_t *txn); /* frees txn; NULL is a no-op */
store_env_t *store_txn_env(store_txn_t *txn);

/* Runs fn(txn, arg) in a write transaction and commits it. If fn or the commit hits a full map,
 * aborts, grows the map and runs fn again (fn must therefore be re-runnable: no side effects
 * outside the txn). fn returning non-zero aborts the txn and that value is returned. */
typedef int (*store_write_fn)(store_txn_t *txn, void *arg);
int store_env_write(store_env_t *env, store_write_fn fn, void *arg);

/* Put flags. */
enum {
    STORE_PUT_APPEND = 1 << 0,     /* key sorts after every existing key (MDB_APPEND) */
    STORE_PUT_NOOVERWRITE = 1 << 1 /* fail with CAP_EEXIST if the key exists */
};
int store_put(store_txn_t *txn, store_dbi_t dbi, store_val_t key, store_val_t val, unsigned flags);
int store_get(store_txn_t *txn, store_dbi_t dbi, store_val_t key, store_val_t *val);
/* Deletes key (with val.data NULL: all its values; for DUPSORT with val: that value).
 * CAP_ENOTFOUND if absent. */
int store_del(store_txn_t *txn, store_dbi_t dbi, store_val_t key, const store_val_t *val);

/* Cursors: positioned by an op, then stepped. Return 0 with key/val set, CAP_ENOTFOUND at the end
 * (or when nothing matches), or an error. */
typedef enum {
    STORE_FIRST,
    STORE_LAST,
    STORE_NEXT,
    STORE_PREV,
    STORE_SET_RANGE, /* first key >= key */
    STORE_SET_KEY,   /* exactly key */
    STORE_GET_CURRENT,
    STORE_NEXT_DUP,
    STORE_NEXT_NODUP,
    STORE_GET_BOTH_RANGE /* DUPSORT: exactly key, first value >= val (both inputs) */
} store_cursor_op_t;
int store_cursor_open(store_txn_t *txn, store_dbi_t dbi, store_cursor_t **out);
int store_cursor_get(store_cursor_t *cur, store_val_t *key, store_val_t *val, store_cursor_op_t op);
int store_cursor_del(store_cursor_t *cur);    /* deletes the current entry */
void store_cursor_close(store_cursor_t *cur); /* before its txn ends; NULL is a no-op */

/* Big-endian u64 keys sort numerically: use them for sequence numbers with STORE_PUT_APPEND. */
static inline store_val_t store_key_u64(uint8_t buf[8], uint64_t v)
{
    cap_put_be64(buf, v);
    store_val_t k = {buf, 8};
    return k;
}

#ifdef __cplusplus
}
#endif
#endif /* STORE_H */
