#!/usr/bin/env bash
# Remake the lock (constraints.txt): resolve sparkee with every extra in a fresh venv, newest
# releases that install here, and freeze it. Run it, run `make test` and `make test-oldest`, and
# commit the lock with the tested range in pyproject.toml and sparkee.hf.TESTED_TRANSFORMERS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=$(mktemp -d)/venv
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v -E "^WARNING|ignored" || true
"$VENV/bin/python" -m pip install -q "torch==${TORCH:-2.13.0}" 2>&1 | grep -v -E "^WARNING|ignored" || true
"$VENV/bin/python" -m pip install -q -e ".[dev,speech,serve]" 2>&1 | grep -v -E "^WARNING|ignored" || true
"$VENV/bin/python" -m pip check
{
  echo "# The tested set: every runtime and dev dependency of sparkee (extras dev, speech, serve) at the"
  echo "# version CI ran. Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$VENV/bin/python" --version)."
  echo "# scripts/setup.sh installs with it (pip -c); users who bring their own torch need not."
  echo "pip==$("$VENV/bin/python" -m pip --version | cut -d' ' -f2)"
  "$VENV/bin/python" -m pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt
rm -rf "$(dirname "$VENV")"
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) packages)"
