"""capsule.session - Session and DurableSession: a durable Python session on a capsule-engine.

Transport: REST (httpx, one keep-alive connection pool per Session) for session management,
waited executions, input replies, cancel and lookups; one WebSocket (websockets) per Session for
streamed executions, shared by all of its streams.

Invariants:
  - every execution carries a client-made id (unless the caller gives one), so every request
    that starts one may be repeated after a dropped connection: the server returns the
    recorded result or attaches to the running execution, and nothing runs twice.
  - a stream never yields the same output byte twice and never skips one: output events carry
    their byte offset, the client keeps the count it has yielded, trims what it has seen, and
    after a reconnect resumes from that count. The final result carries the whole output; any
    tail the events missed is yielded before it.
  - connection failures are retried with backoff for ``reconnect_timeout`` seconds (default 30)
    and then raised as CapsuleConnectionError. A disconnect never cancels an execution.
  - code is dedented on the client (textwrap.dedent, then a leading blank line dropped), so the
    indented triple-quoted strings of the examples run; code that has no common indent is sent
    unchanged. ``dedent=False`` turns this off.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from ._rest import new_id, prepare_code, resolve_url_sync, timeout_ms as _timeout_ms
from .errors import (
    CapsuleConnectionError,
    CapsuleError,
    ConflictError,
    NotFoundError,
    api_error,
    execution_error,
)
from .types import ExecutionResult, Message

__all__ = ["Session", "DurableSession", "Checkpoint", "resolve_url", "new_id", "prepare_code"]


async def resolve_url(url: Optional[str]) -> str:
    """The server URL: the argument, else CAPSULE_URL, else the embedded local engine."""
    return await asyncio.to_thread(resolve_url_sync, url)


@dataclass
class Checkpoint:
    """A recorded namespace snapshot of ``session_id``; ``ordinal`` is the last committed
    execution ordinal this client had seen when it was taken (None: the latest state)."""

    session_id: str
    bytes: int
    truncated: bool
    ordinal: Optional[int] = None


class _Api:
    """REST calls with the error mapping and the reconnect policy."""

    def __init__(self, base: str, token: Optional[str], reconnect_timeout: float) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base = base
        self.token = token
        self.reconnect_timeout = reconnect_timeout
        # verify=False for plain http: TLS is not used, and the default loads the CA bundle
        # (30-600 ms per process measured, the largest part of a short `capsule run`)
        self.http = httpx.AsyncClient(
            base_url=base + "/v1", headers=headers, verify=not base.startswith("http://"),
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_keepalive_connections=16, max_connections=64))

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, body: Optional[dict[str, Any]] = None, *,
                   retry: bool = True, ok: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        """One request; retried on connection failures (when ``retry``) until the deadline.
        Returns the parsed JSON body (or None); raises APIError subclasses on refusals."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                r = await self.http.request(method, path, json=body)
            except (httpx.TransportError, OSError) as e:
                if not retry or time.monotonic() + delay > deadline:
                    raise CapsuleConnectionError(
                        f"{method} {self.base}/v1{path}: {e.__class__.__name__}: {e}") from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if r.status_code == 503 and retry and time.monotonic() + delay < deadline:
                # shutting down (a restart is coming) or a transient engine refusal
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            ct = r.headers.get("content-type", "")
            data: Any = None
            if r.content:
                data = r.json() if ct.startswith("application/json") else r.content
            if r.status_code in ok:
                return data
            raise api_error(r.status_code, data)


class _Stream:
    """The client's view of one streamed execution."""

    def __init__(self, eid: str, code: str, tx: Optional[str],
                 timeout_ms: Optional[int] = None) -> None:
        self.eid = eid
        self.code = code
        self.tx = tx
        self.timeout_ms = timeout_ms
        self.queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self.offset = 0  # output bytes yielded
        self.awaiting_input = False  # a prompt was yielded and not answered yet
        self.last_input_seq: Optional[int] = None  # the event seq of the last prompt yielded
        self.max_seq = 0

    def execute_msg(self) -> dict[str, Any]:
        """The WebSocket message that starts (or, by its id, re-attaches to) this execution."""
        msg: dict[str, Any] = {"type": "execute", "eid": self.eid, "code": self.code}
        if self.tx:
            msg["tx"] = self.tx
        if self.timeout_ms:
            msg["timeout_ms"] = self.timeout_ms
        return msg


# a client-side execution id as the server accepts it
_ID_OK = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")

