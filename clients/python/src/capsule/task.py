"""Durable tasks: ``@task``, ``step``, ``sleep``.

One implementation with two homes:

* Inside a capsule session this file IS the module ``capsule`` (the worker embeds it; the
  session never sees the client package). There every task call, ``step(fn, ...)`` and
  ``sleep(s)`` made while an execution runs is a durable child promise of that execution, with
  the deterministic id ``capsule/x/<eid>.<path>``: ``path`` counts calls in order at each level
  (``1``, ``2``, and ``2.1`` for the first call inside step 2), as Resonate SDKs derive child ids.
  Before running, the worker asks the engine for that promise: a settled one gives back its
  recorded value (or raises its recorded error) without running (the answer comes from one
  preload of the execution's recorded steps, so a new step asks nothing); otherwise the function
  runs (with retries and a per-attempt timeout) and its result is recorded durably (the promise
  created and settled in one record) before the caller continues. A failed attempt that will be
  retried is recorded before the retry. So an execution re-run after a crash skips the steps that
  had finished and resumes a retried step at its attempt count.
* Outside a session (the client package's ``capsule.task``, a plain ``python3 hello.py``) the
  decorator validates its options and the function is an ordinary call: no durability, no
  retries, no limits.

Arguments and results travel as pickles (protocol 5); what cannot be pickled is a ``TypeError``
at the call. Standard library only (it runs in the worker's embedded interpreter).
"""

import contextvars
import functools
import json
import marshal
import pickle
import re
import threading
import time
import types

try:  # the worker's C module: present only inside a capsule worker
    import _capsule
except ImportError:  # the client package / plain Python
    _capsule = None

__all__ = [
    "task",
    "step",
    "sleep",
    "promise",
    "Promise",
    "PromiseRejected",
    "Task",
    "TaskError",
    "TaskTimeout",
    "LOW",
    "MEDIUM",
    "HIGH",
    "parse_size",
    "parse_duration",
]

LOW, MEDIUM, HIGH = "LOW", "MEDIUM", "HIGH"
# compute levels as CPU budgets: CPU seconds of one attempt in the task's own worker; a number
# (or "90s", "5m") is taken as such a budget
COMPUTE = {LOW: 30.0, MEDIUM: 120.0, HIGH: 600.0}

# the worker protocol's PROMISE operations and reply states (pyworker/src/pyw_proto.h)
(_PO_OPEN, _PO_SETTLE, _PO_SLEEP, _PO_AWAIT, _PO_PRELOAD, _PO_START, _PO_ATTEMPT,
 _PO_CHILD) = range(1, 9)
_PS_PENDING, _PS_RESOLVED, _PS_REJECTED, _PS_FAILED = 0, 1, 2, 3

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DUR_UNITS = {"": 1.0, "MS": 0.001, "S": 1.0, "M": 60.0, "H": 3600.0}

# retry backoff: BACKOFF_BASE * 2**(attempt-1) seconds, at most BACKOFF_MAX
BACKOFF_BASE = 0.05
BACKOFF_MAX = 5.0


class TaskError(Exception):
    """A task failed in a way that has no exception of its own (an unpicklable error, a step
    the engine could not record)."""


class TaskTimeout(TaskError, TimeoutError):
    """An attempt of a task ran longer than its ``timeout``."""


class PromiseRejected(TaskError):
    """An external promise was rejected; ``value`` is what it was rejected with."""

    def __init__(self, id, value):
        super().__init__(f"promise {id!r} was rejected: {value!r}")
        self.id, self.value = id, value


def _parse_quantity(v, what, units, examples, conv):
    """A positive number with an optional unit of `units` (a number alone: unit "")."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError(f"{what}: expected a value like {examples[0]!r}, got {v!r}")
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", v)
        unit = m.group(2).upper() if m else None
        if not m or unit not in units:
            ex = ", ".join(map(repr, examples))
            raise ValueError(f"{what}: cannot parse {v!r} (examples: {ex})")
        q = conv(float(m.group(1)) * units[unit])
    else:
        q = conv(v)
    if not q > 0:
        raise ValueError(f"{what}: must be positive, got {v!r}")
    return q


def parse_size(v):
    """``"64MB"``, ``"2GB"``, ``"512MiB"``, an int of bytes -> bytes (int > 0)."""
    return _parse_quantity(v, "ram", _SIZE_UNITS, ("64MB", "2GB", "512MiB"), int)


def parse_duration(v):
    """``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"``, a number of seconds -> seconds (float > 0)."""
    return _parse_quantity(v, "timeout", _DUR_UNITS, ("30s", "5m", "250ms", "1h"), float)


