#!/usr/bin/python3.11
"""test_resonate.py - the Resonate protocol (2026-04-01) front end of capsule-engine, end to end:
a real capsule-engine process on a real data directory, real HTTP (http.client), real SSE
streams, real kill -9. Replays the recorded SDK 0.11.5 traffic (trace*.ndjson) and checks every
answer's kind, status and record shape, and the execute/unblock messages on the poll streams.

usage: test_resonate.py --server PATH --traces DIR [--only NAME]
"""
import argparse
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import started

TOKEN = "resonate-token-0001"
VERSION = "2026-04-01"
FAR = 4102444800000  # 2100-01-01


class Engine:
    def __init__(self, path, data, tokfile, extra=()):
        self.proc = started.popen(
            [path, "--listen", "127.0.0.1:0", "--data-dir", data, "--tokens-file", tokfile,
             "--pool-idle", "1", "--grace-ms", "2000", "--log-level", "warn", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "listening on port" not in line:
            raise AssertionError("engine did not start: " + line + self.proc.stderr.read())
        self.port = int(line.split()[-1])

    def term(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        err = self.proc.stderr.read()
        assert rc == 0, (rc, err)
        return err

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.read()


class Client:
    """One keep-alive connection speaking the envelope."""

    def __init__(self, port, token=TOKEN, head_auth=None):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.token, self.head_auth, self.n = token, head_auth, 0

    def raw(self, body, headers=None):
        h = {"Content-Type": "application/json"}
        if self.token:
            h["Authorization"] = "Bearer " + self.token
        h.update(headers or {})
        self.c.request("POST", "/", body=body, headers=h)
        r = self.c.getresponse()
        data = r.read()
        ct = r.getheader("Content-Type") or ""
        assert ct == "application/json", (r.status, ct, data)
        return r.status, json.loads(data)

    def rpc(self, kind, data, corr=None):
        self.n += 1
        corr = corr or "corr-%d" % self.n
        head = {"corrId": corr, "version": VERSION}
        if self.head_auth:
            head["auth"] = self.head_auth
        st, env = self.raw(json.dumps({"kind": kind, "head": head, "data": data}))
        assert env["kind"] == kind and env["head"]["corrId"] == corr, env
        assert env["head"]["status"] == st and env["head"]["version"] == VERSION, (st, env)
        if st not in (200, 300):
            assert isinstance(env["data"], str) and env["data"], env
        no_nulls(env)
        return st, env["data"]


def no_nulls(v, path="$"):
    if v is None:
        raise AssertionError("null at " + path)
    if isinstance(v, dict):
        for k, x in v.items():
            no_nulls(x, path + "." + k)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            no_nulls(x, "%s[%d]" % (path, i))


class Poller:
    """An SSE stream GET /poll/{group}/{id}; messages land in a queue."""

    def __init__(self, port, group, pid, token=TOKEN):
        self.q = queue.Queue()
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        h = {"Accept": "text/event-stream"}
        if token:
            h["Authorization"] = "Bearer " + token
        self.c.request("GET", "/poll/%s/%s" % (group, pid), headers=h)
        self.r = self.c.getresponse()
        self.status = self.r.status
        self.ctype = self.r.getheader("Content-Type")
        if self.status == 200:
            self.t = threading.Thread(target=self._read, daemon=True)
            self.t.start()

    def _read(self):
        try:
            while True:
                line = self.r.readline()
                if not line:
                    break
                line = line.decode().rstrip("\n")
                if line.startswith("data: "):
                    self.q.put(json.loads(line[6:]))
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass
        self.q.put(None)

    def get(self, timeout=5.0):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self):
        try:
            self.c.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.c.close()


def promise_rec_ok(p):
    assert set(p) - {"settledAt"} == {"id", "state", "param", "value", "tags", "createdAt",
                                      "timeoutAt"}, p
    assert ("settledAt" in p) == (p["state"] != "pending"), p
    assert isinstance(p["param"], dict) and isinstance(p["value"], dict), p


def task_rec_ok(t):
    acquired = t["state"] == "acquired"
    want = {"id", "version", "state", "resumes"} | ({"pid", "ttl"} if acquired else set())
    assert set(t) == want, t


# ------------------------------------------------------------------------------------------
# tests


def t_envelope(eng, d):
    c = Client(eng.port)
    st, env = c.raw("{not json")
    assert st == 400 and isinstance(env["data"], str) and env["head"]["status"] == 400, env
    st, env = c.raw("[1,2]")
    assert st == 400, env
    st, env = c.raw(json.dumps({"kind": "", "head": {"corrId": "x", "version": VERSION},
                                "data": {}}))
    assert st == 400 and "kind" in env["data"], env
    st, env = c.raw(json.dumps({"kind": "promise.get", "head": {"version": VERSION},
                                "data": {"id": "a"}}))
    assert st == 400 and "corrId" in env["data"], env
    st, env = c.raw(json.dumps({"kind": "promise.get", "head": {"corrId": "v", "version": "1.0"},
                                "data": {"id": "a"}}))
    assert st == 400 and env["kind"] == "promise.get" and env["head"]["corrId"] == "v", env
    assert "version" in env["data"].lower(), env
    st, env = c.raw(json.dumps({"kind": "promise.get", "head": {"corrId": "v",
                                                                "version": VERSION},
                                "data": [1]}))
    assert st == 400 and "data" in env["data"], env
    st, msg = c.rpc("promise.frobnicate", {})
    assert st == 400 and "Unknown kind" in msg, msg
    for kind in ("task.search", "schedule.create", "schedule.get", "schedule.delete",
                 "schedule.search", "debug.start", "debug.stop", "debug.reset", "debug.snap",
                 "debug.tick"):
        st, msg = c.rpc(kind, {})
        assert st == 501 and "Not implemented" in msg, (kind, st, msg)
    # wrong field types: 400 with the field named
    st, msg = c.rpc("promise.get", {"id": 7})
    assert st == 400 and "'id'" in msg, msg
    st, msg = c.rpc("promise.create", {"id": "x"})
    assert st == 400 and "timeoutAt" in msg, msg
    st, msg = c.rpc("promise.create", {"id": "x", "timeoutAt": FAR, "tags": {"k": 1}})
    assert st == 400, msg
    st, msg = c.rpc("promise.create", {"id": "x", "timeoutAt": FAR, "param": {"data": 5}})
    assert st == 400, msg
    # the engine's own promises are out of reach
    st, msg = c.rpc("promise.get", {"id": "capsule/s/anything"})
    assert st == 400 and "reserved" in msg, msg
    st, msg = c.rpc("promise.create", {"id": "ok-1", "timeoutAt": FAR,
                                       "tags": {"capsule:kind": "x"}})
    assert st == 400 and "reserved" in msg, msg
    # legacy REST paths: 410; unknown paths: JSON 404 (the SDK reads a non-JSON 404 as a
    # legacy server)
    for method, path in (("GET", "/promises/x"), ("POST", "/promises"), ("PATCH", "/promises/x"),
                         ("POST", "/tasks/claim"), ("GET", "/schedules"),
                         ("GET", "/tasks/claim/x/1")):
        c.c.request(method, path, headers={"Authorization": "Bearer " + TOKEN})
        r = c.c.getresponse()
        body = json.loads(r.read())
        assert r.status == 410 and r.getheader("Content-Type") == "application/json", (path, body)
        assert "Gone" in body["error"], body
    c.c.request("GET", "/nothing/here", headers={"Authorization": "Bearer " + TOKEN})
    r = c.c.getresponse()
    r.read()
    assert r.status == 404 and r.getheader("Content-Type") == "application/json"


def t_auth(eng, d):
    st, msg = Client(eng.port, token=None).rpc("promise.get", {"id": "a"})
    assert st == 401 and "token" in msg, msg
    st, msg = Client(eng.port, token="wrong-token").rpc("promise.get", {"id": "a"})
    assert st == 401, msg
    st, msg = Client(eng.port, token=None, head_auth="wrong").rpc("promise.get", {"id": "a"})
    assert st == 401, msg
    st, msg = Client(eng.port, token=None, head_auth=TOKEN).rpc("promise.get", {"id": "a"})
    assert st == 404, msg  # authenticated by head.auth alone
    p = Poller(eng.port, "default", "w", token=None)
    assert p.status == 401 and p.ctype == "application/json", p.status
    # /health and /ready need no token
    for path in ("/health", "/ready"):
        c = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=10)
        c.request("GET", path)
        r = c.getresponse()
        body = json.loads(r.read())
        assert r.status == 200 and r.getheader("Content-Type") == "application/json", body


def t_limits(eng, d):
    c = Client(eng.port)
    deep = {"a": 1}
    for _ in range(40):
        deep = {"n": deep}
    st, env = c.raw(json.dumps({"kind": "promise.create",
                                "head": {"corrId": "d", "version": VERSION},
                                "data": {"id": "deep", "timeoutAt": FAR, "param": deep}}))
    assert st == 400 and "nested" in env["data"], env  # refused before it is parsed
    big = "x" * (eng_body_limit + 10)
    c2 = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=10)
    c2.request("POST", "/", body=json.dumps({"kind": "promise.create",
                                             "head": {"corrId": "b", "version": VERSION},
                                             "data": {"id": "big", "timeoutAt": FAR,
                                                      "param": {"data": big}}}),
               headers={"Authorization": "Bearer " + TOKEN,
                        "Content-Type": "application/json"})
    r = c2.getresponse()
    r.read()
    assert r.status == 413 and r.getheader("Content-Type") == "application/json", r.status
    # nothing was created by either refusal
    assert c.rpc("promise.get", {"id": "big"})[0] == 404
    assert c.rpc("promise.get", {"id": "deep"})[0] == 404
    # list bounds
    st, msg = c.rpc("promise.search", {"limit": 0})
    assert st == 400, msg
    st, msg = c.rpc("promise.search", {"limit": 1001})
    assert st == 400, msg
    st, msg = c.rpc("task.heartbeat", {"pid": "p", "tasks": [{"id": "t", "version": 1}] * 1001})
    assert st == 400, msg


