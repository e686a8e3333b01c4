#!/usr/bin/env bash
# Session 25 on the GPU machine (NOTES §36–39, results/2026-11-26-h200-hybrid/), calls back to
# back on one machine at a time: the query's RoPE beside the routing, where the 120k perplexity
# excess lies, and the per-layer Saap/Quest hybrid. Binaries staged in .gpuA/ (calibrate, texts),
# .gpuB/ (throughput, evaluate), .devT/ (cuda_parity, graph), .devS/ (bench_report of this commit
# and of 6a44783 as bench_report_old): one `stash` call each, kept in /tmp/stash; the
# Qwen2.5-Coder-0.5B GGUF in pieces .qwen/pNN, one per call (the last with `setup`).
# Usage: bash bench/device_layers.sh STEP [ARGS]
#   stash DIR | index | piece | setup | tests | steps | calib128 | sweep BUDGET | long |
#   routing128 | hand BUDGETS [BATCH] | hybrid BUDGETS | passkey hand|hybrid BUDGET
# `index` takes the 64k-sequence index as calibrated in an earlier call (`calib128`, fetched back
# in pieces and joined) from .idx/, so a fresh machine need not calibrate it again.
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
X="$I/q128k-64k.safetensors"
HAND=0,2,4,5,6,7,8,10,12,14,15,17,18,19,20
tp() {
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch "${BATCH:-8}" --tokens "${TOKENS:-256}" --chunk 32768 --all-sparse --graph on --plan-floor 0.25 "$@"
}
case $step in
stash)
  mkdir -p /tmp/stash && cp -r "$2"/* /tmp/stash/ && ls -R /tmp/stash | tr '\n' ' ' ;;
index)
  mkdir -p "$I" && cp .idx/q128k-64k.safetensors "$X" && sha256sum "$X" ;;
piece)
  mkdir -p /tmp/q && cp .qwen/p* /tmp/q/ 2>/dev/null; ls -l /tmp/q | tail -n +2 ;;
setup)
  mkdir -p "$bin" /tmp/saap/models /tmp/saap/texts "$I"
  cp /tmp/stash/bin/*.gz "$bin/" && gunzip -f "$bin"/*.gz && chmod +x "$bin"/*
  for f in "$bin"/*-????????????????; do [ -e "$f" ] && mv "$f" "${f%-*}"; done
  cp /tmp/stash/texts/* /tmp/saap/texts/
  cat /tmp/q/p* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/setup.txt" ;;
tests)
  # The query's RoPE now runs on the side stream: parity (eager steps) and graphs (captured).
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1 ;;
steps)
  # The Llama-3.1-8B layer step, 6a44783 (`bench_report_old`) against this commit, alternated
  # twice, FA2 in the same call.
  for b in bench_report_old bench_report bench_report_old bench_report; do
    SAAP_REPORT_ONLY=steps run "$bin/$b" 171008 1,8
  done
  run python3 bench/fa2_prefill_anchor.py 171008 1,8 decode ;;
calib128)
  # The recipe of NOTES §33 (same bytes as sessions 24: sha256 67969bde…).
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 65536 --seqs 1 --queries 1024 --sinks 4 --held-out-context 120000 --epochs 30 --hidden 64 --out "$X"
  sha256sum "$X" | tee -a "$OUT/calib128.txt" ;;
sweep)
  # Every layer sparse at budget $2, then once per layer with that layer dense.
  tp --keys-budget "$2" --layer-sweep ;;
long)
  # 8 × 1023 predicted tokens, the plan alone at four budgets.
  TOKENS=1024 tp --keys-budget 0.04,0.08,0.15,0.25 ;;
routing128)
  # Per layer at 120k: the classifier's indexed mass, Quest's at the same keys, the oracles.
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --seqs 1 --skip ppl,nih --out "$OUT/routing128" ;;
hand)
  # §38: Quest in the 15 layers where it beat Saap by more than 0.05 in `routing128`, at budgets
  # $2 and batch ${3:-8}, 8 × 1023 tokens at batch 8 (the plan alone at the same budgets: `long`).
  TOKENS=1024 BATCH=${3:-8} tp --keys-budget "$2" --quest-layers "$HAND" ;;
hybrid)
  # §39: the layers calibration recorded for Quest (--hybrid), then §38's 15, same call.
  TOKENS=1024 tp --keys-budget "$2" --hybrid
  TOKENS=1024 tp --keys-budget "$2" --quest-layers "$HAND" ;;
passkey)
  # 120k, 5 depths, budget $3: `hand` (§38's layers) or `hybrid` (the index's), dense and Quest too.
  case $2 in hand) q=(--quest-layers "$HAND") ;; *) q=(--hybrid) ;; esac
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --all-sparse "${q[@]}" --keys-budget "$3" --plan-floor 0.25 --quest-budget "$3" --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey128-$2-$3" ;;
esac
