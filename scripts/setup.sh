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
# Every package at the version CI tested: the lock (constraints.txt, made by scripts/lock.sh).
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build here; the lock's
# torch==2.13.0 is the CPU build on this project's machines. GPU users: see docs/install.md.
LOCK=constraints.txt
pipq() {  # pip, less the warnings about this machine's local package folders; keeps pip's status
  local out rc=0
  out=$("$VENV/bin/python" -m pip "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v -E "^WARNING|ignored: it is neither|^$" || true
  return $rc
}
pipq install -q -c "$LOCK" pip
pipq install -q -c "$LOCK" torch
pipq install -q -c "$LOCK" -e ".[dev,speech,serve]"
# a package installed by hand with --no-deps (make bench's SmolLM2) may leave pip check unhappy
"$VENV/bin/python" -m pip check >/dev/null || echo "warning: pip check: $("$VENV/bin/python" -m pip check | head -1)" >&2
"$VENV/bin/python" -c "import sparkee, torch, transformers; print(f'sparkee {sparkee.__version__} ready (torch {torch.__version__}, transformers {transformers.__version__})')"
