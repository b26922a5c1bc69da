#!/usr/bin/env bash
# Prepare, on a CPU machine that reaches the package registries, the wheels the offline GPU check needs and the GPU
# machine (Python 3.12, x86_64 Linux, no network) lacks: DeepSpeed, built here from its source archive (pure Python;
# its ops compile on first use), its dependencies, and httpx with its own (used only where missing, see
# scripts/gpu_check.sh). Writes .whl/ (git-ignored, ~6 MB): carry it with the working tree to the GPU machine.
#   bash scripts/gpu_check_wheels.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$OUT"
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$OUT" \
  hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 einops==0.8.2 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps -w "$OUT" deepspeed==0.19.8
ls -la "$OUT"
du -sh "$OUT"
