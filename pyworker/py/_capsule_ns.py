"""_capsule_ns: namespace deltas and restore for the capsule worker (the basis of durability).

The worker runs every cell with globals = __main__.__dict__ and calls, on its execution thread,
with the GIL, between cells (never concurrently with user code):

    ns = Namespace(globals_dict, hash_fn)   # hash_fn(bytes) -> 64-bit int (the worker: XXH3)
    ns.before_cell(cell_id, source, code)   # source tracking (ast) of the cell about to run
    blob, info = ns.after_cell(code)        # the delta of that cell (also after it raised)
    blob, info = ns.snapshot()              # everything, for checkpoints
    result = ns.apply(blob)                 # a fresh worker replays snapshot + deltas

What a delta holds, per name the cell added, rebound, mutated in place or deleted:
  - 'del'  the name is gone;
  - 'src'  re-created by re-executing source: a def/class statement (decorators included), an
           import statement (one per bound name: `import a.b`, `import a.b as c`,
           `from m import x as y`), or `name = lambda ...`;
  - 'mod'  a module bound some other way (`m = importlib.import_module(...)`): imported by name;
  - 'pkl'  a pickle of one alias group: the names whose values share reachable objects are
           pickled together (a tuple of their values), so `b is a` holds again after a restore.
           A session class made from source takes part with its data attributes (`Reg.items`,
           `C.count`): its element is a dict set on the existing class (not re-created, so its
           instances stay its instances), so `C.seen is log` survives too;
  - 'ref'  the name is bound to the very object another name held before this delta, unchanged
           (`b = a`, the worker's _ -> __ -> ___ rotation of a big value): no pickle needed;
  - 'bad'  cannot be saved: the reason ("type (reason)"); apply removes the name and lists it
           in "failed" (never a silently stale or missing value).
Entry order in a blob: ref, del, src (by seq), mod and bad, pkl (refs resolve against the
values held before the blob, all of them before anything is bound). apply() retries entries that
raise until no progress, so a class body naming a value pickled later still restores.

How a cell's changes are found without pickling the whole namespace:
  - added / deleted names: the keys list compared with last time's; on a change, set
    differences (C speed);
  - rebound names: an identity scan of all values against the list kept from last time
    (operator.is_not over two lists, in C; catches `_` set by the worker, globals()[...]
    writes, `global x` in functions);
  - mutated in place: only *candidates* are fingerprinted (hash_fn of their pickle, compared with
    the one recorded): the names in the cell's code (co_names/co_varnames, recursively through
    nested code objects), the names used by the code of session functions and methods reachable
    from those names or from their contents (transitively), and the other members of their
    alias groups. A session class among them has its data attributes fingerprinted. A cell that
    names exec/eval/globals/vars/locals/__main__/sys.modules/__dict__/setattr makes every name
    a candidate.

If an after_cell, snapshot or apply fails half-way (a user __reduce__ raising
KeyboardInterrupt, ...), the recorded state may be wrong: the next after_cell then returns a
snapshot-kind blob (applying it resets the namespace), and deltas resume after it.

Invariants kept between calls (the recorded state describes globals as of the last
after_cell/snapshot/apply):
  - _vals[name] is the object bound to name then (a strong reference, so ids stay unique);
  - _fp[name] is the fingerprint of pickle(_vals[name]) (for a source-made class: of its data
    attributes), or None (unpicklable, function, module);
  - _reach[name] holds the ids of the identity-bearing objects reachable from a pickled value
    (atoms such as str/int, classes, functions and modules excluded); _idx maps id -> owner
    name(s); _grp[name] is the alias group (connected component over shared ids), absent for
    singletons;
  - _src[name] = (seq, kind, text) for names re-created from source; seq orders re-execution.

Blob format (opaque to C): byte 0 = FORMAT_VERSION (1); byte 1 = b'D' (delta) or b'S'
(snapshot: applying it also deletes every name it does not mention); bytes 2..9 = hash_fn(body)
as unsigned 64-bit little endian, checked before anything is trusted; bytes 10.. = body, a
pickle (protocol 5) of a list of entry tuples made only of str/bytes/int/tuple/list, loaded with
an unpickler that refuses every global. Inner 'pkl' payloads are ordinary pickles: loading them
runs code, so blobs must come from capsule's own log (never from a client).

Known limits (documented in ARCHITECTURE.md): attributes set on functions, default-argument
objects and class attributes of non-plain metaclasses (Enum, ...) are not fingerprinted; a class
attribute that cannot be pickled is left to the class source; mutation by code reached only
through C extensions or other modules' globals, or by background threads between cells, is seen
only if those names are candidates; aliasing is tracked through at most REACH_LIMIT objects per
name (beyond it values still restore, shared identity deeper inside may not).
"""

import ast
import gc
import importlib
import io
import itertools
import linecache
import operator
import pickle
import pickletools
import sys
import textwrap
import types

__all__ = ["Namespace", "FORMAT_VERSION", "EXCLUDED", "RESERVED_PREFIX"]

FORMAT_VERSION = 1
_KIND_DELTA = 0x44  # 'D'
_KIND_SNAPSHOT = 0x53  # 'S'
_HEADER = 10
_PROTOCOL = 5
_MASK64 = (1 << 64) - 1

# Names never in deltas: the module's own attributes and the builtins. The worker may add its
# own names through Namespace(..., exclude=...) or by prefixing them with RESERVED_PREFIX.
EXCLUDED = frozenset({"__builtins__", "__name__", "__doc__", "__package__", "__loader__",
                      "__spec__", "__file__", "__cached__"})
RESERVED_PREFIX = "__capsule"

# Per-name cap on the objects walked for alias detection (memory of the id index).
REACH_LIMIT = 200_000

# Names whose presence in a cell means it may touch any global.
_ESCAPE = frozenset({"exec", "eval", "globals", "vars", "locals", "__main__", "modules",
                     "__dict__", "__globals__", "f_globals", "setattr", "delattr",
                     "__setattr__", "__delattr__"})

# Objects without identity that matters (never grouped, never walked).
_ATOMS = frozenset({str, bytes, int, float, complex, bool, type(None), type(Ellipsis),
                    type(NotImplemented), range, types.CodeType, types.ModuleType,
                    types.FrameType, types.TracebackType, types.GetSetDescriptorType,
                    types.MemberDescriptorType, types.WrapperDescriptorType,
                    types.MethodDescriptorType, types.ClassMethodDescriptorType,
                    types.MappingProxyType, types.CellType})

_ASYNC_FLAGS = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0x2000)
_CODE = types.CodeType


