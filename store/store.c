/*
 * store.c - the LMDB wrapper (see store.h). The only file in capsule that includes lmdb.h.
 *
 * Invariants:
 *   - Every MDB_* / errno result is translated here (store__err) into -errno or CAP_E*, and every
 *     unexpected one is logged with the env's path.
 *   - A transaction of this process holds env->grow_lock shared from begin to commit/abort;
 *     growing the map (mdb_env_set_mapsize) holds it exclusively, so LMDB's rule "no transaction
 *     open in this process while resizing" always holds.
 *   - The map only grows: store_env_write doubles it (up to max_map_size) on MDB_MAP_FULL and
 *     re-runs the write; MDB_MAP_RESIZED (another process grew it) adopts the new size.
 */
#define _GNU_SOURCE
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <stdlib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define STORE_DEFAULT_MAP     ((size_t)1 << 30)
#define STORE_DEFAULT_MAX_MAP ((size_t)1 << 40)
#define STORE_DEFAULT_DBS     32u

struct store_env {
    MDB_env *env;
    char *path;
    size_t map_size;     /* current map size (changed only under grow_lock exclusive) */
    size_t max_map_size; /* growth ceiling */
    int nosync;
    int readonly;
    pthread_rwlock_t grow_lock;
    _Atomic uint64_t grows;
    int stale_readers; /* cleared at open */

    /* checkpoints (store.ckpt); changed under a write txn or ckpt_mu */
    int have_ckpt;  /* store.ckpt exists and is ours */
    int ckpt_clean; /* the newest slot is marked clean */
    int ckpt_fd;    /* -1 until the first checkpoint of this open */
    int ckpt_slot;  /* slot of the newest valid checkpoint */
    uint64_t ckpt_counter;
    uint8_t ckpt_user[STORE_CKPT_USER];
    int deferred;            /* MDB_NOSYNC set by store_env_set_deferred */
    MDB_txn *pin;            /* read txn on the checkpoint's snapshot, or NULL */
    pthread_mutex_t ckpt_mu; /* the fields above from have_ckpt on, once a checkpoint completes
                              * outside a write txn (store_env_ckpt_finish) */
};

struct store_txn {
    store_env_t *env;
    MDB_txn *txn;
    int readonly;
};

struct store_cursor {
    MDB_cursor *cur;
    store_env_t *env;
};

/* Translates an LMDB (or errno) result into the project's codes, logging the unexpected ones. */
static int store__err(const store_env_t *env, int rc, const char *what)
{
    const char *path = env && env->path ? env->path : "?";
    switch (rc) {
    case MDB_SUCCESS:
        return 0;
    case MDB_NOTFOUND:
        return CAP_ENOTFOUND;
    case MDB_KEYEXIST:
        return CAP_EEXIST;
    case MDB_MAP_FULL:
        return CAP_EMAPFULL;
    case MDB_INVALID:
        cap_log(CAP_LOG_ERROR, "store", "%s: %s/data.mdb is not an LMDB file (or is truncated)",
                what, path);
        return CAP_ECORRUPT;
    case MDB_VERSION_MISMATCH:
        cap_log(CAP_LOG_ERROR, "store", "%s: %s was written by another LMDB version", what, path);
        return CAP_EVERSION;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
        cap_log(CAP_LOG_ERROR, "store", "%s: %s/data.mdb is corrupted: %s", what, path,
                mdb_strerror(rc));
        return CAP_ECORRUPT;
    case MDB_INCOMPATIBLE:
        cap_log(CAP_LOG_ERROR, "store", "%s: %s: database opened with incompatible flags", what,
                path);
        return CAP_ECORRUPT;
    case MDB_BAD_VALSIZE:
        return CAP_ETOOBIG;
    case MDB_DBS_FULL:
    case MDB_READERS_FULL:
    case MDB_TXN_FULL:
    case MDB_CURSOR_FULL:
    case MDB_PAGE_FULL:
        cap_log(CAP_LOG_ERROR, "store", "%s: %s: %s", what, path, mdb_strerror(rc));
        return CAP_ELIMIT;
    default:
        if (rc > 0) { /* an errno value */
            cap_log(CAP_LOG_ERROR, "store", "%s: %s: %s", what, path, strerror(rc));
            return -rc;
        }
        cap_log(CAP_LOG_ERROR, "store", "%s: %s: %s", what, path, mdb_strerror(rc));
        return CAP_ESTORE;
    }
}

static int store__ckpt_load(store_env_t *env, uint8_t *slot_out);
static int store__ckpt_restore(store_env_t *env, const uint8_t *slot, const char *now_boot);
static void store__boot_id(char out[48]);

static int store__mkdir(const char *dir)
{
    struct stat st;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        int err = -errno;
        cap_log(CAP_LOG_ERROR, "store", "cannot create data directory %s: %s", dir, strerror(-err));
        return err;
    }
    if (stat(dir, &st) != 0) {
        int err = -errno;
        cap_log(CAP_LOG_ERROR, "store", "cannot stat data directory %s: %s", dir, strerror(-err));
        return err;
    }
    if (!S_ISDIR(st.st_mode)) {
        cap_log(CAP_LOG_ERROR, "store", "data directory %s is not a directory", dir);
        return -ENOTDIR;
    }
    return 0;
}

