"""Task metrics per example, with the official definitions, computed offline.

- SQuAD exact match / F1: torchmetrics' implementation of the official SQuAD v1.1 script
  (lower-case, strip punctuation and articles, max over all reference answers), 0-100.
- ROUGE-1/2/L: Google's `rouge_score` (the library `evaluate`'s `rouge` wraps), F-measure, 0-1.
- JSON: the output parses as JSON; and, given a schema, it validates against it (0 or 1).

A failed or empty generation scores 0 on every task metric: it is a miss, never left out.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from rouge_score import rouge_scorer
from torchmetrics.functional.text import squad

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ROUGE = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def squad_scores(prediction: str, references: list[str]) -> dict[str, float]:
    result = squad(
        [{"prediction_text": prediction, "id": "x"}],
        [{"answers": {"text": references, "answer_start": [0] * len(references)}, "id": "x"}],
    )
    return {"exact_match": float(result["exact_match"]), "f1": float(result["f1"])}


def rouge_scores(prediction: str, references: list[str]) -> dict[str, float]:
    best = {name: 0.0 for name in ROUGE_TYPES}
    for reference in references:
        scores = _ROUGE.score(reference, prediction)
        best = {name: max(best[name], scores[name].fmeasure) for name in ROUGE_TYPES}
    return best


def json_scores(prediction: str, schema: dict[str, Any] | None) -> dict[str, float]:
    try:
        parsed = json.loads(prediction)
    except (json.JSONDecodeError, RecursionError):
        return {"json_valid": 0.0, **({"json_schema_valid": 0.0} if schema is not None else {})}
    scores = {"json_valid": 1.0}
    if schema is not None:
        try:
            jsonschema.validate(parsed, schema)
            scores["json_schema_valid"] = 1.0
        except jsonschema.ValidationError:
            scores["json_schema_valid"] = 0.0
    return scores


def metric_names(metrics: list[str], schema: dict[str, Any] | None) -> list[str]:
    names = []
    if "squad" in metrics:
        names += ["exact_match", "f1"]
    if "rouge" in metrics:
        names += list(ROUGE_TYPES)
    if "json" in metrics:
        names += ["json_valid"] + (["json_schema_valid"] if schema is not None else [])
    return names


def score(
    prediction: str | None, references: list[str], metrics: list[str], schema: dict[str, Any] | None = None
) -> dict[str, float]:
    """Scores of one example; a failed generation (None or blank) is 0 on everything."""
    if prediction is None or not prediction.strip():
        return {name: 0.0 for name in metric_names(metrics, schema)}
    scores: dict[str, float] = {}
    if "squad" in metrics:
        scores.update(squad_scores(prediction, references))
    if "rouge" in metrics:
        scores.update(rouge_scores(prediction, references))
    if "json" in metrics:
        scores.update(json_scores(prediction, schema))
    return scores


def aggregate(per_example: list[dict[str, float]], names: list[str]) -> dict[str, float]:
    """Mean over every example, failed ones included."""
    if not per_example:
        return {}
    return {name: sum(e[name] for e in per_example) / len(per_example) for name in names}
