"""_capsule_rt - the Python half of the capsule worker (embedded in capsule-pyworker).

The C worker (pyworker/worker/) owns the protocol, the threads and the file descriptors; this
module owns what is easier in Python: compiling a cell (top-level await, the last expression's
value, `;` suppression), running it plainly or on the session's persistent asyncio loop, the
stdout/stderr/stdin replacements, tracebacks that show the cell's source, and the calls into the
namespace module `_capsule_ns`.

Invariants:
  - every function here runs on the worker's main (execution) thread with the GIL;
  - run_cell never raises: every outcome is a result tuple (see run_cell);
  - names the worker injects into __main__ (the list INJECTED) never reach a delta: the helper
    name used to capture the last expression is removed before the namespace is diffed.
"""

import ast
import builtins
import io
import json
import linecache
import os
import signal
import sys
import time
import traceback

import _capsule

INJECTED = ("__builtins__", "__name__", "__doc__", "__package__", "__loader__", "__spec__",
            "__annotations__")
_LAST = "__capsule_last__"
_RT_FILE = __file__ if "__file__" in globals() else "<capsule-rt>"

_main = None          # the __main__ globals dict (persistent namespace)
_loop = None          # the session's persistent asyncio loop
_async_task = None    # the running async cell's task (for cancel)
_cancel_sent = [False]
_ns = None            # _capsule_ns.Namespace, or None
_ns_error = None      # why there is no namespace module
_limits = {}


class _Out(io.TextIOBase):
    """sys.stdout / sys.stderr: every write goes out at once as a STREAM frame."""

    def __init__(self, n):
        self._n = n
        self.buffer = _OutBuffer(n)

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        if s:
            _capsule.write(self._n, s)
        return len(s)

    def writable(self):
        return True

    def flush(self):
        _capsule.flush()  # a pending partial line goes out now

    def isatty(self):
        return False

    def fileno(self):
        return self._n

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "strict"

    @property
    def name(self):
        return "<stdout>" if self._n == 1 else "<stderr>"


class _OutBuffer(io.RawIOBase):
    def __init__(self, n):
        self._n = n

    def write(self, b):
        b = bytes(b)
        if b:
            _capsule.write(self._n, b)
        return len(b)

    def writable(self):
        return True

    def fileno(self):
        return self._n


class _In(io.TextIOBase):
    """sys.stdin: each line read is an input request to the engine ('' at EOF)."""

    def readable(self):
        return True

    def readline(self, size=-1):
        r = _capsule.input("", False)
        return "" if r is None else r + "\n"

    def read(self, size=-1):
        parts = []
        while True:
            line = self.readline()
            if not line:
                return "".join(parts)
            parts.append(line)

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def isatty(self):
        return False

    def fileno(self):
        return 0

    @property
    def encoding(self):
        return "utf-8"


def _input(prompt="", _password=False):
    r = _capsule.input(str(prompt), bool(_password))
    if r is None:
        raise EOFError("EOF when reading a line")
    return r


def _getpass(prompt="Password: ", stream=None):
    return _input(prompt, True)


def _exit(code=None):
    raise SystemExit(code)


class _Helper:
    """help(), as the site module would install it (the worker does not import site)."""

    def __repr__(self):
        return "Type help() for interactive help, or help(object) for help about object."

    def __call__(self, *args, **kwds):
        import pydoc
        return pydoc.help(*args, **kwds)


def _on_sigint(signum, frame):
    # The C side trips SIGINT only to interrupt a cell, once per cancel; a stale or second
    # signal (the interrupt was already delivered, e.g. to a waiting input()) is ignored.
    if not _capsule.take_interrupt():
        return
    task = _async_task
    if task is not None and not task.done() and not _cancel_sent[0]:
        # An async cell: cancel its task (as asyncio.Runner does on SIGINT) rather than raise
        # KeyboardInterrupt at an arbitrary point of the event loop's own code, and wake the
        # loop (select() is retried after EINTR). If the task does not finish, the worker
        # delivers the interrupt again and it is raised then.
        _cancel_sent[0] = True
        task.cancel()
        _loop.call_soon_threadsafe(_noop)
        return
    raise KeyboardInterrupt