def _parse_compute(v):
    if isinstance(v, str) and v.strip().upper() in COMPUTE:
        return COMPUTE[v.strip().upper()]
    try:
        return parse_duration(v)
    except (TypeError, ValueError):
        raise ValueError(f"compute: expected LOW, MEDIUM, HIGH or CPU seconds (like 90, '90s', "
                         f"'5m'), got {v!r}") from None


# ---- the step context: which promise a call becomes ----

class _Level:
    """Children of one parent: the parent's path and the count of calls made so far."""

    __slots__ = ("path", "n")

    def __init__(self, path):
        self.path = path
        self.n = 0

    def next(self):
        self.n += 1
        return f"{self.path}.{self.n}" if self.path else str(self.n)


_level = contextvars.ContextVar("capsule_step_level", default=None)
_top = {"eid": None, "level": None}  # top-level calls of the running execution
# settled steps of the running execution, read once at its first step (PRELOAD): a re-run after a
# crash answers its finished steps from here, without a round trip each
_cache = {"eid": None, "steps": {}, "complete": False}


def _durable():
    return _capsule is not None and _capsule.exec_id() != 0


def _next_path():
    lv = _level.get()
    if lv is None:
        eid = _capsule.exec_id()
        if _top["eid"] != eid:  # a new execution: its top-level count starts again
            _top["eid"], _top["level"] = eid, _Level("")
        lv = _top["level"]
    return lv.next()


def _preloaded(path):
    """The recorded (state, value) of step `path` if the execution's preload holds it. The
    preload also holds the failed attempts' records ``<path>#a<k>``; ``_cache["complete"]`` says
    whether a step missing from it was never recorded (else the engine is asked, OPEN)."""
    eid = _capsule.exec_id()
    if _cache["eid"] != eid:
        _cache["eid"], _cache["steps"], _cache["complete"] = eid, {}, False
        state, _, complete, blob = _capsule.promise(_PO_PRELOAD, "0", "", 0, 0, b"")
        if state == _PS_FAILED:  # no preload: every step is asked for by itself
            blob, complete = b"", 0
        _cache["complete"] = complete == 1
        mv, i = memoryview(blob), 0
        while i < len(mv):
            n = int.from_bytes(mv[i:i + 4], "little")
            p = bytes(mv[i + 4:i + 4 + n]).decode()
            state = mv[i + 4 + n]
            m = int.from_bytes(mv[i + 5 + n:i + 9 + n], "little")
            _cache["steps"][p] = (state, bytes(mv[i + 9 + n:i + 9 + n + m]))
            i += 9 + n + m
    return _cache["steps"].pop(path, None)


def _failed_before(path):
    """How many failed attempts of step `path` the preload holds (a re-run after a crash)."""
    k = 0
    while f"{path}#a{k + 1}" in _cache["steps"]:
        k += 1
    return k


def _body(param, value):
    """A SETTLE/ATTEMPT body: {u32 n, param, value}."""
    return len(param).to_bytes(4, "little") + param + value


def _call(op, path, attempts=0, num=0, data=b"", label=""):
    state, att, rnum, value = _capsule.promise(op, path, label, attempts, num, data)
    if state == _PS_FAILED:
        raise TaskError(f"capsule step {path}: the engine could not record it: "
                        f"{value.decode('utf-8', 'replace')}")
    return state, att, rnum, value


def _recorded(state, value, name):
    if state == _PS_RESOLVED:
        return pickle.loads(value)
    try:
        err = pickle.loads(value)
    except Exception as e:  # noqa: BLE001 - a recorded error that no longer unpickles
        raise TaskError(f"task {name!r} failed (recorded error cannot be loaded: {e})") from None
    if isinstance(err, BaseException):
        raise err
    raise TaskError(f"task {name!r} failed: {err}")


def _pickle_error(name, e):
    """The error to record for a failed task: the exception itself if it pickles and loads."""
    try:
        blob = pickle.dumps(e, protocol=5)
        pickle.loads(blob)
        return blob
    except Exception:  # noqa: BLE001
        return pickle.dumps(TaskError(f"task {name!r} failed: {type(e).__name__}: {e}"),
                            protocol=5)


# ---- per-attempt limits inside the worker ----

