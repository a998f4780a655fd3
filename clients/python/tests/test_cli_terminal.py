"""The ``capsule`` command line as a user drives it: through pipes, and on a pseudo-terminal
(the REPL: multi-line input, input() from the terminal, Ctrl-C cancelling and keeping the
session, the progress line, Ctrl-D)."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from conftest import Engine, venv_bin

CAPSULE = venv_bin("capsule")


def cli(url: str, *args: str, stdin: str = "", timeout: float = 60,
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CAPSULE_URL=url, **(env_extra or {}))
    return subprocess.run([CAPSULE, *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_pipe_run_code_input_and_errors(engine: Engine, tmp_path: Path) -> None:
    p = cli(engine.url, "-c", "name = input('who? ')\nprint('hi', name)", stdin="ann\n")
    assert p.returncode == 0 and p.stdout == "who? hi ann\n", p
    p = cli(engine.url, "-c", "import sys\nprint('o')\nprint('e', file=sys.stderr)\n1/0")
    assert p.returncode == 1 and p.stdout == "o\n"
    assert "e\n" in p.stderr and "ZeroDivisionError: division by zero" in p.stderr
    f = tmp_path / "prog.py"
    f.write_text("import math\nprint(math.factorial(5))\n")
    assert cli(engine.url, str(f)).stdout == "120\n"
    assert cli(engine.url, "run", str(f)).stdout == "120\n"
    assert cli(engine.url, stdin="print('from stdin')\n").stdout == "from stdin\n"
    p = cli(engine.url, "--timeout", "0.3", "-c", "print('o', flush=True)\nimport time\n"
            "time.sleep(30)")
    assert p.returncode == 124 and p.stdout == "o\n" and "[timeout]" in p.stderr, p
    p = cli(engine.url, "--timeout", "20", "-c", "import time\ntime.sleep(0.2)\nprint('done')")
    assert p.returncode == 0 and p.stdout == "done\n", p
    p = cli(engine.url, "-c", "import threading\nlk = threading.Lock()")
    assert p.returncode == 0 and "capsule: not recorded, lost when the session is restored: " \
        "lk (" in p.stderr, p
    p = cli(engine.url, str(tmp_path / "missing.py"))
    assert p.returncode == 2 and "cannot read" in p.stderr
    p = cli("http://127.0.0.1:1", "-c", "1", env_extra={"CAPSULE_RECONNECT_TIMEOUT": "1"})
    assert p.returncode == 3 and "capsule:" in p.stderr


def test_pipe_named_sessions_show_close(engine: Engine) -> None:
    assert cli(engine.url, "-s", "cli-named-t", "-c", "v = 41").returncode == 0
    p = cli(engine.url, "-s", "cli-named-t", "--id", "cli-show-1", "-c", "print(v + 1)\nv")
    assert p.stdout == "42\n"
    assert "cli-named-t\topen" in cli(engine.url, "sessions").stdout
    p = cli(engine.url, "show", "cli-show-1")
    assert "status ok" in p.stdout and "42" in p.stdout and "41" in p.stdout
    assert "not recorded" not in p.stdout
    cli(engine.url, "-s", "cli-named-t", "--id", "cli-show-2", "-c",
        "import threading\nlk = threading.Lock()")
    p = cli(engine.url, "show", "cli-show-2")
    assert "--- not recorded (lost when the session is restored)\nlk: _thread.lock" in p.stdout, p
    # the same id again: the recorded result, not a second run
    p = cli(engine.url, "-s", "cli-named-t", "--id", "cli-show-1", "-c", "print('again')")
    assert p.stdout == "42\n"
    assert cli(engine.url, "close", "cli-named-t").stdout == "closed cli-named-t\n"
    assert "cli-named-t" not in cli(engine.url, "sessions").stdout
    p = cli(engine.url, "close", "cli-named-t")
    assert p.returncode == 3 and "session_not_found" in p.stderr
    p = cli(engine.url, "show", "no-such-exec")
    assert p.returncode == 3 and "execution_not_found" in p.stderr
    # the REPL on a pipe: multi-line blocks end at a blank line, values are printed
    p = cli(engine.url, "repl", stdin="def f(x):\n    return x * 3\n\nf(5)\n")
    assert "15\n" in p.stdout and p.returncode == 0


class Pty:
    def __init__(self, url: str, *args: str) -> None:
        env = dict(os.environ, CAPSULE_URL=url, TERM="dumb")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(CAPSULE, [CAPSULE, *args], env)
        self.buf = b""

    def expect(self, text: str, timeout: float = 30) -> str:
        end = time.monotonic() + timeout
        while text.encode() not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"did not see {text!r} in {self.buf[-2000:]!r}")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                try:
                    d = os.read(self.fd, 4096)
                except OSError:
                    d = b""
                if not d:
                    raise AssertionError(f"EOF before {text!r}: {self.buf[-2000:]!r}")
                self.buf += d
        i = self.buf.index(text.encode()) + len(text)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen.decode(errors="replace")

    def send(self, s: str) -> None:
        os.write(self.fd, s.encode())

    def wait(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(st)
            try:
                select.select([self.fd], [], [], 0.1)
                os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("capsule did not exit")


def test_pty_repl(engine: Engine) -> None:
    t = Pty(engine.url, "repl", "-s", "pty-1")
    t.expect(">>> ")
    t.send("def sq(x):\n")
    t.expect("... ")
    t.send("    return x * x\n")
    t.expect("... ")
    t.send("\n")
    t.expect(">>> ")
    t.send("sq(12)\n")
    t.expect("144")
    t.expect(">>> ")
    # input() answered from the terminal
    t.send("who = input('name? ')\n")
    t.expect("name? ")
    t.send("zoe\n")
    t.expect(">>> ")
    t.send("who.upper()\n")
    t.expect("'ZOE'")
    t.expect(">>> ")
    # a long execution: the progress line, then Ctrl-C cancels it and the session stays
    t.send("import time; time.sleep(20)\n")
    t.expect("running")
    t.send("\x03")
    t.expect("cancelled")
    t.expect(">>> ")
    t.send("sq(3) + len(who)\n")
    t.expect("12")
    t.expect(">>> ")
    t.send("\x04")
    assert t.wait() == 0
    # -c on a terminal: the prompt and the answer on the terminal, the exit status
    t = Pty(engine.url, "-c", "x = input('x? ')\nprint('x is', x)\nraise ValueError(x)")
    t.expect("x? ")
    t.send("7\n")
    t.expect("x is 7")
    t.expect("ValueError: 7")
    assert t.wait() == 1
