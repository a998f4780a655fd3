/*
 * wsmsg.h - what capsule-engine accepts from clients before anything reaches the engine: client
 * ids, transaction policy names, and the WebSocket session's messages (execute, resume,
 * input_reply, cancel) validated into a wsmsg_t. Pure (a JSON document in, a decision out: no
 * engine, no I/O), so the fuzz target wsmsg runs it on arbitrary bytes (tests/server/fuzz/).
 */
#ifndef CAPSULE_WSMSG_H
#define CAPSULE_WSMSG_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define WSMSG_ID_MAX 128

/* A valid client id: 1..WSMSG_ID_MAX characters of [A-Za-z0-9._-] (so never a ':'). */
int client_id_ok(const char *s);

/* A transaction policy by name (eng_tx_t's values; NULL: ENG_TX_DEFAULT); -1 for an unknown name.
 */
int tx_from_name(const char *t);
/* ... and its name (tx in eng_tx_t's range). */
const char *tx_name(int tx);

/* An execution's "timeout_ms" (REST body or WebSocket message; absent: 0, the session's): 0 and
 * *out, or -1 when it is not 0..UINT32_MAX (type-checked as an integer before: srv_json_check). */
int exec_timeout_ms(json_t *m, uint32_t *out);
#define EXEC_TIMEOUT_ERR "timeout_ms must be 0..4294967295 (0: the session's timeout)"

typedef enum { WSMSG_EXECUTE, WSMSG_RESUME, WSMSG_INPUT_REPLY, WSMSG_CANCEL } wsmsg_type_t;

typedef struct wsmsg {
    wsmsg_type_t type;
    const char *eid;     /* borrowed from the document; NULL when absent (execute only) */
    const char *code;    /* execute */
    int tx;              /* execute: an eng_tx_t */
    uint32_t timeout_ms; /* execute: its own timeout (0 or absent: the session's) */
    uint64_t offset;     /* resume: output offset (negative given: 0) */
    const char *text;    /* input_reply: NULL (absent) is end of input, as eof */
    int eof;             /* input_reply */
} wsmsg_t;

/*
 * Validates one client message (a JSON document from srv_json_parse). 0 and *out filled, or -1
 * with err (NUL-terminated, errn > 0) saying why; the error reply is "invalid_message" and names
 * out->eid, the message's own eid when it was a valid id (or any string while the type is
 * missing), else NULL. Borrowed pointers live as long as m.
 */
int wsmsg_parse(json_t *m, wsmsg_t *out, char *err, size_t errn);

#endif
