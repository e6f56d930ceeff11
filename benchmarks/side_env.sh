# Shared by tfrs_env.sh and torchrec_env.sh (sourced, not run): build a side environment once, then run a command
# in it. The caller sets ENV_DIR, NEEDED_GIB (free disk to ask for in CI), NOT_RUN (CI's message prefix) and a
# build() function, then calls `side_env_main DEFAULT_COMMAND... -- "$@"`.
# With --ci first, a machine that cannot build the environment (too little free disk, or pip fails) prints
# "$NOT_RUN: <reason>" and exits 0; once built, a failing command fails the run.

side_env_main() {
  local defaults=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    defaults+=("$1")
    shift
  done
  shift  # the "--"
  local ci_mode=0
  if [ "${1:-}" = "--ci" ]; then
    ci_mode=1
    shift
  fi
  if [ ! -x "$ENV_DIR/bin/python" ]; then
    if [ "$ci_mode" = 1 ]; then
      local free_kib
      free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
      if [ "$free_kib" -lt $((NEEDED_GIB * 1024 * 1024)) ]; then
        echo "$NOT_RUN: $((free_kib / 1024)) MiB of free disk, under the $NEEDED_GIB GiB the environment needs"
        exit 0
      fi
    fi
    if ! build; then
      rm -rf "$ENV_DIR"
      if [ "$ci_mode" = 1 ]; then
        echo "$NOT_RUN: the environment could not be installed (pip's error is above)"
        exit 0
      fi
      echo "the environment $ENV_DIR could not be built (pip's error is above)" >&2
      exit 1
    fi
  fi
  if [ "$#" -eq 0 ]; then
    exec "$ENV_DIR/bin/python" "${defaults[@]}"
  fi
  PATH="$ENV_DIR/bin:$PATH" exec "$@"
}
