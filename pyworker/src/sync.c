/*
 * sync.c - a blocking layer over the client for tests and tools: one worker on a private uv loop,
 * each call runs that loop until its answer (or the worker's death) arrives.
 * Invariants: at most one request is outstanding; everything a run collects is copied into the
 * caller-owned pyw_sync_run_t; closing runs the loop until every handle is closed.
 */
#include "pyw_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cap.h"

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf_t;

static void sb_add(sbuf_t *s, const char *p, size_t n)
{
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 256;
        while (cap < s->len + n + 1)
            cap *= 2;
        s->p = cap_realloc(s->p, cap);
        s->cap = cap;
    }
    memcpy(s->p + s->len, p, n);
    s->len += n;
    s->p[s->len] = 0;
}

static void sb_str(sbuf_t *s, const char *p)
{
    sb_add(s, p, strlen(p));
}

static char *sb_take(sbuf_t *s)
{
    if (!s->p)
        return cap_strdup("");
    char *p = s->p;
    s->p = NULL;
    s->len = s->cap = 0;
    return p;
}

const char pyw_sync_hold[] = "(hold)";

struct pyw_sync {
    uv_loop_t loop;
    pyw_worker_t *w;
    pyw_callbacks_t cb;
    uint64_t next_id;
    /* the request in progress */
    uint64_t cur_id;
    int done, ready, exited;
    pyw_sync_run_t *run;
    sbuf_t transcript, out, err;
    const char *const *inputs;
    size_t n_inputs, next_input;
    uv_timer_t cancel_timer, wait_timer;
    int wait_expired;
    pyw_exit_t exit;
    char exit_msg[256];
};

static char *dup_or_null(const char *s)
{
    return s ? cap_strdup(s) : NULL;
}

static char *join_names(const char *const *v, size_t n)
{
    sbuf_t s = {0};
    for (size_t i = 0; i < n; i++) {
        if (i)
            sb_str(&s, ",");
        sb_str(&s, v[i]);
    }
    return sb_take(&s);
}

static char *join_pairs(const pyw_pair_t *v, size_t n)
{
    sbuf_t s = {0};
    for (size_t i = 0; i < n; i++) {
        sb_str(&s, v[i].name);
        sb_str(&s, ":");
        sb_str(&s, v[i].reason);
        sb_str(&s, ";");
    }
    return sb_take(&s);
}

static void fill_delta(pyw_sync_run_t *r, const pyw_delta_t *d)
{
    r->delta_blob = pyw__memdup0(d->blob, d->blob_len);
    r->delta_len = d->blob_len;
    r->added = join_names(d->added, d->n_added);
    r->changed = join_names(d->changed, d->n_changed);
    r->mutated = join_names(d->mutated, d->n_mutated);
    r->deleted = join_names(d->deleted, d->n_deleted);
    r->unpicklable = join_pairs(d->unpicklable, d->n_unpicklable);
}

static void s_on_ready(pyw_worker_t *w)
{
    pyw_sync_t *s = pyw_worker_data(w);
    s->ready = 1;
}

static void s_on_output(pyw_worker_t *w, uint64_t id, int stream, const char *data, size_t len)
{
    pyw_sync_t *s = pyw_worker_data(w);
    (void)id;
    sb_str(&s->transcript, stream == 1 ? "[1]" : "[2]");
    sb_add(&s->transcript, data, len);
    sb_add(stream == 1 ? &s->out : &s->err, data, len);
    if (s->run)
        s->run->n_chunks++;
}

static void s_on_input(pyw_worker_t *w, uint64_t id, const char *prompt, int password)
{
    pyw_sync_t *s = pyw_worker_data(w);
    (void)password;
    sb_str(&s->transcript, "[in:");
    sb_str(&s->transcript, prompt);
    sb_str(&s->transcript, "]");
    if (s->next_input < s->n_inputs && s->inputs[s->next_input] == pyw_sync_hold) {
        s->next_input++;
    } else if (s->next_input < s->n_inputs && s->inputs[s->next_input]) {
        const char *t = s->inputs[s->next_input++];
        pyw_worker_input_reply(w, id, t, strlen(t), 0);
    } else {
        s->next_input++;
        pyw_worker_input_reply(w, id, NULL, 0, 1);
    }
}

