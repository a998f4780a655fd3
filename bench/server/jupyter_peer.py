#!/usr/bin/python3.11
"""jupyter_peer.py - the Jupyter peer of bench_server: "2+2" through ipykernel driven by
jupyter_client (Debian python3-ipykernel, python3-jupyter-client), timed from execute() to the
execute_reply on the shell channel (the point where a Jupyter client knows the cell finished; the
execute_result on IOPub arrives before it). Jupyter records nothing durably: this is its best case.

usage: jupyter_peer.py N WARMUP   -> prints {"p50_ms":..., "p99_ms":..., "n":N} on stdout
With CAPSULE_BENCH_SAMPLES set (by bench/run), also writes the N samples in ms, one per line, to
$CAPSULE_BENCH_SAMPLES/server.jupyter_2plus2_ms.txt (bench/run plots them beside capsule's).
"""
import json
import os
import sys
import time

from jupyter_client.manager import start_new_kernel


def main():
    n, warm = int(sys.argv[1]), int(sys.argv[2])
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        times = []
        for i in range(warm + n):
            t0 = time.perf_counter_ns()
            msg_id = kc.execute("2+2", store_history=False)
            while True:
                reply = kc.get_shell_msg(timeout=30)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            t = time.perf_counter_ns() - t0
            if reply["content"]["status"] != "ok":
                raise SystemExit(f"jupyter_peer: execution failed: {reply['content']}")
            if i >= warm:
                times.append(t)
            # drain IOPub so it does not pile up (not timed)
            while True:
                try:
                    m = kc.get_iopub_msg(timeout=0.001)
                except Exception:
                    break
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" \
                        and m["parent_header"].get("msg_id") == msg_id:
                    break
        times.sort()
        samples_dir = os.environ.get("CAPSULE_BENCH_SAMPLES")
        if samples_dir:
            with open(os.path.join(samples_dir, "server.jupyter_2plus2_ms.txt"), "w") as f:
                f.write("".join("%.6g\n" % (t / 1e6) for t in times))
        pick = lambda p: times[int(p * (len(times) - 1) + 0.5)] / 1e6
        print(json.dumps({"p50_ms": pick(0.5), "p99_ms": pick(0.99), "n": n}), flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