def delta_tuple(blob, info):
    """(blob, info) of after_cell or snapshot in the worker's form: (blob, added, changed,
    mutated, deleted, [(name, reason), ...] unpicklable), the name lists sorted."""
    unp = info.get("unpicklable")
    return (blob if type(blob) is bytes else bytes(blob), _names(info, "added"),
            _names(info, "changed"), _names(info, "mutated"), _names(info, "deleted"),
            [(str(k), str(v)) for k, v in unp.items()] if unp else [])


def _names_nothing(code):
    """True if a cell's code object names no variable and holds no nested code (`2+2`): it can
    bind, rebind or reach into no name of the namespace."""
    return (code is not None and not (code.co_names or code.co_varnames)
            and _CODE not in map(type, code.co_consts))


def _names(info, key):
    v = info.get(key)
    return v if type(v) is list else list(v or ())  # after_cell gives fresh lists: no copy


def _type_name(v):
    t = type(v)
    mod = getattr(t, "__module__", "builtins")
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def _reason(value, exc):
    """'type name (reason)' for a value that could not be pickled."""
    tn = _type_name(value)
    if isinstance(value, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        why = "a suspended frame cannot be saved; re-create it after a restore"
    elif isinstance(value, io.IOBase):
        name = getattr(value, "name", None)
        mode = getattr(value, "mode", None)
        what = f"open file {name!r}" if name is not None else "open stream"
        if mode:
            what += f" mode {mode!r}"
        why = f"{what}: file handles cannot be saved"
    elif tn.startswith("socket.") or tn.startswith("ssl."):
        why = "open socket: connections cannot be saved"
    elif tn.startswith("_thread.") or tn.startswith("threading."):
        why = "thread primitive: locks and threads cannot be saved"
    elif isinstance(value, types.FunctionType) and value.__name__ == "<lambda>":
        why = ("lambda: source not recoverable (bind it at top level as `name = lambda ...`)")
    elif isinstance(exc, RecursionError):
        why = "too deeply nested to pickle"
    else:
        why = f"{type(exc).__name__}: {exc}"
    return f"{tn} ({why})"


class _BlobUnpickler(pickle.Unpickler):
    """Loads the outer body of a blob: plain data only, no globals."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name} not allowed in a blob body")


def _session_refs(data, modname):
    """The top-level names of modname that pickle `data` references by global (class, function).
    Only called when modname's bytes occur in data."""
    refs = set()
    memo = {}
    nmemo = 0
    pushed = [None, None]
    prev_str = False
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed.append(arg)
            prev_str = True
            continue
        if name == "MEMOIZE":
            memo[nmemo] = pushed[-1] if prev_str else None
            nmemo += 1
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if prev_str else None
            continue
        if name in ("FRAME", "PROTO"):
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            v = memo.get(arg)
            pushed.append(v)
            prev_str = v is not None
            continue
        if name == "STACK_GLOBAL":
            if pushed[-2] == modname and isinstance(pushed[-1], str):
                refs.add(pushed[-1].split(".")[0])
        elif name in ("GLOBAL", "INST"):
            mod, _, qual = arg.partition(" ")
            if mod == modname:
                refs.add(qual.split(".")[0])
        pushed.append(None)
        prev_str = False
        if len(pushed) > 64:
            del pushed[:-8]
    return refs


def _code_names_uncached(code, out):
    out.update(code.co_names)
    out.update(code.co_varnames)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code_names_uncached(c, out)


def _binders(source):
    """name -> [(kind, node, text, line)] in textual order, for every top-level binding in the
    cell (also inside if/for/while/try/with/match at top level). kind: 'def', 'class', 'import',
    'lambda' (re-creatable from text) or 'other' (any other binding; text is set only for a
    simple assignment statement at the cell's top level, e.g. `f = functools.cache(f)`)."""
    try:
        tree = compile(source, "<capsule-ns>", "exec", ast.PyCF_ONLY_AST | _ASYNC_FLAGS)
    except (SyntaxError, ValueError, TypeError):
        return {}
    lines = source.splitlines(keepends=True)
    out = {}

    def add(name, kind, node, text, line=0):
        out.setdefault(name, []).append((kind, node, text, line or getattr(node, "lineno", 0)))

    def stores(node):
        """Names bound by a simple statement (not descending into nested scopes)."""
        todo = [node]
        while todo:
            n = todo.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                if n is not node:
                    continue
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                yield n.id
            todo.extend(ast.iter_child_nodes(n))

    def lambda_text(name, value):
        seg = ast.get_source_segment(source, value)
        if seg is None:
            seg = ast.unparse(value)
        return f"{name} = (\n{seg}\n)\n"

    def walk(body, top):
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([d.lineno for d in st.decorator_list] + [st.lineno])
                text = textwrap.dedent("".join(lines[start - 1:st.end_lineno]))
                add(st.name, "class" if isinstance(st, ast.ClassDef) else "def", st, text)
            elif isinstance(st, ast.Import):
                for a in st.names:
                    bound = a.asname or a.name.split(".")[0]
                    add(bound, "import", (a.name, a.asname, None),
                        ast.unparse(ast.Import(names=[a])) + "\n", st.lineno)
            elif isinstance(st, ast.ImportFrom):
                for a in st.names:
                    if a.name == "*":
                        continue
                    bound = a.asname or a.name
                    if st.level:
                        add(bound, "other", st, None)
                        continue
                    add(bound, "import", (st.module, a.asname, a.name),
                        ast.unparse(ast.ImportFrom(module=st.module, names=[a], level=0)) + "\n",
                        st.lineno)
            elif (isinstance(st, ast.Assign) and isinstance(st.value, ast.Lambda)
                  and all(isinstance(t, ast.Name) for t in st.targets)):
                for t in st.targets:
                    add(t.id, "lambda", st.value, lambda_text(t.id, st.value))
            elif (isinstance(st, ast.AnnAssign) and isinstance(st.value, ast.Lambda)
                  and isinstance(st.target, ast.Name)):
                add(st.target.id, "lambda", st.value, lambda_text(st.target.id, st.value))
            elif isinstance(st, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With,
                                 ast.AsyncWith)) or type(st).__name__ in ("Match", "TryStar"):
                heads = []
                if isinstance(st, (ast.For, ast.AsyncFor)):
                    heads.append(st.target)
                if isinstance(st, (ast.With, ast.AsyncWith)):
                    heads.extend(i.optional_vars for i in st.items if i.optional_vars)
                for h in heads:
                    for n in stores(h):
                        add(n, "other", st, None)
                for n in stores_expr_heads(st):
                    add(n, "other", st, None)
                walk(getattr(st, "body", []), False)
                walk(getattr(st, "orelse", []), False)
                walk(getattr(st, "finalbody", []), False)
                for h in getattr(st, "handlers", []):
                    if h.name:
                        add(h.name, "other", h, None)
                    walk(h.body, False)
                for c in getattr(st, "cases", []):
                    for n in stores(c.pattern):
                        add(n, "other", c, None, c.pattern.lineno)
                    walk(c.body, False)
            else:
                text = None
                if top and isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    text = "".join(lines[st.lineno - 1:st.end_lineno])
                    after = lines[st.end_lineno - 1].encode()[st.end_col_offset:].decode().strip()
                    if st.col_offset or (after and not after.startswith("#")):
                        text = None  # shares its line with other statements: not separable
                    elif not text.endswith("\n"):
                        text += "\n"
                for n in stores(st):
                    add(n, "other", st, text)

    def stores_expr_heads(st):
        # walrus in an if/while test binds a global
        test = getattr(st, "test", None)
        if test is None:
            return ()
        return [n.target.id for n in ast.walk(test) if isinstance(n, ast.NamedExpr)]

    walk(tree.body, True)
    # names bound by pattern captures are Name-less (MatchAs.name): add them
    for node in ast.walk(tree):
        if type(node).__name__ in ("MatchAs", "MatchStar") and getattr(node, "name", None):
            add(node.name, "other", node, None)
    return out