def t_promise_ops(eng, d):
    c = Client(eng.port)
    st, r = c.rpc("promise.create", {"id": "p-1", "timeoutAt": FAR,
                                     "param": {"headers": {"h": "v"}, "data": "ZGF0YQ=="},
                                     "tags": {"color": "red"}})
    assert st == 200 and r["promise"]["state"] == "pending", r
    promise_rec_ok(r["promise"])
    assert r["promise"]["param"] == {"headers": {"h": "v"}, "data": "ZGF0YQ=="}, r
    assert r["promise"]["value"] == {}, r
    first = r["promise"]
    # idempotent by id, whatever is sent
    st, r = c.rpc("promise.create", {"id": "p-1", "timeoutAt": 5, "tags": {"other": "x"}})
    assert st == 200 and r["promise"] == first, r
    st, r = c.rpc("promise.get", {"id": "p-1"})
    assert st == 200 and r["promise"] == first, r
    assert c.rpc("promise.get", {"id": "p-none"})[0] == 404
    # settle: bad state 400, missing 404, then 200 and idempotent
    assert c.rpc("promise.settle", {"id": "p-1", "state": "pending"})[0] == 400
    assert c.rpc("promise.settle", {"id": "p-none", "state": "resolved"})[0] == 404
    st, r = c.rpc("promise.settle", {"id": "p-1", "state": "resolved",
                                     "value": {"headers": {}, "data": "MzM="}})
    assert st == 200 and r["promise"]["state"] == "resolved", r
    promise_rec_ok(r["promise"])
    settled = r["promise"]
    st, r = c.rpc("promise.settle", {"id": "p-1", "state": "rejected"})
    assert st == 200 and r["promise"] == settled, r
    # created after its deadline: settled at once, createdAt == settledAt == timeoutAt
    st, r = c.rpc("promise.create", {"id": "p-late", "timeoutAt": 1000})
    p = r["promise"]
    assert st == 200 and p["state"] == "rejected_timedout", r
    assert p["createdAt"] == p["settledAt"] == p["timeoutAt"] == 1000, p
    st, r = c.rpc("promise.create", {"id": "p-timer", "timeoutAt": 1000,
                                     "tags": {"resonate:timer": "true"}})
    assert st == 200 and r["promise"]["state"] == "resolved", r
    # a deadline passing while pending (lazy projection, and the tick)
    now = int(time.time() * 1000)
    assert c.rpc("promise.create", {"id": "p-soon", "timeoutAt": now + 300,
                                    "tags": {"resonate:scope": "global"}})[0] == 200
    time.sleep(0.6)
    st, r = c.rpc("promise.get", {"id": "p-soon"})
    assert st == 200 and r["promise"]["state"] == "rejected_timedout", r
    # listener: bad address 400, missing 404, pending 200
    assert c.rpc("promise.create", {"id": "p-2", "timeoutAt": FAR,
                                    "tags": {"resonate:scope": "global"}})[0] == 200
    assert c.rpc("promise.register_listener", {"awaited": "p-2", "address": "ftp://x"})[0] == 400
    assert c.rpc("promise.register_listener",
                 {"awaited": "p-none", "address": "poll://uni@g/w"})[0] == 404
    st, r = c.rpc("promise.register_listener", {"awaited": "p-2", "address": "poll://uni@g/w"})
    assert st == 200 and r["promise"]["id"] == "p-2", r
    # callback: same id 400, awaited missing 404, awaiter missing / without task 422
    assert c.rpc("promise.register_callback", {"awaited": "p-2", "awaiter": "p-2"})[0] == 400
    assert c.rpc("promise.register_callback", {"awaited": "p-none", "awaiter": "p-2"})[0] == 404
    assert c.rpc("promise.register_callback", {"awaited": "p-2", "awaiter": "p-none"})[0] == 422
    assert c.rpc("promise.register_callback", {"awaited": "p-2", "awaiter": "p-1"})[0] == 422
    assert c.rpc("promise.create", {"id": "p-3", "timeoutAt": FAR,
                                    "tags": {"resonate:target": "poll://any@nobody"}})[0] == 200
    st, r = c.rpc("promise.register_callback", {"awaited": "p-2", "awaiter": "p-3"})
    assert st == 200 and r["promise"]["id"] == "p-2", r
    # search: state, tags, limit + cursor, ordered by id, engine promises never listed
    for i in range(5):
        assert c.rpc("promise.create", {"id": "s-%d" % i, "timeoutAt": FAR,
                                        "tags": {"grp": "s", "n": str(i % 2)}})[0] == 200
    st, r = c.rpc("promise.search", {"tags": {"grp": "s"}, "limit": 2})
    assert st == 200 and [p["id"] for p in r["promises"]] == ["s-0", "s-1"], r
    st, r2 = c.rpc("promise.search", {"tags": {"grp": "s"}, "limit": 2, "cursor": r["cursor"]})
    assert [p["id"] for p in r2["promises"]] == ["s-2", "s-3"], r2
    st, r = c.rpc("promise.search", {"tags": {"grp": "s", "n": "1"}})
    assert [p["id"] for p in r["promises"]] == ["s-1", "s-3"] and "cursor" not in r, r
    st, r = c.rpc("promise.search", {"state": "resolved"})
    assert st == 200 and {p["id"] for p in r["promises"]} >= {"p-1", "p-timer"}, r
    assert all(p["state"] == "resolved" for p in r["promises"]), r
    st, r = c.rpc("promise.search", {"state": "sleeping"})
    assert st == 400, r
    st, r = c.rpc("promise.search", {"limit": 1000})
    assert not any(p["id"].startswith("capsule/") for p in r["promises"]), r


