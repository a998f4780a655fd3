"""Unit tests of _capsule_ns (run with /usr/bin/python3.11; registered as ctest pyworker.ns_unit).

Each test runs cells in a Session (the worker's way: before_cell, exec, after_cell), then
restores the deltas (or a snapshot plus deltas) into a FRESH namespace registered under the same
module name, and compares name by name. TestFreshProcess does the same across two separate
/usr/bin/python3.11 processes: one runs the cells and ships the blobs, a new one applies them."""

import base64
import gc
import itertools
import json
import os
import subprocess
import sys
import unittest

import nshelp
from nshelp import Session, canon, describe

_capsule_ns = nshelp._capsule_ns
_mod_counter = itertools.count()


def fresh_name():
    return f"capsule_ns_t{next(_mod_counter)}"


class Base(unittest.TestCase):
    def setUp(self):
        self.modname = fresh_name()
        self.s = Session(self.modname)
        self.blobs = []

    def tearDown(self):
        sys.modules.pop(self.modname, None)

    def run_cell(self, src, **kw):
        blob, info = self.s.run(src, **kw)
        self.blobs.append(blob)
        self.assertEqual(info["size"], len(blob))
        return info

    def restore(self, blobs=None):
        """A fresh namespace (same module name) that applies blobs; returns (session, results)."""
        origin = self.s
        r = Session(self.modname)
        results = [r.apply(b) for b in (self.blobs if blobs is None else blobs)]
        self.addCleanup(lambda: sys.modules.__setitem__(self.modname, origin.mod))
        return r, results

    def assertSameNamespace(self, r, skip=()):
        names = [n for n in self.s.names() if n not in skip]
        self.assertEqual([n for n in r.names() if n not in skip], names)
        self.assertEqual(describe(r.g, names), describe(self.s.g, names))


class TestValues(Base):
    def test_ints_strings_roundtrip(self):
        i1 = self.run_cell("a = 1\nb = 'two'\nc = 3.5\nd = None\ne = b'\\x00bytes'\nf = 10**40")
        self.assertEqual(i1["added"], ["a", "b", "c", "d", "e", "f"])
        i2 = self.run_cell("a = 2\nb += '!'")
        self.assertEqual(i2["changed"], ["a", "b"])
        self.assertEqual(i2["added"] + i2["mutated"] + i2["deleted"], [])
        r, res = self.restore()
        self.assertEqual(res[-1]["failed"], {})
        self.assertSameNamespace(r)
        self.assertEqual(r.g["b"], "two!")

    def test_nested_containers_mutated_in_place(self):
        self.run_cell("d = {'k': [1, {'s': {1, 2}}], 't': (1, [2])}\nl = [[0], [1]]\nu = 5")
        i = self.run_cell("d['k'][1]['s'].add(3)")
        self.assertEqual((i["mutated"], i["changed"]), (["d"], []))
        i = self.run_cell("d['t'][1].append(9)\nl[1].append(2)")
        self.assertEqual(i["mutated"], ["d", "l"])
        i = self.run_cell("x = len(d)")
        self.assertEqual((i["added"], i["mutated"]), (["x"], []))
        r, _ = self.restore()
        self.assertSameNamespace(r)
        self.assertEqual(r.g["d"]["k"][1]["s"], {1, 2, 3})
        self.assertEqual(r.g["d"]["t"][1], [2, 9])

    def test_instance_attribute_mutation(self):
        self.run_cell("class P:\n    def __init__(self, v):\n        self.v = v\np = P(1)")
        i = self.run_cell("p.v = 5")
        self.assertEqual(i["mutated"], ["p"])
        r, _ = self.restore()
        self.assertEqual(r.g["p"].v, 5)
        self.assertIs(type(r.g["p"]), r.g["P"])

    def test_underscore_names_tracked_builtins_not(self):
        i = self.run_cell("_ = 4\n__ = 3\n___ = 2\n__doc__ = 'x'")
        self.assertEqual(i["added"], ["_", "__", "___"])
        self.s.g["__capsule_internal"] = object()  # worker-reserved prefix
        i = self.run_cell("_ = 5")
        self.assertEqual((i["changed"], i["added"]), (["_"], []))
        r, _ = self.restore()
        self.assertEqual([r.g[n] for n in ("_", "__", "___")], [5, 3, 2])
        self.assertNotIn("__capsule_internal", r.g)
        blob = self.s.ns.snapshot()[0]
        self.assertNotIn(b"__builtins__", blob)

    def test_exclude_parameter(self):
        g = {"__name__": "x_ex", "injected": 1}
        ns = _capsule_ns.Namespace(g, nshelp.h64, exclude=("injected", "later"))
        g["later"] = 2
        g["mine"] = 3
        code = compile("mine = 3", "<c>", "exec")
        ns.before_cell("1", "mine = 3", code)
        _blob, info = ns.after_cell(code)
        self.assertEqual(info["added"], ["mine"])
        self.assertEqual(ns.snapshot()[1]["added"], ["mine"])

    def test_deletion(self):
        self.run_cell("x = [1]\ny = 2\ndef f():\n    return 1\nimport json")
        i = self.run_cell("del x, f, json")
        self.assertEqual(i["deleted"], ["f", "json", "x"])
        r, res = self.restore()
        self.assertEqual(res[-1]["deleted"], ["f", "json", "x"])
        self.assertSameNamespace(r)
        self.assertNotIn("x", r.g)
        # Deleting a name the target holds (a delta applied onto a namespace that has it).
        r2, _ = self.restore(self.blobs[:1])
        self.assertIn("x", r2.g)
        r2.apply(self.blobs[1])
        self.assertNotIn("x", r2.g)
        self.assertNotIn("f", r2.g)

    def test_cell_that_raises_keeps_partial_changes(self):
        self.run_cell("acc = []")
        i = self.run_cell("acc.append(1)\nnew = 2\nraise ValueError('boom')",
                          expect_error=ValueError)
        self.assertEqual((i["added"], i["mutated"]), (["new"], ["acc"]))
        r, _ = self.restore()
        self.assertSameNamespace(r)

    def test_async_cell(self):
        self.run_cell("import asyncio\nres = []")
        i = self.run_cell("await asyncio.sleep(0)\nres.append(1)\nafter = 'x'")
        self.assertEqual((i["added"], i["mutated"]), (["after"], ["res"]))
        r, _ = self.restore()
        self.assertSameNamespace(r)


