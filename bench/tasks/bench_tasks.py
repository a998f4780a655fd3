"""bench_tasks.py - durable steps (issue 9), measured inside a real execution of a capsule-engine
(sync durability: each step's create and settle fsynced; one figure with nosync):
  - a recorded step (`@task` call: create + run + settle, both durable) beside a plain call of
    the same function in the same cell (goal <= 1 ms per durable step);
  - the same steps replayed from the log (the ids are derived again, so each call returns its
    recorded value without running: what a re-run after a crash pays; goal <= 0.1 ms);
  - `capsule run hello.py` (the seed's file; engine already running) beside
    `/usr/bin/python3.11 hello.py`, alternated in the same run: wall time and ratio.

With --base-engine/--base-worker (an engine and worker built from another commit), the durable
step is also measured A/B: rounds alternating this build and that one, sync and nosync, in the
same run (rows step_durable_ab_*: value = this build, peer = the base).

usage: bench_tasks [--quick] --engine PATH --capsule PATH [--base-engine PATH --base-worker PATH]
Prints a table on stderr and one JSON object per figure on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from capsule import Session

HELLO = '''from capsule import task

@task(name="main", compute="LOW", ram="64MB")
def main() -> str:
    return "Hello from Capsule!"
'''

# measured inside the worker; perf_counter_ns around each call
CELL = '''
import capsule, time, json
from capsule import task
def f(x):
    return x + 1
@task
def g(x):
    return x + 1
N = {n}
def per_call(fn):
    ts = []
    for i in range(N):
        t0 = time.perf_counter_ns()
        fn(i)
        ts.append(time.perf_counter_ns() - t0)
    return ts
plain = per_call(f)
durable = per_call(g)
capsule._top["eid"] = None  # the same ids again: every call is answered from the log,
capsule._cache["eid"] = None  # read by one preload, as a re-run in a fresh worker does
replayed = per_call(g)
json.dumps({{"plain": plain, "durable": durable, "replayed": replayed}})
'''


def pick(ts: list[float], p: float) -> float:
    s = sorted(ts)
    return s[int(p * (len(s) - 1) + 0.5)]


async def steps(url: str, n: int) -> dict[str, list[float]]:
    async with Session(url) as s:
        await s.execute(CELL.format(n=10))  # warm-up: imports, the worker, the promise store
        r = await s.execute(CELL.format(n=n))
        return {k: [v / 1e6 for v in ts] for k, ts in json.loads(r.value).items()}


def runs(url: str, capsule: str, k: int, tmp: str) -> tuple[list[float], list[float]]:
    path = os.path.join(tmp, "hello.py")
    with open(path, "w") as f:
        f.write(HELLO)
    env = dict(os.environ, CAPSULE_URL=url)
    cap, py = [], []
    for _ in range(k):
        t0 = time.perf_counter()
        p = subprocess.run([capsule, "run", "hello.py"], cwd=tmp, env=env, capture_output=True,
                           text=True, timeout=120)
        cap.append((time.perf_counter() - t0) * 1e3)
        assert p.returncode == 0 and p.stdout == "Hello from Capsule!\n", p
        t0 = time.perf_counter()
        # the peer: the same file as a script (the decorator is the client package's, so the
        # file imports; python3.11 runs it from the client venv's site-packages)
        p = subprocess.run([sys.executable, "-c", "import runpy; "
                            "print(runpy.run_path('hello.py')['main']())"], cwd=tmp,
                           capture_output=True, text=True, timeout=120)
        py.append((time.perf_counter() - t0) * 1e3)
        assert p.returncode == 0 and p.stdout == "Hello from Capsule!\n", p
    return cap, py


def engine_start(exe: str, data: str, durability: str,
                 worker: str | None = None) -> tuple[subprocess.Popen, str]:
    extra = ["--worker-path", worker] if worker else []
    eng = subprocess.Popen([exe, "--listen", "127.0.0.1:0", "--data-dir", data,
                            "--durability", durability, "--log-level", "warn"] + extra,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = eng.stdout.readline() if eng.stdout else ""
    if "listening on port" not in line:
        eng.kill()
        raise SystemExit("bench_tasks: the engine did not start")
    return eng, "http://127.0.0.1:" + line.split()[-1]


def ab(a: argparse.Namespace, n: int, rounds: int, tmp: str) -> list[tuple]:
    """Durable step p50 of this build and of the base, alternated round by round."""
    got: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for who, exe, worker in (("new", a.engine, None),
                                 ("base", a.base_engine, a.base_worker)):
            for dur in ("sync", "nosync"):
                eng, url = engine_start(exe, f"{tmp}/ab-{who}-{dur}-{r}", dur, worker)
                try:
                    t = asyncio.run(steps(url, n))
                finally:
                    eng.terminate()
                    eng.wait(30)
                got.setdefault((who, dur), []).extend(t["durable"])
    return [(f"step_durable_ab_{dur}_p50", pick(got[("new", dur)], 0.5), "base build",
             pick(got[("base", dur)], 0.5), None) for dur in ("sync", "nosync")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine", required=True)
    ap.add_argument("--capsule", required=True)
    ap.add_argument("--base-engine")
    ap.add_argument("--base-worker")
    a = ap.parse_args()
    if bool(a.base_engine) != bool(a.base_worker):
        ap.error("--base-engine and --base-worker go together")
    n, k = (100, 5) if a.quick else (1000, 30)
    tmp = tempfile.mkdtemp(prefix="bench-tasks-")
    load0 = os.getloadavg()[0]
    try:
        eng, url = engine_start(a.engine, tmp + "/n", "nosync")
        try:
            tn = asyncio.run(steps(url, n))
        finally:
            eng.terminate()
            eng.wait(30)
        eng, url = engine_start(a.engine, tmp + "/d", "sync")
        try:
            t = asyncio.run(steps(url, n))
            cap, py = runs(url, a.capsule, k, tmp)
        finally:
            eng.terminate()
            eng.wait(30)
        rows_ab = ab(a, n, 2 if a.quick else 4, tmp) if a.base_engine else []
        load1 = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain50, plain99 = pick(t["plain"], 0.5), pick(t["plain"], 0.99)
    rows = [
        ("step_durable_p50", pick(t["durable"], 0.5), "plain call", plain50, 1.0),
        ("step_durable_p99", pick(t["durable"], 0.99), "plain call", plain99, None),
        ("step_durable_nosync_p50", pick(tn["durable"], 0.5), "plain call",
         pick(tn["plain"], 0.5), 1.0),
        ("step_replayed_p50", pick(t["replayed"], 0.5), "plain call", plain50, 0.1),
        ("step_replayed_p99", pick(t["replayed"], 0.99), "plain call", plain99, None),
        ("capsule_run_hello_p50", pick(cap, 0.5), "python3.11 hello.py", pick(py, 0.5), None),
    ] + rows_ab
    err = sys.stderr
    err.write(f"bench_tasks: steps n={n}, capsule run k={k}, sync durability (nosync where "
              f"named), load {load0:.2f} "
              f"-> {load1:.2f}\n")
    err.write(f"{'metric':<24}{'ms':>10}{'peer':>22}{'peer ms':>10}{'ratio':>9}{'goal':>8}\n")
    for name, v, peer, pv, goal in rows:
        ratio = v / pv if pv else None
        err.write(f"{name:<24}{v:>10.4f}{peer:>22}{pv:>10.4f}{ratio:>9.1f}"
                  f"{('<=' + str(goal)) if goal else '-':>8}\n")
        print(json.dumps({"bench": "tasks", "metric": name, "value": round(v, 4), "unit": "ms",
                          "peer": peer, "peer_value": round(pv, 4),
                          "ratio": round(ratio, 2) if ratio else None,
                          "goal": goal, "better": "lower" if goal else None,
                          "met": (v <= goal) if goal else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
