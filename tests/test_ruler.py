"""The natural-text tasks (RULER-style, over the Paul Graham essays and SQuAD)."""

from __future__ import annotations

import pytest

from vllm_episodic import ruler
from vllm_episodic.workloads import Sample


@pytest.fixture(scope="module")
def count(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_fit_their_length_and_hold_their_answers(task, count):
    sample = ruler.make_natural_sample(task, 2048, 0.5, count, seed=4)
    tokens = count(sample.context + "\n\n" + sample.question)
    assert 2048 - 160 <= tokens <= 2048
    if task == "qa":
        assert any(answer in sample.context for answer in sample.answers)
    else:
        for value in sample.answers:
            assert sample.context.count(value) == 1
    # the same arguments give the same text; another seed another haystack
    assert ruler.make_natural_sample(task, 2048, 0.5, count, seed=4) == sample
    assert ruler.make_natural_sample(task, 2048, 0.5, count, seed=5).context != sample.context


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_the_needle_sits_at_its_depth_in_natural_prose(depth, count):
    sample = ruler.make_natural_sample("niah_single", 4096, depth, count, seed=1)
    at = sample.context.index("One of the special magic numbers")
    body = sample.context[len(ruler.NIAH_PREAMBLE):]
    relative = (at - len(ruler.NIAH_PREAMBLE)) / len(body)
    assert abs(relative - depth) < 0.03
    # the haystack is the essays' own sentences, not generated filler
    before = sample.context[len(ruler.NIAH_PREAMBLE):at].strip()
    assert before == "" or before.split(". ")[-1].rstrip(".") in " ".join(ruler.essay_sentences())


def test_multikey_asks_for_one_of_four_keys(count):
    sample = ruler.make_natural_sample("niah_multikey", 4096, 0.5, count, seed=2)
    assert sample.context.count("One of the special magic numbers for") == 4
    assert len(sample.answers) == 1 and sample.score(f"It is {sample.answers[0]}.") == 1.0


def test_bands_and_their_depths():
    assert ruler.band_depths("middle", 3) == [0.2, 0.5, 0.8]
    assert [ruler.band_of(d) for d in (0.0, 0.05, 0.1, 0.5, 0.85, 0.95)] == [
        "start", "start", None, "middle", None, "end"]


def test_qa_scores_any_reference_and_niah_every_value():
    qa = Sample("qa", 10, 0.5, "", "", ("Bergen", "the city of Bergen"), match="any")
    assert qa.score("It is Bergen.") == 1.0 and qa.score("Oslo") == 0.0
    values = Sample("niah_multivalue", 10, 0.5, "", "", ("1", "2"))
    assert values.score("1 and 3") == 0.5


def test_a_conversations_document_holds_one_needle_per_question_in_depth_order(count):
    context, needles = ruler.make_document(3000, 5, count, seed=2)
    assert 3000 - 160 <= count(context) <= 3000
    assert [round(depth, 2) for *_, depth in needles] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert len({key for key, *_ in needles}) == 5
    places = [context.index(f"for {key} is: {value}.") for key, value, _ in needles]
    assert places == sorted(places)
    for (_, _, depth), place in zip(needles, places):
        assert abs(place / len(context) - depth) < 0.08  # depth counts sentences, not characters
    assert ruler.make_document(3000, 5, count, seed=2) == (context, needles)
    assert ruler.make_document(3000, 5, count, seed=3)[0] != context
