#!/bin/sh
# tests/client/venv.sh VENV SRC - make (once) a venv from /usr/bin/python3.11 with the capsule
# client installed editable from SRC with its test extras. Idempotent: a stamp holds the hash of
# SRC/pyproject.toml; the install is redone only when it changes or the venv is broken.
set -eu
venv=$1
src=$2
want=$(sha256sum "$src/pyproject.toml" | cut -d' ' -f1)
if [ -f "$venv/.capsule-stamp" ] && [ "$(cat "$venv/.capsule-stamp")" = "$want" ] &&
    "$venv/bin/python" -c "import capsule, httpx, websockets, pytest" 2>/dev/null; then
    exit 0
fi
/usr/bin/python3.11 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$src[test]"
echo "$want" >"$venv/.capsule-stamp"
