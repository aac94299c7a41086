"""README's make targets: each benchmark target runs its script with the model and
settings it is given (``--help`` here, so that nothing is measured)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target", ["bench-quality", "bench-throughput", "bench-memory", "bench-multiturn",
                                    "bench-kernels"])
def test_benchmark_targets_run_their_scripts(target):
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("make's targets install into .venv first (make test does)")
    env = {**os.environ, "MAKEFLAGS": ""}
    done = subprocess.run(["make", "-s", target, "BENCH_ARGS=--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.lstrip().startswith("usage: ") and f"{target[6:]}.py" in done.stdout