int store_env_open(const char *dir, const store_env_opts_t *opts, store_env_t **out)
{
    store_env_opts_t o = {0};
    store_env_t *e = NULL;
    int rc, dead = 0;

    if (!dir || !*dir || !out)
        return CAP_EINVAL;
    if (opts)
        o = *opts;
    if (!o.map_size)
        o.map_size = STORE_DEFAULT_MAP;
    if (!o.max_map_size)
        o.max_map_size = STORE_DEFAULT_MAX_MAP;
    if (o.max_map_size < o.map_size)
        o.max_map_size = o.map_size;
    if (!o.max_dbs)
        o.max_dbs = STORE_DEFAULT_DBS;

    if (!o.readonly) {
        rc = store__mkdir(dir);
        if (rc)
            return rc;
    }

    e = cap_calloc(1, sizeof(*e));
    e->path = cap_strdup(dir);
    e->map_size = o.map_size;
    e->max_map_size = o.max_map_size;
    e->nosync = o.nosync ? 1 : 0;
    e->readonly = o.readonly ? 1 : 0;
    pthread_rwlock_init(&e->grow_lock, NULL);
    pthread_mutex_init(&e->ckpt_mu, NULL);
    e->ckpt_fd = -1;
    e->ckpt_slot = 1;

    if (!o.readonly) {
        /* A checkpoint left unclean under another boot id: the machine went down while commits
         * were not flushed; put back the meta pages of the last snapshot known on disk. */
        uint8_t *slot = cap_malloc(16384);
        rc = store__ckpt_load(e, slot);
        if (rc == 0 && e->have_ckpt && !e->ckpt_clean) {
            char boot[48];
            store__boot_id(boot);
            if (!boot[0] || strncmp(boot, (const char *)slot + 32, sizeof boot) != 0)
                rc = store__ckpt_restore(e, slot, boot);
        }
        cap_free(slot);
        if (rc)
            goto out;
    } else {
        /* read-only: only to report the checkpoint's caller area; never restores or writes */
        uint8_t *slot = cap_malloc(16384);
        if (store__ckpt_load(e, slot) != 0)
            e->have_ckpt = 0;
        cap_free(slot);
    }

    rc = mdb_env_create(&e->env);
    if (rc) {
        rc = store__err(e, rc, "mdb_env_create");
        goto out;
    }
    if ((rc = mdb_env_set_maxdbs(e->env, o.max_dbs)) != 0 ||
        (rc = mdb_env_set_mapsize(e->env, o.map_size)) != 0 ||
        (rc = mdb_env_set_maxreaders(e->env, 256)) != 0) {
        rc = store__err(e, rc, "configuring the environment");
        goto out;
    }
    unsigned flags = MDB_NOTLS;
    /* nosync: commits write into the shared map instead of malloc'ed page copies written out by
     * pwrite at commit (the same copy-on-write, the meta page still the commit point; a kill -9
     * keeps what the page cache holds either way). Not with the sync journal's checkpoints. */
    if (o.nosync && !o.readonly)
        flags |= MDB_NOSYNC | MDB_WRITEMAP;
    else if (o.nosync)
        flags |= MDB_NOSYNC;
    if (o.readonly)
        flags |= MDB_RDONLY;
    rc = mdb_env_open(e->env, dir, flags, 0600);
    if (rc) {
        if (rc == ENOENT && o.readonly)
            cap_log(CAP_LOG_ERROR, "store", "%s holds no LMDB environment (data.mdb missing)", dir);
        rc = store__err(e, rc, "opening the environment");
        goto out;
    }
    /* Adopt the size recorded in the file if it is larger than ours. */
    MDB_envinfo info;
    if (mdb_env_info(e->env, &info) == 0 && info.me_mapsize > e->map_size)
        e->map_size = info.me_mapsize;
    rc = mdb_reader_check(e->env, &dead);
    if (rc) {
        rc = store__err(e, rc, "clearing stale readers");
        goto out;
    }
    if (dead)
        cap_log(CAP_LOG_INFO, "store", "%s: cleared %d stale reader slot(s)", dir, dead);
    e->stale_readers = dead;
    if (e->have_ckpt && !o.readonly) {
        /* Whatever this process writes next, the snapshot now on disk is the fallback. */
        rc = store_env_checkpoint(e, NULL, 0);
        if (rc)
            goto out;
    }
    *out = e;
    e = NULL;
    rc = 0;
out:
    if (e) {
        if (e->pin)
            mdb_txn_abort(e->pin);
        if (e->ckpt_fd >= 0)
            close(e->ckpt_fd);
        if (e->env)
            mdb_env_close(e->env);
        pthread_rwlock_destroy(&e->grow_lock);
        pthread_mutex_destroy(&e->ckpt_mu);
        cap_free(e->path);
        cap_free(e);
    }
    return rc;
}

void store_env_close(store_env_t *env)
{
    if (!env)
        return;
    if (!env->readonly && env->have_ckpt && !env->ckpt_clean) {
        /* back to LMDB's own flushing, and a final clean checkpoint: no restore needed */
        int rc = store_env_set_deferred(env, 0);
        if (rc == 0)
            rc = store_env_checkpoint(env, NULL, 1);
        if (rc)
            cap_log(CAP_LOG_ERROR, "store", "%s: final checkpoint failed: %s", env->path,
                    cap_strerror(rc));
    }
    if (env->pin)
        mdb_txn_abort(env->pin);
    if (env->ckpt_fd >= 0)
        close(env->ckpt_fd);
    mdb_env_close(env->env);
    pthread_rwlock_destroy(&env->grow_lock);
    pthread_mutex_destroy(&env->ckpt_mu);
    cap_free(env->path);
    cap_free(env);
}

int store_env_sync(store_env_t *env)
{
    if (env->readonly)
        return 0;
    int rc = mdb_env_sync(env->env, 1);
    return rc ? store__err(env, rc, "fsync") : 0;
}

const char *store_env_path(const store_env_t *env)
{
    return env->path;
}

int store_env_nosync(const store_env_t *env)
{
    return env->nosync;
}

int store_env_readonly(const store_env_t *env)
{
    return env->readonly;
}

size_t store_env_max_key(const store_env_t *env)
{
    return (size_t)mdb_env_get_maxkeysize(env->env);
}

uint64_t store_env_grow_count(const store_env_t *env)
{
    return atomic_load(&((store_env_t *)env)->grows);
}

int store_env_stale_readers(const store_env_t *env)
{
    return env->stale_readers;
}

