/*
 * engine_tasks.h - capsule-engine's REST routes for durable steps and external promises (issue 9),
 * in their own file (tools/engine_tasks.c):
 *   GET  /v1/executions/{eid}/tasks        the execution's steps (eng_tasks_list)
 *   POST /v1/promises/{id}/resolve|reject  settle an external promise ({"value": any JSON})
 * Ids are the client's; the engine's are "<principal>:<id>" as for sessions and executions.
 */
#ifndef ENGINE_TASKS_H
#define ENGINE_TASKS_H

#include "capsule.h"
#include "srv.h"
#include "wsmsg.h"

/* Registers the routes under `api` ("/v1"); blocking engine calls run on `loop`'s thread pool. */
void tasks_routes(srv_server_t *s, const char *api, eng_t *eng, uv_loop_t *loop);

/* From capsule-engine.c: "<principal>:<cid>" (client_id_ok: wsmsg.h). */
char *eng_id(const char *principal, const char *cid);

#endif