# the HTTP status a refusal has over REST, by the result's error code
_REFUSED_STATUS = {"session_not_found": 404, "queue_full": 429, "session_closed": 409,
                   "limit": 429}


class _Socket:
    """The Session's WebSocket: one reader task dispatching events by execution id, and the
    reconnect loop that resumes every open stream from its output offset."""

    def __init__(self, api: _Api, sid: str) -> None:
        self.api = api
        self.sid = sid
        self.ws: Optional[ClientConnection] = None
        self.streams: dict[str, _Stream] = {}
        self.reader: Optional[asyncio.Task[None]] = None
        self.connect_lock = asyncio.Lock()
        self.closing = False
        self.connected = asyncio.Event()

    def _url(self) -> str:
        b = self.api.base
        b = "ws://" + b[len("http://"):] if b.startswith("http://") else (
            "wss://" + b[len("https://"):] if b.startswith("https://") else b)
        return f"{b}/v1/sessions/{self.sid}/ws"

    async def _connect_once(self) -> ClientConnection:
        headers = {"Authorization": f"Bearer {self.api.token}"} if self.api.token else {}
        try:
            return await connect(self._url(), additional_headers=headers, max_size=None,
                                 open_timeout=5, ping_interval=20, ping_timeout=20)
        except websockets.InvalidStatus as e:
            st = e.response.status_code
            body: Any = e.response.body
            try:
                body = json.loads(body) if body else body
            except ValueError:
                pass
            raise api_error(st, body) from e

    async def _connect(self) -> None:
        deadline = time.monotonic() + self.api.reconnect_timeout
        delay = 0.05
        while True:
            try:
                self.ws = await self._connect_once()
                self.connected.set()
                return
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as e:
                if isinstance(e, websockets.InvalidStatus):
                    raise
                if time.monotonic() + delay > deadline:
                    raise CapsuleConnectionError(f"WebSocket {self._url()}: {e}") from e
            except CapsuleError as e:
                # 503 while the server shuts down: keep trying
                if getattr(e, "status", 0) != 503 or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def ensure(self) -> None:
        async with self.connect_lock:
            if self.ws is None:
                await self._connect()
                self.reader = asyncio.create_task(self._read())

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ensure()
        await self.connected.wait()
        assert self.ws is not None
        try:
            await self.ws.send(json.dumps(msg))
        except websockets.ConnectionClosed:
            pass  # the reader reconnects and resumes or re-sends every open stream

    async def start(self, st: _Stream) -> None:
        self.streams[st.eid] = st
        await self.send(st.execute_msg())

    async def _read(self) -> None:
        while not self.closing:
            ws = self.ws
            assert ws is not None
            try:
                async for raw in ws:
                    m = json.loads(raw)
                    st = self.streams.get(m.get("eid", ""))
                    if st is None:
                        continue
                    if m.get("type") == "error" and (m.get("error") or {}).get("code") in (
                            "execution_not_found", "shutting_down"):
                        # never recorded (or refused while draining): start it again, by its id
                        if (m.get("error") or {}).get("code") == "execution_not_found":
                            await ws.send(json.dumps(st.execute_msg()))
                        continue
                    st.queue.put_nowait(m)
            except (websockets.ConnectionClosed, OSError):
                pass
            if self.closing:
                return
            # the connection dropped: reconnect and resume every open stream
            self.connected.clear()
            try:
                await self._connect()
            except BaseException as e:  # give up: every open stream gets the error
                self.ws = None
                err = e if isinstance(e, CapsuleError) else CapsuleConnectionError(str(e))
                for s in list(self.streams.values()):
                    s.queue.put_nowait(err)
                return
            assert self.ws is not None
            for s in list(self.streams.values()):
                try:
                    await self.ws.send(json.dumps({"type": "resume", "eid": s.eid,
                                                   "output_offset": s.offset}))
                except websockets.ConnectionClosed:
                    break

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            try:
                await self.reader
            except (asyncio.CancelledError, Exception):
                pass
        self.ws = None


