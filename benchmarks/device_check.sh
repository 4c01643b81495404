#!/usr/bin/env bash
# One accelerator (GPU or TPU), one command, <= 8 minutes: the device, the Lion update
# benchmark, the 1b decoder's train step (Lion vs AdamW, attention kernel vs XLA) and a short
# LM demo run with a checkpoint and one resume, written as JSON + Markdown.
#
#   benchmarks/device_check.sh [--dry-run] [OUT_DIR]    (default: $OUT, else ./device_check_out)
#
# --dry-run: the same script end to end with tiny sizes on the CPU (a few minutes).
# Needs python3 with jax for the accelerator (a CUDA/TPU image's, or `pip install -e '.[gpu]'`
# / '.[tpu]'). This project's other dependencies that are missing are installed: from wheels
# in ./.whl when that folder exists (a machine without a registry; benchmarks/device_wheels.sh
# fetches them), else from the package registry. Nothing else is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
OUT_DIR="${OUT:-}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY="--dry-run" ;;
    -*) echo "error: unknown option $arg (usage: benchmarks/device_check.sh [--dry-run] [OUT_DIR])" >&2; exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-device_check_out}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" benchmarks/device_deps.py) || { echo "error: $PY cannot run (no Python 3.11+?)" >&2; exit 2; }
if [ -n "$missing" ]; then
  echo "installing: $missing"
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/device_check_site .whl/*.whl \
      || { echo "error: could not install the wheels in .whl" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/device_check_site"
  else
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $missing || { echo "error: could not install: $missing" >&2; exit 2; }
  fi
fi
[ -n "$DRY" ] && export JAX_PLATFORMS=cpu
"$PY" -c "import jax; print('devices:', jax.devices())" || { echo "error: jax does not start" >&2; exit 2; }
exec timeout 470 "$PY" benchmarks/device_check.py --out "$OUT_DIR" $DRY