class _Alarm:
    """Raises TaskTimeout in the calling (main) thread after `seconds`: a timer thread sends
    SIGALRM to that thread, which interrupts blocking calls (EINTR) and runs the handler."""

    def __init__(self, seconds, name):
        self.seconds, self.name = seconds, name
        self.timer = self.old = None

    def __enter__(self):
        import signal

        if self.seconds is None or threading.current_thread() is not threading.main_thread():
            return self
        self.fired = False

        def on_alarm(signum, frame):
            if self.fired:
                self.fired = False
                raise TaskTimeout(f"task {self.name!r} timed out after {self.seconds:g} s")

        self.old = signal.signal(signal.SIGALRM, on_alarm)
        ident = threading.get_ident()

        def fire():
            self.fired = True
            signal.pthread_kill(ident, signal.SIGALRM)

        self.timer = threading.Timer(self.seconds, fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        import signal

        if self.timer is not None:
            self.fired = False
            self.timer.cancel()
            self.timer.join()
            self.fired = False
            signal.signal(signal.SIGALRM, self.old)
        return False


class _Ram:
    """Holds the worker's address space to its current size + `limit` bytes (RLIMIT_AS soft
    limit) while the task runs: allocating beyond is a MemoryError naming the task's limit."""

    def __init__(self, limit, name, text):
        self.limit, self.name, self.text = limit, name, text
        self.old = None

    def __enter__(self):
        if self.limit is None or _capsule is None:
            return self
        import resource

        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        want = vm + self.limit
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft != resource.RLIM_INFINITY:
            want = min(want, soft)
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))
        self.old = soft
        return self

    def __exit__(self, et, ev, tb):
        if self.old is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS,
                               (self.old, resource.getrlimit(resource.RLIMIT_AS)[1]))
        if et is MemoryError:
            raise MemoryError(f"task {self.name!r}: memory limit (ram={self.text}) exceeded") \
                from None
        return False


# ---- tasks ----

class Task:
    """A function made durable by ``@task``. Calling it inside a capsule execution is a durable
    step; elsewhere it is a plain call. ``fn`` is the undecorated function."""

    def __init__(self, fn, name=None, compute=None, ram=None, timeout=None, max_retries=0):
        if not callable(fn):
            raise TypeError(f"task: {fn!r} is not callable")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ValueError(f"max_retries: expected an int >= 0, got {max_retries!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "task")
        self.compute_text = compute
        self.compute = _parse_compute(compute) if compute is not None else None
        self.ram_text = ram
        self.ram = parse_size(ram) if ram is not None else None
        self.timeout = parse_duration(timeout) if timeout is not None else None
        self.max_retries = max_retries
        functools.update_wrapper(self, fn)

    def __repr__(self):
        return f"<capsule task {self.name!r}>"

    def __call__(self, *args, **kwargs):
        if not _durable():
            return self.fn(*args, **kwargs)
        top = _level.get() is None
        result = _run_step(self, args, kwargs)
        if top:  # `capsule run` calls main only if the file did not
            self._top_call = (_capsule.exec_id(), result)
        return result

    def _options(self):
        return {"name": self.name, "compute": self.compute_text, "ram": self.ram_text,
                "timeout": self.timeout, "max_retries": self.max_retries}

    def _attempt(self, path, attempt, param, args, kwargs):
        if self.ram is not None or self.compute is not None:  # its own limits: its own worker
            return _run_in_child(self, path, attempt, param)
        with _Ram(self.ram, self.name, self.ram_text), _Alarm(self.timeout, self.name):
            return self.fn(*args, **kwargs)


def task(fn=None, *, name=None, compute=None, ram=None, timeout=None, max_retries=0):
    """Decorator: ``@task`` or ``@task(name="main", compute="LOW", ram="64MB", timeout="30s",
    max_retries=1)``. ``max_retries`` is the number of retries after a failed attempt (with
    exponential backoff); ``timeout`` bounds each attempt; ``ram`` bounds the memory the task may
    add to its worker; ``compute`` (LOW = 30, MEDIUM = 120, HIGH = 600 CPU seconds, or a number
    of CPU seconds) bounds the CPU time of an attempt. A task with ``ram`` or ``compute`` runs
    each attempt in its own session and worker (created by the engine with those limits)."""
    def wrap(f):
        return Task(f, name=name, compute=compute, ram=ram, timeout=timeout,
                    max_retries=max_retries)

    return wrap(fn) if fn is not None else wrap


def step(fn, *args, **kwargs):
    """Runs ``fn(*args, **kwargs)`` as a durable step (a task with default options)."""
    t = fn if isinstance(fn, Task) else Task(fn)
    return t(*args, **kwargs)


def _run_step(t, args, kwargs):
    path = _next_path()
    try:
        param = pickle.dumps((t.name, args, kwargs), protocol=5)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"task {t.name!r}: its arguments cannot be pickled: "
                        f"{type(e).__name__}: {e}") from None
    hit = _preloaded(path)
    if hit is not None:  # recorded before this run: no round trip
        return _recorded(hit[0], hit[1], t.name)
    if _cache["complete"]:  # the preload holds every recorded step: this one is new
        attempts = _failed_before(path)
    else:
        state, attempts, _, value = _call(_PO_OPEN, path, 0, 0, b"", t.name)
        if state != _PS_PENDING:  # finished before: the recorded outcome, without running
            return _recorded(state, value, t.name)
    # the running mark: no answer awaited (the engine writes it only if the step lasts)
    _capsule.promise(_PO_START, path, t.name, attempts + 1, 0, param)
    token = _level.set(_Level(path))
    try:
        while True:
            attempts += 1
            try:
                result = t._attempt(path, attempts, param, args, kwargs)
                break
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise  # a cancel or exit is not the task's failure: nothing is recorded
            except BaseException as e:  # noqa: BLE001
                err = _pickle_error(t.name, e)
                if attempts <= t.max_retries:
                    # recorded before the retry: a crash from here on resumes at this count
                    _call(_PO_ATTEMPT, path, attempts, 0, _body(param, err), t.name)
                    time.sleep(min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempts - 1)))
                    continue
                _call(_PO_SETTLE, path, attempts, _PS_REJECTED, _body(param, err), t.name)
                raise
    finally:
        _level.reset(token)
    try:
        blob = pickle.dumps(result, protocol=5)
    except Exception as e:  # noqa: BLE001
        err = TypeError(f"task {t.name!r}: its result cannot be pickled: "
                        f"{type(e).__name__}: {e}")
        _call(_PO_SETTLE, path, attempts, _PS_REJECTED, _body(param, _pickle_error(t.name, err)),
              t.name)
        raise err from None
    _call(_PO_SETTLE, path, attempts, _PS_RESOLVED, _body(param, blob), t.name)
    return result


