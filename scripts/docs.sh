#!/usr/bin/env bash
# `make docs`: builds the documentation site (mkdocs.yml, docs/) with --strict into .cache/site, so
# a broken link, a missing page or an unknown anchor fails. mkdocs lives in a venv of its own
# (.venv-docs, pinned below; reused when it already has these versions); the core install never
# depends on it. Also checks what mkdocs cannot see: the README's links into docs/, and that
# docs/img/ holds the same plots as bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DOCS_VENV:-.venv-docs}
PY=${PYTHON:-python3}
PINS=(mkdocs==1.6.1 mkdocs-material==9.8.2 pymdown-extensions==13.1.2)

have_pins() {
  "$VENV/bin/python" - "${PINS[@]}" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
sys.exit(any(md.version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PY
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! have_pins; then
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
fi

# the README's links into docs/ (relative, so they work on GitHub too) must name existing pages
status=0
for page in $(grep -o '](docs/[^)#]*' README.md | sed 's/^](//' | sort -u); do
  [ -e "$page" ] || { echo "docs: README.md links to $page, which does not exist"; status=1; }
done
# plots shown in the docs are copies of bench/results/ (mkdocs serves only docs/)
for img in docs/img/*.png; do
  src="bench/results/$(basename "$img")"
  if [ -e "$src" ] && ! cmp -s "$src" "$img"; then
    echo "docs: $img differs from $src: cp $src $img"
    status=1
  fi
done
[ "$status" = 0 ] || exit 1

# Material 9.8 prints a banner on every build: Material for MkDocs reaches end of life on
# 2027-05-05 (successor: Zensical, which reads mkdocs.yml). Noted here, silenced there.
export NO_MKDOCS_2_WARNING=1
"$VENV/bin/mkdocs" build --strict
