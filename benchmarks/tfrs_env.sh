#!/usr/bin/env bash
# Build a separate environment with the real TensorFlow Recommenders 0.7.7 (never a twotower dependency) and
# run the parity tests there, or any command given as arguments, e.g.:
#   bash benchmarks/tfrs_env.sh                              # the parity tests
#   bash benchmarks/tfrs_env.sh python benchmarks/peer_tfrs.py
# tensorflow-recommenders and tf-keras go in with --no-deps: their metadata pulls the full 572 MB
# `tensorflow` wheel over `tensorflow-cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR="${TFRS_ENV:-.tfrs-env}"
if [ ! -x "$ENV_DIR/bin/python" ]; then
  python3 -m venv "$ENV_DIR"
  "$ENV_DIR/bin/pip" install -q tensorflow-cpu==2.21.0
  "$ENV_DIR/bin/pip" install -q --no-deps tf-keras==2.21.0 tensorflow-recommenders==0.7.7
  "$ENV_DIR/bin/pip" install -q torch==2.13.0 -e ".[test]"
fi
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3
if [ "$#" -eq 0 ]; then
  exec "$ENV_DIR/bin/python" -m pytest -q tests/parity
fi
PATH="$ENV_DIR/bin:$PATH" exec "$@"