class TestAliasing(Base):
    def test_b_is_a(self):
        i = self.run_cell("a = [1, 2]\nb = a\nt = (a, 3)")
        self.assertEqual(i["added"], ["a", "b", "t"])
        i = self.run_cell("b.append(3)")
        self.assertEqual(i["mutated"], ["a", "b", "t"])
        r, _ = self.restore()
        self.assertIs(r.g["a"], r.g["b"])
        self.assertIs(r.g["t"][0], r.g["a"])
        r.g["a"].append(4)
        self.assertEqual(r.g["b"], [1, 2, 3, 4])

    def test_one_list_in_two_dicts(self):
        self.run_cell("shared = [0]\nd1 = {'k': shared}\nd2 = {'k': shared}\ndel shared")
        i = self.run_cell("d1['k'].append(1)")
        self.assertEqual(i["mutated"], ["d1", "d2"])
        r, _ = self.restore()
        self.assertIs(r.g["d1"]["k"], r.g["d2"]["k"])
        self.assertEqual(r.g["d2"]["k"], [0, 1])

    def test_delta_changes_one_member_of_a_group(self):
        self.run_cell("a = [1]\nb = a\nc = {'x': a}")
        i = self.run_cell("b = [9]")  # b leaves the group; a and c still share
        self.assertEqual((i["changed"], i["mutated"]), (["b"], []))
        i = self.run_cell("a.append(2)")
        self.assertEqual(i["mutated"], ["a", "c"])
        i = self.run_cell("e = c['x']")  # joins a's group: the group is re-sent together
        self.assertEqual(i["added"], ["e"])
        i = self.run_cell("c['x'] = []")  # c leaves the group
        self.assertEqual(i["mutated"], ["c"])
        i = self.run_cell("e.append(3)")
        self.assertEqual(i["mutated"], ["a", "e"])
        r, _ = self.restore()
        self.assertSameNamespace(r)
        self.assertIs(r.g["e"], r.g["a"])
        self.assertIsNot(r.g["c"]["x"], r.g["a"])
        self.assertIsNot(r.g["b"], r.g["a"])

    def test_references_instead_of_pickles(self):
        big = self.run_cell("big = list(range(50000))")["size"]
        self.assertGreater(big, 50000)
        self.assertLess(self.run_cell("_ = big")["size"], 200)  # the worker's `_ = value`
        i = self.run_cell("__ = _\n_ = 7")  # rotation: __ takes what _ held
        self.assertLess(i["size"], 200)
        self.assertEqual(i["changed"], ["_"])
        self.assertEqual(i["added"], ["__"])
        i = self.run_cell("___ = __\n__ = _\n_ = 8")
        self.assertLess(i["size"], 200)
        i = self.run_cell("keep = big\ndel big")
        self.assertLess(i["size"], 200)
        i = self.run_cell("x = [1]\ny = [2]")
        i = self.run_cell("x, y = y, x")  # a swap: both refer to the other's previous value
        self.assertLess(i["size"], 200)
        i = self.run_cell("keep.append(-1)\nmore = keep")  # changed object: pickled, not referred
        self.assertGreater(i["size"], 50000)
        r, res = self.restore()
        self.assertEqual([x["failed"] for x in res if x["failed"]], [])
        self.assertIs(r.g["___"], r.g["keep"])
        self.assertIs(r.g["more"], r.g["keep"])
        self.assertEqual(r.g["keep"][-1], -1)
        self.assertEqual((r.g["x"], r.g["y"], r.g["_"], r.g["__"]), ([2], [1], 8, 7))
        self.assertNotIn("big", r.g)
        self.assertSameNamespace(r)
        # A reference whose source the target does not hold is listed, not guessed.
        r2, res2 = self.restore([self.blobs[1]])
        self.assertIn("_", res2[0]["failed"])

    def test_group_survives_snapshot_plus_deltas(self):
        self.run_cell("a = {'v': []}\nb = a['v']")
        snap = self.s.ns.snapshot()[0]
        self.run_cell("b.append(1)")
        self.run_cell("c = b")
        r, _ = self.restore([snap] + self.blobs[1:])
        self.assertIs(r.g["a"]["v"], r.g["b"])
        self.assertIs(r.g["c"], r.g["b"])
        self.assertEqual(r.g["a"], {"v": [1]})


# a class that counts how often its instances are pickled
COUNTED = ("class Counted:\n"
           "    n = 0\n"
           "    def __reduce__(self):\n"
           "        Counted.n += 1\n"
           "        return (Counted, ())\n")


