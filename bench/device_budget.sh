#!/usr/bin/env bash
# Keys budgets spent layer by layer (session 23) on the GPU machine: Qwen2.5-Coder-0.5B (GGUF in
# pieces .qwen/pNN, sent one per call with the shipped SmolLM2 index moved out of the tree to make
# room), texts and binaries in .gpu/ and .gpu2/ (one call's carry each). Indexes recalibrated with probe curves by the recipe of
# sessions 20–22; then uniform ℓ against the per-layer plan at the same budgets, same run.
# Usage: bash bench/device_budget.sh STEP
#   (piece | setup | calib32 | calib128 | e2e32 | e2e128 | passkey | tests)
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
gpu_unpack() {
  mkdir -p "$bin"
  for d in .gpu .gpu2; do [ -d $d/bin ] && cp $d/bin/* "$bin/"; done
  gunzip -f "$bin"/*.gz 2>/dev/null; chmod +x "$bin"/*
  for f in "$bin"/*-????????????????; do [ -e "$f" ] && mv "$f" "${f%-*}"; done
}
case $step in
piece)
  mkdir -p /tmp/q && cp .qwen/p* /tmp/q/ 2>/dev/null; ls -l /tmp/q | tail -n +2 ;;
setup)
  gpu_unpack
  mkdir -p /tmp/saap/models /tmp/saap/texts "$I" && cp .gpu/texts/* /tmp/saap/texts/
  cat /tmp/q/p* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt" ;;
calib32)
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q32k.safetensors"
  sha256sum "$I/q32k.safetensors" | tee -a "$OUT/calib32.txt" ;;
calib128)
  # Trained at 32k with YaRN x4 as before; held-out text (dense layers, probe curves) at 120k.
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 32768 --held-out-context 120000 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q128k.safetensors"
  sha256sum "$I/q128k.safetensors" | tee -a "$OUT/calib128.txt" ;;
e2e32)
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 8 --tokens 256 --all-sparse --graph on --keys-budget 0.10,0.13 --compare-uniform ;;
e2e128)
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 8 --tokens 256 --chunk 32768 --all-sparse --graph on --keys-budget 0.04,0.08 --compare-uniform ;;
passkey)
  # Every layer sparse under the budgets above (per-layer plans), Quest at the same budget.
  gpu_unpack
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --all-sparse --keys-budget 0.10 --quest-budget 0.10 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey32"
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --all-sparse --keys-budget 0.04 --quest-budget 0.04 --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey128" ;;
tests)
  gpu_unpack
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1 ;;
esac