static void s_on_result(pyw_worker_t *w, const pyw_result_t *res)
{
    pyw_sync_t *s = pyw_worker_data(w);
    if (!s->run || res->exec_id != s->cur_id)
        return;
    pyw_sync_run_t *r = s->run;
    r->status = res->status;
    r->cell_no = res->cell_no;
    r->repr = dup_or_null(res->repr);
    r->json = dup_or_null(res->json);
    r->etype = dup_or_null(res->etype);
    r->emsg = dup_or_null(res->emsg);
    r->traceback = dup_or_null(res->traceback);
    r->delta_error = dup_or_null(res->delta_error);
    r->not_run = res->not_run;
    if (res->delta)
        fill_delta(r, res->delta);
    s->done = 1;
}

static void s_on_snapshot(pyw_worker_t *w, uint64_t id, int rc, const pyw_delta_t *d,
                          const char *error)
{
    pyw_sync_t *s = pyw_worker_data(w);
    if (!s->run || id != s->cur_id)
        return;
    s->run->status = rc ? PYW_STATUS_ERROR : PYW_STATUS_OK;
    if (d)
        fill_delta(s->run, d);
    s->run->emsg = dup_or_null(error);
    s->done = 1;
}

static void s_on_applied(pyw_worker_t *w, const pyw_apply_result_t *a)
{
    pyw_sync_t *s = pyw_worker_data(w);
    if (!s->run || a->req_id != s->cur_id)
        return;
    s->run->status = a->rc ? PYW_STATUS_ERROR : PYW_STATUS_OK;
    s->run->emsg = dup_or_null(a->error);
    s->run->added = join_names(a->restored, a->n_restored);
    s->run->deleted = join_names(a->deleted, a->n_deleted);
    s->run->unpicklable = join_pairs(a->failed, a->n_failed);
    s->done = 1;
}

static void s_on_pong(pyw_worker_t *w, uint64_t id)
{
    pyw_sync_t *s = pyw_worker_data(w);
    if (id == s->cur_id)
        s->done = 1;
}

static void s_on_exit(pyw_worker_t *w, const pyw_exit_t *e)
{
    pyw_sync_t *s = pyw_worker_data(w);
    s->exited = 1;
    s->exit = *e;
    snprintf(s->exit_msg, sizeof s->exit_msg, "%s", e->message ? e->message : "");
    s->exit.message = s->exit_msg;
    if (s->run) {
        s->run->died = 1;
        s->run->exit = s->exit;
        s->run->exit_message = cap_strdup(s->exit_msg);
        s->run->exit.message = s->run->exit_message;
    }
}

int pyw_sync_open(pyw_zygote_t *z, const pyw_options_t *opt, pyw_sync_t **out)
{
    pyw_options_t o;
    int rc;
    pyw_sync_t *s = cap_calloc(1, sizeof *s);
    if (opt)
        o = *opt;
    else
        memset(&o, 0, sizeof o);
    s->cb.on_ready = s_on_ready;
    s->cb.on_output = s_on_output;
    s->cb.on_input = s_on_input;
    s->cb.on_result = s_on_result;
    s->cb.on_snapshot = s_on_snapshot;
    s->cb.on_applied = s_on_applied;
    s->cb.on_pong = s_on_pong;
    s->cb.on_exit = s_on_exit;
    o.cb = &s->cb;
    o.data = s;
    uv_loop_init(&s->loop);
    uv_timer_init(&s->loop, &s->cancel_timer);
    uv_timer_init(&s->loop, &s->wait_timer);
    s->cancel_timer.data = s->wait_timer.data = s;
    rc = z ? pyw_zygote_spawn(z, &s->loop, &o, &s->w) : pyw_worker_spawn(&s->loop, &o, &s->w);
    if (rc)
        goto fail;
    while (!s->ready && !s->exited)
        uv_run(&s->loop, UV_RUN_ONCE);
    if (!s->ready) {
        rc = CAP_EWORKER;
        goto fail;
    }
    *out = s;
    return 0;
fail:
    pyw_sync_close(s);
    return rc;
}

static void run_until_done(pyw_sync_t *s)
{
    while (!s->done && !s->exited)
        uv_run(&s->loop, UV_RUN_ONCE);
}

static pyw_sync_run_t *run_begin(pyw_sync_t *s)
{
    s->run = cap_calloc(1, sizeof *s->run);
    s->done = 0;
    s->cur_id = ++s->next_id;
    return s->run;
}

static void run_end(pyw_sync_t *s, pyw_sync_run_t **out)
{
    pyw_sync_run_t *r = s->run;
    r->transcript = sb_take(&s->transcript);
    r->out = sb_take(&s->out);
    r->err = sb_take(&s->err);
    if (!s->done && s->exited && !r->died) {
        r->died = 1;
        r->exit = s->exit;
        r->exit_message = cap_strdup(s->exit_msg);
        r->exit.message = r->exit_message;
    }
    if (!s->done)
        r->status = PYW_STATUS_DIED;
    s->run = NULL;
    *out = r;
}