def t_task_ops(eng, d):
    c = Client(eng.port)
    poll = Poller(eng.port, "tg", "w1")
    assert poll.status == 200 and poll.ctype == "text/event-stream", poll.status
    tags = {"resonate:target": "poll://any@tg/w1", "resonate:scope": "global",
            "resonate:origin": "wf", "resonate:branch": "wf", "resonate:parent": "wf"}

    def create_action(pid, tags_=tags):
        return {"kind": "promise.create", "head": {"corrId": "in", "version": VERSION},
                "data": {"id": pid, "timeoutAt": FAR, "param": {}, "tags": tags_}}

    # validation
    assert c.rpc("task.create", {"pid": "w1", "ttl": 0, "action": create_action("wf")})[0] == 400
    assert c.rpc("task.create", {"pid": "w1", "ttl": 5000})[0] == 400
    st, msg = c.rpc("task.create", {"pid": "w1", "ttl": 5000,
                                    "action": {"kind": "promise.settle", "data": {}}})
    assert st == 400 and "promise.create" in msg, msg
    st, msg = c.rpc("task.create", {"pid": "w1", "ttl": 5000,
                                    "action": create_action("nt", {"a": "b"})})
    assert st == 400, msg  # no resonate:target
    # create: acquired v1, no execute
    st, r = c.rpc("task.create", {"pid": "w1", "ttl": 60000, "action": create_action("wf")})
    assert st == 200 and r["task"]["state"] == "acquired" and r["task"]["version"] == 1, r
    task_rec_ok(r["task"])
    promise_rec_ok(r["promise"])
    assert r["preload"] == [], r
    st, msg = c.rpc("task.create", {"pid": "w2", "ttl": 60000, "action": create_action("wf")})
    assert st == 409, msg
    assert c.rpc("promise.create", {"id": "plain", "timeoutAt": FAR})[0] == 200
    st, msg = c.rpc("task.create", {"pid": "w1", "ttl": 60000,
                                    "action": create_action("plain")})
    assert st == 422, msg
    st, r = c.rpc("task.get", {"id": "wf"})
    assert st == 200 and r["task"]["pid"] == "w1", r
    task_rec_ok(r["task"])
    assert c.rpc("task.get", {"id": "none"})[0] == 404
    # fence: a local child, wrong version 409, own id 400, then settle it
    local = {"resonate:scope": "local", "resonate:origin": "wf", "resonate:branch": "wf",
             "resonate:parent": "wf"}
    st, r = c.rpc("task.fence", {"id": "wf", "version": 1, "action": create_action("wf:0", local)})
    assert st == 200, r
    inner = r["action"]
    assert inner["kind"] == "promise.create" and inner["head"] == {
        "corrId": "in", "status": 200, "version": VERSION}, inner
    assert inner["data"]["promise"]["id"] == "wf:0", r
    assert [p["id"] for p in r["preload"]] == ["wf:0"], r  # the branch of wf
    st, msg = c.rpc("task.fence", {"id": "wf", "version": 7,
                                   "action": create_action("wf:9", local)})
    assert st == 409, msg
    st, msg = c.rpc("task.fence", {"id": "wf", "version": 1, "action": create_action("wf", local)})
    assert st == 400, msg
    assert c.rpc("task.fence", {"id": "none", "version": 1,
                                "action": create_action("x", local)})[0] == 404
    st, r = c.rpc("task.fence", {"id": "wf", "version": 1, "action": {
        "kind": "promise.settle", "head": {"corrId": "in2", "version": VERSION},
        "data": {"id": "wf:0", "state": "resolved", "value": {"data": "MQ=="}}}})
    assert st == 200 and r["action"]["data"]["promise"]["state"] == "resolved", r
    # a remote child (target) queues execute(wf:1, v0) to any@tg -> our poller
    child = dict(tags, **{"resonate:branch": "wf:1", "resonate:target": "poll://any@tg"})
    st, r = c.rpc("task.fence", {"id": "wf", "version": 1, "action": create_action("wf:1", child)})
    assert st == 200, r
    m = poll.get()
    assert m == {"kind": "execute", "head": {"serverUrl": m["head"]["serverUrl"]},
                 "data": {"task": {"id": "wf:1", "version": 0}}}, m
    assert m["head"]["serverUrl"].startswith("http://"), m
    # suspend: validation, then 200 while wf:1 is pending
    assert c.rpc("task.suspend", {"id": "wf", "version": 1, "actions": []})[0] == 400
    cb = lambda aw, ar="wf": {"kind": "promise.register_callback",  # noqa: E731
                              "head": {"corrId": "cb", "version": VERSION},
                              "data": {"awaiter": ar, "awaited": aw}}
    assert c.rpc("task.suspend", {"id": "wf", "version": 1, "actions": [cb("wf:1", "x")]})[0] \
        == 400
    assert c.rpc("task.suspend", {"id": "wf", "version": 1, "actions": [cb("wf:nope")]})[0] \
        == 422
    assert c.rpc("task.suspend", {"id": "wf", "version": 2, "actions": [cb("wf:1")]})[0] == 409
    st, r = c.rpc("task.suspend", {"id": "wf", "version": 1, "actions": [cb("wf:1")]})
    assert st == 200 and r == {}, r
    # the child's worker: acquire, heartbeat, fulfill -> wf resumes -> execute(wf, v1)
    assert c.rpc("task.acquire", {"id": "wf:1", "version": 3, "pid": "w1", "ttl": 5000})[0] \
        == 409
    st, r = c.rpc("task.acquire", {"id": "wf:1", "version": 0, "pid": "w1", "ttl": 5000})
    assert st == 200 and r["task"]["version"] == 1 and r["task"]["state"] == "acquired", r
    task_rec_ok(r["task"])
    st, r = c.rpc("task.heartbeat", {"pid": "w1", "tasks": [{"id": "wf:1", "version": 1}]})
    assert st == 200 and r == {}, r
    assert c.rpc("task.heartbeat", {"pid": "w1", "tasks": []})[0] == 400
    settle = {"kind": "promise.settle", "head": {"corrId": "f", "version": VERSION},
              "data": {"id": "wf:1", "state": "resolved", "value": {"data": "Mg=="}}}
    assert c.rpc("task.fulfill", {"id": "wf:1", "version": 0, "action": settle})[0] == 409
    st, r = c.rpc("task.fulfill", {"id": "wf:1", "version": 1, "action": settle})
    assert st == 200 and r["promise"]["state"] == "resolved", r
    m = poll.get()
    assert m["kind"] == "execute" and m["data"] == {"task": {"id": "wf", "version": 1}}, m
    # acquire the resumed workflow: preload = same branch (wf:0), then release -> execute again
    st, r = c.rpc("task.acquire", {"id": "wf", "version": 1, "pid": "w1", "ttl": 60000})
    assert st == 200 and r["task"]["version"] == 2, r
    assert [p["id"] for p in r["preload"]] == ["wf:0"], r
    st, r = c.rpc("task.release", {"id": "wf", "version": 2})
    assert st == 200 and r == {}, r
    assert c.rpc("task.release", {"id": "wf", "version": 2})[0] == 409
    m = poll.get()
    assert m["kind"] == "execute" and m["data"]["task"]["id"] == "wf", m
    st, r = c.rpc("task.acquire", {"id": "wf", "version": 2, "pid": "w1", "ttl": 60000})
    assert st == 200 and r["task"]["version"] == 3, r
    # suspend on an already-settled promise: 300 {preload}, the task stays acquired
    st, r = c.rpc("task.suspend", {"id": "wf", "version": 3, "actions": [cb("wf:1")]})
    assert st == 300 and "preload" in r, (st, r)
    # a listener on wf, then fulfil: unblock to poll://uni@tg/w1
    st, r = c.rpc("promise.register_listener", {"awaited": "wf", "address": "poll://uni@tg/w1"})
    assert st == 200, r
    settle_wf = {"kind": "promise.settle", "head": {"corrId": "f2", "version": VERSION},
                 "data": {"id": "wf", "state": "resolved", "value": {"data": "MzM="}}}
    st, msg = c.rpc("task.fulfill", {"id": "wf", "version": 3, "action": dict(
        settle_wf, data=dict(settle_wf["data"], id="other"))})
    assert st == 400, msg
    st, r = c.rpc("task.fulfill", {"id": "wf", "version": 3, "action": settle_wf})
    assert st == 200 and r["promise"]["state"] == "resolved", r
    m = poll.get()
    assert m["kind"] == "unblock" and m["data"]["promise"]["id"] == "wf", m
    assert m["data"]["promise"]["state"] == "resolved", m
    promise_rec_ok(m["data"]["promise"])
    # task.create on a fulfilled task: returned as is
    st, r = c.rpc("task.create", {"pid": "w1", "ttl": 60000, "action": create_action("wf")})
    assert st == 200 and r["task"]["state"] == "fulfilled" and "pid" not in r["task"], r
    # halt / continue
    assert c.rpc("task.halt", {"id": "wf"})[0] == 409
    assert c.rpc("task.halt", {"id": "none"})[0] == 404
    assert c.rpc("promise.create", {"id": "h", "timeoutAt": FAR,
                                    "tags": {"resonate:target": "poll://any@tg"}})[0] == 200
    m = poll.get()
    assert m["data"]["task"]["id"] == "h", m
    assert c.rpc("task.continue", {"id": "h"})[0] == 409
    assert c.rpc("task.halt", {"id": "h"}) == (200, {})
    assert c.rpc("task.continue", {"id": "h"}) == (200, {})
    m = poll.get()
    assert m["kind"] == "execute" and m["data"]["task"]["id"] == "h", m
    poll.close()


