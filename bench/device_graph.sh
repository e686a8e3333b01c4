#!/usr/bin/env bash
# CUDA-graph decode on the GPU machine (session of 2026-11-26, second half): Qwen2.5-Coder-0.5B
# (Q4_K_M GGUF sent in pieces to /tmp/q), texts in .qwen/texts, binaries staged in .devA/.devB and
# copied to /tmp/bin as they arrive (carried folders do not outlive their call).
# Usage: bash bench/device_graph.sh STEP   (setup | calib32 | calib128 | tests | steps | e2e32 | e2e128 | sweep128
#        | sanitize | profile | smol)
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
case $step in
setup)
  mkdir -p /tmp/saap/models "$I" && cp -r .qwen/texts /tmp/saap/
  cat /tmp/q/p0* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
  unpack
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/setup.txt" ;;
calib32)
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 1 --queries 128 --epochs 10 --hidden 64 --out "$I/q32k.safetensors" ;;
calib128)
  run "$bin/calibrate" --model "$M" --cuda --yarn 4 --context 32768 --seqs 1 --queries 128 --epochs 10 --hidden 64 --out "$I/q128k.safetensors" ;;
tests)
  unpack
  run "$bin/graph" --test-threads 1
  run "$bin/cuda_parity" --test-threads 1 ;;
steps)
  unpack
  SAAP_REPORT_ONLY=steps run "$bin/bench_report" 32768,131072,171008 1,8 ;;
e2e32)
  unpack
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64
  run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse ;;
e2e128)
  unpack
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 --all-sparse
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 1,8 --tokens 64 --chunk 32768 ;;
sweep128)
  # Teacher-forced on the text's continuation: tokens/s, keys read, perplexity and top-1 vs dense
  # for several ℓ, every layer sparse, graphs on.
  unpack
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$I/q128k.safetensors" --context 120000 --batch 8 --tokens 64 --chunk 32768 --all-sparse --graph on --n-probe 9,24,64 ;;
sanitize)
  # Parity, then memcheck over both suites and racecheck over the replay kernels.
  unpack
  run "$bin/graph" --test-threads 1
  run "$bin/cuda_parity" --test-threads 1
  run compute-sanitizer --tool memcheck "$bin/graph" --test-threads 1
  run compute-sanitizer --tool memcheck "$bin/cuda_parity" --test-threads 1
  run compute-sanitizer --tool racecheck "$bin/graph" --test-threads 1 replayed_steps decode_graph_matches ;;
profile)
  # Kernels of the Llama-3.1-8B layer steps at 171k, batch 1 (no nsys on the machine: ncu, our
  # kernels only, one duration per launch).
  unpack
  SAAP_REPORT_ONLY=steps ncu --clock-control none -k regex:saap_ --launch-count 700 \
    --metrics gpu__time_duration.sum --csv "$bin/bench_report" 171008 1 > "$OUT/ncu_steps.csv" ;;
smol)
  # SmolLM2 decode at batch 1 and 8, then every launch of an eager run under ncu (GGUF sent in
  # pieces .smol/pN to /tmp/s, Shakespeare in .smol/texts). SMOL_BINS names the throughput
  # binaries to time in turn (e.g. "throughput_old throughput throughput_old throughput").
  unpack
  mkdir -p /tmp/saap/models /tmp/s && cp -r .smol/texts /tmp/saap/ && cp .smol/p* /tmp/s/
  cat /tmp/s/p* > /tmp/saap/models/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/saap/models/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/smol.txt"
  smol_index=indexes/SmolLM2-135M-Instruct.Q4_1-ctx8192-quick.safetensors
  for b in ${SMOL_BINS:-throughput}; do
    run "$bin/$b" --cuda --index $smol_index --context 7000 --batch 1,8 --tokens 64 --all-sparse
  done
  ncu --clock-control none --launch-skip "${SMOL_SKIP:-0}" --launch-count "${SMOL_COUNT:-2800}" \
    --metrics gpu__time_duration.sum --csv "$bin/throughput" --cuda --index $smol_index \
    --context 7000 --batch 1 --tokens 2 --all-sparse --graph off > "$OUT/ncu_smol.csv" ;;
esac
