"""Results are data: ``benchmarks/results/`` holds one canonical JSON per (benchmark,
model, machine) and their plots, nothing else (logs, traces and superseded runs live in
git history); every results file the docs cite exists; the tables of docs/benchmarks.md
are the ones ``tools/results_tables.py`` generates from the files. No engine, no torch."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# benchmarks that run no model (their shapes are in each run): no model in the file's name
ENGINE_FREE = {"kernels", "decode-step", "profile-gpu-step", "retrieval-step"}



def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the file names' machine part, as the benchmark scripts write it
machine_slug = _load("benchmarks_common", ROOT / "benchmarks" / "common.py").machine_slug


def _git(*args: str) -> list[str]:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git checkout")
    return done.stdout.split("\n")[:-1]


def _result_files() -> list[Path]:
    """The files of benchmarks/results/ that git keeps or would add (ignored ones left out)."""
    names = _git("ls-files", "--cached", "--others", "--exclude-standard", "--", "benchmarks/results")
    return sorted({ROOT / n for n in names if (ROOT / n).is_file()})


def _canonical() -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in _result_files() if p.suffix == ".json"}


def _is_cell_layout(data: dict) -> bool:
    """The quality and conversation files: cells per backend, each naming its run."""
    cells = [c for b in ("stock", "episodic") for c in (data.get(b) or {}).values()]
    return bool(cells) and all(isinstance(c, dict) and isinstance(c.get("run"), dict) for c in cells)


def test_results_hold_only_canonical_files_and_their_plots():
    files = _result_files()
    assert files, "benchmarks/results/ is empty"
    canonical = _canonical()
    bad = []
    for path in files:
        name = path.relative_to(RESULTS).as_posix()
        if path.suffix == ".json":
            data = canonical[path]
            if not all(k in data for k in ("benchmark", "model", "machine")):
                bad.append(f"{name}: no benchmark, model and machine")
                continue
            runs = data.get("runs")
            if runs is not None:
                if not runs or not all(isinstance(r, dict) for r in runs.values()):
                    bad.append(f"{name}: runs must be a dict of runs by label")
            elif not _is_cell_layout(data):
                bad.append(f"{name}: neither runs nor cells that name their run")
            kind = data["benchmark"] + (f"-{data['suite']}" if data.get("suite") else "")
            if (data["model"] is None) != (data["benchmark"] in ENGINE_FREE):
                bad.append(f"{name}: model {data['model']!r} for benchmark {data['benchmark']}")
            expected = "-".join([kind] + ([data["model"]] if data["model"] else []) + [machine_slug(data["machine"])])
            if path.stem != expected:
                bad.append(f"{name}: expected the name {expected}.json (benchmark, model, machine)")
        elif path.suffix == ".png":
            # a plot of one run: <canonical file's stem>-<run label>.png
            owners = [(p, d) for p, d in canonical.items() if path.stem.startswith(p.stem + "-")]
            if not any(path.stem[len(p.stem) + 1:] in (d.get("runs") or {}) for p, d in owners):
                bad.append(f"{name}: a plot must be named <canonical stem>-<run label>.png")
        else:
            bad.append(f"{name}: not a canonical JSON or a plot (logs, traces, tables stay out of git)")
    assert not bad, "\n".join(bad)


def test_one_file_per_benchmark_model_and_machine():
    seen: dict[tuple, str] = {}
    for path, data in _canonical().items():
        key = (data.get("benchmark"), data.get("suite"), data.get("model"), machine_slug(data.get("machine")))
        assert key not in seen, f"{path.name} and {seen[key]} hold the same benchmark, model and machine"
        seen[key] = path.name


def test_no_log_or_trace_is_tracked():
    tracked = _git("ls-files")
    debris = [n for n in tracked if n.endswith(".log") or Path(n).name.startswith("pyspy-")
              or n.startswith("benchmarks/results/bench-serve/")
              or (n.startswith("benchmarks/results/") and n.endswith((".txt", ".md")))]
    assert not debris, f"tracked logs, traces or raw files: {debris}"


@pytest.mark.parametrize("path", ["benchmarks/results/serve-episodic-1234.log", "benchmarks/some.log", "x.log",
                                  "benchmarks/results/pyspy-served-worker.txt",
                                  "benchmarks/results/bench-serve/smollm2-135m/stock-2048-c1.json",
                                  "benchmarks/results/throughput-smollm2-135m.md"])
def test_gitignore_keeps_debris_out(path):
    _git("rev-parse", "--git-dir")  # skips outside a checkout
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], check=False, cwd=ROOT)
    assert done.returncode == 0, f"{path} is not ignored"


def _spans(path: Path) -> list[str]:
    """The code spans of a page outside fenced blocks and outside git commands (which name
    files of git history)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return [s for s in re.findall(r"`([^`\n]+)`", text) if not s.startswith("git ")]