class TestCandidates(Base):
    def test_function_mutating_a_global(self):
        self.run_cell("log = []\nother = []\ndef add(v):\n    log.append(v)")
        i = self.run_cell("add(1)")
        self.assertEqual(i["mutated"], ["log"])
        self.run_cell("def outer():\n    add(2)")
        i = self.run_cell("outer()")  # transitively: outer -> add -> log
        self.assertEqual(i["mutated"], ["log"])
        self.run_cell("hs = {'a': add}")
        i = self.run_cell("hs['a'](3)")  # a function reached through a container
        self.assertEqual(i["mutated"], ["log"])
        r, _ = self.restore()
        self.assertEqual(r.g["log"], [1, 2, 3])
        r.g["hs"]["a"](4)
        self.assertEqual(r.g["log"], [1, 2, 3, 4])

    def test_method_mutating_a_global(self):
        self.run_cell("seen = []\nclass C:\n    def hit(self):\n        seen.append(1)\nc = C()")
        i = self.run_cell("c.hit()")
        self.assertEqual(i["mutated"], ["seen"])

    def test_escape_hatch_globals(self):
        self.run_cell("x = [1]")
        i = self.run_cell("globals()['x'].append(2)")
        self.assertEqual(i["mutated"], ["x"])
        i = self.run_cell("exec('x.append(3)')")
        self.assertEqual(i["mutated"], ["x"])

    def test_rebinding_found_without_the_name_in_code(self):
        self.run_cell("x = 1")
        self.s.g["x"] = 2  # e.g. the worker setting `_`, or C code
        i = self.run_cell("pass")
        self.assertEqual(i["changed"], ["x"])

    def test_small_cell_does_not_fingerprint_everything(self):
        self.run_cell(
            COUNTED + "".join(f"v{i} = Counted()\n" for i in range(50)) + "x5 = 1")
        before = self.s.g["Counted"].n
        i = self.run_cell("x5 = 7")
        self.assertEqual(i["changed"], ["x5"])
        self.assertEqual(self.s.g["Counted"].n, before)  # no v* was pickled
        self.run_cell("v3.tag = 1")
        self.assertEqual(self.s.g["Counted"].n, before + 1)  # only v3

    def test_cell_that_changes_nothing(self):
        # the shortcut for a cell with no rebinding and no candidate (`2+2`, `print(1)`): the
        # same empty delta as the full path, nothing pickled, and the next delta still chains
        self.run_cell(COUNTED + "v = Counted()\nx = [1]")
        before = self.s.g["Counted"].n
        empty = self.s.ns._encode(_capsule_ns._KIND_DELTA, [])
        for src in ("2+2", "print(end='')", "pass"):
            i = self.run_cell(src)
            self.assertEqual(self.blobs[-1], empty)
            self.assertEqual((i["added"], i["changed"], i["mutated"], i["deleted"],
                              i["unpicklable"]), ([], [], [], [], {}))
        self.assertEqual(self.s.g["Counted"].n, before)
        self.s.g["x"].append(2)  # mutated outside any cell: seen once the name is named
        self.assertEqual(self.run_cell("2+2")["mutated"], [])
        self.assertEqual(self.run_cell("len(x)")["mutated"], ["x"])
        r, _ = self.restore()
        self.assertSameNamespace(r)

    def test_after_cell_tuple_is_after_cell(self):
        # the worker's form of a delta (after_cell_tuple) against delta_tuple(after_cell), cell
        # by cell in twin namespaces; the empty delta's tuple is shared from the second on
        cells = ["x = [1]\ny = x\nimport os", "2+2", "x.append(2)", "del y\nz = open",
                 "2+2", "pass"]
        twins = [Session(fresh_name()), Session(fresh_name())]
        self.addCleanup(lambda: [sys.modules.pop(t.mod.__name__, None) for t in twins])
        empties = []
        for src in cells:
            code = compile(src, "<twin>", "exec")
            got = []
            for t, tuple_form in zip(twins, (False, True)):
                t.ns.before_cell("1", src, code)
                exec(code, t.g)
                got.append(t.ns.after_cell_tuple(code) if tuple_form
                           else _capsule_ns.delta_tuple(*t.ns.after_cell(code)))
            self.assertEqual(got[1], got[0])
            if got[1][0] == twins[1].ns._encode(_capsule_ns._KIND_DELTA, []):
                empties.append(got[1])
        self.assertEqual(len(empties), 3)
        self.assertIs(empties[1], empties[2])


