#!/usr/bin/env bash
# Wheels of what splice needs and the device machine's image lacks (Python 3.12, manylinux x86-64), at the versions
# this checkout's .venv holds, into .whl/ (git-ignored), for benchmarks/device_check.sh. Run here, where pip reaches
# the package registries, before the device call:  bash benchmarks/device_wheels.sh
# PY_VERSION=3.11 fetches them for another Python (to try device_check.sh on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
# The image's own list (/work/.library/device/KINDS.md) has torch, transformers, safetensors, numba, peft, accelerate,
# fsspec, typer, rich, pyyaml, pytest; these are the rest of pyproject's dependencies (POT, 33 MB, only for fusion, is
# left out) and what they need.
MISSING=(mergekit immutables pydantic pydantic-core annotated-types typing-inspection optuna alembic sqlalchemy mako
  colorlog cmaes)
mapfile -t PINS < <(.venv/bin/python - "${MISSING[@]}" <<'PY'
import importlib.metadata
import sys

for name in sys.argv[1:]:
    print(f"{name}=={importlib.metadata.version(name)}")
PY
)
rm -rf .whl
mkdir .whl
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$platform")
done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${PINS[@]}"
ls .whl
du -sh .whl
