"""capsule.cli - the ``capsule`` command line.

    capsule [-s NAME] -c CODE         run CODE (output streamed, input() answered from the terminal)
    capsule [-s NAME] FILE            run a file ('-' or a piped stdin: the code from stdin)
    capsule [-s NAME]                 the interactive REPL (on a terminal)
    capsule run [-s NAME] FILE|-c CODE  the same as the two above (later: @task workflows)
    capsule repl [-s NAME]            the REPL
    capsule sessions [--json]         your open sessions
    capsule close NAME...             close sessions
    capsule show EID [--json]         an execution: status, output, value or error
    capsule engine status|stop        the embedded local engine

Common options: --url (default CAPSULE_URL, else the embedded local engine), --token (default
CAPSULE_TOKEN), -s/--session NAME (a named session: created or attached, kept after the run;
without it a fresh session is made and closed at the end), --id EID (idempotent execution id),
--no-progress.

Invariants:
  - stdout carries only the code's stdout; the code's stderr, errors, the REPL's notes and the
    progress line go to stderr. The progress line is shown only when stderr is a terminal, and
    is erased before any output is written.
  - Ctrl-C while code runs cancels that execution and keeps the session (the REPL goes on);
    at the REPL prompt it discards the line being typed; Ctrl-D leaves.
  - exit status: 0 ok, 1 the code raised, 2 usage, 3 server unreachable or refused, 124
    timed out (--timeout, or the session's), 130 cancelled.
"""

from __future__ import annotations

import argparse
import ast
import codeop
import getpass
import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, TextIO

from . import __version__
from .errors import (
    APIError,
    CapsuleConnectionError,
    CapsuleError,
    ExecutionError,
    NotFoundError,
)

if TYPE_CHECKING:  # imported where used: `capsule run` needs neither (capsule._rest)
    import asyncio

    from ._rest import Result
    from .session import Session, _Api
    from .types import ExecutionResult

COMMANDS = {"run", "repl", "sessions", "close", "show", "engine", "tasks", "promise"}
SPIN = "|/-\\"


class _Progress:
    """The "running" line on stderr while no output arrives (terminals only), from a thread."""

    def __init__(self, enabled: bool, err: TextIO) -> None:
        self.enabled = enabled
        self.err = err
        self.lock = threading.Lock()
        self.t0 = self.last = time.monotonic()
        self.shown = self.paused = False
        self.done = threading.Event()

    def start(self) -> None:
        if self.enabled:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        i = 0
        while not self.done.wait(0.2):
            with self.lock:
                if self.paused or time.monotonic() - self.last < 1.0:
                    continue
                i += 1
                self.err.write(f"\r{SPIN[i % 4]} running {time.monotonic() - self.t0:.1f} s "
                               f"(Ctrl-C cancels)\x1b[K")
                self.err.flush()
                self.shown = True

    def clear(self) -> None:
        with self.lock:
            self.last = time.monotonic()
            if self.shown:
                self.err.write("\r\x1b[K")
                self.err.flush()
                self.shown = False

    def stop(self) -> None:
        self.done.set()
        self.clear()


def _read_reply(prompt: str, password: bool) -> Optional[str]:
    """One line from the terminal (or stdin) for an input() of the code; None at EOF.
    Runs on the main thread so that Ctrl-C raises KeyboardInterrupt here."""
    if password and sys.stdin.isatty():
        return getpass.getpass(prompt)
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        return None
    return line[:-1] if line.endswith("\n") else line