def t_outbox_durable(eng, d):
    """Messages wait in the durable outbox while nobody polls, across a kill -9."""
    c = Client(eng.port)
    assert c.rpc("promise.create", {"id": "o-1", "timeoutAt": FAR,
                                    "tags": {"resonate:target": "poll://any@og"}})[0] == 200
    assert c.rpc("promise.create", {"id": "o-2", "timeoutAt": FAR,
                                    "tags": {"resonate:target": "poll://any@og/w9"}})[0] == 200
    time.sleep(0.3)  # a few ticks with nobody polling
    eng.kill9()
    eng2 = Engine(ARGS.server, d["data"], d["tok"], d["extra"])
    try:
        p = Poller(eng2.port, "og", "w9")
        got = [p.get(), p.get()]
        assert [m["data"]["task"]["id"] for m in got if m] == ["o-1", "o-2"], got
        # uni addressed to a poller that connects later is parked, then delivered
        c = Client(eng2.port)
        assert c.rpc("promise.create", {"id": "o-3", "timeoutAt": FAR,
                                        "tags": {"resonate:scope": "global"}})[0] == 200
        assert c.rpc("promise.register_listener",
                     {"awaited": "o-3", "address": "poll://uni@og/late"})[0] == 200
        assert c.rpc("promise.settle", {"id": "o-3", "state": "resolved"})[0] == 200
        time.sleep(0.3)
        late = Poller(eng2.port, "og", "late")
        m = late.get()
        assert m and m["kind"] == "unblock" and m["data"]["promise"]["id"] == "o-3", m
        assert p.get(timeout=0.3) is None
        p.close()
        late.close()
    finally:
        eng2.kill9()


