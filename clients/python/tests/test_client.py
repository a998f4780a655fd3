"""The client API against the real engine: streaming order, input, errors, cancel, timeouts,
idempotent ids, checkpoint/restore, the pool's limits, the error mapping of refusals."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from capsule import (
    AuthError,
    ConflictError,
    ExecutionCancelled,
    ExecutionError,
    ExecutionTimeout,
    InvalidRequestError,
    LimitExceeded,
    NotFoundError,
    PoolConfig,
    Session,
    SessionPool,
    WorkerDied,
)
from capsule.session import prepare_code
from conftest import Engine


def arun(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_execute_value_output_and_namespace(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            r = await s.execute("print('a')\nimport sys\nprint('b', file=sys.stderr)\n[1, 'x']")
            assert r.ok and r.value == [1, "x"] and r.repr == "[1, 'x']"
            assert r.output == "a\nb\n" and r.committed
            r = await s.execute("y = 3")
            assert r.value is None and r.repr is None
            assert (await s.execute("y * 2")).value == 6  # the namespace persists
            r = await s.execute("object()")
            assert r.value is None and r.repr.startswith("<object object")  # not JSON-able
    arun(go())


def test_dedent_rules() -> None:
    assert prepare_code("\n    a = 1\n    if a:\n        a\n") == "a = 1\nif a:\n    a\n"
    assert prepare_code("a = 1\n  # c\n") == "a = 1\n  # c\n"  # no common indent: unchanged
    assert prepare_code("    x", dedent=False) == "    x"


def test_stream_order(url: str) -> None:
    code = """
        import sys, time
        for i in range(5):
            print('out', i, flush=True)
            print('err', i, file=sys.stderr, flush=True)
            time.sleep(0.02)
        'done'
    """

    async def go() -> None:
        async with Session() as s:
            msgs = [m async for m in s.stream_execute(code)]
            assert [m.type for m in msgs][-1] == "result" and msgs[-1].value == "done"
            outs = [m for m in msgs if m.type == "output"]
            text = "".join(m.data for m in outs)
            want = "".join(f"out {i}\nerr {i}\n" for i in range(5))
            assert text == want and msgs[-1].result is not None
            assert msgs[-1].result.output == want
            assert {m.stream for m in outs} == {"stdout", "stderr"}
            assert all(m.id == msgs[-1].id for m in msgs)
            # two streams at once on one session: queued in order, both complete, not mixed
            async def one(tag: str) -> str:
                return "".join([m.data async for m in s.stream_execute(
                    f"for i in range(3): print('{tag}', i)") if m.type == "output"])
            a, b = await asyncio.gather(one("A"), one("B"))
            assert a == "A 0\nA 1\nA 2\n" and b == "B 0\nB 1\nB 2\n"
    arun(go())


def test_input(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            r = await s.execute("a = input('a? ')\nb = input('b? ')\na + b", inputs=["x", "y"])
            assert r.value == "xy"
            with pytest.raises(ExecutionError) as ei:
                await s.execute("input('1?')\ninput('2?')", inputs=["only one"])
            assert ei.value.type == "EOFError"
            prompts = []
            async for m in s.stream_execute("n = input('n? ')\nprint('hi', n)\nn"):
                if m.type == "input":
                    prompts.append(m.prompt)
                    with pytest.raises(NotFoundError):  # no such execution
                        await s.respond_input(m.id + "-other", "x")
                    await s.respond_input(m.id, "zed")
                elif m.type == "result":
                    assert m.value == "zed" and m.result and m.result.output == "hi zed\n"
            assert prompts == ["n? "]
            # end of input
            async for m in s.stream_execute("input('z? ')"):
                if m.type == "input":
                    await s.respond_input(m.id, eof=True)
                last = m
            assert last.type == "error" and last.error and last.error["type"] == "EOFError"
    arun(go())


def test_errors(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            with pytest.raises(ExecutionError) as ei:
                await s.execute("def f():\n    raise KeyError('k')\nf()")
            e = ei.value
            assert e.type == "KeyError" and e.message == "'k'"
            assert "line 2, in f" in e.traceback and e.result.status == "error"
            with pytest.raises(ExecutionError) as ei:
                await s.execute("def g(:")
            assert ei.value.type == "SyntaxError"
            r = await s.execute("1/0", raise_on_error=False)
            assert r.status == "error" and r.error and r.error["type"] == "ZeroDivisionError"
            async for m in s.stream_execute("print('before')\nraise ValueError('v')"):
                last = m
            assert last.type == "error" and last.error and last.error["message"] == "v"
            assert last.result and last.result.output == "before\n"
            with pytest.raises(NotFoundError):
                await s.get_execution("never-was-here")
            with pytest.raises(InvalidRequestError):
                await s.execute("1", execution_id="bad id")
            assert (await s.execute("'still fine'")).value == "still fine"
        async with Session() as s2:
            await s2._need().call("DELETE", f"/sessions/{s2.id}")  # closed under it
            with pytest.raises(NotFoundError) as ni:
                await s2.execute("1")
            assert ni.value.code == "session_not_found"
    arun(go())


def test_cancel_keeps_session(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            await s.execute("kept = 'yes'")
            msgs = []
            async for m in s.stream_execute("import time\nprint('go', flush=True)\n"
                                            "time.sleep(30)"):
                msgs.append(m)
                if m.type == "output":
                    with pytest.raises(ConflictError):  # running, not waiting for input
                        await s.respond_input(m.id, "x")
                    assert await s.cancel(m.id)
            assert msgs[-1].type == "error" and msgs[-1].result
            assert msgs[-1].result.status == "cancelled"
            t = asyncio.create_task(s.execute("import time\ntime.sleep(30)", execution_id="c-2"))
            while True:
                try:
                    if (await s.get_execution("c-2")).status == "running":
                        break
                except NotFoundError:
                    pass
                await asyncio.sleep(0.05)
            assert await s.cancel("c-2")
            with pytest.raises(ExecutionCancelled):
                await t
            assert not await s.cancel("c-2")  # finished
            assert (await s.execute("kept")).value == "yes"
    arun(go())


def test_timeout(url: str) -> None:
    async def go() -> None:
        async with Session(timeout=0.5) as s:
            with pytest.raises(ExecutionTimeout) as ei:
                await s.execute("import time\ntime.sleep(10)")
            assert ei.value.result.status == "timeout"
            assert (await s.execute("1 + 1")).value == 2
            # an execution's own timeout overrides the session's, both ways
            r = await s.execute("import time\ntime.sleep(1)\n'slept'", timeout=20)
            assert r.value == "slept"
        async with Session() as s:  # no session timeout
            t0 = time.monotonic()
            with pytest.raises(ExecutionTimeout):  # over the WebSocket
                await s.execute("import time\ntime.sleep(30)", timeout=0.3)
            with pytest.raises(ExecutionTimeout):  # over REST (inputs given up front)
                await s.execute("input()\nimport time\ntime.sleep(30)", inputs=["a"],
                                timeout=0.3)
            got = [m async for m in s.stream_execute("import time\ntime.sleep(30)",
                                                     timeout=0.3)]
            assert got[-1].type == "error" and got[-1].result.status == "timeout", got[-1]
            eid = await s.submit("import time\ntime.sleep(30)", timeout=0.3)
            assert (await s.wait(eid, raise_on_error=False)).status == "timeout"
            assert time.monotonic() - t0 < 30
            with pytest.raises(ValueError):
                await s.execute("1", timeout=-1)
            assert (await s.execute("2 + 2", timeout=0)).value == 4
    arun(go())


def test_values(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            for code, want in [("2 ** 100", 2 ** 100), ("'a\\x00b'", "a\x00b"),
                               ("{'k': [1.5, None]}", {"k": [1.5, None]}), ("object()", None)]:
                r = await s.execute(code)
                assert r.value == want and r.repr, (code, r)
    arun(go())


def test_not_recorded_names(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            r = await s.execute("import threading\nlk = threading.Lock()\nn = 1")
            assert set(r.not_recorded) == {"lk"} and "lock" in r.not_recorded["lk"], r
            assert (await s.get_execution(r.id)).not_recorded == r.not_recorded
            assert (await s.execute("m = 2")).not_recorded == {}
            # the worker dies: the session comes back from the log, without lk, and says so
            with pytest.raises(WorkerDied) as ei:
                await s.execute("import os\nos._exit(1)")
            assert set(ei.value.result.restore_failed) == {"lk"}, ei.value.result
            assert "not restored: lk" in str(ei.value)
            assert (await s.execute("(n, m, 'lk' in globals())")).value == [1, 2, False]
    arun(go())


def test_idempotent_ids(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            code = "n = globals().get('n', 0) + 1\nn"
            a = await s.execute(code, execution_id="idem-1")
            b = await s.execute(code, execution_id="idem-1")
            assert a.value == b.value == 1 and b.id == "idem-1"
            got = [m async for m in s.stream_execute(code, execution_id="idem-1")]
            assert got[-1].type == "result" and got[-1].value == 1
            assert (await s.execute("n")).value == 1  # it ran once
            assert (await s.get_execution("idem-1")).value == 1
            eid = await s.submit("import time\ntime.sleep(0.2)\n'later'")
            assert (await s.wait(eid)).value == "later"
    arun(go())


def test_checkpoint_restore_and_named(url: str) -> None:
    async def go() -> None:
        async with Session(session_id="named-one") as s:
            await s.execute("v = 1")
            cp = await s.checkpoint()
            assert cp.bytes > 0 and cp.session_id == "named-one" and cp.ordinal is not None
            await s.execute("v = 2")
            async with await s.restore(cp) as old:
                assert (await old.execute("v")).value == 1
                assert old.id != s.id
            assert (await s.execute("v")).value == 2
            info = await s.info()
            assert info["id"] == "named-one"
        # a named session is kept: attach to it again
        async with Session(session_id="named-one") as again:
            assert (await again.execute("v")).value == 2
            await again.close(delete=True)
        async with Session() as anon:
            sid = anon.id
        async with Session() as probe:  # an unnamed session is closed at exit
            with pytest.raises(NotFoundError):
                await probe._need().call("GET", f"/sessions/{sid}")
    arun(go())


def test_warmup_and_pool_limits(url: str) -> None:
    async def go() -> None:
        with pytest.raises(ExecutionError) as ei:
            async with Session(warmup="1/0"):
                pass
        assert ei.value.type == "ZeroDivisionError"
        async with SessionPool(PoolConfig(min_idle=1, max_sessions=2,
                                          warmup_code="W = 'warm'")) as pool:
            a = await pool.acquire()
            async with pool.acquire() as b:
                assert (await b.execute("W")).value == "warm"
                assert pool.size == 2
                third = asyncio.create_task(pool._acquire())
                await asyncio.sleep(0.3)
                assert not third.done()  # full: waits for a release
                await a.execute("mine = 1")
                await pool.release(a)
                c = await asyncio.wait_for(third, 10)
                assert c is a and (await c.execute("mine")).value == 1  # kept its namespace
                await pool.release(c, discard=True)
            assert pool.size <= 2
            with pytest.raises(ValueError):
                await pool.release(b)
        with pytest.raises(ValueError):
            PoolConfig(min_idle=3, max_sessions=2)
    arun(go())


def test_auth_and_limits(tmp_path: Path) -> None:
    tok = tmp_path / "tokens"
    tok.write_text("good-token-000001\n")
    tok.chmod(0o600)
    e = Engine(tmp_path / "e", ("--tokens-file", str(tok), "--max-sessions", "2",
                                "--max-queue", "1", "--max-body-bytes", "4096"))
    try:
        async def go() -> None:
            with pytest.raises(AuthError) as ei:
                async with Session(e.url, token="wrong-token"):
                    pass
            assert ei.value.status == 401
            with pytest.raises(AuthError):
                async with Session(e.url):
                    pass
            async with Session(e.url, token="good-token-000001") as s1, \
                    Session(e.url, token="good-token-000001") as s2:
                assert (await s1.execute("1")).value == (await s2.execute("1")).value
                with pytest.raises(LimitExceeded) as li:
                    async with Session(e.url, token="good-token-000001"):
                        pass
                assert li.value.status == 429 and li.value.code == "too_many_sessions"
                with pytest.raises(LimitExceeded):
                    await s1.execute("'x' * 10000\n" + "#" * 5000)
                # streams over the WebSocket with the token
                got = [m async for m in s2.stream_execute("print('tok')")]
                assert got[0].data == "tok\n"
        arun(go())
    finally:
        e.stop()
