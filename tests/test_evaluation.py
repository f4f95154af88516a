"""Evaluation job: base vs adapter report, predictions file, failures counted."""

import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

from jobs.config import load_config
from jobs.data import held_out_examples
from jobs.evaluation import run_eval
from jobs.model import load_base, lora_config


@pytest.fixture
def adapter_dir(tiny_causal, tmp_path):
    """An adapter with random (non-zero) B matrices, so it answers differently from the base."""
    run = load_config(None, [f"model.name={tiny_causal}", "quantization.mode=none"])
    torch.manual_seed(0)
    model = get_peft_model(load_base(run, torch.device("cpu"), "causal"), lora_config(run, "causal"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _run(tiny_causal, tmp_path, *extra):
    return load_config(None, [f"model.name={tiny_causal}", f"training.output_dir={tmp_path / 'out'}", "data.demo_rows=40", "data.validation_fraction=0.25",
                              "eval.metrics=[rouge, squad]", "eval.max_new_tokens=8", "eval.report_samples=2", *extra])


def test_report_has_every_section_and_both_models(tiny_causal, adapter_dir, tmp_path):
    run = _run(tiny_causal, tmp_path)
    outcome = run_eval(run, adapter_dir, with_base=True, output_dir=tmp_path / "eval", predictions=tmp_path / "preds.jsonl")
    results = outcome.results
    assert "| metric | base | adapter | delta |" in outcome.summary_md and "## Failed generations" not in outcome.summary_md
    assert set(results) == {"base", "adapter"}
    assert [g.text for g in results["base"].generations] != [g.text for g in results["adapter"].generations]
    report = (tmp_path / "eval" / "eval.md").read_text()
    for section in ("## Metrics", "## Failed generations", "## Timings", "## Sample predictions", "| metric | base | adapter | delta |",
                    "| f1 |", "| rougeL |", "| eval_loss |", "| perplexity |", "**Expected:**", "**Base:**", "**Adapter:**"):
        assert section in report, section
    assert "held-out 25%" in report and "10 examples" in report
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert summary["examples"] == 10 and {"f1", "exact_match", "rouge1", "eval_loss", "failed_generations"} <= set(summary["results"]["adapter"]["metrics"])
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 5_000
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [e["id"] for e in held_out_examples(run)]
    assert {"id", "input", "prediction", "references", "metrics", "base_prediction"} <= set(rows[0])
    assert rows[0]["model"] == "adapter" and set(rows[0]["metrics"]) == {"exact_match", "f1", "rouge1", "rouge2", "rougeL"}


def test_failed_generations_are_counted_and_scored_zero(tiny_causal, tmp_path, monkeypatch):
    import jobs.evaluation as evaluation
    from jobs.generate import Generation

    monkeypatch.setattr(evaluation, "generate", lambda model, tok, prompts, *a, **k: [Generation(None, "empty generation")] * len(prompts))
    results = run_eval(_run(tiny_causal, tmp_path), None, with_base=True, output_dir=tmp_path / "eval").results
    metrics = results["base"].metrics
    assert metrics["failed_generations"] == 10 and metrics["f1"] == 0.0 and metrics["rouge1"] == 0.0
    assert "10 of 10 generations failed (scored 0, not left out). Reasons: empty generation x10" in (tmp_path / "eval" / "eval.md").read_text()


def test_eval_path_points_at_another_file(tiny_causal, tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"o{i}", "input": f"Score: {i}", "output": "output"}) for i in range(3)))
    assert [e["id"] for e in held_out_examples(_run(tiny_causal, tmp_path, f"data.eval_path={path}"))] == ["o0", "o1", "o2"]


def test_cli_eval_writes_report_and_predictions(tiny_causal, adapter_dir, tmp_path):
    cmd = [sys.executable, "-m", "jobs.evaluation", f"model.name={tiny_causal}", f"training.output_dir={tmp_path / 'out'}", "data.demo_rows=20",
           "eval.metrics=[squad]", "eval.max_new_tokens=4", "--adapter", str(adapter_dir), "--predictions", str(tmp_path / "p.jsonl")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| metric | base | adapter | delta |" in result.stdout
    assert (tmp_path / "out" / "eval" / "eval.md").exists() and len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