def _unwrap_functions(v):
    seen = 0
    while v is not None and seen < 100:
        if isinstance(v, types.FunctionType):
            yield v
        v = getattr(v, "__wrapped__", None) if not isinstance(v, type) else None
        seen += 1


class Namespace:
    """Tracks one session namespace (a globals dict) and produces/applies delta blobs.

    globals_dict: the namespace (the worker: __main__.__dict__); borrowed for the lifetime of the
    object. hash_fn(bytes) -> int, a 64-bit fingerprint. exclude: extra names the worker injects
    (never in deltas). same_items(dict, keys, values) -> bool, optional (the worker:
    _capsule.same_items, in C): the dict holds exactly these keys in this order, each bound to the
    value at the same index, compared by identity; a cell that names nothing is then answered
    without building the key and value lists. Not thread-safe: call only between cells, from one
    thread, with the GIL.
    """

    def __init__(self, globals_dict, hash_fn, exclude=(), same_items=None):
        self._setup(globals_dict, hash_fn, set(EXCLUDED) | set(exclude))
        self._same = same_items
        names = self._current_keys()
        self._record(names, names, {}, {})
        self._sync_ids()

    def _setup(self, globals_dict, hash_fn, skip):
        self._g = globals_dict
        self._hash = hash_fn
        self._skip = set(skip)
        self._modname = globals_dict.get("__name__", "__main__")
        self._modname_b = self._modname.encode("utf-8", "surrogatepass")
        self._vals = {}
        self._fp = {}
        self._reach = {}
        self._codes = {}
        self._idx = {}
        self._grp = {}
        self._src = {}
        self._mods = {}
        self._bad = {}
        self._cls = {}
        self._cellseq = 1  # sources made by cell k get seq k * _LINES + line
        self._resync = False
        self._pending = {}
        self._cell_file = None
        self._code_cache = {}
        self._klist, self._idl = [], []
        self._empty_blob = None  # the delta of a cell that changed nothing (made once)
        self._empty_tuple = None  # and its after_cell_tuple
        self._same = None  # same_items(dict, keys, values) -> bool, if given (see __init__)

    # ---------------------------------------------------------------- public API

    def before_cell(self, cell_id, source, code):
        """Records the cell's def/class/import/lambda statements (source tracking). cell_id is
        the worker's name for the cell (informational: functions are matched to their
        statements through code.co_filename, the cell's `<cell N>`, and line numbers)."""
        self._cellseq += 1
        self._cell_file = getattr(code, "co_filename", None)
        self._pending = {}
        if source and ("def" in source or "class" in source or "import" in source
                       or "lambda" in source):  # may bind a name from source: worth parsing
            try:
                self._pending = _binders(source)
            except (RecursionError, MemoryError, ValueError):
                # Too deep to parse: no source tracking for this cell (its functions and
                # classes are then reported unpicklable rather than restored wrongly).
                self._pending = {}

    def after_cell(self, code):
        """Returns (delta_blob, info) for what the cell changed; updates the recorded state.
        If a previous after_cell/snapshot/apply failed half-way (the recorded state may be
        wrong), this one returns a snapshot-kind blob instead (applying it resets the namespace
        to the current state), with every name in "added"."""
        r = self._after_cell_or_none(code)
        return self._empty_delta() if r is None else r

    def after_cell_tuple(self, code):
        """after_cell in the worker's form: (blob, added, changed, mutated, deleted,
        [(name, reason), ...] unpicklable), see delta_tuple. The tuple of the empty delta is made
        once and shared: read it, never change it."""
        r = self._after_cell_or_none(code)
        if r is None:
            t = self._empty_tuple
            if t is None:
                t = self._empty_tuple = delta_tuple(*self._empty_delta())
            return t
        return delta_tuple(*r)

    def _after_cell_or_none(self, code):
        try:
            if self._resync:
                self._pending = {}
                return self._full(_KIND_SNAPSHOT)
            return self._after_cell(code)
        except BaseException:
            self._resync = True
            self._pending = {}
            raise

    def _after_cell(self, code):
        g = self._g
        names_nothing = _names_nothing(code)
        if (names_nothing and self._same is not None
                and self._same(g, self._klist, self._idl)):
            # the cell names nothing and every key and value is the very object of the last
            # call (what the scan below finds with three lists): the empty delta
            self._pending = {}
            return None
        vals = self._vals
        # Fast path: the same keys in the same order: nothing was added or deleted, and the
        # rebound names are found by an identity scan against the values list kept from last
        # time (_idl, strong references), all in C (no __eq__ of user objects is called).
        klist = list(g)
        idl = list(g.values())
        if klist == self._klist:
            added, deleted = set(), set()
            rebound = {k for k in itertools.compress(klist, map(operator.is_not, idl, self._idl))
                       if k in vals}
            keys = vals  # only `in` is asked of keys: the tracked names are the live ones
            cands = None
            if not rebound:
                if names_nothing:
                    cands = ()  # `2+2`
                else:
                    cands = self._candidates(code, keys)
                if not cands:
                    # Nothing added, deleted, rebound or possibly mutated: the recorded state
                    # stands and the delta is the empty one (None: see after_cell).
                    self._pending = {}
                    self._idl = idl
                    return None
        else:
            cands = None
            keys = self._current_keys()
            old = vals.keys()
            added = keys - old
            deleted = old - keys
            common = list(keys & old)
            rebound = set(itertools.compress(common, map(
                operator.is_not, map(g.__getitem__, common), map(vals.__getitem__, common))))
        if cands is None:
            cands = self._candidates(code, keys)
        pickles = {}
        mutated = set()
        cls_mutated = set()
        for n in cands:
            if n in added or n in rebound or n in self._mods:
                continue
            if n in self._src:
                if self._fp.get(n) is not None:
                    st = self._class_state(g[n])
                    if st is not None:
                        rec = self._pickle1(st, pickles, n)
                        if self._fp_of(rec) != self._fp[n]:
                            cls_mutated.add(n)
                continue
            v = g[n]
            if n in self._bad and type(v) is types.FunctionType and self._vals.get(n) is v:
                # A function with no source to re-create it, unchanged: recording it again could
                # only name it unpicklable again (its by-name pickle made it look changed at
                # every cell that named it). Its attributes are not fingerprinted (Limits).
                continue
            rec = self._pickle1(v, pickles, n)
            old_fp = self._fp.get(n)
            if rec[0] is None:
                if old_fp is not None:
                    mutated.add(n)
            elif old_fp is None or self._fp_of(rec) != old_fp:
                mutated.add(n)

        dirty = added | rebound | mutated
        entries, unpick = self._record(dirty, keys, pickles, {}, deleted=deleted,
                                       cls_state=cls_mutated, refs_ok=True)
        mutated |= cls_mutated
        blob = self._encode(_KIND_DELTA, entries)
        self._pending = {}
        if keys is vals:
            self._klist, self._idl = klist, idl
        else:
            self._sync_ids()
        info = {"added": sorted(added), "changed": sorted(rebound), "mutated": sorted(mutated),
                "deleted": sorted(deleted), "unpicklable": unpick, "size": len(blob)}
        return blob, info

    def _empty_delta(self):
        blob = self._empty_blob
        if blob is None:
            blob = self._empty_blob = self._encode(_KIND_DELTA, [])
        return blob, {"added": [], "changed": [], "mutated": [], "deleted": [],
                      "unpicklable": {}, "size": len(blob)}

    def snapshot(self):
        """Returns (blob, info): every name, groups re-pickled, sources in definition order.
        Leaves the recorded state alone: the next delta still reports everything that changed
        since the previous delta (a chain that does not use this snapshot stays whole)."""
        self._pending = {}
        shadow = Namespace.__new__(Namespace)
        shadow._setup(self._g, self._hash, self._skip)
        # Source-made names keep their source while they hold the same object.
        shadow._src = dict(self._src)
        shadow._vals = {n: self._vals[n] for n in self._src if n in self._vals}
        shadow._cellseq = self._cellseq
        return shadow._full(_KIND_SNAPSHOT)

    def _full(self, kind):
        """Records every name afresh and returns a blob that recreates them all."""
        keys = self._current_keys()
        deleted = self._vals.keys() - keys
        self._pending = {}
        entries, unpick = self._record(keys, keys, {}, {}, deleted=deleted)
        entries = [e for e in entries if e[0] != "del"]  # a snapshot replaces everything
        blob = self._encode(kind, entries)
        self._sync_ids()
        self._resync = False
        info = {"added": sorted(keys), "changed": [], "mutated": [], "deleted": [],
                "unpicklable": unpick, "size": len(blob)}
        return blob, info

    def apply(self, blob):
        """Applies a delta or snapshot blob into the globals. Raises ValueError (and changes
        nothing) when the blob is malformed. Returns {"restored", "deleted", "failed"}."""
        kind, entries = self._decode(blob)
        try:
            return self._apply(kind, entries)
        except BaseException:
            self._resync = True
            raise

    def _apply(self, kind, entries):
        g = self._g
        restored, deleted, failed = [], [], {}
        mentioned = set()
        for e in entries:
            if e[0] == "pkl":
                mentioned.update(e[1])
            else:
                mentioned.add(e[1])
        if kind == _KIND_SNAPSHOT:
            for n in sorted(self._current_keys() - mentioned):
                del g[n]
                deleted.append(n)
        hints = {}
        work = []
        # References name the values held BEFORE this blob: all resolved first, then bound.
        bound = []
        for e in entries:
            if e[0] == "ref":
                if e[2] in g:
                    bound.append((e[1], g[e[2]]))
                else:
                    g.pop(e[1], None)
                    failed[e[1]] = (f"could not restore: it is the value {e[2]!r} held, which "
                                    "is not in this namespace")
        for n, v in bound:
            g[n] = v
            restored.append(n)
        for e in entries:
            tag = e[0]
            if tag == "ref":
                continue
            if tag == "del":
                g.pop(e[1], None)
                deleted.append(e[1])
            elif tag == "bad":
                g.pop(e[1], None)
                failed[e[1]] = e[2]
            elif tag == "src":
                work.append((0, e[2], e))
            elif tag == "mod":
                work.append((1, 0, e))
            else:
                work.append((2, 0, e))
        work.sort(key=lambda w: (w[0], w[1]))
        pending = [w[2] for w in work]
        errors = {}
        classes_set = set()
        while pending:
            progress = False
            nxt = []
            for e in pending:
                try:
                    names = self._apply_entry(e, hints)
                except Exception as exc:  # user code (decorators, __setstate__) may raise
                    errors[id(e)] = f"{type(exc).__name__}: {exc}"
                    nxt.append(e)
                    continue
                restored.extend(names)
                if e[0] == "pkl":
                    classes_set.update(e[3])
                progress = True
            pending = nxt
            if not progress:
                break
        for e in pending:
            why = f"could not restore: {errors.get(id(e), 'unknown error')}"
            names = e[1] if e[0] == "pkl" else (e[1],)
            classes = e[3] if e[0] == "pkl" else ()
            for n in names:
                if n in classes:
                    # The class itself is there; only its data attributes are missing.
                    failed[n] = f"class attributes {why}"
                    continue
                g.pop(n, None)
                failed[n] = why
        self._pending = {}
        keys = self._current_keys()
        gone = self._vals.keys() - keys
        fresh = set(restored) & keys
        self._record(fresh, keys, {}, hints, deleted=gone,
                     cls_state={n for n in classes_set if n in keys and n in self._src})
        self._sync_ids()
        for n in failed:
            # A failed name stays absent; later deltas may bind it again.
            self._bad.pop(n, None)
        return {"restored": sorted(set(restored)), "deleted": sorted(set(deleted)),
                "failed": failed}

    # ---------------------------------------------------------------- internals

    def _sync_ids(self):
        self._klist = list(self._g)
        self._idl = list(self._g.values())

    def _current_keys(self):
        g = self._g
        keys = g.keys() - self._skip
        odd = [k for k in keys - self._vals.keys()
               if not isinstance(k, str) or k.startswith(RESERVED_PREFIX)]
        if odd:
            self._skip.update(odd)
            keys.difference_update(odd)
        return keys

    def _code_names(self, code):
        hit = self._code_cache.get(id(code))
        if hit is not None and hit[0] is code:
            return hit[1]
        out = set()
        _code_names_uncached(code, out)
        names = frozenset(out)
        if len(self._code_cache) > 4096:
            self._code_cache.clear()
        self._code_cache[id(code)] = (code, names)
        return names

    def _candidates(self, code, keys):
        """Names the cell could have mutated in place (see the module docstring). keys: the live
        tracked names (anything supporting `in`)."""
        if code is None:
            return set(self._current_keys())
        # the cell's own code is new every time: not worth a place in the cache
        first = set()
        _code_names_uncached(code, first)
        if not first:
            return first  # a cell that names nothing (`2+2`)
        if not first.isdisjoint(_ESCAPE):
            return set(self._current_keys())
        cands = {n for n in first if n in keys}
        todo = list(cands)
        while todo:
            n = todo.pop()
            more = []
            for c in self._codes.get(n, ()):
                names = self._code_names(c)
                if not names.isdisjoint(_ESCAPE):
                    return set(self._current_keys())
                more.extend(names)
            grp = self._grp.get(n)
            if grp:
                more.extend(grp)
            for m in more:
                if m not in cands and m in keys:
                    cands.add(m)
                    todo.append(m)
        return cands

    def _pickle1(self, value, cache, name):
        """[data, error, fingerprint (lazy), pickler memo, value] for one value, cached per
        call under name (for a session class: its data attributes dict)."""
        hit = cache.get(name)
        if hit is not None:
            return hit
        try:
            buf = io.BytesIO()
            p = pickle.Pickler(buf, _PROTOCOL)
            p.dump(value)
            rec = [buf.getvalue(), None, None, p.memo, value]
        except Exception as exc:  # user __reduce__ code may raise anything
            rec = [None, _reason(value, exc), None, None, value]
        cache[name] = rec
        return rec

    def _fp_of(self, rec):
        if rec[2] is None and rec[0] is not None:
            rec[2] = self._hash(rec[0]) & _MASK64
        return rec[2]

    def _memo_reach(self, memo):
        """(ids, codes) from a pickler's memo: the objects the pickle holds (it memoizes every
        object it saves except atoms), minus str/bytes and other atoms, classes, functions and
        modules; codes of the session functions/classes it refers to. Cheaper than walking,
        and it sees exactly what a restore will share. Temporaries made by __reduce__ may add
        stray ids: that can only make a group larger, never split one."""
        g = self._g
        modname = self._modname
        ids = set()
        codes = set()
        atoms = _ATOMS
        ftype = types.FunctionType
        for i, (_k, o) in memo.copy().items():
            t = type(o)
            if t in atoms or t is types.BuiltinFunctionType:
                continue
            if t is ftype:
                if o.__globals__ is g:
                    codes.add(o.__code__)
                continue
            if isinstance(o, type):
                if getattr(o, "__module__", None) == modname:
                    self._class_codes(o, codes)
                continue
            if t is tuple and not o:
                continue
            ids.add(i)
            if len(ids) > REACH_LIMIT:
                break
        return ids, codes

    def _walk(self, root, want_ids):
        """(ids, codes): identity-bearing objects reachable from root, and the code objects of
        session functions/classes reachable from it."""
        g = self._g
        modname = self._modname
        ids = set()
        codes = set()
        seen_cls = set()
        stack = [root]
        atoms = _ATOMS
        ftype = types.FunctionType
        btype = types.BuiltinFunctionType
        referents = gc.get_referents
        while stack:
            o = stack.pop()
            t = type(o)
            if t in atoms:
                continue
            if t is ftype:
                if o.__globals__ is g:
                    codes.add(o.__code__)
                continue
            if isinstance(o, type):
                if o not in seen_cls and getattr(o, "__module__", None) == modname:
                    seen_cls.add(o)
                    self._class_codes(o, codes)
                continue
            if t is btype:
                s = o.__self__
                if s is not None and not isinstance(s, types.ModuleType):
                    stack.append(s)
                continue
            if o is g or isinstance(o, types.ModuleType):
                continue
            i = id(o)
            if i in ids:
                continue
            if not (t is tuple and not o):
                ids.add(i)
                if len(ids) > REACH_LIMIT:
                    break
            refs = referents(o)
            if len(refs) > 16 and atoms.issuperset(map(type, refs)):
                continue  # a container of atoms only (checked in C)
            stack.extend(refs)
        return (ids if want_ids else set()), codes

    def _class_codes(self, cls, codes):
        """Adds the code of the session-defined methods (incl. static/class methods, property
        accessors) of cls and its session bases."""
        g = self._g
        for k in cls.__mro__:
            if getattr(k, "__module__", None) != self._modname:
                continue
            for attr in list(vars(k).values()):
                try:
                    fs = (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None),
                          getattr(attr, "fset", None), getattr(attr, "fdel", None))
                except Exception:  # exotic descriptors may raise anything
                    continue
                for f in fs:
                    if type(f) is types.FunctionType and f.__globals__ is g:
                        codes.add(f.__code__)

    def _idx_remove(self, name):
        idx = self._idx
        for i in self._reach.pop(name, ()):
            o = idx.get(i)
            if o is None:
                continue
            if type(o) is str:
                if o == name:
                    del idx[i]
            else:
                o.discard(name)
                if len(o) == 1:
                    idx[i] = next(iter(o))
                elif not o:
                    del idx[i]

    def _idx_add(self, name, ids):
        idx = self._idx
        for i in ids:
            o = idx.get(i)
            if o is None:
                idx[i] = name
            elif type(o) is str:
                if o != name:
                    idx[i] = {o, name}
            else:
                o.add(name)
        if ids:
            self._reach[name] = frozenset(ids)

    def _component(self, name, keys):
        seen = {name}
        todo = [name]
        idx = self._idx
        while todo:
            n = todo.pop()
            for i in self._reach.get(n, ()):
                o = idx.get(i)
                if o is None:
                    continue
                for m in ((o,) if type(o) is str else o):
                    if m not in seen and m in keys:
                        seen.add(m)
                        todo.append(m)
        return seen

    def _match_source(self, name, value):
        """(kind, text, line) if the cell's own statements that bound name can re-create value:
        the last binding is a def/class/import/lambda that verifiably made it, or a def/class
        followed only by simple top-level re-assignments of the name that wrap it
        (`f = functools.cache(f)`), whose text is then appended."""
        binders = self._pending.get(name)
        if not binders:
            return None
        cell_file = self._cell_file
        last = True
        chain = []
        chain_line = 0
        for kind, node, text, line in reversed(binders):
            if kind == "other":
                if text is None:
                    return None
                if not chain:
                    chain_line = line  # the chain's result is bound at its last statement
                chain.append(text)
                last = False
                continue
            tail = "".join(reversed(chain))
            if kind == "def":
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                fns = list(_unwrap_functions(value))
                for f in fns:
                    c = f.__code__
                    if c.co_filename == cell_file and c.co_firstlineno in (start, node.lineno):
                        return ("def", text + tail, chain_line if chain else start)
                if not fns and last:
                    return ("def", text, start)
            elif kind == "class":
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if isinstance(value, type) and value.__name__ == node.name:
                    if last:
                        return ("class", text, start)
                    for attr in vars(value).values():
                        f = getattr(attr, "__func__", attr)
                        if (type(f) is types.FunctionType and f.__code__.co_filename == cell_file
                                and node.lineno <= f.__code__.co_firstlineno <= node.end_lineno):
                            return ("class", text + tail, chain_line if chain else start)
                elif last and not isinstance(value, type):
                    return ("class", text, start)
            elif chain:
                return None
            elif kind == "import":
                modname, asname, attr = node
                if attr is None:
                    target = sys.modules.get(modname if asname else modname.split(".")[0])
                    if target is not None and target is value:
                        return ("import", text, line)
                else:
                    m = sys.modules.get(modname)
                    if m is not None and (getattr(m, attr, _MISSING) is value
                                          or sys.modules.get(f"{modname}.{attr}") is value):
                        return ("import", text, line)
            elif kind == "lambda":
                if (type(value) is types.FunctionType and value.__name__ == "<lambda>"
                        and value.__code__.co_filename == cell_file
                        and value.__code__.co_firstlineno == node.lineno):
                    return ("lambda", text, line)
            if chain:
                return None
            last = False
        return None

    def _recover_source(self, name, value):
        """Source for a session function bound without a tracked statement, from linecache
        (the worker registers each cell there), or None."""
        if type(value) is not types.FunctionType or value.__globals__ is not self._g:
            return None
        if value.__closure__:
            return None
        c = value.__code__
        lines = linecache.getlines(c.co_filename)
        if not lines:
            return None
        source = "".join(lines)
        try:
            tree = compile(source, c.co_filename, "exec", ast.PyCF_ONLY_AST | _ASYNC_FLAGS)
        except (SyntaxError, ValueError):
            return None
        if value.__name__ == "<lambda>":
            hits = [n for n in ast.walk(tree)
                    if isinstance(n, ast.Lambda) and n.lineno == c.co_firstlineno]
            if len(hits) != 1:
                return None
            seg = ast.get_source_segment(source, hits[0])
            return ("lambda", f"{name} = (\n{seg}\n)\n", c.co_firstlineno) if seg else None
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == value.__name__:
                start = min([d.lineno for d in n.decorator_list] + [n.lineno])
                if c.co_firstlineno in (start, n.lineno) and not n.decorator_list:
                    if name == n.name:
                        return ("def", textwrap.dedent("".join(lines[n.lineno - 1:n.end_lineno])),
                                n.lineno)
                    # Bound under another name only: define it under that name, keep its own.
                    orig = n.name
                    n.name = name
                    return ("def", f"{ast.unparse(n)}\n{name}.__name__ = {orig!r}\n"
                            f"{name}.__qualname__ = {orig!r}\n", n.lineno)
        return None

    def _record(self, names, keys, pickles, hints, deleted=(), cls_state=(), refs_ok=False):
        """Re-records `names` (the dirty ones, or all for a snapshot) and returns (entries, unpicklable) for a
        blob that brings a namespace from the previous recorded state to the current one.
        refs_ok: 'ref' entries allowed (deltas only: a snapshot must stand alone)."""
        g = self._g
        entries = []
        unpick = {}
        affected = set()
        # A rebound name now holding the very object another name held before this call (b = a,
        # the worker's _ -> __ -> ___ rotation) can be sent as a reference to that name's
        # previous value instead of a pickle, if the object did not change (same fingerprint).
        ref_cand = {}
        idx = self._idx
        for n in (names if refs_ok else ()):
            if n in hints:
                continue
            v = g[n]
            o = idx.get(id(v))
            if o is None:
                continue
            for m in sorted((o,) if type(o) is str else o):
                if (m != n and self._vals.get(m) is v and m not in self._cls
                        and self._fp.get(m) is not None):
                    ref_cand[n] = (m, self._fp[m])
                    break
        refs = {}
        for n in deleted:
            affected.update(self._grp.get(n, ()))
            self._forget(n)
            entries.append(("del", n))
        pkl_names = []
        for n in sorted(set(cls_state) - set(names)):
            # A session class whose data attributes changed in place: re-record those only.
            affected.update(self._grp.get(n, ()))
            affected.add(n)
            self._idx_remove(n)
            if self._track_class(n, g[n], pickles):
                pkl_names.append(n)
        for n in sorted(names):
            v = g[n]
            affected.update(self._grp.get(n, ()))
            affected.add(n)
            kind = None
            if n in hints:
                seq, skind, text = hints[n]
                kind = ("src", skind, text, seq)
            elif n in self._src and self._vals.get(n, _MISSING) is v:
                s = self._src[n]
                kind = ("src", s[1], s[2], s[0])
            else:
                m = self._match_source(n, v) if n in self._pending else None
                if m is None and type(v) is types.FunctionType and v.__globals__ is g and not (
                        v.__name__ != n and g.get(v.__name__) is v):
                    m = self._recover_source(n, v)
                if m is not None:
                    # re-executed in definition order: by cell, then by line in the cell
                    kind = ("src", m[0], m[1], self._cellseq * _LINES + min(m[2], _LINES - 1))
                elif isinstance(v, types.ModuleType):
                    mn = getattr(v, "__name__", None)
                    if (isinstance(mn, str) and sys.modules.get(mn) is v
                            and getattr(v, "__spec__", None) is not None and mn != "__main__"):
                        kind = ("mod", mn)
                    else:
                        kind = ("bad", f"{_type_name(v)} (module not importable by name)")
            if n in self._reach:
                self._idx_remove(n)
            self._src.pop(n, None)
            self._mods.pop(n, None)
            self._bad.pop(n, None)
            self._cls.pop(n, None)
            self._vals[n] = v
            self._fp[n] = None
            if kind is None:
                pkl_names.append(n)
                if type(v) in _SCALARS:  # no identity, no code: only the pickle matters
                    if n not in pickles:
                        pickles[n] = [pickle.dumps(v, _PROTOCOL), None, None, None, v]
                    self._codes[n] = _NO_CODES
                    continue
                rec = self._pickle1(v, pickles, n)
                if rec[0] is not None:
                    ids, codes = self._memo_reach(rec[3])
                    if n in ref_cand and self._fp_of(rec) == ref_cand[n][1]:
                        refs[n] = ref_cand[n][0]
                else:  # reported unpicklable below; its code still counts for candidates
                    ids, codes = self._walk(v, False)
                self._codes[n] = codes
                self._idx_add(n, ids)
                continue
            _ids, codes = self._walk(v, False)
            self._codes[n] = codes
            if kind[0] == "src":
                self._src[n] = (kind[3], kind[1], kind[2])
                if kind[1] == "class" and self._track_class(n, v, pickles):
                    pkl_names.append(n)
            elif kind[0] == "mod":
                self._mods[n] = kind[1]
            else:
                self._bad[n] = kind[1]
                unpick[n] = kind[1]

        # Alias groups of everything touched.
        for n in affected:
            self._grp.pop(n, None)
        groups = []
        placed = set()
        for n in sorted(affected):
            if n in placed or n not in keys or n not in self._vals or n in self._mods \
                    or n in self._bad or (n in self._src and n not in self._cls):
                continue
            comp = self._component(n, keys)
            placed.update(comp)
            if len(comp) > 1:
                fz = frozenset(comp)
                for m in comp:
                    self._grp[m] = fz
            groups.append(sorted(comp))
        dirty_pkl = set(pkl_names)
        pkl_entries = []
        ref_entries = []
        hash_fn = self._hash
        modname_b = self._modname_b
        for grp in groups:
            if len(grp) == 1:
                # Fast path (most names): a dirty singleton whose pickle names no session global.
                n = grp[0]
                if n not in dirty_pkl:
                    continue
                rec = pickles.get(n)
                if (rec is not None and rec[0] is not None and n not in refs
                        and n not in self._cls and modname_b not in rec[0]):
                    self._fp[n] = rec[2] if rec[2] is not None else hash_fn(rec[0]) & _MASK64
                    pkl_entries.append(("pkl", (n,), rec[0], ()))
                    continue
            dirty_here = dirty_pkl.intersection(grp)
            if not dirty_here:
                continue
            if all(d in refs for d in dirty_here):
                # Every changed member is an unchanged object the target already holds.
                for d in sorted(dirty_here):
                    self._fp[d] = self._fp_of(self._rec_of(d, pickles))
                    ref_entries.append(("ref", d, refs[d]))
                continue
            pkl_entries.extend(self._pickle_group(grp, pickles, unpick))

        src = self._src
        src_entries = sorted(
            (("src", n, src[n][0], src[n][1], src[n][2]) for n in names if n in src),
            key=lambda e: e[2])
        for n in sorted(names):
            if n in self._mods:
                entries.append(("mod", n, self._mods[n]))
            elif n in self._bad:
                entries.append(("bad", n, self._bad[n]))
        dels = [e for e in entries if e[0] == "del"]
        rest = [e for e in entries if e[0] != "del"]
        return ref_entries + dels + src_entries + rest + pkl_entries, unpick

    def _track_class(self, n, cls, pickles):
        """Records the data attributes of a source-made class: fingerprint, and (when there are
        any) alias-group membership through the objects they hold. True if it has some."""
        st = self._class_state(cls)
        if st is None:
            self._fp[n] = None
            return False
        rec = self._pickle1(st, pickles, n)
        self._fp[n] = self._fp_of(rec)
        if not st or rec[0] is None:
            return False
        self._cls[n] = True
        ids, _codes = self._memo_reach(rec[3])
        ids.discard(id(st))
        self._idx_add(n, ids)
        return True

    def _class_state(self, cls):
        """A session class's data attributes {name: value} (not methods, descriptors or
        dunders): each attribute that pickles on its own and refers to nothing unrestorable
        (the others are re-created by the class source). None for values that are not plain
        classes (other metaclasses, e.g. Enum, manage their own attributes)."""
        if not isinstance(cls, type) or type(cls) not in _PLAIN_METAS:
            return None
        state = {}
        for k, v in list(vars(cls).items()):
            if (k.startswith("__") and k.endswith("__")) or isinstance(v, _NOT_STATE):
                continue
            try:
                data = pickle.dumps(v, _PROTOCOL)
            except Exception:  # e.g. a lock as a class attribute: re-created by the source
                continue
            if self._check_refs(data):
                continue
            state[k] = v
        return state

    def _forget(self, n):
        self._idx_remove(n)
        for d in (self._vals, self._fp, self._codes, self._src, self._mods, self._bad,
                  self._grp, self._cls):
            d.pop(n, None)

    def _check_refs(self, data):
        if self._modname_b in data:
            refs = _session_refs(data, self._modname)
            bad = [r for r in refs if r not in self._src]
            if bad:
                return ", ".join(sorted(bad))
        return None

    def _mark_bad(self, n, reason, unpick):
        self._idx_remove(n)
        if self._cls.pop(n, None):
            # A class's data attributes that cannot be saved: the class source still restores
            # the class (with its initial attributes); reported, not silently dropped.
            unpick[n] = f"class attributes of {n} ({reason})"
            return
        self._bad[n] = reason
        self._fp[n] = None
        unpick[n] = reason

    def _rec_of(self, n, pickles):
        hit = pickles.get(n)
        if hit is not None:
            return hit
        v = self._g[n]
        if n in self._cls:
            v = self._class_state(v)
        return self._pickle1(v, pickles, n)

    def _pickle_group(self, grp, pickles, unpick):
        """Entries for one alias group: one 'pkl' of all members, or, when some members cannot
        be saved, 'bad' entries for those and one 'pkl' of the rest."""
        out = []
        members = list(grp)
        cls = self._cls
        while members:
            if len(members) == 1:
                n = members[0]
                rec = self._rec_of(n, pickles)
                data, err = rec[0], rec[1]
                if data is not None:
                    missing = self._check_refs(data)
                    if missing:
                        err = self._missing_reason(rec[4], missing)
                        data = None
                if data is None:
                    self._mark_bad(n, err, unpick)
                    if n not in cls:
                        out.append(("bad", n, err))
                else:
                    self._fp[n] = self._fp_of(rec)
                    out.append(("pkl", (n,), data, (n,) if n in cls else ()))
                return out
            try:
                data = pickle.dumps(tuple(self._rec_of(n, pickles)[4] for n in members),
                                    _PROTOCOL)
                missing = self._check_refs(data)
            except Exception:
                data, missing = None, True
            if data is not None and not missing:
                for n in members:
                    self._fp[n] = self._fp_of(self._rec_of(n, pickles))
                out.append(("pkl", tuple(members), data, tuple(n for n in members if n in cls)))
                return out
            keep = []
            for n in members:
                rec = self._rec_of(n, pickles)
                d1, err = rec[0], rec[1]
                if d1 is not None:
                    miss = self._check_refs(d1)
                    if miss:
                        d1, err = None, self._missing_reason(rec[4], miss)
                if d1 is None:
                    self._mark_bad(n, err, unpick)
                    if n not in cls:
                        out.append(("bad", n, err))
                else:
                    keep.append(n)
            if len(keep) == len(members):
                # Each pickles alone but not together: give up on shared identity for them.
                for n in keep:
                    rec = self._rec_of(n, pickles)
                    self._fp[n] = self._fp_of(rec)
                    out.append(("pkl", (n,), rec[0], (n,) if n in cls else ()))
                return out
            members = keep
        return out

    def _missing_reason(self, value, missing):
        if isinstance(value, (types.FunctionType, type)) and value.__name__ == "<lambda>":
            return _reason(value, None)
        return (f"{_type_name(value)} (refers to {self._modname}.{missing}, which has no "
                "tracked source to re-create it)")

    def _apply_entry(self, e, hints):
        g = self._g
        tag = e[0]
        if tag == "src":
            _tag, name, seq, skind, text = e
            fname = f"<capsule-restore {name}>"
            code = compile(text, fname, "exec", 0, True)
            linecache.cache[fname] = (len(text), None, text.splitlines(keepends=True), fname)
            exec(code, g)
            if name not in g:
                raise NameError(f"{skind} source did not bind {name!r}")
            hints[name] = (seq, skind, text)
            self._cellseq = max(self._cellseq, seq // _LINES + 1)
            return (name,)
        if tag == "mod":
            g[e[1]] = importlib.import_module(e[2])
            return (e[1],)
        names, data, classes = e[1], e[2], e[3]
        for n in classes:
            if not isinstance(g.get(n), type):
                raise NameError(f"class {n!r} is not defined")
        value = pickle.loads(data)
        if len(names) == 1:
            value = (value,)
        elif not isinstance(value, tuple) or len(value) != len(names):
            raise ValueError("group pickle does not match its names")
        for n, v in zip(names, value):
            if n in classes:
                if not isinstance(v, dict):
                    raise ValueError(f"class attributes of {n!r} are not a dict")
                for k, x in v.items():
                    setattr(g[n], k, x)
            else:
                g[n] = v
        return tuple(n for n in names if n not in classes)

    def _encode(self, kind, entries):
        body = pickle.dumps(entries, _PROTOCOL)
        h = self._hash(body) & _MASK64
        return bytes((FORMAT_VERSION, kind)) + h.to_bytes(8, "little") + body

    def _decode(self, blob):
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise ValueError(f"namespace blob must be bytes, not {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) < _HEADER + 1:
            raise ValueError(f"namespace blob too short ({len(blob)} bytes)")
        if blob[0] != FORMAT_VERSION:
            raise ValueError(f"unsupported namespace blob version {blob[0]} "
                             f"(this worker reads {FORMAT_VERSION})")
        kind = blob[1]
        if kind not in (_KIND_DELTA, _KIND_SNAPSHOT):
            raise ValueError(f"unknown namespace blob kind {kind:#x}")
        body = blob[_HEADER:]
        want = int.from_bytes(blob[2:_HEADER], "little")
        if self._hash(body) & _MASK64 != want:
            raise ValueError("namespace blob checksum mismatch (corrupted or truncated)")
        try:
            entries = _BlobUnpickler(io.BytesIO(body)).load()
        except Exception as exc:
            raise ValueError(f"namespace blob body unreadable: {exc}") from None
        if not isinstance(entries, list):
            raise ValueError("namespace blob body is not an entry list")
        for e in entries:
            if not isinstance(e, tuple) or not e or not isinstance(e[0], str):
                raise ValueError(f"malformed namespace blob entry {e!r:.80}")
            tag = e[0]
            ok = False
            if tag == "del":
                ok = len(e) == 2 and isinstance(e[1], str)
            elif tag in ("bad", "ref"):
                ok = len(e) == 3 and isinstance(e[1], str) and isinstance(e[2], str)
            elif tag == "mod":
                ok = len(e) == 3 and isinstance(e[1], str) and isinstance(e[2], str)
            elif tag == "src":
                ok = (len(e) == 5 and isinstance(e[1], str) and isinstance(e[2], int)
                      and isinstance(e[3], str) and isinstance(e[4], str))
            elif tag == "pkl":
                ok = (len(e) == 4 and isinstance(e[1], tuple) and e[1]
                      and all(isinstance(n, str) for n in e[1]) and isinstance(e[2], bytes)
                      and isinstance(e[3], tuple) and set(e[3]) <= set(e[1]))
            if not ok:
                raise ValueError(f"malformed namespace blob entry {e!r:.80}")
            names = e[1] if tag == "pkl" else (e[1],)
            for n in names:
                if n in self._skip or n.startswith(RESERVED_PREFIX):
                    raise ValueError(f"namespace blob names a reserved name {n!r}")
        return kind, entries


_MISSING = object()
_SCALARS = frozenset({str, bytes, int, float, complex, bool, type(None)})
_NO_CODES = frozenset()
_LINES = 1 << 24  # source seq = cell number * _LINES + line
_PLAIN_METAS = (type,)
try:
    import abc as _abc

    _PLAIN_METAS = (type, _abc.ABCMeta)
except ImportError:  # pragma: no cover
    pass
_NOT_STATE = (types.FunctionType, staticmethod, classmethod, property,
              types.MemberDescriptorType, types.GetSetDescriptorType, type(len))
