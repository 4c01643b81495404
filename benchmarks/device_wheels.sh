#!/usr/bin/env bash
# Fetches, into ./.whl, the wheels benchmarks/device_check.sh needs on an accelerator machine
# that has no package registry but a CUDA image with jax, flax, optax, orbax, numpy, torch etc.
# (the packages below are the ones such an image lacks: this project's dependencies and theirs).
# Run it where pip reaches a registry; PY_VERSION (default 3.12) is the machine's Python.
#
#   benchmarks/device_wheels.sh && echo /.whl/ >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
PACKAGES=(ml-collections grain tensorboardX tensorflow-datasets array-record zstandard dm-tree
          immutabledict promise simple-parsing docstring-parser tensorflow-metadata termcolor toml
          googleapis-common-protos)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p .whl
for pkg in "${PACKAGES[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
du -sh .whl
