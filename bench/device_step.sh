#!/usr/bin/env bash
# The Llama-3.1-8B layer step's device time (issue 13, session 22) on the GPU machine: profile the
# step's kernels, then time old and new binaries with FA2 in the same call. Binaries staged in
# .devA–.devD (`bench_report_old` is be07a07, the last commit of session 21).
# End to end: Qwen2.5-Coder-0.5B (GGUF in 40 MiB pieces .qwen/qNN, texts in .qwen/texts, sent
# first), `throughput_old` (be07a07) against `throughput` at 32k, every layer sparse, graphs on.
# Usage: bash bench/device_step.sh STEP
#   (profile | source | steps | tests | piece | setup | calib32 | e2e32)
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
case $step in
profile)
  # Every saap launch of the 171k batch-1 steps (durations), then full sections of the attention
  # kernel and the routing kernels in isolation.
  unpack
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  SAAP_REPORT_ONLY=steps ncu --clock-control none -k regex:saap_ --launch-count 700 \
    --metrics gpu__time_duration.sum --csv "$bin/bench_report" 171008 1 > "$OUT/ncu_steps.csv" 2>&1
  SAAP_REPORT_ONLY=kernels ncu --clock-control none --set full -k regex:saap_decode_bf16 \
    --launch-skip 20 --launch-count 1 "$bin/bench_report" 171008 1 > "$OUT/ncu_decode.txt" 2>&1
  SAAP_REPORT_ONLY=kernels ncu --clock-control none --set full -k regex:saap_decode_combine \
    --launch-skip 20 --launch-count 1 "$bin/bench_report" 171008 1 > "$OUT/ncu_combine.txt" 2>&1
  SAAP_REPORT_ONLY=route ncu --clock-control none --set full -k regex:saap_route \
    --launch-skip 20 --launch-count 2 "$bin/bench_report" 171008 1 > "$OUT/ncu_route.txt" 2>&1
  tail -3 "$OUT"/ncu_*.txt ;;
source)
  # Per-instruction counters (SASS) of the attention kernel; the fused merge against the combine
  # launch on whole steps, alternated.
  unpack
  SAAP_REPORT_ONLY=kernels ncu --clock-control none --set full --page source --print-source sass \
    --csv -k regex:saap_decode_bf16 --launch-skip 20 --launch-count 1 "$bin/bench_report" 171008 1 \
    > "$OUT/ncu_decode_sass.csv" 2>&1
  for m in combine fused combine fused; do
    SAAP_CUDA_MERGE=$m SAAP_REPORT_ONLY=steps run "$bin/bench_report" 171008 1,8
  done ;;
steps)
  unpack
  for b in bench_report_old bench_report bench_report_old bench_report; do
    SAAP_REPORT_ONLY=steps,kernels,route run "$bin/$b" 131072,171008 1,8
  done
  run python3 bench/fa2_prefill_anchor.py 131072,171008 1,8 decode ;;
tests)
  unpack
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1 ;;
piece)
  unpack; piece ;;
setup)
  unpack; setup_qwen ;;
calib32)
  # The index recipe of sessions 20–21 (2 sequences × 512 queries × 30 epochs, hidden 64).
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q32k.safetensors"
  sha256sum "$I/q32k.safetensors" | tee -a "$OUT/calib32.txt" ;;
e2e32)
  # The issue's 32k budget (10% of keys, window and sinks included), old and new alternated.
  for b in throughput_old throughput throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 1,8 --tokens 64 --all-sparse --graph on --keys-budget 0.10
  done ;;
esac