static void on_cancel_timer(uv_timer_t *t)
{
    pyw_sync_t *s = t->data;
    if (!s->done && !s->exited)
        pyw_worker_cancel(s->w, s->cur_id);
}

int pyw_sync_execute(pyw_sync_t *s, const char *source, const char *const *inputs, size_t n_inputs,
                     uint32_t cancel_after_ms, uint32_t timeout_ms, pyw_sync_run_t **out)
{
    if (s->exited)
        return CAP_ECLOSED;
    run_begin(s);
    s->inputs = inputs;
    s->n_inputs = n_inputs;
    s->next_input = 0;
    int rc = pyw_worker_execute(s->w, s->cur_id, NULL, source, strlen(source), timeout_ms);
    if (rc) {
        pyw_sync_run_free(s->run);
        s->run = NULL;
        return rc;
    }
    if (cancel_after_ms)
        uv_timer_start(&s->cancel_timer, on_cancel_timer, cancel_after_ms, 0);
    run_until_done(s);
    uv_timer_stop(&s->cancel_timer);
    run_end(s, out);
    return 0;
}

int pyw_sync_snapshot(pyw_sync_t *s, pyw_sync_run_t **out)
{
    if (s->exited)
        return CAP_ECLOSED;
    run_begin(s);
    int rc = pyw_worker_snapshot(s->w, s->cur_id);
    if (rc) {
        pyw_sync_run_free(s->run);
        s->run = NULL;
        return rc;
    }
    run_until_done(s);
    run_end(s, out);
    return 0;
}

int pyw_sync_apply(pyw_sync_t *s, const void *blob, size_t len, pyw_sync_run_t **out)
{
    if (s->exited)
        return CAP_ECLOSED;
    run_begin(s);
    int rc = pyw_worker_apply(s->w, s->cur_id, blob, len);
    if (rc) {
        pyw_sync_run_free(s->run);
        s->run = NULL;
        return rc;
    }
    run_until_done(s);
    run_end(s, out);
    return 0;
}

int pyw_sync_ping(pyw_sync_t *s)
{
    if (s->exited)
        return CAP_ECLOSED;
    s->done = 0;
    s->cur_id = ++s->next_id;
    int rc = pyw_worker_ping(s->w, s->cur_id);
    if (rc)
        return rc;
    run_until_done(s);
    return s->done ? 0 : CAP_ECLOSED;
}

static void on_wait_timer(uv_timer_t *t)
{
    pyw_sync_t *s = t->data;
    s->wait_expired = 1;
}

int pyw_sync_wait_exit(pyw_sync_t *s, uint32_t timeout_ms, pyw_exit_t *exit_out)
{
    s->wait_expired = 0;
    uv_timer_start(&s->wait_timer, on_wait_timer, timeout_ms, 0);
    while (!s->exited && !s->wait_expired)
        uv_run(&s->loop, UV_RUN_ONCE);
    uv_timer_stop(&s->wait_timer);
    if (!s->exited)
        return CAP_ETIMEDOUT;
    *exit_out = s->exit;
    return 0;
}

pyw_worker_t *pyw_sync_worker(pyw_sync_t *s)
{
    return s->w;
}

void pyw_sync_close(pyw_sync_t *s)
{
    if (!s)
        return;
    if (s->w && !s->exited && pyw_worker_shutdown(s->w) == 0) {
        pyw_exit_t e;
        (void)pyw_sync_wait_exit(s, 2000, &e);
    }
    pyw_worker_close(s->w);
    pyw_reap_wait(); /* the synchronous API leaves no child behind */
    uv_close((uv_handle_t *)&s->cancel_timer, NULL);
    uv_close((uv_handle_t *)&s->wait_timer, NULL);
    while (uv_run(&s->loop, UV_RUN_DEFAULT) != 0)
        ;
    if (uv_loop_close(&s->loop) != 0)
        cap_log(CAP_LOG_ERROR, "pyworker", "sync loop did not close cleanly");
    cap_free(s->transcript.p);
    cap_free(s->out.p);
    cap_free(s->err.p);
    cap_free(s);
}

void pyw_sync_run_free(pyw_sync_run_t *r)
{
    if (!r)
        return;
    char *f[] = {r->repr,        r->json,       r->etype,   r->emsg,    r->traceback,
                 r->delta_error, r->transcript, r->out,     r->err,     (char *)r->delta_blob,
                 r->added,       r->changed,    r->mutated, r->deleted, r->unpicklable,
                 r->exit_message};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        cap_free(f[i]);
    cap_free(r);
}
