"""The documentation stays true to the code: README's configuration table is the one
``tools/config_table.py`` generates from ``EpisodicConfig``, its presets table matches
``configs/*.yaml``, README stays a short user guide, and links between the docs resolve.
No engine, no torch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from vllm_episodic.config import EpisodicConfig, preset_names

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300


def _config_table_tool():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "tools" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_configuration_table_is_the_generated_one():
    tool = _config_table_tool()
    assert tool.current(README) == tool.table(), (
        "README's configuration table differs from the field docstrings of EpisodicConfig; "
        "run: python tools/config_table.py --write README.md"
    )


def test_the_generated_table_has_every_field_once():
    rows = _config_table_tool().table().splitlines()[2:]
    keys = [re.match(r"\| `(\w+)` \|", row).group(1) for row in rows]
    assert keys == list(EpisodicConfig.model_fields)
    assert all(EpisodicConfig.model_fields[k].description for k in keys), "a field has no docstring"


def test_readme_is_at_most_300_lines():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; measurements go to docs/benchmarks.md"


def test_readme_presets_table_matches_the_yaml_presets():
    rows = {m.group(1): tuple(map(int, m.group(2, 3, 4))) for m in re.finditer(
        r"^\| `(\w+)` \| (\d+) / (\d+) / (\d+)", README.read_text(), re.MULTILINE)}
    assert sorted(rows) == preset_names()
    for name in preset_names():
        config = EpisodicConfig.from_dict({"preset": name})
        assert rows[name] == (config.sink_tokens, config.window_tokens, config.retrieval_budget_tokens), name
        values = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        if "bounded_budget_tokens" in values:
            assert f"({values['bounded_budget_tokens']} past the trained length)" in README.read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading (for the headings these docs use)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for link in _links(path):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.MULTILINE)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(link)
    assert not broken, f"{path.name}: links that do not resolve: {broken}"
