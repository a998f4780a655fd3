"""started.py - the server processes a test script started, killed at exit if still running, so a
failing test never leaves a capsule-engine (and its workers) behind."""
import atexit
import subprocess

_STARTED = []


def popen(*args, **kw):
    proc = subprocess.Popen(*args, **kw)
    _STARTED.append(proc)
    return proc


@atexit.register
def _kill_left_running():
    for p in _STARTED:
        if p.poll() is None:
            p.kill()
            p.wait()
