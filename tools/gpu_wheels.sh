#!/bin/sh
# Fetch (here, where PyPI is reachable) the wheels tools/gpu_check.py needs on the offline GPU machine, whose
# image has torch, triton, transformers, safetensors, psutil, tqdm, pytest, pyyaml but not zarr: into .whl/
# (ignored by git), ~10 MB. Run from the checkout the session sends; carry ".whl" in the device run.
set -e
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
