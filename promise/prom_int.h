/*
 * prom_int.h - internals shared by the files of promise/: the in-memory promise document (a
 * promise together with its task, callbacks and listeners, the unit every record carries) and
 * its codec.
 *
 * Invariants: a document's task exists iff the promise had a resonate:target at creation; a
 * settled promise has a fulfilled task (if any), no awaiters and no listeners; task_timer is the
 * retry deadline while the task is pending, the lease deadline while acquired, 0 otherwise.
 */
#ifndef PROM_INT_H
#define PROM_INT_H

#include "promise.h"

/* One promise document: the unit of state and of the PROM_REC_DOC record. */
typedef struct prom__doc {
    prom_promise_t p;
    int has_task;
    prom_task_state_t tstate;
    int64_t tversion;
    int64_t tresumes;
    char *tpid; /* NULL unless acquired */
    int64_t tttl;
    int64_t ttimer;  /* retry (pending) or lease (acquired) deadline; 0 = none */
    char **awaiters; /* callbacks: awaiter ids waiting on this promise */
    size_t nawaiters;
    char **listeners; /* addresses to unblock on settle */
    size_t nlisteners;
    /* in memory only (not encoded): */
    int dirty;    /* changed since the last checkpoint of prom.docs */
    int created;  /* created by the operation that holds it in its working set */
    uint64_t seq; /* the wal seq of the record that wrote this state; 0 = read from prom.docs */
    size_t mem;   /* bytes this document holds in memory (prom_store_stats) */
    uint8_t *enc; /* checkpoint mode: this state's encoding, as appended, until the checkpoint
                     writes it (NULL otherwise; never copied by prom__doc_clone) */
    size_t enclen;
} prom__doc_t;

/* An outbox message as stored. */
typedef struct prom__msg {
    uint64_t mid;
    int kind;
    char *address;
    char *id;
    int64_t version;
} prom__msg_t;

#define PROM__CODEC_VERSION 1

/* A string-keyed map (prom_smap.c): open addressing, linear probing, backward-shift deletion.
 * Keys are borrowed (they must live as long as their entry: usually the value owns the key). */
typedef struct prom__smap_ent {
    const char *key;
    uint64_t h;
    void *val;
} prom__smap_ent_t;
typedef struct prom__smap {
    prom__smap_ent_t *e;
    size_t cap, n;
} prom__smap_t;
void *prom__smap_get(const prom__smap_t *m, const char *key);     /* NULL when absent */
void prom__smap_put(prom__smap_t *m, const char *key, void *val); /* inserts or replaces */
void *prom__smap_del(prom__smap_t *m, const char *key); /* the removed value, NULL when absent */
void prom__smap_free(prom__smap_t *m);                  /* frees the table, not the values */

/* Bytes a document holds in memory (its struct and every string and buffer it owns). */
size_t prom__doc_mem(const prom__doc_t *d);

/* Encodes d into a new buffer (cap_free). */
void prom__doc_encode(const prom__doc_t *d, uint8_t **buf, size_t *len);
/* Decodes a document; CAP_ECORRUPT when the bytes do not hold one. *out is cap_malloc'd. */
int prom__doc_decode(const void *buf, size_t len, prom__doc_t **out);
prom__doc_t *prom__doc_clone(const prom__doc_t *d);
void prom__doc_free(prom__doc_t *d);

void prom__msg_encode(const prom__msg_t *m, uint8_t **buf, size_t *len);
int prom__msg_decode(const void *buf, size_t len, uint64_t mid, prom__msg_t *out);
void prom__msg_clear(prom__msg_t *m);

void prom__value_copy(prom_value_t *dst, const prom_value_t *src); /* src NULL = {} */
void prom__value_clear(prom_value_t *v);
void prom__kvs_copy(prom_kv_t **dst, size_t *ndst, const prom_kv_t *src, size_t n);
void prom__kvs_free(prom_kv_t *kv, size_t n);

#endif /* PROM_INT_H */
