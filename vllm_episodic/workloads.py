"""Synthetic long-context text and tasks, generated offline and reproducibly.

Used by the tests and by ``benchmarks/``: filler prose ("haystack"), passkey
retrieval, single and multi-key needles with distractors, variable tracking and
question answering over a generated document. Every generator takes a seed; the
same seed gives the same text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SUBJECTS = (
    "the old farmer", "a young engineer", "the village baker", "my neighbour", "the captain",
    "a quiet student", "the museum guide", "her grandfather", "the night nurse", "a travelling musician",
    "the librarian", "our teacher", "the fisherman", "a tired doctor", "the gardener",
)
_VERBS = (
    "walked to", "painted", "repaired", "described", "visited", "photographed", "cleaned",
    "measured", "planted trees near", "wrote a letter about", "sold bread at", "sang songs about",
)
_OBJECTS = (
    "the red bridge", "the market square", "a small wooden boat", "the northern hills",
    "the river bank", "an abandoned mill", "the train station", "the stone church",
    "a field of sunflowers", "the harbour", "the clock tower", "a narrow street",
)
_TAILS = (
    "before the rain started", "while the sun was setting", "early in the morning",
    "after a long winter", "with great care", "for the third time that week",
    "without telling anyone", "as the bells rang", "during the festival", "in the late afternoon",
)
_COMMENTS = (
    "Nobody remembered why.", "It was an ordinary day.", "The weather was mild.",
    "Children were playing nearby.", "The town was quiet.", "Everyone agreed it looked better.",
)

# a sentence is about 12 tokens with common BPE tokenizers
TOKENS_PER_SENTENCE = 12


def filler_sentences(count: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(count):
        sentence = (
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
            f"{rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        )
        if rng.random() < 0.25:
            sentence += " " + rng.choice(_COMMENTS)
        out.append(sentence)
    return out


def filler_text(approx_tokens: int, seed: int = 0) -> str:
    """Plain prose of about ``approx_tokens`` tokens."""
    rng = random.Random(seed)
    return " ".join(filler_sentences(max(1, approx_tokens // TOKENS_PER_SENTENCE), rng))


@dataclass(frozen=True)
class Sample:
    """One prompt with the answer(s) a correct completion contains."""

    task: str
    prompt: str
    answers: tuple[str, ...]
    depth: float = 0.0
