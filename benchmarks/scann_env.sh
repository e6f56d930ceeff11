#!/usr/bin/env bash
# Build a separate environment with ScaNN 1.4.2 (TFRS's approximate search; never a twotower dependency) for the
# approximate-search benchmark, then run a command there, by default benchmarks/ann.py with ScaNN's rows:
#   bash benchmarks/scann_env.sh                                      # python benchmarks/ann.py --scann
#   bash benchmarks/scann_env.sh python benchmarks/ann.py --scann --json ann.json
# scann 1.4.2 loads with tensorflow-cpu 2.20.0 and tf-keras 2.20.1, not with TensorFlow 2.21 (which the TFRS
# environment of tfrs_env.sh holds); scann goes in with --no-deps, as its metadata names the full `tensorflow`
# wheel over `tensorflow-cpu`. faiss-cpu comes with twotower's own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR="${SCANN_ENV:-.scann-env}" NEEDED_GIB=6 NOT_RUN="SCANN BENCHMARK NOT RUN"

build() {
  # One && chain: a caller's `if` turns off `set -e` inside the function.
  python3 -m venv "$ENV_DIR" &&
    "$ENV_DIR/bin/pip" install -q tensorflow-cpu==2.20.0 &&
    "$ENV_DIR/bin/pip" install -q --no-deps tf-keras==2.20.1 scann==1.4.2 &&
    "$ENV_DIR/bin/pip" install -q torch==2.13.0 -e ".[test]"
}

export TF_CPP_MIN_LOG_LEVEL=3
source benchmarks/side_env.sh
side_env_main benchmarks/ann.py --scann -- "$@"
