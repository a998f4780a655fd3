/*
 * rebuild.c - `capsule-replay replay [--rerun] DIR SESSION`: a determinism and restorability
 * check of one session, offline, in fresh workers (pyworker's blocking pyw_sync_* layer, cold
 * spawns: no zygote, no engine).
 *
 *   restore: the engine's own restore chain (eng__chain_read: the latest checkpoint, or a fork's
 *            parent chain, then the deltas after it) applied in a fresh worker; every name that
 *            fails to restore is a difference.
 *   chain:   when the session has a checkpoint and is not a fork, all its deltas from ordinal 1
 *            applied in another fresh worker, compared with `restore` name by name (a
 *            checkpoint that disagrees with the deltas it summarises).
 *   rerun:   (--rerun) the committed executions re-run in submission order in a fresh worker,
 *            each input() answered with its recorded reply (EOF where recorded); each status is
 *            compared with the recorded one, then the namespace with `restore` name by name.
 * Names are compared by a fingerprint computed in the worker: BLAKE2b of the pickle (sets
 * sorted first, so string hashing does not matter), functions by their code, modules by name;
 * dunder names and the `_`, `__`, `___` result names are left out.
 * Exit 0 all agree, 1 something differs (each difference printed), 2 cannot open / no worker.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "capsule.h"
#include "eng_int.h"
#include "prom_int.h"
#include "pyworker.h"
#include "replay.h"

static const char fp_code[] =
    "def __capsule_fp():\n"
    "    import hashlib, pickle, types\n"
    "    def norm(v):\n"
    "        if isinstance(v, (set, frozenset)):\n"
    "            return ('set', sorted((norm(x) for x in v), key=repr))\n"
    "        if isinstance(v, dict):\n"
    "            return ('dict', [(norm(k), norm(x)) for k, x in v.items()])\n"
    "        if isinstance(v, (list, tuple)):\n"
    "            return (type(v).__name__, [norm(x) for x in v])\n"
    "        return v\n"
    "    out = []\n"
    "    for k, v in sorted(globals().items()):\n"
    "        if k.startswith('__') or k in ('_',):\n"
    "            continue\n"
    "        try:\n"
    "            if isinstance(v, types.ModuleType):\n"
    "                d = 'module ' + v.__name__\n"
    "            elif isinstance(v, types.FunctionType):\n"
    "                c = v.__code__\n"
    "                d = 'function ' + hashlib.blake2b(c.co_code + repr(c.co_consts).encode(),\n"
    "                                                  digest_size=8).hexdigest()\n"
    "            else:\n"
    "                d = hashlib.blake2b(pickle.dumps(norm(v), 5), digest_size=8).hexdigest()\n"
    "        except Exception as e:\n"
    "            d = 'unpicklable ' + type(v).__name__\n"
    "        out.append(k + '\\t' + d)\n"
    "    print('\\n'.join(out))\n"
    "__capsule_fp()\n"
    "del __capsule_fp\n";

/* A namespace fingerprint: sorted "name\tfp" lines. */
typedef struct fp {
    char *text;
} fp_t;

typedef struct rb {
    int json;
    uint64_t diffs;
} rb_t;

static void diff(rb_t *b, const char *path, const char *name, const char *what)
{
    b->diffs++;
    printf("%s: %s: %s\n", path, name, what);
}

/* Fingerprints the namespace of worker s into f. */
static int fingerprint(pyw_sync_t *s, fp_t *f)
{
    pyw_sync_run_t *r = NULL;
    int rc = pyw_sync_execute(s, fp_code, NULL, 0, 0, 0, &r);
    if (rc)
        return rc;
    if (r->status != PYW_STATUS_OK) {
        fprintf(stderr, "capsule-replay replay: fingerprinting failed: %s\n",
                r->emsg ? r->emsg : "?");
        pyw_sync_run_free(r);
        return CAP_EPROTO;
    }
    f->text = cap_strdup(r->out ? r->out : "");
    pyw_sync_run_free(r);
    return 0;
}

/* Compares two fingerprints name by name; prints each difference under `path`. */
static void fp_compare(rb_t *b, const char *path, const fp_t *ref, const fp_t *got)
{
    char *a = cap_strdup(ref->text), *c = cap_strdup(got->text);
    char *sa = NULL, *sc = NULL;
    char *la = strtok_r(a, "\n", &sa), *lc = strtok_r(c, "\n", &sc);
    while (la || lc) {
        char *ta = la ? strchr(la, '\t') : NULL, *tc = lc ? strchr(lc, '\t') : NULL;
        if (ta)
            *ta++ = 0;
        if (tc)
            *tc++ = 0;
        int cmp = !la ? 1 : !lc ? -1 : strcmp(la, lc);
        if (cmp < 0) {
            diff(b, path, la, "missing (present after restore)");
            if (ta)
                ta[-1] = '\t';
            la = strtok_r(NULL, "\n", &sa);
            if (tc)
                tc[-1] = '\t';
            continue;
        }
        if (cmp > 0) {
            diff(b, path, lc, "extra (absent after restore)");
            if (ta)
                ta[-1] = '\t';
            if (tc)
                tc[-1] = '\t';
            lc = strtok_r(NULL, "\n", &sc);
            continue;
        }
        if (strcmp(ta ? ta : "", tc ? tc : ""))
            diff(b, path, la, "value differs");
        la = strtok_r(NULL, "\n", &sa);
        lc = strtok_r(NULL, "\n", &sc);
    }
    cap_free(a);
    cap_free(c);
}