int store_env_info(store_env_t *env, size_t *map_size, size_t *used)
{
    MDB_envinfo info;
    MDB_stat st;
    int rc = mdb_env_info(env->env, &info);
    if (rc == 0)
        rc = mdb_env_stat(env->env, &st);
    if (rc)
        return store__err(env, rc, "reading env info");
    if (map_size)
        *map_size = info.me_mapsize;
    if (used)
        *used = (info.me_last_pgno + 1) * (size_t)st.ms_psize;
    return 0;
}

/* Grows (or adopts another process's growth of) the map. Called with no txn of ours open.
 * new_size 0: adopt the size in the file (MDB_MAP_RESIZED). */
static int store__grow(store_env_t *env, size_t seen_size, int adopt)
{
    int rc = 0;
    pthread_rwlock_wrlock(&env->grow_lock);
    if (adopt) {
        rc = mdb_env_set_mapsize(env->env, 0);
        if (rc == 0) {
            MDB_envinfo info;
            mdb_env_info(env->env, &info);
            env->map_size = info.me_mapsize;
        }
        rc = rc ? store__err(env, rc, "adopting the map size") : 0;
        goto out;
    }
    if (env->map_size != seen_size)
        goto out; /* another thread grew it meanwhile */
    if (env->map_size >= env->max_map_size) {
        cap_log(CAP_LOG_ERROR, "store", "%s: map full at its limit of %zu bytes", env->path,
                env->max_map_size);
        rc = CAP_EMAPFULL;
        goto out;
    }
    size_t next = env->map_size * 2;
    if (next > env->max_map_size || next < env->map_size)
        next = env->max_map_size;
    rc = mdb_env_set_mapsize(env->env, next);
    if (rc) {
        rc = store__err(env, rc, "growing the map");
        goto out;
    }
    cap_log(CAP_LOG_DEBUG, "store", "%s: map grown from %zu to %zu bytes", env->path, env->map_size,
            next);
    env->map_size = next;
    atomic_fetch_add(&env->grows, 1);
out:
    pthread_rwlock_unlock(&env->grow_lock);
    return rc;
}

int store_txn_begin(store_env_t *env, int readonly, store_txn_t **out)
{
    MDB_txn *t = NULL;
    int rc;

    if (!readonly && env->readonly)
        return CAP_EINVAL;
    for (;;) {
        pthread_rwlock_rdlock(&env->grow_lock);
        rc = mdb_txn_begin(env->env, NULL, readonly ? MDB_RDONLY : 0, &t);
        if (rc != MDB_MAP_RESIZED)
            break;
        pthread_rwlock_unlock(&env->grow_lock);
        rc = store__grow(env, 0, 1);
        if (rc)
            return rc;
    }
    if (rc) {
        pthread_rwlock_unlock(&env->grow_lock);
        return store__err(env, rc, readonly ? "beginning a read txn" : "beginning a write txn");
    }
    store_txn_t *txn = cap_malloc(sizeof(*txn));
    txn->env = env;
    txn->txn = t;
    txn->readonly = readonly ? 1 : 0;
    *out = txn;
    return 0;
}

int store_txn_commit(store_txn_t *txn)
{
    store_env_t *env = txn->env;
    int rc = mdb_txn_commit(txn->txn);
    pthread_rwlock_unlock(&env->grow_lock);
    cap_free(txn);
    if (rc == MDB_MAP_FULL)
        return CAP_EMAPFULL;
    return rc ? store__err(env, rc, "commit") : 0;
}

void store_txn_abort(store_txn_t *txn)
{
    if (!txn)
        return;
    mdb_txn_abort(txn->txn);
    pthread_rwlock_unlock(&txn->env->grow_lock);
    cap_free(txn);
}

store_env_t *store_txn_env(store_txn_t *txn)
{
    return txn->env;
}

int store_env_write(store_env_t *env, store_write_fn fn, void *arg)
{
    store_txn_t *txn = NULL;
    int rc;

    for (;;) {
        size_t seen = env->map_size; /* read without the lock: only compared under it */
        rc = store_txn_begin(env, 0, &txn);
        if (rc)
            return rc;
        seen = env->map_size; /* stable while we hold the txn (shared lock) */
        rc = fn(txn, arg);
        if (rc == 0) {
            rc = store_txn_commit(txn);
            txn = NULL;
        } else {
            store_txn_abort(txn);
            txn = NULL;
        }
        if (rc != CAP_EMAPFULL)
            return rc;
        rc = store__grow(env, seen, 0);
        if (rc)
            return rc;
    }
}

int store_dbi_open(store_txn_t *txn, const char *name, unsigned flags, store_dbi_t *out)
{
    MDB_dbi dbi;
    unsigned f = 0;
    if (flags & STORE_DB_CREATE) {
        if (txn->readonly)
            return CAP_EINVAL;
        f |= MDB_CREATE;
    }
    if (flags & STORE_DB_DUPSORT)
        f |= MDB_DUPSORT;
    int rc = mdb_dbi_open(txn->txn, name, f, &dbi);
    if (rc == MDB_NOTFOUND)
        return CAP_ENOTFOUND;
    if (rc)
        return store__err(txn->env, rc, name);
    *out = dbi;
    return 0;
}

int store_dbi_count(store_txn_t *txn, store_dbi_t dbi, uint64_t *out)
{
    MDB_stat st;
    int rc = mdb_stat(txn->txn, dbi, &st);
    if (rc)
        return store__err(txn->env, rc, "mdb_stat");
    *out = st.ms_entries;
    return 0;
}

