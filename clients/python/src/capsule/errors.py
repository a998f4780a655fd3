"""capsule.errors - the exceptions the client raises.

Every exception derives from CapsuleError. Server answers map to them by HTTP status and the
error code in the body ({"error": {"code", "message", "request_id"}}); a failed execution maps
by its status (error, cancelled, timeout, died, refused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import ExecutionResult


class CapsuleError(Exception):
    """Base of every error raised by the capsule client."""


class CapsuleConnectionError(CapsuleError):
    """The server could not be reached (or stayed unreachable past the reconnect deadline)."""


class EngineStartError(CapsuleConnectionError):
    """The embedded default could not find or start a local capsule-engine."""


class APIError(CapsuleError):
    """The server refused a request. ``status`` is the HTTP status, ``code`` the server's
    error code (e.g. ``session_not_found``), ``request_id`` the id to quote in a bug report."""

    def __init__(self, message: str, *, status: int = 0, code: str = "",
                 request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        bits = [self.message]
        if self.code:
            bits.append(f"[{self.code}]")
        if self.status:
            bits.append(f"(HTTP {self.status})")
        return " ".join(bits)


class AuthError(APIError):
    """Missing or wrong bearer token (401/403)."""


class NotFoundError(APIError):
    """No such session or execution, or it belongs to another token (404)."""


class InvalidRequestError(APIError):
    """The server rejected the request as malformed (400, 413, 414, 431)."""


class ConflictError(APIError):
    """The request conflicts with the object's state (409), e.g. an input reply to an
    execution that is not waiting for input."""


class LimitExceeded(APIError):
    """A server limit was reached: too many sessions, a full queue, a body too large (429/413/503
    with a limit code)."""


class ServerError(APIError):
    """The server failed (5xx) or is shutting down."""


class ExecutionError(CapsuleError):
    """The code raised on the server. ``type``, ``message`` and ``traceback`` are the remote
    exception's; ``result`` is the whole ExecutionResult (output so far included)."""

    def __init__(self, result: "ExecutionResult") -> None:
        err = result.error or {}
        self.result = result
        self.type: str = str(err.get("type") or result.status)
        self.message: str = str(err.get("message") or "")
        self.traceback: str = str(err.get("traceback") or "")
        self.execution_id: str = result.id
        text = f"{self.type}: {self.message}" if self.message else self.type
        if result.restore_failed:  # the session was restored from the log: say what is gone
            text += "; not restored: " + ", ".join(sorted(result.restore_failed))
        super().__init__(text)


class ExecutionCancelled(ExecutionError):
    """The execution was cancelled (by ``cancel()``, Ctrl-C in the CLI, or a session close)."""


class ExecutionTimeout(ExecutionError):
    """The execution ran past the session's per-execution timeout and was stopped."""


class WorkerDied(ExecutionError):
    """The worker process running the execution died (a crash, or a memory/CPU limit)."""


class ExecutionRefused(ExecutionError):
    """The engine refused to run the execution (e.g. the session was closed meanwhile)."""


_BY_STATUS: dict[str, type[ExecutionError]] = {
    "error": ExecutionError,
    "cancelled": ExecutionCancelled,
    "timeout": ExecutionTimeout,
    "died": WorkerDied,
    "refused": ExecutionRefused,
}


def execution_error(result: "ExecutionResult") -> ExecutionError:
    """The exception for a finished, failed result."""
    return _BY_STATUS.get(result.status, ExecutionError)(result)


_LIMIT_CODES = {"session_limit", "queue_full", "body_too_large", "too_many_connections",
                "limit", "busy"}


def api_error(status: int, body: Any) -> APIError:
    """Maps an HTTP error answer (status, parsed JSON body or raw bytes) to an exception."""
    code = message = request_id = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        e = body["error"]
        code = str(e.get("code", ""))
        message = str(e.get("message", ""))
        request_id = str(e.get("request_id", ""))
    elif isinstance(body, (bytes, str)) and body:
        message = body.decode(errors="replace") if isinstance(body, bytes) else body
    if not message:
        message = f"HTTP {status}"
    kw = dict(status=status, code=code, request_id=request_id)
    cls: type[APIError]
    if status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFoundError
    elif status == 409:
        cls = ConflictError
    elif status == 429 or code in _LIMIT_CODES or status == 413:
        cls = LimitExceeded
    elif 400 <= status < 500:
        cls = InvalidRequestError
    else:
        cls = ServerError
    return cls(message, **kw)  # type: ignore[arg-type]