# ---- a task with its own limits: its own session/worker ----

def _code_names(code):
    names = set(code.co_names)
    for k in code.co_consts:
        if isinstance(k, types.CodeType):
            names |= _code_names(k)
    return names


def _export(fn):
    """`fn` (a function or Task of the session) as data another worker can rebuild: the marshalled
    code of it and of every function of the session its code names (transitively), modules by
    name, Tasks with their options, other globals it names as pickles (left out if they do not
    pickle). Returns (encoded fn, {global name: encoded value})."""
    glb = fn.fn.__globals__ if isinstance(fn, Task) else fn.__globals__
    names = {}

    def enc(v):
        if isinstance(v, types.ModuleType):
            return ("mod", v.__name__)
        if isinstance(v, Task):
            return ("task", enc(v.fn), v._options())
        if isinstance(v, types.FunctionType) and v.__globals__ is glb:
            for n in _code_names(v.__code__):
                if n not in names and n in glb:
                    names[n] = None  # visiting (recursion)
                    names[n] = enc(glb[n])
            cells = tuple(enc(c.cell_contents) for c in v.__closure__ or ())
            return ("fn", marshal.dumps(v.__code__), v.__name__,
                    pickle.dumps((v.__defaults__, v.__kwdefaults__), protocol=5), cells)
        try:
            return ("pickle", pickle.dumps(v, protocol=5))
        except Exception:  # noqa: BLE001 - not carried: a NameError if the task uses it
            return None

    top = enc(fn)
    return top, {n: v for n, v in names.items() if v is not None}


def _import(v, ns):
    kind = v[0]
    if kind == "mod":
        import importlib

        return importlib.import_module(v[1])
    if kind == "task":
        return Task(_import(v[1], ns), **v[2])
    if kind == "fn":
        cells = tuple(types.CellType(_import(c, ns) if c else None) for c in v[4])
        defaults, kwdefaults = pickle.loads(v[3])
        f = types.FunctionType(marshal.loads(v[1]), ns, v[2], defaults, cells or None)
        f.__kwdefaults__ = kwdefaults
        return f
    return pickle.loads(v[1])