class Session:
    """A Python session on a capsule-engine: its namespace persists across executions, and it
    (with its recorded results) survives a restart of the server.

    Use ``async with Session() as session:``. Arguments:
      url: the server (``http://host:port``); default CAPSULE_URL, else the embedded local engine.
      token: bearer token; default CAPSULE_TOKEN.
      session_id: a name. A named session is created if it does not exist and attached to if it
        does, and is kept open at exit (unless ``keep=False``); an unnamed one gets a fresh id
        and is closed at exit (unless ``keep=True``).
      tx: the session's transaction policy (rollback_on_failure | commit_always |
        rollback_always); timeout: seconds an execution may run (0/None: no limit); mem_bytes,
        cpu_seconds: worker limits; retry_on_death: re-run an execution whose worker died.
      warmup: code run as the session's first execution (raises ExecutionError if it fails).
      reconnect_timeout: how long to keep retrying a lost connection (seconds; default
        CAPSULE_RECONNECT_TIMEOUT, else 30).
      dedent: dedent code before sending it (see the module docstring).

    One Session may be used by many tasks of one event loop at once; it is not thread-safe.
    """

    def __init__(self, url: Optional[str] = None, *, token: Optional[str] = None,
                 session_id: Optional[str] = None, tx: Optional[str] = None,
                 timeout: Optional[float] = None, mem_bytes: Optional[int] = None,
                 cpu_seconds: Optional[int] = None, retry_on_death: Optional[bool] = None,
                 warmup: Optional[str] = None, keep: Optional[bool] = None,
                 reconnect_timeout: Optional[float] = None, dedent: bool = True) -> None:
        self._url_arg = url
        self._token = token if token is not None else os.environ.get("CAPSULE_TOKEN") or None
        self.id: str = session_id or new_id("s")
        self.keep = keep if keep is not None else session_id is not None
        self._create: dict[str, Any] = {"id": self.id}
        if tx:
            self._create["tx"] = tx
        if timeout:
            self._create["timeout_ms"] = int(timeout * 1000)
        if mem_bytes:
            self._create["mem_bytes"] = int(mem_bytes)
        if cpu_seconds:
            self._create["cpu_seconds"] = int(cpu_seconds)
        if retry_on_death is not None:
            self._create["retry_on_death"] = bool(retry_on_death)
        if warmup:
            self._create["warmup"] = prepare_code(warmup, dedent)
        self._reconnect_timeout = (reconnect_timeout if reconnect_timeout is not None else
                                   float(os.environ.get("CAPSULE_RECONNECT_TIMEOUT", "30")))
        self._dedent = dedent
        self._api: Optional[_Api] = None
        self._sock: Optional[_Socket] = None
        self.last_ordinal: Optional[int] = None
        self.url: Optional[str] = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> "Session":
        """Connects and creates (or attaches to) the session. ``async with`` calls it."""
        if self._api is not None:
            return self
        self.url = await resolve_url(self._url_arg)
        self._api = _Api(self.url, self._token, self._reconnect_timeout)
        try:
            await self._create_session()
        except BaseException:
            await self._api.close()
            self._api = None
            raise
        self._sock = _Socket(self._api, self.id)
        return self

    async def _create_session(self) -> None:
        assert self._api is not None
        try:
            await self._api.call("POST", "/sessions", self._create)
        except CapsuleError as e:
            if getattr(e, "code", "") == "warmup_failed":
                r = await self._api.call("GET", f"/sessions/{self.id}/warmup")
                raise execution_error(ExecutionResult.from_json(r)) from e
            raise

    async def close(self, *, delete: Optional[bool] = None) -> None:
        """Closes the connection; closes the server session too if ``delete`` (default: not
        ``keep``). Idempotent."""
        if self._api is None:
            return
        try:
            if self._sock is not None:
                await self._sock.close()
            if delete if delete is not None else not self.keep:
                try:
                    await self._api.call("DELETE", f"/sessions/{self.id}", retry=False)
                except (NotFoundError, CapsuleConnectionError):
                    pass
        finally:
            await self._api.close()
            self._api = None
            self._sock = None

    async def __aenter__(self) -> "Session":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _need(self) -> _Api:
        if self._api is None:
            raise CapsuleError("the session is not started: use 'async with Session() as s'")
        return self._api

    def _note(self, r: ExecutionResult) -> ExecutionResult:
        if r.committed and r.ordinal is not None:
            self.last_ordinal = r.ordinal
        return r

    # -- executions --------------------------------------------------------------------------

    async def execute(self, code: str, *, execution_id: Optional[str] = None,
                      inputs: Optional[list[str]] = None, tx: Optional[str] = None,
                      timeout: Optional[float] = None,
                      raise_on_error: bool = True) -> ExecutionResult:
        """Runs ``code`` and waits for its result.

        ``execution_id`` makes it idempotent (the same id returns the recorded result or
        attaches to the running execution; one is made up if not given). ``inputs`` answers
        ``input()`` calls in order (running out means EOFError); without it, a waiting
        ``input()`` is answered with ``respond_input``. ``timeout`` (seconds):
        this execution's own limit instead of the session's, recorded with it (a re-run after a
        restart keeps it). Raises ExecutionError (or ExecutionCancelled, ExecutionTimeout,
        WorkerDied) if the code fails, unless ``raise_on_error=False``; CapsuleConnectionError
        if the server stays unreachable."""
        api = self._need()
        sock = self._sock
        eid = execution_id or new_id()
        tmo = _timeout_ms(timeout)
        if inputs is None and sock is not None and sock.ws is not None and _ID_OK.match(eid):
            # the session's WebSocket is open: one message each way instead of an HTTP request
            return await self._execute_ws(code, eid, tx, tmo, raise_on_error)
        body: dict[str, Any] = {"code": prepare_code(code, self._dedent), "id": eid}
        if inputs is not None:
            body["inputs"] = list(inputs)
        if tx:
            body["tx"] = tx
        if tmo:
            body["timeout_ms"] = tmo
        d = await api.call("POST", f"/sessions/{self.id}/executions", body)
        r = ExecutionResult.from_json(d)
        while not r.finished:  # "pending": recorded, being re-run after a restart
            await asyncio.sleep(0.05)
            r = await self.get_execution(body["id"])
        self._note(r)
        if raise_on_error and not r.ok:
            raise execution_error(r)
        return r

    async def _execute_ws(self, code: str, eid: str, tx: Optional[str], tmo: Optional[int],
                          raise_on_error: bool) -> ExecutionResult:
        """``execute`` over the open WebSocket: the stream's final message carries the result
        (prompts are answered with ``respond_input`` as with REST; reconnects resume)."""
        r: Optional[ExecutionResult] = None
        async for m in self._stream(code, eid, tx, tmo):
            if m.type in ("result", "error"):
                r = m.result
        if r is None:
            raise CapsuleConnectionError(f"execution {eid}: the stream ended without a result")
        if r.status == "refused":  # as the REST call would have answered
            code_ = str((r.error or {}).get("code", ""))
            raise api_error(_REFUSED_STATUS.get(code_, 422), {"error": r.error or {}})
        if raise_on_error and not r.ok:
            raise execution_error(r)
        return r

    async def submit(self, code: str, *, execution_id: Optional[str] = None,
                     inputs: Optional[list[str]] = None, tx: Optional[str] = None,
                     timeout: Optional[float] = None) -> str:
        """Starts ``code`` without waiting; returns its execution id (see ``wait``)."""
        api = self._need()
        eid = execution_id or new_id()
        tmo = _timeout_ms(timeout)
        body: dict[str, Any] = {"code": prepare_code(code, self._dedent), "id": eid,
                                "wait": False}
        if inputs is not None:
            body["inputs"] = list(inputs)
        if tx:
            body["tx"] = tx
        if tmo:
            body["timeout_ms"] = tmo
        await api.call("POST", f"/sessions/{self.id}/executions", body)
        return eid

    async def wait(self, execution_id: str, *, poll: float = 0.05,
                   raise_on_error: bool = True) -> ExecutionResult:
        """Waits for a submitted execution's result (polling)."""
        while True:
            r = await self.get_execution(execution_id)
            if r.finished:
                self._note(r)
                if raise_on_error and not r.ok:
                    raise execution_error(r)
                return r
            await asyncio.sleep(poll)

    async def stream_execute(self, code: str, *, execution_id: Optional[str] = None,
                             tx: Optional[str] = None,
                             timeout: Optional[float] = None) -> AsyncIterator[Message]:
        """Runs ``code`` and yields its events as they happen: ``output`` (``data``), ``input``
        (``prompt``; answer with ``respond_input(msg.id, text)``), ``restarted``, and last one
        ``result`` or ``error``. A failed execution ends with an ``error`` message (no raise).
        Survives dropped connections and server restarts (resumes; no output lost or doubled).
        Leaving the loop early leaves the execution running (``cancel`` stops it).
        ``timeout`` (seconds): this execution's own limit instead of the session's."""
        self._need()
        inner = self._stream(code, execution_id or new_id(), tx, _timeout_ms(timeout))
        try:
            async for m in inner:
                yield m
        finally:  # a caller leaving early closes this one: close the inner stream now too
            await inner.aclose()

    async def _stream(self, code: str, eid: str, tx: Optional[str],
                      tmo: Optional[int]) -> AsyncIterator[Message]:
        sock = self._sock
        assert sock is not None
        st = _Stream(eid, prepare_code(code, self._dedent), tx, tmo)
        if not _ID_OK.match(st.eid):  # the server's answer would name no execution
            raise api_error(400, {"error": {"code": "invalid_message", "message":
                                            "execution ids are 1..128 of [A-Za-z0-9._-]"}})
        await sock.start(st)
        try:
            while True:
                m = await st.queue.get()
                if isinstance(m, BaseException):
                    raise m
                t = m.get("type")
                seq = m.get("seq")
                if isinstance(seq, int):
                    if seq < st.max_seq:  # a new server process re-runs it: seqs start again
                        st.last_input_seq = None
                    st.max_seq = seq
                if t == "output":
                    data = str(m.get("data", ""))
                    b = data.encode()
                    off = int(m.get("offset", st.offset))
                    end = off + len(b)
                    if end <= st.offset:
                        continue
                    if off > st.offset:
                        # bytes no event brought (printed while no client was attached, e.g.
                        # during a re-run after a restart): take them from the server's record
                        gap = await self._output_range(st.eid, st.offset, off)
                        if gap:
                            yield Message("output", st.eid, data=gap, stream="replay")
                        st.offset = off
                    if off < st.offset:
                        data = b[st.offset - off:].decode(errors="replace")
                    st.offset = end
                    yield Message("output", st.eid, data=data, stream=str(m.get("stream", "")))
                elif t == "input_request":
                    if st.awaiting_input or (seq is not None and seq == st.last_input_seq):
                        # the same prompt again, re-sent after a resume (a new prompt of the
                        # same server process has a higher seq)
                        continue
                    st.awaiting_input = True
                    st.last_input_seq = seq if isinstance(seq, int) else None
                    yield Message("input", st.eid, prompt=str(m.get("prompt", "")),
                                  password=bool(m.get("password", False)))
                elif t == "restarted":
                    yield Message("restarted", st.eid)
                elif t == "result":
                    r = self._note(ExecutionResult.from_json(m))
                    whole = r.output.encode()
                    if len(whole) > st.offset:  # a tail no event brought
                        tail = whole[st.offset:].decode(errors="replace")
                        st.offset = len(whole)
                        yield Message("output", st.eid, data=tail, stream="replay")
                    if r.ok:
                        yield Message("result", st.eid, value=r.value, result=r)
                    else:
                        yield Message("error", st.eid, error=r.error or {"type": r.status},
                                      result=r)
                    return
                elif t == "error":
                    e = m.get("error") or {}
                    raise api_error(400 if e.get("code") == "invalid_message" else 409
                                    if e.get("code") == "no_input_request" else 503, m)
        finally:
            sock.streams.pop(st.eid, None)

    async def _output_range(self, eid: str, start: int, end: int) -> str:
        """Output bytes [start, end) of an execution, from GET /executions/{eid}."""
        try:
            r = await self.get_execution(eid)
        except CapsuleError:
            return ""
        return r.output.encode()[start:end].decode(errors="replace")

    async def respond_input(self, execution_id: str, text: Optional[str] = None, *,
                            eof: bool = False) -> None:
        """Answers the waiting ``input()`` of an execution (``eof=True`` or ``text=None``: end
        of input, EOFError in the code). Raises ConflictError if it is not waiting."""
        api = self._need()
        body: dict[str, Any] = {"eof": True} if eof or text is None else {"text": text}
        sock = self._sock
        st = sock.streams.get(execution_id) if sock else None
        try:
            await api.call("POST", f"/executions/{execution_id}/input", body, retry=False)
        except CapsuleConnectionError:
            # the reply may or may not have been recorded: try again; a refusal now means it was
            try:
                await api.call("POST", f"/executions/{execution_id}/input", body)
            except (ConflictError, NotFoundError):
                pass
        if st is not None:
            st.awaiting_input = False

    async def cancel(self, execution_id: str) -> bool:
        """Cancels a queued or running execution; its result says ``cancelled``. Returns False
        if it was not running any more."""
        api = self._need()
        try:
            await api.call("POST", f"/executions/{execution_id}/cancel")
            return True
        except NotFoundError:
            return False

    async def get_execution(self, execution_id: str) -> ExecutionResult:
        """An execution by id: running (output so far), pending, or its durable result."""
        d = await self._need().call("GET", f"/executions/{execution_id}")
        return ExecutionResult.from_json(d)

    async def tasks(self, execution_id: str) -> list[dict[str, Any]]:
        """The durable steps of an execution (``capsule`` task calls, ``step``, ``sleep``) in
        call order: ``id``, ``path``, ``name``, ``kind``, ``state`` (completed, failed, running,
        pending), ``attempts``, ``created_at``/``settled_at``/``deadline`` (ms since the epoch)."""
        d = await self._need().call("GET", f"/executions/{execution_id}/tasks")
        return list(d["tasks"])

    async def resolve_promise(self, promise_id: str, value: Any = None) -> str:
        """Resolves the external promise executions wait on with ``capsule.promise(id).wait()``
        (``value``: JSON-able); returns its state afterwards (``resolved``, or ``rejected`` if it
        was rejected before). ``NotFoundError`` until an execution has waited on it."""
        d = await self._need().call("POST", f"/promises/{promise_id}/resolve", {"value": value})
        return str(d["state"])

    async def reject_promise(self, promise_id: str, value: Any = None) -> str:
        """Rejects an external promise (the waiting ``wait()`` raises ``PromiseRejected``)."""
        d = await self._need().call("POST", f"/promises/{promise_id}/reject", {"value": value})
        return str(d["state"])

    # -- state -------------------------------------------------------------------------------

    async def checkpoint(self, *, truncate: bool = False) -> Checkpoint:
        """Records a full namespace snapshot (``truncate``: and drops the log before it)."""
        d = await self._need().call("POST", f"/sessions/{self.id}/checkpoint",
                                    {"truncate": truncate})
        return Checkpoint(self.id, int(d.get("bytes", 0)), bool(d.get("truncated")),
                          self.last_ordinal)

    async def restore(self, checkpoint: Optional[Checkpoint] = None, *,
                      session_id: Optional[str] = None) -> "Session":
        """A new session whose namespace is the state at ``checkpoint`` (default: this session's
        current state): a fork on the server; this session is left as it is. The returned
        Session is started; close it (or use ``async with``) when done."""
        src = checkpoint.session_id if checkpoint else self.id
        s = Session(self.url, token=self._token, session_id=session_id,
                    reconnect_timeout=self._reconnect_timeout, dedent=self._dedent,
                    keep=session_id is not None)
        s._create = {"id": s.id, "fork_of": src}
        if checkpoint and checkpoint.ordinal:
            s._create["fork_ordinal"] = checkpoint.ordinal
        return await s.start()

    async def info(self) -> dict[str, Any]:
        """The server's view of this session (404 NotFoundError once closed)."""
        d: dict[str, Any] = await self._need().call("GET", f"/sessions/{self.id}")
        return d

    async def release(self) -> None:
        """Gives the session's worker back to the server (namespace restored on next use)."""
        await self._need().call("POST", f"/sessions/{self.id}/release")


