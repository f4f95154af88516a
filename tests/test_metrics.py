"""Task metrics on hand-computed cases; failed generations count as zero."""

import pytest

from jobs.metrics import aggregate, metric_names, score


def test_squad_normalization_and_best_reference():
    # Official normalization: case, punctuation and articles are ignored.
    assert score("The Eiffel Tower!", ["eiffel tower"], ["squad"]) == {"exact_match": 100.0, "f1": 100.0}
    # F1 takes the best reference: "paris city center" vs "paris city": P=2/3, R=1 -> 0.8.
    assert score("Paris city center", ["Rome", "paris city"], ["squad"])["f1"] == pytest.approx(80.0)
    assert score("Paris city center", ["Rome", "paris city"], ["squad"])["exact_match"] == 0.0


def test_rouge_hand_computed():
    scores = score("the cat sat", ["the cat sat down"], ["rouge"])
    # unigrams: 3 overlap, P=3/3, R=3/4 -> F=6/7; bigrams: 2 overlap, P=2/2, R=2/3 -> F=0.8
    assert scores["rouge1"] == pytest.approx(6 / 7)
    assert scores["rouge2"] == pytest.approx(0.8)
    assert scores["rougeL"] == pytest.approx(6 / 7)


def test_json_validity_and_schema():
    schema = {"type": "object", "required": ["timeline"], "properties": {"timeline": {"type": "array"}}}
    assert score('{"timeline": []}', [""], ["json"], schema) == {"json_valid": 1.0, "json_schema_valid": 1.0}
    assert score('{"timeline": 3}', [""], ["json"], schema) == {"json_valid": 1.0, "json_schema_valid": 0.0}
    # The seed's failure mode: brackets that never close.
    assert score('{"timeline": [{"ts": "OT10"}', [""], ["json"], schema) == {"json_valid": 0.0, "json_schema_valid": 0.0}
    assert score("[1, 2]", [""], ["json"]) == {"json_valid": 1.0}


def test_failed_or_empty_generation_counts_as_zero_not_absent():
    names = metric_names(["squad", "rouge"], None)
    assert score(None, ["Paris"], ["squad", "rouge"]) == dict.fromkeys(names, 0.0)
    assert score("   ", ["Paris"], ["squad", "rouge"]) == dict.fromkeys(names, 0.0)
    per_example = [score("Paris", ["Paris"], ["squad"]), score(None, ["Paris"], ["squad"])]
    assert aggregate(per_example, ["exact_match", "f1"]) == {"exact_match": 50.0, "f1": 50.0}
