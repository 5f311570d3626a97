#!/usr/bin/env bash
# Run the transformers contract tests and the engine-parity tests against other versions of the
# libraries sparkee leans on, each in a venv of its own (the main .venv keeps the lock):
#
#   scripts/compat.sh latest          newest transformers, accelerate and safetensors the registry
#                                     serves (the canary; `make test-latest`)
#   scripts/compat.sh oldest          the lower bounds pyproject.toml declares (`make test-oldest`)
#   scripts/compat.sh torch VERSION   torch VERSION from the registry (a CUDA build on x86_64:
#                                     several GB) with sparkee installed --no-deps, as a GPU user
#                                     with their own torch would; runs the whole suite
#
# Everything else comes from the lock (constraints.txt). The last line says which versions ran and
# what broke; each contract failure names the transformers version in its message.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:?usage: scripts/compat.sh latest|oldest|torch VERSION}
LOCK=constraints.txt
MOVING='^(transformers|accelerate|safetensors|huggingface[-_]hub|hf[-_]xet|tokenizers)=='
TESTS=(tests/test_hf_contract.py tests/test_engine.py tests/test_batch.py)

lower_bound() {  # the >= bound pyproject.toml declares for package $1
  grep -E "^\s*\"$1>=" pyproject.toml | head -1 | sed -E "s/.*$1>=([0-9.]+).*/\1/"
}
quiet() {  # a command, less the warnings about this machine's local package folders; keeps its status
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v -E "^WARNING|ignored: it is neither|^$" || true
  return $rc
}

case "$MODE" in
  latest) VENV=.venv-latest ;;
  oldest) VENV=.venv-oldest ;;
  torch) TORCH=${2:?usage: scripts/compat.sh torch VERSION}; VENV=.venv-torch-$TORCH ;;
  *) echo "unknown mode '$MODE': use latest, oldest or torch VERSION" >&2; exit 2 ;;
esac

rm -rf "$VENV"
"$PY" -m venv "$VENV"
BIN=$VENV/bin
quiet "$BIN/python" -m pip install -q -c "$LOCK" pip
FREE=$(mktemp)
grep -v -E "$MOVING" "$LOCK" > "$FREE"  # the lock less the packages this stage moves

case "$MODE" in
  latest)
    quiet "$BIN/pip" install -q -c "$FREE" torch
    quiet "$BIN/pip" install -q -c "$FREE" -e ".[dev]"
    # unconstrained: the newest releases that install here
    quiet "$BIN/pip" install -q --upgrade transformers accelerate safetensors
    ;;
  oldest)
    pins=()
    for p in transformers accelerate safetensors; do pins+=("$p==$(lower_bound "$p")"); done
    quiet "$BIN/pip" install -q -c "$FREE" torch
    quiet "$BIN/pip" install -q -c "$FREE" -e ".[dev]" "${pins[@]}"
    ;;
  torch)
    quiet "$BIN/pip" install -q "torch==$TORCH"
    # the lock less torch and what this torch itself pins (sympy, triton, ...); torch held where it is
    held=$("$BIN/python" - <<'EOF'
import re
from importlib.metadata import requires
names = {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in requires("torch") or []}
print("|".join(re.sub(r"[-_.]", "[-_.]", n) for n in sorted(names | {"torch"})))
EOF
)
    { grep -v -i -E "^($held)==" "$LOCK"; echo "torch==$TORCH"; } > "$FREE"
    # the user's way: sparkee without touching their torch, its other dependencies from the lock
    quiet "$BIN/pip" install -q --no-deps -e .
    deps=$("$BIN/python" - <<'EOF'
import tomllib
d = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(x for x in d["dependencies"] + d["optional-dependencies"]["dev"] if not x.startswith("torch")))
EOF
)
    # shellcheck disable=SC2086
    quiet "$BIN/pip" install -q -c "$FREE" $deps
    TESTS=(tests)
    have=$("$BIN/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    if [ "$have" != "$TORCH" ]; then
      echo "compat[torch]: installing sparkee's dependencies replaced torch $TORCH by $have" >&2
      exit 1
    fi
    ;;
esac
rm -f "$FREE"

versions=$("$BIN/python" - <<'EOF'
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "accelerate", "safetensors")))
EOF
)
echo "compat[$MODE]: $versions"
if [ "$MODE" = torch ]; then  # the acceptance check of a --no-deps install: the CLI on the bundled model
  "$BIN/sparkee" generate --model "$("$BIN/python" -c 'import sparkee.refslm as r; print(r.bundled_model_dir())')" \
    --prompt "what is two plus three" --max-new-tokens 24 --no-calibrate > /dev/null
  echo "compat[$MODE]: sparkee generate on the bundled model ran"
fi
set +e
"$BIN/python" -m pytest -p no:cacheprovider -rf "${TESTS[@]}"
rc=$?
set -e
if [ $rc -eq 0 ]; then
  echo "compat[$MODE]: passed with $versions"
else
  echo "compat[$MODE]: FAILED with $versions (each failure above names what broke)"
fi
exit $rc
