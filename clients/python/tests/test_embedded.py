"""The embedded default on a clean home directory: no CAPSULE_URL, the client starts a local
capsule-engine with its data under $HOME/.local/state/capsule (or $XDG_STATE_HOME/capsule),
shares it between processes, stops it when the last process using it exits, and the data
(named sessions, recorded results) outlives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import engine_binary, venv_bin

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

HOLD = '''
import asyncio, os, sys
from capsule import Session

async def main():
    async with Session(session_id="held") as s:
        await s.execute("h = 'held'")
        print(s.url, flush=True)
        sys.stdin.readline()  # hold the engine until told
        print((await s.execute("h")).value, flush=True)

asyncio.run(main())
'''


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HOME=str(home), CAPSULE_ENGINE=engine_binary(), **extra)
    for k in ("CAPSULE_URL", "XDG_STATE_HOME", "CAPSULE_KEEP_ENGINE"):
        env.pop(k, None)
    env.update(extra)
    return env


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][:1] != "Z"


def test_quick_start_on_a_clean_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = env_for(home)
    p = subprocess.run([sys.executable, "-c", BASIC], capture_output=True, text=True, env=env,
                       timeout=90)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "4\n"
    state = home / ".local" / "state" / "capsule"
    assert (state / "data").is_dir() and any((state / "data").rglob("*.mdb"))
    assert not (state / "engine.json").exists()  # the last user left: the engine was stopped

    # two processes share one engine; it stops when the last one exits
    holder = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None and holder.stdin is not None
    url = holder.stdout.readline().strip()
    st = json.loads((state / "engine.json").read_text())
    assert url == f"http://127.0.0.1:{st['port']}" and pid_alive(st["pid"])
    cap = venv_bin("capsule")
    p = subprocess.run([cap, "-s", "held", "-c", "print(h)"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.stdout == "held\n", p.stderr
    assert pid_alive(st["pid"])  # still used by the holder
    out, err = holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and out.strip() == "held", err
    end = time.monotonic() + 20
    while pid_alive(st["pid"]) and time.monotonic() < end:
        time.sleep(0.05)
    assert not pid_alive(st["pid"]) and not (state / "engine.json").exists()

    # a later process starts a new engine on the same data: the named session is there
    p = subprocess.run([cap, "-s", "held", "-c", "print(h * 2)"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.stdout == "heldheld\n", p.stderr


def test_xdg_state_home_and_keep(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    xdg = tmp_path / "xdg"
    env = env_for(home, XDG_STATE_HOME=str(xdg), CAPSULE_KEEP_ENGINE="1")
    cap = venv_bin("capsule")
    p = subprocess.run([cap, "-c", "print('kept')"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.stdout == "kept\n", p.stderr
    st = json.loads((xdg / "capsule" / "engine.json").read_text())
    try:
        assert pid_alive(st["pid"])  # CAPSULE_KEEP_ENGINE=1 leaves it running
        p = subprocess.run([cap, "engine", "status"], capture_output=True, text=True, env=env,
                           timeout=30)
        assert p.returncode == 0 and f"pid {st['pid']}" in p.stdout
        assert not (home / ".local" / "state" / "capsule").exists()
    finally:
        p = subprocess.run([cap, "engine", "stop"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert p.stdout == "stopped\n" and not pid_alive(st["pid"])
    p = subprocess.run([cap, "engine", "status"], capture_output=True, text=True, env=env,
                       timeout=30)
    assert p.returncode == 1 and "not running" in p.stdout
