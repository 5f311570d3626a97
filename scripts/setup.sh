#!/usr/bin/env bash
# One-time set-up on a fresh machine: Debian packages for audio, a virtualenv with sparkee in it.
# Idempotent; `make` runs it when pyproject.toml or this file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" = none ]; then
    echo "warning: cannot install ${need[*]} (not root, no sudo): audio steps will be skipped" >&2
  else
    echo "installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING" || true
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build here.
# GPU users: install the CUDA build of torch 2.13.0 first (see README), this line then does nothing.
"$VENV/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING" || true
"$VENV/bin/python" -m pip install -q -e ".[dev,speech]" 2>&1 | grep -v "^WARNING" || true
"$VENV/bin/python" -c "import sparkee, torch; print(f'sparkee {sparkee.__version__} ready (torch {torch.__version__})')"