def _cited(path: Path) -> list[str]:
    """Results files a page names: benchmarks/results/ paths and bare result-file names."""
    names = []
    for span in _spans(path):
        names += re.findall(r"benchmarks/results/([\w.+/-]+\.\w+)", span)
        if re.fullmatch(r"[a-z][\w.+-]*-[\w.+-]*\.(json|png)", span):
            names.append(span)
    return names


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_results_files_exist(page):
    missing = [n for n in _cited(page) if not (RESULTS / n).is_file()]
    assert not missing, f"{page.name} cites results files that do not exist: {missing}"


def _expand(label: str) -> list[str]:
    """A cited family of labels as patterns: ``a-{1,2}`` -> a-1, a-2; ``*`` and ``…`` any text."""
    parts = re.split(r"\{([^}]*)\}", label)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _matches(label: str, runs: dict) -> bool:
    pattern = re.escape(label).replace(r"\*", ".*").replace("…", ".*")
    return any(re.fullmatch(pattern, run) for run in runs)


_FILE = r"`(?:benchmarks/results/)?(?P<file>[\w.+-]+\.json)`"
_LABELS = r"(?P<labels>(?:`[^`]+`(?:,| and| \+)? ?)+)"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_runs_exist(page):
    """"run `a`", "runs `a`, `b` and `c`" (of the results file cited last before them) and
    "Runs of `file.json`: `a`, `b`, …": each label (or family: ``a-{1,2}``, ``a-*``,
    ``a-…``) a run of that file."""
    text = " ".join(re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL).split())
    cited, current = [], None
    runs_of = _FILE.replace("?P<file>", "?P<of>")
    for found in re.finditer(rf"Runs of {runs_of}(?P<list>.*?\.)(?: |$)|{_FILE}|\bruns? {_LABELS}", text):
        groups = {k: v for k, v in found.groupdict().items() if v is not None}
        if "of" in groups:  # "Runs of `x.json` (...): `a`, `b`; `c`."
            current = groups["of"]
            cited.append((current, groups["list"]))
        elif "file" in groups:
            current = groups["file"]
        elif current:
            cited.append((current, groups["labels"]))
    assert cited or page.name != "benchmarks.md", "found no cited runs: has the phrasing changed?"
    missing = []
    for name, labels in cited:
        path = RESULTS / name
        if not path.is_file():
            continue  # test_cited_results_files_exist says so
        runs = json.loads(path.read_text()).get("runs", {})
        for label in [x for x in re.findall(r"`([^`]+)`", labels) if not re.search(r"[<>]", x)]:
            missing += [f"{name}: {label}" for one in _expand(label) if not _matches(one, runs)]
    assert not missing, f"{page.name} cites runs that do not exist: {missing}"


def test_cited_logs_are_in_git_history_not_in_the_tree():
    page = ROOT / "docs" / "benchmarks.md"
    logs = [s for s in _spans(page) if re.fullmatch(r"[\w.{},*+-]+\.(log|txt)", s)]
    assert not [n for n in logs if (RESULTS / n).exists()], "a cited log is in the tree"
    if logs:
        assert "git log --diff-filter=D --name-only -- 'benchmarks/results/*.log'" in page.read_text(), \
            "the page cites logs: it must say how to find them in git history"


def test_benchmark_tables_are_the_generated_ones():
    tool = _load("results_tables", ROOT / "tools" / "results_tables.py")
    assert tool.differing(tool.PAGE) == [], (
        "docs/benchmarks.md's tables differ from the results; run: python tools/results_tables.py --write")
    assert tool.main(["--check"]) == 0
    assert tool.differing(tool.README) == [], (
        "README's headline table differs from the results; run: python tools/results_tables.py --write README.md")


def test_readme_plots_show_what_the_result_files_hold():
    """Each plot README shows carries the numbers it was drawn from; they must be the
    result files' numbers now (a changed result without a redrawn plot fails)."""
    tool = _load("results_plots", ROOT / "tools" / "results_plots.py")
    assert tool.differing() == [], "a plot differs from the results; run: python tools/results_plots.py"
    readme = (ROOT / "README.md").read_text()
    for name in tool.PLOTS:
        assert f"](docs/img/{name})" in readme, f"README does not show docs/img/{name}"
    # the check reads what it should: a plot drawn from other numbers is told apart
    assert tool.embedded(tool.IMAGES / "memory.png") != tool.natural_text_data()
