#!/usr/bin/env bash
# Run HERE (a machine with network) before going to the GPU machine: downloads into bench/wheels/
# (gitignored; carry it: run(carry=["bench/wheels"])) the wheels that bench/gpu_check.sh installs
# offline next to the GPU image's own torch, accelerate and numpy: transformers at the lock's
# version (constraints.txt) with its dependencies, for CPython 3.12 on manylinux x86_64 (tokenizers,
# safetensors, regex, pyyaml, hf-xet and pydantic-core are binary wheels of that platform), and
# setuptools + wheel to build the editable sparkee install.
#
#   bash bench/gpu_wheels.sh            # then: du -sh bench/wheels  (about 25 MiB; limit 60)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=bench/wheels
PYVER=${GPU_PYTHON_VERSION:-3.12}
pin() { grep -i "^$1==" constraints.txt | head -n1; }
TRANSFORMERS=$(pin transformers)
[ -n "$TRANSFORMERS" ] || { echo "no transformers pin in constraints.txt" >&2; exit 1; }
# the image's own packages (torch and its CUDA libraries, numpy, accelerate's) are not shipped
SKIP='^(torch|numpy|nvidia_|triton|sympy|mpmath|networkx|jinja2|markupsafe|setuptools|accelerate|psutil)-'
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
"$PY" -m pip download --quiet --dest "$DEST.tmp" --only-binary=:all: \
  --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -c constraints.txt \
  "$TRANSFORMERS" "$(pin huggingface_hub)" "$(pin tokenizers)" "$(pin safetensors)" "$(pin tqdm)" wheel
# setuptools for the editable build (>=77: license as an SPDX expression); not in the lock
"$PY" -m pip download --quiet --dest "$DEST.tmp" --only-binary=:all: --no-deps "setuptools>=77"
for f in "$DEST.tmp"/*.whl; do
  if basename "$f" | grep -Eiq "$SKIP" && ! basename "$f" | grep -q '^setuptools-'; then rm -f "$f"; fi
done
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -1 "$DEST"
SIZE=$(du -sm "$DEST" | cut -f1)
echo "bench/wheels: $(ls "$DEST" | wc -l) wheels, ${SIZE} MiB"
if [ "$SIZE" -gt 60 ]; then echo "bench/wheels is over 60 MiB: the working tree would not travel" >&2; exit 1; fi