def init(main_dict, limits, preload):
    """Called once by the C worker after Py_Initialize (in a zygote: before gc.freeze).
    preload: import asyncio now (a zygote, whose children inherit it) rather than at the first
    async cell (a cold worker, which starts faster). The event loop itself is always created in
    the worker on first use: an epoll instance made before fork would be shared by every child."""
    global _main, _ns, _ns_error, _limits
    _main = main_dict
    _limits = dict(limits)
    sys.stdout = sys.__stdout__ = _Out(1)
    sys.stderr = sys.__stderr__ = _Out(2)
    sys.stdin = sys.__stdin__ = _In()
    builtins.input = _input
    builtins.exit = builtins.quit = _exit  # raises SystemExit: reported, the session goes on
    builtins.help = _Helper()
    try:
        import getpass
        getpass.getpass = _getpass
    except ImportError:
        pass
    signal.signal(signal.SIGINT, _on_sigint)
    os.register_at_fork(after_in_child=_capsule.forked_child)
    if preload:
        import asyncio  # noqa: F401
    try:
        import _capsule_ns
        _ns = _capsule_ns.Namespace(_main, _capsule.hash64, same_items=_capsule.same_items)
    except Exception as e:  # the namespace module is optional until it lands
        _ns = None
        _ns_error = "namespace module unavailable: %s: %s" % (type(e).__name__, e)


def set_limits(limits):
    global _limits, TEXT_LIMIT
    _limits = dict(limits)
    if _limits.get("maxframe"):
        # a result carries up to four such texts of up to 4 bytes per character
        TEXT_LIMIT = max(64, min(1 << 20, _limits["maxframe"] // 32))


TEXT_LIMIT = 1 << 20  # characters of a repr, message or traceback sent in a result


def _bounded(text):
    if len(text) <= TEXT_LIMIT:
        return text
    return "%s... [%d characters cut]" % (text[:TEXT_LIMIT], len(text) - TEXT_LIMIT)


def _suppressed(source):
    """IPython's rule: a ';' ending the last non-comment line suppresses the value."""
    for line in reversed(source.rstrip().splitlines()):
        s = line.split("#", 1)[0].rstrip() if "#" in line else line.rstrip()
        if s:
            return s.endswith(";")
    return False


_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_expr_cache = {}  # one-line expression source -> code object without nested code


def _compile(source, filename):
    """Returns (code, has_last). has_last: the code leaves the last expression's value in
    __main__[_LAST] (exec mode), or it is an expression code object ("eval" mode, has_last 2)."""
    code = _expr_cache.get(source)
    if code is not None:  # a repeated one-line expression (only those are cached, see below)
        return code.replace(co_filename=filename), 2
    stripped = source.strip()
    if stripped and "\n" not in stripped and not stripped.endswith(";"):
        # fast path for a one-line expression: no AST round trip, and a repeated one reuses its
        # code object (renamed to this cell when it has no nested code, else compiled again)
        try:
            code = compile(source, filename, "eval", flags=_FLAGS, dont_inherit=True)
        except SyntaxError:
            code = None
        if code is not None:
            if not any(type(c) is type(code) for c in code.co_consts):
                if len(_expr_cache) >= 256:
                    _expr_cache.clear()
                _expr_cache[source] = code
            return code, 2
    tree = ast.parse(source, filename, "exec")
    has_last = False
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not _suppressed(source):
        last = tree.body[-1]
        assign = ast.Assign(targets=[ast.Name(id=_LAST, ctx=ast.Store())], value=last.value)
        ast.copy_location(assign, last)
        ast.fix_missing_locations(assign)
        tree.body[-1] = assign
        has_last = True
    code = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                   dont_inherit=True)
    return code, has_last


def _jsonable(v):
    t = type(v)
    if t is int:
        return str(v)
    if t is bool:
        return "true" if v else "false"
    if v is None or isinstance(v, (bool, int, float, str, list, tuple, dict)):
        try:
            return json.dumps(v, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return None
    return None


def _limit_message(e):
    """Names the limit an exception comes from, or None."""
    import errno
    if isinstance(e, MemoryError) and _limits.get("mem"):
        return "memory limit (%d MiB) exceeded" % (_limits["mem"] >> 20)
    if isinstance(e, OSError):
        if e.errno == errno.EFBIG and _limits.get("fsize"):
            return "file size limit (%d bytes) exceeded: %s" % (_limits["fsize"], e)
        if e.errno in (errno.EMFILE, errno.ENFILE) and _limits.get("nofile"):
            return "open files limit (%d) exceeded: %s" % (_limits["nofile"], e)
        if e.errno == errno.EAGAIN and _limits.get("nproc") and isinstance(e, BlockingIOError):
            return "process limit (%d) exceeded: %s" % (_limits["nproc"], e)
    return None


def _format_tb(e):
    tb = e.__traceback__
    # drop the runtime's own frames so the traceback starts at the cell (and ast.parse's, which
    # the runtime calls to compile a cell: a cell's SyntaxError shows the cell's line alone)
    while tb is not None and tb.tb_frame.f_code.co_filename in (_RT_FILE, ast.__file__):
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(e), e, tb))
    except Exception:
        return "%s: %s\n" % (type(e).__name__, e)


