#!/usr/bin/env bash
# run_pytest.sh VENV ENGINE - the Python client's tests (clients/python/tests) against a real
# capsule-engine. Makes the venv from Debian's /usr/bin/python3.11 on first use and installs the
# package (editable, with its test extra) from PyPI; reinstalls when pyproject.toml changes.
set -euo pipefail
venv=$1
engine=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
pkg=$root/clients/python
stamp=$venv/.capsule-pyproject
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3.11 -m venv "$venv"
fi
if ! cmp -s "$pkg/pyproject.toml" "$stamp"; then
    "$venv/bin/python" -m pip install -q -e "$pkg[test]"
    cp "$pkg/pyproject.toml" "$stamp"
fi
cd "$pkg"
CAPSULE_ENGINE=$engine exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
