"""capsule - the Python client of capsule-engine: durable Python sessions.

    async with Session() as session:
        result = await session.execute("x = 2 + 2\\nx")

Session/DurableSession (capsule.session), SessionPool/PoolConfig (capsule.pool), the results and
stream messages (capsule.types) and the exceptions (capsule.errors). ``capsule`` on the command
line is capsule.cli.
"""

from .errors import (
    APIError,
    AuthError,
    CapsuleConnectionError,
    CapsuleError,
    ConflictError,
    EngineStartError,
    ExecutionCancelled,
    ExecutionError,
    ExecutionRefused,
    ExecutionTimeout,
    InvalidRequestError,
    LimitExceeded,
    NotFoundError,
    ServerError,
    WorkerDied,
)
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ below loads, for type checkers
    from .pool import PoolConfig, SessionPool
    from .session import Checkpoint, DurableSession, Session
    from .types import ExecutionResult, Message

__version__ = "0.1.0"

# The client (httpx, websockets, asyncio) is imported on first use: `from capsule import task` in a
# plain `python3 hello.py` and the CLI's subcommands load only what they use.
_LAZY = {"Session": "session", "DurableSession": "session", "Checkpoint": "session",
         "SessionPool": "pool", "PoolConfig": "pool", "ExecutionResult": "types",
         "Message": "types"}


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'capsule' has no attribute {name!r}")
    import importlib

    v = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = v
    return v

__all__ = [
    "Session", "DurableSession", "SessionPool", "PoolConfig", "Checkpoint", "ExecutionResult",
    "Message", "CapsuleError", "CapsuleConnectionError", "EngineStartError", "APIError",
    "AuthError", "NotFoundError", "InvalidRequestError", "ConflictError", "LimitExceeded",
    "ServerError", "ExecutionError", "ExecutionCancelled", "ExecutionTimeout", "WorkerDied",
    "ExecutionRefused",
]

# durable tasks (issue 9): the same module is `capsule` inside sessions (see task.py)
from .task import (  # noqa: E402
    HIGH, LOW, MEDIUM, Promise, PromiseRejected, Task, TaskError, TaskTimeout, promise, sleep,
    step, task,
)

__all__ += ["task", "step", "sleep", "promise", "Promise", "PromiseRejected", "Task", "TaskError",
            "TaskTimeout", "LOW", "MEDIUM", "HIGH"]