class TestSource(Base):
    def test_functions_lambdas_decorated(self):
        self.run_cell(
            "import functools\n"
            "def deco(fn):\n"
            "    @functools.wraps(fn)\n"
            "    def w(*a):\n"
            "        return fn(*a) * 10\n"
            "    return w\n"
            "@deco\n"
            "def plus(a, b=1):\n"
            "    return a + b\n"
            "@functools.lru_cache(maxsize=None)\n"
            "def fib(n):\n"
            "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
            "sq = lambda x: x * x\n"
            "twice = (lambda f: lambda x: f(f(x)))\n"
            "async def co():\n"
            "    return 5\n")
        i = self.run_cell("pick = (lambda v: v + 100) if True else None")
        self.assertEqual(i["unpicklable"], {})
        r, res = self.restore()
        self.assertEqual(res[0]["failed"], {})
        self.assertEqual(r.g["plus"](1), 20)
        self.assertEqual(r.g["plus"].__name__, "plus")
        self.assertEqual(r.g["fib"](30), 832040)
        self.assertEqual(r.g["sq"](7), 49)
        self.assertEqual(r.g["twice"](r.g["sq"])(3), 81)
        self.assertEqual(r.g["pick"](1), 101)
        import asyncio

        self.assertEqual(asyncio.run(r.g["co"]()), 5)
        import inspect

        self.assertIn("return a + b", inspect.getsource(r.g["plus"]))

    def test_redefinition_and_alias(self):
        self.run_cell("def f():\n    return 1\nh = f")
        self.run_cell("def f():\n    return 2")
        r, _ = self.restore()
        self.assertEqual((r.g["f"](), r.g["h"]()), (2, 1))
        # h (bound to the old f) in a snapshot now: re-created from the cell's source.
        blob, info = self.s.ns.snapshot()
        r2, res = self.restore([blob])
        self.assertEqual(res[0]["failed"], {})
        self.assertEqual((r2.g["f"](), r2.g["h"]()), (2, 1))

    def test_rebinding_chain_after_def(self):
        i = self.run_cell("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
                          "import functools\nfib = functools.lru_cache()(fib)  # wrap it\n"
                          "def g():\n    return 1\ng = 5; other = 6\n")
        self.assertEqual(i["unpicklable"], {})
        r, res = self.restore()
        self.assertEqual(res[0]["failed"], {})
        self.assertEqual(r.g["fib"](60), 1548008755920)
        self.assertTrue(hasattr(r.g["fib"], "cache_info"))
        self.assertEqual((r.g["g"], r.g["other"]), (5, 6))
        i = self.run_cell("def w():\n    return 2\nx = 1; w = functools.wraps(w)(lambda: 3)")
        self.assertIn("w", i["unpicklable"])  # not separable from `x = 1`: reported, not guessed

    def test_sources_run_in_definition_order(self):
        self.run_cell("import functools\ndef base():\n    return 1\n")
        self.run_cell("@functools.lru_cache()\ndef top():\n    return base() + 1\n"
                      "import math\nclass K:\n    pi = math.pi\n")
        r, res = self.restore([self.s.ns.snapshot()[0]])
        self.assertEqual(res[0]["failed"], {})
        self.assertEqual((r.g["top"](), r.g["K"].pi), (2, 3.141592653589793))

    def test_function_defined_in_if_branch(self):
        self.run_cell("if 1 > 0:\n    def f():\n        return 'then'\nelse:\n"
                      "    def f():\n        return 'else'")
        r, _ = self.restore()
        self.assertEqual(r.g["f"](), "then")

    def test_classes_and_instances(self):
        self.run_cell(
            "import dataclasses\n"
            "@dataclasses.dataclass\n"
            "class Pt:\n"
            "    x: int\n"
            "    y: int = 0\n"
            "    def norm(self):\n"
            "        return self.x * self.x + self.y * self.y\n"
            "class Sub(Pt):\n"
            "    @property\n"
            "    def neg(self):\n"
            "        return Pt(-self.x, -self.y)\n"
            "p = Pt(3, 4)\n"
            "q = Sub(1, 2)\n"
            "pts = [p, q, Pt(5)]\n")
        self.run_cell("p.x = 6")
        r, res = self.restore()
        self.assertEqual(res[0]["failed"], {})
        self.assertIs(type(r.g["p"]), r.g["Pt"])
        self.assertEqual(r.g["p"], r.g["Pt"](6, 4))
        self.assertEqual(r.g["q"].neg, r.g["Pt"](-1, -2))
        self.assertIs(r.g["pts"][0], r.g["p"])
        self.assertEqual(r.g["pts"][2].norm(), 25)
        self.assertSameNamespace(r)

    def test_class_redefined_old_instance_reported(self):
        self.run_cell("class K:\n    pass\nk = K()")
        i = self.run_cell("class K:\n    pass\nk.x = 1")
        self.assertIn("k", i["unpicklable"])
        self.assertTrue(i["unpicklable"]["k"].startswith(f"{self.modname}.K ("))
        r, res = self.restore()
        self.assertIn("k", res[-1]["failed"])
        self.assertNotIn("k", r.g)

    def test_imports(self):
        i = self.run_cell("import os\nimport os.path as p\nfrom collections import OrderedDict as OD\n"
                          "import xml.etree.ElementTree\nfrom json import dumps, loads as ld\n"
                          "import importlib\nmm = importlib.import_module('string')\n"
                          "try:\n    import no_such_module_xyz as nsm\nexcept ImportError:\n"
                          "    nsm = None\n")
        self.assertEqual(i["unpicklable"], {})
        r, res = self.restore()
        self.assertEqual(res[0]["failed"], {})
        import collections
        import json
        import os
        import string
        import xml.etree.ElementTree as ET

        self.assertIs(r.g["os"], os)
        self.assertIs(r.g["p"], os.path)
        self.assertIs(r.g["OD"], collections.OrderedDict)
        self.assertIs(r.g["xml"].etree.ElementTree, ET)
        self.assertIs(r.g["dumps"], json.dumps)
        self.assertIs(r.g["ld"], json.loads)
        self.assertIs(r.g["mm"], string)
        self.assertIsNone(r.g["nsm"])
        self.assertSameNamespace(r)

    def test_function_without_source_reported(self):
        self.s.g["__capsule_x"] = 0
        i = self.run_cell("exec('def nosrc():\\n    return 1')\nok = 1")
        self.assertIn("nosrc", i["unpicklable"])
        self.assertIn("no tracked source", i["unpicklable"]["nosrc"])
        # named again (called) by later cells: not re-recorded, not reported again
        i = self.run_cell("y = nosrc()")
        self.assertEqual(i["unpicklable"], {})
        self.assertEqual(i["mutated"], [])
        i = self.run_cell("exec('def nosrc():\\n    return 2')")  # rebound: reported again
        self.assertIn("nosrc", i["unpicklable"])
        i = self.run_cell("fs = [lambda: 1]")
        self.assertIn("fs", i["unpicklable"])
        r, res = self.restore()
        self.assertEqual([set(x["failed"]) for x in res], [{"nosrc"}, set(), {"nosrc"}, {"fs"}])
        self.assertEqual((r.g["ok"], r.g["y"]), (1, 1))


