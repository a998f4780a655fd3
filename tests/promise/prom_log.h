/*
 * prom_log.h - the oracle of the promise durability tests: what the COMMITTED log says about a
 * promise (read by key in a fresh LMDB snapshot, independent of the store's memory and tables).
 * Needs promise/'s private header (the document codec).
 */
#ifndef PROM_LOG_H
#define PROM_LOG_H

#include <string.h>

#include "check.h"
#include "prom_int.h"

/* The state of id in the last PROM_REC_DOC record with key id in the committed log, or -1 when
 * there is none; *seq (if not NULL) gets that record's sequence number. */
static inline int prom_log_state(prom_store_t *ps, const char *id, uint64_t *seq)
{
    wal_iter_t *it;
    wal_iter_opts_t io = {0};
    wal_entry_t e;
    int st = -1, rc;
    io.kind = PROM_REC_DOC;
    io.key = id;
    io.key_len = strlen(id);
    io.decode = 1;
    CHECK_OK(wal_iter_open(prom_store_wal(ps), &io, &it));
    while ((rc = wal_iter_next(it, &e)) == 0) {
        const wal_field_t *f = wal_entry_field(&e, 1);
        prom__doc_t *d;
        CHECK(f);
        CHECK_OK(prom__doc_decode(f->data, f->len, &d));
        st = (int)d->p.state;
        if (seq)
            *seq = e.seq;
        prom__doc_free(d);
    }
    CHECK_ERR(rc, CAP_ENOTFOUND);
    wal_iter_close(it);
    return st;
}

#endif
