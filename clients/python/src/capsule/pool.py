"""capsule.pool - SessionPool: sessions created ahead of need, handed out and taken back.

Invariants:
  - at most ``max_sessions`` sessions exist at once (idle + in use + being created); acquire()
    waits for a release when the pool is full.
  - after start() and after each acquire(), the pool refills itself in the background to
    ``min_idle`` idle sessions (never beyond max_sessions).
  - every pool session runs ``warmup_code`` as its first execution, on the server (recorded with
    the session; a failing warm-up raises ExecutionError from start()/acquire()).
  - a released session keeps its namespace; release(session, discard=True) closes it instead
    (use it after an execution that left the session in a state the next user must not see).
  - stop() closes every session the pool made, idle or not.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Generator, Optional

from .session import Session

__all__ = ["PoolConfig", "SessionPool"]


@dataclass
class PoolConfig:
    """``min_idle`` sessions kept ready, ``max_sessions`` at most in all, ``warmup_code`` run in
    each new session; ``session_options`` are passed to each Session (tx, timeout, ...)."""

    min_idle: int = 2
    max_sessions: int = 10
    warmup_code: Optional[str] = None
    url: Optional[str] = None
    token: Optional[str] = None
    session_options: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.min_idle < 0 or self.max_sessions < 1 or self.min_idle > self.max_sessions:
            raise ValueError(f"need 0 <= min_idle <= max_sessions and max_sessions >= 1 "
                             f"(min_idle={self.min_idle}, max_sessions={self.max_sessions})")


class _Acquire:
    """What ``pool.acquire()`` returns: awaitable (a Session you release yourself) or an async
    context manager (released at the end of the block)."""

    def __init__(self, pool: "SessionPool") -> None:
        self.pool = pool
        self.session: Optional[Session] = None

    def __await__(self) -> Generator[Any, None, Session]:
        return self.pool._acquire().__await__()

    async def __aenter__(self) -> Session:
        self.session = await self.pool._acquire()
        return self.session

    async def __aexit__(self, *exc: Any) -> None:
        if self.session is not None:
            await self.pool.release(self.session)


class SessionPool:
    """A pool of pre-created sessions. ``SessionPool(config)`` or ``SessionPool(min_idle=...,
    max_sessions=..., warmup_code=...)``; ``async with SessionPool(...) as pool`` starts and
    stops it. Use from one event loop."""

    def __init__(self, config: Optional[PoolConfig] = None, **kw: Any) -> None:
        self.config = config or PoolConfig(**kw)
        self._idle: list[Session] = []
        self._busy: set[Session] = set()
        self._creating = 0
        self._cond: Optional[asyncio.Condition] = None
        self._fill_task: Optional[asyncio.Task[None]] = None
        self._fill_error: Optional[BaseException] = None
        self._stopped = False
        self.created = 0

    @property
    def size(self) -> int:
        return len(self._idle) + len(self._busy) + self._creating

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def _new(self) -> Session:
        c = self.config
        s = Session(c.url, token=c.token, warmup=c.warmup_code, keep=False,
                    **(c.session_options or {}))
        return await s.start()

    async def _grow(self) -> Session:
        assert self._cond is not None
        self._creating += 1
        try:
            s = await self._new()
            self.created += 1
            return s
        finally:
            self._creating -= 1
            async with self._cond:
                self._cond.notify_all()

    async def _fill(self) -> None:
        assert self._cond is not None
        while (not self._stopped and len(self._idle) + self._creating < self.config.min_idle
               and self.size < self.config.max_sessions):
            try:
                s = await self._grow()
            except BaseException as e:  # reported by the next acquire()
                self._fill_error = e
                return
            async with self._cond:
                self._idle.append(s)
                self._cond.notify_all()

    def _refill(self) -> None:
        if self._fill_task is None or self._fill_task.done():
            self._fill_task = asyncio.create_task(self._fill())

    async def start(self) -> "SessionPool":
        """Creates the first ``min_idle`` sessions (and waits for them)."""
        if self._cond is None:
            self._cond = asyncio.Condition()
        await self._fill()
        if self._fill_error is not None:
            e, self._fill_error = self._fill_error, None
            raise e
        return self

    def acquire(self) -> _Acquire:
        """A session: an idle one, else a new one if below max_sessions, else the next one
        released. ``s = await pool.acquire()`` or ``async with pool.acquire() as s:``."""
        return _Acquire(self)

    async def _acquire(self) -> Session:
        if self._cond is None:
            await self.start()
        assert self._cond is not None
        if self._stopped:
            raise RuntimeError("the pool is stopped")
        if self._fill_error is not None:
            e, self._fill_error = self._fill_error, None
            raise e
        async with self._cond:
            while True:
                if self._idle:
                    s = self._idle.pop()
                    break
                if self.size < self.config.max_sessions:
                    s = None
                    break
                await self._cond.wait()
        if s is None:
            s = await self._grow()
        self._busy.add(s)
        self._refill()
        return s

    async def release(self, session: Session, *, discard: bool = False) -> None:
        """Gives a session back (``discard``: close it; the pool makes a fresh one as needed)."""
        assert self._cond is not None
        if session not in self._busy:
            raise ValueError("this session is not in use from this pool")
        self._busy.discard(session)
        if discard or self._stopped or session._api is None:
            await session.close()
            self._refill()
        else:
            self._idle.append(session)
        async with self._cond:
            self._cond.notify_all()

    async def stop(self) -> None:
        """Closes every session of the pool."""
        self._stopped = True
        if self._fill_task is not None:
            try:
                await self._fill_task
            except BaseException:
                pass
        sessions = self._idle + list(self._busy)
        self._idle, self._busy = [], set()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    async def __aenter__(self) -> "SessionPool":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