class TestClassState(Base):
    def test_class_attributes_mutated_in_place(self):
        i = self.run_cell("class Reg:\n    items = []\n    count = 0\n    def add(self, x):\n"
                          "        Reg.items.append(x)\n        Reg.count += 1\nr = Reg()")
        self.assertEqual(i["added"], ["Reg", "r"])
        i = self.run_cell("r.add(5)")
        self.assertEqual(i["mutated"], ["Reg"])
        i = self.run_cell("Reg.count += 10")
        self.assertEqual(i["mutated"], ["Reg"])
        r, res = self.restore()
        self.assertEqual(r.g["Reg"].items, [5])
        self.assertEqual(r.g["Reg"].count, 11)
        self.assertIs(type(r.g["r"]), r.g["Reg"])  # the class object was not re-created
        snap = self.s.ns.snapshot()[0]
        r2, _ = self.restore([snap])
        self.assertEqual((r2.g["Reg"].items, r2.g["Reg"].count), ([5], 11))

    def test_class_attribute_shares_with_a_name(self):
        self.run_cell("log = [0]\nclass K:\n    seen = None\nK.seen = log\nK.n = 1")
        i = self.run_cell("log.append(1)")
        self.assertEqual(i["mutated"], ["K", "log"])
        r, res = self.restore()
        self.assertEqual([x["failed"] for x in res], [{}, {}])
        self.assertIs(r.g["K"].seen, r.g["log"])
        self.assertEqual((r.g["log"], r.g["K"].n), ([0, 1], 1))
        r2, _ = self.restore([self.s.ns.snapshot()[0]])
        self.assertIs(r2.g["K"].seen, r2.g["log"])
        # the restored worker recorded the class state it was given: no spurious change
        blob, info = r.run("K")
        self.assertEqual(info["mutated"] + info["changed"], [])
        blob, info = r.run("K.n += 1")
        self.assertEqual(info["mutated"], ["K"])

    def test_enum_and_abc_classes(self):
        self.run_cell("import enum, abc\nclass Color(enum.Enum):\n    RED = 1\n    BLUE = 2\n"
                      "class Base(abc.ABC):\n    @abc.abstractmethod\n    def f(self): ...\n"
                      "class Impl(Base):\n    def f(self):\n        return 3\n"
                      "c = Color.BLUE\nimpl = Impl()\nx: int = 5\n")
        r, res = self.restore()
        self.assertEqual(res[0]["failed"], {})
        self.assertIs(r.g["c"], r.g["Color"].BLUE)
        self.assertEqual(r.g["impl"].f(), 3)
        self.assertEqual(r.g["__annotations__"], {"x": int})


class TestRobustness(Base):
    def test_failed_after_cell_is_followed_by_a_full_resync(self):
        self.run_cell("class Boom:\n    armed = False\n    def __reduce__(self):\n"
                      "        if Boom.armed:\n            raise KeyboardInterrupt\n"
                      "        return (Boom, ())\nbm = Boom()\nkeep = [1]")
        with self.assertRaises(KeyboardInterrupt):
            self.s.run("Boom.armed = True\nkeep.append(2)\nbm.x = 1")
        self.s.g["Boom"].armed = False
        blob, info = self.s.run("keep.append(3)")
        self.assertEqual(blob[1], ord("S"))
        self.assertIn("keep", info["added"])
        self.blobs.append(blob)
        r, res = self.restore()  # the lost delta is covered by the snapshot-kind blob
        self.assertEqual(r.g["keep"], [1, 2, 3])
        blob, info = self.s.run("keep.append(4)")
        self.assertEqual((blob[1], info["mutated"]), (ord("D"), ["keep"]))

    def test_large_containers(self):
        self.run_cell("big = list(range(200000))\nalias = big\nd = {i: str(i) for i in range(50000)}")
        i = self.run_cell("big.append(-1)")
        self.assertEqual(i["mutated"], ["alias", "big"])
        r, _ = self.restore()
        self.assertIs(r.g["big"], r.g["alias"])
        self.assertEqual(len(r.g["big"]), 200001)
        self.assertEqual(r.g["d"][49999], "49999")

    def test_reach_limit(self):
        old = _capsule_ns.REACH_LIMIT
        _capsule_ns.REACH_LIMIT = 50
        self.addCleanup(setattr, _capsule_ns, "REACH_LIMIT", old)
        i = self.run_cell("big = [[i] for i in range(200)]\nsame = big\nlate = big[199]")
        self.assertEqual(i["unpicklable"], {})
        self.assertLessEqual(len(self.s.ns._reach["big"]), 51)
        i = self.run_cell("big[0].append(-1)")
        self.assertEqual(i["mutated"], ["big", "same"])
        r, res = self.restore()
        self.assertEqual(res[0]["failed"], {})
        self.assertIs(r.g["same"], r.g["big"])  # found within the limit
        self.assertEqual(r.g["big"], self.s.g["big"])
        self.assertEqual(r.g["late"], [199])  # past the limit: the value, maybe not the identity

    def test_deeply_nested_value_reported(self):
        i = self.run_cell("deep = []\ncur = deep\nfor _i in range(100000):\n"
                          "    cur.append([])\n    cur = cur[0]\n")
        self.assertIn("deep", i["unpicklable"])
        r, res = self.restore()
        self.assertIn("deep", res[0]["failed"])


class TestUnpicklable(Base):
    def test_generators_files_locks_sockets(self):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ns_{os.getpid()}.txt")
        with open(path, "w") as fh:
            fh.write("x")
        self.addCleanup(os.unlink, path)
        i = self.run_cell(
            f"import threading, socket\ngen = (i for i in range(3))\nfh = open({path!r})\n"
            "lk = threading.Lock()\nsk = socket.socket()\nkeep = [1]\n"
            "def g2():\n    yield 1\nit = g2()\n")
        u = i["unpicklable"]
        self.assertEqual(set(u), {"gen", "fh", "lk", "sk", "it"})
        self.assertTrue(u["gen"].startswith("generator ("), u["gen"])
        self.assertTrue(u["fh"].startswith("_io.TextIOWrapper (open file"), u["fh"])
        self.assertTrue(u["lk"].startswith("_thread.lock ("), u["lk"])
        self.assertTrue(u["sk"].startswith("socket.socket ("), u["sk"])
        self.s.g["fh"].close()
        self.s.g["sk"].close()
        r, res = self.restore()
        self.assertEqual(set(res[0]["failed"]), set(u))
        for n in u:
            self.assertNotIn(n, r.g)
        self.assertEqual(r.g["keep"], [1])
        self.assertEqual(list(r.g["g2"]()), [1])

    def test_unpicklable_member_of_a_group(self):
        i = self.run_cell("import threading\na = [1]\nb = [a, threading.Lock()]")
        self.assertEqual(set(i["unpicklable"]), {"b"})
        i = self.run_cell("a.append(2)")
        self.assertEqual(i["mutated"], ["a"])
        r, res = self.restore()
        self.assertEqual(r.g["a"], [1, 2])
        self.assertIn("b", res[0]["failed"])
        self.assertNotIn("b", r.g)

    def test_value_that_was_unpicklable_becomes_picklable(self):
        self.run_cell("import threading\nx = threading.Lock()")
        i = self.run_cell("x = 3")
        self.assertEqual((i["changed"], i["unpicklable"]), (["x"], {}))
        r, _ = self.restore()
        self.assertEqual(r.g["x"], 3)


