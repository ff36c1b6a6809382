#!/usr/bin/env bash
# Every GPU measurement of the WSI path, in one device call (README: Benchmarks):
#   source .device-bundle/setup.sh && bash benchmarks/wsi_gpu_session.sh
# Writes under $OUT (the device tool's folder) or benchmarks/results/.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv"
# The readers on this machine's cuCIM and tifffile, the grid and the outputs: the CPU suite's WSI tests.
python -m pytest -q -p no:cacheprovider -p no:warnings tests/test_wsi_slides.py tests/test_wsi_tiling.py \
  tests/test_wsi_outputs.py tests/test_wsi_gpu_decode.py 2>&1 | tail -15 | tee "$out/wsi-tests.log"
python -m benchmarks.wsi --size large --out "$out" 2>&1 | grep -v -E '^\s*$|INFO|WARNING|"route":' | tail -40
