"""capsule._rest - the command line's synchronous REST client: the standard library only.

``capsule run`` is a short process: importing asyncio, httpx and websockets took longer than the
run itself (issue 9). This module does what a run needs with a socket and json: REST calls
with the same error mapping and reconnect policy as ``session._Api``, and one execution streamed
as NDJSON (``POST /sessions/{sid}/executions`` with ``stream: "ndjson"``) with the CLI's
behaviour: output as it comes, ``input()`` answered from the terminal, Ctrl-C cancels, the
progress line, the final result.

Invariants:
  - HTTP/1.1 is spoken here over a socket (http.client pulls in the email package and ssl: ~40
    ms of a ~150 ms run): Content-Length or chunked bodies, ``Connection: close`` requests.
  - every request uses its own connection (localhost setup is tens of microseconds), so an
    input reply or a cancel can be sent while the stream's connection is open.
  - a stream that drops (server restart, connection reset) is re-opened with the same execution
    id until the reconnect deadline: the server attaches to the running execution (or re-runs it
    after a restart, or answers with the recorded result) and sends what it printed so far; bytes
    below the output offset already written are skipped, so no output is lost or doubled.
  - a prompt re-sent after a re-attach (same seq) is not asked twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from typing import Any, Optional

from .errors import CapsuleConnectionError, CapsuleError, ConflictError, NotFoundError, api_error

_OK = (200, 201, 202, 204)
FINISHED = frozenset({"ok", "error", "cancelled", "timeout", "died", "refused"})  # types.FINISHED


def names(v: Any) -> dict[str, str]:
    """A result's {"name": "reason"} lists (not_recorded, restore_failed); older servers sent
    restore_failed as "name:reason;..."."""
    if isinstance(v, dict):
        return {str(k): str(r) for k, r in v.items()}
    if isinstance(v, str):
        return dict(p.split(":", 1) for p in v.split(";") if ":" in p)
    return {}


class Result:
    """The fields of a Result (tools/openapi.json) the command line uses: those of
    capsule.types.ExecutionResult, without importing dataclasses (~12 ms of a ~100 ms run)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.status = str(d.get("status") or "")
        self.value = d.get("value")
        self.repr: Optional[str] = d.get("repr")
        self.output = str(d.get("output") or "")
        self.error: Optional[dict[str, Any]] = d.get("error")
        self.not_recorded = names(d.get("not_recorded"))
        self.restore_failed = names(d.get("restore_failed"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def new_id(prefix: str = "x") -> str:
    """A fresh client-side id (valid for the server: [A-Za-z0-9._-], <= 128)."""
    return f"{prefix}-{os.urandom(12).hex()}"


def prepare_code(code: str, dedent: bool = True) -> str:
    """The code as sent: dedented (the examples' indented triple-quoted strings), a leading
    blank line dropped."""
    if not dedent:
        return code
    import textwrap

    code = textwrap.dedent(code)
    if code.startswith("\n"):
        code = code[1:]
    return code


def resolve_url_sync(url: Optional[str]) -> str:
    """The server URL: the argument, else CAPSULE_URL, else the embedded local engine."""
    u = url or os.environ.get("CAPSULE_URL") or ""
    if not u:
        from ._embedded import ensure_engine

        u = ensure_engine()
    if "://" not in u:
        u = "http://" + u
    return u.rstrip("/")


class _BadHttp(ConnectionError):
    """A malformed or cut HTTP answer (handled like a dropped connection)."""


class _Response:
    """The answer to one request on its own connection: status, headers, then the body whole
    (``read``) or line by line as it arrives (``lines``, for NDJSON streams)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.f = sock.makefile("rb")
        line = self.f.readline(65537)
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _BadHttp(f"not an HTTP answer: {line[:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        while True:
            h = self.f.readline(65537)
            if not h.endswith(b"\n"):
                raise _BadHttp("the answer's headers were cut")
            if h in (b"\r\n", b"\n"):
                break
            k, _, v = h.decode("latin-1").partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        cl = self.headers.get("content-length", "")
        self.length = int(cl) if cl.isdigit() else None

    def getheader(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    def _chunks(self) -> Any:
        if not self.chunked:
            b = self.f.read() if self.length is None else self.f.read(self.length)
            if self.length is not None and len(b) < self.length:
                raise _BadHttp("the answer's body was cut")
            if b:
                yield b
            return
        while True:
            size = self.f.readline(1024).split(b";")[0].strip()
            try:
                n = int(size, 16)
            except ValueError:
                raise _BadHttp(f"bad chunk size {size[:20]!r}") from None
            if n == 0:
                return
            b = self.f.read(n + 2)
            if len(b) < n + 2:
                raise _BadHttp("a chunk was cut")
            yield b[:n]

    def read(self) -> bytes:
        return b"".join(self._chunks())

    def lines(self) -> Any:
        """The body's lines as they complete (a last unterminated line too)."""
        buf = b""
        for b in self._chunks():
            buf += b
            *done, buf = buf.split(b"\n")
            yield from done
        if buf:
            yield buf

    def close(self) -> None:
        self.f.close()
        self.sock.close()


class Rest:
    """REST calls on ``base`` (``http://host:port``): JSON in and out, errors as APIError
    subclasses, connection failures and 503 retried until ``reconnect_timeout``."""

    def __init__(self, base: str, token: Optional[str], reconnect_timeout: float) -> None:
        u = urllib.parse.urlsplit(base)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise CapsuleError(f"bad server URL {base!r}: want http://host:port")
        self.base = base
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/") + "/v1"
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.reconnect_timeout = reconnect_timeout

    def _send(self, method: str, path: str, body: Optional[dict[str, Any]],
              timeout: Optional[float]) -> _Response:
        """Sends one request on a new connection; returns the answer's head."""
        sock = socket.create_connection((self.host, self.port), timeout=5.0)
        try:
            if self.https:
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(timeout)
            data = b"" if body is None else json.dumps(body).encode()
            head = f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            head += f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            sock.sendall(head.encode("latin-1") + data)
            return _Response(sock)
        except BaseException:
            sock.close()
            raise

    def call(self, method: str, path: str, body: Optional[dict[str, Any]] = None, *,
             retry: bool = True) -> Any:
        """One request; returns the parsed JSON body (or None)."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                r = self._send(method, path, body, 30.0)
                try:
                    raw = r.read()
                finally:
                    r.close()
            except OSError as e:
                if not retry or time.monotonic() + delay > deadline:
                    raise CapsuleConnectionError(
                        f"{method} {self.base}/v1{path}: {e.__class__.__name__}: {e}") from e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if r.status == 503 and retry and time.monotonic() + delay < deadline:
                time.sleep(delay)  # shutting down (a restart is coming) or a transient refusal
                delay = min(delay * 2, 1.0)
                continue
            data: Any = None
            if raw:
                ct = r.getheader("content-type") or ""
                data = json.loads(raw) if ct.startswith("application/json") else raw
            if r.status in _OK:
                return data
            raise api_error(r.status, data)


def timeout_ms(timeout: Optional[float]) -> Optional[int]:
    """An execution's own timeout in seconds as the server takes it (None/0: the session's)."""
    if timeout is None or timeout == 0:
        return None
    if timeout < 0:
        raise ValueError("timeout must be > 0 seconds (None: the session's timeout)")
    return max(1, round(timeout * 1000))


def stream_run(rest: Rest, sid: str, code: str, eid: str, *, progress: bool = True,
               show_value: bool = False,
               timeout_ms: Optional[int] = None) -> tuple[int, Optional[Result]]:
    """Runs ``code`` as execution ``eid`` of session ``sid`` with the CLI's behaviour; returns
    (exit status, the final result or None). ``timeout_ms``: the execution's own timeout."""
    from .cli import _finish, _Progress, _read_reply  # shared with the async client

    body: dict[str, Any] = {"id": eid, "code": code, "stream": "ndjson"}
    if timeout_ms:
        body["timeout_ms"] = timeout_ms
    prog = _Progress(progress and sys.stderr.isatty(), sys.stderr)
    st: dict[str, Any] = {"cancels": 0}
    offset = 0  # output bytes written so far
    max_seq = -1
    last_input_seq: Optional[int] = None

    def on_sigint(signum: int, frame: Any) -> None:
        st["cancels"] += 1
        prog.clear()
        sys.stderr.write("\nKeyboardInterrupt: cancelling\n" if st["cancels"] == 1 else
                         "\n(still cancelling)\n")
        sys.stderr.flush()
        try:
            rest.call("POST", f"/executions/{eid}/cancel")
        except CapsuleError:
            pass  # finished meanwhile, or the server is gone: the stream says which

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    prog.start()
    deadline = time.monotonic() + rest.reconnect_timeout
    delay = 0.05
    try:
        while True:
            try:
                r = rest._send("POST", f"/sessions/{sid}/executions", body, None)
            except OSError as e:
                if time.monotonic() + delay > deadline:
                    raise CapsuleConnectionError(f"execution {eid}: {e}") from e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            try:
                if r.status != 200:
                    raw = r.read()
                    if r.status == 503 and time.monotonic() + delay < deadline:
                        time.sleep(delay)
                        delay = min(delay * 2, 1.0)
                        continue
                    try:
                        raise api_error(r.status, json.loads(raw) if raw else None)
                    except ValueError:
                        raise api_error(r.status, raw) from None
                for line in r.lines():
                    if not line.strip():
                        continue
                    m = json.loads(line)
                    t = m.get("type")
                    seq = m.get("seq")
                    if isinstance(seq, int):
                        if seq < max_seq:  # a new server process re-runs it: seqs start again
                            last_input_seq = None
                        max_seq = seq
                    if t == "output":
                        b = str(m.get("data", "")).encode()
                        off = int(m.get("offset", offset))
                        if off + len(b) <= offset:
                            continue
                        if off < offset:
                            b = b[offset - off:]
                        offset = max(offset, off) + len(b)
                        prog.clear()
                        out = sys.stderr if m.get("stream") == "stderr" else sys.stdout
                        out.write(b.decode(errors="replace"))
                        out.flush()
                    elif t == "input_request":
                        if isinstance(seq, int) and seq == last_input_seq:
                            continue  # the same prompt, re-sent after a re-attach
                        last_input_seq = seq if isinstance(seq, int) else None
                        _answer(rest, eid, m, prog, st, main_thread, on_sigint, _read_reply)
                    elif t == "restarted":
                        prog.clear()
                        sys.stderr.write("[capsule: the server restarted; the execution is "
                                         "re-run, output continues]\n")
                    elif t == "result":
                        prog.clear()
                        res = Result(m)
                        whole = res.output.encode()
                        if len(whole) > offset:  # a tail no event brought
                            sys.stdout.write(whole[offset:].decode(errors="replace"))
                        sys.stdout.flush()
                        return _finish(res, show_value), res
                    elif t == "error":
                        e = m.get("error") or {}
                        raise api_error(400 if e.get("code") == "invalid_message" else 409
                                        if e.get("code") == "no_input_request" else 503, m)
            except (OSError, ValueError) as e:
                if time.monotonic() + delay > deadline:
                    raise CapsuleConnectionError(f"execution {eid}: the stream broke: {e}") from e
            finally:
                r.close()
            # the stream ended without a result: re-attach with the same id
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            deadline = max(deadline, time.monotonic() + rest.reconnect_timeout / 2)
    finally:
        prog.stop()
        if main_thread:
            signal.signal(signal.SIGINT, old)
        sys.stdout.flush()


def _answer(rest: Rest, eid: str, m: dict[str, Any], prog: _Progress, st: dict[str, Any],
            main_thread: bool, on_sigint: Any, read_reply: Any) -> None:
    """Reads the reply to an input() from the terminal and posts it (Ctrl-C here cancels)."""
    prog.clear()
    prog.paused = True
    sys.stderr.flush()
    if main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        text = read_reply(str(m.get("prompt", "")), bool(m.get("password", False)))
    except KeyboardInterrupt:
        sys.stderr.write("\nKeyboardInterrupt: cancelling\n")
        st["cancels"] += 1
        try:
            rest.call("POST", f"/executions/{eid}/cancel")
        except NotFoundError:
            pass
        text = None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, on_sigint)
        prog.paused = False
        prog.last = time.monotonic()
    if st["cancels"]:
        return
    reply = {"eof": True} if text is None else {"text": text}
    try:
        rest.call("POST", f"/executions/{eid}/input", reply, retry=False)
    except CapsuleConnectionError:
        try:  # it may or may not have been recorded: a refusal now means it was
            rest.call("POST", f"/executions/{eid}/input", reply)
        except (ConflictError, NotFoundError):
            pass
    except (ConflictError, NotFoundError):
        pass  # cancelled meanwhile
