"""Synthetic long-context text and tasks, generated offline and reproducibly.

Used by the tests and by ``benchmarks/``: filler prose ("haystack"), passkey
retrieval, single and multi-key needles with distractors, variable tracking and
question answering over a generated document. Every generator takes a seed; the
same seed gives the same text. Lengths are in tokens of the model's tokenizer,
passed in as a ``count_tokens`` function.
"""

from __future__ import annotations

import random
from collections.abc import Callable
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
_KEYS = (
    "amber", "cobalt", "crimson", "emerald", "indigo", "ivory", "jade", "lavender", "magenta",
    "ochre", "scarlet", "silver", "teal", "violet", "saffron", "copper", "pearl", "ruby",
)
_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
          "Keiko", "Lars", "Maya", "Nico", "Olga", "Pavel", "Quinn", "Rosa", "Samir", "Tove")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Tbilisi", "Quebec", "Bergen", "Porto",
           "Kyoto", "Tallinn", "Dakar", "Cusco", "Ghent", "Zadar", "Perth", "Izmir", "Turku")
_PETS = ("a parrot", "two cats", "a tortoise", "a black dog", "goldfish", "a ferret", "rabbits")

# a sentence is about 12 tokens with common BPE tokenizers
TOKENS_PER_SENTENCE = 12

TASKS = ("passkey", "single_needle", "multikey_needle", "variable_tracking", "qa")


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
    length: int
    depth: float
    context: str
    question: str
    answers: tuple[str, ...]
    """``match="all"``: every answer should appear, the score is the fraction that does;
    ``match="any"``: the answers are alternatives (QA references), 1 if one appears"""
    match: str = "all"

    def score(self, completion: str) -> float:
        found = sum(1 for a in self.answers if a.lower() in completion.lower())
        if self.match == "any":
            return float(found > 0)
        return found / len(self.answers)


def _haystack(inserts: list[tuple[float, str]], length: int, rng: random.Random,
              count_tokens: Callable[[str], int], reserve: int) -> str:
    """Filler of ``length - reserve`` tokens with sentences inserted at relative depths."""
    budget = length - reserve - sum(count_tokens(" " + text) for _, text in inserts)
    sentences = filler_sentences(max(1, budget // TOKENS_PER_SENTENCE) + 8, rng)
    # trim to the token budget (counting is approximate per sentence, exact overall)
    while len(sentences) > 1 and count_tokens(" ".join(sentences)) > budget:
        excess = count_tokens(" ".join(sentences)) - budget
        sentences = sentences[: max(1, len(sentences) - max(1, excess // TOKENS_PER_SENTENCE))]
    for depth, text in sorted(inserts, key=lambda x: -x[0]):
        sentences.insert(round(depth * len(sentences)), text)
    return " ".join(sentences)


def make_sample(task: str, length: int, index: int, count: int, count_tokens: Callable[[str], int],
                seed: int = 0) -> Sample:
    """Sample ``index`` of ``count`` for one task and context length; needles at evenly
    spaced depths from 0% to 100%."""
    rng = random.Random(f"{task}-{length}-{index}-{seed}")
    depth = index / max(1, count - 1)
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        context = _haystack([(depth, needle)], length, rng, count_tokens, 60)
        question = "What is the pass key? Answer with the number only."
        answers = (key,)
    elif task == "single_needle":
        value = str(rng.randint(100000, 999999))
        needle = f"The special magic number is {value}."
        context = _haystack([(depth, needle)], length, rng, count_tokens, 60)
        question = "What is the special magic number mentioned in the text? Answer with the number only."
        answers = (value,)
    elif task == "multikey_needle":
        keys = rng.sample(_KEYS, 4)
        values = [str(rng.randint(100000, 999999)) for _ in keys]
        target = 0
        inserts = [(depth, f"The special magic number for {keys[0]} is {values[0]}.")]
        for i in range(1, 4):
            inserts.append((rng.random(), f"The special magic number for {keys[i]} is {values[i]}."))
        context = _haystack(inserts, length, rng, count_tokens, 70)
        question = (f"What is the special magic number for {keys[target]}? "
                    "Answer with the number only.")
        answers = (values[target],)
    elif task == "variable_tracking":
        value = str(rng.randint(10000, 99999))
        names = [f"X{rng.randint(100, 999)}" for _ in range(4)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
        span = min(0.3, 1 - depth)
        inserts = [(depth + span * i / 4, sentence) for i, sentence in enumerate(chain)]
        context = _haystack(inserts, length, rng, count_tokens, 80)
        question = f"Which variables are assigned the value {value}, directly or through other variables? List their names."
        answers = tuple(names)
    elif task == "qa":
        people = rng.sample(_NAMES, 8)
        facts = [(p, rng.choice(_CITIES), rng.choice(_PETS)) for p in people]
        inserts = [(rng.random(), f"{p} lives in {c} and keeps {pet}.") for p, c, pet in facts]
        who, city, _ = facts[0]
        inserts[0] = (depth, f"{who} lives in {city} and keeps {facts[0][2]}.")
        context = _haystack(inserts, length, rng, count_tokens, 60)
        question = f"In which city does {who} live? Answer with the city only."
        answers = (city,)
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return Sample(task, length, depth, context, question, answers)
