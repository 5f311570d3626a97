#!/usr/bin/env bash
# The adapter heads against the tuned-lens heads on the reference SLM: lossless (exact) rows and
# tolerant rows with and without no-stretch, 60 test questions, batch 1, both formats, every row
# timed side by side in one `sparkee eval` run (round-robin by question, untimed warm-up).
# Writes bench/results/adapter60-{padded,es}.{md,csv}. About 4 min per format on 2 cores; run on a
# quiet machine (nothing else using the CPU).
#
#   bash bench/adapter_rows.sh [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${1:-60}
SPARKEE=${SPARKEE:-.venv/bin/sparkee}
M=src/sparkee/refslm/assets/model
H=src/sparkee/refslm/assets/heads
A=$H/adapter-speech.safetensors
ROWS="full,spar-k:FEEE:4+verify,spar-k:adaptive:4+verify=typical:0.2,spar-k:adaptive:4+verify=no-stretch:typical:0.2"
ROWS+=",spar-k:FEEE:4+verify=topk:2,spar-k:FEEE:4+verify=no-stretch:topk:2"
for pat in FEEEE FEEEEEE FEEEEEEEE; do ROWS+=",spar-k:$pat:1+verify@$A"; done
ROWS+=",spar-k:adaptive:1+verify@$A"
for rule in typical:0.2 no-stretch:typical:0.2 topk:2 no-stretch:topk:2; do
  ROWS+=",spar-k:FEEEEEE:1+verify=$rule@$A"
done
mkdir -p bench/results
for fmt in padded early-stop; do
  short=$([ "$fmt" = padded ] && echo padded || echo es)
  out=.cache/bench/adapter60-$short
  "$SPARKEE" eval --model $M --heads $H/tuned-lens-speech.safetensors --data refslm:test --format "$fmt" \
    --limit "$LIMIT" --policies "$ROWS" --vocoder none --audio-examples 0 --fresh --out "$out"
  cp "$out/table.md" "bench/results/adapter60-$short.md"
  cp "$out/table.csv" "bench/results/adapter60-$short.csv"
done
echo "machine: $(.venv/bin/python -c 'from sparkee import store; print(store.machine_id())')"