class TestSnapshots(Base):
    CELLS = [
        "a = 1\nl = [1]\nimport math\ndef f(x):\n    return math.sqrt(x) + a",
        "l.append(2)\nb = l\nclass C:\n    def __init__(self):\n        self.items = l",
        "c = C()\nd = {'c': c}\na = 2",
        "c.items.append(3)\ndel b",
        "l = [0]\ne = lambda z: z + 1",
        "d['new'] = e(1)\ndel f",
    ]

    def test_delta_chain_onto_snapshot_at_every_point(self):
        snaps = []
        for src in self.CELLS:
            self.run_cell(src)
            snaps.append(self.s.ns.snapshot())
        final = describe(self.s.g, self.s.names())
        for k, (snap, info) in enumerate(snaps):
            self.assertEqual(info["size"], len(snap))
            r, res = self.restore([snap] + self.blobs[k + 1:])
            self.assertEqual(describe(r.g, r.names()), final, f"snapshot after cell {k}")
            self.assertIs(r.g["c"].items, r.g["d"]["c"].items)
            for x in res:
                self.assertEqual(x["failed"], {})
        # and the plain chain
        r, _ = self.restore()
        self.assertEqual(describe(r.g, r.names()), final)

    def test_snapshot_leaves_the_delta_chain_whole(self):
        self.run_cell("class K:\n    pass\nk = K()\nk.v = 1")
        self.run_cell("class K:\n    pass")  # k is now an instance of a class no name holds
        blob, info = self.s.ns.snapshot()
        self.assertIn("k", info["unpicklable"])
        i = self.run_cell("k.v = 2")  # the next delta still says so (the snapshot changed nothing)
        self.assertEqual(i["mutated"], ["k"])
        self.assertIn("k", i["unpicklable"])
        r, res = self.restore()
        self.assertNotIn("k", r.g)
        self.assertIn("k", res[-1]["failed"])

    def test_snapshot_replaces_existing_names(self):
        self.run_cell("a = 1\nb = 2")
        snap = self.s.ns.snapshot()[0]
        r, _ = self.restore([])
        r.g["zzz"] = 1
        r.g["a"] = 5
        res = r.apply(snap)
        self.assertEqual(res["deleted"], ["zzz"])
        self.assertEqual((r.g["a"], r.g["b"]), (1, 2))
        self.assertNotIn("zzz", r.g)

    def test_restored_session_continues_with_deltas(self):
        self.run_cell("a = [1]\nb = a\ndef f():\n    a.append(len(a))")
        r, _ = self.restore()
        blob, info = r.run("f()")
        self.assertEqual(info["mutated"], ["a", "b"])
        self.assertEqual(info["added"] + info["changed"], [])
        blob2, info2 = r.run("pass")
        self.assertEqual(info2["added"] + info2["changed"] + info2["mutated"], [])


class TestMalformed(Base):
    def test_rejected_blobs_change_nothing(self):
        self.run_cell("x = [1, 2]\ndef f():\n    return 1")
        good = self.blobs[0]
        r, _ = self.restore([])
        r.g["keep"] = 1
        before = dict(r.g)
        flipped = bytearray(good)
        flipped[-3] ^= 0xFF
        other_hash = good[:2] + (1).to_bytes(8, "little") + good[10:]
        cases = {
            "not bytes": "abc",
            "empty": b"",
            "short": good[:5],
            "version": bytes([9]) + good[1:],
            "kind": good[:1] + b"Z" + good[2:],
            "checksum": bytes(flipped),
            "hash": other_hash,
            "truncated": good[:-4],
        }
        for label, blob in cases.items():
            with self.assertRaises(ValueError, msg=label):
                r.apply(blob)
            self.assertEqual(r.g, before, label)

    def _forge(self, ns, entries, kind=b"D"):
        import pickle

        body = pickle.dumps(entries, 5)
        return bytes([1]) + kind + (nshelp.h64(body)).to_bytes(8, "little") + body

    def test_malformed_bodies(self):
        import pickle

        r, _ = self.restore([])
        before = dict(r.g)
        bad_bodies = [
            {"a": 1},
            [("nope", "x")],
            [("del",)],
            [("del", 3)],
            [("pkl", (), b"")],
            [("pkl", ("a",), "str", ())],
            [("pkl", ("a",), b"x")],
            [("pkl", ("a",), b"x", ("b",))],
            [("src", "f", "1", "def", "x")],
            [("mod", "m")],
            [("del", "__builtins__")],
            [("del", "__capsule_x")],
            [("del", "ok"), ("bad", "x")],
        ]
        for body in bad_bodies:
            with self.assertRaises(ValueError, msg=repr(body)):
                r.apply(self._forge(r.ns, body))
            self.assertEqual(r.g, before)
        # a body that tries to load a global is refused before anything runs
        evil = b"\x80\x05cos\nsystem\n."  # GLOBAL os.system
        blob = bytes([1]) + b"D" + nshelp.h64(evil).to_bytes(8, "little") + evil
        with self.assertRaises(ValueError):
            r.apply(blob)

    def test_failing_entry_is_listed_not_dropped(self):
        import pickle

        r, _ = self.restore([])
        blob = self._forge(r.ns, [
            ("src", "f", 1, "def", "def f(:\n"),
            ("src", "h", 2, "def", "@undefined_decorator\ndef h():\n    pass\n"),
            ("mod", "m", "no_such_module_abc"),
            ("pkl", ("v",), b"garbage", ()),
            ("pkl", ("w",), pickle.dumps(5), ()),
        ])
        res = r.apply(blob)
        self.assertEqual(res["restored"], ["w"])
        self.assertEqual(set(res["failed"]), {"f", "h", "m", "v"})
        self.assertIn("NameError", res["failed"]["h"])
        self.assertEqual(r.g["w"], 5)

    def test_out_of_order_sources_are_retried(self):
        r, _ = self.restore([])
        blob = self._forge(r.ns, [
            ("src", "C", 1, "class", "class C:\n    size = N\n"),
            ("pkl", ("N",), __import__("pickle").dumps(7), ()),
        ])
        res = r.apply(blob)
        self.assertEqual(res["failed"], {})
        self.assertEqual(r.g["C"].size, 7)


