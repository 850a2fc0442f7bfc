#!/usr/bin/env bash
# The GPU check from a bare checkout (benchmarks/gpu_check.py has the details): the project's
# packages come from this checkout through PYTHONPATH, so there is no install step.
#   bash benchmarks/gpu_check.sh                      # on a GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --quick  # anywhere, a small smoke run
# PYTHON picks the interpreter (default python3): one with torch, torchvision, h5py, click,
# tqdm, scikit-learn, matplotlib, onnx and onnxruntime.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" "$@"
