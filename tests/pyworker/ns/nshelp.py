"""Test helpers for _capsule_ns: a session that runs cells the way the worker does (compile with
top-level await allowed, the cell registered in linecache as <cell N>, before_cell / exec /
after_cell), a blake2b hash_fn, and a canonical description of a namespace for comparisons.

A Session runs in a module registered in sys.modules under `modname`; for '__main__' it replaces
sys.modules['__main__'] (as the worker's namespace is __main__.__dict__)."""

import ast
import asyncio
import hashlib
import inspect
import linecache
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "pyworker", "py"))

sys.dont_write_bytecode = True  # keep the source tree clean
import _capsule_ns  # noqa: E402


def h64(data):
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Session:
    def __init__(self, modname="capsule_ns_t"):
        self.mod = types.ModuleType(modname)
        sys.modules[modname] = self.mod
        self.g = self.mod.__dict__
        self.ns = _capsule_ns.Namespace(self.g, h64)
        self.n = 0

    def run(self, src, expect_error=None):
        """Runs one cell; returns (blob, info). The cell's exception is re-raised unless it is
        of type expect_error (then the delta is still taken, as the worker does)."""
        self.n += 1
        fname = f"<cell {self.n}>"
        linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
        code = compile(src, fname, "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
        self.ns.before_cell(str(self.n), src, code)
        try:
            r = eval(code, self.g)
            if inspect.iscoroutine(r):
                asyncio.run(r)
        except BaseException as exc:
            if expect_error is None or not isinstance(exc, expect_error):
                self.ns.after_cell(code)
                raise
        return self.ns.after_cell(code)

    def apply(self, blob):
        return self.ns.apply(blob)

    def names(self):
        return sorted(k for k in self.g if k not in _capsule_ns.EXCLUDED)


def canon(v, depth=0):
    """A process-independent description of a value (sets sorted, instances by class + state)."""
    if depth > 20:
        return "..."
    t = type(v)
    if t in (int, float, str, bytes, bool, type(None), complex):
        return f"{t.__name__}:{v!r}"
    if t in (list, tuple):
        return f"{t.__name__}[" + ",".join(canon(x, depth + 1) for x in v) + "]"
    if t in (set, frozenset):
        return f"{t.__name__}{{" + ",".join(sorted(canon(x, depth + 1) for x in v)) + "}"
    if isinstance(v, dict):
        items = [f"{canon(k, depth + 1)}:{canon(x, depth + 1)}" for k, x in v.items()]
        return f"{t.__name__}{{" + ",".join(items) + "}"
    if isinstance(v, types.ModuleType):
        return f"module:{v.__name__}"
    if isinstance(v, type):
        return f"class:{v.__qualname__}"
    if callable(v) and hasattr(v, "__qualname__"):
        return f"callable:{getattr(v, '__module__', '?')}.{v.__qualname__}"
    if hasattr(v, "__dict__"):
        return f"{t.__qualname__}(" + canon(vars(v), depth + 1) + ")"
    return f"{t.__qualname__}:{v!r}"


def describe(g, names):
    return {n: canon(g[n]) for n in names if n in g}
