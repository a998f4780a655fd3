/*
 * ws.c - WebSocket framing (RFC 6455), server side: the only file that includes wslay.h.
 *
 * One wslay event context per session, driven without sockets: srv__wsproto_feed() hands received
 * bytes to wslay through the recv callback (WOULDBLOCK when they are used up), and everything
 * wslay wants to send goes to the owner's write callback at once (the owner queues it on its
 * libuv stream). Invariants:
 *   - a frame whose announced payload exceeds ws_max_frame, or a message exceeding ws_max_msg,
 *     ends the session with close code 1009 before its payload is buffered;
 *   - pings are answered by wslay, close frames are echoed; after a protocol error nothing more
 *     is read;
 *   - compression extensions are never negotiated, so any RSV bit is a protocol error (1002).
 */
#include <string.h>

#include <wslay/wslay.h>

#include "cap.h"
#include "srv_int.h"

struct srv__wsproto {
    wslay_event_context_ptr ctx;
    srv__wsproto_cb_t cb;
    void *arg;
    const uint8_t *in;
    size_t in_len;
    uint64_t max_frame;
    int frame_too_big;
    int failed;
    int in_recv; /* inside wslay_event_recv: sends from callbacks only queue */
};

static ssize_t recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *user)
{
    (void)flags;
    srv__wsproto_t *ws = user;
    if (ws->frame_too_big || ws->in_len == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t n = len < ws->in_len ? len : ws->in_len;
    memcpy(buf, ws->in, n);
    ws->in += n;
    ws->in_len -= n;
    return (ssize_t)n;
}

static ssize_t send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *user)
{
    (void)ctx;
    (void)flags;
    srv__wsproto_t *ws = user;
    ws->cb.write(ws->arg, data, len);
    return (ssize_t)len;
}

static void frame_start_cb(wslay_event_context_ptr ctx,
                           const struct wslay_event_on_frame_recv_start_arg *arg, void *user)
{
    (void)ctx;
    srv__wsproto_t *ws = user;
    if (arg->payload_length > ws->max_frame)
        ws->frame_too_big = 1; /* recv_cb stops feeding; feed() closes with 1009 */
}

static void msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *user)
{
    (void)ctx;
    srv__wsproto_t *ws = user;
    if (ws->frame_too_big)
        return;
    if (arg->opcode == WSLAY_TEXT_FRAME)
        ws->cb.on_text(ws->arg, arg->msg, arg->msg_length);
    else if (arg->opcode == WSLAY_BINARY_FRAME)
        ws->cb.on_binary(ws->arg, arg->msg_length);
}

void srv__wsproto_new(const srv_limits_t *lim, const srv__wsproto_cb_t *cb, void *arg,
                      srv__wsproto_t **out)
{
    srv__wsproto_t *ws = cap_calloc(1, sizeof(*ws));
    struct wslay_event_callbacks wcb = {
        .recv_callback = recv_cb,
        .send_callback = send_cb,
        .on_frame_recv_start_callback = frame_start_cb,
        .on_msg_recv_callback = msg_cb,
    };
    if (wslay_event_context_server_init(&ws->ctx, &wcb, ws) != 0)
        cap_fatal("http", "out of memory in wslay");
    wslay_event_config_set_max_recv_msg_length(ws->ctx, lim->ws_max_msg);
    ws->max_frame = lim->ws_max_frame;
    ws->cb = *cb;
    ws->arg = arg;
    *out = ws;
}

void srv__wsproto_free(srv__wsproto_t *ws)
{
    if (!ws)
        return;
    wslay_event_context_free(ws->ctx);
    cap_free(ws);
}

static void flush(srv__wsproto_t *ws)
{
    if (ws->in_recv)
        return; /* srv__wsproto_feed flushes once wslay_event_recv has returned */
    if (wslay_event_want_write(ws->ctx) && wslay_event_send(ws->ctx) != 0)
        ws->failed = 1;
}

int srv__wsproto_feed(srv__wsproto_t *ws, const uint8_t *data, size_t len)
{
    int rc = 0;
    if (ws->failed || !wslay_event_get_read_enabled(ws->ctx))
        goto out; /* after a close or an error, the rest is discarded */
    ws->in = data;
    ws->in_len = len;
    ws->in_recv = 1;
    if (wslay_event_recv(ws->ctx) != 0)
        ws->failed = 1;
    ws->in_recv = 0;
    ws->in = NULL;
    ws->in_len = 0;
    if (ws->frame_too_big && wslay_event_get_read_enabled(ws->ctx)) {
        static const char why[] = "frame larger than the limit";
        wslay_event_queue_close(ws->ctx, WSLAY_CODE_MESSAGE_TOO_BIG, (const uint8_t *)why,
                                sizeof(why) - 1);
        wslay_event_shutdown_read(ws->ctx);
    }
    flush(ws);
    if (ws->failed || ws->frame_too_big)
        rc = CAP_EPROTO;
out:
    return rc;
}

int srv__wsproto_send_text(srv__wsproto_t *ws, const char *data, size_t len)
{
    if (ws->failed || wslay_event_get_close_sent(ws->ctx) ||
        !wslay_event_get_write_enabled(ws->ctx))
        return CAP_ECLOSED;
    struct wslay_event_msg m = {
        .opcode = WSLAY_TEXT_FRAME, .msg = (const uint8_t *)data, .msg_length = len};
    if (wslay_event_queue_msg(ws->ctx, &m) != 0)
        return CAP_ECLOSED;
    flush(ws);
    return 0;
}

void srv__wsproto_close(srv__wsproto_t *ws, uint16_t code, const char *reason)
{
    if (ws->failed || wslay_event_get_close_sent(ws->ctx))
        return;
    size_t rlen = reason ? strlen(reason) : 0;
    if (rlen > 123)
        rlen = 123; /* a control frame payload is at most 125 bytes */
    wslay_event_queue_close(ws->ctx, code, (const uint8_t *)reason, rlen);
    flush(ws);
}

int srv__wsproto_done(const srv__wsproto_t *ws)
{
    if (ws->failed)
        return 1;
    if (wslay_event_get_close_sent(ws->ctx) && wslay_event_get_close_received(ws->ctx))
        return 1;
    if (!wslay_event_get_read_enabled(ws->ctx) && !wslay_event_want_write(ws->ctx))
        return 1;
    return 0;
}

uint16_t srv__wsproto_close_sent(const srv__wsproto_t *ws)
{
    return wslay_event_get_close_sent(ws->ctx) ? wslay_event_get_status_code_sent(ws->ctx) : 0;
}
