#!/usr/bin/python3.11
"""test_engine.py - capsule-engine end to end: a real server process on a real data directory,
real workers, real HTTP (http.client) and WebSocket (websockets) clients, real kill -9.

usage: test_engine.py --server PATH [--only NAME]
"""
import argparse
import asyncio
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import started

import websockets

TOK_A, TOK_B = "alice-token-0001", "bob-token-0002"
A = {"Authorization": "Bearer " + TOK_A}
B = {"Authorization": "Bearer " + TOK_B}


class Engine:
    def __init__(self, path, data, tokfile, extra=()):
        self.path, self.data, self.tokfile = path, data, tokfile
        self.proc = started.popen(
            [path, "--listen", "127.0.0.1:0", "--data-dir", data, "--tokens-file", tokfile,
             "--pool-idle", "1", "--grace-ms", "5000", "--log-level", "warn", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "listening on port" not in line:
            raise AssertionError("engine did not start: " + line + self.proc.stderr.read())
        self.port = int(line.split()[-1])

    def term(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        return rc, self.proc.stderr.read()

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.read()


def req(port, method, path, body=None, headers=A, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = dict(headers or {})
    if body is not None:
        body = json.dumps(body)
        h["Content-Type"] = "application/json"
    c.request(method, "/v1" + path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    ct = r.getheader("Content-Type") or ""
    return r.status, (json.loads(data) if data and ct.startswith("application/json") else data)


def stream_events(port, sid, body, headers=A):
    """Yields NDJSON events of an execution as they arrive."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", f"/v1/sessions/{sid}/executions", body=json.dumps(body),
              headers={**headers, "Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "application/x-ndjson"
    while True:
        line = r.readline()  # chunked decoding by http.client
        if not line:
            break
        if line.strip():
            yield json.loads(line)
    c.close()


def ws_url(port, sid):
    return f"ws://127.0.0.1:{port}/v1/sessions/{sid}/ws"


async def ws_open(port, sid, headers=A):
    return await websockets.connect(ws_url(port, sid), extra_headers=headers, max_size=None)


async def ws_until(ws, pred, timeout=20):
    got = []
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        got.append(m)
        if pred(m):
            return got


def wait_result(port, eid, headers=A, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        st, d = req(port, "GET", f"/executions/{eid}", headers=headers)
        assert st == 200, (st, d)
        if d["status"] not in ("running", "pending"):
            return d
        time.sleep(0.05)
    raise AssertionError(f"execution {eid} did not finish")


def wait_running(port, eid, headers=A, timeout=60):
    """Waits until the execution is running (not queued): a fixed pause guessed it, and a loaded
    machine can take longer to start it."""
    end = time.time() + timeout
    while time.time() < end:
        st, d = req(port, "GET", f"/executions/{eid}", headers=headers)
        assert st == 200, (st, d)
        if d["status"] == "running":
            return d
        assert d["status"] == "pending", d
        time.sleep(0.02)
    raise AssertionError(f"execution {eid} did not start")


# ----------------------------------------------------------------------------------------------

def t_help(server):
    out = subprocess.run([server, "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    for name in ["--listen", "CAPSULE_LISTEN", "--data-dir", "CAPSULE_DATA_DIR", "CAPSULE_TOKENS",
                 "--tokens-file", "--durability", "--grace-ms", "--max-conns", "--max-body-bytes",
                 "--ws-max-msg", "--json-max-depth", "127.0.0.1:8765", "--affinity",
                 "CAPSULE_AFFINITY"]:
        assert name in out.stdout, name
    bad = subprocess.run([server, "--affinity", "sometimes"], capture_output=True, text=True,
                         timeout=10)
    assert bad.returncode == 2 and "--affinity must be auto or none" in bad.stderr, bad.stderr
    bad = subprocess.run([server, "--max-conns", "lots"], capture_output=True, text=True,
                         timeout=10)
    assert bad.returncode == 2 and "not a number" in bad.stderr
    bad = subprocess.run([server, "--frobnicate"], capture_output=True, text=True, timeout=10)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    env = dict(os.environ, CAPSULE_LISTEN="0.0.0.0:0")
    env.pop("CAPSULE_TOKENS", None)
    bad = subprocess.run([server, "--data-dir", "/nonexistent-never"], capture_output=True,
                         text=True, timeout=10, env=env)
    assert bad.returncode == 1 and "refusing to listen" in bad.stderr, bad.stderr


def t_meta(e):
    assert req(e.port, "GET", "/healthz", headers={}) == (200, {"status": "ok"})
    assert req(e.port, "GET", "/readyz", headers={}) == (200, {"status": "ready"})
    st, doc = req(e.port, "GET", "/openapi.json", headers={})
    assert st == 200 and doc["openapi"].startswith("3.")
    for p in ["/sessions", "/sessions/{sid}", "/sessions/{sid}/executions", "/sessions/{sid}/ws",
              "/executions/{eid}", "/executions/{eid}/input", "/executions/{eid}/cancel",
              "/sessions/{sid}/checkpoint", "/sessions/{sid}/release", "/sessions/{sid}/warmup",
              "/pool", "/metrics", "/healthz", "/readyz"]:
        assert p in doc["paths"], p
    assert req(e.port, "GET", "/pool", headers={})[0] == 401
    st, pool = req(e.port, "GET", "/pool")
    assert st == 200 and "pool_idle" in pool
    assert req(e.port, "GET", "/sessions", headers={"Authorization": "Bearer nope"})[0] == 401


def t_sessions(e):
    st, s = req(e.port, "POST", "/sessions", {"id": "sa", "tx": "commit_always",
                                               "timeout_ms": 60000})
    assert st == 201 and s == {"id": "sa", "state": "open"}, s
    st, g = req(e.port, "POST", "/sessions", {})
    assert st == 201 and g["id"].startswith("s")
    st, lst = req(e.port, "GET", "/sessions")
    ids = {x["id"] for x in lst["sessions"]}
    assert {"sa", g["id"]} <= ids
    st, g_sa = req(e.port, "GET", "/sessions/sa")
    assert st == 200 and g_sa["options"] == {"tx": "commit_always", "timeout_ms": 60000,
                                             "mem_bytes": 0, "cpu_seconds": 0,
                                             "retry_on_death": False}, g_sa
    assert g_sa["ordinal"] == 0 and g_sa["queued"] == 0 and not g_sa["running"], g_sa
    # another token sees nothing of it
    assert req(e.port, "GET", "/sessions/sa", headers=B)[0] == 404
    assert "sa" not in {x["id"] for x in req(e.port, "GET", "/sessions", headers=B)[1]["sessions"]}
    assert req(e.port, "DELETE", "/sessions/sa", headers=B)[0] == 404
    # bad input
    for body, code in [({"id": "bad id"}, 400), ({"idd": "x"}, 400), ({"tx": "sometimes"}, 400),
                       ({"timeout_ms": -1}, 400), ({"timeout_ms": "1"}, 400),
                       ({"fork_of": "nope"}, 404), ({"fork_ordinal": 1}, 400)]:
        st, d = req(e.port, "POST", "/sessions", body)
        assert st == code and d["error"]["code"], (body, st, d)
    assert req(e.port, "GET", "/sessions/a:b")[0] == 404
    # per-session warm-up: the first execution, recorded; a failing one leaves the session open
    st, w = req(e.port, "POST", "/sessions", {"id": "warm", "warmup": "import math\nW = 6 * 7"})
    assert st == 201, w
    st, wr = req(e.port, "GET", "/sessions/warm/warmup")
    assert st == 200 and wr["status"] == "ok", wr
    assert req(e.port, "GET", "/sessions/warm/warmup", headers=B)[0] == 404
    st, r = req(e.port, "POST", "/sessions/warm/executions", {"code": "W + int(math.pi)"})
    assert r["value"] == 45, r
    st, d = req(e.port, "POST", "/sessions", {"id": "warm-bad", "warmup": "1/0"})
    assert st == 422 and d["error"]["code"] == "warmup_failed", d
    assert req(e.port, "GET", "/sessions/warm-bad")[0] == 200
    st, wr = req(e.port, "GET", "/sessions/warm-bad/warmup")
    assert wr["status"] == "error" and wr["error"]["type"] == "ZeroDivisionError", wr
    assert req(e.port, "POST", "/sessions", {"fork_of": "warm", "warmup": "1"})[0] == 400
    # release: the worker goes back, the namespace comes back from the log when next used
    st, rel = req(e.port, "POST", "/sessions/warm/release")
    assert st == 200 and rel["state"] == "released", rel
    assert req(e.port, "POST", "/sessions/warm/release", headers=B)[0] == 404
    st, r = req(e.port, "POST", "/sessions/warm/executions", {"code": "W"})
    assert r["value"] == 42, r
    # close
    assert req(e.port, "DELETE", f"/sessions/{g['id']}")[0] == 204
    assert req(e.port, "GET", f"/sessions/{g['id']}")[0] == 404
    assert req(e.port, "DELETE", f"/sessions/{g['id']}")[0] == 404
    # a closed session's id is not used again, and the answer says so
    st, d = req(e.port, "POST", "/sessions", {"id": g["id"]})
    assert st == 409 and d["error"]["code"] == "session_exists", d
    assert "was closed" in d["error"]["message"], d
    st, d = req(e.port, "POST", "/sessions", {"id": "warm", "fork_of": "sa"})  # open: exists
    assert st == 409 and "already exists" in d["error"]["message"], d


def t_execute(e):
    assert req(e.port, "POST", "/sessions", {"id": "ex"})[0] == 201
    st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": "print('hi')\n2+2"})
    assert st == 200 and r["status"] == "ok" and r["repr"] == "4" and r["value"] == 4, r
    assert r["output"] == "hi\n" and r["committed"] and r["session"] == "ex"
    # values: JSON when Python's json can say it (a NUL in a string too); repr always
    for code, value in [("'a\\x00b'", "a\x00b"), ("{'k': [1, 2.5, None, True]}",
                                                   {"k": [1, 2.5, None, True]}),
                        ("-2 ** 63", -2 ** 63), ("'\u00e9\u2028'", "\u00e9\u2028")]:
        st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": code})
        assert st == 200 and r["value"] == value, (code, r)
    for code in ["float('nan')", "b'x'", "{(1, 2): 3}", "object()"]:
        st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": code})
        assert st == 200 and "value" not in r and "value_json" not in r and r["repr"], (code, r)
    # JSON the server's parser cannot hold comes as its text
    for code, value in [("10 ** 30", 10 ** 30), ("[-2 ** 70, 1]", [-2 ** 70, 1]),
                        ("'\\ud800'", "\ud800")]:
        st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": code})
        assert st == 200 and "value" not in r and json.loads(r["value_json"]) == value, (code, r)
    # names the log cannot hold are named, with why, in the result and by id later
    st, r = req(e.port, "POST", "/sessions/ex/executions",
                {"code": "import threading\nlk = threading.Lock()\ng = (i for i in [1])\nok = 1",
                 "id": "unrec-1"})
    assert st == 200 and r["committed"] and set(r["not_recorded"]) == {"lk", "g"}, r
    assert "lock" in r["not_recorded"]["lk"] and ";" not in r["not_recorded"]["g"], r
    assert req(e.port, "GET", "/executions/unrec-1")[1]["not_recorded"] == r["not_recorded"]
    st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": "ok2 = 2"})
    assert "not_recorded" not in r, r
    # and a rollback (restored from the log) names what it could not restore
    st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": "ok = 3\n1/0"})
    assert r["status"] == "error" and set(r["restore_failed"]) == {"lk", "g"}, r
    assert req(e.port, "POST", "/sessions/ex/executions", {"code": "ok"})[1]["value"] == 1
    st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": "1/0"})
    assert st == 200 and r["status"] == "error" and r["error"]["type"] == "ZeroDivisionError", r
    # idempotent client ids: the second call returns the recorded result, nothing runs twice
    body = {"code": "n = globals().get('n', 0) + 1\nn", "id": "once-1"}
    r1 = req(e.port, "POST", "/sessions/ex/executions", body)[1]
    r2 = req(e.port, "POST", "/sessions/ex/executions", body)[1]
    assert r1["value"] == 1 and r2["value"] == 1 and r2["id"] == "once-1", (r1, r2)
    assert req(e.port, "POST", "/sessions/ex/executions", {"code": "n"})[1]["value"] == 1
    # by id
    st, g = req(e.port, "GET", "/executions/once-1")
    assert st == 200 and g["value"] == 1
    assert req(e.port, "GET", "/executions/once-1", headers=B)[0] == 404
    assert req(e.port, "GET", "/executions/never-was")[0] == 404
    # 202 then poll
    st, a = req(e.port, "POST", "/sessions/ex/executions",
                {"code": "import time\ntime.sleep(0.2)\n'late'", "wait": False, "id": "bg-1"})
    assert st == 202 and a["id"] == "bg-1"
    st, run = req(e.port, "GET", "/executions/bg-1")
    assert st == 200 and run["status"] in ("running", "ok"), run
    assert wait_result(e.port, "bg-1")["value"] == "late"
    # an execution's own timeout (the session has none), recorded with its request
    t0 = time.monotonic()
    st, r = req(e.port, "POST", "/sessions/ex/executions",
                {"code": "import time\ntime.sleep(30)", "timeout_ms": 300})
    assert st == 200 and r["status"] == "timeout" and not r["committed"], r
    assert time.monotonic() - t0 < 10
    st, r = req(e.port, "POST", "/sessions/ex/executions", {"code": "'ok'", "timeout_ms": 0})
    assert r["value"] == "ok", r
    # errors
    for body, code in [({"code": 5}, 400), ({}, 400), ({"code": "1", "stream": "xml"}, 400),
                       ({"code": "1", "extra": 1}, 400), ({"code": "1", "id": "a b"}, 400),
                       ({"code": "1", "inputs": [1]}, 400), ({"code": "1", "timeout_ms": -1}, 400),
                       ({"code": "1", "timeout_ms": 2 ** 32}, 400),
                       ({"code": "1", "timeout_ms": "5"}, 400),
                       ({"code": "1", "timeout_ms": 1.5}, 400)]:
        st, d = req(e.port, "POST", "/sessions/ex/executions", body)
        assert st == code, (body, st, d)
    st, d = req(e.port, "POST", "/sessions/nope/executions", {"code": "1"})
    assert st == 404 and d["error"]["code"] == "session_not_found", d
    st, d = req(e.port, "POST", "/sessions/ex/executions", {"code": "1"}, headers=B)
    assert st == 404
    # checkpoint
    st, c = req(e.port, "POST", "/sessions/ex/checkpoint", {"truncate": False})
    assert st == 200 and c["bytes"] > 0, c
    assert req(e.port, "POST", "/sessions/ex/checkpoint", {}, headers=B)[0] == 404
    # fork from the checkpointed state
    st, f = req(e.port, "POST", "/sessions", {"id": "ex-fork", "fork_of": "ex"})
    assert st == 201, f
    assert req(e.port, "POST", "/sessions/ex-fork/executions", {"code": "n"})[1]["value"] == 1


def t_stream_and_input(e):
    assert req(e.port, "POST", "/sessions", {"id": "st"})[0] == 201
    evs = list(stream_events(e.port, "st", {
        "code": "import time\nfor i in range(4):\n    print(i, flush=True)\n    time.sleep(0.02)\n'done'",
        "stream": "ndjson"}))
    assert evs[0]["type"] == "accepted" and evs[-1]["type"] == "result", evs
    outs = [x for x in evs if x["type"] == "output"]
    assert "".join(x["data"] for x in outs) == "0\n1\n2\n3\n"
    off = 0
    for x in outs:  # offsets are contiguous
        assert x["offset"] == off
        off += len(x["data"].encode())
    eid = evs[0]["eid"]
    assert all(x["eid"] == eid for x in evs) and evs[-1]["value"] == "done"
    seqs = [x["seq"] for x in evs]
    assert seqs == sorted(seqs)
    # inputs given up front
    st, r = req(e.port, "POST", "/sessions/st/executions",
                {"code": "a = input('a? ')\nb = input('b? ')\n(a, b)", "inputs": ["x"]})
    assert st == 200 and r["status"] == "error" and r["error"]["type"] == "EOFError", r
    st, r = req(e.port, "POST", "/sessions/st/executions",
                {"code": "a = input('a? ')\nb = input('b? ')\na + b", "inputs": ["x", "y"]})
    assert r["value"] == "xy", r
    # input answered through the REST route while the stream waits
    gen = stream_events(e.port, "st", {"code": "s = input('who? ')\n'hello ' + s",
                                       "stream": "ndjson", "id": "in-1"})
    for ev in gen:
        if ev["type"] == "input_request":
            assert ev["prompt"] == "who? " and ev["eid"] == "in-1"
            st, g = req(e.port, "GET", "/executions/in-1")
            assert g["status"] == "running" and g["input_request"]["prompt"] == "who? "
            assert req(e.port, "POST", "/executions/in-1/input", {"text": "bo"}, headers=B)[0] == 404
            assert req(e.port, "POST", "/executions/in-1/input", {"text": "bob"})[0] == 202
            # answered: a second reply is refused (409, while it runs and once it finished)
            st, d = req(e.port, "POST", "/executions/in-1/input", {"text": "again"})
            assert st == 409 and d["error"]["code"] == "no_input_request", d
        if ev["type"] == "result":
            assert ev["value"] == "hello bob", ev
            break
    # SSE framing
    c = http.client.HTTPConnection("127.0.0.1", e.port, timeout=30)
    c.request("POST", "/v1/sessions/st/executions",
              body=json.dumps({"code": "print('s')\n3", "stream": "sse"}),
              headers={**A, "Content-Type": "application/json"})
    r = c.getresponse()
    assert r.getheader("Content-Type") == "text/event-stream"
    text = r.read().decode()
    events = [dict(l.split(": ", 1) for l in blk.split("\n")) for blk in text.split("\n\n") if blk]
    assert [x["event"] for x in events] == ["accepted", "output", "result"], events
    assert json.loads(events[-1]["data"])["value"] == 3
    # cancel
    st, a = req(e.port, "POST", "/sessions/st/executions",
                {"code": "import time\ntime.sleep(30)", "wait": False, "id": "long-1"})
    time.sleep(0.3)
    st, d = req(e.port, "POST", "/executions/long-1/input", {"text": "x"})
    assert st == 409 and d["error"]["code"] == "no_input_request", d
    assert req(e.port, "POST", "/executions/long-1/input", {"text": "x"}, headers=B)[0] == 404
    assert req(e.port, "POST", "/executions/long-1/cancel", headers=B)[0] == 404
    assert req(e.port, "POST", "/executions/long-1/cancel")[0] == 202
    wait_result(e.port, "long-1")
    # finished: an input reply is 409 (the same as while it ran), another token's still 404
    st, d = req(e.port, "POST", "/executions/long-1/input", {"text": "x"})
    assert st == 409 and d["error"]["code"] == "no_input_request", d
    assert req(e.port, "POST", "/executions/long-1/input", {"text": "x"}, headers=B)[0] == 404
    assert wait_result(e.port, "long-1")["status"] == "cancelled"
    assert req(e.port, "POST", "/executions/long-1/cancel")[0] == 404


async def ws_main(e):
    assert req(e.port, "POST", "/sessions", {"id": "w"})[0] == 201
    ws = await ws_open(e.port, "w")
    await ws.send(json.dumps({"type": "execute", "code": "print('a')\n2+2", "eid": "w1"}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert [m["type"] for m in got] == ["accepted", "output", "result"], got
    assert all(m["eid"] == "w1" for m in got) and got[-1]["value"] == 4
    # the "accepted" message is printed without jansson: exactly these fields, in this order
    assert list(got[0].items()) == [("type", "accepted"), ("eid", "w1"), ("session", "w"),
                                    ("seq", 0)], got[0]
    # the "result" event: the event's fields, then the REST answer's (encoded once per event)
    assert list(got[-1])[:9] == ["type", "eid", "session", "seq", "id", "status", "repr",
                                 "value", "output"], got[-1]
    assert got[-1]["seq"] == 2 and got[-1]["id"] == "w1" and got[-1]["output"] == "a\n", got[-1]
    assert got[-1] == {**wait_result(e.port, "w1"), "type": "result", "eid": "w1",
                       "session": "w", "seq": 2}, got[-1]
    # generated ids: "x" + 16 hex digits, a different one for every execution
    seen = set()
    for _ in range(20):
        await ws.send(json.dumps({"type": "execute", "code": "1"}))
        gen = await ws_until(ws, lambda m: m["type"] == "result")
        eid = gen[0]["eid"]
        assert re.fullmatch(r"x[0-9a-f]{16}", eid) and eid not in seen, (eid, seen)
        assert all(m["eid"] == eid for m in gen), gen
        seen.add(eid)
    # the same eid again over the socket: the recorded result, not a second run
    await ws.send(json.dumps({"type": "execute", "code": "print('a')\n2+2", "eid": "w1"}))
    again = await ws_until(ws, lambda m: m["type"] == "result")
    assert [m["type"] for m in again] == ["accepted", "result"], again
    assert again[-1]["value"] == 4 and again[-1]["output"] == "a\n"
    # "accepted" comes first, before the cell's output, with a lower seq; a short cell's may
    # leave with its result, a long silent one's within a few ms anyway
    await ws.send(json.dumps({"type": "execute", "code": "print('p')\n7", "eid": "w-acc1"}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert [m["type"] for m in got] == ["accepted", "output", "result"], got
    assert got[0]["seq"] < got[1]["seq"] < got[2]["seq"], got
    t0 = time.monotonic()
    await ws.send(json.dumps({"type": "execute", "code": "import time\ntime.sleep(3)",
                              "eid": "w-acc2"}))
    got = await ws_until(ws, lambda m: m["type"] == "accepted")
    assert got[-1]["eid"] == "w-acc2" and time.monotonic() - t0 < 2, got
    got = await ws_until(ws, lambda m: m["type"] == "result", timeout=30)
    assert got[-1]["status"] == "ok", got
    # input over the socket
    await ws.send(json.dumps({"type": "execute", "code": "input('q? ') * 2", "eid": "w2"}))
    got = await ws_until(ws, lambda m: m["type"] == "input_request")
    assert got[-1]["prompt"] == "q? " and got[-1]["eid"] == "w2"
    await ws.send(json.dumps({"type": "input_reply", "eid": "w2", "text": "ab"}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert got[-1]["value"] == "abab", got
    # cancel
    await ws.send(json.dumps({"type": "execute", "code": "import time\ntime.sleep(30)",
                              "eid": "w3"}))
    await ws_until(ws, lambda m: m["type"] == "accepted")
    await asyncio.sleep(0.3)
    await ws.send(json.dumps({"type": "cancel", "eid": "w3"}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert got[-1]["status"] == "cancelled" and got[-1]["eid"] == "w3"
    # an execution's own timeout over the socket
    await ws.send(json.dumps({"type": "execute", "code": "import time\ntime.sleep(30)",
                              "eid": "w3t", "timeout_ms": 300}))
    got = await ws_until(ws, lambda m: m["type"] == "result", timeout=20)
    assert got[-1]["status"] == "timeout" and got[-1]["eid"] == "w3t", got[-1]
    for t in (-1, 2 ** 32, "1", 0.5):
        await ws.send(json.dumps({"type": "execute", "code": "1", "timeout_ms": t}))
        m = json.loads(await ws.recv())
        assert m["type"] == "error" and m["error"]["code"] == "invalid_message", (t, m)
    # bad messages: an error, the session goes on
    for bad, code in [({"type": "frob"}, "invalid_message"), ({"code": "1"}, "invalid_message"),
                      ({"type": "execute"}, "invalid_message"),
                      ({"type": "execute", "code": "1", "extra": 2}, "invalid_message"),
                      ({"type": "cancel", "eid": "nope"}, "execution_not_found"),
                      ({"type": "input_reply", "eid": "w1", "text": "x"}, "execution_not_found")]:
        await ws.send(json.dumps(bad))
        m = json.loads(await ws.recv())
        assert m["type"] == "error" and m["error"]["code"] == code, (bad, m)
    await ws.send("not json")
    m = json.loads(await ws.recv())
    assert m["error"]["code"] == "malformed_json"
    # random and mutated messages (bounded): each gets an error or runs; the session survives
    rnd = random.Random(int(os.environ.get("CAPSULE_FUZZ_SEED", "1234")))
    values = [None, True, 0, -1, 2 ** 63 - 1, 1.5, "", "x" * 300, "é\u2028", [], {}, ["a"],
              {"k": [1, {"z": None}]}, "a:b", "../x", "w1"]
    keys = ["type", "eid", "code", "tx", "timeout_ms", "text", "eof", "output_offset", "zzz"]
    types = ["execute", "resume", "input_reply", "cancel", "EXECUTE", "", "x" * 100]
    for i in range(150):
        msg = {}
        for k in rnd.sample(keys, rnd.randint(0, 4)):
            msg[k] = rnd.choice(values)
        if rnd.random() < 0.8:
            msg["type"] = rnd.choice(types)
        if msg.get("type") == "execute" and rnd.random() < 0.5:
            msg["code"] = rnd.choice(["1+", "x = 1", "'%d'" % i, "raise ValueError(1)"])
            msg.pop("eid", None)
        await ws.send(json.dumps(msg))
        await asyncio.sleep(0)
    await ws.send(json.dumps({"type": "execute", "code": "'alive'", "eid": "w-alive"}))
    got = await ws_until(ws, lambda m: m.get("type") == "result" and m.get("eid") == "w-alive",
                         timeout=60)
    assert got[-1]["value"] == "alive"
    assert not [m for m in got if m.get("type") == "error" and
                m["error"]["code"] in ("engine_error", "busy")], got
    # resume after a disconnect, from the last output offset seen: nothing lost
    code = "import time\nfor i in range(8):\n    print('line', i, flush=True)\n    time.sleep(0.1)\n'end'"
    await ws.send(json.dumps({"type": "execute", "code": code, "eid": "w4"}))
    seen = ""
    while seen.count("\n") < 2:
        m = json.loads(await ws.recv())
        if m["type"] == "output":
            assert m["offset"] == len(seen.encode())
            seen += m["data"]
    await ws.close()
    await asyncio.sleep(0.25)
    ws = await ws_open(e.port, "w")
    await ws.send(json.dumps({"type": "resume", "eid": "w4", "output_offset": len(seen.encode())}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    for m in got:
        if m["type"] == "output":
            assert m["offset"] == len(seen.encode()), (m, seen)
            seen += m["data"]
    assert seen == "".join(f"line {i}\n" for i in range(8)), seen
    assert got[-1]["value"] == "end" and got[-1]["output"] == seen
    # resume of a finished execution answers from the log
    await ws.send(json.dumps({"type": "resume", "eid": "w1", "output_offset": 0}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert got[0]["type"] == "output" and got[0]["data"] == "a\n" and got[-1]["value"] == 4
    await ws.send(json.dumps({"type": "resume", "eid": "never"}))
    m = json.loads(await ws.recv())
    assert m["type"] == "error" and m["error"]["code"] == "execution_not_found", m
    await ws.close()
    # ownership and unknown sessions on the upgrade
    for hdr, sid, code in [(B, "w", 404), (A, "nope", 404), ({}, "w", 401)]:
        try:
            await ws_open(e.port, sid, headers=hdr)
            raise AssertionError("upgrade accepted")
        except websockets.InvalidStatusCode as ex:
            assert ex.status_code == code, (sid, ex)


def t_websocket(e):
    asyncio.run(ws_main(e))
    # a frame in the same packet as the handshake (answered after an asynchronous session check)
    import socket
    text = json.dumps({"type": "execute", "code": "6*7", "eid": "w-same"}).encode()
    mask = b"\x0a\x0b\x0c\x0d"
    frame = bytes([0x81, 0x80 | len(text)]) + mask + bytes(
        c ^ mask[i % 4] for i, c in enumerate(text))
    s = socket.create_connection(("127.0.0.1", e.port), timeout=10)
    s.sendall(b"GET /v1/sessions/w/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
              b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % TOK_A.encode() + frame)
    got = b""
    while b'"type":"result"' not in got:
        b = s.recv(65536)
        assert b, got
        got += b
    s.close()
    assert got.startswith(b"HTTP/1.1 101") and b'"value":42' in got, got


def metrics(port):
    """The exposition text as {series: value} (series with its labels)."""
    st, text = req(port, "GET", "/metrics")
    assert st == 200
    out = {}
    for line in text.decode().split("\n"):
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def check_histogram(m, name):
    """Cumulative buckets that never fall, +Inf == _count; returns the count."""
    buckets = [(k, v) for k, v in m.items() if k.startswith(name + "_bucket{")]
    assert buckets and buckets[-1][0].endswith('le="+Inf"}'), buckets
    vals = [v for _, v in buckets]
    assert vals == sorted(vals), buckets
    assert vals[-1] == m[name + "_count"]
    return m[name + "_count"]


def t_metrics(e):
    m0 = metrics(e.port)
    for name in ["capsule_sessions_open", "capsule_pool_idle_workers",
                 "capsule_execution_seconds_bucket{le=\"+Inf\"}",
                 "capsule_executions_total{status=\"ok\"}", "capsule_worker_deaths_total",
                 "capsule_recovered_executions_total", "capsule_http_requests_total",
                 "capsule_ws_sessions_open", "capsule_wal_commits_total",
                 "capsule_wal_records_total", "capsule_wal_batch_records_count",
                 "capsule_wal_commit_seconds_sum", "capsule_wal_fsyncs_total",
                 "capsule_wal_checkpoints_total", "capsule_wal_checkpoint_seconds_total",
                 "capsule_wal_checkpoint_stall_seconds_total", "capsule_wal_checkpoints_skipped_total",
                 "capsule_checkpoints_total", "capsule_zygote_restarting",
                 "capsule_promise_resident_docs",
                 "capsule_promise_resident_bytes", "capsule_promise_evictions_total",
                 "capsule_promise_misses_total", "capsule_promise_records_total",
                 "capsule_promise_unflushed_docs", "capsule_promise_checkpoints_total",
                 "capsule_promise_checkpoint_docs_total"]:
        assert name in m0, name
    # the counters move for real: executions commit to the log, a worker killed is a death
    assert req(e.port, "POST", "/sessions", {"id": "met"})[0] == 201
    for i in range(5):
        assert req(e.port, "POST", "/sessions/met/executions", {"code": f"{i}+1"})[0] == 200
    st, r = req(e.port, "POST", "/sessions/met/executions",
                {"code": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"})
    assert st == 200 and r["status"] == "died", r
    # truncate: the engine first has the promise store write its checkpoint of prom.docs
    assert req(e.port, "POST", "/sessions/met/checkpoint", {"truncate": True})[0] == 200
    m1 = metrics(e.port)
    # memory: malloc's account (the soak benchmark reads it) and what the server holds; under
    # ASan its allocator replaces glibc's, whose arenas then stay empty (all three read 0)
    with open(f"/proc/{e.proc.pid}/maps") as f:
        sanitized = "libasan" in f.read()
    if sanitized:
        assert m1["capsule_heap_in_use_bytes"] == m1["capsule_heap_arena_bytes"] == 0, m1
    else:
        assert m1["capsule_heap_in_use_bytes"] > 0 and m1["capsule_heap_arena_bytes"] > 0, m1
        assert 0 <= m1["capsule_heap_free_bytes"] <= m1["capsule_heap_arena_bytes"], m1
    assert m1["capsule_server_executions_followed"] == 0, m1  # every one finished
    assert m1["capsule_wal_commits_total"] >= m0["capsule_wal_commits_total"] + 6
    assert m1["capsule_wal_records_total"] >= m0["capsule_wal_records_total"] + 12
    assert check_histogram(m1, "capsule_wal_batch_records") == m1["capsule_wal_commits_total"]
    assert m1["capsule_wal_batch_records_sum"] == m1["capsule_wal_records_total"]
    assert check_histogram(m1, "capsule_wal_commit_seconds") == m1["capsule_wal_commits_total"]
    assert m1["capsule_wal_commit_seconds_sum"] > m0["capsule_wal_commit_seconds_sum"]
    assert m1["capsule_wal_checkpoints_total"] >= m0["capsule_wal_checkpoints_total"] >= 0
    assert m1["capsule_wal_checkpoint_seconds_total"] >= m0["capsule_wal_checkpoint_seconds_total"]
    assert (m1["capsule_wal_checkpoint_stall_seconds_total"]
            >= m0["capsule_wal_checkpoint_stall_seconds_total"] >= 0)
    assert m1["capsule_worker_deaths_total"] == m0["capsule_worker_deaths_total"] + 1
    assert m1["capsule_zygote_restarting"] == 0  # (a worker died, not the zygote)
    assert m1["capsule_checkpoints_total"] == m0["capsule_checkpoints_total"] + 1
    assert m1['capsule_executions_total{status="ok"}'] == \
        m0['capsule_executions_total{status="ok"}'] + 5
    assert m1['capsule_executions_total{status="died"}'] == \
        m0['capsule_executions_total{status="died"}'] + 1
    check_histogram(m1, "capsule_execution_seconds")
    # the same executions by stage: each stage counts every execution that ran here, and the
    # stages' times add up to no more than the server's submit-to-result time
    counts, sums = [], 0.0
    for st in ("request", "run", "finish"):
        name = "capsule_execution_stage_seconds"
        lab = [(k, v) for k, v in m1.items() if k.startswith(f'{name}_bucket{{stage="{st}"')]
        assert lab and lab[-1][0].endswith('le="+Inf"}'), lab
        vals = [v for _, v in lab]
        assert vals == sorted(vals), lab
        assert vals[-1] == m1[f'{name}_count{{stage="{st}"}}']
        before = m0.get(f'{name}_count{{stage="{st}"}}', 0)
        counts.append(vals[-1] - before)
        sums += m1[f'{name}_sum{{stage="{st}"}}'] - m0.get(f'{name}_sum{{stage="{st}"}}', 0)
        assert m1[f'{name}_sum{{stage="{st}"}}'] > 0, st
    assert counts[0] == counts[1] == counts[2] >= 5, counts
    assert 0 < sums <= (m1["capsule_execution_seconds_sum"]
                        - m0["capsule_execution_seconds_sum"]) + 1e-6
    # the loop's stall watch: iterations counted with their busy time, the thread's CPU time
    # beside it, the longest iteration since the previous scrape (reset by each scrape)
    assert check_histogram(m1, "capsule_loop_busy_seconds") > \
        check_histogram(m0, "capsule_loop_busy_seconds")
    assert m1["capsule_loop_busy_seconds_sum"] > m0["capsule_loop_busy_seconds_sum"]
    assert m1["capsule_loop_cpu_seconds_total"] > m0["capsule_loop_cpu_seconds_total"]
    assert m1["capsule_loop_busy_max_seconds"] > 0, m1
    assert m1["capsule_loop_busy_max_cpu_seconds"] <= m1["capsule_loop_busy_max_seconds"] + 0.001
    # the promise store: every execution is a promise created and settled (2 records at least);
    # prom.docs is written in each commit by the engine (no checkpoints, nothing unflushed) and
    # the 6 settled executions stay in the settled cache
    assert m1["capsule_promise_records_total"] >= m0["capsule_promise_records_total"] + 12
    assert m1["capsule_promise_checkpoints_total"] == 0
    assert m1["capsule_promise_checkpoint_docs_total"] == 0
    assert m1["capsule_promise_unflushed_docs"] == 0
    assert m1["capsule_promise_resident_docs"] >= 6
    assert m1["capsule_promise_resident_bytes"] > 0


async def crash_setup(e):
    """An input request waiting, an execution printing, and an acknowledged result."""
    ws = await ws_open(e.port, "k")
    await ws.send(json.dumps({"type": "execute", "eid": "k-ack", "code": "v = 41 + 1\nv"}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert got[-1]["value"] == 42
    await ws.send(json.dumps({"type": "execute", "eid": "k-in",
                              "code": "name = input('name? ')\n'hi ' + name"}))
    await ws_until(ws, lambda m: m["type"] == "input_request")
    return ws


async def crash_after(e):
    ws = await ws_open(e.port, "k")
    await ws.send(json.dumps({"type": "resume", "eid": "k-in", "output_offset": 0}))
    got = await ws_until(ws, lambda m: m["type"] in ("input_request", "result", "error"))
    assert got[-1]["type"] == "input_request" and got[-1]["prompt"] == "name? ", got
    await ws.send(json.dumps({"type": "input_reply", "eid": "k-in", "text": "ann"}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert got[-1]["value"] == "hi ann", got
    # the namespace survived: v is still there
    await ws.send(json.dumps({"type": "execute", "eid": "k-v", "code": "v"}))
    got = await ws_until(ws, lambda m: m["type"] == "result")
    assert got[-1]["value"] == 42
    await ws.close()


def t_limit_flags(server, data, tokfile):
    e = Engine(server, data, tokfile, ("--max-body-bytes", "300", "--json-max-depth", "3",
                                       "--max-conns", "4"))
    try:
        st, d = req(e.port, "POST", "/sessions", {"id": "x" * 100, "tx": "y" * 300})
        assert st == 413 and d["error"]["code"] == "body_too_large", (st, d)
        st, d = req(e.port, "POST", "/sessions", {"id": "d", "tx": [[[[1]]]]})
        assert st == 400 and d["error"]["code"] == "json_too_deep", (st, d)
    finally:
        rc, err = e.term()
    assert rc == 0, err


def t_kill9(server, data, tokfile):
    e = Engine(server, data, tokfile)
    assert req(e.port, "POST", "/sessions", {"id": "k"})[0] == 201
    loop = asyncio.new_event_loop()
    ws = loop.run_until_complete(crash_setup(e))
    # an NDJSON stream in flight too, read by a client thread
    st, _ = req(e.port, "POST", "/sessions", {"id": "k2"})
    seen = []

    def reader():
        try:
            for ev in stream_events(e.port, "k2", {
                    "code": "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.1)\n'fin'",
                    "stream": "ndjson", "id": "k2-run"}):
                seen.append(ev)
        except (OSError, http.client.HTTPException, ValueError):
            pass  # the server died under it

    th = threading.Thread(target=reader)
    th.start()
    end = time.time() + 10
    while "".join(x["data"] for x in list(seen) if x["type"] == "output").count("\n") < 2:
        assert time.time() < end, seen
        time.sleep(0.01)
    e.kill9()
    th.join(10)
    streamed = "".join(x["data"] for x in seen if x["type"] == "output")
    assert len(streamed) >= 4 and not any(x["type"] == "result" for x in seen), seen
    try:
        loop.run_until_complete(asyncio.wait_for(ws.wait_closed(), 5))
    except Exception:
        pass
    e = Engine(server, data, tokfile)
    # recovery re-ran the two interrupted executions (the waiting input, the stream)
    assert metrics(e.port)["capsule_recovered_executions_total"] == 2
    st, r = req(e.port, "GET", "/executions/k-ack")
    assert st == 200 and r["value"] == 42 and not r["restarted"], r
    loop.run_until_complete(crash_after(e))
    loop.close()
    # the interrupted stream was re-run to completion with all of its output
    end = time.time() + 20
    while True:
        st, r = req(e.port, "GET", "/executions/k2-run")
        if r.get("status") == "ok":
            break
        assert time.time() < end, r
        time.sleep(0.1)
    assert r["value"] == "fin" and r["output"] == "0\n1\n2\n3\n4\n" and r["restarted"], r
    assert r["output"].startswith(streamed), (streamed, r)  # every chunk streamed is there
    rc, err = e.term()
    assert rc == 0, err


def until_status(port, eid, pred, timeout=20):
    end = time.time() + timeout
    while True:
        st, r = req(port, "GET", "/executions/" + eid)
        if st == 200 and pred(r):
            return r
        assert time.time() < end, (st, r)
        time.sleep(0.05)


def t_kill9_rest(server, data, tokfile):
    """After a restart, executions the engine re-runs are seen, answered and cancelled over REST
    by their ids alone: the server attaches to them on the first GET, input reply or cancel."""
    e = Engine(server, data, tokfile)
    assert req(e.port, "POST", "/sessions", {"id": "kr"})[0] == 201
    code = ("import time\nfor i in range(3):\n    print(i, flush=True)\n"
            "a = input('a? ')\nb = input('b? ')\na + b")
    st, r = req(e.port, "POST", "/sessions/kr/executions", {"code": code, "id": "kr-in",
                                                              "wait": False})
    assert st == 202, (st, r)
    until_status(e.port, "kr-in", lambda r: r.get("input_request", {}).get("prompt") == "a? ")
    st, r = req(e.port, "POST", "/executions/kr-in/input", {"text": "x"})
    assert st == 202, (st, r)
    until_status(e.port, "kr-in", lambda r: r.get("input_request", {}).get("prompt") == "b? ")
    assert req(e.port, "POST", "/sessions", {"id": "kr2"})[0] == 201
    st, r = req(e.port, "POST", "/sessions/kr2/executions",
                {"code": "import time\nprint('z', flush=True)\ntime.sleep(60)", "id": "kr-sleep",
                 "wait": False})
    assert st == 202, (st, r)
    until_status(e.port, "kr-sleep", lambda r: r.get("output") == "z\n")
    e.kill9()
    e = Engine(server, data, tokfile)
    try:
        # the re-run answered "a? " from the log and waits on "b? ": the first GET attaches
        r = until_status(e.port, "kr-in", lambda r: "input_request" in r)
        assert r["status"] == "running" and r["session"] == "kr", r
        assert r["output"] == "0\n1\n2\n" and r["input_request"]["prompt"] == "b? ", r
        st, r = req(e.port, "GET", "/executions/kr-in", headers=B)  # another token: not there
        assert st == 404, (st, r)
        st, r = req(e.port, "POST", "/executions/kr-in/input", {"text": "y"})
        assert st == 202, (st, r)
        r = until_status(e.port, "kr-in", lambda r: r["status"] != "running")
        assert r["status"] == "ok" and r["value"] == "xy" and r["restarted"], r
        # an input reply to a finished execution: 409; to an unknown one: 404
        st, r = req(e.port, "POST", "/executions/kr-in/input", {"text": "again"})
        assert st == 409 and r["error"]["code"] == "no_input_request", (st, r)
        st, r = req(e.port, "POST", "/executions/kr-nope/input", {"text": "y"})
        assert st == 404 and r["error"]["code"] == "execution_not_found", (st, r)
        # a cancel by id alone, with no GET before it: attaches, then interrupts the re-run
        st, r = req(e.port, "POST", "/executions/kr-sleep/cancel")
        assert st == 202 and r["status"] == "cancelling", (st, r)
        r = until_status(e.port, "kr-sleep", lambda r: r["status"] != "running")
        assert r["status"] == "cancelled" and r["restarted"], r
        st, r = req(e.port, "POST", "/executions/kr-nope/cancel")
        assert st == 404, (st, r)
        # the session goes on
        st, r = req(e.port, "POST", "/sessions/kr/executions", {"code": "a + b"})
        assert st == 200 and r["value"] == "xy", (st, r)
    finally:
        rc, err = e.term()
    assert rc == 0, err


async def accepted_then_kill(e):
    """Executes queued behind a sleeping one; kill -9 the moment any "accepted" arrives."""
    socks = []
    for k in range(4):
        ws = await ws_open(e.port, f"ad{k}")
        await ws.send(json.dumps({"type": "execute", "eid": f"ad{k}-sleep",
                                  "code": "import time\ntime.sleep(5)"}))
        socks.append(ws)
    for ws in socks:
        await ws_until(ws, lambda m: m["type"] == "accepted")
    for i in range(10):
        for k, ws in enumerate(socks):
            await ws.send(json.dumps({"type": "execute", "eid": f"ad{k}-{i}", "code": f"{i}*2"}))
    accepted = []

    async def first(ws):
        m = json.loads(await asyncio.wait_for(ws.recv(), 20))
        assert m["type"] == "accepted", m  # nothing else can come before it
        return m["eid"]

    done, pending = await asyncio.wait([asyncio.ensure_future(first(ws)) for ws in socks],
                                       return_when=asyncio.FIRST_COMPLETED)
    e.proc.kill()  # as soon as a client holds an "accepted"
    accepted = [t.result() for t in done]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    e.proc.wait()
    e.proc.stderr.read()
    for ws in socks:  # whatever had reached the client socket before the kill counts too
        try:
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 1))
                if m["type"] == "accepted":
                    accepted.append(m["eid"])
        except Exception:
            pass
    return accepted


def t_accepted_durable(server, data, tokfile):
    """A WebSocket "accepted" means the execution is durably recorded: kill -9 right after a
    client saw it, and the restarted server has the execution (re-run to its result). A full
    queue answers a "refused" result and never "accepted"."""
    e = Engine(server, data, tokfile)
    loop = asyncio.new_event_loop()
    try:
        for k in range(4):
            assert req(e.port, "POST", "/sessions", {"id": f"ad{k}"})[0] == 201
        accepted = loop.run_until_complete(accepted_then_kill(e))
    finally:
        e.proc.kill()  # (killed already when all went well; never left running on a failure)
    assert accepted, "no accepted before the kill"
    e = Engine(server, data, tokfile, ("--max-queue", "3"))
    try:
        accepted_after_restart(e, accepted, loop)
    except BaseException:
        e.kill9()
        raise
    loop.close()
    rc, err = e.term()
    assert rc == 0, err


def accepted_after_restart(e, accepted, loop):
    for eid in accepted:
        st, r = req(e.port, "GET", f"/executions/{eid}")
        assert st == 200, (eid, st, r)  # recorded: pending, running or finished, never lost
        if not eid.endswith("sleep"):
            r = wait_result(e.port, eid)
            i = int(eid.split("-")[1])
            assert r["status"] == "ok" and r["value"] == i * 2, (eid, r)

    async def full_queue():
        # a fresh session: ad0..ad3 may still be re-running what the kill interrupted
        assert req(e.port, "POST", "/sessions", {"id": "fq"})[0] == 201
        ws = await ws_open(e.port, "fq")
        types = {}
        for i in range(100, 120):  # more than the queue holds (3 here)
            await ws.send(json.dumps({"type": "execute", "eid": f"fq-{i}",
                                      "code": "import time\ntime.sleep(0.01)"}))
        results = 0
        while results < 20:
            m = json.loads(await asyncio.wait_for(ws.recv(), 30))
            seen = types.setdefault(m["eid"], [])
            seen.append(m["type"])
            if m["type"] == "result":
                results += 1
                if m["status"] == "refused":
                    assert seen == ["result"] and m["error"]["code"] == "queue_full", (m, seen)
                else:
                    assert seen[0] == "accepted" and m["status"] == "ok", (m, seen)
        await ws.close()
        refused = sum(1 for v in types.values() if "accepted" not in v)
        assert 0 < refused < 20, types

    loop.run_until_complete(full_queue())


def t_graceful(server, data, tokfile):
    e = Engine(server, data, tokfile)
    opts = {"tx": "rollback_always", "timeout_ms": 30000, "mem_bytes": 0, "cpu_seconds": 60,
            "retry_on_death": True}
    assert req(e.port, "POST", "/sessions", {"id": "g1", **opts})[0] == 201
    # never run (an address-space limit aborts an ASan worker): its options are only read back
    opts0 = {"tx": "commit_always", "timeout_ms": 0, "mem_bytes": 2 << 30, "cpu_seconds": 0,
             "retry_on_death": False}
    assert req(e.port, "POST", "/sessions", {"id": "g0", **opts0})[0] == 201
    assert req(e.port, "POST", "/sessions", {"id": "g2"})[0] == 201
    for sid, eid in [("g1", "g-1"), ("g2", "g-2")]:
        assert req(e.port, "POST", f"/sessions/{sid}/executions",
                   {"code": "import time\ntime.sleep(0.8)\n'g'", "wait": False, "id": eid})[0] == 202
    loop = asyncio.new_event_loop()
    ws = loop.run_until_complete(ws_open(e.port, "g1"))
    time.sleep(0.2)
    t0 = time.time()
    rc, err = e.term()
    assert rc == 0, err
    assert time.time() - t0 >= 0.4  # it waited for the running executions
    loop.run_until_complete(ws.wait_closed())
    assert ws.close_code == 1001, ws.close_code  # told why, not reset
    loop.close()
    e = Engine(server, data, tokfile)
    st, g1 = req(e.port, "GET", "/sessions/g1")  # options read back after a restart
    assert st == 200 and g1["options"] == opts and not g1["live"], g1
    assert req(e.port, "GET", "/sessions/g0")[1]["options"] == opts0
    for eid in ("g-1", "g-2"):
        st, r = req(e.port, "GET", f"/executions/{eid}")
        assert st == 200 and r["status"] == "ok" and r["value"] == "g" and not r["restarted"], r
    # second signal: exits at once; the interrupted execution is re-run at the next start
    assert req(e.port, "POST", "/sessions/g1/executions",
               {"code": "import time\ntime.sleep(3)\n'again'", "wait": False, "id": "g-3"})[0] == 202
    wait_running(e.port, "g-3")
    e.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    st, _ = None, None
    e.proc.send_signal(signal.SIGTERM)
    rc = e.proc.wait(timeout=5)
    assert rc != 0
    e.proc.stderr.read()
    e = Engine(server, data, tokfile)
    r = wait_result(e.port, "g-3", timeout=30)
    assert r["status"] == "ok" and r["value"] == "again" and r["restarted"], r
    rc, err = e.term()
    assert rc == 0, err


def t_spec_statuses(server, data, tokfile):
    """Walks tools/openapi.json: every (method, path, status) it documents is produced by a real
    request, and every status the walk gets is documented for that route (no status the spec
    does not list, no listed status the server cannot give)."""
    e = Engine(server, data, tokfile, ("--max-queue", "1", "--max-sessions", "4"))
    seen = {}  # (METHOD, path template) -> set of statuses

    def call(method, tpl, path, body=None, headers=A, conn=None):
        if conn is None:
            st, d = req(e.port, method, path, body, headers=headers)
        else:
            h = dict(headers or {})
            if body is not None:
                h["Content-Type"] = "application/json"
            conn.request(method, "/v1" + path, body=None if body is None else json.dumps(body),
                         headers=h)
            r = conn.getresponse()
            st, d = r.status, r.read()
        seen.setdefault((method, tpl), set()).add(st)
        return st, d

    def ws_status(path, headers=A):
        c = http.client.HTTPConnection("127.0.0.1", e.port, timeout=10)
        h = {**(headers or {}), "Connection": "Upgrade", "Upgrade": "websocket",
             "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        c.request("GET", "/v1" + path, headers=h)
        st = c.getresponse().status
        c.close()
        return st

    st, doc = call("GET", "/openapi.json", "/openapi.json", headers={})
    assert st == 200
    for p_ in ("/healthz", "/readyz"):
        call("GET", p_, p_, headers={})
    for p_ in ("/metrics", "/pool", "/sessions"):
        call("GET", p_, p_)
        call("GET", p_, p_, headers={})  # 401
    S = "/sessions/{sid}"
    # sessions
    call("POST", "/sessions", "/sessions", {"id": "sp"})
    call("POST", "/sessions", "/sessions", {"id": "bad id"})
    call("POST", "/sessions", "/sessions", {"fork_of": "nope"})
    st, d = call("POST", "/sessions", "/sessions", {"id": "sp", "fork_of": "sp"})
    assert st == 400 and "another session" in d["error"]["message"], d
    call("POST", "/sessions", "/sessions", {"id": "wb", "warmup": "1/0"})  # 422
    call("POST", "/sessions", "/sessions", headers={})
    call("POST", "/sessions", "/sessions", {"id": "sp2"})
    call("POST", "/sessions", "/sessions", {"id": "sp3"})
    call("POST", "/sessions", "/sessions", {"id": "sp3", "fork_of": "sp"})  # 409: target exists
    assert call("POST", "/sessions", "/sessions", {"id": "sp4"})[0] == 429  # 4 open: the limit
    for m, suffix, body in [("GET", "", None), ("DELETE", "", None),
                            ("POST", "/checkpoint", {}), ("POST", "/release", None),
                            ("GET", "/warmup", None)]:
        call(m, S + suffix, "/sessions/nope" + suffix, body)  # 404
        call(m, S + suffix, "/sessions/sp" + suffix, body, headers={})  # 401
    call("GET", S, "/sessions/sp")
    call("POST", S + "/checkpoint", "/sessions/sp/checkpoint", {})
    call("POST", S + "/checkpoint", "/sessions/sp/checkpoint", {"truncate": "yes"})  # 400
    call("GET", S + "/warmup", "/sessions/wb/warmup")
    call("DELETE", S, "/sessions/sp3")
    # executions
    X = S + "/executions"
    call("POST", X, "/sessions/sp/executions", {"code": "2+2"})
    call("POST", X, "/sessions/sp/executions", {"code": 5})  # 400
    call("POST", X, "/sessions/nope/executions", {"code": "1"})
    call("POST", X, "/sessions/sp/executions", {"code": "1"}, headers={})
    call("POST", X, "/sessions/sp/executions",
         {"code": "import time\ntime.sleep(1.5)\nv = input('v? ')\nv", "wait": False,
          "id": "long"})
    wait_running(e.port, "long")  # long runs: the queue (1) takes one more, then it is full
    call("POST", X, "/sessions/sp/executions", {"code": "3", "wait": False, "id": "q1"})
    st, d = call("POST", X, "/sessions/sp/executions", {"code": "4", "wait": False, "id": "q2"})
    assert st == 429 and d["error"]["code"] == "queue_full", (st, d)
    st, d = call("POST", X, "/sessions/sp/executions", {"code": "4", "id": "q3"})
    assert st == 429 and d["error"]["code"] == "queue_full", (st, d)
    call("POST", S + "/release", "/sessions/sp/release")  # 409: running
    E = "/executions/{eid}"
    for m, suffix, body in [("GET", "", None), ("POST", "/input", {"text": "x"}),
                            ("POST", "/cancel", None)]:
        call(m, E + suffix, "/executions/never" + suffix, body)  # 404
        call(m, E + suffix, "/executions/long" + suffix, body, headers={})  # 401
    call("GET", E, "/executions/long")
    call("POST", E + "/input", "/executions/long/input", {"text": "x"})  # 409: not asking yet
    call("POST", E + "/input", "/executions/long/input", {"txt": "x"})  # 400
    for _ in range(100):
        st, d = req(e.port, "GET", "/executions/long")
        if d.get("input_request"):
            break
        time.sleep(0.05)
    call("POST", E + "/input", "/executions/long/input", {"text": "x"})  # 202
    assert wait_result(e.port, "long")["value"] == "x"
    wait_result(e.port, "q1")
    call("POST", S + "/release", "/sessions/sp/release")  # 200
    call("POST", X, "/sessions/sp/executions",
         {"code": "import time\ntime.sleep(30)", "wait": False, "id": "cx"})
    call("POST", E + "/cancel", "/executions/cx/cancel")
    r = wait_result(e.port, "cx")
    assert r["status"] == "cancelled", r
    # durable steps and external promises (tools/engine_tasks.c)
    T = E + "/tasks"
    call("POST", X, "/sessions/sp/executions",
         {"code": "import capsule\ncapsule.step(len, 'ab')", "id": "tk"})
    st, d = call("GET", T, "/executions/tk/tasks")
    assert st == 200 and d["tasks"][0]["name"] == "len" and d["tasks"][0]["id"] == "tk.1", d
    call("GET", T, "/executions/never/tasks")  # 404
    call("GET", T, "/executions/tk/tasks", headers={})  # 401
    call("POST", X, "/sessions/sp/executions",
         {"code": "import capsule\ncapsule.promise('ok-1').wait()", "wait": False, "id": "pw"})
    for verb in ("resolve", "reject"):
        P = "/promises/{id}/" + verb
        call("POST", P, f"/promises/nope/{verb}", {"value": 1})  # 404
        call("POST", P, f"/promises/nope/{verb}", {"valu": 1})  # 400
        call("POST", P, f"/promises/nope/{verb}", {"value": 1}, headers={})  # 401
    for _ in range(200):  # 404 until the execution has created it
        st, d = call("POST", "/promises/{id}/resolve", "/promises/ok-1/resolve", {"value": 5})
        if st == 200:
            break
        time.sleep(0.05)
    st, d = call("POST", "/promises/{id}/reject", "/promises/ok-1/reject", {"value": 6})
    assert st == 200 and d["state"] == "resolved", d  # settled already: unchanged
    assert wait_result(e.port, "pw")["value"] == 5
    # the WebSocket route
    W = S + "/ws"
    for path, h in [("/sessions/sp/ws", A), ("/sessions/nope/ws", A), ("/sessions/sp/ws", {})]:
        seen.setdefault(("GET", W), set()).add(ws_status(path, h))
    call("GET", W, "/sessions/sp/ws")  # a plain GET: 426
    # draining: requests under way when SIGTERM comes (idle connections are closed) get 503
    call("POST", X, "/sessions/sp2/executions",
         {"code": "import time\ntime.sleep(1.5)", "wait": False, "id": "drain"})
    import socket
    body = json.dumps({"code": "1"}).encode()
    part = [(b"GET /v1/readyz HTTP/1.1\r\nHost: x\r\n", b"\r\n"),
            (b"POST /v1/sessions/sp2/executions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
             + TOK_A.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\n\r\n", body)]
    socks = []
    for head, _ in part:
        sk = socket.create_connection(("127.0.0.1", e.port), timeout=10)
        sk.sendall(head)
        socks.append(sk)
    time.sleep(0.2)
    e.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    for (tpl, m), sk, (_, rest) in zip([("/readyz", "GET"), (X, "POST")], socks, part):
        sk.sendall(rest)
        status = int(sk.recv(65536).split(b" ", 2)[1])
        assert status == 503, (tpl, status)
        seen.setdefault((m, tpl), set()).add(status)
        sk.close()
    assert e.proc.wait(timeout=30) == 0
    e.proc.stderr.read()
    # compare with the document
    secured = lambda op: op.get("security", doc.get("security")) != []  # noqa: E731
    problems = []
    for tpl, item in doc["paths"].items():
        for m, op in item.items():
            if m == "parameters":
                continue
            want = {int(c) for c in op["responses"]}
            got = seen.get((m.upper(), tpl), set())
            if secured(op) and 401 not in want:
                problems.append(f"{m.upper()} {tpl}: secured but 401 not documented")
            for c in sorted(want - got):
                problems.append(f"{m.upper()} {tpl}: documents {c}, never produced")
            for c in sorted(got - want):
                problems.append(f"{m.upper()} {tpl}: gave {c}, not documented")
    for key in seen:
        if key[1] not in doc["paths"]:
            problems.append(f"{key}: not in the document")
    assert not problems, "\n".join(problems)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--only")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="capsule-engine-test-")
    try:
        tokfile = os.path.join(tmp, "tokens")
        with open(tokfile, "w") as f:
            f.write(TOK_A + "\n" + TOK_B + "\n")

        def want(name):
            return not args.only or args.only == name

        if want("t_help"):
            t_help(args.server)
            print("ok   t_help", flush=True)
        e = Engine(args.server, os.path.join(tmp, "d1"), tokfile)
        try:
            for t in (t_meta, t_sessions, t_execute, t_stream_and_input, t_websocket, t_metrics):
                if want(t.__name__):
                    t0 = time.time()
                    t(e)
                    print(f"ok   {t.__name__} ({time.time() - t0:.2f} s)", flush=True)
        finally:
            rc, err = e.term()
            if os.environ.get("VERBOSE"):
                sys.stderr.write(err)
        assert rc == 0, err
        for t in (t_limit_flags, t_kill9, t_kill9_rest, t_accepted_durable, t_graceful,
                  t_spec_statuses):
            if want(t.__name__):
                t0 = time.time()
                t(args.server, os.path.join(tmp, t.__name__), tokfile)
                print(f"ok   {t.__name__} ({time.time() - t0:.2f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
