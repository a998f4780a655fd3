"""Fixtures: a real capsule-engine process (from the build tree, or $CAPSULE_ENGINE) on a real
data directory, restartable on the same port, and a TCP proxy whose connections can be cut.

The engine runs with a zygote warm-up that defines the helper functions the seed examples call
(fetch_data, load_large_dataset, expensive_computation, save_results); the helpers append a line
to files under $CAPSULE_TEST_MARKS so tests can count real side effects.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

WARMUP = '''
import os as _os

def _mark(name, text="1"):
    with open(_os.path.join(_os.environ["CAPSULE_TEST_MARKS"], name), "a") as f:
        f.write(text + "\\n")

async def fetch_data():
    _mark("fetch_data")
    return list(range(7))

def load_large_dataset():
    _mark("load")
    return list(range(1000))

def expensive_computation(df):
    return sum(df)

def save_results(x):
    _mark("save", str(x))
'''


def engine_binary() -> str:
    env = os.environ.get("CAPSULE_ENGINE")
    if env:
        return env
    for b in ["build", "build-cli"] + sorted(p.name for p in REPO.glob("build*")):
        p = REPO / b / "bin" / "capsule-engine"
        if p.is_file():
            return str(p)
    pytest.exit("no capsule-engine: build it, or set CAPSULE_ENGINE", returncode=2)
    raise AssertionError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    """A capsule-engine process; restart() keeps the data directory and the port."""

    def __init__(self, tmp: Path, extra: tuple[str, ...] = (), env: Optional[dict[str, str]] = None):
        self.bin = engine_binary()
        self.data = tmp / "data"
        self.marks = tmp / "marks"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.warm = tmp / "warmup.py"
        self.warm.write_text(WARMUP)
        self.extra = extra
        self.env = dict(os.environ, CAPSULE_TEST_MARKS=str(self.marks), **(env or {}))
        for k in ("CAPSULE_LISTEN", "CAPSULE_DATA_DIR", "CAPSULE_TOKENS", "CAPSULE_TOKENS_FILE"):
            self.env.pop(k, None)
        self.port = free_port()
        self.proc: Optional[subprocess.Popen[str]] = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            self.proc = subprocess.Popen(
                [self.bin, "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data),
                 "--warmup-file", str(self.warm), "--pool-idle", "2", "--grace-ms", "5000",
                 "--log-level", "warn", *self.extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if "listening on port" in line:
                return
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc.wait()
            # the port of a just-killed engine may linger briefly
            if "in use" not in err.lower() or time.monotonic() > deadline:
                raise AssertionError(f"capsule-engine did not start: {line}{err}")
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        self.kill9()
        self.start()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def marks_of(self, name: str) -> list[str]:
        p = self.marks / name
        return p.read_text().splitlines() if p.exists() else []


class Proxy:
    """A TCP proxy on its own thread; cut() closes every connection it carries."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        self.ready = threading.Event()
        self.cuts = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._conn, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        self.writers |= {w, uw}

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            try:
                while True:
                    d = await a.read(65536)
                    if not d:
                        break
                    b.write(d)
                    await b.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                b.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self.writers -= {w, uw}

    def cut(self) -> None:
        """Drops every open connection (RST-like: the sockets are aborted)."""
        def _cut() -> None:
            for w in list(self.writers):
                w.transport.abort()
            self.writers.clear()
        self.loop.call_soon_threadsafe(_cut)
        self.cuts += 1
        time.sleep(0.05)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = Engine(tmp_path_factory.mktemp("engine"))
    yield e
    assert e.stop() == 0


@pytest.fixture
def fresh_engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine of the test's own (for kill -9 and restarts)."""
    e = Engine(tmp_path / "eng")
    yield e
    e.stop()


@pytest.fixture
def url(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CAPSULE_URL", engine.url)
    return engine.url


@pytest.fixture
def proxy(fresh_engine: Engine) -> Iterator[Proxy]:
    p = Proxy(fresh_engine.port)
    yield p
    p.close()


def venv_bin(name: str) -> str:
    """An executable of the environment running the tests (the venv's console scripts)."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else shutil.which(name) or name