def t_kill9(eng, d):
    """Acknowledged promises and tasks survive kill -9 of the server."""
    c = Client(eng.port)
    for i in range(20):
        assert c.rpc("promise.create", {"id": "k-%d" % i, "timeoutAt": FAR,
                                        "tags": {"i": str(i)}})[0] == 200
    for i in range(0, 20, 2):
        assert c.rpc("promise.settle", {"id": "k-%d" % i, "state": "resolved",
                                        "value": {"data": "dg=="}})[0] == 200
    st, r = c.rpc("task.create", {"pid": "w", "ttl": 600000, "action": {
        "kind": "promise.create", "head": {"corrId": "a", "version": VERSION},
        "data": {"id": "k-task", "timeoutAt": FAR,
                 "tags": {"resonate:target": "poll://any@kg"}}}})
    assert st == 200, r
    before = {i: c.rpc("promise.get", {"id": "k-%d" % i})[1]["promise"] for i in range(20)}
    eng.kill9()
    eng2 = Engine(ARGS.server, d["data"], d["tok"], d["extra"])
    try:
        c = Client(eng2.port)
        for i in range(20):
            st, r = c.rpc("promise.get", {"id": "k-%d" % i})
            assert st == 200 and r["promise"] == before[i], (i, r, before[i])
        st, r = c.rpc("task.get", {"id": "k-task"})
        assert st == 200 and r["task"]["state"] == "acquired" and r["task"]["version"] == 1, r
        eng2.term()
    finally:
        if eng2.proc.poll() is None:
            eng2.kill9()