def shape(g, names):
    """Values with their aliasing: every mutable object is numbered at its first visit (names
    in sorted order), later visits print the number, so equal shapes mean equal values AND the
    same sharing between and inside names."""
    seen = {}
    hold = []  # keeps every visited object alive, so no id is reused during the walk

    def walk(v):
        hold.append(v)
        t = type(v)
        if t in (int, float, str, bytes, bool, type(None)):
            return repr(v)
        if id(v) in seen:
            return f"@{seen[id(v)]}"
        if t in (list, dict, set) or hasattr(v, "__dict__") and not isinstance(v, type):
            seen[id(v)] = len(seen)
        tag = f"#{seen[id(v)]}" if id(v) in seen else ""
        if t in (list, tuple):
            return f"{tag}{t.__name__}[" + ",".join(walk(x) for x in v) + "]"
        if t is set:
            return f"{tag}set{{" + ",".join(sorted(walk(x) for x in v)) + "}"
        if t is dict:
            return f"{tag}{{" + ",".join(f"{walk(k)}:{walk(x)}" for k, x in v.items()) + "}"
        if callable(v):
            return f"fn:{getattr(v, '__qualname__', '?')}"
        if hasattr(v, "__dict__"):
            return f"{tag}{t.__qualname__}(" + walk(vars(v)) + ")"
        return repr(v)

    return {n: walk(g[n]) for n in sorted(names)}


class TestRandomized(Base):
    """Random cells over a few names (assign, append, alias, nest, share, delete, mutate
    instances, define and call functions); after every cell the delta chain, and a snapshot
    taken at a random earlier point plus the later deltas, restore the same values and the same
    sharing (compared with shape())."""

    def gen_cell(self, rnd, live):
        names = ["a", "b", "c", "d", "e"]
        n = rnd.choice(names)
        m = rnd.choice(names)
        ops = [f"{n} = [{rnd.randint(0, 9)}]",
               f"{n} = {{'k': {rnd.randint(0, 9)}}}",
               f"{n} = {rnd.randint(0, 999)}"]
        if m in live:
            ops += [f"{n} = {m}", f"{n} = [{m}, {m}]", f"{n} = {{'in': {m}}}"]
            if live[m] in ("list",):
                ops += [f"{m}.append({rnd.randint(0, 9)})", f"{m}.append({m}[:])",
                        f"{n} = {m}[-1]", f"{m}.append({n})" if n in live else "pass",
                        f"{m}[0] = []"]
            if live[m] == "dict":
                ops += [f"{m}['x{rnd.randint(0, 3)}'] = {rnd.randint(0, 9)}",
                        f"{n} = {m}.get('in', 0)", f"{m}['sub'] = {m}.get('in', [])"]
            if live[m] == "obj":
                ops += [f"{m}.v = [{m}.v]", f"{m}.bump()", f"{n} = {m}.v"]
            ops += [f"del {m}", f"{n} = [1]\nraise TypeError('half way')"]
        ops += [f"{n} = Box([{rnd.randint(0, 9)}])", "touch()", "rebind()",
                "Box.count = getattr(Box, 'count', 0) + 1\nBox.seen = log"]
        return rnd.choice(ops)

    def test_random_chains(self):
        import random

        rnd = random.Random(1234)
        self.run_cell("class Box:\n    def __init__(self, v):\n        self.v = v\n"
                      "    def bump(self):\n        self.v = [self.v, 1]\n"
                      "log = []\ndef touch():\n    log.append(len(log))\n"
                      "def rebind():\n    global e\n    e = [len(log), log]\n")
        snaps = [(1, self.s.ns.snapshot()[0])]
        cells = 0
        while cells < 120:
            live = {}
            for k in ("a", "b", "c", "d", "e"):
                if k in self.s.g:
                    v = self.s.g[k]
                    live[k] = ("list" if type(v) is list else "dict" if type(v) is dict
                               else "obj" if hasattr(v, "bump") else "atom")
            src = self.gen_cell(rnd, live)
            self.run_cell(src, expect_error=(NameError, AttributeError, TypeError, IndexError))
            cells += 1
            if rnd.random() < 0.15:
                snaps.append((len(self.blobs), self.s.ns.snapshot()[0]))
            if cells % 10:
                continue
            names = self.s.names()
            want = shape(self.s.g, names)
            box = self.s.g["Box"]
            want_cls = (getattr(box, "count", None), shape(vars(box), ["seen"]) if "seen" in
                        vars(box) else None)
            at, snap = rnd.choice(snaps)
            for chain in (self.blobs, [snap] + self.blobs[at:]):
                r, res = self.restore(chain)
                sys.modules[self.modname] = self.s.mod  # the origin goes on pickling
                self.assertEqual(r.names(), names, src)
                self.assertEqual(shape(r.g, names), want, f"after {cells} cells, last {src!r}")
                rbox = r.g["Box"]
                self.assertEqual((getattr(rbox, "count", None), shape(vars(rbox), ["seen"])
                                  if "seen" in vars(rbox) else None), want_cls)
                self.assertEqual([x["failed"] for x in res if x["failed"]], [])


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("raised", type(exc).__name__)