int store_put(store_txn_t *txn, store_dbi_t dbi, store_val_t key, store_val_t val, unsigned flags)
{
    MDB_val k = {key.len, (void *)key.data}, v = {val.len, (void *)val.data};
    unsigned f = 0;
    if (txn->readonly)
        return CAP_EINVAL;
    if (flags & STORE_PUT_APPEND)
        f |= MDB_APPEND;
    if (flags & STORE_PUT_NOOVERWRITE)
        f |= MDB_NOOVERWRITE;
    int rc = mdb_put(txn->txn, dbi, &k, &v, f);
    if (rc == MDB_KEYEXIST && (flags & STORE_PUT_APPEND) && !(flags & STORE_PUT_NOOVERWRITE)) {
        cap_log(CAP_LOG_ERROR, "store", "%s: append of a key that does not sort last",
                txn->env->path);
        return CAP_EINVAL;
    }
    if (rc == MDB_BAD_VALSIZE)
        return key.len == 0 ? CAP_EINVAL : CAP_ETOOBIG;
    if (rc == EINVAL) {
        cap_log(CAP_LOG_ERROR, "store", "%s: put: invalid database handle or flags",
                txn->env->path);
        return CAP_EINVAL;
    }
    return rc ? store__err(txn->env, rc, "put") : 0;
}

int store_get(store_txn_t *txn, store_dbi_t dbi, store_val_t key, store_val_t *val)
{
    MDB_val k = {key.len, (void *)key.data}, v;
    if (key.len == 0)
        return CAP_ENOTFOUND;
    int rc = mdb_get(txn->txn, dbi, &k, &v);
    if (rc)
        return rc == MDB_BAD_VALSIZE ? CAP_ETOOBIG : store__err(txn->env, rc, "get");
    val->data = v.mv_data;
    val->len = v.mv_size;
    return 0;
}

int store_del(store_txn_t *txn, store_dbi_t dbi, store_val_t key, const store_val_t *val)
{
    MDB_val k = {key.len, (void *)key.data}, v;
    if (txn->readonly)
        return CAP_EINVAL;
    if (key.len == 0)
        return CAP_ENOTFOUND;
    if (val && val->data) {
        v.mv_size = val->len;
        v.mv_data = (void *)val->data;
    }
    int rc = mdb_del(txn->txn, dbi, &k, val && val->data ? &v : NULL);
    return rc ? store__err(txn->env, rc, "del") : 0;
}

int store_cursor_open(store_txn_t *txn, store_dbi_t dbi, store_cursor_t **out)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn->txn, dbi, &c);
    if (rc)
        return store__err(txn->env, rc, "cursor open");
    store_cursor_t *cur = cap_malloc(sizeof(*cur));
    cur->cur = c;
    cur->env = txn->env;
    *out = cur;
    return 0;
}

int store_cursor_get(store_cursor_t *cur, store_val_t *key, store_val_t *val, store_cursor_op_t op)
{
    MDB_val k = {0, NULL}, v = {0, NULL};
    MDB_cursor_op mop;
    switch (op) {
    case STORE_FIRST:
        mop = MDB_FIRST;
        break;
    case STORE_LAST:
        mop = MDB_LAST;
        break;
    case STORE_NEXT:
        mop = MDB_NEXT;
        break;
    case STORE_PREV:
        mop = MDB_PREV;
        break;
    case STORE_SET_RANGE:
        mop = MDB_SET_RANGE;
        break;
    case STORE_SET_KEY:
        mop = MDB_SET_KEY;
        break;
    case STORE_GET_CURRENT:
        mop = MDB_GET_CURRENT;
        break;
    case STORE_NEXT_DUP:
        mop = MDB_NEXT_DUP;
        break;
    case STORE_NEXT_NODUP:
        mop = MDB_NEXT_NODUP;
        break;
    case STORE_GET_BOTH_RANGE:
        mop = MDB_GET_BOTH_RANGE;
        break;
    default:
        return CAP_EINVAL;
    }
    if (mop == MDB_SET_RANGE || mop == MDB_SET_KEY || mop == MDB_GET_BOTH_RANGE) {
        if (!key || key->len == 0)
            return CAP_EINVAL;
        k.mv_size = key->len;
        k.mv_data = (void *)key->data;
    }
    if (mop == MDB_GET_BOTH_RANGE) {
        if (!val)
            return CAP_EINVAL;
        v.mv_size = val->len;
        v.mv_data = (void *)val->data;
    }
    int rc = mdb_cursor_get(cur->cur, &k, &v, mop);
    if (rc == MDB_NOTFOUND || (rc == EINVAL && mop != MDB_SET_RANGE && mop != MDB_SET_KEY))
        return CAP_ENOTFOUND; /* EINVAL: stepping an unpositioned cursor */
    if (rc)
        return rc == MDB_BAD_VALSIZE ? CAP_ETOOBIG : store__err(cur->env, rc, "cursor get");
    if (key) {
        key->data = k.mv_data;
        key->len = k.mv_size;
    }
    if (val) {
        val->data = v.mv_data;
        val->len = v.mv_size;
    }
    return 0;
}

int store_cursor_del(store_cursor_t *cur)
{
    int rc = mdb_cursor_del(cur->cur, 0);
    return rc ? store__err(cur->env, rc, "cursor del") : 0;
}

void store_cursor_close(store_cursor_t *cur)
{
    if (!cur)
        return;
    mdb_cursor_close(cur->cur);
    cap_free(cur);
}

/* ---- checkpoints: store.ckpt (format in store.h and ARCHITECTURE.md) ---- */

#define STORE_CKPT_FILE    "store.ckpt"
#define STORE_CKPT_MAGIC   0x504B4343u /* "CCKP" little-endian */
#define STORE_CKPT_VERSION 1u
#define STORE_CKPT_SLOT    16384u
#define STORE_CKPT_HDR     128u
#define STORE_CKPT_MAXPG   ((STORE_CKPT_SLOT - STORE_CKPT_HDR) / 2)
#define STORE_CKPT_CLEAN   1u
#define STORE_BOOT_LEN     48u
/* LMDB's meta page (lmdb 0.9, 64-bit): a 16-byte page header, then MDB_meta {magic u32, version
 * u32, address, mapsize, two 48-byte MDB_db, last_pg} and the txnid at byte 128 of MDB_meta. */
