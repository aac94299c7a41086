"""Where the GPU time of an engine-free episodic decode step goes (decode_step.py's
``cached`` and ``cold`` regimes), kernel by kernel, from torch's profiler.

    python benchmarks/profile_gpu_step.py --context 131072    # on a GPU machine

Prints the kernels by total GPU time per step and puts the run under the label
``default`` in benchmarks/results/profile-gpu-step-<machine>.json (e.g. h200).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import decode_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=131_072)
    parser.add_argument("--steps", type=int, default=3)
    args, rest = parser.parse_known_args()
    command = "python " + shlex.join(sys.argv)
    sys.argv = [sys.argv[0], "--contexts", str(args.context), *rest]
    shapes = decode_step.parse_args()
    device, dtype = torch.device(shapes.device), getattr(torch, shapes.dtype)
    memory = decode_step.EpisodicLayers(args.context, shapes, device, dtype)
    cuda = device.type == "cuda"
    report = {"command": command, "device": torch.cuda.get_device_name(device) if cuda else common.machine(),
              "context": args.context, "regimes": {}}
    # on CPU (a rehearsal) the ops' own CPU time stands in for kernel time
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    spent = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    for name, step in (("cached", memory.cached_step), ("cold", memory.cold_step)):
        step()
        decode_step.sync(device)
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(args.steps):
                step()
            decode_step.sync(device)
        rows = sorted(((e.key, spent(e) / args.steps / 1e3, e.count // args.steps)
                       for e in prof.key_averages() if spent(e) > 0), key=lambda r: -r[1])
        total = sum(ms for _, ms, _ in rows)
        report["regimes"][name] = {"gpu_ms_per_step": total,
                                   "kernels": [{"name": k, "ms": ms, "launches": n} for k, ms, n in rows]}
        print(f"\n{name}: {total:.2f} ms of GPU time per step, {sum(n for *_, n in rows)} launches")
        print("| kernel | ms per step | launches per step |\n|---|---|---|")
        for key, ms, n in rows[:15]:
            print(f"| {key[:70]} | {ms:.3f} | {n} |")
    common.write_run("profile-gpu-step", None, "default", report, report["device"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