class TestRandomizedDefinitions(Base):
    """Random cells that (re)define functions, lambdas, decorated functions, aliases, imports,
    classes and their instances, class attributes and unpicklable values; after every few cells
    the chain and a snapshot plus the later deltas restore every name that can be restored, the
    others are listed as failed, and the restored functions, classes, instances and modules
    behave as the originals."""

    def gen_cell(self, rnd):
        r = rnd.randint(0, 99)
        g = self.s.g
        ops = [f"def f0():\n    return {r}", f"f0 = lambda: {r}",
               f"@functools.lru_cache()\ndef f1():\n    return {r}",
               f"def f1():\n    return f0() + {r}\nf1 = functools.wraps(f1)(f1)",
               "import json as m0", "import os.path as m0",
               "from collections import OrderedDict as m0",
               f"class K0:\n    k = {r}\n    def get(self):\n        return self.k + {r}",
               f"lk = threading.Lock()", f"lk = {r}", f"gen = (i for i in range({r}))"]
        ops += ["exec('def f3():\\n    return 3')", "hs = [f0, f1] if 'f1' in dir() else [f0]"
                if "f0" in g else "hs = []"]
        if "f0" in g:
            ops += ["f2 = f0", "del f0", "hs.append(f0)" if "hs" in g else "pass"]
        if "K0" in g:
            ops += ["i0 = K0()", f"K0.k = {r}", "i1 = [K0(), K0()]", "del K0"]
        if "i0" in g:
            ops += [f"i0.k = {r}", "del i0"]
        return rnd.choice(ops)

    def check(self, r, res):
        g = self.s.g
        names = self.s.names()
        failed = {}
        for x in res:
            failed.update(x["failed"])
        missing = set(names) - set(r.names())
        self.assertLessEqual(missing, set(failed))
        self.assertEqual(set(r.names()) - set(names), set())
        for n in sorted(set(names) - missing):
            v, w = g[n], r.g[n]
            if n in ("f0", "f1", "f2", "f3"):
                self.assertEqual(outcome(w), outcome(v), n)
            elif n == "K0":
                self.assertEqual((w.k, w().get()), (v.k, v().get()))
            elif n == "i0":
                self.assertEqual((w.k, w.get(), type(w).__name__), (v.k, v.get(), "K0"))
            elif n == "i1":
                self.assertEqual([x.get() for x in w], [x.get() for x in v])
            elif n == "m0":
                self.assertIs(w, v)
            elif n in ("lk", "gen"):
                self.assertEqual(type(w), type(v))
            elif n == "hs":
                self.assertEqual([outcome(x) for x in w], [outcome(x) for x in v])
        for n in missing:  # listed with a reason, and really not restorable as it is
            self.assertTrue(failed[n], n)

    def test_random_definitions(self):
        import random

        rnd = random.Random(99)
        self.run_cell("import functools, threading")
        snaps = [(1, self.s.ns.snapshot()[0])]
        for cells in range(1, 81):
            self.run_cell(self.gen_cell(rnd), expect_error=NameError)
            if rnd.random() < 0.2:
                snaps.append((len(self.blobs), self.s.ns.snapshot()[0]))
            if cells % 8:
                continue
            at, snap = rnd.choice(snaps)
            for chain in (self.blobs, [snap] + self.blobs[at:]):
                r, res = self.restore(chain)
                try:
                    self.check(r, res)
                finally:
                    sys.modules[self.modname] = self.s.mod


class TestFreshProcess(unittest.TestCase):
    """Restore into a fresh interpreter process, compared name by name."""

    PY = "/usr/bin/python3.11"
    CELLS = [
        "import os\nimport os.path as p\nfrom collections import OrderedDict as OD\n"
        "n = 42\ns = 'text'\nnested = {'a': [1, 2, {'b': {3, 4}}], 't': (1, 'x')}\n",
        "a = [1]\nb = a\nshared = ['s']\nd1 = {'k': shared}\nd2 = {'k': shared}\n",
        "def f(x):\n    return x + n\nsq = lambda x: x * x\n"
        "import functools\n@functools.lru_cache()\ndef cached(x):\n    return x * 2\n"
        "class Pt:\n    def __init__(self, x):\n        self.x = x\n    def get(self):\n"
        "        return self.x\npts = [Pt(1), Pt(2)]\nod = OD(z=1)\n",
        "nested['a'][2]['b'].add(5)\nb.append(2)\nd1['k'].append('t')\npts[0].x = 10\n",
        "gen = (i for i in range(2))\nfh = open('/proc/self/status')\ndel s\n_ = 'last'\n",
    ]
    PROBES = ["b is a", "d1['k'] is d2['k']", "f(1)", "sq(4)", "cached(21)", "pts[0].get()",
              "type(pts[1]) is Pt", "p.join('x', 'y')", "os.sep", "OD is type(od)",
              "sorted(nested['a'][2]['b'])"]

    def drive(self, mode, req):
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        p = subprocess.run([self.PY, os.path.join(nshelp.HERE, "ns_driver.py"), mode],
                           input=json.dumps(req), capture_output=True, text=True, timeout=60,
                           cwd=nshelp.HERE, env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout)

    def test_restore_in_fresh_interpreter(self):
        run = self.drive("run", {"cells": self.CELLS, "probes": self.PROBES, "snapshot_after": 2})
        self.assertEqual(set(run["infos"][4]["unpicklable"]), {"gen", "fh"})
        want_names = [n for n in run["names"] if n not in ("gen", "fh")]
        for blobs in (run["blobs"], [run["snapshot"]] + run["blobs"][3:]):
            res = self.drive("restore", {"blobs": blobs, "probes": self.PROBES})
            self.assertEqual(res["names"], want_names)
            for n in want_names:
                self.assertEqual(res["desc"][n], run["desc"][n], n)
            self.assertEqual(res["probes"], run["probes"])
            self.assertEqual(set(res["results"][-1]["failed"]), {"gen", "fh"})
        self.assertEqual(run["probes"]["b is a"], "bool:True")
        self.assertEqual(run["probes"]["f(1)"], "int:43")


if __name__ == "__main__":
    gc.collect()
    unittest.main(verbosity=1)
