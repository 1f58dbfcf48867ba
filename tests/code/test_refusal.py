"""The refusal detector on a corpus of refusals and tricky non-refusals (tests/data/refusal_corpus.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flywheel.evaluation.refusal import is_refusal, normalise_refusal_text

CORPUS = yaml.safe_load((Path(__file__).parents[1] / "data" / "refusal_corpus.yaml").read_text(encoding="utf-8"))


def test_the_corpus_is_big_enough_on_both_sides():
    assert len(CORPUS["refusals"]) >= 30 and len(CORPUS["non_refusals"]) >= 30
    assert not set(CORPUS["refusals"]) & set(CORPUS["non_refusals"])


@pytest.mark.parametrize("text", CORPUS["refusals"])
def test_refusal_is_detected(text):
    assert is_refusal(text), normalise_refusal_text(text)


@pytest.mark.parametrize("text", CORPUS["non_refusals"])
def test_non_refusal_is_not_flagged(text):
    assert not is_refusal(text), normalise_refusal_text(text)


def test_curly_apostrophes_and_case_are_normalised():
    assert normalise_refusal_text("I’M  Sorry, I CAN‘T") == "i'm sorry, i can't"
    assert normalise_refusal_text("I am unable; it cannot be") == "i'm unable; it can't be"


def test_only_the_start_of_an_answer_is_read():
    assert not is_refusal("Here is the recipe. " * 20 + "I can't help with that.")
