#!/usr/bin/env bash
# The prepared GPU check (issue 5): compiled kernel tests, the kernel benchmark and the
# engine-free decode-step benchmark, on a GPU machine that has torch, Triton and pytest
# but no vLLM, pydantic or network. About 4 minutes on an H100/H200.
#
# Through the device tool, from the repository root:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=330)
# or name some of the steps: bash benchmarks/gpu_check.sh tests kernels decode profile
# Results land in $OUT (or benchmarks/results when OUT is unset): the canonical result
# files (kernels-, decode-step-, profile-gpu-step-<gpu>.json, the repository's with this
# run's runs put in; copy them over benchmarks/results/) and each step's output
# (NAME.txt, not kept in git). A failing step is reported and the next one still runs,
# so one lease gives every number it can.
# DEVICE=cpu rehearses the script here (kernels interpreted, tiny decode step).
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${OUT:-$repo/benchmarks/results}" && cd "${OUT:-$repo/benchmarks/results}" && pwd)"
DEVICE="${DEVICE:-cuda}"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=$([ "$DEVICE" = cpu ] && echo 1 || echo 0)

# vllm_episodic with its algorithm and kernels as installed (kernels/ lives at the top of
# the repository) but without the vLLM glue, in a stage outside the repository so that
# the repository's own vllm_episodic/ (which has no kernels/) is never on the path
stage="$(mktemp -d)"
mkdir -p "$stage/vllm_episodic" "$stage/tests" "$stage/benchmarks/results"
cp "$repo"/vllm_episodic/{__init__,models}.py "$stage/vllm_episodic/"
cp -r "$repo/vllm_episodic/core" "$stage/vllm_episodic/core"
cp -r "$repo/kernels" "$stage/vllm_episodic/kernels"
cp "$repo/tests/test_kernels.py" "$stage/tests/"
cp "$repo"/benchmarks/*.py "$stage/benchmarks/"
# the scripts put their run into these files; the other runs in them stay
cp "$repo"/benchmarks/results/{kernels,decode-step,profile-gpu-step}-*.json "$stage/benchmarks/results/" 2>/dev/null
cd "$stage"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"

steps="${*:-tests kernels decode}"  # profile: only when named
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
  local name=$1 limit=$2 began=$SECONDS
  shift 2
  case " $steps " in *" ${name%%-*} "*) ;; *) return ;; esac
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -25
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - began)) s"
}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  contexts="${CONTEXTS:-32768 131072 262144 524288}" layers=32
else
  contexts="4096 8192" layers=2
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# compiled (not interpreted) kernels against the references, on CUDA tensors
step tests 150 python -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py
step kernels 90 python benchmarks/kernels.py --device "$DEVICE" --repeat 10 \
  $([ "$DEVICE" = cpu ] && echo --events 1000 --rows 1)
cp benchmarks/results/kernels-*.json "$OUT/" 2>/dev/null
step decode 200 python benchmarks/decode_step.py --device "$DEVICE" --contexts $contexts --layers $layers \
  --device-gib "${FULL_GIB:-100}" --repeat 5
cp benchmarks/results/decode-step-*.json "$OUT/" 2>/dev/null
step profile 90 python benchmarks/profile_gpu_step.py --device "$DEVICE" --context 131072 --layers $layers
cp benchmarks/results/profile-gpu-step-*.json "$OUT/" 2>/dev/null
exit 0
