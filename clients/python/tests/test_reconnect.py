"""Dropped connections and server crashes: streams resume without losing or doubling output,
waited executions and durable ids survive kill -9 and a restart of the server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys


from capsule import DurableSession, Session
from conftest import Engine, Proxy

LINES = """
import time
for i in range(12):
    print('line', i, flush=True)
    time.sleep(0.08)
'end'
"""
WANT = "".join(f"line {i}\n" for i in range(12))


def arun(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 90))


def test_stream_survives_cut_connections(proxy: Proxy, fresh_engine: Engine) -> None:
    async def go() -> None:
        async with Session(proxy.url) as s:
            seen, cuts = "", 0
            async for m in s.stream_execute(LINES):
                if m.type == "output":
                    seen += m.data
                    if seen.count("\n") in (3, 7) and cuts < 2 and proxy.cuts == cuts:
                        proxy.cut()  # the WebSocket (and the HTTP pool) dropped mid-stream
                        cuts += 1
                elif m.type in ("result", "error"):
                    last = m
            assert proxy.cuts == 2
            assert seen == WANT, seen
            assert last.type == "result" and last.value == "end"
            assert last.result and last.result.output == WANT and not last.result.restarted
    arun(go())


def test_execute_survives_cut_connection(proxy: Proxy, fresh_engine: Engine) -> None:
    async def go() -> None:
        async with Session(proxy.url) as s:
            code = "import time\ncount = globals().get('count', 0) + 1\ntime.sleep(0.6)\ncount"
            t = asyncio.create_task(s.execute(code))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(proxy.cut)  # the waiting request's connection
            r = await t
            assert r.value == 1  # re-sent with its id: attached, not run twice
            assert (await s.execute("count")).value == 1
    arun(go())


def test_stream_across_kill9_and_restart(fresh_engine: Engine) -> None:
    async def go() -> None:
        async with Session(fresh_engine.url) as s:
            seen, killed = "", False
            types = []
            async for m in s.stream_execute(LINES):
                types.append(m.type)
                if m.type == "output":
                    seen += m.data
                    if seen.count("\n") == 4 and not killed:
                        await asyncio.to_thread(fresh_engine.restart)  # kill -9, start again
                        killed = True
                elif m.type in ("result", "error"):
                    last = m
            assert killed and last.type == "result" and last.value == "end"
            assert last.result and last.result.restarted  # the engine re-ran it from the log
            assert last.result.output == WANT  # the durable record is complete
            return seen

    # every line once, in order: the server's offsets for the re-run count the output it printed
    # before the client re-attached (the engine hands an attaching listener the output so far)
    assert arun(go()) == WANT


def test_execute_durable_across_kill9(fresh_engine: Engine) -> None:
    code = """
        import time
        time.sleep(0.8)
        save_results('done')
        'value'
    """

    async def go() -> None:
        async with DurableSession(fresh_engine.url, session_id="dur") as s:
            t = asyncio.create_task(s.execute_durable(execution_id="job-1", code=code))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(fresh_engine.restart)  # kill -9 while it runs
            r = await t
            assert r.value == "value" and r.restarted
    arun(go())
    assert fresh_engine.marks_of("save") == ["done"]
    # the server crashes again, then a new client process asks for the same id: recorded
    fresh_engine.restart()
    src = ("import asyncio\nfrom capsule import DurableSession\n"
           "async def m():\n"
           f"    async with DurableSession('{fresh_engine.url}') as s:\n"
           f"        r = await s.execute_durable(execution_id='job-1', code={code!r})\n"
           "        print(r.value, r.restarted)\n"
           "asyncio.run(m())\n")
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "value True\n"
    assert fresh_engine.marks_of("save") == ["done"]  # not run again


def test_submitted_input_answered_by_id_across_kill9(fresh_engine: Engine) -> None:
    """A submitted execution waits on its second prompt; the server is killed -9 and restarted.
    By its id alone the client sees the re-run waiting on that prompt (the first answer replayed
    from the log) and answers it: no execute is sent again."""
    async def prompt(s: Session, eid: str, want: str) -> None:
        for _ in range(400):
            r = await s.get_execution(eid)
            if (r.input_request or {}).get("prompt") == want:
                assert r.status == "running", r
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no prompt {want!r}: {r}")

    async def go() -> None:
        async with Session(fresh_engine.url, session_id="byid") as s:
            eid = await s.submit("a = input('a? ')\nb = input('b? ')\na + b",
                                 execution_id="ask-1")
            await prompt(s, eid, "a? ")
            await s.respond_input(eid, "x")
            await prompt(s, eid, "b? ")
            await asyncio.to_thread(fresh_engine.restart)  # kill -9, start again
            await prompt(s, eid, "b? ")
            await s.respond_input(eid, "y")
            r = await s.wait(eid)
            assert r.value == "xy" and r.restarted, r
    arun(go())


def test_input_prompt_not_doubled_after_reconnect(proxy: Proxy, fresh_engine: Engine) -> None:
    async def go() -> None:
        async with Session(proxy.url) as s:
            prompts = []
            async for m in s.stream_execute("a = input('first? ')\nprint('got', a)\na"):
                if m.type == "input":
                    prompts.append(m.prompt)
                    await asyncio.to_thread(proxy.cut)
                    await asyncio.sleep(0.3)  # the resume re-sends the waiting prompt
                    await s.respond_input(m.id, "yes")
                elif m.type == "result":
                    assert m.value == "yes"
            assert prompts == ["first? "]
    arun(go())