class DurableSession(Session):
    """A Session for durable executions: named (default ``"durable"``) and kept at exit, so a
    restarted client finds its executions again.

    ``resonate_host`` (``"host:port"``) is accepted for the seed's API: capsule's durability
    (the Resonate model of durable promises) is built into capsule-engine, so it names the
    engine to use, the same as ``url``.
    """

    def __init__(self, url: Optional[str] = None, *, resonate_host: Optional[str] = None,
                 session_id: str = "durable", **kw: Any) -> None:
        kw.setdefault("keep", True)
        super().__init__(url or resonate_host, session_id=session_id, **kw)
        self._last_checkpoint = float("-inf")  # the first durable execution checkpoints

    async def execute_durable(self, *, execution_id: str, code: str,
                              checkpoint_interval: Optional[float] = None,
                              inputs: Optional[list[str]] = None,
                              timeout: Optional[float] = None,
                              raise_on_error: bool = True) -> ExecutionResult:
        """Runs ``code`` exactly once under ``execution_id``. Called again with the same id (from
        this or any later client, also after a server crash), it returns the recorded result, or
        waits for the running execution (which the engine re-runs after a crash). A lost
        connection is retried for ``reconnect_timeout`` seconds.

        ``checkpoint_interval`` (seconds): after the execution, a namespace checkpoint is taken
        when the last one is older than this, bounding what a restart has to replay. The engine
        cannot snapshot in the middle of an execution: one cut short by a crash is re-run from
        its start."""
        r = await self.execute(code, execution_id=execution_id, inputs=inputs, timeout=timeout,
                               raise_on_error=False)
        if (checkpoint_interval is not None and r.committed
                and time.monotonic() - self._last_checkpoint >= checkpoint_interval):
            await self.checkpoint()
            self._last_checkpoint = time.monotonic()
        if raise_on_error and not r.ok:
            raise execution_error(r)
        return r

