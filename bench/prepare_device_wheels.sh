#!/usr/bin/env bash
# Download, on this networked machine, the wheels the GPU machine lacks (it reaches no registry).
# Its image has Python 3.12, CUDA torch, transformers, safetensors and numpy; it lacks these.
# Then run bench/device_check.sh there with `.wheels` in the device tool's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .wheels && mkdir -p .wheels
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wheels \
  diffusers==0.42.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 torchsde==0.2.6 trampoline==0.1.2
ls -l .wheels
