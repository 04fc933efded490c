#!/usr/bin/env bash
# Create (or reuse) the virtualenv and install the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[test]'

# The scheduling core and the storm simulator compiled with mypyc (p2pd.native): about twice
# as fast, identical decisions. Rebuilt only when a source changed; without a C compiler
# everything runs on the Python modules instead.
if ! "$VENV/bin/python" -m p2pd.native check >/dev/null; then
    echo "== compiling the core with mypyc (python -m p2pd.native build, ~1-2 min)"
    "$VENV/bin/python" -m p2pd.native build >/dev/null ||
        echo "warning: the compiled core could not be built; the Python one is used" >&2
fi
