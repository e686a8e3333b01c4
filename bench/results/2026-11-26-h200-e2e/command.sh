#!/usr/bin/env bash
# End to end on the GPU machine with Qwen2.5-Coder-0.5B (Q4_K_M GGUF sent in pieces to /tmp/q,
# texts in .qwen/texts, all copied to /tmp as they arrive): time to first token before (the previous commit's binary,
# `llama_decode_old`) and after, dense and Saap, at 32k and at 128k with YaRN ×4; two indexes
# calibrated here; batched decode throughput dense vs Saap. Binaries staged in .devB/ and .devC/,
# copied to /tmp/bin.
# Usage: bash bench/device_e2e.sh STEP
#   (setup | ttft32 | calib | ttft128 | batch32 | batch32x32 | batch128)
set -uo pipefail
step=$1
M=/tmp/saap/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
I=/tmp/saap/indexes
export SAAP_CACHE=/tmp/saap LD_LIBRARY_PATH=/usr/local/cuda/lib64
bin=/tmp/bin
run() { echo "\$ $*" | tee -a "$OUT/$step.txt"; "$@" 2>&1 | tee -a "$OUT/$step.txt"; }
case $step in
setup)
  # Carried folders do not outlive their call: binaries (.devB, .devC), texts and model pieces
  # were copied to /tmp in the calls that carried them.
  mkdir -p /tmp/saap/models "$I"
  cat /tmp/q/p0* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
  gunzip -f /tmp/bin/*.gz && chmod +x /tmp/bin/*
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/setup.txt" ;;
ttft32)
  run "$bin/llama_decode_old" --model "$M" --cuda --dense --context 32000 --tokens 16 --fast
  run "$bin/llama_decode" --model "$M" --cuda --dense --context 32000 --tokens 16 --fast ;;
calib)
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 1 --queries 128 --epochs 10 --hidden 64 --out "$I/q32k.safetensors"
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 32768 --seqs 1 --queries 128 --epochs 10 --hidden 64 --out "$I/q128k.safetensors" ;;
ttft128)
  run "$bin/llama_decode" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --tokens 32 --fast
  run "$bin/llama_decode" --model "$M" --cuda --yarn 4 --dense --context 128000 --tokens 32 --fast
  run "$bin/llama_decode" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 128000 --tokens 32 --fast ;;
batch32)
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse ;;
batch32x32)
  # One chunk per prompt (items of a ragged batch must not run out before the last chunk).
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 32 --tokens 64 --chunk 32768
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 32 --tokens 64 --chunk 32768 --all-sparse ;;
batch128)
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse ;;
esac
