"""bench_client.py - the Python client's round trip: `await session.execute("2+2")` against a
capsule-engine (sync durability: every execution fsynced before its answer), beside the same
"2+2" through jupyter_client to ipykernel (bench/server/jupyter_peer.py, Debian packages), in the
same run. Also the streamed form (`stream_execute` over the WebSocket) and `execute` once that
WebSocket is open (it then carries waited executions too).

usage: bench_client [--quick] --engine PATH --peer PATH
Prints a table on stderr and one JSON object per figure on stdout (bench, metric, value, unit,
peer, peer_value, ratio, goal, met). Goal: the seed's "simple expression: <5 ms latency".
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

GOAL_MS = 5.0


def pick(ts: list[float], p: float) -> float:
    s = sorted(ts)
    return s[int(p * (len(s) - 1) + 0.5)]


async def measure(url: str, n: int, warm: int) -> tuple[list[float], list[float], list[float]]:
    async with Session(url) as s:
        for _ in range(warm):
            r = await s.execute("2+2")
            assert r.value == 4
        ex = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            r = await s.execute("2+2")
            ex.append((time.perf_counter_ns() - t0) / 1e6)
            assert r.value == 4
        st = []
        for i in range(warm + n // 2):
            t0 = time.perf_counter_ns()
            async for m in s.stream_execute("2+2"):
                last = m
            if i >= warm:
                st.append((time.perf_counter_ns() - t0) / 1e6)
            assert last.type == "result" and last.value == 4
        # the WebSocket is open now: execute goes over it
        exw = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            r = await s.execute("2+2")
            exw.append((time.perf_counter_ns() - t0) / 1e6)
            assert r.value == 4
    return ex, st, exw


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine", required=True)
    ap.add_argument("--peer", required=True)
    a = ap.parse_args()
    n, warm = (200, 20) if a.quick else (2000, 100)
    tmp = tempfile.mkdtemp(prefix="bench-client-")
    eng = subprocess.Popen([a.engine, "--listen", "127.0.0.1:0", "--data-dir", tmp + "/d",
                            "--durability", "sync", "--log-level", "warn"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = eng.stdout.readline() if eng.stdout else ""
        if "listening on port" not in line:
            raise SystemExit("bench_client: the engine did not start")
        url = "http://127.0.0.1:" + line.split()[-1]
        load0 = os.getloadavg()[0]
        ex, st, exw = asyncio.run(measure(url, n, warm))
        pj = subprocess.run(["/usr/bin/python3.11", a.peer, str(n), str(warm)],
                            capture_output=True, text=True, timeout=600)
        if pj.returncode != 0:
            raise SystemExit("bench_client: jupyter peer failed: " + pj.stderr[-500:])
        peer = json.loads(pj.stdout.strip().splitlines()[-1])
        load1 = os.getloadavg()[0]
    finally:
        eng.terminate()
        eng.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ("execute_2plus2_p50", pick(ex, 0.5), peer["p50_ms"], GOAL_MS),
        ("execute_2plus2_p99", pick(ex, 0.99), peer["p99_ms"], None),
        ("execute_ws_2plus2_p50", pick(exw, 0.5), peer["p50_ms"], GOAL_MS),
        ("execute_ws_2plus2_p99", pick(exw, 0.99), peer["p99_ms"], None),
        ("stream_execute_2plus2_p50", pick(st, 0.5), peer["p50_ms"], GOAL_MS),
        ("stream_execute_2plus2_p99", pick(st, 0.99), peer["p99_ms"], None),
    ]
    err = sys.stderr
    err.write(f"bench_client: n={n} (warm-up {warm}), sync durability, load {load0:.2f} -> "
              f"{load1:.2f}\n")
    err.write(f"{'metric':<28}{'capsule ms':>12}{'jupyter ms':>12}{'ratio':>8}{'goal':>8}\n")
    for name, v, pv, goal in rows:
        err.write(f"{name:<28}{v:>12.3f}{pv:>12.3f}{v / pv:>8.2f}"
                  f"{('<' + str(goal)) if goal else '-':>8}\n")
        print(json.dumps({"bench": "client", "metric": name, "value": round(v, 4), "unit": "ms",
                          "peer": "jupyter_client+ipykernel", "peer_value": round(pv, 4),
                          "ratio": round(v / pv, 4), "goal": goal,
                          "better": "lower" if goal else None,
                          "met": (v < goal) if goal else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
