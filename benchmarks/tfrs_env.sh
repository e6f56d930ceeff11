#!/usr/bin/env bash
# Build a separate environment with the real TensorFlow Recommenders 0.7.7 (never a twotower dependency) and
# run the parity tests there, or any command given as arguments, e.g.:
#   bash benchmarks/tfrs_env.sh                              # the parity tests
#   bash benchmarks/tfrs_env.sh --ci                         # as CI runs them (see below)
#   bash benchmarks/tfrs_env.sh python benchmarks/peer_tfrs.py
# tensorflow-recommenders and tf-keras go in with --no-deps: their metadata pulls the full 572 MB
# `tensorflow` wheel over `tensorflow-cpu`. The environment takes about 2.7 GB and a minute to build here.
# With --ci, a machine that cannot build it (under 6 GiB of free disk, or no TensorFlow wheel from the registry)
# prints TFRS PARITY NOT RUN and the reason, and exits 0; once built, failing parity tests fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR="${TFRS_ENV:-.tfrs-env}"
CI_MODE=0
if [ "${1:-}" = "--ci" ]; then
  CI_MODE=1
  shift
fi

build() {
  # One && chain: a caller's `if` turns off `set -e` inside the function.
  python3 -m venv "$ENV_DIR" &&
    "$ENV_DIR/bin/pip" install -q tensorflow-cpu==2.21.0 &&
    "$ENV_DIR/bin/pip" install -q --no-deps tf-keras==2.21.0 tensorflow-recommenders==0.7.7 &&
    "$ENV_DIR/bin/pip" install -q torch==2.13.0 -e ".[test]"
}

if [ ! -x "$ENV_DIR/bin/python" ]; then
  if [ "$CI_MODE" = 1 ]; then
    free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
    if [ "$free_kib" -lt $((6 * 1024 * 1024)) ]; then
      echo "TFRS PARITY NOT RUN: $((free_kib / 1024)) MiB of free disk, under the 6 GiB the environment needs"
      exit 0
    fi
    if ! build; then
      rm -rf "$ENV_DIR"
      echo "TFRS PARITY NOT RUN: the TensorFlow environment could not be installed (pip's error is above)"
      exit 0
    fi
  else
    build
  fi
fi
export TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3
if [ "$#" -eq 0 ]; then
  exec "$ENV_DIR/bin/python" -m pytest -q tests/parity
fi
PATH="$ENV_DIR/bin:$PATH" exec "$@"
