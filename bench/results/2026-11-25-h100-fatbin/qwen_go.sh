#!/usr/bin/env bash
# One phase of the Qwen2.5 runs on the GPU machine; binaries and data persist under /tmp while warm.
set -uo pipefail
export SAAP_CACHE=/tmp/saap LD_LIBRARY_PATH=/usr/local/cuda/lib64
phase=$1; shift
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/device.txt
case $phase in
  unpack)
    mkdir -p /tmp/qbin && cp .qwen/bin/*.gz /tmp/qbin/ && gunzip -f /tmp/qbin/*.gz && chmod +x /tmp/qbin/* && ls -la /tmp/qbin ;;
  part)
    mkdir -p /tmp/q && cp .xfer/$1/part.$1 /tmp/q/ && ls -la /tmp/q ;;
  prep)
    bash .qwen/prep.sh ;;
  calib)
    timeout 570 /tmp/qbin/calibrate --qwen --cuda --context 32768 --seqs 1 --queries 128 --epochs 10 --hidden 64 --out /tmp/qwen32k.safetensors > $OUT/calibrate.log 2> $OUT/calibrate.err
    echo "rc $? after ${SECONDS} s"; cat $OUT/calibrate.log ;;
  eval)
    timeout 570 /tmp/qbin/evaluate --qwen --cuda --index /tmp/qwen32k.safetensors --seqs 1 --out $OUT/eval "$@" > $OUT/evaluate.log 2>&1
    echo "rc $? after ${SECONDS} s"; cat $OUT/evaluate.log ;;
  decode)
    for mode in "--dense" "--index /tmp/qwen32k.safetensors"; do
      timeout 280 /tmp/qbin/llama_decode --qwen --cuda --fast $mode "$@" > $OUT/decode-${mode:2:5}.log 2>&1
      echo "== $mode rc $?"; grep -E "prefill|decode:|keys|layers" $OUT/decode-${mode:2:5}.log
    done ;;
esac
