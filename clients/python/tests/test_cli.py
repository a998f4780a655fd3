"""The `capsule` command line driven as a user would (a pipe, and a pseudo-terminal), and the
embedded default (no CAPSULE_URL: the client starts its own local engine) on a clean HOME."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from conftest import Engine, engine_binary

CLI = [sys.executable, "-m", "capsule"]


def cli_env(url: str | None, home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CAPSULE_URL", None)
    if url:
        env["CAPSULE_URL"] = url
    if home is not None:
        env["HOME"] = str(home)
        env.pop("XDG_STATE_HOME", None)
    return env


def test_cli_code_and_input_through_a_pipe(engine: Engine) -> None:
    p = subprocess.run(CLI + ["-c", 'name = input("name? ")\nprint("hello", name)'],
                       input="Bob\n", capture_output=True, text=True, timeout=60,
                       env=cli_env(engine.url))
    assert p.returncode == 0, p.stderr
    assert "hello Bob" in p.stdout


def test_cli_error_exit_status(engine: Engine) -> None:
    p = subprocess.run(CLI + ["-c", "1/0"], capture_output=True, text=True, timeout=60,
                       env=cli_env(engine.url))
    assert p.returncode == 1
    assert "ZeroDivisionError" in p.stderr


def test_cli_file_and_named_session(engine: Engine, tmp_path: Path) -> None:
    f = tmp_path / "prog.py"
    f.write_text("counter = 41\n")
    env = cli_env(engine.url)
    p1 = subprocess.run(CLI + ["-s", "cli-named", str(f)], capture_output=True, text=True,
                        timeout=60, env=env)
    assert p1.returncode == 0, p1.stderr
    # the named session keeps its namespace for the next call
    p2 = subprocess.run(CLI + ["-s", "cli-named", "-c", "print(counter + 1)"],
                        capture_output=True, text=True, timeout=60, env=env)
    assert p2.returncode == 0, p2.stderr
    assert p2.stdout.strip() == "42"
    p3 = subprocess.run(CLI + ["sessions"], capture_output=True, text=True, timeout=60, env=env)
    assert p3.returncode == 0 and "cli-named" in p3.stdout


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        assert left > 0, f"timed out waiting for {needle!r}; screen so far: {buf!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_repl_in_a_pseudo_terminal(engine: Engine) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: the REPL on the terminal
        os.execve(sys.executable, CLI + ["repl"], cli_env(engine.url))
    try:
        _read_until(fd, b">>> ", 60)
        os.write(fd, b"x = 41\r")
        _read_until(fd, b">>> ", 60)
        os.write(fd, b"x + 1\r")
        out = _read_until(fd, b"42", 60)
        assert b"42" in out
        # Ctrl-C cancels a running cell and keeps the session
        _read_until(fd, b">>> ", 60)
        os.write(fd, b"import time; time.sleep(30)\r")
        time.sleep(1.0)
        os.write(fd, b"\x03")
        _read_until(fd, b">>> ", 30)
        os.write(fd, b"print(x * 2)\r")
        out = _read_until(fd, b"82", 60)
        assert b"82" in out
        os.write(fd, b"\x04")  # EOF ends the REPL
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_embedded_default_on_a_clean_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(None, home)
    env["CAPSULE_ENGINE"] = engine_binary()
    code = ("import asyncio\nfrom capsule import Session\n"
            "async def main():\n"
            "    async with Session() as s:\n"
            "        print((await s.execute('2 + 2')).value)\n"
            "asyncio.run(main())\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "4"
        state = home / ".local" / "state" / "capsule"
        assert state.is_dir(), "the embedded engine keeps its data under the user's state dir"
        assert any(state.rglob("data.mdb")), "the embedded engine's LMDB data is there"
    finally:
        subprocess.run(CLI + ["engine", "stop"], capture_output=True, text=True, timeout=60,
                       env=env)
