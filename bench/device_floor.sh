#!/usr/bin/env bash
# A floor under the per-layer plan (session 24) on the GPU machine, one machine, calls back to
# back. Test binaries in .devT/, the other binaries in .gpuA/ (calibrate, texts) and .gpuB/
# (throughput, evaluate), each one call's carry, kept in /tmp/stash until `setup`; the
# Qwen2.5-Coder-0.5B GGUF in pieces .qwen/pNN, one per call with the shipped SmolLM2 index moved
# out of the tree to make room. Indexes by the recipe of sessions 20–23 (same bytes as before).
# Usage: bash bench/device_floor.sh STEP
#   (tests | stash | piece | setup | calib128 | e2e128 | passkey128 [B F [INDEX]] | calib32 | e2e32 |
#    passkey32 [F] | calib128long | e2e128idx [BUDGETS [BATCHES]] | calib128x96 | e2e128cmp | steps)
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
case $step in
tests)
  # The classifier's kernels changed (its output layer once per weight type): parity, graphs,
  # and the sanitizer on the routing tests, which run both MLP kernels and top-ℓ.
  mkdir -p "$bin" && cp .devT/bin/*.gz "$bin/" && gunzip -f "$bin"/*.gz && chmod +x "$bin"/*
  for f in "$bin"/*-????????????????; do [ -e "$f" ] && mv "$f" "${f%-*}"; done
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1
  run "$sanitizer" --tool memcheck "$bin/cuda_parity" route --test-threads 1
  run "$sanitizer" --tool racecheck "$bin/cuda_parity" route_matches_cpu --test-threads 1 ;;
stash)
  mkdir -p /tmp/stash && for d in .gpuA .gpuB; do [ -d $d ] && cp -r $d/* /tmp/stash/; done
  ls -R /tmp/stash | tr '\n' ' ' ;;
piece)
  mkdir -p /tmp/q && cp .qwen/p* /tmp/q/ 2>/dev/null; ls -l /tmp/q | tail -n +2 ;;
setup)
  mkdir -p "$bin" /tmp/saap/models /tmp/saap/texts "$I"
  cp /tmp/stash/bin/*.gz "$bin/" && gunzip -f "$bin"/*.gz && chmod +x "$bin"/*
  cp /tmp/stash/texts/* /tmp/saap/texts/
  cat /tmp/q/p* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/setup.txt" ;;
calib128)
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 32768 --held-out-context 120000 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q128k.safetensors"
  sha256sum "$I/q128k.safetensors" | tee -a "$OUT/calib128.txt" ;;
e2e128)
  # Floors 0 (session 23's plan), ¼, ½, ¾ and the uniform ℓ on the same caches and tokens.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 256 --chunk 32768 --all-sparse --graph on --keys-budget 0.04,0.08 --plan-floor 0,0.25,0.5,0.75 --compare-uniform ;;
passkey128)
  # Budget $2 (default 0.04), floor $3 (default ½).
  b=${2:-0.04} f=${3:-0.5} x=${4:-q128k}
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$I/$x.safetensors" --all-sparse --keys-budget $b --plan-floor $f --quest-budget $b --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey128-$x-$b-floor$f" ;;
calib32)
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q32k.safetensors"
  sha256sum "$I/q32k.safetensors" | tee -a "$OUT/calib32.txt" ;;
e2e32)
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 256 --all-sparse --graph on --keys-budget 0.10,0.13 --plan-floor 0,0.25,0.5 --compare-uniform ;;
passkey32)
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --all-sparse --keys-budget 0.10 --plan-floor ${2:-0.5} --quest-budget 0.10 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey32-floor${2:-0.5}" ;;
calib128long)
  # NOTES §33: the same training tokens and queries as calib128, as one 64k sequence per text.
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 65536 --seqs 1 --queries 1024 --sinks 4 --held-out-context 120000 --epochs 30 --hidden 64 --out "$I/q128k-64k.safetensors"
  sha256sum "$I/q128k-64k.safetensors" | tee -a "$OUT/calib128long.txt" ;;
e2e128idx)
  for x in q128k q128k-64k; do
    run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/$x.safetensors" --context 120000 --batch ${3:-8} --tokens 256 --chunk 32768 --all-sparse --graph on --keys-budget ${2:-0.04,0.08} --plan-floor 0.25
  done ;;
calib128x96)
  # NOTES §34: one 96k sequence per text (half as many tokens again as calib128long).
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 98304 --seqs 1 --queries 1024 --sinks 4 --held-out-context 120000 --epochs 30 --hidden 64 --out "$I/q128k-96k.safetensors"
  sha256sum "$I/q128k-96k.safetensors" | tee -a "$OUT/calib128x96.txt" ;;
e2e128cmp)
  # The 64k- and 96k-sequence indexes, and Quest, at the same budgets on the same caches.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k-64k.safetensors" --context 120000 --batch 8 --tokens 256 --chunk 32768 --all-sparse --graph on --keys-budget 0.04,0.08 --plan-floor 0.25 --quest-budget 0.04,0.08
  [ -f "$I/q128k-96k.safetensors" ] && run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k-96k.safetensors" --context 120000 --batch 8 --tokens 256 --chunk 32768 --all-sparse --graph on --keys-budget 0.04,0.08 --plan-floor 0.25 ;;
steps)
  # The Llama-3.1-8B layer step and the routing alone, 863b8d3 (`bench_report_old`, three output
  # kernels per weight type) against this commit, alternated twice, FA2 in the same call
  # (binaries in .devS/).
  mkdir -p "$bin" && cp .devS/bin/*.gz "$bin/" && gunzip -f "$bin"/*.gz && chmod +x "$bin"/*
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  for b in bench_report_old bench_report bench_report_old bench_report; do
    SAAP_REPORT_ONLY=steps,route run "$bin/$b" 171008 1,8
  done
  run python3 bench/fa2_prefill_anchor.py 171008 1,8 decode ;;
esac