async def run_code(session: Session, code: str, *, execution_id: Optional[str] = None,
                   show_value: bool = False, progress: bool = True) -> int:
    """Runs code in the session with streamed output; returns the exit status."""
    import asyncio

    from .session import new_id

    loop = asyncio.get_running_loop()
    eid = execution_id or new_id()
    state: dict[str, Any] = {"eid": eid, "cancels": 0}
    prog = _Progress(progress and sys.stderr.isatty(), sys.stderr)

    def on_sigint() -> None:
        state["cancels"] += 1
        prog.clear()
        sys.stderr.write("\nKeyboardInterrupt: cancelling\n" if state["cancels"] == 1 else
                         "\n(still cancelling)\n")
        sys.stderr.flush()
        if state["eid"]:
            loop.create_task(session.cancel(state["eid"]))

    main_thread = True
    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (RuntimeError, ValueError):
        main_thread = False
    prog.start()
    status = 0
    try:
        async for msg in session.stream_execute(code, execution_id=eid):
            if msg.type == "output":
                prog.clear()
                out = sys.stderr if msg.stream == "stderr" else sys.stdout
                out.write(msg.data)
                out.flush()
            elif msg.type == "input":
                prog.clear()
                prog.paused = True
                sys.stderr.flush()
                if main_thread:
                    loop.remove_signal_handler(signal.SIGINT)
                try:
                    text = _read_reply(msg.prompt, msg.password)
                except KeyboardInterrupt:
                    sys.stderr.write("\nKeyboardInterrupt: cancelling\n")
                    state["cancels"] += 1
                    await session.cancel(msg.id)
                    text = None
                finally:
                    if main_thread:
                        loop.add_signal_handler(signal.SIGINT, on_sigint)
                    prog.paused = False
                    prog.last = time.monotonic()
                if not state["cancels"]:
                    try:
                        await session.respond_input(msg.id, text, eof=text is None)
                    except APIError:
                        pass  # cancelled meanwhile
            elif msg.type == "restarted":
                prog.clear()
                sys.stderr.write("[capsule: the server restarted; the execution is re-run, "
                                 "output continues]\n")
            elif msg.type in ("result", "error"):
                prog.clear()
                if msg.result is not None:
                    status = _finish(msg.result, show_value)
                else:
                    err = msg.error or {}
                    sys.stderr.write(f"{err.get('type')}: {err.get('message', '')}\n")
                    status = 1
    finally:
        prog.stop()
        if main_thread:
            loop.remove_signal_handler(signal.SIGINT)
    sys.stdout.flush()
    return status


def _names_note(what: str, d: dict[str, str]) -> None:
    sys.stderr.write(f"capsule: {what}: " + "; ".join(f"{k} ({v})" for k, v in sorted(d.items()))
                     + "\n")


def _finish(r: ExecutionResult | Result, show_value: bool) -> int:
    """Prints the end of an execution like the CLI; returns the exit status."""
    if r.not_recorded:
        _names_note("not recorded, lost when the session is restored", r.not_recorded)
    if r.restore_failed:
        _names_note("the session was restored from the log without", r.restore_failed)
    if r.ok:
        if show_value and r.repr is not None and r.repr != "None":
            sys.stdout.write(r.repr + "\n")
            sys.stdout.flush()
        return 0
    if r.status == "cancelled":
        sys.stderr.write("KeyboardInterrupt (execution cancelled; the session is kept)\n")
        return 130
    err = r.error or {"type": r.status}
    tb = err.get("traceback") or f"{err.get('type')}: {err.get('message', '')}\n"
    if r.status not in ("error",):
        tb = f"[{r.status}] " + tb
    sys.stderr.write(tb if tb.endswith("\n") else tb + "\n")
    return 124 if r.status == "timeout" else 1  # as timeout(1)


def _retry() -> float:
    return float(os.environ.get("CAPSULE_RECONNECT_TIMEOUT", "10"))


def _token(args: argparse.Namespace) -> Optional[str]:
    return args.token or os.environ.get("CAPSULE_TOKEN") or None


def _session(args: argparse.Namespace) -> Session:
    from .session import Session

    return Session(args.url, token=args.token, session_id=args.session,
                   keep=True if args.session else False)


def _cmd_exec(args: argparse.Namespace, code: str) -> int:
    """``capsule -c CODE | FILE``: synchronous over plain HTTP (capsule._rest), like ``capsule
    run``; a fresh session is closed afterwards, a named one (-s) is kept."""
    from ._rest import Rest, new_id, prepare_code, resolve_url_sync, stream_run, timeout_ms

    rest = Rest(resolve_url_sync(args.url), _token(args),
                float(os.environ.get("CAPSULE_RECONNECT_TIMEOUT", "30")))
    sid = args.session or new_id("s")
    rest.call("POST", "/sessions", {"id": sid})
    try:
        status, _ = stream_run(rest, sid, prepare_code(code), args.id or new_id(),
                               progress=not args.no_progress,
                               timeout_ms=timeout_ms(args.timeout))
        return status
    finally:
        if not args.session:
            try:
                rest.call("DELETE", f"/sessions/{sid}", retry=False)
            except (NotFoundError, CapsuleConnectionError):
                pass


