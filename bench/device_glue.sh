#!/usr/bin/env bash
# Model glue and combine changes on the GPU machine (session of 2026-11-26, third part):
# Qwen2.5-Coder-0.5B (Q4_K_M GGUF sent in 45 MB pieces .qwen/qNN to /tmp/q), Shakespeare in
# .smol/texts, binaries staged in .devA/.devB/.devC and copied to /tmp/bin as they arrive (carried
# folders do not outlive their call). `throughput_old` is the binary of the session's first commit.
# Usage: bash bench/device_glue.sh STEP   (tests | setup | calib32 | calib128 | e2e32 | e2e128 |
#        batch32 | passkey32 | more)
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
tp() { "$bin/$1" --model "$M" --cuda "${@:2}"; }
case $step in
tests)
  unpack
  run "$bin/saap" --test-threads 1 fused_norm
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1 ;;
piece)
  unpack; piece ;;
setup)
  unpack; piece
  mkdir -p /tmp/saap/models "$I" && cp -r .smol/texts /tmp/saap/
  cat /tmp/q/q* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/setup.txt" ;;
calib32)
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 1 --queries 128 --epochs 10 --hidden 64 --out "$I/q32k.safetensors" ;;
calib128)
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 32768 --seqs 1 --queries 128 --epochs 10 --hidden 64 --out "$I/q128k.safetensors" ;;
e2e32)
  # The first commit's binary, then this one (with Quest at about Saap's keys read).
  run tp throughput_old --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on
  run tp throughput --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on --quest-budget 0.13 ;;
e2e128)
  run tp throughput_old --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse --graph on
  run tp throughput --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse --graph on --quest-budget 0.08 ;;
batch32)
  # 32 prompts of up to 32k in chunks of 8192 (262k rows per forward, as batch 8 × 32768).
  run timeout 300 "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 32 --tokens 32 --chunk 8192 --all-sparse --graph on ;;
passkey32)
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --all-sparse --quest-budget 0.13 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey32" ;;
more)
  # Indexes trained on more data (2 sequences × 512 queries × 30 epochs), then passkey and
  # quality with every layer sparse.
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q32k-more.safetensors"
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k-more.safetensors" --all-sparse --quest-budget 0.13 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey32-more"
  run tp throughput --index "$I/q32k-more.safetensors" --context 32000 --batch 8 --tokens 64 --all-sparse --graph on
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q128k-more.safetensors"
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$I/q128k-more.safetensors" --all-sparse --quest-budget 0.08 --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.5,0.9 --out "$OUT/passkey128-more"
  run tp throughput --yarn 4 --index "$I/q128k-more.safetensors" --context 120000 --batch 8 --tokens 64 --chunk 32768 --all-sparse --graph on ;;
esac
