"""The tables of measurements in docs/benchmarks.md and README's headline table,
generated from the result files.

``benchmarks/results/`` holds one canonical JSON per (benchmark, model, machine):
``benchmark``, ``model``, ``machine`` and either ``runs`` (a dict of runs by label, each
the report of one script run with its command, commit, config and date) or, for the
quality and conversation benchmarks, cells per backend each naming the run that measured
it. This script reads those files and prints each table; the page holds each between the
HTML comments ``<!-- table:NAME:start -->`` and ``<!-- table:NAME:end -->`` (each on a
line of its own), so that the page and the data cannot drift apart
(``tests/test_results.py`` fails when they do).

    python tools/results_tables.py                              # print every table
    python tools/results_tables.py --write docs/benchmarks.md   # replace them between the markers
    python tools/results_tables.py --check [docs/benchmarks.md] # exit 1 if one differs
    python tools/results_tables.py --write README.md            # README's headline table

Standard library only; runs in well under a second.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.markers import held, replaced  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

# how the page names a model, and its trained context length
MODELS = {"smollm2-135m": ("SmolLM2-135M", 8192), "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B", 32768)}
TASKS = {"niah_single": "single needle", "niah_multikey": "multi-key", "niah_multivalue": "multi-value",
         "niah_multiquery": "multi-query", "qa": "QA"}
BANDS = ("start", "middle", "end")


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def run_of(name: str, label: str) -> dict:
    return load(name)["runs"][label]


def source(*parts: str) -> str:
    """The line under a table naming its data."""
    return "Data: " + "; ".join(parts) + "."


def length(n: int) -> str:
    """4096 -> 4K, 30000 -> 30K."""
    return f"{n // 1024}K" if n % 1024 == 0 else f"{round(n / 1000)}K"


def ratio(value: float, bold: bool = False) -> str:
    text = f"{value:.2f}×"
    return f"**{text}**" if bold else text


def right(scores: list[float]) -> str:
    """Answers right (the sum of the samples' scores), as a whole number when it is one."""
    total = sum(scores)
    return f"{total:.0f}" if total == int(total) else f"{total:.2f}"


# -- quality on natural text -------------------------------------------------------------


def quality_cells(data: dict) -> dict[tuple[str, int, str], dict[str, dict]]:
    """A natural-text quality file's cells by (task, length, band), each {backend: cell}."""
    cells = {}
    for backend in ("stock", "episodic"):
        for key, cell in data.get(backend, {}).items():
            task, n, band = key.split("/")
            cells.setdefault((task, int(n), band), {})[backend] = cell
    return cells


def quality_natural() -> str:
    """Every cell of the natural-text quality files: answers right of n, stock and episodic."""
    lines = ["| model, preset | task | length | band | n | stock | episodic |", "|---|---|---|---|---|---|---|"]
    files = sorted(RESULTS.glob("quality-natural-*.json"),
                   key=lambda p: (list(MODELS).index(load(p.name)["model"]) if load(p.name)["model"] in MODELS
                                  else len(MODELS), p.name))
    for path in files:
        data = load(path.name)
        name, trained = MODELS.get(data["model"], (data["model"], 0))
        cells = quality_cells(data)
        # earlier episodic cells kept beside the current ones: "task/length/band (what differed)"
        before = {}
        for key, cell in data.get("episodic_before", {}).items():
            found = re.fullmatch(r"(\w+)/(\d+)/(\w+) \((.+)\)", key)
            if found:
                task, n, band, note = found.groups()
                before[(task, int(n), band)] = f" ({right(cell['scores'])} with `{note}`)"
        presets = Counter(cell["run"]["episodic_config"].get("preset") for c in cells.values()
                          for b, cell in c.items() if b == "episodic" and cell.get("run"))
        preset = presets.most_common(1)[0][0] if presets else None
        head = f"{name} (trained {length(trained)})" if trained else name
        head += f", `{preset}`" if preset else ""
        order = sorted(cells, key=lambda k: (list(TASKS).index(k[0]) if k[0] in TASKS else len(TASKS), k[1],
                                             BANDS.index(k[2]) if k[2] in BANDS else len(BANDS)))
        for i, key in enumerate(order):
            task, n, band = key
            pair = cells[key]
            counts = sorted({len(c["scores"]) for c in pair.values()})
            size = " / ".join(str(len(pair[b]["scores"])) for b in ("stock", "episodic") if b in pair) \
                if len(counts) > 1 else str(counts[0])
            stock = right(pair["stock"]["scores"]) if "stock" in pair else "-"
            episodic = right(pair["episodic"]["scores"]) + before.get(key, "") if "episodic" in pair else "-"
            where = length(n) + (" (past the trained length)" if trained and n > trained else "")
            row = [head if i == 0 else "", TASKS.get(task, task), where, band, size, stock, episodic]
            lines.append("|" + "|".join(f" {c} " if c else " " for c in row) + "|")
    names = ", ".join(f"`{p.name}`" for p in files)
    lines += ["", source(f"{names} (each cell names its run: command, commit, config, date)")]
    return "\n".join(lines)


# -- serving speed -----------------------------------------------------------------------


def serving_pairs(rows: list[dict], with_concurrency: bool) -> list[str]:
    """One line per (input, concurrency): each backend's TTFT and TPOT, and the ratios."""
    stock = {(r["input_len"], r["concurrency"]): r for r in rows if r["backend"] == "stock"}
    episodic = {(r["input_len"], r["concurrency"]): r for r in rows if r["backend"] == "episodic"}
    head = ["input"] + (["conc."] if with_concurrency else []) + [
        "stock TTFT s", "stock TPOT ms", "episodic TTFT s", "episodic TPOT ms", "decode vs stock", "TTFT vs stock"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key in sorted(set(stock) & set(episodic)):
        s, e = stock[key], episodic[key]
        cells = [str(key[0])] + ([str(key[1])] if with_concurrency else []) + [
            f"{s['mean_ttft_ms'] / 1000:.1f}", f"{s['mean_tpot_ms']:.1f}",
            f"{e['mean_ttft_ms'] / 1000:.1f}", f"{e['mean_tpot_ms']:.1f}",
            ratio(s["mean_tpot_ms"] / e["mean_tpot_ms"]), ratio(e["mean_ttft_ms"] / s["mean_ttft_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def serving_current() -> str:
    """The shipped preset against stock at 30K: one run of throughput.py, stock and
    episodic one after the other in the same invocation."""
    name, label = "throughput-smollm2-135m-xeon.json", "after-house"
    run = run_of(name, label)
    (stock,), (episodic,) = run["stock"], run["episodic"]
    lines = ["| backend | TTFT s | TPOT ms | decode vs stock | TTFT vs stock |", "|---|---|---|---|---|",
             f"| stock | {stock['mean_ttft_ms'] / 1000:.1f} | {stock['mean_tpot_ms']:.1f} | - | - |",
             f"| episodic | {episodic['mean_ttft_ms'] / 1000:.1f} | {episodic['mean_tpot_ms']:.1f} | "
             f"{ratio(stock['mean_tpot_ms'] / episodic['mean_tpot_ms'], True)} | "
             f"{ratio(episodic['mean_ttft_ms'] / stock['mean_ttft_ms'], True)} |",
             "", source(f"`{name}`, run `{label}` (commit {run['commit']}, {run['date'][:10]})")]
    return "\n".join(lines)


def serving_by_length() -> str:
    name, label = "throughput-smollm2-135m-epyc.json", "default"
    run = run_of(name, label)
    rows = run["stock"] + run["episodic"]
    return "\n".join(serving_pairs(rows, True) + ["", source(f"`{name}`, run `{label}`")])


def serving_qwen() -> str:
    name, label = "throughput-qwen2.5-coder-0.5b-epyc.json", "qwen-rerun"
    run = run_of(name, label)
    return "\n".join(serving_pairs(run["stock"] + run["episodic"], False) + ["", source(f"`{name}`, run `{label}`")])


# -- where a decode step goes ------------------------------------------------------------


def profile_decode() -> str:
    """The parts of an episodic decode step (as benchmarks/profile_decode.py prints them)."""
    name, label = "profile-decode-smollm2-135m-epyc.json", "default"
    run = run_of(name, label)
    episodic = run["episodic"]
    p = {k: 0.0 for k in ("plan", "select", "select_layers", "fill_cache", "select_ahead", "attention layer",
                          "surprise", "events")}
    p.update(episodic["parts_ms"])
    rows = [("plan (bookkeeping)", p["plan"]), ("scoring + selection", p["select"] + p["select_layers"]),
            ("gather into cache slots", p["fill_cache"] - p["select"] + p["select_ahead"] - p["select_layers"]),
            ("attention (vLLM CPU op)", p["attention layer"] - p["fill_cache"]),
            ("surprise", p["surprise"]), ("events + host store", p["events"])]
    rows.append(("rest of the model and engine", episodic["step_ms"] - sum(ms for _, ms in rows)))
    lines = ["| part of a decode step | ms | share |", "|---|---|---|"]
    lines += [f"| {part} | {ms:.2f} | {ms / episodic['step_ms']:.0%} |" for part, ms in rows]
    lines.append(f"| **episodic step** | **{episodic['step_ms']:.2f}** | |")
    if "stock" in run:
        stock = run["stock"]["step_ms"]
        lines.append(f"| stock vLLM step, same context | {stock:.2f} | ({stock / episodic['step_ms']:.2f}×) |")
    lines += ["", source(f"`{name}`, run `{label}` ({episodic['steps']} decode steps)")]
    return "\n".join(lines)


# -- memory ------------------------------------------------------------------------------


def memory() -> str:
    """Device KV and host bytes per request: stock and episodic rows of the runs named."""
    name = "memory-smollm2-135m-epyc.json"
    picks = [("stock", "stock", None), ("bf16reps", "episodic", None), ("128k", "episodic", {131064})]
    head = ("| context | backend | device KV blocks (decode) | device KV MiB | prefill peak blocks | "
            "host MiB (K/V alone) |")
    lines = [head, "|---|---|---|---|---|---|"]
    runs = load(name)["runs"]
    for label, backend, contexts in picks:
        for row in runs[label][backend]:
            if contexts and row["context"] not in contexts:
                continue
            host = (f"{row['host_bytes'] / 2**20:.0f} ({row['host_bytes_theory'] / 2**20:.0f})"
                    if backend == "episodic" else "-")
            lines.append(f"| {row['context']} | {backend} | {row['blocks_decode']} | "
                         f"{row['device_kv_bytes_decode'] / 2**20:.0f} | {row['blocks_prefill_peak']} | {host} |")
    lines += ["", source(f"`{name}`, runs " + ", ".join(
        f"`{label}` ({backend}{', ' + ' '.join(map(str, sorted(c))) + ' tokens' if c else ''})"
        for label, backend, c in picks))]
    return "\n".join(lines)


# -- kernels -----------------------------------------------------------------------------


def kernels_cpu() -> str:
    """The CPU references, µs per call, by kernel and event count against rows."""
    name, label = "kernels-epyc.json", "cpu"
    rows = run_of(name, label)["rows"]
    counts = sorted({r["rows"] for r in rows})
    kinds = {"score+select": "score + select", "gather": "gather + rotate", "block attention": "block attention"}
    head = ["kernel", "events (all rows)"] + [f"{n} row{'s' if n > 1 else ''}" for n in counts]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for kind, title in kinds.items():
        events = sorted({r.get("events") for r in rows if r["kernel"] == kind}, key=lambda e: e or 0)
        for ev in events:
            by_rows = {r["rows"]: r for r in rows if r["kernel"] == kind and r.get("events") == ev}
            cells = [f"{by_rows[n]['reference']:.0f}" if n in by_rows else "-" for n in counts]
            lines.append(f"| {title} | {f'{ev:,}' if ev and kind != 'block attention' else '-'} | "
                         + " | ".join(cells) + " |")
    lines += ["", source(f"`{name}`, run `{label}`")]
    return "\n".join(lines)


# -- README's headline ---------------------------------------------------------------------


def _cell(name: str, backend: str, key: str) -> list[float] | None:
    cell = load(name).get(backend, {}).get(key)
    return cell["scores"] if cell else None


def _found(name: str, backend: str, keys: list[str]) -> str:
    """"a / b of n" for the cells ``keys`` of one backend ("-" for a cell not run)."""
    cells = [_cell(name, backend, key) for key in keys]
    sizes = {len(c) for c in cells if c}
    return " / ".join(right(c) if c else "-" for c in cells) + (f" of {sizes.pop()}" if len(sizes) == 1 else "")


def _later_turns(backend: str, length_: int) -> tuple[float, int, int]:
    """Median TTFT of the follow-up turns (2nd on) of the gold-history conversations,
    how many of them were right, and how many there were."""
    turns = [t for doc in load("multiturn-qwen2.5-coder-0.5b-xeon.json")[backend][f"multi-turn+gold/{length_}"]["documents"]
             for t in doc["turns"][1:]]
    ttfts = sorted(t["ttft"] for t in turns)
    middle = len(ttfts) // 2
    median = ttfts[middle] if len(ttfts) % 2 else (ttfts[middle - 1] + ttfts[middle]) / 2
    return median, sum(t["correct"] for t in turns), len(turns)


def headline() -> str:
    """README's one results table: speed, memory and quality against stock."""
    speed = run_of("throughput-smollm2-135m-xeon.json", "after-house")
    (stock,), (episodic,) = speed["stock"], speed["episodic"]
    runs = load("memory-smollm2-135m-epyc.json")["runs"]
    blocks = {row["context"]: row["blocks_decode"] for label in ("default", "128k") for row in runs[label]["episodic"]}
    stock_blocks = {row["context"]: row["blocks_decode"] for row in runs["stock"]["stock"]}
    contexts = (8184, 32760, 131064)
    host = next(r["host_bytes"] for r in runs["128k"]["episodic"] if r["context"] == 131064)
    smol, qwen = "quality-natural-smollm2-135m-xeon.json", "quality-natural-qwen2.5-coder-0.5b-xeon.json"
    turns = {(b, n): _later_turns(b, n) for b in ("stock", "episodic") for n in (16384, 30720)}
    tpot, ttft = (stock["mean_tpot_ms"], episodic["mean_tpot_ms"]), (stock["mean_ttft_ms"], episodic["mean_ttft_ms"])
    rows = [
        ("decode, SmolLM2-135M, 30K-token prompt, `smollm2` preset, 1 request",
         f"{tpot[0]:.1f} ms/token", f"**{tpot[1]:.1f} ms/token ({tpot[0] / tpot[1]:.2f}×)**", "Xeon"),
        ("time to first token, same", f"{ttft[0] / 1000:.1f} s",
         f"**{ttft[1] / 1000:.1f} s ({ttft[1] / ttft[0]:.2f}×)**", "Xeon"),
        ("device KV per request, SmolLM2, 8K / 32K / 128K context",
         " / ".join(str(stock_blocks.get(c, "-")) for c in contexts) + " blocks",
         "**" + " / ".join(str(blocks[c]) for c in contexts) + " blocks** ¹", "EPYC"),
        ("host memory, SmolLM2, 128K context", "-", f"{host / 2**20:,.0f} MiB", "EPYC"),
        ("natural-text single needle, SmolLM2, 8K (its trained length)",
         _found(smol, "stock", ["niah_single/8192/middle"]), _found(smol, "episodic", ["niah_single/8192/middle"]),
         "Xeon"),
        ("the same at 16K / 32K (past its trained length)", "garbage ²",
         _found(smol, "episodic", ["niah_single/16384/middle", "niah_single/32768/middle"]), "Xeon"),
        ("natural-text multi-key, Qwen2.5-Coder-0.5B, 16K / 30K",
         _found(qwen, "stock", ["niah_multikey/16384/middle", "niah_multikey/30720/middle"]),
         _found(qwen, "episodic", ["niah_multikey/16384/middle", "niah_multikey/30720/middle"]), "Xeon"),
        ("natural-text single needle, Qwen2.5-Coder-0.5B, 30K / 64K",
         _found(qwen, "stock", ["niah_single/30000/middle", "niah_single/65536/middle"]),
         _found(qwen, "episodic", ["niah_single/30000/middle", "niah_single/65536/middle"]), "Xeon"),
        (f"follow-up turns' first token (median of {turns['stock', 16384][2]}), Qwen2.5-Coder-0.5B, "
         "16K / 30K document", " / ".join(f"{turns['stock', n][0]:.2f}" for n in (16384, 30720)) + " s",
         " / ".join(f"{turns['episodic', n][0]:.2f}" for n in (16384, 30720)) + " s", "Xeon"),
        ("follow-up answers right, same questions, 16K / 30K",
         " / ".join(str(turns["stock", n][1]) for n in (16384, 30720)) + f" of {turns['stock', 16384][2]}",
         " / ".join(str(turns["episodic", n][1]) for n in (16384, 30720)) + f" of {turns['episodic', 16384][2]}",
         "Xeon"),
    ]
    lines = ["| what | stock vLLM | episodic | machine |", "|---|---|---|---|"]
    lines += [f"| {what} | {s_} | {e_} | {machine} |" for what, s_, e_, machine in rows]
    return "\n".join(lines)


TABLES = {
    "serving-current": serving_current,
    "serving-by-length": serving_by_length,
    "serving-qwen": serving_qwen,
    "profile-decode": profile_decode,
    "memory": memory,
    "quality-natural": quality_natural,
    "kernels-cpu": kernels_cpu,
}
README = ROOT / "README.md"
README_TABLES = {"headline": headline}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- table:{name}:start -->", f"<!-- table:{name}:end -->"


def tables_of(path: Path) -> dict:
    """The tables a page holds: README's headline, or docs/benchmarks.md's."""
    return README_TABLES if path.name == README.name else TABLES


def current(path: Path) -> dict[str, str]:
    """Each table as it stands between its markers in ``path``."""
    text = path.read_text()
    return {name: held(text, *_markers(name), path) for name in tables_of(path)}


def write(path: Path) -> list[str]:
    """Replace every table between its markers; the names of those that changed."""
    text, changed = path.read_text(), []
    for name, make in tables_of(path).items():
        table = make()
        if held(text, *_markers(name), path) != table:
            changed.append(name)
        text = replaced(text, *_markers(name), path, table)
    if changed:
        path.write_text(text)
    return changed


def differing(path: Path) -> list[str]:
    """The tables of ``path`` that are not the generated ones."""
    held = current(path)
    return [name for name, make in tables_of(path).items() if held[name] != make()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", type=Path, nargs="?", const=PAGE,
                       help=f"replace the tables between the markers of FILE (default {PAGE.relative_to(ROOT)})")
    group.add_argument("--check", metavar="FILE", type=Path, nargs="?", const=PAGE,
                       help="exit 1 if a table of FILE is not the generated one")
    every = {**TABLES, **README_TABLES}
    parser.add_argument("tables", nargs="*", metavar="TABLE", help=f"print only these: {', '.join(every)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tables) - set(every))
    if unknown:
        parser.error(f"no table {', '.join(unknown)}; tables: {', '.join(every)}")
    if args.write:
        changed = write(args.write)
        print(f"{args.write}: {'updated ' + ', '.join(changed) if changed else 'unchanged'}")
    elif args.check:
        bad = differing(args.check)
        if bad:
            print(f"{args.check}: tables differ from the results: {', '.join(bad)}; run python "
                  f"tools/results_tables.py --write {args.check}", file=sys.stderr)
            return 1
    else:
        for name in args.tables or every:
            start, end = _markers(name)
            print(f"{start}\n{every[name]()}\n{end}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
