/*
 * fuzz_targets.c - see fuzz_targets.h.
 */
#include "fuzz_targets.h"

#include <string.h>

#include "capsule.h"
#include "check.h"
#include "wsmsg.h"

fuzz_counts_t fuzz_counts;
srv_limits_t fuzz_lim;
static uint64_t rng = 88172645463325252ULL;

const char *const fuzz_target_names[FUZZ_NTARGETS] = {"http", "ws", "json", "wsmsg"};

void fuzz_init(uint64_t seed)
{
    srv_limits_default(&fuzz_lim);
    fuzz_lim.max_url_bytes = 256;
    fuzz_lim.max_header_bytes = 1024;
    fuzz_lim.max_headers = 16;
    fuzz_lim.max_body_bytes = 4096;
    fuzz_lim.ws_max_frame = 2048;
    fuzz_lim.ws_max_msg = 6000;
    fuzz_lim.json_max_depth = 16;
    fuzz_reseed(seed);
}

void fuzz_reseed(uint64_t seed)
{
    rng = seed ? seed : 88172645463325252ULL; /* xorshift must not start at 0 */
}

uint64_t fuzz_rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

size_t fuzz_rnd_below(size_t n)
{
    return n ? (size_t)(fuzz_rnd() % n) : 0;
}

void fuzz_json(const uint8_t *d, size_t n)
{
    json_t *v = NULL;
    char err[256];
    err[0] = 0;
    int rc = srv_json_parse((const char *)d, n, fuzz_lim.json_max_depth, &v, err, sizeof(err));
    CHECK(rc == 0 || rc == CAP_EPROTO || rc == CAP_ETOOBIG);
    CHECK(strlen(err) < sizeof(err));
    if (rc == 0) {
        static const srv_field_t f[] = {
            {"a", SRV_JSTRING, 1}, {"b", SRV_JINT, 0}, {"c", SRV_JOBJECT, 0}, {NULL, 0, 0}};
        if (srv_json_check(v, f, err, sizeof(err)) != 0)
            CHECK(err[0] != 0);
        fuzz_counts.json_ok++;
        json_decref(v);
    } else {
        CHECK(err[0] != 0);
    }
}

void fuzz_http(const uint8_t *d, size_t n)
{
    srv__hparser_t *p;
    srv__hparser_new(&fuzz_lim, &p);
    size_t off = 0;
    int guard = 0;
    while (off < n && guard++ < 10000) {
        size_t piece = 1 + fuzz_rnd_below(n - off);
        size_t used = 0;
        int status = 0;
        int ev = srv__hparser_feed(p, (const char *)d + off, piece, &used, &status);
        CHECK(used <= piece);
        off += used;
        if (ev == SRV__HP_ERROR) {
            CHECK(status == 400 || status == 413 || status == 414 || status == 431 ||
                  status == 417 || status == 505);
            CHECK(srv__hparser_error(p)[0] != 0);
            fuzz_counts.http_err++;
            break;
        }
        if (ev == SRV__HP_DONE) {
            srv__hmsg_t *m = srv__hparser_msg(p);
            CHECK(m->url && m->url_len <= fuzz_lim.max_url_bytes);
            CHECK(m->body_len <= fuzz_lim.max_body_bytes);
            CHECK(m->nhdrs <= fuzz_lim.max_headers);
            CHECK(m->method[0] != 0);
            fuzz_counts.http_done++;
            if (m->upgrade)
                break; /* the rest would be another protocol's */
            srv__hparser_next(p);
            continue;
        }
        if (used == 0 && piece == n - off)
            break; /* needs more than there is */
    }
    srv__hparser_free(p);
}

typedef struct wsctx {
    size_t written;
    srv__wsproto_t *ws;
} wsctx_t;

static void ws_text(void *arg, const uint8_t *data, size_t len)
{
    wsctx_t *c = arg;
    CHECK(len <= fuzz_lim.ws_max_msg);
    fuzz_counts.ws_text++;
    fuzz_json(data, len);
    if (len & 1) /* answer some, as an application would, from inside the callback */
        srv__wsproto_send_text(c->ws, "{\"ok\":1}", 8);
}

static void ws_binary(void *arg, size_t len)
{
    (void)arg;
    CHECK(len <= fuzz_lim.ws_max_msg);
}

