#!/usr/bin/env bash
# Install everything the tests need, then lint, type-check and run the test suite.
# Used by `make test` and by CI (.ci/run); safe to run on a fresh machine.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export VENV

bash scripts/install-system.sh
bash scripts/install.sh

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy (strict)"
"$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/pytest" "$@"