#define STORE_META_MAGIC_AT 16u
#define STORE_META_TXNID_AT 144u
#define STORE_LMDB_MAGIC    0xBEEFC0DEu

/* The slot header (bytes 0..127 of a slot; the meta pages follow). Written byte by byte with the
 * little-endian helpers; the struct pins the layout down. */
struct store_ckpt_hdr {
    uint32_t magic;
    uint32_t version;
    uint64_t counter; /* newest valid slot wins */
    uint64_t txnid;   /* LMDB txnid of the saved snapshot */
    uint32_t psize;   /* bytes per saved meta page */
    uint32_t flags;   /* STORE_CKPT_CLEAN */
    char boot_id[STORE_BOOT_LEN];
    uint8_t user[STORE_CKPT_USER];
    uint64_t reserved;
    uint64_t checksum; /* XXH3-64 of the slot's first 128 + 2 * psize bytes, this field 0 */
};
_Static_assert(sizeof(struct store_ckpt_hdr) == STORE_CKPT_HDR, "checkpoint header is 128 bytes");
_Static_assert(offsetof(struct store_ckpt_hdr, boot_id) == 32, "boot id at 32");
_Static_assert(offsetof(struct store_ckpt_hdr, user) == 80, "user area at 80");
_Static_assert(offsetof(struct store_ckpt_hdr, checksum) == 120, "checksum at 120");

static void store__boot_id(char out[STORE_BOOT_LEN])
{
    memset(out, 0, STORE_BOOT_LEN);
    const char *t = getenv("CAPSULE_TEST_BOOT_ID"); /* test-only: simulates a reboot */
    if (t && *t) {
        snprintf(out, STORE_BOOT_LEN, "%s", t);
        return;
    }
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return; /* unknown: an unclean checkpoint is then always restored (safe, slower) */
    ssize_t n = read(fd, out, STORE_BOOT_LEN - 1);
    close(fd);
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == 0))
        out[--n] = 0;
    if (n < 0)
        out[0] = 0;
}

static int store__fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) ? -errno : 0;
    close(fd);
    return rc;
}

static void store__file(const store_env_t *env, const char *name, char *buf, size_t len)
{
    snprintf(buf, len, "%s/%s", env->path, name);
}

static uint64_t store__slot_sum(uint8_t *slot, uint32_t psize)
{
    uint8_t saved[8];
    memcpy(saved, slot + 120, 8);
    memset(slot + 120, 0, 8);
    uint64_t h = cap_hash64(slot, STORE_CKPT_HDR + 2 * (size_t)psize);
    memcpy(slot + 120, saved, 8);
    return h;
}

/* Checks one slot; NULL when valid, else a static reason. */
static const char *store__slot_check(uint8_t *slot, size_t have)
{
    if (have < STORE_CKPT_SLOT)
        return "missing (the file is short)";
    uint32_t magic = cap_get_le32(slot), ver = cap_get_le32(slot + 4);
    uint32_t psize = cap_get_le32(slot + 24);
    if (magic == 0 && ver == 0)
        return "empty";
    if (magic != STORE_CKPT_MAGIC)
        return "bad magic";
    if (ver != STORE_CKPT_VERSION)
        return "unknown version";
    if (psize < 512 || psize > STORE_CKPT_MAXPG || (psize & (psize - 1)))
        return "bad page size";
    if (store__slot_sum(slot, psize) != cap_get_le64(slot + 120))
        return "checksum mismatch";
    return NULL;
}

/* Reads store.ckpt (if any) into env->have_ckpt etc.; the chosen slot is copied to slot_out
 * (STORE_CKPT_SLOT bytes). CAP_ECORRUPT when no slot is valid. */
static int store__ckpt_load(store_env_t *env, uint8_t *slot_out)
{
    char path[4200];
    uint8_t *buf = NULL;
    const char *why[2];
    int rc = 0, best = -1;
    store__file(env, STORE_CKPT_FILE, path, sizeof path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        rc = -errno;
        cap_log(CAP_LOG_ERROR, "store", "cannot open %s: %s", path, strerror(-rc));
        return rc;
    }
    buf = cap_calloc(2, STORE_CKPT_SLOT);
    ssize_t n = pread(fd, buf, 2 * STORE_CKPT_SLOT, 0);
    close(fd);
    if (n < 0) {
        rc = -errno;
        cap_log(CAP_LOG_ERROR, "store", "cannot read %s: %s", path, strerror(-rc));
        goto out;
    }
    for (int i = 0; i < 2; i++) {
        size_t have = (size_t)n > i * STORE_CKPT_SLOT ? (size_t)n - i * STORE_CKPT_SLOT : 0;
        why[i] = store__slot_check(buf + i * STORE_CKPT_SLOT, have);
        if (!why[i] && (best < 0 || cap_get_le64(buf + i * STORE_CKPT_SLOT + 8) >
                                        cap_get_le64(buf + best * STORE_CKPT_SLOT + 8)))
            best = i;
    }
    if (best < 0) {
        cap_log(CAP_LOG_ERROR, "store",
                "%s: no valid checkpoint (slot 0: %s; slot 1: %s): cannot tell which state of "
                "data.mdb is on disk",
                path, why[0], why[1]);
        rc = CAP_ECORRUPT;
        goto out;
    }
    if (why[best ^ 1] && strcmp(why[best ^ 1], "empty") != 0)
        cap_log(CAP_LOG_WARN, "store", "%s: slot %d is damaged (%s); using slot %d", path, best ^ 1,
                why[best ^ 1], best);
    uint8_t *s = buf + best * STORE_CKPT_SLOT;
    memcpy(slot_out, s, STORE_CKPT_SLOT);
    env->have_ckpt = 1;
    env->ckpt_slot = best;
    env->ckpt_counter = cap_get_le64(s + 8);
    env->ckpt_clean = (cap_get_le32(s + 28) & STORE_CKPT_CLEAN) != 0;
    memcpy(env->ckpt_user, s + 80, STORE_CKPT_USER);
out:
    cap_free(buf);
    return rc;
}

