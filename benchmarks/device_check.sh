#!/usr/bin/env bash
# Issue 22's checks on a GPU, as one call of the `device` tool (its 15 minutes of device time include the machine's
# start). Prepare here first, then call:
#   bash benchmarks/device_wheels.sh
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=570)
# 1. tests/test_transfer.py with the GPU: its CUDA tests (soup and TIES on cuda equal the CPU bit for bit; uploads
#    come from pinned memory and overlap the kernel) run there instead of being skipped.
# 2. benchmarks/throughput.py --device cuda, warm cache, one round: the raw floor, splice soup / ties / dare_ties
#    with --device cuda against mergekit-yaml --cuda (3 x 1.6 GB bf16 Llama-shaped models, built there first).
# What comes back under $OUT: gpu.txt, tests.log, throughput.log, results-cuda.json.
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
  exit 1
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
printf '#!/bin/sh\nexec %s -m splice "$@"\n' "$PYTHON" >/tmp/site/bin/splice # the project runs from this tree
chmod +x /tmp/site/bin/splice
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; nproc; } |
  tee "$OUT/gpu.txt"
timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_transfer.py 2>&1 | tee "$OUT/tests.log"
timeout 320 "$PYTHON" benchmarks/throughput.py --device cuda --modes warm --repeats 1 --only raw-floor splice-soup \
  mergekit-linear splice-ties mergekit-ties splice-dare_ties mergekit-dare_ties 2>&1 | tee "$OUT/throughput.log"
cp benchmarks/_work/throughput/bf16/results-cuda.json "$OUT/" 2>/dev/null || echo "no results-cuda.json"