/* Applies blobs in order in a fresh worker; reports names that fail to restore. */
static int apply_chain(rb_t *b, const char *path, eng_blob_t *bl, size_t n, pyw_sync_t **out)
{
    pyw_sync_t *s = NULL;
    int rc = pyw_sync_open(NULL, NULL, &s);
    if (rc) {
        fprintf(stderr, "capsule-replay replay: cannot start a worker: %s\n", cap_strerror(rc));
        return rc;
    }
    for (size_t i = 0; i < n && rc == 0; i++) {
        pyw_sync_run_t *r = NULL;
        rc = pyw_sync_apply(s, bl[i].p, bl[i].n, &r);
        if (rc)
            break;
        char what[512];
        if (r->status != PYW_STATUS_OK) {
            snprintf(what, sizeof what, "rejected: %s", r->emsg ? r->emsg : "?");
            diff(b, path, "(blob)", what);
        } else if (r->unpicklable && *r->unpicklable) {
            snprintf(what, sizeof what, "failed to restore: %.480s", r->unpicklable);
            diff(b, path, "(blob)", what);
        }
        pyw_sync_run_free(r);
    }
    if (rc) {
        fprintf(stderr, "capsule-replay replay: applying the chain failed: %s\n", cap_strerror(rc));
        pyw_sync_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* The deltas of sid from ordinal 1 (no checkpoint), in one snapshot. */
static int deltas_read(rp_ctx_t *c, const char *sid, eng_blob_t **bl, size_t *n)
{
    store_txn_t *txn = NULL;
    store_cursor_t *cur = NULL;
    size_t sl = strlen(sid);
    uint8_t kb[ENG_MAX_ID + 16];
    memcpy(kb, sid, sl);
    kb[sl] = 0;
    cap_put_be64(kb + sl + 1, 0);
    store_val_t k = {kb, sl + 9}, v;
    *bl = NULL;
    *n = 0;
    int rc = store_txn_begin(c->env, 1, &txn);
    if (rc == 0)
        rc = store_cursor_open(txn, c->dbi[RP_T_DELTAS], &cur);
    uint64_t want = 1;
    for (rc = rc ? rc : store_cursor_get(cur, &k, &v, STORE_SET_RANGE); rc == 0;
         rc = store_cursor_get(cur, &k, &v, STORE_NEXT)) {
        if (k.len != sl + 9 || memcmp(k.data, kb, sl + 1))
            break;
        if (cap_get_be64((const uint8_t *)k.data + sl + 1) != want++) {
            rc = CAP_ECORRUPT; /* ordinals must be dense */
            break;
        }
        *bl = cap_realloc(*bl, (*n + 1) * sizeof **bl);
        (*bl)[*n].p = cap_memdup(v.data, v.len ? v.len : 1);
        (*bl)[(*n)++].n = v.len;
    }
    store_cursor_close(cur);
    store_txn_abort(txn);
    return rc == CAP_ENOTFOUND ? 0 : rc;
}

static int rerun(rb_t *b, rp_ctx_t *c, const char *sid, const fp_t *ref)
{
    rp_exec_t *x = NULL;
    size_t n = 0;
    int rc = rp_session_execs(c, sid, &x, &n);
    pyw_sync_t *s = NULL;
    if (rc == 0 && (rc = pyw_sync_open(NULL, NULL, &s)) != 0)
        fprintf(stderr, "capsule-replay replay: cannot start a worker: %s\n", cap_strerror(rc));
    size_t ran = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (!x[i].r || !x[i].r->committed)
            continue; /* rolled back (or never finished): not part of the namespace */
        char *src = cap_malloc(x[i].code_len + 1);
        memcpy(src, x[i].code, x[i].code_len);
        src[x[i].code_len] = 0;
        pyw_sync_run_t *r = NULL;
        rc = pyw_sync_execute(s, src, (const char *const *)x[i].inputs, x[i].ninputs, 0, 0, &r);
        cap_free(src);
        if (rc)
            break;
        ran++;
        int rec_ok = x[i].r->status == ENG_ST_OK, now_ok = r->status == PYW_STATUS_OK;
        char what[512];
        if (rec_ok != now_ok) {
            snprintf(what, sizeof what, "recorded %s, re-run %s%s%s", rec_ok ? "ok" : "failed",
                     now_ok ? "ok" : "raised ", r->etype ? r->etype : "", "");
            diff(b, "rerun", x[i].eid, what);
        } else if (rec_ok && x[i].r->repr && r->repr && strcmp(x[i].r->repr, r->repr)) {
            snprintf(what, sizeof what, "value %.200s, recorded %.200s", r->repr, x[i].r->repr);
            diff(b, "rerun", x[i].eid, what);
        }
        pyw_sync_run_free(r);
    }
    fp_t got = {0};
    if (rc == 0)
        rc = fingerprint(s, &got);
    if (rc == 0) {
        fp_compare(b, "rerun", ref, &got);
        printf("rerun: %zu committed execution(s) re-run in a fresh worker\n", ran);
    }
    cap_free(got.text);
    pyw_sync_close(s);
    rp_session_execs_free(x, n);
    return rc;
}

int rp_cmd_replay(int argc, char **argv)
{
    int do_rerun = 0;
    const char *dir = NULL, *sid = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--rerun"))
            do_rerun = 1;
        else if (argv[i][0] == '-')
            return rp_usage_error("replay", "unknown option %s", argv[i]);
        else if (!dir)
            dir = argv[i];
        else if (!sid)
            sid = argv[i];
        else
            return rp_usage_error("replay", "unexpected argument \"%s\"", argv[i]);
    }
    if (!dir || !sid)
        return rp_usage_error("replay", "DIR and SESSION are needed");
    if (!eng__id_valid(sid))
        return rp_usage_error("replay", "\"%s\" is not a session id", sid);
    rp_ctx_t c = {0};
    int st = rp_open(&c, dir, 0);
    if (st)
        return st;
    if (!c.have[RP_T_DELTAS] || !c.have[RP_T_CKPT] || !c.have[RP_T_BASE] || !c.have[RP_T_DOCS]) {
        fprintf(stderr, "capsule-replay: %s has no engine tables\n", dir);
        rp_close(&c);
        return RP_EXIT_OPEN;
    }
    rb_t b = {0};
    eng_tables_t t = {.env = c.env,
                      .results = c.dbi[RP_T_RESULTS],
                      .deltas = c.dbi[RP_T_DELTAS],
                      .ckpt = c.dbi[RP_T_CKPT],
                      .base = c.dbi[RP_T_BASE]};
    eng_blob_t *chain = NULL, *all = NULL;
    size_t nchain = 0, nall = 0;
    uint64_t last = 0, t0 = cap_now_ns();
    pyw_sync_t *ws = NULL, *wa = NULL;
    fp_t ref = {0}, full = {0};
    int rc = eng__last_ordinal(&t, sid, &last);
    if (rc == 0)
        rc = eng__chain_read(&t, sid, 0, &chain, &nchain);
    if (rc) {
        fprintf(stderr, "capsule-replay: cannot read the chain of %s: %s\n", sid, cap_strerror(rc));
        st = RP_EXIT_OPEN;
        goto out;
    }
    printf("session %s: %" PRIu64 " committed delta(s); restore chain of %zu blob(s)\n", sid, last,
           nchain);
    if ((rc = apply_chain(&b, "restore", chain, nchain, &ws)) != 0 ||
        (rc = fingerprint(ws, &ref)) != 0) {
        st = RP_EXIT_OPEN;
        goto out;
    }
    printf("restore: %.3f s\n", (double)(cap_now_ns() - t0) / 1e9);
    rc = deltas_read(&c, sid, &all, &nall);
    if (rc == CAP_ECORRUPT)
        diff(&b, "chain", "(deltas)", "ordinals are not dense from 1");
    else if (rc == 0 && nall == last && nall != nchain) { /* a checkpoint stands for deltas */
        uint64_t t1 = cap_now_ns();
        if ((rc = apply_chain(&b, "chain", all, nall, &wa)) == 0 &&
            (rc = fingerprint(wa, &full)) == 0) {
            fp_compare(&b, "chain", &ref, &full);
            printf("chain: all %zu deltas without the checkpoint, %.3f s\n", nall,
                   (double)(cap_now_ns() - t1) / 1e9);
        }
    } else if (rc == 0) {
        printf("chain: %s\n", nall == nchain ? "no checkpoint: the restore chain is every delta"
                                             : "a fork: its deltas need the parent's chain");
    }
    if (rc && rc != CAP_ECORRUPT) {
        st = RP_EXIT_OPEN;
        goto out;
    }
    rc = 0;
    if (do_rerun) {
        uint64_t t2 = cap_now_ns();
        if ((rc = rerun(&b, &c, sid, &ref)) != 0) {
            st = RP_EXIT_OPEN;
            goto out;
        }
        printf("rerun: %.3f s\n", (double)(cap_now_ns() - t2) / 1e9);
    }
    printf("%s: %" PRIu64 " difference(s)\n", b.diffs ? "DIFFERS" : "OK", b.diffs);
    st = b.diffs ? RP_EXIT_PROBLEM : RP_EXIT_CLEAN;
out:
    pyw_sync_close(ws);
    pyw_sync_close(wa);
    cap_free(ref.text);
    cap_free(full.text);
    eng__blobs_free(chain, nchain);
    eng__blobs_free(all, nall);
    rp_close(&c);
    return st;
}
