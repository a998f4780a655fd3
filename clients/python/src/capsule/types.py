"""capsule.types - the values the client returns: ExecutionResult and stream Messages.

Both are plain dataclasses built from the server's JSON (the Result and Event schemas of
tools/openapi.json); ``raw`` keeps the JSON object as received.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ._rest import names

#: statuses of a finished execution
FINISHED = frozenset({"ok", "error", "cancelled", "timeout", "died", "refused"})


@dataclass
class ExecutionResult:
    """The outcome of one execution.

    ``value`` is the last expression as JSON when it is JSON-able (else None; ``repr`` always
    has its repr), ``output`` is stdout and stderr in order, ``error`` the remote exception
    (``{"type", "message", "traceback"}``) when ``status`` is not ``ok``. ``restarted`` says the
    engine re-ran it after a crash; ``committed`` that its namespace changes were kept.
    ``not_recorded`` names what it bound that the log cannot hold (locks, generators, open
    files: they cannot be pickled), with why; they are gone after a restore (a crash, a worker's
    death, a rollback). ``restore_failed`` names what such a restore could not bring back.
    """

    id: str
    session: str
    status: str
    value: Any = None
    repr: Optional[str] = None
    output: str = ""
    error: Optional[dict[str, Any]] = None
    truncated: bool = False
    restarted: bool = False
    committed: bool = False
    ordinal: Optional[int] = None
    input_request: Optional[dict[str, Any]] = None
    not_recorded: dict[str, str] = field(default_factory=dict)
    restore_failed: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ExecutionResult":
        return cls(
            id=str(d.get("id") or d.get("eid") or ""),
            session=str(d.get("session") or ""),
            status=str(d.get("status") or ""),
            value=_value(d),
            repr=d.get("repr"),
            output=str(d.get("output") or ""),
            error=d.get("error"),
            truncated=bool(d.get("truncated", False)),
            restarted=bool(d.get("restarted", False)),
            committed=bool(d.get("committed", False)),
            ordinal=d.get("ordinal"),
            input_request=d.get("input_request"),
            not_recorded=names(d.get("not_recorded")),
            restore_failed=names(d.get("restore_failed")),
            raw=d,
        )


def _value(d: dict[str, Any]) -> Any:
    """The value, also when the server could only pass its JSON text on (an integer beyond 64
    bits)."""
    if "value" not in d and isinstance(d.get("value_json"), str):
        try:
            return json.loads(d["value_json"])
        except ValueError:
            return None
    return d.get("value")


MessageType = Literal["output", "input", "result", "error", "restarted"]


@dataclass
class Message:
    """One event of ``Session.stream_execute``.

    ``type`` is ``"output"`` (``data``, ``stream`` = stdout|stderr|replay), ``"input"``
    (``prompt``, ``password``; answer with ``respond_input(msg.id, text)``), ``"restarted"`` (the
    engine re-runs the execution after a crash; more output follows), and last either
    ``"result"`` (``result.status == "ok"``, ``value``) or ``"error"`` (``error`` = the remote
    exception, ``result`` the whole result). ``id`` is always the execution id.
    """

    type: MessageType
    id: str
    data: str = ""
    stream: str = ""
    prompt: str = ""
    password: bool = False
    value: Any = None
    error: Optional[dict[str, Any]] = None
    result: Optional[ExecutionResult] = None
