"""Build step: compile a worker Python source into a marshalled code object.

usage: python3.11 marshal_code.py SOURCE OUTPUT FILENAME
Writes 4 bytes of the interpreter's bytecode magic number, then marshal.dumps(code). The worker
uses the code only when the magic matches its own libpython (else it compiles the embedded
source), so a build interpreter that differs from the embedded one costs time, never correctness.
"""
import importlib.util
import marshal
import sys

src, out, name = sys.argv[1:4]
with open(src, encoding="utf-8") as f:
    code = compile(f.read(), name, "exec", dont_inherit=True)
with open(out, "wb") as f:
    f.write(importlib.util.MAGIC_NUMBER)
    f.write(marshal.dumps(code))
