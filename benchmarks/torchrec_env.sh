#!/usr/bin/env bash
# Build a separate environment with TorchRec (never a core twotower dependency) for the sharded-table tests and
# benchmark, then run the sharded-table tests there, or any command given as arguments, e.g.:
#   bash benchmarks/torchrec_env.sh                                  # tests/sharded (2 gloo processes)
#   bash benchmarks/torchrec_env.sh --ci                             # as CI runs them (see benchmarks/side_env.sh)
#   bash benchmarks/torchrec_env.sh python benchmarks/sharded_tables.py
# torchrec 1.8.0 and fbgemm-gpu-cpu 1.8.0 load with torch 2.13.0 (1.9.x do not: undefined symbols). They go in
# with --no-deps: torchrec's metadata pins torchmetrics==1.0.3 and names the CUDA `fbgemm-gpu` package, which
# would replace the CPU build. What they need beyond the core install is twotower's `torchrec` extra. The
# environment takes about 1.8 GB and a minute to build here. With --ci, a machine that cannot build it (under
# 3 GiB of free disk, or no wheel from the registry) prints TORCHREC TESTS NOT RUN and the reason, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR="${TORCHREC_ENV:-.torchrec-env}" NEEDED_GIB=3 NOT_RUN="TORCHREC TESTS NOT RUN"

build() {
  # One && chain: a caller's `if` turns off `set -e` inside the function.
  python3 -m venv "$ENV_DIR" &&
    "$ENV_DIR/bin/pip" install -q torch==2.13.0 -e ".[test,torchrec]" &&
    "$ENV_DIR/bin/pip" install -q --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0
}

source benchmarks/side_env.sh
side_env_main -m pytest -q -p no:cacheprovider tests/sharded -- "$@"
