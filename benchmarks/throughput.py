"""Serving speed by context length: stock vLLM vs episodic, measured with `vllm bench serve`.

For each backend in turn, starts `vllm serve` on the same model, then drives
`vllm bench serve` (random dataset, fixed input lengths, fixed output length,
``--ignore-eos``) at each concurrency. Stock runs only up to ``--stock-max-len``
(past the trained length it gets ``--hf-overrides``, plain RoPE extrapolation).

    python benchmarks/throughput.py --model smollm2-135m --lengths 2048 8192 16384 30000 \\
        --concurrency 1 4 --episodic '{"preset": "fast"}'

Decode tok/s = 1000 / mean TPOT (ms). Prints a table and puts the run (its rows, the raw
`vllm bench serve` results, command, commit and config) under the label ``--tag`` (without
its dash; ``default`` without one) in benchmarks/results/throughput-<model>-<machine>.json,
with a PNG plot beside it (decode tok/s, TTFT and TPOT against context length, both backends).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def bench(base: str, model_dir: str, length: int, concurrency: int, args, out_dir: Path, tag: str) -> dict:
    name = f"{tag}-{length}-c{concurrency}.json"
    port = base.rsplit(":", 1)[1]
    cmd = [common.VLLM, "bench", "serve", "--backend", "openai", "--host", "127.0.0.1", "--port", port,
           "--model", "model", "--tokenizer", model_dir, "--dataset-name", "random",
           "--random-input-len", str(length), "--random-output-len", str(args.output_len),
           "--random-range-ratio", "0", "--num-prompts", str(max(args.num_prompts, concurrency)),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--disable-tqdm",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    began = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    row = read_row(json.loads((out_dir / name).read_text()), length, concurrency)
    row["wall_s"] = time.time() - began
    common.log(f"{tag} {length} c{concurrency}: TTFT {row['mean_ttft_ms'] / 1000:.1f} s, "
               f"TPOT {row['mean_tpot_ms']:.1f} ms ({row['decode_tok_s']:.1f} tok/s), failed {row['failed']}")
    return row


def read_row(result: dict, length: int, concurrency: int) -> dict:
    """One table row from a result of `vllm bench serve`."""
    return {
        "input_len": length, "concurrency": concurrency, "num_prompts": result.get("num_prompts"),
        "mean_ttft_ms": result["mean_ttft_ms"], "median_ttft_ms": result["median_ttft_ms"],
        "mean_tpot_ms": result["mean_tpot_ms"], "median_tpot_ms": result["median_tpot_ms"],
        "output_throughput": result["output_throughput"], "failed": result.get("failed", 0),
        "decode_tok_s": 1000.0 / result["mean_tpot_ms"] if result["mean_tpot_ms"] else None,
        "measured_at": result.get("date"),
    }


def markdown(report: dict) -> str:
    lines = ["| input | conc. | backend | TTFT s | TPOT ms | decode tok/s | decode vs stock | TTFT vs stock |",
             "|---|---|---|---|---|---|---|---|"]
    stock = {(r["input_len"], r["concurrency"]): r for r in report.get("stock", [])}
    for row in sorted(report.get("stock", []) + report.get("episodic", []),
                      key=lambda r: (r["input_len"], r["concurrency"], r["backend"] != "stock")):
        ref = stock.get((row["input_len"], row["concurrency"]))
        speed = ttft = "-"
        if ref and row["backend"] == "episodic":
            speed = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x"
            ttft = f"{row['mean_ttft_ms'] / ref['mean_ttft_ms']:.2f}x"
        lines.append(f"| {row['input_len']} | {row['concurrency']} | {row['backend']} | "
                     f"{row['mean_ttft_ms'] / 1000:.1f} | {row['mean_tpot_ms']:.1f} | {row['decode_tok_s']:.1f} | "
                     f"{speed} | {ttft} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("decode_tok_s", "decode tokens/s"), ("mean_ttft_ms", "TTFT (ms)"), ("mean_tpot_ms", "TPOT (ms)")]
    concurrencies = sorted({r["concurrency"] for b in ("stock", "episodic") for r in report.get(b, [])})
    fig, axes = plt.subplots(len(concurrencies), 3, figsize=(15, 4 * len(concurrencies)), squeeze=False)
    for row_axes, conc in zip(axes, concurrencies):
        for ax, (key, label) in zip(row_axes, metrics):
            for backend, style in (("stock", "o-"), ("episodic", "s-")):
                rows = sorted((r for r in report.get(backend, []) if r["concurrency"] == conc),
                              key=lambda r: r["input_len"])
                if rows:
                    ax.plot([r["input_len"] for r in rows], [r[key] for r in rows], style, label=backend)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("input tokens")
            ax.set_title(f"{label}, concurrency {conc}")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(f"{report['model']} on {report['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 16384, 30000, 65536, 131072])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["stock", "episodic"], choices=["stock", "episodic"])
    parser.add_argument("--stock-max-len", type=int, default=30000,
                        help="longest input stock vLLM is benchmarked at")
    parser.add_argument("--episodic", default='{"preset": "fast"}', help="episodic settings (JSON)")
    parser.add_argument("--kv-space-gib", type=int, default=8)
    parser.add_argument("--threads-bind", default=None,
                        help="VLLM_CPU_OMP_THREADS_BIND for both servers (default: every core, 0-N; "
                             "'auto' is vLLM's own default: one core left to the API server)")
    parser.add_argument("--serve-args", default="",
                        help="more `vllm serve` flags for both backends, e.g. '--max-num-batched-tokens 2048'")
    parser.add_argument("--tag", default="", help="the run's label in the result file (without its leading dash), "
                                                  "and the suffix of the raw files' folder")
    parser.add_argument("--reuse", nargs="*", default=[], choices=["stock", "episodic"],
                        help="take these backends' rows from the result files of an earlier run "
                             "with the same tag (benchmarks/results/bench-serve/<model><tag>, else its run in the "
                             "result file) instead of serving them again")
    args = parser.parse_args()

    model_dir = common.resolve_model(args.model)
    # per model and tag: runs of different lengths sets must not overwrite each other's files
    out_dir = common.RESULTS / "bench-serve" / f"{Path(model_dir).name}{args.tag}"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "machine": common.machine(), "episodic_config": json.loads(args.episodic),
              "output_len": args.output_len, "num_prompts": args.num_prompts,
              "threads_bind": common.threads_binding(args.threads_bind), "serve_args": args.serve_args}
    label = common.run_label(args.tag)
    kept = common.result_path("throughput", args.model, report["machine"])
    earlier = json.loads(kept.read_text()).get("runs", {}).get(label, {}) if args.reuse and kept.exists() else {}

    def raw(name: str) -> dict | None:
        """A `vllm bench serve` result of this run or (--reuse) of the earlier run with this tag."""
        path = out_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else earlier.get("bench_serve", {}).get(name)

    for backend in args.backends:
        lengths = [n for n in args.lengths if backend == "episodic" or n <= args.stock_max_len]
        if not lengths:
            continue
        if backend in args.reuse:
            report[backend] = [{**read_row(raw(f"{backend}-{n}-c{c}"), n, c), "backend": backend}
                               for n in lengths for c in args.concurrency if raw(f"{backend}-{n}-c{c}")]
            continue
        max_len = max(lengths) + args.output_len + 64
        rows = []
        with common.serve(model_dir, backend, max_len, episodic=json.loads(args.episodic),
                          kv_space_gib=args.kv_space_gib, threads_bind=args.threads_bind,
                          extra=shlex.split(args.serve_args)) as base:
            for length in lengths:
                for conc in args.concurrency:
                    row = bench(base, model_dir, length, conc, args, out_dir, backend)
                    row["backend"] = backend
                    rows.append(row)
        report[backend] = rows
    # the raw results of `vllm bench serve` of the rows, kept with them (the folder is not kept in git)
    names = [f"{b}-{r['input_len']}-c{r['concurrency']}" for b in args.backends for r in report.get(b, [])]
    report["bench_serve"] = {name: raw(name) for name in names}
    path = common.write_run("throughput", args.model, label, report)
    plot(report, path.with_name(f"{path.stem}-{label}.png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
