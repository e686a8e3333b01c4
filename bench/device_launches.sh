#!/usr/bin/env bash
# Fewer launches per decode step (session of 2026-11-26, fourth part) on the GPU machine:
# Qwen2.5-Coder-0.5B (Q4_K_M GGUF sent in 45 MB pieces .qwen/qNN to /tmp/q), texts in .qwen/texts,
# binaries staged in .devA–.devD and copied to /tmp/bin as they arrive (carried folders do not
# outlive their call). `throughput_old` is the binary of the session's first commit (d1ebc80).
# Usage: bash bench/device_launches.sh STEP
#   (tests | piece | setup | calib | e2e32 | e2e128 | budget | passkey | steps | side |
#    estimate32 | estimate128 | estimate_passkey | steps_old | quest)
# `side` compares ce60e3c (`throughput_mid`) with the second-stream append (`throughput`).
# The estimate* steps (session 21) run each keys budget without and with the unread partitions
# estimated from their means, beside the binary before the estimate (86e872c, `throughput_old`);
# `steps_old` times the Llama layer step of both binaries and FA2 in one call; `quest` runs
# Saap and Quest at the issue's budgets with both binaries (Quest's routing on its own kernels
# in the new one, candle ops in the old).
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
tp() { "$bin/$1" --model "$M" --cuda "${@:2}"; }
ev() { "$bin/evaluate" --model "$M" --cuda "$@"; }
case $step in
tests)
  unpack
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  run "$bin/saap" --test-threads 1 fused_
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1
  run "$bin/attention" --test-threads 1 ;;
piece)
  unpack; piece ;;
setup)
  unpack; setup_qwen ;;
calib)
  # Indexes trained as the better ones of the session before (2 sequences × 512 queries ×
  # 30 epochs), at 32k and with YaRN ×4 for 128k.
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q32k.safetensors"
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q128k.safetensors" ;;
e2e32)
  # The first commit's binary, then this one, twice each, every layer sparse, graphs on.
  for b in throughput_old throughput throughput_old throughput; do
    run tp $b --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on
  done ;;
e2e128)
  for b in throughput_old throughput; do
    run tp $b --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse --graph on
  done ;;
budget)
  # The issue's keys-read targets (10% at 32k, 4% at 128k, window and sinks included), Saap and
  # Quest at the same budget.
  run tp throughput --index "$I/q32k.safetensors" --context 32000 --batch 8 --tokens 64 --all-sparse --graph on --keys-budget 0.10 --quest-budget 0.10
  run tp throughput --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 8 --tokens 64 --chunk 32768 --all-sparse --graph on --keys-budget 0.04 --quest-budget 0.04 ;;
passkey)
  run ev --index "$I/q32k.safetensors" --all-sparse --keys-budget 0.10 --quest-budget 0.10 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey32-budget"
  run ev --yarn 4 --index "$I/q128k.safetensors" --all-sparse --keys-budget 0.04 --quest-budget 0.04 --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey128-budget" ;;
steps)
  # Llama-3.1-8B layer step (bench_report) and FlashAttention-2 in the same call.
  unpack
  SAAP_REPORT_ONLY=steps run "$bin/bench_report" 32768,131072,171008 1,8
  run python3 bench/fa2_prefill_anchor.py 32768,131072,171008 1,8 decode ;;
side)
  for b in throughput_mid throughput throughput_mid throughput; do
    run tp $b --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1 --tokens 64 --chunk 32768 --all-sparse --graph on
    run tp $b --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on
  done ;;
estimate32)
  # C = 1024 means rows are 3.2% of a 32k context: 0.13 reads as many rows without them.
  run tp throughput_old --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on --keys-budget 0.10
  run tp throughput --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on --keys-budget 0.10,0.13,0.20 --estimate-unread ;;
estimate128)
  # Means rows: 0.85% of a 120k context (0.05 reads as many rows without them).
  run tp throughput_old --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse --graph on --keys-budget 0.04
  run tp throughput --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse --graph on --keys-budget 0.04,0.05,0.15 --estimate-unread ;;
estimate_passkey)
  run ev --index "$I/q32k.safetensors" --all-sparse --keys-budget 0.10 --estimate-unread --quest-budget 0.10 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey32-estimate"
  run ev --yarn 4 --index "$I/q128k.safetensors" --all-sparse --keys-budget 0.04 --estimate-unread --quest-budget 0.04 --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey128-estimate" ;;
quest)
  for b in throughput_old throughput; do
    run tp $b --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on --keys-budget 0.10 --quest-budget 0.10
    run tp $b --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse --graph on --keys-budget 0.04 --quest-budget 0.04
  done ;;
steps_old)
  unpack
  for b in bench_report_old bench_report bench_report_old bench_report; do
    SAAP_REPORT_ONLY=steps run "$bin/$b" 131072,171008 1,8
  done
  run python3 bench/fa2_prefill_anchor.py 131072,171008 1,8 decode ;;
esac