static void ws_write(void *arg, const uint8_t *data, size_t len)
{
    wsctx_t *c = arg;
    CHECK(data != NULL || len == 0);
    c->written += len;
}

void fuzz_ws(const uint8_t *d, size_t n)
{
    wsctx_t c = {0};
    srv__wsproto_cb_t cb = {ws_text, ws_binary, ws_write};
    srv__wsproto_new(&fuzz_lim, &cb, &c, &c.ws);
    size_t off = 0;
    while (off < n) {
        size_t piece = 1 + fuzz_rnd_below(n - off);
        if (srv__wsproto_feed(c.ws, d + off, piece) != 0)
            break;
        off += piece;
        if (srv__wsproto_done(c.ws))
            break;
    }
    srv__wsproto_send_text(c.ws, "{}", 2);
    srv__wsproto_close(c.ws, 1000, "end");
    srv__wsproto_free(c.ws);
}

void fuzz_wsmsg(const uint8_t *d, size_t n)
{
    json_t *v = NULL;
    char err[256];
    int rc = srv_json_parse((const char *)d, n, fuzz_lim.json_max_depth, &v, err, sizeof(err));
    if (rc != 0)
        return; /* the JSON layer's own target covers this */
    wsmsg_t q;
    err[0] = 0;
    if (wsmsg_parse(v, &q, err, sizeof(err)) != 0) {
        CHECK(err[0] != 0 && strlen(err) < sizeof(err));
        /* the error names the message's eid only when it is a valid id, or the type is missing */
        CHECK(q.eid == NULL || client_id_ok(q.eid) || !json_is_string(json_object_get(v, "type")));
        json_decref(v);
        return;
    }
    fuzz_counts.wsmsg_ok++;
    /* an accepted message: exactly the fields its type allows, each of the right kind */
    const char *type = json_string_value(json_object_get(v, "type"));
    CHECK(type != NULL);
    CHECK(q.eid == NULL || (client_id_ok(q.eid) && strchr(q.eid, ':') == NULL));
    CHECK(q.eid == json_string_value(json_object_get(v, "eid")));
    switch (q.type) {
    case WSMSG_EXECUTE:
        CHECK(strcmp(type, "execute") == 0);
        CHECK(q.code != NULL && q.code == json_string_value(json_object_get(v, "code")));
        CHECK(q.tx >= ENG_TX_DEFAULT && q.tx <= ENG_TX_ROLLBACK_ALWAYS);
        CHECK(!json_is_string(json_object_get(v, "tx")) || q.tx != ENG_TX_DEFAULT);
        break;
    case WSMSG_RESUME: {
        CHECK(strcmp(type, "resume") == 0 && q.eid != NULL);
        json_int_t off = json_integer_value(json_object_get(v, "output_offset"));
        CHECK(q.offset == (off > 0 ? (uint64_t)off : 0));
        break;
    }
    case WSMSG_INPUT_REPLY:
        CHECK(strcmp(type, "input_reply") == 0 && q.eid != NULL);
        CHECK(q.text == json_string_value(json_object_get(v, "text")));
        CHECK(q.text != NULL || q.eof);
        break;
    case WSMSG_CANCEL:
        CHECK(strcmp(type, "cancel") == 0 && q.eid != NULL);
        break;
    default:
        CHECK(!"unknown message type accepted");
    }
    /* no field beyond the type's own */
    const char *key;
    json_t *val;
    json_object_foreach(v, key, val)
    {
        (void)val;
        CHECK(
            strcmp(key, "type") == 0 || strcmp(key, "eid") == 0 ||
            (q.type == WSMSG_EXECUTE && (strcmp(key, "code") == 0 || strcmp(key, "tx") == 0)) ||
            (q.type == WSMSG_RESUME && strcmp(key, "output_offset") == 0) ||
            (q.type == WSMSG_INPUT_REPLY && (strcmp(key, "text") == 0 || strcmp(key, "eof") == 0)));
    }
    json_decref(v);
}

void fuzz_run(int target, const uint8_t *d, size_t n)
{
    switch (target) {
    case FUZZ_HTTP:
        fuzz_http(d, n);
        break;
    case FUZZ_WS:
        fuzz_ws(d, n);
        break;
    case FUZZ_WSMSG:
        fuzz_wsmsg(d, n);
        break;
    default:
        fuzz_json(d, n);
        break;
    }
}
