/*
 * rsn.h - the Resonate protocol (2026-04-01) front end of capsule-engine (prefix rsn_): the
 * request envelope on `POST /`, the SSE message stream on `GET /poll/{group}/{id}`, and `GET
 * /health` / `GET /ready`, served by capsule_http (srv.h) on the engine's promise store
 * (promise.h). See ARCHITECTURE.md "tools/resonate".
 *
 * Every protocol kind that promise/ implements maps 1:1 onto its prom_* call; the kinds it does
 * not implement (task.search, schedule.*, debug.*) answer 501. The prom_* calls block until their
 * log records are durable, so they run on the front end's own threads, never on the loop thread.
 *
 * Threads: rsn_open, rsn_close and everything the routes do run on the loop thread of the server
 * (the same loop srv_server_open was given).
 */
#ifndef CAP_RSN_H
#define CAP_RSN_H

#include <stdint.h>

#include "promise.h"
#include "srv.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct rsn rsn_t;

typedef struct rsn_opts {
    /* head.serverUrl of the messages sent to pollers; NULL = "http://127.0.0.1:<port>". */
    const char *server_url;
    uint32_t threads;        /* threads running the blocking promise operations (ops in flight
                                sharing a group commit); 0 = 64 */
    uint32_t tick_ms;        /* timer tick and outbox poll period; 0 = 100 */
    uint32_t park_max;       /* messages taken for an absent poller kept in memory; 0 = 10000 */
    uint32_t json_max_depth; /* request nesting; 400 beyond; 0 = 32 */
} rsn_opts_t;

/* Adds the routes `POST /`, `GET /poll/{group}/{id}`, `GET /health`, `GET /ready` to `srv` (which
 * must outlive the front end, like `loop` and `ps`: all borrowed), starts the threads and the
 * timer tick. Returns 0 and *out, or CAP_EINVAL (a route could not be added). */
int rsn_open(uv_loop_t *loop, srv_server_t *srv, prom_store_t *ps, const rsn_opts_t *opts,
             rsn_t **out);

/* Stops the front end, before srv_server_close: waits for the operations already submitted
 * (their answers are sent), ends every poll stream, stops the threads and the timer. Memory is
 * released from libuv close callbacks (run the loop). After it, the routes must get no more
 * requests (close the server right away). NULL is a no-op. */
void rsn_close(rsn_t *r);

/* Counters since open. */
typedef struct rsn_stats {
    uint64_t requests, errors;      /* envelopes answered; of them non-200/300 */
    uint64_t sent, parked, dropped; /* messages streamed; kept for an absent poller; dropped */
    uint32_t pollers;
} rsn_stats_t;
void rsn_stats(const rsn_t *r, rsn_stats_t *out);

#ifdef __cplusplus
}
#endif
#endif /* CAP_RSN_H */
