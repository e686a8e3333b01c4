# Shared by the bench/device_*.sh step scripts (sourced after `step` is set): where the model,
# indexes and binaries live on the GPU machine, `run` (echo and log a command into
# $OUT/$step.txt), `unpack` (staged binaries of .devA–.devD into /tmp/bin), `piece` (a carried
# piece of the Qwen2.5 GGUF into /tmp/q) and `setup_qwen` (the pieces joined, the texts in place).
M=/tmp/saap/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
I=/tmp/saap/indexes
export SAAP_CACHE=/tmp/saap LD_LIBRARY_PATH=/usr/local/cuda/lib64 RUST_BACKTRACE=0
bin=/tmp/bin
run() { echo "\$ $*" | tee -a "$OUT/$step.txt"; "$@" 2>&1 | tee -a "$OUT/$step.txt"; }
unpack() {
  mkdir -p "$bin"
  for d in .devA .devB .devC .devD; do [ -d $d ] && cp $d/bin/*.gz "$bin/"; done
  gunzip -f "$bin"/*.gz 2>/dev/null; chmod +x "$bin"/*
  # Test binaries carry cargo's hash suffix.
  for f in "$bin"/*-????????????????; do [ -e "$f" ] && mv "$f" "${f%-*}"; done
}
piece() { mkdir -p /tmp/q && cp .qwen/q* /tmp/q/ 2>/dev/null; ls /tmp/q | tr '\n' ' '; }
setup_qwen() {
  mkdir -p /tmp/saap/models /tmp/saap/texts "$I" && cp .qwen/texts/* /tmp/saap/texts/
  cat /tmp/q/q* > "$M" && sha256sum "$M" | tee "$OUT/setup.txt"
}
