"""capsule.sync - the same API without ``await``, for scripts and notebooks.

    from capsule.sync import Session

    with Session() as s:
        print(s.execute("2 + 2").value)
        for m in s.stream_execute("name = input('name? ')\\nprint('hi', name)"):
            if m.type == "input":
                s.respond_input(m.id, "ann")

Each synchronous object owns one asyncio loop on a private daemon thread and runs the async
object's coroutines there (``asyncio.run_coroutine_threadsafe``), so it works where a loop is
already running in the calling thread (Jupyter). Names, arguments, results and exceptions are
those of ``capsule.Session`` / ``DurableSession``; a ``SessionPool`` is async only.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Iterator, Optional, TypeVar

from . import session as _s
from .session import Checkpoint
from .types import ExecutionResult, Message

T = TypeVar("T")

__all__ = ["Session", "DurableSession"]


class _Loop:
    """An event loop on its own daemon thread, shared by a Session and those it restores
    (stopped when the last of them closes)."""

    def __init__(self) -> None:
        self.users = 1
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="capsule-sync",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def stop(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


class Session:
    """``capsule.Session`` with plain calls: ``with Session(...) as s: s.execute(code)``. The
    arguments are those of ``capsule.Session``. Not thread-safe (one caller at a time)."""

    _cls: type[_s.Session] = _s.Session

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._loop = _Loop()
        # made on the loop's thread: its asyncio objects belong to that loop
        self._a: _s.Session = self._loop.run(self._make(*args, **kw))

    async def _make(self, *args: Any, **kw: Any) -> _s.Session:
        return self._cls(*args, **kw)

    @property
    def id(self) -> str:
        return self._a.id

    @property
    def url(self) -> Optional[str]:
        return self._a.url

    @property
    def last_ordinal(self) -> Optional[int]:
        return self._a.last_ordinal

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run(coro)

    def start(self) -> "Session":
        self._run(self._a.start())
        return self

    def close(self, *, delete: Optional[bool] = None) -> None:
        try:
            self._run(self._a.close(delete=delete))
        finally:
            self._loop.stop()

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def execute(self, code: str, **kw: Any) -> ExecutionResult:
        return self._run(self._a.execute(code, **kw))

    def submit(self, code: str, **kw: Any) -> str:
        return self._run(self._a.submit(code, **kw))

    def wait(self, execution_id: str, **kw: Any) -> ExecutionResult:
        return self._run(self._a.wait(execution_id, **kw))

    def stream_execute(self, code: str, **kw: Any) -> Iterator[Message]:
        """Yields the messages of ``capsule.Session.stream_execute`` as they come. While the
        caller holds a message the stream waits (``respond_input`` may be called meanwhile)."""
        agen = self._a.stream_execute(code, **kw)
        try:
            while True:
                try:
                    m = self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield m
        finally:
            self._run(agen.aclose())

    def respond_input(self, execution_id: str, text: Optional[str] = None, *,
                      eof: bool = False) -> None:
        self._run(self._a.respond_input(execution_id, text, eof=eof))

    def cancel(self, execution_id: str) -> bool:
        return self._run(self._a.cancel(execution_id))

    def get_execution(self, execution_id: str) -> ExecutionResult:
        return self._run(self._a.get_execution(execution_id))

    def checkpoint(self, *, truncate: bool = False) -> Checkpoint:
        return self._run(self._a.checkpoint(truncate=truncate))

    def restore(self, checkpoint: Optional[Checkpoint] = None, *,
                session_id: Optional[str] = None) -> "Session":
        """A new (started) synchronous Session forked at ``checkpoint``; close it when done."""
        a = self._run(self._a.restore(checkpoint, session_id=session_id))
        s = Session.__new__(Session)
        s._loop, s._a = self._loop, a
        self._loop.users += 1
        return s

    def info(self) -> dict[str, Any]:
        return self._run(self._a.info())

    def release(self) -> None:
        self._run(self._a.release())


class DurableSession(Session):
    """``capsule.DurableSession`` with plain calls."""

    _cls = _s.DurableSession
    _a: _s.DurableSession

    def execute_durable(self, *, execution_id: str, code: str, **kw: Any) -> ExecutionResult:
        return self._run(self._a.execute_durable(execution_id=execution_id, code=code, **kw))