/* Writes the slot's saved meta pages back into data.mdb (before LMDB opens it). */
static int store__ckpt_restore(store_env_t *env, const uint8_t *slot, const char *now_boot)
{
    char path[4200];
    uint32_t psize = cap_get_le32(slot + 24);
    int rc = 0;
    store__file(env, "data.mdb", path, sizeof path);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        rc = errno == ENOENT ? CAP_ECORRUPT : -errno;
        cap_log(CAP_LOG_ERROR, "store", "%s/%s is present but %s cannot be opened: %s", env->path,
                STORE_CKPT_FILE, path, strerror(errno));
        return rc;
    }
    ssize_t w = pwrite(fd, slot + STORE_CKPT_HDR, 2 * (size_t)psize, 0);
    if (w != (ssize_t)(2 * (size_t)psize) || fdatasync(fd) != 0) {
        rc = w < 0 || errno ? -errno : -EIO;
        cap_log(CAP_LOG_ERROR, "store", "%s: restoring the checkpoint's meta pages failed: %s",
                path, strerror(-rc));
    } else {
        cap_log(CAP_LOG_WARN, "store",
                "%s was not closed cleanly before the machine restarted (boot id %.40s, now "
                "%.40s): data.mdb rolled back to its checkpoint at txn %llu; the journal "
                "re-applies what came after",
                env->path, (const char *)slot + 32, now_boot,
                (unsigned long long)cap_get_le64(slot + 16));
    }
    close(fd);
    return rc;
}

/* Test hook (CAPSULE_TEST_CKPT_COPY=path): the on-disk image of data.mdb at this checkpoint. */
static void store__test_copy(store_env_t *env)
{
    const char *dst = getenv("CAPSULE_TEST_CKPT_COPY");
    if (!dst || !*dst)
        return;
    char src[4200], tmp[4200];
    store__file(env, "data.mdb", src, sizeof src);
    snprintf(tmp, sizeof tmp, "%s.tmp", dst);
    int in = open(src, O_RDONLY | O_CLOEXEC);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    char buf[65536];
    ssize_t n;
    int ok = in >= 0 && out >= 0;
    while (ok && (n = read(in, buf, sizeof buf)) > 0)
        ok = write(out, buf, (size_t)n) == n;
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    if (!ok || rename(tmp, dst) != 0)
        cap_fatal("store", "CAPSULE_TEST_CKPT_COPY: copying %s to %s failed", src, dst);
}

/* Opens store.ckpt into env->ckpt_fd. Missing: *fresh = 1 (store__ckpt_create makes it). */
static int store__ckpt_fd(store_env_t *env, int *fresh)
{
    char path[4200];
    *fresh = 0;
    if (env->ckpt_fd >= 0)
        return 0;
    store__file(env, STORE_CKPT_FILE, path, sizeof path);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        *fresh = 1;
        return 0;
    }
    if (fd < 0) {
        int rc = -errno;
        cap_log(CAP_LOG_ERROR, "store", "cannot open %s: %s", path, strerror(-rc));
        return rc;
    }
    env->ckpt_fd = fd;
    return 0;
}

/* Creates store.ckpt at full size with `slot` already in slot 0 (the rest zeros), synced,
 * renamed into place, its directory synced: the file never exists without a valid slot, and
 * later checkpoints only overwrite allocated blocks. */
static int store__ckpt_create(store_env_t *env, const uint8_t *slot)
{
    char path[4200], tmp[4300];
    store__file(env, STORE_CKPT_FILE, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) {
        uint8_t *z = cap_calloc(2, STORE_CKPT_SLOT);
        memcpy(z, slot, STORE_CKPT_SLOT);
        ssize_t w = pwrite(fd, z, 2 * STORE_CKPT_SLOT, 0);
        cap_free(z);
        if (w == 2 * STORE_CKPT_SLOT && fsync(fd) == 0 && rename(tmp, path) == 0 &&
            store__fsync_dir(env->path) == 0) {
            env->ckpt_fd = fd;
            return 0;
        }
    }
    int rc = errno ? -errno : -EIO;
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    cap_log(CAP_LOG_ERROR, "store", "cannot create %s: %s", path, strerror(-rc));
    return rc;
}

/* A checkpoint between its capture and its completion: the slot image with the meta pages of
 * the captured snapshot, and the read transaction that keeps that snapshot's pages from reuse. */
struct store_ckpt {
    store_env_t *env;
    uint8_t *slot; /* STORE_CKPT_SLOT bytes: header fields filled at completion, metas at capture */
    uint32_t psize;
    uint64_t txnid;
    MDB_txn *snap; /* read txn on the captured snapshot; becomes the pin */
    uint8_t user[STORE_CKPT_USER];
};

static void store__ckpt_free(store_ckpt_t *ck)
{
    if (!ck)
        return;
    if (ck->snap)
        mdb_txn_abort(ck->snap);
    cap_free(ck->slot);
    cap_free(ck);
}

/* Test hook (CAPSULE_TEST_CKPT_CAPTURE_FAIL=n, read at each capture): captures fail, as if
 * data.mdb held no meta page of the snapshot, until n of them have failed in this process. */
static int store__test_capture_fail(void)
{
    static atomic_int failed;
    const char *d = getenv("CAPSULE_TEST_CKPT_CAPTURE_FAIL");
    if (!d || !*d || atomic_load(&failed) >= atoi(d))
        return 0;
    atomic_fetch_add(&failed, 1);
    return 1;
}

/* Captures the snapshot committed now. The caller holds a write transaction of env (no commit
 * can slip in). The meta pages are read from data.mdb through the page cache: what the disk
 * will hold once data.mdb is flushed. One of them must carry the txnid LMDB reports. */