class _Repl:
    """The interactive loop: lines are read synchronously (readline: editing and history),
    each complete statement runs on the event loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.compiler = codeop.CommandCompiler()
        self.compiler.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.history: Optional[str] = None

    def _complete(self, src: str) -> bool:
        try:
            return self.compiler(src, "<capsule>", "single") is not None
        except (SyntaxError, ValueError, OverflowError):
            return True  # the server reports it

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:
            return
        from ._embedded import state_dir

        d = state_dir()
        try:
            d.mkdir(parents=True, exist_ok=True)
            self.history = str(d / "history")
            readline.read_history_file(self.history)
        except OSError:
            pass
        readline.set_history_length(2000)

    def _save_history(self) -> None:
        if self.history:
            try:
                import readline

                readline.write_history_file(self.history)
            except (ImportError, OSError):
                pass

    def run(self) -> int:
        tty = sys.stdin.isatty()
        if tty:
            self._setup_readline()
        import asyncio

        loop = asyncio.new_event_loop()
        session = _session(self.args)
        try:
            loop.run_until_complete(session.start())
        except CapsuleError as e:
            sys.stderr.write(f"capsule: {e}\n")
            loop.close()
            return 3
        sys.stderr.write(f"capsule {__version__}: session {session.id} on {session.url}"
                         f"{' (kept)' if session.keep else ''}. Ctrl-C cancels, Ctrl-D quits.\n")
        status = 0
        try:
            buf: list[str] = []
            while True:
                try:
                    line = input("... " if buf else ">>> ") if tty else self._readline(buf)
                except EOFError:
                    if tty:
                        sys.stderr.write("\n")
                    break
                except KeyboardInterrupt:
                    sys.stderr.write("\nKeyboardInterrupt\n")
                    buf = []
                    continue
                buf.append(line)
                src = "\n".join(buf)
                if not src.strip():
                    buf = []
                    continue
                if not self._complete(src):
                    continue
                buf = []
                try:
                    status = loop.run_until_complete(run_code(
                        session, src, show_value=True, progress=not self.args.no_progress))
                except CapsuleConnectionError as e:
                    sys.stderr.write(f"capsule: {e}\n")
                    status = 3
                except APIError as e:
                    sys.stderr.write(f"capsule: {e}\n")
                    status = 3
        finally:
            self._save_history()
            try:
                loop.run_until_complete(session.close())
            except CapsuleError:
                pass
            loop.close()
        return 0 if status in (0, 1, 130) else status

    @staticmethod
    def _readline(buf: list[str]) -> str:
        sys.stdout.write("... " if buf else ">>> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")


def _arun(coro: Any) -> int:
    import asyncio

    return int(asyncio.run(coro))


async def _api(args: argparse.Namespace) -> _Api:
    from .session import _Api, resolve_url

    return _Api(await resolve_url(args.url), _token(args), _retry())


async def _cmd_sessions(args: argparse.Namespace) -> int:
    api = await _api(args)
    try:
        d = await api.call("GET", "/sessions")
    finally:
        await api.close()
    if args.json:
        print(json.dumps(d))
    else:
        for s in d.get("sessions", []):
            print(f"{s['id']}\t{s.get('state', '')}")
    return 0


async def _cmd_close(args: argparse.Namespace) -> int:
    api = await _api(args)
    status = 0
    try:
        for sid in args.names:
            try:
                await api.call("DELETE", f"/sessions/{sid}")
                print(f"closed {sid}")
            except APIError as e:
                sys.stderr.write(f"capsule: {sid}: {e}\n")
                status = 3
    finally:
        await api.close()
    return status


async def _cmd_show(args: argparse.Namespace) -> int:
    api = await _api(args)
    try:
        d = await api.call("GET", f"/executions/{args.eid}")
    finally:
        await api.close()
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"execution {d.get('id')}  session {d.get('session', '?')}  status {d.get('status')}"
          + ("  (restarted)" if d.get("restarted") else ""))
    if d.get("input_request"):
        print(f"waiting for input: {d['input_request'].get('prompt', '')!r}")
    out = d.get("output") or ""
    if out:
        print("--- output" + (" (truncated)" if d.get("truncated") else ""))
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    if d.get("error"):
        print("--- error")
        e = d["error"]
        sys.stdout.write(e.get("traceback") or f"{e.get('type')}: {e.get('message')}\n")
    elif d.get("repr") is not None:
        print("--- value")
        print(d["repr"])
    from ._rest import names

    for key, title in (("not_recorded", "not recorded (lost when the session is restored)"),
                       ("restore_failed", "not restored (the session was restored without)")):
        if names(d.get(key)):
            print(f"--- {title}")
            for k, v in sorted(names(d.get(key)).items()):
                print(f"{k}: {v}")
    return 0


def _cmd_engine(args: argparse.Namespace) -> int:
    from ._embedded import engine_status, state_dir, stop_engine

    if args.action == "status":
        st = engine_status()
        if st:
            print(f"running: pid {st['pid']}, http://127.0.0.1:{st['port']}, "
                  f"state {state_dir()}")
            return 0
        print(f"not running (state {state_dir()})")
        return 1
    stopped = stop_engine(force=True)
    print("stopped" if stopped else "not running")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server URL (default CAPSULE_URL, else the "
                   "embedded local engine)")
    p.add_argument("--token", default=None, help="bearer token (default CAPSULE_TOKEN)")
    p.add_argument("-s", "--session", default=None, metavar="NAME",
                   help="a named session (created or attached; kept afterwards; once closed, "
                   "its name is not used again)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def _exec_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Run Python in a durable capsule session.",
        epilog="other commands: capsule run | repl | sessions | close | show | engine "
               "(capsule COMMAND --help)")
    _common(p)
    p.add_argument("-c", dest="code", metavar="CODE", help="the code to run")
    p.add_argument("--id", default=None, metavar="EID",
                   help="execution id (idempotent: a known id returns its recorded result)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the code after this long (exit status 124)")
    p.add_argument("file", nargs="?", help="a Python file ('-': stdin)")
    p.add_argument("--version", action="version", version=f"capsule {__version__}")
    return p


def _load_code(args: argparse.Namespace, p: argparse.ArgumentParser) -> Optional[str]:
    if args.code is not None and args.file:
        p.error("give either -c CODE or FILE, not both")
    if args.code is not None:
        return str(args.code)
    if args.file == "-":
        return sys.stdin.read()
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            p.error(f"cannot read {args.file}: {e.strerror}")
    return None


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    # a leading option that takes a value (e.g. -s NAME) is not the command
    i = argv.index(cmd) if cmd is not None else -1
    if cmd is not None and i > 0 and argv[i - 1] in ("-s", "--session", "--url", "--token",
                                                      "-c", "--id"):
        cmd = None
    try:
        if cmd in COMMANDS:
            rest = argv[:i] + argv[i + 1:]
            return _dispatch(str(cmd), rest)
        p = _exec_parser("capsule")
        args = p.parse_args(argv)
        code = _load_code(args, p)
        if code is None and not sys.stdin.isatty():
            code = sys.stdin.read()
        if code is None:
            return _Repl(args).run()
        return _cmd_exec(args, code)
    except ExecutionError as e:  # a failing warm-up, for instance
        sys.stderr.write(e.traceback or f"{e}\n")
        return 1
    except CapsuleError as e:
        sys.stderr.write(f"capsule: {e}\n")
        return 3
    except KeyboardInterrupt:
        sys.stderr.write("KeyboardInterrupt\n")
        return 130


def _dispatch(cmd: str, rest: list[str]) -> int:
    if cmd == "run" and "-c" not in rest:  # a file's main task (capsule/run.py)
        from .run import main_run

        return main_run(rest)
    if cmd in ("tasks", "promise"):  # durable steps, external promises (capsule/run.py)
        from .run import main_promise, main_tasks

        return main_tasks(rest) if cmd == "tasks" else main_promise(rest)
    if cmd == "run":
        p = _exec_parser("capsule run")
        args = p.parse_args(rest)
        code = _load_code(args, p)
        if code is None:
            p.error("capsule run needs FILE or -c CODE")
        return _cmd_exec(args, str(code))
    if cmd == "repl":
        p = argparse.ArgumentParser(prog="capsule repl", description="interactive session")
        _common(p)
        return _Repl(p.parse_args(rest)).run()
    p = argparse.ArgumentParser(prog=f"capsule {cmd}")
    p.add_argument("--url", default=None)
    p.add_argument("--token", default=None)
    if cmd == "sessions":
        p.add_argument("--json", action="store_true")
        return _arun(_cmd_sessions(p.parse_args(rest)))
    if cmd == "close":
        p.add_argument("names", nargs="+", metavar="NAME")
        return _arun(_cmd_close(p.parse_args(rest)))
    if cmd == "show":
        p.add_argument("eid")
        p.add_argument("--json", action="store_true")
        return _arun(_cmd_show(p.parse_args(rest)))
    p.add_argument("action", choices=["status", "stop"])
    return _cmd_engine(p.parse_args(rest))


if __name__ == "__main__":
    sys.exit(main())