def _run_in_child(t, path, attempt, param):
    """One attempt of `t` in its own session and worker: the engine opens the session
    ``<eid>-t<path>`` with the task's CPU limit and runs there, as the execution of the same id,
    a cell that rebuilds the task and calls it (`_child_main`); its result (or error) comes back
    as a pickle. The child's own steps are durable under that execution."""
    blob = pickle.dumps({"fn": _export(t), "param": param, "attempt": attempt}, protocol=5)
    code = f"import capsule\ncapsule._child_main(globals(), {blob!r})\n"
    cpu = 0 if t.compute is None else max(1, int(-(-t.compute // 1)))
    state, _, _, value = _call(_PO_CHILD, path, attempt, cpu, code.encode(), t.name)
    text = value.decode("utf-8", "replace")
    if state != _PS_RESOLVED:  # the child's worker died (a limit), or it could not run
        raise TaskError(f"task {t.name!r} (its own worker): {text}")
    import base64

    kind, payload = pickle.loads(base64.b64decode(text.strip("'")))
    if kind == "ok":
        return pickle.loads(payload)
    _recorded(_PS_REJECTED, payload, t.name)


def _child_main(ns, blob):
    """The cell of a task's own session: rebuilds the task's functions in this namespace, calls
    it once (its ram and timeout applied here) and returns base64(pickle((kind, pickle)))."""
    import base64

    d = pickle.loads(blob)
    (top, names), param = d["fn"], d["param"]
    for n, v in names.items():
        try:
            ns[n] = _import(v, ns)
        except Exception:  # noqa: BLE001 - not rebuildable here: a NameError if used
            pass
    t = _import(top, ns)
    t = t if isinstance(t, Task) else Task(t)
    _, args, kwargs = pickle.loads(param)
    try:
        with _Ram(t.ram, t.name, t.ram_text), _Alarm(t.timeout, t.name):
            r = t.fn(*args, **kwargs)
        try:
            out = ("ok", pickle.dumps(r, protocol=5))
        except Exception as e:  # noqa: BLE001
            out = ("err", _pickle_error(t.name, TypeError(
                f"task {t.name!r}: its result cannot be pickled: {type(e).__name__}: {e}")))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        out = ("err", _pickle_error(t.name, e))
    return base64.b64encode(pickle.dumps(out, protocol=5)).decode()


def _run_main(ns, name, argv):
    """``capsule run``'s last line: sets ``sys.argv`` and calls the task `name` of the file's
    namespace ``ns`` (a Task with that name, else a function of that name), unless the file
    already called it at its top level in this execution. Returns its result."""
    import sys

    sys.argv = list(argv)
    found = [v for v in ns.values() if isinstance(v, Task) and v.name == name]
    if not found and callable(ns.get(name)):
        found = [ns[name]]
    if not found:
        names = sorted({v.name for v in ns.values() if isinstance(v, Task)})
        have = f" (its tasks: {', '.join(names)})" if names else " (it defines no @task)"
        raise LookupError(f"capsule run: no task named {name!r} in {argv[0]}{have}")
    t = found[0]
    done = getattr(t, "_top_call", None)
    if _capsule is not None and done is not None and done[0] == _capsule.exec_id():
        return done[1]
    return t()


def sleep(seconds):
    """Durable sleep: inside an execution a timer promise with an absolute deadline, made on the
    first run; a re-run after a restart waits only for what remains. Elsewhere ``time.sleep``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise ValueError(f"sleep: expected seconds >= 0, got {seconds!r}")
    if not _durable():
        time.sleep(seconds)
        return
    path = _next_path()
    if _preloaded(path) is not None:  # its deadline passed in an earlier run
        return
    ms = int(seconds * 1000)
    while True:
        state, _, remain, _ = _call(_PO_SLEEP, path, 0, ms, b"")
        if state != _PS_PENDING:
            return
        time.sleep(max(remain, 1) / 1000.0)


_PROMISE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class Promise:
    """An external promise: ``capsule.promise("approval-42").wait()`` blocks the execution until
    someone settles it (REST ``POST /v1/promises/approval-42/resolve``, the ``capsule promise``
    command, ``Session.resolve_promise``); ``wait`` returns its value (JSON-decoded) or raises
    ``PromiseRejected``. The promise is created on the first ``wait`` (``param``: a JSON-able
    value stored with it). It is durable: after a restart the re-run's ``wait`` returns at once
    if it was settled meanwhile."""

    def __init__(self, id, param=None):
        if not isinstance(id, str) or not _PROMISE_ID.fullmatch(id):
            raise ValueError(f"promise id: expected 1..128 of [A-Za-z0-9._-], got {id!r}")
        self.id = id
        self.param = param

    def __repr__(self):
        return f"<capsule promise {self.id!r}>"

    def wait(self):
        if not _durable():
            raise RuntimeError("capsule.promise(...).wait() works only inside a capsule execution")
        data = json.dumps(self.param).encode() if self.param is not None else b""
        state, _, _, value = _call(_PO_AWAIT, self.id, 0, 0, data)
        text = value.decode("utf-8", "replace")
        try:
            v = json.loads(text) if text else None
        except ValueError:
            v = text
        if state == _PS_RESOLVED:
            return v
        raise PromiseRejected(self.id, v)


def promise(id, param=None):
    """The external promise ``id`` (see ``Promise``)."""
    return Promise(id, param)
