"""The seed documents' examples, verbatim, each run as its own Python process against the
engine fixture (CAPSULE_URL points at it). Snippets that are not whole programs (top-level
``async with``/``await``) are wrapped in ``async def _main(): ...; asyncio.run(_main())``.
The only edits: the durable example's Resonate host names the fixture's engine, and the pool
example imports from ``capsule`` instead of PyREPL3's ``src.session.pool``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import Engine

BASIC = '''
import asyncio
from capsule import Session

async def main():
    async with Session() as session:
        result = await session.execute("""
            x = 2 + 2
            print(f"The answer is {x}")
            x
        """)
        print(result.value)  # 4

asyncio.run(main())
'''

TOP_LEVEL_AWAIT = '''
async with Session() as session:
    await session.execute("""
        import asyncio
        await asyncio.sleep(1)
        result = await fetch_data()
        print(f"Got {len(result)} items")
    """)
'''

INTERACTIVE = '''
async with Session() as session:
    async for msg in session.stream_execute("""
        name = input("Your name: ")
        age = input("Your age: ")
        print(f"Hello {name}, age {age}")
    """):
        if msg.type == "input":
            response = "Alice" if "name" in msg.prompt else "25"
            await session.respond_input(msg.id, response)
        elif msg.type == "output":
            print(msg.data, end="")
'''

DURABLE = '''
from capsule import DurableSession

async with DurableSession(resonate_host="localhost:8001") as session:
    # Execution survives crashes and can resume
    result = await session.execute_durable(
        execution_id="data-processing-123",
        code="""
            df = load_large_dataset()
            processed = expensive_computation(df)
            save_results(processed)
        """,
        checkpoint_interval=10  # Checkpoint every 10 seconds
    )
'''

POOL = '''
from src.session.pool import SessionPool, PoolConfig

# Configure pool
config = PoolConfig(
    min_idle=2,
    max_sessions=10,
    warmup_code="import numpy as np"
)

# Create and use pool
pool = SessionPool(config)
await pool.start()

session = await pool.acquire()
# Use session...
await pool.release(session)

await pool.stop()
'''


def run_snippet(src: str, url: str, wrap: bool, epilogue: str = "") -> subprocess.CompletedProcess[str]:
    if wrap:
        src = ("import asyncio\nfrom capsule import Session\n\nasync def _main():\n"
               + textwrap.indent(src + epilogue, "    ") + "\nasyncio.run(_main())\n")
    env = dict(os.environ, CAPSULE_URL=url)
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env,
                       timeout=90)
    assert p.returncode == 0, p.stderr
    return p


def test_basic(engine: Engine) -> None:
    p = run_snippet(BASIC, engine.url, wrap=False)
    assert p.stdout == "4\n"


def test_top_level_await(engine: Engine) -> None:
    before = len(engine.marks_of("fetch_data"))
    run_snippet(TOP_LEVEL_AWAIT, engine.url, wrap=True)
    assert len(engine.marks_of("fetch_data")) == before + 1  # the awaited call really ran


def test_top_level_await_output(engine: Engine) -> None:
    # the same code, its output looked at
    p = run_snippet(TOP_LEVEL_AWAIT.replace("    await session.execute(",
                                            "    r = await session.execute(", 1),
                    engine.url, wrap=True, epilogue="\n    print(r.output, end='')\n")
    assert p.stdout == "Got 7 items\n"


def test_interactive_input(engine: Engine) -> None:
    p = run_snippet(INTERACTIVE, engine.url, wrap=True)
    assert p.stdout == "Hello Alice, age 25\n"


def test_durable(engine: Engine) -> None:
    src = DURABLE.replace("localhost:8001", f"localhost:{engine.port}")
    epi = "\nprint(result.status, result.id)\n"
    p1 = run_snippet(src, "http://127.0.0.1:1", wrap=True, epilogue=epi)  # resonate_host wins
    assert p1.stdout == "ok data-processing-123\n"
    assert engine.marks_of("save") == [str(sum(range(1000)))]
    # a second client process with the same id: the recorded result, nothing runs again
    p2 = run_snippet(src, "http://127.0.0.1:1", wrap=True, epilogue=epi)
    assert p2.stdout == "ok data-processing-123\n"
    assert engine.marks_of("save") == [str(sum(range(1000)))]


def test_pool(engine: Engine) -> None:
    src = POOL.replace("from src.session.pool import", "from capsule import").replace(
        "# Use session...", "print((await session.execute('int(np.arange(5).sum())')).value)")
    p = run_snippet(src, engine.url, wrap=True)
    assert p.stdout == "10\n"
