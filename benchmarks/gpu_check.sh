#!/usr/bin/env bash
# The prepared GPU check (issue 5): compiled kernel tests, the kernel benchmark and the
# engine-free decode-step benchmark, on a GPU machine that has torch and Triton but no
# vLLM, pydantic or network. Under 4 minutes on an H100.
#
# Here, once (pytest's wheels travel with the tree; the machine cannot download them):
#   mkdir -p .gpu-wheels && echo /.gpu-wheels/ >> .git/info/exclude
#   pip download --no-deps -d .gpu-wheels pytest pluggy iniconfig packaging   # or copy local wheels
# Then through the device tool, from the repository root:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=300)
# Results land in $OUT (or benchmarks/results when OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"

# vllm_episodic.kernels as installed (kernels/ lives at the top of the repository),
# without installing anything that would pull vLLM's dependencies
pkg="$(mktemp -d)/vllm_episodic"
mkdir -p "$pkg"
cp vllm_episodic/__init__.py vllm_episodic/models.py "$pkg/"
ln -s "$PWD/vllm_episodic/core" "$pkg/core"
ln -s "$PWD/kernels" "$pkg/kernels"
export PYTHONPATH="$(dirname "$pkg")"
if [ -d .gpu-wheels ]; then
  python -m pip install -q --no-index --find-links .gpu-wheels pytest || true
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# compiled (not interpreted) kernels against the references, on CUDA tensors
TRITON_INTERPRET=0 timeout 120 python -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py \
  2>&1 | tee "$OUT/kernel-tests.txt" | tail -5

timeout 60 python benchmarks/kernels.py --device cuda --repeat 10 2>&1 | tee "$OUT/kernels.txt" | tail -20
cp benchmarks/results/kernels-cuda.json "$OUT/" 2>/dev/null || true

timeout 100 python benchmarks/decode_step.py --device cuda --contexts 32768 131072 262144 --repeat 5 \
  2>&1 | tee "$OUT/decode-step.txt" | tail -8
cp benchmarks/results/decode-step-cuda.json "$OUT/" 2>/dev/null || true
