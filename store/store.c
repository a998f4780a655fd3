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
#include <lmdb.h>
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
    if (o.nosync)
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
    *out = e;
    e = NULL;
    rc = 0;
out:
    if (e) {
        if (e->env)
            mdb_env_close(e->env);
        pthread_rwlock_destroy(&e->grow_lock);
        cap_free(e->path);
        cap_free(e);
    }
    return rc;
}

void store_env_close(store_env_t *env)
{
    if (!env)
        return;
    mdb_env_close(env->env);
    pthread_rwlock_destroy(&env->grow_lock);
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