static int store__ckpt_capture(store_env_t *env, const uint8_t *user, store_ckpt_t **out)
{
    char path[4200];
    MDB_stat st;
    MDB_envinfo info;
    int rc, fd = -1;
    store_ckpt_t *ck = cap_calloc(1, sizeof(*ck));
    ck->env = env;
    if ((rc = mdb_env_stat(env->env, &st)) != 0 || (rc = mdb_env_info(env->env, &info)) != 0) {
        rc = store__err(env, rc, "checkpoint: reading env info");
        goto out;
    }
    if (st.ms_psize < 512 || st.ms_psize > STORE_CKPT_MAXPG) {
        cap_log(CAP_LOG_ERROR, "store", "%s: page size %u does not fit a checkpoint slot",
                env->path, st.ms_psize);
        rc = CAP_ELIMIT;
        goto out;
    }
    ck->psize = st.ms_psize;
    ck->txnid = (uint64_t)info.me_last_txnid;
    memcpy(ck->user, user ? user : env->ckpt_user, STORE_CKPT_USER);
    ck->slot = cap_calloc(1, STORE_CKPT_SLOT);
    store__file(env, "data.mdb", path, sizeof path);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t mlen = 2 * (size_t)st.ms_psize;
    if (fd < 0 || pread(fd, ck->slot + STORE_CKPT_HDR, mlen, 0) != (ssize_t)mlen) {
        rc = errno ? -errno : -EIO;
        cap_log(CAP_LOG_ERROR, "store", "checkpoint: cannot read the meta pages of %s: %s", path,
                strerror(-rc));
        goto out;
    }
    int found = 0;
    uint64_t seen[2];
    uint32_t magics[2];
    for (int i = 0; i < 2; i++) {
        const uint8_t *m = ck->slot + STORE_CKPT_HDR + (size_t)i * st.ms_psize;
        memcpy(&magics[i], m + STORE_META_MAGIC_AT, 4); /* LMDB writes its metas in host order */
        memcpy(&seen[i], m + STORE_META_TXNID_AT, 8);
        if (magics[i] == STORE_LMDB_MAGIC && seen[i] == ck->txnid)
            found = 1;
    }
    if (store__test_capture_fail())
        found = 0;
    if (!found) {
        cap_log(CAP_LOG_ERROR, "store",
                "checkpoint: %s holds no meta page of txn %llu (meta 0: txn %llu%s, meta 1: txn "
                "%llu%s)",
                path, (unsigned long long)ck->txnid, (unsigned long long)seen[0],
                magics[0] == STORE_LMDB_MAGIC ? "" : ", bad magic", (unsigned long long)seen[1],
                magics[1] == STORE_LMDB_MAGIC ? "" : ", bad magic");
        rc = CAP_ESTORE;
        goto out;
    }
    rc = mdb_txn_begin(env->env, NULL, MDB_RDONLY, &ck->snap); /* sees the snapshot captured */
    if (rc)
        rc = store__err(env, rc, "checkpoint: pinning the snapshot");
out:
    if (fd >= 0)
        close(fd);
    if (rc) {
        store__ckpt_free(ck);
        ck = NULL;
    }
    *out = ck;
    return rc;
}

/* Test hook (CAPSULE_TEST_CKPT_DELAY_MS=n): sleeps n ms after the sync of data.mdb, widening the
 * window in which commits run beside a checkpoint (the crash tests kill the process in it). */
static void store__test_delay(void)
{
    const char *d = getenv("CAPSULE_TEST_CKPT_DELAY_MS");
    if (d && *d)
        usleep((useconds_t)atoi(d) * 1000u);
}

/* Bytes of data.mdb written out per step before a checkpoint's sync (see store__ckpt_flush). */
#define STORE_CKPT_FLUSH_CHUNK ((off_t)1 << 20)

/* Writes data.mdb's dirty pages out a chunk at a time, each waited for before the next, so the
 * device queue never holds more than one chunk of them: a journal write (a durable commit)
 * issued meanwhile waits behind at most a chunk, not behind everything the checkpoint interval
 * dirtied (one fdatasync submits it all at once). Only a way of issuing the writes: the
 * fdatasync that follows still makes them durable (and flushes the file's metadata and the
 * device cache); an error here is left to it. */
static void store__ckpt_flush(store_env_t *env)
{
    int fd;
    struct stat st;
    MDB_envinfo info;
    MDB_stat ms;
    if (mdb_env_get_fd(env->env, &fd) != 0 || fstat(fd, &st) != 0)
        return;
    /* up to the last page in use: a file that was opened nosync is sized to the map (sparse) */
    off_t end = st.st_size;
    if (mdb_env_info(env->env, &info) == 0 && mdb_env_stat(env->env, &ms) == 0 &&
        (off_t)((info.me_last_pgno + 1) * ms.ms_psize) < end)
        end = (off_t)((info.me_last_pgno + 1) * ms.ms_psize);
    for (off_t off = 0; off < end; off += STORE_CKPT_FLUSH_CHUNK)
        if (sync_file_range(fd, off, STORE_CKPT_FLUSH_CHUNK,
                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                SYNC_FILE_RANGE_WAIT_AFTER) != 0)
            return;
}

/* Makes a captured checkpoint durable and current: forced sync of data.mdb (every page of the
 * snapshot was written before it), the slot into the older half of store.ckpt, fdatasync, then
 * the snapshot's read txn replaces the pin (clean: released). Frees ck. Commits may run beside
 * all of it: they never touch a page of the snapshot (its read txn) nor of the previous
 * checkpoint's (the old pin, released only once the new slot is durable). */
