"""The pipeline's evaluation gate: a new adapter is published to the registry and made current only if it scores
at least as well as the current version on the same held-out set and metric."""

import json

import pytest

from jobs import registry
from jobs.config import ConfigError, load_config
from jobs.pipeline.gate import judge
from tests.subprocesses import free_port


@pytest.mark.parametrize(
    ("metric", "margin", "score", "current", "passes"),
    [
        ("eval_loss", 0.0, 1.50, 1.50, True),  # as good as the current version
        ("eval_loss", 0.0, 1.51, 1.50, False),
        ("eval_loss", 0.02, 1.51, 1.50, True),  # worse, but within the margin
        ("f1", 0.0, 40.0, 41.0, False),  # higher is better
        ("f1", 1.5, 40.0, 41.0, True),
        ("f1", 0.0, 42.0, 41.0, True),
    ],
)
def test_the_gate_compares_in_the_metrics_direction_within_the_margin(metric, margin, score, current, passes):
    run = load_config(None, [f"promote.metric={metric}", f"promote.margin={margin}", "eval.metrics=[squad]"])
    passed, reason = judge(run, score, current)
    assert passed is passes
    assert f"{metric} {score:.4f} against {current:.4f}" in reason and ("made current" in reason)


def test_a_gate_metric_the_evaluation_does_not_compute_is_a_config_error():
    with pytest.raises(ConfigError, match=r"promote.metric = 'f1'.*use one of eval_loss, perplexity"):
        load_config(None, ["promote.metric=f1"])


@pytest.mark.ray
def test_a_worse_adapter_is_published_but_not_made_current_and_the_report_says_why(s3, tiny_causal, tmp_path):
    """Registry on a local S3 (moto): the first pipeline's adapter becomes current; a second one trained a single
    step scores worse on eval loss, is kept as a version that is not current, and the eval report shows both scores
    and the decision; the app it deploys serves the current version."""
    import ray
    from ray import serve

    from jobs.pipeline import pipeline

    store = f"{s3}/gate-registry"
    common = [f"model.name={tiny_causal}", "data.demo_rows=96", "training.eval_steps=4", "training.logging_steps=4", "training.batch_size=4",
              "training.learning_rate=5e-3", "ray.resources_per_worker={CPU: 1}", "eval.max_new_tokens=4", "serve.replica_resources={CPU: 0.5}",
              f"serve.port={free_port()}", f"promote.registry={store}", "promote.name=qa"]
    ray.init(num_cpus=2)
    try:
        good = pipeline(load_config(None, [*common, f"training.output_dir={tmp_path / 'good'}", "training.max_steps=12"]))
        serve.shutdown()
        worse = pipeline(load_config(None, [*common, f"training.output_dir={tmp_path / 'worse'}", "training.max_steps=1"]))
        serve.shutdown()
    finally:
        ray.shutdown()
    assert good.gate.promoted and good.gate.current_version is None and good.gate.version == 2
    assert worse.gate.score > good.gate.score, "the one-step adapter must score worse for this test to mean anything"
    assert not worse.gate.promoted and worse.gate.version == 3 and worse.gate.current_version == 2
    assert worse.gate.current_score == pytest.approx(good.gate.score, rel=1e-4)  # the same set, the same metric
    assert registry.current(store, "qa").number == 2
    assert [v.number for v in registry.versions(store, "qa")] == [2, 3]
    report = worse.eval_report.read_text()
    assert "Promotion gate: qa version 3 published, not current" in report and "worse, so not made current" in report
    assert f"{worse.gate.score:.4f}" in report and f"{worse.gate.current_score:.4f}" in report
    gate_record = json.loads((worse.eval_report.parent / "gate.json").read_text())
    assert gate_record["promoted"] is False and gate_record["current_version"] == 2
    assert worse.smoke["finish_reason"] in ("stop", "length")  # answered by the current version, 2
