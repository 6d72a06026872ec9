#!/usr/bin/env bash
# The GPU check, under 5 minutes on one GPU: the tests marked `gpu` (bf16 and fp16 autocast with the grad
# scaler, fused AdamW, torch.compile, FSDP + compile under torchrun), then the `seed` preset's training
# tokens/s and MFU. Needs slm with its test extra over a CUDA build of PyTorch (pip install ".[test]").
set -euo pipefail
cd "$(dirname "$0")/.."
# Without CUDA the gpu tests skip, and a check that skips everything would pass: refuse instead.
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: PyTorch sees no CUDA device")'
python -m pytest -m gpu -q
python -m slm bench train --preset seed --device cuda
echo "gpu_check: done in ${SECONDS} s"
