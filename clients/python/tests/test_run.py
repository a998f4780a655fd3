"""``capsule run`` (issue 9) end to end against a real capsule-engine: the seed's hello.py, a file
with input(), a failing run, a missing task, a run resumed by id after the engine was killed -9
in the middle (finished steps are not run again), and the `capsule` module outside a session."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from capsule import NotFoundError
from conftest import Engine, venv_bin

CAPSULE = venv_bin("capsule")

HELLO = '''from capsule import task

@task(name="main", compute="LOW", ram="64MB")
def main() -> str:
    return "Hello from Capsule!"
'''


def run(url: str, *args: str, stdin: str = "", cwd: Path | None = None,
        timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CAPSULE_URL=url)
    return subprocess.run([CAPSULE, "run", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def test_run_seed_hello(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "hello.py").write_text(HELLO)
    p = run(engine.url, "hello.py", cwd=tmp_path)
    assert p.returncode == 0, p
    assert p.stdout == "Hello from Capsule!\n"
    assert p.stderr.startswith("capsule: run r-"), p.stderr
    # the same file under plain Python: the decorator imports and the function is callable
    q = subprocess.run([sys.executable, "-c", "import runpy; "
                        "print(runpy.run_path('hello.py')['main']())"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert q.returncode == 0 and q.stdout == "Hello from Capsule!\n", q


def test_run_imports_only_the_standard_library(engine: Engine, tmp_path: Path) -> None:
    """`capsule run` (and `capsule -c`) is a short process: it runs over a socket, without
    asyncio, httpx or websockets (whose imports took longer than the run)."""
    (tmp_path / "hello.py").write_text(HELLO)
    code = ("import sys\nfrom capsule.cli import main\nst = main(['run', 'hello.py'])\n"
            "print(st, sorted(m for m in ('asyncio', 'httpx', 'websockets') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, CAPSULE_URL=engine.url), timeout=60)
    assert p.returncode == 0, p
    assert p.stdout == "Hello from Capsule!\n0 []\n", p
    code = code.replace("['run', 'hello.py']", "['-c', 'print(6 * 7)']")  # `capsule -c` too
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, CAPSULE_URL=engine.url), timeout=60)
    assert p.returncode == 0 and p.stdout == "42\n0 []\n", p


def test_run_result_states_match_the_client() -> None:
    """capsule._rest (the run's client, without dataclasses) knows the same finished states."""
    from capsule import _rest, types

    assert _rest.FINISHED == types.FINISHED


def test_run_input_args_steps_and_errors(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "ask.py").write_text('''import sys
from capsule import task

@task
def greet(name):
    return "hi " + name

@task(name="main", max_retries=1)
def main():
    name = input("name? ")
    print("args:", sys.argv[1:])
    return {"greeting": greet(name)}
''')
    p = run(engine.url, "--id", "ask-1", "ask.py", "a", "b", stdin="bob\n", cwd=tmp_path)
    assert p.returncode == 0, p
    assert p.stdout == "name? args: ['a', 'b']\n{'greeting': 'hi bob'}\n"
    # the same id again: the recorded result, nothing runs (no prompt)
    p = run(engine.url, "--id", "ask-1", "ask.py", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.endswith("{'greeting': 'hi bob'}\n"), p
    assert "finished before" in p.stderr
    # a failing run: exit 1 with the traceback; a file without the task: a clear error
    (tmp_path / "bad.py").write_text("from capsule import task\n@task(name='main')\n"
                                     "def main():\n    raise ValueError('broken')\n")
    p = run(engine.url, "bad.py", cwd=tmp_path)
    assert p.returncode == 1 and "ValueError: broken" in p.stderr, p
    (tmp_path / "none.py").write_text("from capsule import task\n@task\ndef other(): pass\n")
    p = run(engine.url, "none.py", cwd=tmp_path)
    assert p.returncode == 1 and "no task named 'main' in none.py (its tasks: other)" in p.stderr
    p = run(engine.url, "--task", "other", "none.py", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout == "", p
    p = run(engine.url, "--resume", "no-such-run")
    assert p.returncode == 3 and "no run no-such-run" in p.stderr
    p = run(engine.url, "missing.py", cwd=tmp_path)
    assert p.returncode == 2 and "cannot read missing.py" in p.stderr


def test_run_resume_after_kill9(fresh_engine: Engine, tmp_path: Path) -> None:
    log, gate = tmp_path / "steps.txt", tmp_path / "gate"
    (tmp_path / "wf.py").write_text(f'''import os, time
from capsule import task

def note(s):
    with open({str(log)!r}, "a") as f:
        f.write(s + "\\n")

@task
def fetch():
    note("fetch")
    return 20

@task
def compute(x):
    note("compute")
    return x * 2

@task
def publish(x):
    note("publish-start")
    while not os.path.exists({str(gate)!r}):
        time.sleep(0.05)
    note("publish")
    return f"published {{x}}"

@task(name="main")
def main():
    return publish(compute(fetch()) + 2)
''')
    env = dict(os.environ, CAPSULE_URL=fresh_engine.url)
    proc = subprocess.Popen([CAPSULE, "run", "--id", "wf-1", "wf.py"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "publish-start" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    fresh_engine.kill9()
    proc.kill()
    proc.wait()
    fresh_engine.start()
    gate.write_text("open")
    p = run(fresh_engine.url, "--resume", "wf-1")
    assert p.returncode == 0, p
    assert p.stdout == "published 42\n"
    lines = log.read_text().splitlines()
    assert lines.count("fetch") == 1 and lines.count("compute") == 1, lines
    assert lines.count("publish") == 1 and lines.count("publish-start") == 2, lines


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CAPSULE, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CAPSULE_URL=url))


def test_external_promise_and_tasks(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "approve.py").write_text('''import capsule
from capsule import task

@task
def prepare():
    return "draft"

@task(name="main")
def main():
    doc = prepare()
    v = capsule.promise("approval-7").wait()
    return f"{doc} approved by {v['by']}"
''')
    env = dict(os.environ, CAPSULE_URL=engine.url)
    proc = subprocess.Popen([CAPSULE, "run", "--id", "appr-1", "approve.py"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # 3 (no such promise) until the run waits on it
        p = cli(engine.url, "promise", "resolve", "approval-7", '{"by": "ann"}')
        if p.returncode == 0:
            break
        assert p.returncode == 3 and "no promise approval-7" in p.stderr, p
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    assert p.stdout == "resolved\n"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "draft approved by ann\n", (out, err)
    # settled already: rejecting changes nothing (exit 1, its state printed)
    p = cli(engine.url, "promise", "reject", "approval-7", "late")
    assert p.returncode == 1 and p.stdout == "resolved\n", p
    p = cli(engine.url, "tasks", "appr-1", "--json")
    assert p.returncode == 0, p
    tasks = json.loads(p.stdout)["tasks"]
    assert [(t["path"], t["name"], t["state"], t["attempts"]) for t in tasks] == [
        ("1", "main", "completed", 1), ("1.1", "prepare", "completed", 1)], tasks
    p = cli(engine.url, "tasks", "appr-1")
    assert p.returncode == 0 and "prepare" in p.stdout and "completed" in p.stdout, p
    p = cli(engine.url, "tasks", "no-such-run")
    assert p.returncode == 3, p


async def _session_api(url: str) -> None:
    from capsule import Session

    async with Session(url) as s:
        await s.submit("import capsule\ncapsule.promise('api-1').wait()", execution_id="api-x")
        for _ in range(200):
            try:
                assert await s.reject_promise("api-1", {"why": "no"}) == "rejected"
                break
            except NotFoundError:
                await asyncio.sleep(0.05)
        r = await s.wait("api-x", raise_on_error=False)
        assert r.status == "error" and r.error["type"] == "PromiseRejected", r
        assert "{'why': 'no'}" in r.error["message"]
        assert await s.resolve_promise("api-1", 1) == "rejected"


def test_session_promise_api(engine: Engine) -> None:
    asyncio.run(_session_api(engine.url))
