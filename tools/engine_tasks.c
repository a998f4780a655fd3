/*
 * engine_tasks.c - REST routes for durable steps and external promises (see engine_tasks.h and
 * tools/openapi.json). Each request runs its blocking engine call on the libuv thread pool and
 * answers on the loop; a client gone meanwhile is simply not answered.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_tasks.h"

static struct {
    eng_t *eng;
    uv_loop_t *loop;
} T;

enum { TJ_LIST, TJ_RESOLVE, TJ_REJECT };

typedef struct tjob {
    uv_work_t w;
    srv_req_t *req;
    int op;
    char *id;   /* the engine's id */
    char *cid;  /* the client's id */
    char *data; /* settle: the value as JSON text */
    int rc, state;
    eng_task_info_t *tasks;
    size_t n;
} tjob_t;

static void tjob_abort(srv_req_t *req, void *arg)
{
    (void)req;
    ((tjob_t *)arg)->req = NULL;
}

static void tjob_work(uv_work_t *w)
{
    tjob_t *j = w->data;
    if (j->op == TJ_LIST)
        j->rc = eng_tasks_list(T.eng, j->id, &j->tasks, &j->n);
    else
        j->rc = eng_promise_settle(T.eng, j->id, j->op == TJ_RESOLVE, j->data,
                                   j->data ? strlen(j->data) : 0, &j->state);
}

static json_t *task_json(const char *ceid, const eng_task_info_t *t)
{
    char id[512];
    snprintf(id, sizeof id, "%s.%s", ceid, t->path);
    json_t *o = json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:I}", "id", id, "path", t->path, "name",
                          t->name, "kind", t->kind, "state", t->state, "attempts", (int)t->attempts,
                          "created_at", (json_int_t)t->created_at);
    if (t->settled_at)
        json_object_set_new(o, "settled_at", json_integer(t->settled_at));
    if (t->timeout_at)
        json_object_set_new(o, "deadline", json_integer(t->timeout_at));
    return o;
}

static void tjob_done(uv_work_t *w, int status)
{
    (void)status;
    tjob_t *j = w->data;
    srv_req_t *req = j->req;
    if (req)
        srv_req_on_abort(req, NULL, NULL);
    if (!req) {
    } else if (j->op == TJ_LIST && j->rc == CAP_ENOTFOUND) {
        srv_reply_error(req, 404, "execution_not_found", "no execution \"%s\"", j->cid);
    } else if (j->rc == CAP_ENOTFOUND) {
        srv_reply_error(req, 404, "promise_not_found",
                        "no promise \"%s\" (it exists once an execution waits on it)", j->cid);
    } else if (j->rc) {
        srv_reply_error(req, 503, "engine_error", "%s", cap_strerror(j->rc));
    } else if (j->op == TJ_LIST) {
        json_t *a = json_array();
        for (size_t i = 0; i < j->n; i++)
            json_array_append_new(a, task_json(j->cid, &j->tasks[i]));
        srv_reply_json(req, 200, json_pack("{s:s,s:o}", "execution", j->cid, "tasks", a));
    } else {
        srv_reply_json(
            req, 200,
            json_pack("{s:s,s:s}", "id", j->cid, "state", j->state == 1 ? "resolved" : "rejected"));
    }
    eng_tasks_free(j->tasks, j->n);
    cap_free(j->id);
    cap_free(j->cid);
    cap_free(j->data);
    cap_free(j);
}

static void tjob_submit(srv_req_t *req, int op, const char *cid, char *data)
{
    tjob_t *j = cap_calloc(1, sizeof *j);
    j->w.data = j;
    j->req = req;
    j->op = op;
    j->cid = cap_strdup(cid);
    j->id = eng_id(srv_req_principal(req), cid);
    j->data = data;
    srv_req_on_abort(req, tjob_abort, j);
    int rc = uv_queue_work(T.loop, &j->w, tjob_work, tjob_done);
    if (rc) {
        srv_req_on_abort(req, NULL, NULL);
        srv_reply_error(req, 503, "busy", "cannot queue work: %s", uv_strerror(rc));
        j->req = NULL;
        tjob_done(&j->w, 0);
    }
}

static void h_tasks(srv_req_t *req, void *arg)
{
    (void)arg;
    const char *eid = srv_req_param(req, "eid");
    if (!client_id_ok(eid)) {
        srv_reply_error(req, 404, "execution_not_found", "no execution \"%.64s\"", eid ? eid : "");
        return;
    }
    tjob_submit(req, TJ_LIST, eid, NULL);
}

static const srv_field_t settle_fields[] = {{"value", SRV_JANY, 0}, {NULL, 0, 0}};

static void h_settle(srv_req_t *req, void *arg)
{
    const char *id = srv_req_param(req, "id");
    if (!client_id_ok(id)) {
        srv_reply_error(req, 404, "promise_not_found", "no promise \"%.64s\"", id ? id : "");
        return;
    }
    json_t *b;
    if (srv_req_json(req, settle_fields, &b) != 0)
        return;
    json_t *v = json_object_get(b, "value");
    char *text = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    char *data = text ? cap_strdup(text) : NULL;
    free(text);
    json_decref(b);
    tjob_submit(req, arg ? TJ_RESOLVE : TJ_REJECT, id, data);
}

void tasks_routes(srv_server_t *s, const char *api, eng_t *eng, uv_loop_t *loop)
{
    T.eng = eng;
    T.loop = loop;
    char p[128];
    snprintf(p, sizeof p, "%s/executions/{eid}/tasks", api);
    srv_server_route(s, "GET", p, 0, h_tasks, NULL);
    snprintf(p, sizeof p, "%s/promises/{id}/resolve", api);
    srv_server_route(s, "POST", p, 0, h_settle, (void *)1);
    snprintf(p, sizeof p, "%s/promises/{id}/reject", api);
    srv_server_route(s, "POST", p, 0, h_settle, NULL);
}
