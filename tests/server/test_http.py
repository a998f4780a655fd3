#!/usr/bin/python3.11
"""test_http.py - capsule_http over real sockets, against a real http_testd process.

Clients: raw sockets (for malformed and slow input), http.client, curl, and the `websockets`
library (Debian python3-websockets). Every limit of srv_limits_t is hit once, with its status code
and JSON error checked, and the server is checked to still serve afterwards (nothing lost).

usage: test_http.py --testd PATH [--only NAME]
"""
import argparse
import atexit
import asyncio
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import websockets

TOKENS = ["tok-alice-0123456789", "tok-bob-9876543210"]
LIMITS = {
    "max_conns": 8,
    "max_url_bytes": 512,
    "max_header_bytes": 2048,
    "max_headers": 20,
    "max_body_bytes": 4096,
    "read_timeout_ms": 600,
    "idle_timeout_ms": 1500,
    "ws_max_frame": 2048,
    "ws_max_msg": 8192,
    "json_max_depth": 8,
    "max_out_bytes": 1 << 20,
}
AUTH = {"Authorization": "Bearer " + TOKENS[0]}


class Server:
    def __init__(self, testd, args, expect_ok=True):
        self.proc = subprocess.Popen([testd] + args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.port = None
        if expect_ok:
            line = self.proc.stdout.readline()
            if not line.startswith("PORT "):
                err = self.proc.stderr.read()
                raise AssertionError(f"server did not start: {line!r} {err}")
            self.port = int(line.split()[1])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("server did not exit on SIGTERM")
        err = self.proc.stderr.read()
        assert rc == 0, f"server exit code {rc}; stderr tail:\n{err[-3000:]}"
        return err


def conn(port, timeout=10):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def request(port, method, path, body=None, headers=None, c=None):
    own = c is None
    c = c or conn(port)
    h = dict(headers or {})
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        h.setdefault("Content-Type", "application/json")
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    if own:
        c.close()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def raw(port, data, read_timeout=5.0, shut=False):
    """Sends raw bytes, returns everything the server sends until it closes (or timeout)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    if data:
        s.sendall(data)
    if shut:
        s.shutdown(socket.SHUT_WR)
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except socket.timeout:
        pass
    s.close()
    return out


def status_of(resp):
    line = resp.split(b"\r\n", 1)[0]
    return int(line.split()[1]) if line.startswith(b"HTTP/1.") else None


def json_body(resp):
    head, _, body = resp.partition(b"\r\n\r\n")
    return json.loads(body)


def check_error(resp_or_body, code):
    doc = json.loads(resp_or_body) if isinstance(resp_or_body, (bytes, str)) else resp_or_body
    assert "error" in doc, doc
    assert doc["error"]["code"] == code, doc
    assert doc["error"]["message"], doc
    assert doc["error"]["request_id"], doc


def stats(port):
    st, _, b = request(port, "GET", "/v1/stats")
    assert st == 200
    return json.loads(b)


def wait_for(fn, timeout=5.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------------------------
# tests; each takes the running server's port

def t_routes(port):
    st, h, b = request(port, "GET", "/v1/ping")
    assert st == 200 and json.loads(b) == {"ok": True}, (st, b)
    assert h["content-type"] == "application/json" and h["x-request-id"]
    st, h, b = request(port, "GET", "/v1/items/abc%20d?verbose=1", headers=AUTH)
    assert st == 200 and json.loads(b) == {"id": "abc d", "verbose": "1"}, b
    st, h, b = request(port, "DELETE", "/v1/items/x", headers=AUTH)
    assert st == 204 and b == b"", (st, b)
    # unknown route, wrong method, unknown query parameter, bad target
    st, h, b = request(port, "GET", "/v1/nope", headers=AUTH)
    assert st == 404
    check_error(b, "not_found")
    st, h, b = request(port, "GET", "/v2/ping")
    assert st == 404
    st, h, b = request(port, "PUT", "/v1/items/x", headers=AUTH)
    assert st == 405 and "GET" in h["allow"] and "DELETE" in h["allow"], h
    check_error(b, "method_not_allowed")
    st, h, b = request(port, "GET", "/v1/items/x?colour=red", headers=AUTH)
    assert st == 400
    check_error(b, "unknown_parameter")
    resp = raw(port, b"GET /v1/items/%zz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(resp) == 400
    check_error(json_body(resp), "bad_target")
    resp = raw(port, b"GET /v1/../v1/ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(resp) == 400


def t_request_id(port):
    st, h, b = request(port, "POST", "/v1/echo", {"text": "hi"},
                       headers={**AUTH, "X-Request-Id": "client-id.42"})
    assert st == 200 and h["x-request-id"] == "client-id.42", h
    assert json.loads(b)["request_id"] == "client-id.42"
    # an id with bad characters is replaced by a generated one
    st, h, b = request(port, "POST", "/v1/echo", {"text": "hi"},
                       headers={**AUTH, "X-Request-Id": "bad id<script>"})
    assert st == 200 and h["x-request-id"] != "bad id<script>" and h["x-request-id"]
    ids = set()
    for _ in range(5):
        ids.add(request(port, "GET", "/v1/ping")[1]["x-request-id"])
    assert len(ids) == 5


def t_auth(port):
    st, h, b = request(port, "POST", "/v1/echo", {"text": "x"})
    assert st == 401 and h.get("www-authenticate") == "Bearer", (st, h)
    check_error(b, "unauthorized")
    assert "required" in json.loads(b)["error"]["message"]
    st, h, b = request(port, "POST", "/v1/echo", {"text": "x"},
                       headers={"Authorization": "Bearer wrong-token"})
    assert st == 401
    assert "not valid" in json.loads(b)["error"]["message"]
    st, h, b = request(port, "POST", "/v1/echo", {"text": "x"},
                       headers={"Authorization": "Basic " + base64.b64encode(b"a:b").decode()})
    assert st == 401
    # a prefix of a valid token is not valid
    st, _, _ = request(port, "POST", "/v1/echo", {"text": "x"},
                       headers={"Authorization": "Bearer " + TOKENS[0][:-1]})
    assert st == 401
    pa = json.loads(request(port, "POST", "/v1/echo", {"text": "x"}, headers=AUTH)[2])["principal"]
    pb = json.loads(request(port, "POST", "/v1/echo", {"text": "x"},
                            headers={"Authorization": "Bearer " + TOKENS[1]})[2])["principal"]
    assert pa != pb and pa.startswith("t-") and TOKENS[0] not in pa, (pa, pb)
    # public routes need no token
    assert request(port, "GET", "/v1/ping")[0] == 200


def t_json(port):
    st, h, b = request(port, "POST", "/v1/echo", {"text": "héllo", "n": 2 ** 62, "obj": [1, {}]},
                       headers=AUTH)
    assert st == 200, b
    d = json.loads(b)
    assert d["text"] == "héllo" and d["n"] == 2 ** 62 and d["obj"] == [1, {}]
    cases = [
        (b'{"text": "a", "extra": 1}', "invalid_request", "unknown field"),
        (b'{"n": 1}', "invalid_request", "missing required field"),
        (b'{"text": 5}', "invalid_request", "must be a string"),
        (b'{"text": "a", "n": 1.5}', "invalid_request", "must be an integer"),
        (b'{"text": "a",}', "malformed_json", "malformed"),
        (b'{"text": "a", "text": "b"}', "malformed_json", "duplicate"),
        (b'{"text": "\\u0000"}', "malformed_json", ""),
        (b'{"text": "\xff\xfe"}', "malformed_json", ""),
        (b'[1, 2]', "invalid_request", "object"),
        (b'{"text": "a", "obj": ' + b"[" * 9 + b"]" * 9 + b"}", "json_too_deep", "deeper"),
        (b"[" * 3000, "json_too_deep", "deeper"),
        (b'{"text": "[[[[[[[[[[[[[[[[[[[["}', None, None),  # brackets inside strings do not count
    ]
    for body, code, words in cases:
        st, h, b = request(port, "POST", "/v1/echo", body,
                           headers={**AUTH, "Content-Type": "application/json"})
        if code is None:
            assert st == 200, (body, st, b)
            continue
        assert st == 400, (body, st, b)
        check_error(b, code)
        assert words.lower() in json.loads(b)["error"]["message"].lower(), (body, b)
    st, h, b = request(port, "POST", "/v1/echo", b'{"text":"a"}',
                       headers={**AUTH, "Content-Type": "text/plain"})
    assert st == 415
    check_error(b, "unsupported_media_type")
    # an empty body counts as {} (so a required field is reported missing)
    st, h, b = request(port, "POST", "/v1/echo", b"", headers=AUTH)
    assert st == 400 and "missing" in json.loads(b)["error"]["message"]


def t_keepalive_pipelining(port):
    c = conn(port)
    for i in range(20):
        st, h, b = request(port, "POST", "/v1/echo", {"text": str(i)}, headers=AUTH, c=c)
        assert st == 200 and json.loads(b)["text"] == str(i)
    c.close()
    # three pipelined requests in one write, including a chunked body, come back in order
    reqs = (b"GET /v1/items/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
            b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n{\"tex\r\n8\r\nt\":\"ab\"}\r\n0\r\n\r\n"
            b"GET /v1/items/3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Connection: close\r\n\r\n") % ((TOKENS[0].encode(),) * 3)
    resp = raw(port, reqs)
    assert resp.count(b"HTTP/1.1 200 OK") == 3, resp
    i1, i2, i3 = resp.find(b'"id":"1"'), resp.find(b'"text":"ab"'), resp.find(b'"id":"3"')
    assert 0 < i1 < i2 < i3, resp
    # HTTP/1.0 closes after the answer
    resp = raw(port, b"GET /v1/ping HTTP/1.0\r\n\r\n")
    assert resp.startswith(b"HTTP/1.0 200") and b"Connection: close" in resp


def t_malformed(port):
    bad = [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/ping HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /v1/echo HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /v1/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /v1/ping HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        # request smuggling: both framings at once
        b"POST /v1/echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST /v1/echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    ]
    for b in bad:
        resp = raw(port, b)
        assert status_of(resp) == 400, (b, resp)
        check_error(json_body(resp), "malformed_request")
        assert b"Connection: close" in resp
    resp = raw(port, b"GET / HTTP/9.9\r\n\r\n")
    assert status_of(resp) == 505, resp
    check_error(json_body(resp), "http_version_not_supported")
    resp = raw(port, b"GET /v1/ping HTTP/1.1\r\nExpect: something\r\n\r\n")
    assert status_of(resp) == 417, resp
    assert request(port, "GET", "/v1/ping")[0] == 200


def t_limits_sizes(port):
    # URL
    resp = raw(port, b"GET /v1/" + b"a" * 600 + b" HTTP/1.1\r\n\r\n")
    assert status_of(resp) == 414, resp
    check_error(json_body(resp), "uri_too_long")
    # header bytes and count
    resp = raw(port, b"GET /v1/ping HTTP/1.1\r\nX-Big: " + b"v" * 3000 + b"\r\n\r\n")
    assert status_of(resp) == 431, resp
    check_error(json_body(resp), "headers_too_large")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(25))
    resp = raw(port, b"GET /v1/ping HTTP/1.1\r\n" + many + b"\r\n")
    assert status_of(resp) == 431, resp
    # body by Content-Length (refused before the body is sent) and by chunked size
    resp = raw(port, b"POST /v1/echo HTTP/1.1\r\nContent-Length: 5000\r\n"
               b"Content-Type: application/json\r\n\r\n")
    assert status_of(resp) == 413, resp
    check_error(json_body(resp), "body_too_large")
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    resp = raw(port, b"POST /v1/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2)
    assert status_of(resp) == 413, resp
    # just under the limits works
    body = json.dumps({"text": "y" * 4000}).encode()
    assert len(body) <= 4096
    st, _, b = request(port, "POST", "/v1/echo", body,
                       headers={**AUTH, "Content-Type": "application/json"})
    assert st == 200 and len(json.loads(b)["text"]) == 4000
    # curl sends Expect: 100-continue for large bodies; an over-limit one is refused early
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                          "Expect: 100-continue", "-H", "Content-Type: application/json", "-H",
                          "Authorization: Bearer " + TOKENS[0], "--data-binary", body.decode(),
                          f"http://127.0.0.1:{port}/v1/echo"], capture_output=True, text=True,
                         timeout=10)
    assert out.stdout == "200", out
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-H", "Expect: 100-continue",
                          "-H", "Content-Type: application/json", "--data-binary", "x" * 5000,
                          f"http://127.0.0.1:{port}/v1/echo"], capture_output=True, text=True,
                         timeout=10)
    assert out.stdout.endswith("413"), out


def t_slow_clients(port):
    # headers trickled slower than read_timeout: 408 and closed
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.time()
    s.sendall(b"GET /v1/ping HTTP/1.1\r\n")
    out = b""
    try:
        for _ in range(20):
            time.sleep(0.1)
            s.sendall(b"X: y\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.settimeout(3)
    try:
        while True:
            b = s.recv(4096)
            if not b:
                break
            out += b
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    assert status_of(out) == 408, out
    check_error(json_body(out), "request_timeout")
    assert time.time() - t0 < 3.5
    # a connection that never sends anything is closed after idle_timeout, silently
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.time()
    assert s.recv(100) == b""
    dt = time.time() - t0
    assert 1.2 < dt < 4, dt
    s.close()
    # a body that never completes
    resp = raw(port, b"POST /v1/echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"te", read_timeout=4)
    assert status_of(resp) == 408, resp


def t_max_conns(port):
    # only the stats request's own connection open
    wait_for(lambda: stats(port)["conns_open"] == 1, what="idle server")
    held = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", port))
        held.append(s)
    resp = raw(port, b"GET /v1/ping HTTP/1.1\r\n\r\n")
    assert status_of(resp) == 503, resp
    check_error(json_body(resp), "too_many_connections")
    for s in held:
        s.close()
    wait_for(lambda: request(port, "GET", "/v1/ping")[0] == 200, what="slot freed")
    assert stats(port)["conns_rejected"] >= 1


def t_async_and_abort(port):
    st, _, b = request(port, "GET", "/v1/slow?ms=100", headers=AUTH)
    assert st == 200 and json.loads(b) == {"slow": True}
    before = stats(port)["aborted"]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /v1/slow?ms=3000 HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n"
              % TOKENS[0].encode())
    time.sleep(0.2)
    s.close()
    wait_for(lambda: stats(port)["aborted"] == before + 1, what="abort callback")


def t_streams(port):
    # NDJSON through curl -N
    out = subprocess.run(["curl", "-sN", "-H", "Authorization: Bearer " + TOKENS[0],
                          f"http://127.0.0.1:{port}/v1/stream?n=5&interval_ms=5"],
                         capture_output=True, text=True, timeout=10)
    lines = out.stdout.strip().split("\n")
    assert [json.loads(x)["seq"] for x in lines] == [0, 1, 2, 3, 4], out
    # SSE through http.client: event, id and data lines
    st, h, b = request(port, "GET", "/v1/stream?n=3&format=sse&interval_ms=5", headers=AUTH)
    assert st == 200 and h["content-type"] == "text/event-stream", h
    events = [e for e in b.decode().split("\n\n") if e]
    assert len(events) == 3, b
    for i, e in enumerate(events):
        fields = dict(line.split(": ", 1) for line in e.split("\n"))
        assert fields["id"] == str(i) and fields["event"] == "tick"
        assert json.loads(fields["data"]) == {"type": "tick", "seq": i}
    # keep-alive continues after a chunked stream
    c = conn(port)
    for _ in range(3):
        st, h, b = request(port, "GET", "/v1/stream?n=2", headers=AUTH, c=c)
        assert st == 200 and len(b.strip().split(b"\n")) == 2
    c.close()
    # a client that stops reading a stream is dropped at max_out_bytes
    before = stats(port)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /v1/flood?size=65536 HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n"
              % TOKENS[0].encode())
    wait_for(lambda: stats(port)["flood_limit"] == before["flood_limit"] + 1, timeout=20,
             what="flood limit")
    wait_for(lambda: stats(port)["aborted"] == before["aborted"] + 1, what="flood abort")
    s.close()


async def ws_connect(port, token=TOKENS[0], **kw):
    hdrs = {"Authorization": "Bearer " + token} if token else {}
    return await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", extra_headers=hdrs,
                                    max_size=None, **kw)


async def ws_main(port):
    ws = await ws_connect(port)
    await ws.send(json.dumps({"op": "echo", "data": {"a": [1, 2, 3]}}))
    m = json.loads(await ws.recv())
    assert m["type"] == "echo" and m["data"] == {"a": [1, 2, 3]} and m["principal"].startswith("t-")
    await ws.send(json.dumps({"op": "burst", "n": 200}))
    seqs = [json.loads(await ws.recv())["seq"] for _ in range(200)]
    assert seqs == list(range(200))
    # small messages of one loop iteration leave together, big ones at once: all arrive, in
    # order, whole, whatever their mix (4 MiB in all: more than max_out_bytes, read as it comes)
    for n, size in [(300, 10), (40, 100000), (3, 20000)]:
        await ws.send(json.dumps({"op": "burst", "n": n, "size": size}))
        got = [json.loads(await ws.recv()) for _ in range(n)]
        assert [m["seq"] for m in got] == list(range(n)), (n, size)
        assert all(m["pad"] == "x" * size for m in got), (n, size)
    # bad JSON, too deep, binary, unknown op: an error message, the session goes on
    for bad, code in [("{nope", "malformed_json"), ("[" * 20 + "]" * 20, "json_too_deep"),
                      (b"\x01\x02", "unsupported_message"), (json.dumps({"op": "x"}), "unknown_op")]:
        await ws.send(bad)
        m = json.loads(await ws.recv())
        assert m["type"] == "error" and m["error"]["code"] == code, (bad, m)
    await ws.send(json.dumps({"op": "echo", "data": "still here"}))
    assert json.loads(await ws.recv())["data"] == "still here"
    # ping/pong handled by the library
    pong = await ws.ping()
    await asyncio.wait_for(pong, 5)
    # fragmented message reassembled
    await ws.send(iter([json.dumps({"op": "echo", "data": "frag"})[:10],
                        json.dumps({"op": "echo", "data": "frag"})[10:]]))
    assert json.loads(await ws.recv())["data"] == "frag"
    # server-initiated close
    await ws.send(json.dumps({"op": "close"}))
    try:
        await asyncio.wait_for(ws.recv(), 5)
        raise AssertionError("expected close")
    except websockets.ConnectionClosedOK as e:
        assert e.rcvd.code == 1000
    # frame over ws_max_frame: 1009
    ws = await ws_connect(port)
    await ws.send(json.dumps({"op": "echo", "data": "z" * 3000}))
    try:
        await asyncio.wait_for(ws.recv(), 5)
        raise AssertionError("expected close 1009")
    except websockets.ConnectionClosedError as e:
        assert e.rcvd is not None and e.rcvd.code == 1009, e
    # message over ws_max_msg (in frames under the frame limit): 1009
    ws = await ws_connect(port)
    payload = json.dumps({"op": "echo", "data": "q" * 9000})
    try:
        await ws.send(iter([payload[i:i + 1500] for i in range(0, len(payload), 1500)]))
        await asyncio.wait_for(ws.recv(), 5)
        raise AssertionError("expected close 1009")
    except websockets.ConnectionClosedError:
        await ws.wait_closed()
        assert ws.close_code == 1009, ws.close_code
    # auth on the upgrade
    try:
        await ws_connect(port, token=None)
        raise AssertionError("upgrade without a token accepted")
    except websockets.InvalidStatusCode as e:
        assert e.status_code == 401
    # many sessions at once
    socks = [await ws_connect(port, token=TOKENS[i % 2]) for i in range(5)]
    for i, s in enumerate(socks):
        await s.send(json.dumps({"op": "echo", "data": i}))
    for i, s in enumerate(socks):
        assert json.loads(await s.recv())["data"] == i
    for s in socks:
        await s.close()


def ws_raw(port, rcvbuf=None):
    """A WebSocket upgraded over a raw socket (to control reading); masked text frames out."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /v1/ws HTTP/1.1\r\nAuthorization: Bearer %s\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % TOKENS[0].encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def ws_raw_send(s, text):
    data = text.encode()
    assert len(data) < 126
    mask = b"\x01\x02\x03\x04"
    s.sendall(bytes([0x81, 0x80 | len(data)]) + mask +
              bytes(c ^ mask[i % 4] for i, c in enumerate(data)))


def t_websocket(port):
    asyncio.run(ws_main(port))
    # a WebSocket client that does not read is dropped once max_out_bytes (1 MiB here) are
    # queued for it: 64 messages of 64 KiB sent at once
    before = stats(port)
    s = ws_raw(port, rcvbuf=4096)
    ws_raw_send(s, json.dumps({"op": "burst", "n": 64, "size": 65536}))
    wait_for(lambda: stats(port)["ws_closed"] == before["ws_closed"] + 1, timeout=20,
             what="the WebSocket that does not read dropped")
    s.close()
    # handshake errors over plain HTTP
    resp = raw(port, b"GET /v1/ws HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n"
               % TOKENS[0].encode())
    assert status_of(resp) == 426, resp
    check_error(json_body(resp), "upgrade_required")
    resp = raw(port, b"GET /v1/ws HTTP/1.1\r\nAuthorization: Bearer %s\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: short\r\n\r\n" % TOKENS[0].encode())
    assert status_of(resp) == 400, resp
    check_error(json_body(resp), "bad_websocket_key")
    resp = raw(port, b"GET /v1/ws HTTP/1.1\r\nAuthorization: Bearer %s\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % TOKENS[0].encode())
    assert status_of(resp) == 426 and b"Sec-WebSocket-Version: 13" in resp, resp
    # RFC 6455's example key, and a frame in the same packet as the handshake
    frame = bytes([0x81, 0x80 | 26]) + b"\x01\x02\x03\x04"
    text = b'{"op":"echo","data":"one"}'
    frame += bytes(c ^ b"\x01\x02\x03\x04"[i % 4] for i, c in enumerate(text))
    resp = raw(port, b"GET /v1/ws HTTP/1.1\r\nAuthorization: Bearer %s\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % TOKENS[0].encode() + frame,
               read_timeout=1.0)
    assert status_of(resp) == 101, resp
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in resp, resp
    assert b'"data":"one"' in resp, resp
    # an unmasked client frame is a protocol error: close 1002
    resp = raw(port, b"GET /v1/ws HTTP/1.1\r\nAuthorization: Bearer %s\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % TOKENS[0].encode()
               + bytes([0x81, 2]) + b"{}", read_timeout=2.0)
    body = resp.partition(b"\r\n\r\n")[2]
    assert body[:1] == b"\x88" and body[2:4] == b"\x03\xea", body  # close, code 1002
    wait_for(lambda: stats(port)["ws_open"] == 0, what="ws sessions closed")


def t_refuse_public_without_tokens(testd):
    s = Server(testd, ["--listen", "0.0.0.0:0"], expect_ok=False)
    rc = s.proc.wait(timeout=10)
    err = s.proc.stderr.read()
    assert rc != 0 and "refusing to listen" in err, (rc, err)
    s = Server(testd, ["--listen", "127.0.0.1:0", "--tokens-file", "/nonexistent/tokens"],
               expect_ok=False)
    assert s.proc.wait(timeout=10) != 0
    with tempfile.NamedTemporaryFile("w", suffix=".tokens", delete=False) as f:
        f.write("# only a comment\n\n")
    s = Server(testd, ["--listen", "127.0.0.1:0", "--tokens-file", f.name], expect_ok=False)
    rc = s.proc.wait(timeout=10)
    assert rc != 0 and "no token" in s.proc.stderr.read()
    os.unlink(f.name)
    s = Server(testd, ["--listen", "nonsense"], expect_ok=False)
    assert s.proc.wait(timeout=10) != 0
    # beyond loopback with a token list: starts, and requires the token
    s = Server(testd, ["--listen", "0.0.0.0:0", "--tokens", "only-token-1"])
    assert request(s.port, "POST", "/v1/echo", {"text": "a"})[0] == 401
    assert request(s.port, "POST", "/v1/echo", {"text": "a"},
                   headers={"Authorization": "Bearer only-token-1"})[0] == 200
    s.stop()
    # loopback without tokens: auth off, principal "anonymous"
    s = Server(testd, ["--listen", "127.0.0.1:0"])
    st, _, b = request(s.port, "POST", "/v1/echo", {"text": "a"})
    assert st == 200 and json.loads(b)["principal"] == "anonymous"
    s.stop()


def t_ws_idle(testd, tokfile):
    """A WebSocket session silent for 10 x idle_timeout is closed with 1001; traffic keeps it."""
    s = Server(testd, ["--listen", "127.0.0.1:0", "--tokens-file", tokfile, "--limit",
                       "idle_timeout_ms=150"])

    async def go():
        quiet = await ws_connect(s.port, ping_interval=None)
        busy = await ws_connect(s.port, ping_interval=None)
        t0 = time.time()
        while time.time() - t0 < 2.2:  # busy talks every 0.5 s, quiet says nothing
            await busy.send(json.dumps({"op": "echo", "data": 1}))
            await busy.recv()
            await asyncio.sleep(0.5)
        await asyncio.wait_for(quiet.wait_closed(), 5)
        assert quiet.close_code == 1001, quiet.close_code
        assert 1.4 < time.time() - t0 < 4.5
        await busy.send(json.dumps({"op": "echo", "data": 2}))
        assert json.loads(await busy.recv())["data"] == 2
        await busy.close()

    asyncio.run(go())
    s.stop()


def t_shutdown_with_open_work(testd, tokfile):
    """SIGTERM with a pending request, a stream and a WebSocket open: clean exit 0."""
    s = Server(testd, ["--listen", "127.0.0.1:0", "--tokens-file", tokfile])
    a = socket.create_connection(("127.0.0.1", s.port))
    a.sendall(b"GET /v1/slow?ms=5000 HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n"
              % TOKENS[0].encode())
    b = socket.create_connection(("127.0.0.1", s.port))
    b.sendall(b"GET /v1/stream?n=1000&interval_ms=5 HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n"
              % TOKENS[0].encode())

    async def hold():
        ws = await ws_connect(s.port)
        await ws.send(json.dumps({"op": "echo", "data": 1}))
        await ws.recv()
        return ws

    loop = asyncio.new_event_loop()
    ws = loop.run_until_complete(hold())
    time.sleep(0.2)
    err = s.stop()
    assert "status=499" in err  # the pending request was aborted and logged
    loop.run_until_complete(ws.close())
    loop.close()
    a.close()
    b.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--testd", required=True)
    ap.add_argument("--only")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="capsule-http-")
    atexit.register(shutil.rmtree, tmp, True)  # pass or fail, the token files go
    tokfile = os.path.join(tmp, "tokens")
    with open(tokfile, "w") as f:
        f.write("# test tokens\n" + TOKENS[0] + "\n\n  " + TOKENS[1] + "  \n")
    os.chmod(tokfile, 0o644)  # the server warns about a token file others can read
    lim = []
    for k, v in LIMITS.items():
        lim += ["--limit", f"{k}={v}"]
    srv = Server(args.testd, ["--listen", "127.0.0.1:0", "--tokens-file", tokfile] + lim)
    tests = [t_routes, t_request_id, t_auth, t_json, t_keepalive_pipelining, t_malformed,
             t_limits_sizes, t_slow_clients, t_max_conns, t_async_and_abort, t_streams,
             t_websocket]
    failed = 0
    try:
        for t in tests:
            if args.only and args.only != t.__name__:
                continue
            t0 = time.time()
            t(srv.port)
            print(f"ok   {t.__name__} ({time.time() - t0:.2f} s)", flush=True)
        # the server survived all of it and still answers
        assert request(srv.port, "GET", "/v1/ping")[0] == 200
    finally:
        err = srv.stop()
        if os.environ.get("VERBOSE"):
            sys.stderr.write(err)
    assert "readable by group or others" in err and "chmod 600" in err
    assert TOKENS[0] not in err and TOKENS[1] not in err  # tokens never logged
    for t in (t_refuse_public_without_tokens,):
        if not args.only or args.only == t.__name__:
            t(args.testd)
            print(f"ok   {t.__name__}", flush=True)
    if not args.only or args.only == "t_ws_idle":
        t_ws_idle(args.testd, tokfile)
        print("ok   t_ws_idle", flush=True)
    if not args.only or args.only == "t_shutdown_with_open_work":
        t_shutdown_with_open_work(args.testd, tokfile)
        print("ok   t_shutdown_with_open_work", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