# ------------------------------------------------------------------------------------------
# replay of the recorded SDK 0.11.5 traffic

LOOSE = {"createdAt", "settledAt", "timeoutAt", "corrId", "serverUrl"}


def same_shape(ours, theirs, path="$"):
    """Same kinds and keys; values equal except timestamps/corrIds (type only), resumes
    (a count here, an array in the recording shim) and error messages (strings)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), (path, ours, theirs)
        assert set(ours) == set(theirs), (path, sorted(ours), sorted(theirs))
        for k in theirs:
            if k in LOOSE:
                assert type(ours[k]) is type(theirs[k]), (path + "." + k, ours[k], theirs[k])
            elif k == "resumes":
                assert isinstance(ours[k], int), (path, ours[k])
            elif k == "preload":
                # The recording shim (the SDK's in-memory server) sends [] where the Rust server
                # and promise/ send the branch's other promises (resonate-protocol.md §2.3).
                assert isinstance(ours[k], list), (path, ours[k])
                for p in ours[k]:
                    promise_rec_ok(p)
            else:
                same_shape(ours[k], theirs[k], path + "." + k)
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (path, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same_shape(a, b, "%s[%d]" % (path, i))
    else:
        assert ours == theirs, (path, ours, theirs)


def shift_times(v, delta):
    if isinstance(v, dict):
        return {k: (x + delta if k in ("timeoutAt",) and isinstance(x, int)
                    else shift_times(x, delta)) for k, x in v.items()}
    if isinstance(v, list):
        return [shift_times(x, delta) for x in v]
    return v


# The recording's short timers (the 300 ms resonate:timer of trace.ndjson) live this much longer
# in the replay. The recording sent the suspend that awaits the timer 2 ms after creating it; here
# the create, the execute message it causes and the suspend take longer than 300 ms under ASan on
# a loaded machine (task.suspend answered 300, the timer already resolved: ctest -j3 beside a CPU
# hog, load 14). The replay still checks that the timer fires and resumes the workflow; the wait
# for that execute message is bounded by SSE_WAIT_S.
TIMER_STRETCH_MS = 3000
SHORT_TIMER_MS = 60000
SSE_WAIT_S = 30


def stretch_timers(v, rec_now):
    """A copy of v (recorded request data) where every timeoutAt less than SHORT_TIMER_MS after
    rec_now (the recording's clock when the request was sent) and every task lease (ttl) is
    TIMER_STRETCH_MS longer. The leases of trace2.ndjson (2 s, renewed by heartbeats 1 s apart)
    expired under ASan on a loaded machine between an acquire and its heartbeat (task.fulfill
    answered 409 'Task is not acquired'); the lease that must expire still does."""
    if isinstance(v, dict):
        return {k: (x + TIMER_STRETCH_MS
                    if (k == "timeoutAt" and isinstance(x, int) and 0 < x - rec_now < SHORT_TIMER_MS)
                    or (k == "ttl" and isinstance(x, int) and x > 0)
                    else stretch_timers(x, rec_now)) for k, x in v.items()}
    if isinstance(v, list):
        return [stretch_timers(x, rec_now) for x in v]
    return v


def replay(eng, path):
    lines = [json.loads(x) for x in open(path)]
    first_created = None
    for o in lines:
        if o["dir"] == "rpc" and o["res"]["head"]["status"] == 200:
            p = o["res"]["data"].get("promise")
            if p:
                first_created = p["createdAt"] - o["t"]
                break
    t0 = time.monotonic()
    delta = int(time.time() * 1000) - first_created
    c = Client(eng.port)
    pollers = []
    msgs = []  # every message any poller received, in order

    def gather(timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in pollers:
                try:
                    m = p.q.get_nowait()
                    if m:
                        msgs.append((p, m))
                except queue.Empty:
                    pass
            time.sleep(0.01)

    for o in lines:
        wait = t0 + o["t"] / 1000.0 - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif o["dir"] == "rpc":
            # Behind the recording (a slow build, a loaded machine): take the lag as a pause
            # in the recording, so the deadlines the next requests carry are as far ahead as
            # they were recorded (a 300 ms timer created late must not be born expired).
            t0 -= wait
            delta += int(-wait * 1000) + 1
        if o["dir"] == "poll-connect":
            _, _, group, pid = o["url"].split("/")
            p = Poller(eng.port, group, pid)
            assert p.status == 200
            p.pid = pid
            pollers.append(p)
        elif o["dir"] == "rpc":
            rec_now = first_created + o["t"]
            req = shift_times(stretch_timers(o["req"], rec_now), delta)
            st, data = c.rpc(req["kind"], req["data"], corr=req["head"]["corrId"])
            want = o["res"]
            assert st == want["head"]["status"], (req["kind"], st, data, want)
            if st in (200, 300):
                same_shape(data, shift_times(stretch_timers(want["data"], rec_now), delta),
                           req["kind"])
        elif o["dir"] == "sse":
            want = shift_times(o["msg"], delta)
            addr = o["address"]
            # a message addressed to one poller is looked for among that poller's only: the same
            # unblock sent to w1 and to w2 may arrive in either order
            to = addr.rsplit("/", 1)[1] if addr.startswith("poll://uni@") else None
            end = time.monotonic() + SSE_WAIT_S
            found = None
            while found is None and time.monotonic() < end:
                gather(0.05)
                for i, (p, m) in enumerate(msgs):
                    if (to is None or p.pid == to) and m["kind"] == want["kind"] and (
                            m["data"].get("task") == want["data"].get("task")
                            if m["kind"] == "execute" else
                            m["data"]["promise"]["id"] == want["data"]["promise"]["id"]):
                        found = msgs.pop(i)
                        break
            assert found, ("message not received", want, msgs)
            p, m = found
            same_shape(m, want, "sse")
            if addr.startswith("poll://uni@"):
                assert addr.endswith("/" + p.pid), (addr, p.pid)
    for p in pollers:
        p.close()


def t_replay_trace(eng, d):
    replay(eng, os.path.join(ARGS.traces, "trace.ndjson"))


def t_replay_trace2(eng, d):
    replay(eng, os.path.join(ARGS.traces, "trace2.ndjson"))


def t_samples(eng, d):
    """samples.json holds the same exchanges as trace.ndjson: check they are (so the trace
    replay covers them), and that each sample's answer passes our record checks."""
    samples = json.load(open(os.path.join(ARGS.traces, "samples.json")))
    trace = [json.loads(x) for x in open(os.path.join(ARGS.traces, "trace.ndjson"))]
    corr = {o["req"]["head"]["corrId"]: o for o in trace if o["dir"] == "rpc"}
    n = 0
    for s in samples:
        if "req" not in s:
            continue
        o = corr[s["req"]["head"]["corrId"]]
        assert o["req"] == s["req"] and o["res"] == s["res"], s["key"]
        data = s["res"]["data"]
        for k in ("promise",):
            if isinstance(data, dict) and k in data:
                promise_rec_ok(data[k])
        n += 1
    assert n >= 6, n


TESTS = [t_envelope, t_auth, t_limits, t_promise_ops, t_task_ops, t_samples, t_replay_trace,
         t_replay_trace2, t_outbox_durable, t_kill9]
eng_body_limit = 65536

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--traces", required=True)
    ap.add_argument("--only")
    ARGS = ap.parse_args()
    failed = 0
    for t in TESTS:
        if ARGS.only and ARGS.only not in t.__name__:
            continue
        base = tempfile.mkdtemp(prefix="rsn-")
        tok = os.path.join(base, "tokens")
        with open(tok, "w") as f:
            f.write(TOKEN + "\n")
        d = {"data": os.path.join(base, "data"), "tok": tok,
             "extra": ("--max-body-bytes", str(eng_body_limit))}
        eng = Engine(ARGS.server, d["data"], tok, d["extra"])
        t1 = time.monotonic()
        try:
            t(eng, d)
            if eng.proc.poll() is None:
                eng.term()
            print("ok   %s (%.1fs)" % (t.__name__, time.monotonic() - t1), flush=True)
        except Exception:
            failed += 1
            import traceback
            traceback.print_exc()
            print("FAIL %s" % t.__name__, flush=True)
            if eng.proc.poll() is None:
                eng.kill9()
        finally:
            shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if failed else 0)
