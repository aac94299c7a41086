"""README's two plots, generated from the result files.

- ``docs/img/memory.png``: device KV and host memory per request against the context
  (``memory-smollm2-135m-epyc.json``): stock's paged KV grows with the context, the
  episodic backend's stays flat while its host store grows.
- ``docs/img/natural-text.png``: needles found in the middle of natural prose, stock and
  episodic, per model, task and length (``quality-natural-*.json``).

Each PNG carries the numbers it plots in its metadata (a ``tEXt`` chunk), so that
``--check`` can tell, with the standard library alone, whether a plot still shows what
the result files hold (``tests/test_results.py`` fails when one does not).

    python tools/results_plots.py            # write both (needs matplotlib)
    python tools/results_plots.py --check    # exit 1 if a plot's numbers differ from the files
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.results_tables import MODELS, RESULTS, TASKS, length, load, quality_cells  # noqa: E402

IMAGES = ROOT / "docs" / "img"
KEY = "vllm-episodic-data"
MEMORY_FILE = "memory-smollm2-135m-epyc.json"


def memory_data() -> dict:
    """Per backend, sorted by context: (context, device KV MiB, host MiB) of the runs the
    memory table uses (stock; episodic with 16-bit representatives, and its 128K run)."""
    runs = load(MEMORY_FILE)["runs"]
    rows = {"stock": runs["stock"]["stock"],
            "episodic": runs["bf16reps"]["episodic"] + [r for r in runs["128k"]["episodic"] if r["context"] > 65536]}
    return {backend: [[r["context"], round(r["device_kv_bytes_decode"] / 2**20, 1),
                       round(r["host_bytes"] / 2**20, 1)] for r in sorted(found, key=lambda r: r["context"])]
            for backend, found in rows.items()}


def natural_text_data() -> list[list]:
    """One row per middle-band cell of the natural-text files: [label, n, stock found or
    None, episodic found or None], models in MODELS order, then task, then length."""
    rows = []
    for model, (name, trained) in MODELS.items():
        path = next(iter(RESULTS.glob(f"quality-natural-{model}-*.json")), None)
        if path is None:
            continue
        cells = {(task, n): {backend: cell["scores"] for backend, cell in pair.items()}
                 for (task, n, band), pair in quality_cells(load(path.name)).items() if band == "middle"}
        for (task, n) in sorted(cells, key=lambda k: (list(TASKS).index(k[0]), k[1])):
            pair = cells[(task, n)]
            past = " (past)" if n > trained else ""
            label = f"{name.split('-')[0]} {TASKS[task]} {length(n)}{past}"
            size = max(len(s) for s in pair.values())
            found = [sum(pair[b]) if b in pair else None for b in ("stock", "episodic")]
            rows.append([label, size, *found])
    return rows


PLOTS = {"memory.png": memory_data, "natural-text.png": natural_text_data}


def _draw_memory(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (kv, host) = plt.subplots(1, 2, figsize=(9, 3.2))
    for backend, style in (("stock", "o--"), ("episodic", "s-")):
        rows = data[backend]
        kv.plot([r[0] / 1024 for r in rows], [r[1] for r in rows], style, label=backend)
    kv.set(title="device KV per request (decode)", xlabel="context (K tokens)", ylabel="MiB", ylim=(0, None))
    kv.legend()
    rows = data["episodic"]
    host.plot([r[0] / 1024 for r in rows], [r[2] / 1024 for r in rows], "s-", color="C1")
    host.set(title="episodic host store per request", xlabel="context (K tokens)", ylabel="GiB")
    fig.suptitle("SmolLM2-135M, smollm2 preset, AMD EPYC 2 cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={KEY: json.dumps(data)})
    plt.close(fig)


def _draw_natural_text(data: list, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.32 * len(data) + 1.2))
    y = range(len(data))
    for offset, column, label in ((-0.2, 2, "stock"), (0.2, 3, "episodic")):
        share = [row[column] / row[1] if row[column] is not None else 0 for row in data]
        ax.barh([i + offset for i in y], share, height=0.4, label=label)
    ax.set_yticks(list(y), [f"{row[0]}, n={row[1]}" for row in data], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="share of needles found, middle band (past the trained length stock is not run)",
           title="natural text (RULER essays), Intel Xeon 2 cores")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={KEY: json.dumps(data)})
    plt.close(fig)


DRAW = {"memory.png": _draw_memory, "natural-text.png": _draw_natural_text}


def embedded(path: Path) -> object:
    """The numbers a plot was drawn from (its ``tEXt`` chunk), or None."""
    if not path.is_file():
        return None
    blob = path.read_bytes()
    at = 8  # after the PNG signature: chunks of length, type, data, CRC
    while at < len(blob):
        (size,), kind = struct.unpack(">I", blob[at:at + 4]), blob[at + 4:at + 8]
        body = blob[at + 8:at + 8 + size]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            if key.decode("latin-1") == KEY:
                return json.loads(text.decode("latin-1"))
        at += 12 + size
    return None


def differing() -> list[str]:
    """The plots whose numbers are not the result files' (or that are missing)."""
    return [name for name, data in PLOTS.items()
            if embedded(IMAGES / name) != json.loads(json.dumps(data()))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a plot differs from the results")
    args = parser.parse_args(argv)
    if args.check:
        bad = differing()
        if bad:
            print(f"plots differ from the results: {', '.join(bad)}; run python tools/results_plots.py",
                  file=sys.stderr)
            return 1
        return 0
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name, data in PLOTS.items():
        DRAW[name](data(), IMAGES / name)
        print(IMAGES / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