static int store__ckpt_complete(store_ckpt_t *ck, int clean)
{
    store_env_t *env = ck->env;
    char boot[STORE_BOOT_LEN];
    uint8_t *slot = ck->slot;
    store__ckpt_flush(env);
    int rc = mdb_env_sync(env->env, 1);
    if (rc) {
        rc = store__err(env, rc, "checkpoint: syncing data.mdb");
        goto out;
    }
    store__test_copy(env);
    store__test_delay();
    pthread_mutex_lock(&env->ckpt_mu);
    int fresh;
    rc = store__ckpt_fd(env, &fresh);
    if (rc)
        goto unlock;
    if (fresh) {
        env->have_ckpt = 0;
        env->ckpt_slot = 1; /* the first checkpoint goes to slot 0 */
    }
    store__boot_id(boot);
    uint64_t counter = env->ckpt_counter + 1;
    int idx = env->ckpt_slot ^ 1;
    cap_put_le32(slot, STORE_CKPT_MAGIC);
    cap_put_le32(slot + 4, STORE_CKPT_VERSION);
    cap_put_le64(slot + 8, counter);
    cap_put_le64(slot + 16, ck->txnid);
    cap_put_le32(slot + 24, ck->psize);
    cap_put_le32(slot + 28, clean ? STORE_CKPT_CLEAN : 0);
    memcpy(slot + 32, boot, STORE_BOOT_LEN);
    memcpy(slot + 80, ck->user, STORE_CKPT_USER);
    cap_put_le64(slot + 120, store__slot_sum(slot, ck->psize));
    if (fresh) {
        rc = store__ckpt_create(env, slot);
        if (rc)
            goto unlock;
    } else if (pwrite(env->ckpt_fd, slot, STORE_CKPT_SLOT, (off_t)idx * STORE_CKPT_SLOT) !=
                   STORE_CKPT_SLOT ||
               fdatasync(env->ckpt_fd) != 0) {
        rc = errno ? -errno : -EIO;
        cap_log(CAP_LOG_ERROR, "store", "checkpoint: writing %s/%s failed: %s", env->path,
                STORE_CKPT_FILE, strerror(-rc));
        goto unlock;
    }
    if (env->pin)
        mdb_txn_abort(env->pin);
    env->pin = clean ? NULL : ck->snap;
    if (!clean)
        ck->snap = NULL;
    env->have_ckpt = 1;
    env->ckpt_clean = clean ? 1 : 0;
    env->ckpt_slot = idx;
    env->ckpt_counter = counter;
    memcpy(env->ckpt_user, ck->user, STORE_CKPT_USER);
unlock:
    pthread_mutex_unlock(&env->ckpt_mu);
out:
    store__ckpt_free(ck);
    return rc;
}

int store_env_checkpoint(store_env_t *env, const uint8_t *user, int clean)
{
    store_txn_t *w = NULL;
    store_ckpt_t *ck = NULL;
    if (!env || env->readonly)
        return CAP_EINVAL;
    int rc = store_txn_begin(env, 0, &w); /* no other write may commit until we are done */
    if (rc)
        return rc;
    rc = store__ckpt_capture(env, user, &ck);
    if (rc == 0)
        rc = store__ckpt_complete(ck, clean);
    store_txn_abort(w);
    return rc;
}

int store_env_ckpt_begin(store_env_t *env, const uint8_t *user, store_ckpt_t **out)
{
    store_txn_t *w = NULL;
    *out = NULL;
    if (!env || env->readonly || env->nosync)
        return CAP_EINVAL;
    int rc = store_txn_begin(env, 0, &w); /* brief: only reads of the page cache */
    if (rc)
        return rc;
    rc = store__ckpt_capture(env, user, out);
    store_txn_abort(w);
    return rc;
}

int store_env_ckpt_finish(store_ckpt_t *ck)
{
    return store__ckpt_complete(ck, 0);
}

int store_env_ckpt_user(store_env_t *env, uint8_t user[STORE_CKPT_USER])
{
    pthread_mutex_lock(&env->ckpt_mu);
    int have = env->have_ckpt;
    if (have)
        memcpy(user, env->ckpt_user, STORE_CKPT_USER);
    pthread_mutex_unlock(&env->ckpt_mu);
    return have ? 0 : CAP_ENOTFOUND;
}

int store_env_ckpt_remove(store_env_t *env)
{
    char path[4200];
    store_txn_t *w = NULL;
    if (env->readonly)
        return CAP_EINVAL;
    int rc = store_txn_begin(env, 0, &w);
    if (rc)
        return rc;
    rc = mdb_env_sync(env->env, 1);
    if (rc) {
        rc = store__err(env, rc, "syncing data.mdb");
        goto out;
    }
    store__file(env, STORE_CKPT_FILE, path, sizeof path);
    if ((unlink(path) != 0 && errno != ENOENT) || store__fsync_dir(env->path) != 0) {
        rc = -errno;
        cap_log(CAP_LOG_ERROR, "store", "cannot remove %s: %s", path, strerror(-rc));
        goto out;
    }
    if (env->pin)
        mdb_txn_abort(env->pin);
    env->pin = NULL;
    if (env->ckpt_fd >= 0)
        close(env->ckpt_fd);
    env->ckpt_fd = -1;
    env->have_ckpt = env->ckpt_clean = 0;
    env->ckpt_counter = 0;
    env->ckpt_slot = 1;
    memset(env->ckpt_user, 0, STORE_CKPT_USER);
out:
    store_txn_abort(w);
    return rc;
}

int store_env_set_deferred(store_env_t *env, int on)
{
    store_txn_t *w = NULL;
    if (env->readonly)
        return CAP_EINVAL;
    int rc = store_txn_begin(env, 0, &w); /* no commit runs while the flag changes */
    if (rc)
        return rc;
    if (!env->nosync)
        rc = mdb_env_set_flags(env->env, MDB_NOSYNC, on ? 1 : 0);
    if (rc == 0)
        env->deferred = on ? 1 : 0;
    store_txn_abort(w);
    return rc ? store__err(env, rc, "changing the sync mode") : 0;
}
