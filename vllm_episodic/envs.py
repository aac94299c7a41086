"""Debug toggles (environment variables). Settings belong in EpisodicConfig, not here."""

from __future__ import annotations

import os

ENVIRONMENT = {
    # attend memory with the torch reference implementation instead of the platform op
    # over an assembled block table (slow; for checking the fast path)
    "VLLM_EPISODIC_REFERENCE": lambda: os.environ.get("VLLM_EPISODIC_REFERENCE", "0") == "1",
}


def get(name: str):
    return ENVIRONMENT[name]()
