/*
 * json.c - every JSON document read from the network is parsed here (jansson, 64-bit integers).
 *
 * Invariants:
 *   - nesting depth is checked by a scan of the raw text before jansson sees it (jansson's own
 *     limit is 2048, far above what any request needs, and it recurses);
 *   - duplicate keys, invalid UTF-8 and "\u0000" are refused (JSON_REJECT_DUPLICATES; jansson
 *     validates UTF-8 and refuses NUL unless JSON_ALLOW_NUL);
 *   - request objects are checked against a field list: unknown members are errors, so a typo in
 *     an option never passes silently.
 */
#include <stdio.h>
#include <string.h>

#include "cap.h"
#include "srv_int.h"

/* The deepest nesting of [ and { outside strings; stops counting once past `limit`. */
static uint32_t json_depth(const char *s, size_t len, uint32_t limit)
{
    uint32_t depth = 0, max = 0;
    int in_str = 0, esc = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (in_str) {
            if (esc)
                esc = 0;
            else if (c == '\\')
                esc = 1;
            else if (c == '"')
                in_str = 0;
            continue;
        }
        if (c == '"') {
            in_str = 1;
        } else if (c == '[' || c == '{') {
            if (++depth > max) {
                max = depth;
                if (max > limit)
                    return max;
            }
        } else if ((c == ']' || c == '}') && depth > 0) {
            depth--;
        }
    }
    return max;
}

int srv_json_parse(const char *text, size_t len, uint32_t max_depth, json_t **out, char *err,
                   size_t errlen)
{
    err[0] = 0;
    if (json_depth(text, len, max_depth) > max_depth) {
        snprintf(err, errlen, "JSON nested deeper than %u levels", max_depth);
        return CAP_ETOOBIG;
    }
    json_error_t je;
    json_t *v = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!v) {
        snprintf(err, errlen, "malformed JSON at line %d column %d: %s", je.line, je.column,
                 je.text);
        return CAP_EPROTO;
    }
    *out = v;
    return 0;
}

static const char *type_name(srv_jtype_t t)
{
    switch (t) {
    case SRV_JSTRING:
        return "a string";
    case SRV_JINT:
        return "an integer";
    case SRV_JNUMBER:
        return "a number";
    case SRV_JBOOL:
        return "a boolean";
    case SRV_JOBJECT:
        return "an object";
    case SRV_JARRAY:
        return "an array";
    default:
        return "any value";
    }
}

static int type_ok(const json_t *v, srv_jtype_t t)
{
    switch (t) {
    case SRV_JSTRING:
        return json_is_string(v);
    case SRV_JINT:
        return json_is_integer(v);
    case SRV_JNUMBER:
        return json_is_number(v);
    case SRV_JBOOL:
        return json_is_boolean(v);
    case SRV_JOBJECT:
        return json_is_object(v);
    case SRV_JARRAY:
        return json_is_array(v);
    default:
        return 1;
    }
}

int srv_json_check(const json_t *obj, const srv_field_t *fields, char *err, size_t errlen)
{
    err[0] = 0;
    if (!json_is_object(obj)) {
        snprintf(err, errlen, "expected a JSON object");
        return CAP_EINVAL;
    }
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)obj, key, val)
    {
        const srv_field_t *f = fields;
        while (f && f->name && strcmp(f->name, key) != 0)
            f++;
        if (!f || !f->name) {
            snprintf(err, errlen, "unknown field \"%.64s\"", key);
            return CAP_EINVAL;
        }
        if (!json_is_null(val) && !type_ok(val, f->type)) {
            snprintf(err, errlen, "field \"%s\" must be %s", f->name, type_name(f->type));
            return CAP_EINVAL;
        }
        if (json_is_null(val) && f->required) {
            snprintf(err, errlen, "field \"%s\" must not be null", f->name);
            return CAP_EINVAL;
        }
    }
    for (const srv_field_t *f = fields; f && f->name; f++) {
        if (f->required && !json_object_get(obj, f->name)) {
            snprintf(err, errlen, "missing required field \"%s\"", f->name);
            return CAP_EINVAL;
        }
    }
    return 0;
}
