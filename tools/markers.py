"""Blocks of a text file that a tool generates, each between a start and an end marker
(HTML comments on lines of their own): where a block lies, what it holds, and the text
with it replaced. ``config_table.py`` and ``results_tables.py`` keep their tables so."""

from __future__ import annotations

from pathlib import Path


def span(text: str, start: str, end: str, path: Path) -> tuple[int, int]:
    """Where the block lies in ``text``: after the start marker's line, up to the end marker."""
    if text.count(start) != 1 or text.count(end) != 1 or text.find(end) < text.find(start):
        raise SystemExit(f"{path}: expected one {start} followed by one {end}")
    return text.index("\n", text.find(start)) + 1, text.find(end)


def held(text: str, start: str, end: str, path: Path) -> str:
    """The block as it stands."""
    begin, stop = span(text, start, end, path)
    return text[begin:stop].strip("\n")


def replaced(text: str, start: str, end: str, path: Path, block: str) -> str:
    """``text`` with the block replaced by ``block``."""
    begin, stop = span(text, start, end, path)
    return text[:begin] + block + "\n" + text[stop:]
