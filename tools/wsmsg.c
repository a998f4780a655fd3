/*
 * wsmsg.c - see wsmsg.h.
 */
#include "wsmsg.h"

#include <stdio.h>
#include <string.h>

#include "capsule.h"
#include "srv.h"

int client_id_ok(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > WSMSG_ID_MAX)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '.' || *s == '_' || *s == '-'))
            return 0;
    return 1;
}

/* The transaction policies by name (index = eng_tx_t). */
static const char *const tx_names[] = {"default", "rollback_on_failure", "commit_always",
                                       "rollback_always"};

int tx_from_name(const char *t)
{
    if (!t)
        return ENG_TX_DEFAULT;
    for (int i = ENG_TX_ROLLBACK_ON_FAILURE; i <= ENG_TX_ROLLBACK_ALWAYS; i++)
        if (strcmp(t, tx_names[i]) == 0)
            return i;
    return -1;
}

const char *tx_name(int tx)
{
    return tx >= 0 && tx <= ENG_TX_ROLLBACK_ALWAYS ? tx_names[tx] : "default";
}

static int fail(char *err, size_t errn, const char *why)
{
    snprintf(err, errn, "%s", why);
    return -1;
}

int exec_timeout_ms(json_t *m, uint32_t *out)
{
    json_int_t t = json_integer_value(json_object_get(m, "timeout_ms"));
    if (t < 0 || t > UINT32_MAX)
        return -1;
    *out = (uint32_t)t;
    return 0;
}

int wsmsg_parse(json_t *m, wsmsg_t *out, char *err, size_t errn)
{
    static const srv_field_t f_exec[] = {{"type", SRV_JSTRING, 1},    {"eid", SRV_JSTRING, 0},
                                         {"code", SRV_JSTRING, 1},    {"tx", SRV_JSTRING, 0},
                                         {"timeout_ms", SRV_JINT, 0}, {NULL, 0, 0}};
    static const srv_field_t f_resume[] = {{"type", SRV_JSTRING, 1},
                                           {"eid", SRV_JSTRING, 1},
                                           {"output_offset", SRV_JINT, 0},
                                           {NULL, 0, 0}};
    static const srv_field_t f_input[] = {{"type", SRV_JSTRING, 1},
                                          {"eid", SRV_JSTRING, 1},
                                          {"text", SRV_JSTRING, 0},
                                          {"eof", SRV_JBOOL, 0},
                                          {NULL, 0, 0}};
    static const srv_field_t f_cancel[] = {
        {"type", SRV_JSTRING, 1}, {"eid", SRV_JSTRING, 1}, {NULL, 0, 0}};
    memset(out, 0, sizeof(*out));
    const char *type = json_string_value(json_object_get(m, "type"));
    out->eid = json_string_value(json_object_get(m, "eid"));
    if (!type)
        return fail(err, errn, "every message needs a \"type\"");
    if (out->eid && !client_id_ok(out->eid)) {
        out->eid = NULL;
        return fail(err, errn, "eid must be 1..128 characters of [A-Za-z0-9._-]");
    }
    const srv_field_t *f;
    if (strcmp(type, "execute") == 0) {
        out->type = WSMSG_EXECUTE;
        f = f_exec;
    } else if (strcmp(type, "resume") == 0) {
        out->type = WSMSG_RESUME;
        f = f_resume;
    } else if (strcmp(type, "input_reply") == 0) {
        out->type = WSMSG_INPUT_REPLY;
        f = f_input;
    } else if (strcmp(type, "cancel") == 0) {
        out->type = WSMSG_CANCEL;
        f = f_cancel;
    } else {
        return fail(err, errn, "type must be execute, resume, input_reply or cancel");
    }
    if (srv_json_check(m, f, err, errn) != 0)
        return -1;
    switch (out->type) {
    case WSMSG_EXECUTE:
        out->code = json_string_value(json_object_get(m, "code"));
        out->tx = tx_from_name(json_string_value(json_object_get(m, "tx")));
        if (out->tx < 0)
            return fail(err, errn, "unknown tx policy");
        if (exec_timeout_ms(m, &out->timeout_ms) != 0)
            return fail(err, errn, EXEC_TIMEOUT_ERR);
        break;
    case WSMSG_RESUME: {
        json_int_t off = json_integer_value(json_object_get(m, "output_offset"));
        out->offset = off > 0 ? (uint64_t)off : 0;
        break;
    }
    case WSMSG_INPUT_REPLY:
        out->text = json_string_value(json_object_get(m, "text"));
        out->eof = json_is_true(json_object_get(m, "eof")) || !out->text;
        break;
    case WSMSG_CANCEL:
        break;
    }
    return 0;
}
