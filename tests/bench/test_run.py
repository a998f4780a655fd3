#!/usr/bin/python3.11
"""test_run.py BINDIR - bench/run does what RESULTS.md claims, on a real benchmark.

Runs `bench/run --quick --no-build --repeat 2 --bindir BINDIR --out TMP replay` (the real
bench_replay: it writes a log, runs capsule-replay verify and the raw LMDB peer, then replays a
session written by a real engine beside the engine's own restore) and checks:
  - exit status 0; results.jsonl: one object per figure with the issue's keys
    (bench, metric, value, unit, peer, peer_value, ratio, goal, met) and runs == 2;
  - the spread holds the median (value_min <= value <= value_max, same for the ratio);
  - met is the goal judged on the median (better/goal_on);
  - RESULTS.md has the machine line, both load averages, and one table row per figure whose
    value, peer value, ratio and verdict are the jsonl's;
and that bad input is refused with a clear message and nothing written: --repeat 0, an unknown
bench name, and bench_engine --rec-execs with a bad count.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "bench", "run")
KEYS = ["bench", "metric", "value", "unit", "peer", "peer_value", "ratio", "goal", "met"]
sys.path.insert(0, os.path.join(ROOT, "bench"))


def check(cond, what):
    if not cond:
        print("FAIL: " + what, file=sys.stderr)
        sys.exit(1)


def fmt(v):  # bench/run's number format
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return "%.0f" % v if abs(v) >= 100 else "%.2f" % v if abs(v) >= 1 else "%.3g" % v
    return str(v)


def main():
    bindir = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="test-bench-run-") as out:
        p = subprocess.run([RUN, "--quick", "--no-build", "--repeat", "2", "--bindir", bindir,
                            "--out", out, "replay"], capture_output=True, text=True, timeout=600)
        check(p.returncode == 0, "bench/run exited %d: %s" % (p.returncode, p.stderr[-2000:]))
        with open(os.path.join(out, "results.jsonl")) as f:
            figs = [json.loads(line) for line in f if line.strip()]
        check(len(figs) == 6, "bench_replay reports 6 figures, results.jsonl has %d" % len(figs))
        for g in figs:
            for k in KEYS:
                check(k in g, "%s lacks the key %s" % (g.get("metric"), k))
            check(g["bench"] == "replay" and g["runs"] == 2, "bench/runs of %s" % g["metric"])
            check(g["value_min"] <= g["value"] <= g["value_max"], "value spread of " + g["metric"])
            check(g["ratio_min"] <= g["ratio"] <= g["ratio_max"], "ratio spread of " + g["metric"])
            check(g["peer_value"] > 0 and g["peer"], "the peer of " + g["metric"])
            if g["goal"] is not None:
                x = g["ratio"] if g["goal_on"] == "ratio" else g["value"]
                want = x <= g["goal"] if g["better"] == "lower" else x >= g["goal"]
                check(g["met"] is want, "met of %s is %r, the median says %r" % (
                    g["metric"], g["met"], want))
            else:
                check(g["met"] is None, "met without a goal in " + g["metric"])
        with open(os.path.join(out, "RESULTS.md")) as f:
            md = f.read()
        check("- machine: %d cores" % os.cpu_count() in md, "the machine line")
        check("at the start," in md and "at the end" in md, "the load averages")
        rows = {}
        for line in md.splitlines():
            if line.startswith("| ") and not line.startswith("| metric"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                rows[cells[0]] = cells
        for g in figs:
            r = rows.get(g["metric"])
            check(r is not None, "no RESULTS.md row for " + g["metric"])
            check(r[1] == fmt(g["value"]) and r[5] == fmt(g["peer_value"]) and
                  r[6] == fmt(g["ratio"]) and r[8] == fmt(g["met"]) and r[9] == "2",
                  "RESULTS.md row %r does not match %r" % (r, g))

        # bad input: a clear message, a non-zero exit, nothing written
        for args, msg in ((["--repeat", "0", "replay"], "--repeat wants 1 to 100"),
                          (["no_such_bench"], "no benchmark named no_such_bench")):
            out2 = os.path.join(out, "bad")
            p = subprocess.run([RUN, "--quick", "--no-build", "--bindir", bindir, "--out", out2]
                               + args, capture_output=True, text=True, timeout=60)
            check(p.returncode != 0 and msg in p.stderr, "bench/run %s: %d %r" % (
                args, p.returncode, p.stderr))
            check(not os.path.exists(os.path.join(out2, "results.jsonl")), "wrote after " + msg)
    eng = os.path.join(bindir, "bench_engine")
    if os.path.exists(eng):
        for bad in ("abc", "5", "2000000", "10x", ""):
            p = subprocess.run([eng, "--rec-execs", bad], capture_output=True, text=True,
                               timeout=60)
            check(p.returncode == 2 and "--rec-execs wants a count" in p.stderr,
                  "bench_engine --rec-execs %r: %d %r" % (bad, p.returncode, p.stderr))
    # the benches that take only --quick: --help is their usage, anything else is refused
    # before any work (they used to ignore it and run the whole benchmark)
    for name in ("bench_replay", "bench_server", "bench_resonate"):
        exe = os.path.join(bindir, name)
        if not os.path.exists(exe):
            continue
        p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10)
        check(p.returncode == 0 and "usage: " in p.stdout and "[--quick]" in p.stdout,
              "%s --help: %d %r" % (name, p.returncode, p.stdout))
        for bad in (["--frob"], ["--quick", "--frob"], ["quick"]):
            p = subprocess.run([exe] + bad, capture_output=True, text=True, timeout=10)
            check(p.returncode == 64 and "unknown argument: " + bad[-1] in p.stderr,
                  "%s %r: %d %r" % (name, bad, p.returncode, p.stderr))
    print("ok")


if __name__ == "__main__":
    main()
