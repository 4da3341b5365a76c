#!/usr/bin/env bash
# One prepared run on a lent GPU machine (issue 7): install the carried wheels, then time every row
# of bench/gpu_speed.py (checking the fast path's images against eager), then the first and second
# start of a compiled model (bench/compile_start.py), then the GPU tests (tests/test_gpu.py: samplers,
# previews and VAE tiles under CUDA graphs; no syncs in the loop). JSON and logs go to $OUT.
#   local:  bash bench/prepare_device_wheels.sh
#   device: run command "bash bench/device_check.sh", carry [".wheels"], timeout_s 600
# Both scripts save their JSON as they go, so a part cut off by its timeout keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# --target, as the device README advises: the image's own site-packages stay as they are.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
# Each compiled row costs about a minute per batch size.
timeout 330 python3 bench/gpu_speed.py --repeats 5 --warmup 2 \
  --json "$OUT/$(date +%F)-${card}.json" 2>&1 | tee "$OUT/gpu_speed.log" | grep -v Warning
timeout 190 python3 bench/compile_start.py --timeout 120 \
  --json "$OUT/$(date +%F)-${card}-compile-start.json" 2>&1 | tee "$OUT/compile_start.log" | grep -v Warning
# pytest is in the device image; the tests import no gradio or fastapi.
# Whatever is left of the device call's 600 s, less a margin for $OUT to come back.
left=$((585 - SECONDS))
[ "$left" -gt 15 ] && timeout "$left" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
