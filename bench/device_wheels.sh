#!/usr/bin/env bash
# Wheels for a lent GPU machine that has its own torch but none of this project's other packages and no
# internet: downloaded (or, for DeepSpeed, built) here into the ignored .whl/, carried there, installed
# into /tmp/site. Then, on the GPU machine, as one command (bench/README.md):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --budget-s 540 --out $OUT
#
#   bench/device_wheels.sh [PYTHON_VERSION]      # the GPU machine's Python (default 3.12, as seen there)
#
# Runs pip with .venv's Python (make setup): building DeepSpeed's wheel imports its setuptools and torch.
# The versions are read from requirements.txt, and for the dependencies from what .venv resolved. What the
# GPU image already holds (torch, torchvision, numpy, pyyaml, safetensors, sentencepiece, pillow, scipy, tqdm, psutil,
# einops, msgpack, ninja, py-cpuinfo, tensorboard) is not carried: its versions are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${1:-3.12}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=.whl
rm -rf "$OUT"
mkdir -p "$OUT"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# The pins: requirements.txt's for the project's packages, .venv's for DeepSpeed's dependencies.
pinned() { grep -iE "^($1)==" "$2"; }
packages=$(pinned 'megatron-core|webdataset|braceexpand|lpips' requirements.txt)
dependencies=$(pinned 'hjson|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection' \
    <("$PYTHON" -m pip freeze))
# shellcheck disable=SC2086  # (one requirement per word)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${platforms[@]}" -d "$OUT" $packages $dependencies
# DeepSpeed is published as a source archive only: a pure-Python wheel (its CUDA ops are built at run time
# when used; the check uses none of them by default).
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$(pinned deepspeed requirements.txt)"
ls -1 "$OUT"
du -sh "$OUT"
