#!/bin/sh
# Wheels the lent GPU machine lacks (its image has torch, triton, numpy, scipy, pandas, scikit-learn but not
# these), for Python 3.12 x86-64, into .whl/ (ignored by git): the SSIM competitors of bench/gpu_suite.py
# (MONAI, pytorch-msssim) and the readers of the MRI shipped in wheels (nibabel, nilearn's MNI152 template).
# On the GPU machine, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .whl "monai==1.6.1" "pytorch-msssim==1.0.0" "nibabel==5.4.2" "nilearn==0.14.1"
ls -l .whl
