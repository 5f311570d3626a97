#!/usr/bin/env bash
# The GPU check on one CUDA machine with no network (about 8 minutes in all): installs sparkee
# and the wheels of bench/wheels/ (made beforehand with bench/gpu_wheels.sh on a machine with
# network) next to the image's own CUDA torch, then runs bench/gpu_check.py, which writes
# bench/results/gpu/gpu_check.json and gpu_check.md.
#
#   bash bench/gpu_check.sh [gpu_check.py options]      # e.g. --budget-s 420 (the default)
#   PYTHON=python3.12 bash bench/gpu_check.sh            # the python that holds the CUDA torch
#
# Install order, each step falling back to the next when it fails (and saying so):
#   1. a venv with --system-site-packages (the image's torch and accelerate stay visible),
#      pip install --no-index --find-links bench/wheels transformers==<lock> ..., then
#      pip install --no-deps -e . (setuptools from the wheel folder for the build);
#   2. the wheels unzipped into a directory on PYTHONPATH, and src/ on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SYS_PY=${PYTHON:-python3}
WHEELS=$ROOT/bench/wheels
WORK=${GPU_CHECK_WORK:-/tmp/sparkee-gpu}
OUT=bench/results/gpu
mkdir -p "$WORK" "$OUT"
LOG=$OUT/install.log
say() { echo "gpu_check.sh: $*" | tee -a "$LOG"; }

# GPU_CHECK_CPU_SMOKE=1: the same install and run on a CPU torch, tiny shapes (to try this script)
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
EXTRA=()
[ "$SMOKE" = 1 ] && EXTRA=(--cpu-smoke) && OUT=$WORK/smoke-results && mkdir -p "$OUT" && LOG=$OUT/install.log
: >"$LOG"
SMOKE=$SMOKE "$SYS_PY" - <<'PY' || { say "no CUDA torch in $SYS_PY"; exit 2; }
import os, sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}", flush=True)
sys.exit(0 if torch.cuda.is_available() or os.environ["SMOKE"] == "1" else 1)
PY
ls "$WHEELS"/transformers-*.whl >/dev/null 2>&1 || { say "no wheels in $WHEELS: run bash bench/gpu_wheels.sh first and carry bench/wheels"; exit 2; }
TRANSFORMERS=$(grep -i '^transformers==' constraints.txt | head -n1)
PIPFLAGS=(--no-index --find-links "$WHEELS" --disable-pip-version-check -q)

PY=""
VENV=$WORK/venv
# when the image's python is itself a venv, --system-site-packages shows its base's packages,
# not the image's torch: then a .pth file adds the image's site directories after the venv's own
see_image_site() {
  "$VENV/bin/python" -c "import torch" >/dev/null 2>&1 && return 0
  local vsite
  vsite=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || return 1
  "$SYS_PY" -c "import site, sysconfig; p = sysconfig.get_paths(); print(chr(10).join(dict.fromkeys([p['purelib'], p['platlib'], *site.getsitepackages()])))" >"$vsite/_gpu_image_site.pth" || return 1
  say "the venv did not see the image's torch: added its site directories ($vsite/_gpu_image_site.pth)"
  "$VENV/bin/python" -c "import torch" >/dev/null 2>&1
}
rm -rf "$VENV"
if "$SYS_PY" -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1 && see_image_site \
  && "$VENV/bin/python" -m pip install "${PIPFLAGS[@]}" "$TRANSFORMERS" huggingface_hub tokenizers safetensors tqdm >>"$LOG" 2>&1; then
  if "$VENV/bin/python" -m pip install "${PIPFLAGS[@]}" --no-deps -e . >>"$LOG" 2>&1; then
    PY=$VENV/bin/python
    say "installed into $VENV (pip, editable sparkee)"
  else
    PY=$VENV/bin/python
    export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
    say "editable install failed (see $LOG); sparkee from src/ on PYTHONPATH"
  fi
else
  say "venv or pip install failed (see $LOG); unzipping the wheels onto PYTHONPATH instead"
  SITE=$WORK/site
  rm -rf "$SITE" && mkdir -p "$SITE"
  for w in "$WHEELS"/*.whl; do
    case "$(basename "$w")" in setuptools-*|wheel-*) continue ;; esac
    "$SYS_PY" -m zipfile -e "$w" "$SITE" >>"$LOG" 2>&1 || say "could not unzip $(basename "$w")"
  done
  export PYTHONPATH=$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
  PY=$SYS_PY
fi
"$PY" -c "import sparkee, transformers, torch; print('sparkee', sparkee.__version__, 'from', sparkee.__file__, '| transformers', transformers.__version__)" \
  || { say "sparkee does not import (see $LOG)"; exit 2; }

export SPARKEE_CACHE=$WORK/cache   # calibrations of this run only
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" bench/gpu_check.py --out "$OUT" "${EXTRA[@]}" "$@"
rc=$?
say "gpu_check.py exited with $rc; results in $OUT/gpu_check.md and gpu_check.json"
exit $rc