def _run_async(code):
    _run_async_value(eval(code, _main))


def _get_loop():
    global _loop
    if _loop is None:
        import asyncio
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


def _noop():
    pass


def _run_async_value(coro):
    """Runs a coroutine on the session's loop; returns its value."""
    global _async_task, _loop
    import asyncio
    loop = _get_loop()
    asyncio.set_event_loop(loop)  # asyncio.run() in an earlier plain cell resets it to None
    task = loop.create_task(coro)
    _cancel_sent[0] = False
    _async_task = task
    try:
        return loop.run_until_complete(task)
    except BaseException:
        _capsule.cancel_ack()
        _async_task = None
        if not task.done():
            # bounded (20 ms): a task interrupted between two steps may never be scheduled
            # again, and one that ignores cancellation stays behind on the loop
            task.cancel()
            try:
                loop.run_until_complete(asyncio.wait({task}, timeout=0.02))
            except BaseException:
                pass
        raise
    finally:
        _async_task = None
        if loop.is_running() or asyncio.events._get_running_loop() is not None:
            # a KeyboardInterrupt inside the loop's own bookkeeping left it marked running:
            # the session continues on a fresh loop (tasks of the old one are dropped)
            asyncio.events._set_running_loop(None)
            _loop = None
            _capsule.write(2, "capsule: the event loop was left inconsistent by an interrupt; "
                              "a new loop replaces it\n")


def _delta(code):
    if _ns is None:
        return None, _ns_error
    try:
        return _ns.after_cell_tuple(code), None
    except BaseException as e:
        return None, "namespace delta failed: %s: %s" % (type(e).__name__, e)


def _delta_tuple(blob, info):
    import _capsule_ns
    return _capsule_ns.delta_tuple(blob, info)


def _defines_code(code):
    """True when the cell's code makes code objects that outlive it (functions, classes, lambdas,
    comprehensions, generators): their frames show the cell's lines later, and the namespace
    recovers a bound function's source from linecache."""
    return any(type(c) is type(code) for c in code.co_consts)


