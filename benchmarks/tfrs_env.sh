#!/usr/bin/env bash
# Build a separate environment with the real TensorFlow Recommenders 0.7.7 (never a twotower dependency) and
# run the parity tests there, or any command given as arguments, e.g.:
#   bash benchmarks/tfrs_env.sh                              # the parity tests
#   bash benchmarks/tfrs_env.sh --ci                         # as CI runs them (see benchmarks/side_env.sh)
#   bash benchmarks/tfrs_env.sh python benchmarks/peer_tfrs.py
# tensorflow-recommenders and tf-keras go in with --no-deps: their metadata pulls the full 572 MB
# `tensorflow` wheel over `tensorflow-cpu`. The environment takes about 2.7 GB and a minute to build here.
# With --ci, a machine that cannot build it (under 6 GiB of free disk, or no TensorFlow wheel from the registry)
# prints TFRS PARITY NOT RUN and the reason, and exits 0; once built, failing parity tests fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR="${TFRS_ENV:-.tfrs-env}" NEEDED_GIB=6 NOT_RUN="TFRS PARITY NOT RUN"

build() {
  # One && chain: a caller's `if` turns off `set -e` inside the function.
  python3 -m venv "$ENV_DIR" &&
    "$ENV_DIR/bin/pip" install -q tensorflow-cpu==2.21.0 &&
    "$ENV_DIR/bin/pip" install -q --no-deps tf-keras==2.21.0 tensorflow-recommenders==0.7.7 &&
    "$ENV_DIR/bin/pip" install -q torch==2.13.0 -e ".[test]"
}

export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3
source benchmarks/side_env.sh
side_env_main -m pytest -q tests/parity -- "$@"
