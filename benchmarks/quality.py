"""Long-context quality: stock vLLM vs the episodic backend, same model, same prompts.

Two suites of offline, generated tasks:

- ``natural`` (the main benchmark): RULER-style tasks over natural text
  (:mod:`vllm_episodic.ruler`: Paul Graham essays, SQuAD) — single needle, multi-key,
  multi-value, multi-query, QA — with the target placed in depth bands (start <= 5%,
  middle 20-80%, end >= 90%), each sample over another stretch of the essays.
- ``templated`` (a smoke test): :mod:`vllm_episodic.workloads`' generated filler, where
  a needle is the one surprising sentence; depths evenly spaced 0-100%.

Score = fraction of a sample's expected answers its reply contains (QA: any of the
references). Both backends are served with `vllm serve` and queried through the
OpenAI chat API, greedy, one after the other, in the same run; stock only up to
``--stock-max-len`` (it collapses past the trained length).

    python benchmarks/quality.py --model smollm2-135m --lengths 8192 --tasks niah_single \\
        --bands middle --samples 20 --episodic '{"preset": "smollm2"}'

Prints a task x length table per band and writes JSON (the command, commit, machine,
config and every answer) to benchmarks/results/quality-<suite>-<model>-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_episodic import ruler, workloads  # noqa: E402

SUITES = {"natural": ruler.TASKS, "templated": workloads.TASKS}


def run_backend(backend: str, model_dir: str, samples, args) -> dict:
    max_len = max(s.length for s in samples) + 512
    results = {}
    with common.serve(model_dir, backend, max_len, episodic=json.loads(args.episodic),
                      extra=shlex.split(args.serve_args)) as base:
        def ask(sample):
            began = time.time()
            reply = common.post(base, "/v1/chat/completions", {
                "model": "model", "temperature": 0, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": sample.context + "\n\n" + sample.question}],
            })
            text = reply["choices"][0]["message"]["content"]
            return sample, text, time.time() - began, reply["usage"]["prompt_tokens"]

        with ThreadPoolExecutor(args.concurrency) as pool:
            for sample, text, seconds, prompt_tokens in pool.map(ask, samples):
                key = f"{sample.task}/{sample.length}/{ruler.band_of(sample.depth) or 'other'}"
                cell = results.setdefault(key, {"scores": [], "answers": [], "seconds": [], "prompt_tokens": []})
                cell["scores"].append(sample.score(text))
                cell["answers"].append({"expected": sample.answers, "got": text, "depth": sample.depth})
                cell["seconds"].append(seconds)
                cell["prompt_tokens"].append(prompt_tokens)
                common.log(f"{backend} {key} depth {sample.depth:.2f}: {sample.score(text):.2f} "
                           f"({seconds:.0f} s) {text[:60]!r}")
    return results


def table(report: dict, tasks, lengths, backends, bands) -> str:
    """One row per task and band; a cell per length: each backend's mean score (n)."""
    head = "| task | band | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 2) + "|"]
    for task in tasks:
        for band in bands:
            cells = []
            for n in lengths:
                parts = []
                for backend in backends:
                    cell = report[backend].get(f"{task}/{n}/{band}")
                    if cell:
                        mean = sum(cell["scores"]) / len(cell["scores"])
                        parts.append(f"{backend[0]} {mean:.2f} ({len(cell['scores'])})")
                cells.append(" / ".join(parts) or "-")
            lines.append(f"| {task} | {band} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_samples(args, count) -> list:
    """The run's prompts: per task, length and band ``--samples`` of them (natural), or
    ``--samples`` at evenly spaced depths (templated); ``--indices`` picks some."""
    picked = args.indices if args.indices is not None else range(args.samples)
    if args.suite == "templated":
        return [workloads.make_sample(task, n, i, args.samples, count)
                for task in args.tasks for n in args.lengths for i in picked]
    samples = []
    for task in args.tasks:
        for n in args.lengths:
            for band in args.bands:
                depths = ruler.band_depths(band, args.samples)
                samples += [ruler.make_natural_sample(task, n, depths[i], count, seed=args.seed + i) for i in picked]
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--suite", default="natural", choices=sorted(SUITES))
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"natural: {' '.join(ruler.TASKS)}; templated: {' '.join(workloads.TASKS)}")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--bands", nargs="+", default=["middle"], choices=[b[0] for b in ruler.BANDS],
                        help="natural suite: depth bands the targets are placed in")
    parser.add_argument("--samples", type=int, default=5, help="per task, length and band")
    parser.add_argument("--seed", type=int, default=0, help="natural suite: sample i uses seed + i")
    parser.add_argument("--indices", nargs="+", type=int, default=None,
                        help="run only these samples of each cell (0-based; depths as with all --samples)")
    parser.add_argument("--backends", nargs="+", default=["stock", "episodic"], choices=["stock", "episodic"])
    parser.add_argument("--episodic", default="{}", help="episodic settings (JSON)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--stock-max-len", type=int, default=16384,
                        help="longest context stock vLLM is run at (it collapses past the trained length)")
    parser.add_argument("--serve-args", default="",
                        help="more `vllm serve` flags for both backends, e.g. '--max-num-batched-tokens 4096'")
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the cells of the result file at --out that this run does not measure "
                             "(one file per suite, model and machine; each cell names the run that measured it)")
    args = parser.parse_args()
    args.tasks = args.tasks or list(SUITES[args.suite])
    unknown = sorted(set(args.tasks) - set(SUITES[args.suite]))
    if unknown:
        parser.error(f"--suite {args.suite} has no task {', '.join(unknown)}; tasks: {' '.join(SUITES[args.suite])}")
    if args.indices is not None and not all(0 <= i < args.samples for i in args.indices):
        parser.error(f"--indices must lie in 0..{args.samples - 1} (--samples {args.samples})")

    from transformers import AutoTokenizer

    model_dir = common.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    samples = make_samples(args, count)
    if args.suite == "templated":
        args.bands = sorted({ruler.band_of(s.depth) or "other" for s in samples})
    common.log(f"{len(samples)} prompts; backends {args.backends}")
    report = {"benchmark": "quality", "suite": args.suite, "model": args.model,
              "machine": common.machine(), "commit": common.commit(),
              "command": "python " + shlex.join(sys.argv),
              "episodic_config": json.loads(args.episodic), "serve_args": args.serve_args,
              "lengths": args.lengths, "tasks": args.tasks, "bands": args.bands, "samples": args.samples}
    run = {key: report[key] for key in ("commit", "command", "episodic_config", "serve_args")}
    run["date"] = time.strftime("%Y-%m-%d %H:%M")
    for backend in args.backends:
        mine = [s for s in samples if backend == "episodic" or s.length <= args.stock_max_len]
        report[backend] = run_backend(backend, model_dir, mine, args) if mine else {}
        for cell in report[backend].values():
            cell["run"] = run
    text = table(report, args.tasks, args.lengths, args.backends, args.bands)
    print(text)
    out = Path(args.out) if args.out else common.result_path(f"quality-{args.suite}", args.model, report["machine"])
    common.write_report(out, report, args.merge)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
