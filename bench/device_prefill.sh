#!/usr/bin/env bash
# Prefill on the GPU machine, one call: parity of the new kernels against the CPU, the prefill
# kernel against FlashAttention-2 (PyTorch SDPA flash) in the same run, the index build, and the
# sanitizers on the new kernels. Binaries staged by ../shared/cuda/stage.sh into $DEV (default
# .device); results under $OUT. Usage: [DEV=.devA] bash bench/device_prefill.sh PARITY_BINARY_NAME
set -uo pipefail
parity=$1
dev=${DEV:-.device}
bin=$dev/bin
bash "$dev/run.sh" "$parity" --list >/dev/null   # unpacks the staged binaries
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
"$bin/$parity" --test-threads=1 2>&1 | tee "$OUT/parity.txt"
"$bin/bench_prefill" 8192,32768,131072 1,4 2>&1 | tee "$OUT/prefill.txt"
for warps in 4 8; do
  SAAP_PREFILL_WARPS=$warps "$bin/bench_prefill" 32768 1 2>&1 | tee "$OUT/prefill_w$warps.txt"
done
python3 bench/fa2_prefill_anchor.py 8192,32768,131072 1,4 2>&1 | tee "$OUT/fa2.txt"
SAAP_REPORT_ONLY=index "$bin/bench_report" 32768,171000 1 2>&1 | tee "$OUT/index_build.txt"
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool "$tool" "$bin/$parity" --test-threads=1 \
    prefill_matches_cpu assign_on_tensor_cores merge_matches_cpu > "$OUT/$tool.log" 2>&1
  echo "$tool exit $?" >> "$OUT/$tool.log"
  tail -3 "$OUT/$tool.log"
done