def run_cell(cell_no, cell_id, source):
    """Runs one cell. Returns (status, repr|None, json|None, etype|None, emsg|None, tb|None,
    delta tuple|None, delta_error|None, ran); status 0 ok, 1 error, 2 cancelled; ran False: the
    cell's code never started (it did not compile, or was cancelled first)."""
    filename = f"<cell {cell_no}>"
    lines = source.splitlines(True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[filename] = (len(source), None, lines, filename)
    box = [None]
    try:
        return _run_cell(cell_no, cell_id, source, filename, box)
    finally:
        # A cell that defines no code of its own (or did not compile) needs its source only for
        # its own traceback, formatted by now: without this, linecache would keep every cell a
        # session ever ran.
        if box[0] is None or not _defines_code(box[0]):
            linecache.cache.pop(filename, None)


def _run_cell(cell_no, cell_id, source, filename, box):
    status, rep, js, etype, emsg, tb = 0, None, None, None, None, None
    code = None
    try:
        code, has_last = _compile(source, filename)
        box[0] = code
    except BaseException as e:  # SyntaxError and friends: nothing ran
        if isinstance(e, KeyboardInterrupt) and _capsule.cancel_requested():
            _capsule.cancel_ack()  # cancelled while compiling: a cancel, not an error
            return (2, None, None, type(e).__name__, "", _format_tb(e), None,
                    "the cell was cancelled before it ran", False)
        return (1, None, None, type(e).__name__, str(e), _format_tb(e), None,
                "the cell did not compile", False)
    if _ns is not None:
        try:
            _ns.before_cell(cell_id or str(cell_no), source, code)
        except BaseException as e:
            _capsule.write(2, "capsule: namespace before_cell failed: %r\n" % (e,))
    try:
        if has_last == 2:  # an expression compiled in "eval" mode
            value = eval(code, _main)
            if code.co_flags & 0x80:  # CO_COROUTINE: it awaits
                value = _run_async_value(value)
        elif code.co_flags & 0x80:  # CO_COROUTINE: top-level await / async for / async with
            _run_async(code)
        else:
            exec(code, _main)
        if has_last == 1:
            value = _main.pop(_LAST, None)
        if has_last:
            if value is not None:
                _main["___"] = _main.get("__")
                _main["__"] = _main.get("_")
                _main["_"] = value
                rep = _bounded(repr(value))
                js = _jsonable(value)
                if js is not None and len(js) > TEXT_LIMIT:
                    js = None
    except BaseException as e:
        _capsule.cancel_ack()
        _main.pop(_LAST, None)
        aio = sys.modules.get("asyncio")
        kinds = (KeyboardInterrupt, aio.CancelledError) if aio else (KeyboardInterrupt,)
        cancelled = _capsule.cancel_requested() and isinstance(e, kinds)
        status = 2 if cancelled else 1
        etype = type(e).__name__
        try:
            emsg = _bounded(_limit_message(e) or str(e))
        except BaseException:  # a broken __str__
            emsg = "<exception str() failed>"
        tb = _bounded(_format_tb(e))
        e = None
    delta, derr = _delta(code)
    return (status, rep, js, etype, emsg, tb, delta, derr, True)


def snapshot():
    """Returns (delta tuple, None) or (None, error)."""
    if _ns is None:
        return None, _ns_error
    try:
        blob, info = _ns.snapshot()
        return _delta_tuple(blob, info), None
    except BaseException as e:
        return None, "snapshot failed: %s: %s" % (type(e).__name__, e)


def apply(blob):
    """Returns (error|None, restored, deleted, failed pairs)."""
    if _ns is None:
        return _ns_error, [], [], []
    try:
        r = _ns.apply(blob)
    except BaseException as e:
        return "apply failed: %s: %s" % (type(e).__name__, e), [], [], []
    return (None, list(r.get("restored", ())), list(r.get("deleted", ())),
            [(str(k), str(v)) for k, v in r.get("failed", {}).items()])


def warmup(source):
    """Zygote warm-up code: run in __main__ before gc.freeze(). What it binds is every worker's
    from the start (each is forked from here, after a restart too), so it is the namespace
    tracker's baseline: it is in no session's delta, and is never named as not recorded."""
    global _ns
    exec(compile(source, "<warmup>", "exec"), _main)
    if _ns is not None:
        _ns = type(_ns)(_main, _capsule.hash64, same_items=_capsule.same_items)


def rehearse():
    """Runs throwaway cells in a scratch namespace, tracked by a scratch Namespace: what the first
    cell of a session would otherwise do for the first time (the compiler's and the namespace
    module's first use, their lazily made state, and in a forked process the copy-on-write faults
    of the pages they touch) is done before a session exists. A zygote calls it before
    gc.freeze(), its pre-forked spare before it waits to be handed out. Leaves __main__, the
    session's Namespace and every cache a cell reads as they were."""
    g = {"__name__": "__rehearsal__", "__builtins__": builtins}
    try:
        ns = None
        if _ns is not None:
            import _capsule_ns
            ns = _capsule_ns.Namespace(g, _capsule.hash64, same_items=_capsule.same_items)
        for src in ("x = [2 + 2]\ny = x[0]\ny", "2 + 2"):
            if "\n" in src:  # the AST path of _compile (a multi-line cell is not cached)
                code, has_last = _compile(src, "<rehearsal>")
            else:  # the eval path, without _compile's cache of one-line expressions
                code = compile(src, "<rehearsal>", "eval", flags=_FLAGS, dont_inherit=True)
            if ns is not None:
                ns.before_cell("rehearsal", src, code)
            v = eval(code, g)
            v = g.pop(_LAST, v)
            _jsonable(v)
            repr(v)
            if ns is not None:
                ns.after_cell(code)
    except Exception:
        pass  # only a rehearsal: a real cell reports its own failures
