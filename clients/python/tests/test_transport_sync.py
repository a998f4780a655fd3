"""Waited executions over the session's WebSocket when it is open (counted on the server's
metrics: no HTTP request per execute), and the synchronous API (capsule.sync) with the same
names: execute, stream with input, errors, checkpoint/restore, durable ids, inside a running
event loop as in a notebook."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from capsule import ExecutionError, ExecutionResult, LimitExceeded, Session
from capsule import sync
from conftest import Engine


def arun(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/v1/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(name)


def test_execute_goes_over_the_open_websocket(url: str) -> None:
    async def go() -> None:
        async with Session() as s:
            r = await s.execute("n = 1\nn")  # no WebSocket yet: REST
            assert r.value == 1
            async for _ in s.stream_execute("print('open')"):  # opens the WebSocket
                pass
            h0 = metric(url, "capsule_http_requests_total")
            w0 = metric(url, 'capsule_ws_messages_total{dir="in"}')
            for i in range(5):
                r = await s.execute("n += 1\nprint('n', n)\nn")
                assert r.value == i + 2 and r.output == f"n {i + 2}\n" and r.committed
            # no HTTP request per execute (the metrics reads themselves are counted: <= 2)
            assert metric(url, "capsule_http_requests_total") <= h0 + 2
            assert metric(url, 'capsule_ws_messages_total{dir="in"}') >= w0 + 5
            with pytest.raises(ExecutionError) as ei:
                await s.execute("raise KeyError('k')")
            assert ei.value.type == "KeyError"
            r = await s.execute("1/0", raise_on_error=False)
            assert r.status == "error"
            # idempotent by id over the WebSocket too
            a = await s.execute("n += 100\nn", execution_id="ws-once")
            b = await s.execute("n += 100\nn", execution_id="ws-once")
            assert a.value == b.value == 106
            # an input() answered with respond_input while execute waits
            t = asyncio.create_task(s.execute("input('x? ')", execution_id="ws-in"))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if (await s.get_execution("ws-in")).raw.get("input_request"):
                    await s.respond_input("ws-in", "yes")
                    break
            assert (await t).value == "yes"
    arun(go())


def test_full_queue_over_websocket_is_limit_exceeded(tmp_path: Path) -> None:
    e = Engine(tmp_path / "q", extra=("--max-queue", "1"))
    try:
        async def go() -> None:
            async with Session(e.url) as s:
                async for _ in s.stream_execute("1"):
                    pass
                runs = [asyncio.create_task(s.execute("import time\ntime.sleep(0.5)"))
                        for _ in range(3)]
                got = await asyncio.gather(*runs, return_exceptions=True)
                # the queue holds 1 (the exact split depends on when the first one starts)
                assert any(isinstance(g, LimitExceeded) for g in got), got
                assert any(not isinstance(g, BaseException) for g in got), got
                assert all(isinstance(g, (LimitExceeded, ExecutionResult)) for g in got), got
        arun(go())
    finally:
        e.stop()


def test_sync_session(url: str) -> None:
    with sync.Session() as s:
        assert s.execute("x = 2 + 2\nx").value == 4
        msgs = []
        for m in s.stream_execute("a = input('name? ')\nprint('hi', a)\na"):
            msgs.append(m)
            if m.type == "input":
                assert m.prompt == "name? "
                s.respond_input(m.id, "ann")
        assert [m.type for m in msgs] == ["input", "output", "result"]
        assert msgs[1].data == "hi ann\n" and msgs[-1].value == "ann"
        with pytest.raises(ExecutionError):
            s.execute("1/0")
        cp = s.checkpoint()
        s.execute("x = 99")
        with s.restore(cp) as r:
            assert r.execute("x").value == 4  # the state at the checkpoint
        assert s.execute("x").value == 99
        assert s.info()["options"]["tx"] == "rollback_on_failure"
        sid = s.id
    # the unnamed one was closed at exit
    assert httpx.get(f"{url}/v1/sessions/{sid}").status_code == 404


def test_sync_durable_inside_a_running_loop(url: str) -> None:
    async def notebook_cell() -> int:  # a loop is running in this thread, as in Jupyter
        with sync.DurableSession(session_id="sync-dur") as d:
            a = d.execute_durable(execution_id="sd-1", code="c = globals().get('c', 0) + 1\nc")
            b = d.execute_durable(execution_id="sd-1", code="c = globals().get('c', 0) + 1\nc")
            assert a.value == b.value
            return int(a.value)
    assert arun(notebook_cell()) == 1


def test_bad_execution_id_over_websocket_is_refused_not_hung(url: str) -> None:
    from capsule import InvalidRequestError

    async def go() -> None:
        async with Session() as s:
            async for _ in s.stream_execute("1"):
                pass
            with pytest.raises(InvalidRequestError):
                await s.execute("1", execution_id="bad id")  # REST answers 400
            with pytest.raises(InvalidRequestError):
                async for _ in s.stream_execute("1", execution_id="bad id"):
                    pass
            assert (await s.execute("'fine'")).value == "fine"
    arun(go())
