#!/usr/bin/env bash
# End to end on the GPU machine with Qwen2.5-Coder-0.5B (Q4_K_M GGUF sent in pieces to /tmp/q,
# texts in .qwen/texts): time to first token before (the previous commit's binary,
# `llama_decode_old`) and after, dense and Saap, at 32k and at 128k with YaRN ×4; two indexes
# calibrated here; batched decode throughput dense vs Saap. Binaries staged in .devB/ and .devC/.
# Usage: bash bench/device_e2e.sh STEP   (setup | ttft32 | calib | ttft128 | batch32 | batch128)
set -uo pipefail
step=$1
M=/tmp/saap/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
I=/tmp/saap/indexes
export SAAP_CACHE=/tmp/saap LD_LIBRARY_PATH=/usr/local/cuda/lib64
bin=.devB/bin
run() { echo "\$ $*" | tee -a "$OUT/$step.txt"; "$@" 2>&1 | tee -a "$OUT/$step.txt"; }
case $step in
setup)
  mkdir -p /tmp/saap/models /tmp/saap/texts "$I"
  cat /tmp/q/p0* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
  cp .qwen/texts/* /tmp/saap/texts/
  cp .devC/bin/* .devB/bin/   # calibrate and throughput travelled apart (64 MiB a call)
  bash .devB/run.sh llama_decode --help >/dev/null
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
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8,32 --tokens 64
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8,32 --tokens 64 --all-sparse ;;
batch128)
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --all-sparse ;;
esac
