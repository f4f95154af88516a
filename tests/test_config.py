"""Config schema: defaults, shipped configs, overrides, and errors reported all at once."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError, RunConfig, apply_overrides, as_json, dump_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.quantization.mode == "4bit" and cfg.model.trust_remote_code is False


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    head = path.read_text().splitlines()[:3]
    assert all(line.startswith("#") for line in head[:2]), "each config starts with a comment block"
    assert any("lorafleet train --config configs/" + path.name in line for line in head), "and names the command that runs it"


def test_at_least_one_config_per_seed_workload():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "posting-time-flan-t5-large", "timeline-json-dialogpt", "query-reformulation-flan-t5", "xsum-phi2", "squad-flan-t5"} <= names


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["training.learning_rate=1e-4", "lora.r=16", "lora.target_modules=[q_proj, v_proj]", "ray.use_gpu=true", "ray.resources_per_worker={CPU: 2, GPU: 1}"])
    assert cfg.training.learning_rate == 1e-4 and cfg.lora.r == 16
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.ray.resources_per_worker == {"CPU": 2, "GPU": 1}


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["training.learning_rate"])


def test_all_problems_reported_at_once_with_field_value_and_fix(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"nmae": "x"},
        "lora": {"r": -4, "dropout": 2},
        "training": {"learnig_rate": 1e-4, "batch_size": "eight"},
        "quantization": {"mode": "3bit"},
    }))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    text = str(err.value)
    assert len(problems) == 6, problems
    assert "model.nmae = 'x': unknown key; did you mean 'name'?" in text
    assert "training.learnig_rate" in text and "did you mean 'learning_rate'?" in text
    assert "lora.r = -4" in text and "greater than 0" in text
    assert "training.batch_size = 'eight'" in text
    assert "quantization.mode = '3bit'" in text and "'4bit'" in text


def test_cross_field_rules_are_all_reported(monkeypatch):
    _pretend_deepspeed(monkeypatch, installed=True)
    overrides = [
        "training.deepspeed={zero_optimization: {stage: 3}}",
        "model.device_map=auto",
        "training.precision=fp16",
        "ray.resources_per_worker={GPU: 1}",
        "training.max_steps=0",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert len(err.value.problems) == 5, err.value.problems
    assert "ZeRO-3 cannot shard 4bit" in text and "use ZeRO stage 2" in text
    assert "model.device_map = 'auto'" in text and "remove model.device_map" in text
    assert "training.precision = 'fp16'" in text and "needs a GPU" in text
    assert "ray.resources_per_worker.GPU = 1" in text and "ray.use_gpu=true" in text
    assert "training.max_steps = 0" in text


def _pretend_deepspeed(monkeypatch, installed: bool):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if installed else None) if name == "deepspeed" else real_find_spec(name, *a))


def test_deepspeed_rules(tmp_path, monkeypatch):
    _pretend_deepspeed(monkeypatch, installed=True)
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    assert load_config(None, [f"training.deepspeed={ds}"]).training.deepspeed == str(ds)
    assert load_config(None, ["quantization.mode=none", "training.deepspeed={zero_optimization: {stage: 3}}"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(None, ["training.deepspeed=missing.json"])


def test_deepspeed_batch_keys_must_agree_with_training(monkeypatch):
    _pretend_deepspeed(monkeypatch, installed=True)
    agreeing = "training.deepspeed={zero_optimization: {stage: 2}, train_micro_batch_size_per_gpu: 4, train_batch_size: 16, gradient_clipping: auto}"
    assert load_config(None, ["training.batch_size=4", "ray.num_workers=2", "training.gradient_accumulation_steps=2", agreeing])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.batch_size=8", "ray.num_workers=2", agreeing])
    text = str(err.value)
    assert "train_micro_batch_size_per_gpu=4 (training.* gives 8)" in text and 'write "auto" or leave them out' in text
    assert "train_batch_size" not in text and "gradient_clipping" not in text  # 8 x 1 x 2 = 16 agrees; "auto" is left to the Trainer


def test_deepspeed_config_leaves_batch_keys_to_the_trainer(tmp_path):
    from jobs.train import deepspeed_config

    ds = tmp_path / "ds.yaml"
    ds.write_text("zero_optimization: {stage: 2}\ngradient_clipping: 0.5\n")
    assert deepspeed_config(None) is None
    assert deepspeed_config(str(ds)) == {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": "auto",
                                         "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
    assert deepspeed_config({"train_batch_size": 8})["train_batch_size"] == 8


def test_deepspeed_missing_names_the_extra(monkeypatch):
    _pretend_deepspeed(monkeypatch, installed=False)
    with pytest.raises(ConfigError, match=r"DeepSpeed is not installed: pip install --no-build-isolation 'deepspeed>=0.19,<0.20'"):
        load_config(None, ["training.deepspeed={zero_optimization: {stage: 2}}"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_config(bad)


def test_eval_rules():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.json_schema={type: object}", "eval.during_training_samples=8", "eval.max_new_tokens=0", "eval.metrics=[bleu]"])
    text = str(err.value)
    assert "eval.max_new_tokens = 0" in text and "eval.metrics.0 = 'bleu'" in text
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.json_schema={type: object}", "eval.during_training_samples=8"])
    assert "add json to eval.metrics" in str(err.value) and "set eval.metrics (e.g. [squad])" in str(err.value)
    assert load_config(None, ["eval.metrics=[json]", "eval.json_schema={type: object}", "eval.during_training_samples=8"]).eval.during_training_samples == 8


def test_an_override_cut_up_by_the_shell_is_reported_not_raised():
    # `ray.resources_per_worker={CPU: 4, GPU: 1}` unquoted: the shell passes three words
    with pytest.raises(ConfigError) as err:
        load_config(None, ["ray.resources_per_worker={CPU:", "4,", "GPU:", "1}"])
    text = str(err.value)
    assert "ray.resources_per_worker = '{CPU:': not a YAML value" in text and "quote the whole override" in text
    assert text.count("write overrides as dotted.key=value") == 3


@pytest.mark.parametrize("overrides", [["data.validation_fraction=0"], ["data.validation_fraction=0.2", "tune.num_samples=3"]])
def test_a_config_sent_to_workers_or_saved_validates_there_as_the_same_config(overrides):
    """Ray workers, replicas and a saved config.yaml validate the config again: a training run without evaluation
    data must not turn into a sweep (which needs it) on the way."""
    run = load_config(None, overrides)
    again = RunConfig.model_validate(as_json(run))
    assert again == run and again.is_sweep == run.is_sweep
    assert RunConfig.model_validate(yaml.safe_load(dump_config(run))).is_sweep == run.is_sweep
