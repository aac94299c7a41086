"""The adapter: every use of vLLM internals lives in this package.

``register()`` runs in each vLLM process (API server, engine core, worker) through the
``vllm.general_plugins`` entry point. It checks the vLLM release, then applies the
patches documented in each module: ``selection`` (backend name, platform, config
checks), ``kv_spec`` (a sink + window paged-KV spec), ``runner_hooks`` (request ids,
finish/abort, surprise), ``prefix_reuse`` (kept memories: later requests sharing a
prefix skip its prefill), ``rope_patch`` (RoPE table length), ``admission`` (503 at the
host memory cap), ``triton_on_cpu`` (vLLM's Triton backend under Triton's interpreter,
only when asked for), and exposes our metrics
on the process's prometheus registry.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_episodic.integration.vllm_version import check_vllm_version

    check_vllm_version()
    from vllm_episodic import metrics
    from vllm_episodic.integration import admission, kv_spec, prefix_reuse, runner_hooks, selection, triton_on_cpu

    if triton_on_cpu.wanted():
        triton_on_cpu.install()
    kv_spec.register_spec()
    admission.install()
    selection.install_backend_name()
    selection.patch_platform()
    selection.patch_engine_args()
    runner_hooks.install()
    prefix_reuse.install()
    metrics.register_collector()
    _registered = True
