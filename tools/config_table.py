"""The configuration keys table of README.md, generated from ``EpisodicConfig``.

Every field of :class:`vllm_episodic.config.EpisodicConfig` carries an attribute
docstring (pydantic's ``use_attribute_docstrings``); this script turns the fields, their
defaults and their docstrings into one markdown table, so that README and code cannot
drift apart (``tests/test_docs.py`` fails when they do).

    python tools/config_table.py                     # print the table
    python tools/config_table.py --write README.md   # replace it between the markers
    python tools/config_table.py --check README.md   # exit 1 if README's table differs

The markers are the HTML comments ``<!-- config-table:start -->`` and
``<!-- config-table:end -->``, each on a line of its own. Importing the config loads no
torch, so this runs in a second.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.markers import held, replaced  # noqa: E402
from vllm_episodic.config import MODEL_DERIVED, EpisodicConfig  # noqa: E402

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"

# "(None: that budget)", "None: vLLM's default (...)", "Default: a quarter of ..."
_NONE_MEANS = re.compile(r"\b(?:None|Default):\s*([^.;:(),]+)")


def _markdown(text: str) -> str:
    """A docstring as one line of markdown: whitespace collapsed, RST literals as code
    spans, table pipes escaped."""
    text = " ".join(text.split())
    text = text.replace("``", "`")
    return text.replace("|", "\\|")


def _default(name: str, value, description: str) -> str:
    if name in MODEL_DERIVED:
        return "from the model"
    if value is None:
        found = _NONE_MEANS.search(description)
        if not found:
            return "`None`"
        # "None: that budget" reads "the budget" in a column of its own
        return _markdown(re.sub(r"^that ", "the ", " ".join(found.group(1).split())))
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def table() -> str:
    """The markdown table: key | default | meaning, in the fields' declaration order."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in EpisodicConfig.model_fields.items():
        description = field.description or ""
        lines.append(f"| `{name}` | {_default(name, field.default, description)} | {_markdown(description)} |")
    return "\n".join(lines)


def current(path: Path) -> str:
    """The table as it stands between the markers of ``path``."""
    return held(path.read_text(), START, END, path)


def write(path: Path) -> bool:
    """Replace the block between the markers with the generated table; True if changed."""
    text = path.read_text()
    updated = replaced(text, START, END, path, table())
    if updated != text:
        path.write_text(updated)
    return updated != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", type=Path, help="replace the table between the markers of FILE")
    group.add_argument("--check", metavar="FILE", type=Path, help="exit 1 if FILE's table is not the generated one")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{args.write}: {'updated' if write(args.write) else 'unchanged'}")
    elif args.check:
        if current(args.check) != table():
            print(f"{args.check}: the configuration table differs; run python tools/config_table.py "
                  f"--write {args.check}", file=sys.stderr)
            return 1
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
