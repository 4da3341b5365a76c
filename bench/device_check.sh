#!/usr/bin/env bash
# One prepared run on a lent GPU machine (issue 7): install the carried wheels, then time every row
# of bench/gpu_speed.py and check the fast path's images against eager, writing JSON to $OUT.
#   local:  bash bench/prepare_device_wheels.sh
#   device: run command "bash bench/device_check.sh", carry [".wheels"], timeout ~540 s
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
# Rows that compile cost about a minute each per batch size: keep repeats low to fit the lease.
timeout 480 python3 bench/gpu_speed.py --repeats 5 --warmup 2 \
  --json "$OUT/$(date +%F)-${card}.json" 2>&1 | tee "$OUT/gpu_speed.log" | grep -v Warning
