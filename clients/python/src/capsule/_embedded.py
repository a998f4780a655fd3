"""capsule._embedded - the embedded default: find, start, reuse and stop a local capsule-engine.

Used when a Session gets no URL and CAPSULE_URL is not set.

Where things are: the state directory is ``$XDG_STATE_HOME/capsule`` (else
``~/.local/state/capsule``) and holds ``data/`` (the engine's LMDB data directory), ``engine.json``
(pid and port of the running engine), ``engine.log`` (its stdout and stderr), ``engine.lock``
(held while a process starts, reuses or stops the engine) and ``engine.users``.

Policy (invariants):
  - at most one engine per state directory: starting, reusing and stopping all happen under an
    exclusive flock on engine.lock, and a recorded engine is reused only if its pid is alive and
    it answers /healthz on its port.
  - every process that uses the engine holds a shared flock on engine.users for as long as it
    lives. At exit, a process tries to turn its lock exclusive: if that succeeds no other process
    uses the engine, and it is stopped with SIGTERM (graceful: running executions get the
    engine's grace period; anything cut short is re-run at the next start, from the log). So the
    engine lives exactly as long as some process uses it. CAPSULE_KEEP_ENGINE=1 leaves it running
    (a later process reuses it; ``capsule engine stop`` stops it).
  - the data directory outlives the engine: sessions, recorded results and execution ids
    survive a stop and a later start.

Finding the executable: ``$CAPSULE_ENGINE``, else ``capsule-engine`` on PATH, else the repository's
build tree next to this source file (``<repo>/build*/bin/capsule-engine``, for an editable install).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from .errors import EngineStartError

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0

_lock = threading.Lock()
_users_fd: Optional[int] = None
_url: Optional[str] = None
_proc: Optional[subprocess.Popen[bytes]] = None


def state_dir() -> Path:
    """The directory holding the embedded engine's data and bookkeeping."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "capsule"


def find_engine() -> str:
    """The capsule-engine executable to start; raises EngineStartError if there is none."""
    env = os.environ.get("CAPSULE_ENGINE")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise EngineStartError(f"CAPSULE_ENGINE={env} is not an executable")
    onpath = shutil.which("capsule-engine")
    if onpath:
        return onpath
    here = Path(__file__).resolve()
    if len(here.parents) > 4:
        repo = here.parents[4]  # <repo>/clients/python/src/capsule/_embedded.py
        cands = [repo / "build" / "bin" / "capsule-engine"]
        cands += sorted(repo.glob("build*/bin/capsule-engine"),
                        key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
        for c in cands:
            if c.is_file() and os.access(c, os.X_OK):
                return str(c)
    raise EngineStartError(
        "no capsule-engine found: set CAPSULE_URL to a running server, or CAPSULE_ENGINE to the "
        "executable, or put capsule-engine on PATH (build it with tools/dev.sh build)")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _read_state(sd: Path) -> Optional[dict[str, int]]:
    try:
        st = json.loads((sd / "engine.json").read_text())
        return {"pid": int(st["pid"]), "port": int(st["port"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _start(sd: Path) -> dict[str, int]:
    global _proc
    exe = find_engine()
    data = sd / "data"
    data.mkdir(parents=True, exist_ok=True)
    logp = sd / "engine.log"
    with open(logp, "wb") as log:
        env = dict(os.environ)
        for k in ("CAPSULE_LISTEN", "CAPSULE_DATA_DIR"):
            env.pop(k, None)
        proc = subprocess.Popen(
            [exe, "--listen", "127.0.0.1:0", "--data-dir", str(data), "--grace-ms", "10000",
             "--log-level", os.environ.get("CAPSULE_ENGINE_LOG_LEVEL", "warn")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env)
    deadline = time.monotonic() + _START_TIMEOUT
    port = 0
    while time.monotonic() < deadline:
        text = logp.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("capsule-engine listening on port "):
                port = int(line.rsplit(" ", 1)[1])
        if port:
            break
        if proc.poll() is not None:
            raise EngineStartError(f"capsule-engine ({exe}) exited with {proc.returncode}:\n"
                                   + text[-2000:])
        time.sleep(0.02)
    if not port:
        proc.kill()
        proc.wait()
        raise EngineStartError(f"capsule-engine ({exe}) did not start within {_START_TIMEOUT} s")
    _proc = proc
    st = {"pid": proc.pid, "port": port}
    tmp = sd / "engine.json.tmp"
    tmp.write_text(json.dumps(st))
    os.replace(tmp, sd / "engine.json")
    return st


def ensure_engine() -> str:
    """Starts or reuses the local engine and returns its base URL (``http://127.0.0.1:PORT``).
    Blocking (it may wait for a start); call it from a thread when on an event loop."""
    global _users_fd, _url
    with _lock:
        sd = state_dir()
        sd.mkdir(parents=True, exist_ok=True, mode=0o700)
        lk = os.open(sd / "engine.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lk, fcntl.LOCK_EX)
            st = _read_state(sd)
            if not (st and _alive(st["pid"]) and _healthy(st["port"])):
                st = _start(sd)
            if _users_fd is None:
                fd = os.open(sd / "engine.users", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)
                _users_fd = fd
                atexit.register(release_engine)
            _url = f"http://127.0.0.1:{st['port']}"
            return _url
        finally:
            os.close(lk)


def stop_engine(*, force: bool = False) -> bool:
    """Stops the recorded local engine if no other process uses it (or if ``force``).
    Returns True if an engine was stopped. Waits for it to exit (its grace period)."""
    sd = state_dir()
    if not sd.exists():
        return False
    lk = os.open(sd / "engine.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not force:
            fd = _users_fd if _users_fd is not None else os.open(
                sd / "engine.users", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another process still uses it
            finally:
                if fd != _users_fd:
                    os.close(fd)
        st = _read_state(sd)
        if not st or not _alive(st["pid"]):
            (sd / "engine.json").unlink(missing_ok=True)
            return False
        try:
            os.kill(st["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline:
            if _proc is not None and _proc.pid == st["pid"]:
                if _proc.poll() is not None:
                    break
            elif not _alive(st["pid"]):
                break
            time.sleep(0.02)
        else:
            os.kill(st["pid"], signal.SIGKILL)  # the log recovers it at the next start
        (sd / "engine.json").unlink(missing_ok=True)
        return True
    finally:
        os.close(lk)


def release_engine() -> None:
    """This process stops using the engine (atexit): stops it if it was the last user, unless
    CAPSULE_KEEP_ENGINE=1."""
    global _users_fd, _url
    with _lock:
        if _users_fd is None:
            return
        try:
            if os.environ.get("CAPSULE_KEEP_ENGINE", "") not in ("1", "true", "yes"):
                stop_engine()
        finally:
            os.close(_users_fd)
            _users_fd = None
            _url = None


def engine_status() -> Optional[dict[str, int]]:
    """The recorded engine (pid, port) if it is running and healthy, else None."""
    st = _read_state(state_dir())
    if st and _alive(st["pid"]) and _healthy(st["port"]):
        return st
    return None
