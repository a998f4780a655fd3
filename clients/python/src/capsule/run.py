"""``capsule run FILE [ARGS...]``: run a file's ``main`` task durably (issue 9).

The run is one execution ``<run id>`` in a fresh session ``run-<run id>``: the file's source,
then a last line that sets ``sys.argv`` and calls the task named ``main`` (``--task NAME``) unless
the file already called it at its top level. Inside the session ``capsule`` is the worker's task
module, so every task call in the run is a durable step. Output is streamed, ``input()`` is
answered from the terminal, the result is printed (a string as is, anything else as its repr);
exit status 0 on success, 1 when the run raised, 3 when the engine could not be used.

The run id is printed on stderr first. ``capsule run --resume ID`` (or ``capsule run FILE --id
ID``) attaches to that run: a finished run gives its recorded result; a run interrupted by an
engine crash is re-run by the engine on restart, and its finished steps return their recorded
values instead of running again. The session is closed once the run has finished.
"""

import argparse
import json
import os
import sys
from typing import Any, Optional

from .errors import CapsuleConnectionError, NotFoundError


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capsule run",
        description="Run a Python file's main task as a durable workflow (or -c CODE).")
    p.add_argument("--url", default=None, help="server URL (default CAPSULE_URL, else the "
                   "embedded engine)")
    p.add_argument("--token", default=None, help="bearer token (default CAPSULE_TOKEN)")
    p.add_argument("--task", default="main", metavar="NAME", help="the task to call (main)")
    p.add_argument("--id", default=None, metavar="ID",
                   help="the run id (a known id resumes that run)")
    p.add_argument("--resume", default=None, metavar="ID", help="resume (or show) run ID")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("file", nargs="?", help="the Python file")
    p.add_argument("args", nargs="*", help="arguments (sys.argv[1:] of the run)")
    return p


def run_source(source: str, file: str, task: str, args: list[str]) -> str:
    """The execution's code: the file, then the call of its task (the last expression, so the
    result's value is the task's)."""
    if not source.endswith("\n"):
        source += "\n"
    argv = json.dumps([file] + list(args))
    return source + f"__import__('capsule')._run_main(globals(), {task!r}, {argv})\n"


def _print_result(value: object, repr_: Optional[str]) -> None:
    if isinstance(value, str):
        print(value)
    elif repr_ is not None and repr_ != "None":
        print(repr_)
    sys.stdout.flush()


def cmd_run(a: argparse.Namespace) -> int:
    """The run, synchronously over plain HTTP (capsule._rest: no asyncio, httpx or websockets,
    whose imports took longer than a short run)."""
    from ._rest import Rest, Result, resolve_url_sync, stream_run

    rid = a.resume or a.id or "r-" + os.urandom(8).hex()
    rest = Rest(resolve_url_sync(a.url), a.token or os.environ.get("CAPSULE_TOKEN") or None,
                float(os.environ.get("CAPSULE_RECONNECT_TIMEOUT", "30")))
    known = None
    if a.resume or a.id:
        try:
            known = Result(rest.call("GET", f"/executions/{rid}"))
        except NotFoundError:
            if a.resume:
                sys.stderr.write(f"capsule: no run {rid}\n")
                return 3
    if known is not None and known.finished:  # its record: output, then result or error
        sys.stderr.write(f"capsule: run {rid} finished before: its recorded result\n")
        sys.stdout.write(known.output)
        if known.ok:
            _print_result(known.value, known.repr)
            return 0
        err = known.error or {}
        sys.stderr.write(err.get("traceback") or f"{err.get('type')}: {err.get('message')}\n")
        return 1
    if known is not None:
        code = "pass"  # a known id: the engine attaches to the run (its code is recorded)
    else:
        try:
            with open(a.file, encoding="utf-8") as f:
                source = f.read()
        except OSError as e:
            sys.stderr.write(f"capsule run: cannot read {a.file}: {e.strerror}\n")
            return 2
        code = run_source(source, a.file, a.task, a.args)
    sys.stderr.write(f"capsule: run {rid} (resume: capsule run --resume {rid})\n")
    sys.stderr.flush()
    sid = f"run-{rid}"
    rest.call("POST", "/sessions", {"id": sid})
    finished = False
    try:
        status, r = stream_run(rest, sid, code, rid, progress=not a.no_progress)
        finished = r is not None and r.finished
        if r is not None and r.ok:
            _print_result(r.value, r.repr)
        return status
    finally:
        if finished:
            try:
                rest.call("DELETE", f"/sessions/{sid}", retry=False)
            except (NotFoundError, CapsuleConnectionError):
                pass


def main_run(rest: list[str]) -> int:
    p = run_parser()
    a, extra = p.parse_known_args(rest)  # options the run does not know are the file's
    a.args += extra
    if not a.resume and not a.file:
        p.error("capsule run needs FILE (or --resume ID, or -c CODE)")
    if a.resume and a.file:
        p.error("give either --resume ID or FILE")
    return cmd_run(a)


async def _with_api(a: argparse.Namespace, method: str, path: str,
                    body: Optional[dict] = None) -> Any:
    from .session import _Api, resolve_url

    api = _Api(await resolve_url(a.url), a.token, 10.0)
    try:
        return await api.call(method, path, body)
    finally:
        await api.close()


async def cmd_tasks(a: argparse.Namespace) -> int:
    d = await _with_api(a, "GET", f"/executions/{a.eid}/tasks")
    if a.json:
        print(json.dumps(d))
        return 0
    print(f"{'path':<10}{'name':<24}{'kind':<7}{'state':<11}{'attempts':>8}{'ms':>9}")
    for t in d["tasks"]:
        ms = t["settled_at"] - t["created_at"] if "settled_at" in t else None
        print(f"{t['path']:<10}{t['name'][:23]:<24}{t['kind']:<7}{t['state']:<11}"
              f"{t['attempts']:>8}{'' if ms is None else ms:>9}")
    return 0


async def cmd_promise(a: argparse.Namespace) -> int:
    value = None
    if a.value is not None:
        try:
            value = json.loads(a.value)
        except ValueError:
            value = a.value  # not JSON: the text itself
    try:
        d = await _with_api(a, "POST", f"/promises/{a.id}/{a.action}", {"value": value})
    except NotFoundError:
        sys.stderr.write(f"capsule: no promise {a.id} (it exists once an execution waits on "
                         "it)\n")
        return 3
    print(d["state"])
    return 0 if d["state"] == ("resolved" if a.action == "resolve" else "rejected") else 1


def main_tasks(rest: list[str]) -> int:
    p = argparse.ArgumentParser(prog="capsule tasks",
                                description="the durable steps of an execution (a run id)")
    p.add_argument("--url", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("eid")
    return _arun(cmd_tasks(p.parse_args(rest)))


def main_promise(rest: list[str]) -> int:
    p = argparse.ArgumentParser(prog="capsule promise",
                                description="settle an external promise that executions wait on "
                                            "(capsule.promise(ID).wait()); exit 1 if it was "
                                            "settled the other way before")
    p.add_argument("--url", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("action", choices=["resolve", "reject"])
    p.add_argument("id")
    p.add_argument("value", nargs="?", help="its value: JSON, else the text as a string")
    return _arun(cmd_promise(p.parse_args(rest)))


def _arun(coro: Any) -> int:
    import asyncio

    return int(asyncio.run(coro))
