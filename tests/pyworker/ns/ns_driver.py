"""Subprocess driver for the fresh-interpreter tests (run with /usr/bin/python3.11).

  ns_driver.py run      stdin: {"cells": [src...], "probes": [expr...], "snapshot_after": k|null}
                        runs the cells in a fresh __main__ (as the worker does) and prints
                        {"blobs": [b64 delta...], "snapshot": b64|null, "infos": [...],
                         "names": [...], "desc": {name: canon}, "probes": {expr: canon}}
  ns_driver.py restore  stdin: {"blobs": [b64...], "probes": [...]}: a fresh __main__ applies
                        them in order and prints {"results": [...], "names", "desc", "probes"}
"""

import base64
import json
import sys
import types

import nshelp


def probe(g, exprs):
    out = {}
    for e in exprs:
        try:
            out[e] = nshelp.canon(eval(e, g))
        except Exception as exc:  # a failed probe is a finding, not a crash
            out[e] = f"!{type(exc).__name__}: {exc}"
    return out


def state(s, exprs):
    names = s.names()
    return {"names": names, "desc": nshelp.describe(s.g, names), "probes": probe(s.g, exprs)}


def main():
    mode = sys.argv[1]
    req = json.load(sys.stdin)
    s = nshelp.Session("__main__")
    if mode == "run":
        blobs, infos, snap = [], [], None
        for i, src in enumerate(req["cells"]):
            blob, info = s.run(src)
            blobs.append(base64.b64encode(blob).decode())
            infos.append(info)
            if req.get("snapshot_after") == i:
                snap = base64.b64encode(s.ns.snapshot()[0]).decode()
        out = {"blobs": blobs, "infos": infos, "snapshot": snap}
    else:
        results = [s.apply(base64.b64decode(b)) for b in req["blobs"]]
        out = {"results": results}
    out.update(state(s, req.get("probes", [])))
    sys.__stdout__.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
