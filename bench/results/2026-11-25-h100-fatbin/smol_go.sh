#!/usr/bin/env bash
# Fatbin check on a fresh GPU machine: SmolLM2 dense decode with the driver's JIT cache off,
# PTX build (old) vs fatbin build (new), and the CUDA parity tests.
set -uo pipefail
export SAAP_CACHE=/tmp/saap LD_LIBRARY_PATH=/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/device.txt
case $1 in
  a)
    mkdir -p /tmp/sbin /tmp/old /tmp/s && cp .device/bin/*.gz /tmp/sbin/ && cp .smol/old/*.gz /tmp/old/ && gunzip -f /tmp/sbin/*.gz /tmp/old/*.gz && chmod +x /tmp/sbin/* /tmp/old/* && ls -la /tmp/sbin /tmp/old ;;
  a2)
    cp .smol/a/* /tmp/s/ && ls -la /tmp/s ;;
  b)
    mkdir -p $SAAP_CACHE/models $SAAP_CACHE/texts
    M=$SAAP_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
    cat /tmp/s/smolpart.0 .smol/b/smolpart.1 > $M && cp .smol/c/SmolLM2*.sha256 $SAAP_CACHE/models/ && cp .smol/c/austen* $SAAP_CACHE/texts/
    echo "$(cat $M.sha256)  $M" | sha256sum -c - || exit 1
    for build in old sbin; do
      rm -rf ~/.nv/ComputeCache
      CUDA_CACHE_DISABLE=1 /tmp/$build/llama_decode --cuda --dense --fast --context 3000 --tokens 64 > $OUT/decode-$build.log 2>&1
      echo "== $build (JIT cache off) rc $?"; grep -E "prefill|decode:" $OUT/decode-$build.log
    done
    /tmp/sbin/llama_decode --cuda --dense --fast --context 3000 --tokens 64 > $OUT/decode-sbin-warm.log 2>&1
    echo "== sbin again (JIT cache on) rc $?"; grep -E "prefill|decode:" $OUT/decode-sbin-warm.log
    SECONDS=0; CUDA_CACHE_DISABLE=1 /tmp/sbin/cuda_parity > $OUT/parity.txt 2>&1; echo "parity rc $? in ${SECONDS} s"; tail -4 $OUT/parity.txt ;;
esac
