#!/usr/bin/env bash
# Makes the pre-calibrated index shipped in indexes/ (the one llama_decode uses for SmolLM2-135M
# when no index is cached): the quick plan `llama_decode` would run on first use, on the
# calibration texts only (three Austen novels; layer policy on the Jargon File), never on the
# held-out evaluation texts (Pride and Prejudice, Shakespeare). Prints the file's sha256 and size
# for the README's provenance line. Usage: bash scripts/calibrate_shipped_index.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=indexes/SmolLM2-135M-Instruct.Q4_1-ctx8192-quick.safetensors
mkdir -p indexes
cargo run --release --example calibrate -- --quick --context 8192 --out "$out"
echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- src examples || echo ' (with local changes)')"
sha256sum "$out"
ls -l "$out"
