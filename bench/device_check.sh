#!/usr/bin/env bash
# One prepared run on a lent GPU machine (issue 7): install the carried wheels, then the parts named on
# the command line, in the order given (default: speed profile tests start):
#   speed  every row of bench/gpu_speed.py, checking the fast path's images against eager (~8 min on an H100)
#   tune   batch 8 only: eager, fast_path and engine, then the fast path compiled under each setting it does
#          not use yet (gpu_speed.py --tune all: cuDNN benchmark mode, 1x1 convs as matmuls, cuDNN
#          attention, fused QKV, inductor's coordinate-descent tuning, inductor's freezing, and float8
#          linear layers), to find what closes the gap to 16 images/s (~1 min per setting; coordinate
#          descent over 5).
#          TUNE=a,b and TUNE_ROWS=... pick fewer.
#   profile  where a UNet call's time goes by kind of op, and each attention backend at SD 1.5's shapes
#          (bench/unet_profile.py; no compile) (~1 min)
#   tests  the GPU tests (tests/test_gpu.py: samplers, previews and VAE tiles under CUDA graphs; no syncs
#          in the loop) (~2 min)
#   start  the first and second start of a compiled model (bench/compile_start.py) (~2.5 min)
# They take longer than one device call (600 s) together, so a session runs the ones it needs (the
# results so far: bench/results/README.md). For example, the GPU tests and then two settings:
#   local:  bash bench/prepare_device_wheels.sh
#   device: run command "LIMIT=560 TUNE=cudnn_attention,fused_qkv TUNE_ROWS=fast_path \
#           bash bench/device_check.sh tests tune", carry [".wheels"], timeout_s 560
# LIMIT is the call's timeout_s: each part stops in time to leave the later parts what they need.
# Each part saves its JSON or log as it goes, so a part cut off by its timeout keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
LIMIT=${LIMIT:-600}                         # the device call's timeout_s
TUNE=${TUNE:-all}                           # the tune part's settings (gpu_speed.py --tune)
TUNE_ROWS=${TUNE_ROWS:-eager,fast_path,engine}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-speed profile tests start}
# Seconds each part needs at least, kept free for it by the parts before it.
declare -A NEEDS=([speed]=0 [tune]=0 [profile]=60 [tests]=150 [start]=0)
for part in $parts; do
  [[ -n ${NEEDS[$part]+x} ]] || { echo "unknown part '$part': choose from speed, tune, profile, tests, start"; exit 2; }
done
# --target, as the device README advises: the image's own site-packages stay as they are.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
# What is left of the call's time for this part: less the parts after it and a margin for $OUT to come
# back (at least 1: timeout 0 would mean no limit).
left() { local s=$((LIMIT - 15 - SECONDS - $1)); echo $((s > 0 ? s : 1)); }

run_part() {  # run_part PART SECONDS_TO_KEEP_FOR_LATER_PARTS
  local t; t=$(left "$2")
  case $1 in
    speed)  # One compile per compiled row and batch size, about a minute each; 3 runs after 1 warm-up varied
            # by under 5% on the H100.
      timeout "$t" python3 bench/gpu_speed.py --repeats 3 --warmup 1 \
        --json "$OUT/$(date +%F)-${card}.json" 2>&1 | tee "$OUT/gpu_speed.log" | grep -v Warning ;;
    tune)
      timeout "$t" python3 bench/gpu_speed.py --rows "$TUNE_ROWS" --tune "$TUNE" --batch-sizes 8 \
        --repeats 3 --warmup 1 --json "$OUT/$(date +%F)-${card}-tune.json" 2>&1 | tee "$OUT/gpu_tune.log" \
        | grep -v Warning ;;
    profile)
      timeout "$t" python3 bench/unet_profile.py --json "$OUT/$(date +%F)-${card}-unet-profile.json" 2>&1 \
        | tee "$OUT/unet_profile.log" | grep -v Warning ;;
    tests)  # pytest is in the device image; the tests import no gradio or fastapi.
      timeout "$t" python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -25 ;;
    start)
      timeout "$t" python3 bench/compile_start.py --timeout 120 \
        --json "$OUT/$(date +%F)-${card}-compile-start.json" 2>&1 | tee "$OUT/compile_start.log" | grep -v Warning ;;
  esac
}

# The parts run in the order given.
set -- $parts
while (( $# )); do
  part=$1; shift
  later=0; for p in "$@"; do later=$((later + NEEDS[$p])); done
  run_part "$part" "$later"
done
