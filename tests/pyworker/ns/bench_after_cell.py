"""Timing script (not a test assertion): the cost of Namespace.after_cell for a namespace of
1,000 small values when one changes, the issue's goal being <= 200 us. The peer, measured side
by side in the same run, is the naive approach: pickle the whole namespace and hash it.

Also: applying the snapshot of that namespace in a fresh one (peer: pickle.loads of the whole
namespace), and after_cell when one 100,000-element list is mutated in place (peer: pickling and
hashing that list, the floor of any fingerprinting approach).

Prints a human table to stderr and one JSON object per figure to stdout (bench, metric, value,
unit, peer, peer_value, ratio, goal, met), like the C benchmarks. --quick: fewer rounds.
--check: also verify each delta names exactly the changed value (used by the ctest smoke run)."""

import ast
import json
import pickle
import statistics
import sys
import time

import nshelp

N = 1000


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def main(argv):
    quick = "--quick" in argv
    check = "--check" in argv
    rounds = 200 if quick else 3000
    s = nshelp.Session("capsule_ns_bench")
    setup = "".join(f"x{i} = {i}\n" for i in range(N // 2))
    setup += "".join(f"s{i} = 'v{i}'\n" for i in range(N // 4))
    setup += "".join(f"l{i} = [{i}, {i + 1}]\n" for i in range(N // 4))
    s.run(setup)
    ns, g = s.ns, s.g
    # The cells, compiled up front: the worker compiles before before_cell as well.
    cells = []
    for r in range(rounds):
        i = r % (N // 2)
        if r % 2:
            src = f"l{i % (N // 4)}.append({r})"
        else:
            src = f"x{i} = {r + 100000}"
        cells.append((src, compile(src, f"<cell b{r}>", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                                   dont_inherit=True)))
    t_after, t_before, t_peer = [], [], []
    sizes = []
    for r, (src, code) in enumerate(cells):
        t0 = time.perf_counter_ns()
        ns.before_cell(str(r), src, code)
        t1 = time.perf_counter_ns()
        exec(code, g)
        t2 = time.perf_counter_ns()
        blob, info = ns.after_cell(code)
        t3 = time.perf_counter_ns()
        t_before.append(t1 - t0)
        t_after.append(t3 - t2)
        sizes.append(info["size"])
        if check:
            name = src.split(".")[0].split(" ")[0]
            want_key = "mutated" if "append" in src else "changed"
            assert info[want_key] == [name], (src, info)
            others = [k for k in ("added", "changed", "mutated", "deleted") if k != want_key]
            assert all(not info[k] for k in others), (src, info)
        # peer: pickle everything that could be saved and fingerprint it
        t4 = time.perf_counter_ns()
        body = pickle.dumps({k: v for k, v in g.items() if not k.startswith("__")}, 5)
        nshelp.h64(body)
        t5 = time.perf_counter_ns()
        t_peer.append(t5 - t4)
    # Restore: apply the snapshot of that namespace in a fresh one, vs pickle.loads of it all.
    snap, _sinfo = ns.snapshot()
    full = pickle.dumps({k: v for k, v in g.items() if not k.startswith("__")}, 5)
    t_apply, t_loads = [], []
    for r in range(10 if quick else 50):
        fresh = nshelp.Session("capsule_ns_bench")
        t0 = time.perf_counter_ns()
        res = fresh.ns.apply(snap)
        t1 = time.perf_counter_ns()
        pickle.loads(full)
        t2 = time.perf_counter_ns()
        if check:
            assert not res["failed"] and len(res["restored"]) == N, res["failed"]
        t_apply.append(t1 - t0)
        t_loads.append(t2 - t1)
    sys.modules["capsule_ns_bench"] = s.mod

    # One big value (a 100,000-element list) mutated in place: the cost follows the dirty value.
    s.run("big = list(range(100000))")
    t_big, t_bigpeer = [], []
    bcode = compile("big[7] = -big[7]", "<cell big>", "exec", dont_inherit=True)
    for r in range(20 if quick else 200):
        ns.before_cell("big", "big[7] = -big[7]", bcode)
        exec(bcode, g)
        t0 = time.perf_counter_ns()
        blob, info = ns.after_cell(bcode)
        t1 = time.perf_counter_ns()
        nshelp.h64(pickle.dumps(g["big"], 5))
        t2 = time.perf_counter_ns()
        if check:
            assert info["mutated"] == ["big"], info
        t_big.append(t1 - t0)
        t_bigpeer.append(t2 - t1)

    med = statistics.median(t_after) / 1000.0
    p99 = pct(t_after, 99) / 1000.0
    pmed = statistics.median(t_peer) / 1000.0
    pp99 = pct(t_peer, 99) / 1000.0
    bmed = statistics.median(t_before) / 1000.0
    rows = [
        ("after_cell_1000_names_one_change_p50", med, "us", "full_pickle_p50", pmed, 200.0),
        ("after_cell_1000_names_one_change_p99", p99, "us", "full_pickle_p99", pp99, None),
        ("before_cell_p50", bmed, "us", None, None, None),
        ("delta_size_p50", statistics.median(sizes), "bytes", "full_pickle_bytes", len(body),
         None),
        ("apply_snapshot_1000_names_p50", statistics.median(t_apply) / 1000.0, "us",
         "pickle_loads_all_p50", statistics.median(t_loads) / 1000.0, None),
        ("snapshot_size", len(snap), "bytes", "full_pickle_bytes", len(full), None),
        ("after_cell_100k_list_mutated_p50", statistics.median(t_big) / 1000.0, "us",
         "pickle_and_hash_that_list_p50", statistics.median(t_bigpeer) / 1000.0, None),
    ]
    print(f"_capsule_ns after_cell, {N} names, {rounds} cells (one change each)"
          f"{' [quick]' if quick else ''}", file=sys.stderr)
    print(f"{'metric':44} {'value':>10} {'peer':>12} {'ratio':>7} {'goal':>7}", file=sys.stderr)
    for metric, value, unit, peer, peer_value, goal in rows:
        ratio = (value / peer_value) if peer_value else None
        met = None if goal is None else value <= goal
        print(f"{metric:44} {value:10.1f} {('' if peer_value is None else f'{peer_value:.1f}'):>12}"
              f" {('' if ratio is None else f'{ratio:.3f}'):>7} {('' if goal is None else goal):>7}"
              f" {unit}", file=sys.stderr)
        print(json.dumps({"bench": "pyworker.ns_after_cell", "metric": metric,
                          "value": round(value, 2), "unit": unit, "peer": peer,
                          "peer_value": None if peer_value is None else round(peer_value, 2),
                          "ratio": None if ratio is None else round(ratio, 4), "goal": goal,
                          "met": met}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
