#!/usr/bin/env bash
# Wheels for a lent GPU machine that has its own torch but none of this project's other packages and no
# internet: downloaded (or, for DeepSpeed, built) here into the ignored .whl/, carried there, installed
# into /tmp/site. Then, on the GPU machine, as one command (bench/README.md):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT
#
#   bench/device_wheels.sh [PYTHON_VERSION]      # the GPU machine's Python (default 3.12, as seen there)
#
# Runs pip with .venv's Python (make setup): building DeepSpeed's wheel imports its setuptools and torch.
# The versions are requirements.txt's, and for the dependencies the ones that .venv resolved. What the
# GPU image already holds (torch, numpy, pyyaml, safetensors, sentencepiece, pillow, scipy, tqdm, psutil,
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
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${platforms[@]}" -d "$OUT" \
    megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 lpips==0.1.4 \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed is published as a source archive only: a pure-Python wheel (its CUDA ops are built at run time
# when used; the check uses none of them by default).
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8
ls -1 "$OUT"
du -sh "$OUT"
