"""Sweep config and search space (unit tier: no Ray run, tiny models)."""

from types import SimpleNamespace

import pytest
import yaml
from ray import tune
from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState

from jobs.config import ConfigError, load_config, with_absolute_paths
from jobs.train import FinalEvaluationCallback
from tune.space import linear_layers, max_trial_steps, param_space, resolve_target_sets, trial_config
from tune.sweep import _search_alg


def _problems(overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return info.value.problems


def test_malformed_ranges_and_lists_are_reported_together():
    problems = _problems(["tune.learning_rate=[1e-3, 1e-4]", "tune.lora_r=[]", "tune.space={lora.dropout: {choice: []}, training.warmup_ratio: {uniform: [0.1, 0.1]}}"])
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "tune.learning_rate" in text and "lower bound 0.001 is not below upper bound 0.0001" in text
    assert "tune.lora_r = []: empty list" in text
    assert "tune.space.lora.dropout" in text and "choice is empty" in text
    assert "tune.space.training.warmup_ratio" in text


def test_bad_keys_values_and_sets_are_reported_together_with_the_fix():
    problems = _problems([
        "tune.lora_r=[8, -4]", "tune.target_modules=[attention, atention]", "tune.metric=eval_f1",
        "tune.space={lora.dropot: {choice: [0.1]}, training.batch_size: {uniform: [2, 8]}, training.lr_scheduler: {choice: [cosine, cosin]}, training.warmup_ratio: {uniform: [0.0, 2.0]}}",
    ])
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "tune.metric = 'eval_f1': not reported" in text and "eval_loss" in text
    assert "tune.space.lora.dropot" in text and "did you mean 'lora.dropout'?" in text
    assert "tune.lora_r = -4" in text and "greater than 0" in text
    assert "tune.target_modules = 'atention': unknown target set" in text
    assert "tune.space.training.batch_size" in text and "use randint or choice" in text
    assert "tune.space.training.lr_scheduler = 'cosin'" in text
    assert "tune.space.training.warmup_ratio = 2.0" in text


def test_sweep_rules_need_reported_metrics_and_listable_grids():
    problems = _problems(["tune.metric=eval_f1", "eval.metrics=[squad]", "tune.search_alg=grid", "tune.learning_rate=[1e-4, 1e-3]", "tune.space={training.learning_rate: {choice: [1e-4]}}"])
    text = "\n".join(problems)
    assert "eval.during_training_samples" in text
    assert "grid search needs listed values" in text and "training.learning_rate" in text
    assert "already searched by a tune shortcut" in text


def test_a_training_config_without_tune_section_is_not_held_to_sweep_rules():
    run = load_config(None, ["data.validation_fraction=0"])
    assert run.tune.metric == "eval_loss"


def test_param_space_shortcuts_and_trial_config(tiny_causal):
    run = load_config(None, [f"model.name={tiny_causal}", "tune.learning_rate=[1e-5, 1e-3]", "tune.lora_r=[4, 16]", "tune.target_modules=[attention, [q_proj, v_proj]]", "tune.space={training.batch_size: {randint: [2, 4]}}"])
    space = param_space(run)
    assert isinstance(space["training.learning_rate"], tune.search.sample.Float)
    assert space["lora.r"].categories == [4, 16]
    assert space["lora.target_modules"].categories == ["attention", "q_proj,v_proj"]
    assert (space["training.batch_size"].lower, space["training.batch_size"].upper) == (2, 5), "randint bounds are inclusive in the config"

    targets = resolve_target_sets(run)
    base = run.model_dump(mode="json", exclude={"tune"})
    trial = trial_config(base, {"lora.r": 16, "lora.target_modules": "attention", "training.learning_rate": 3e-4}, targets, 2.0)
    assert trial.lora.r == 16 and trial.lora.alpha == 32, "alpha follows r by the ratio"
    assert trial.lora.target_modules == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert trial.training.learning_rate == 3e-4
    assert trial_config(base, {"lora.target_modules": "q_proj,v_proj"}, targets, 2.0).lora.target_modules == ["q_proj", "v_proj"]


def test_grid_turns_choices_into_grid_axes():
    run = load_config(None, ["tune.search_alg=grid", "tune.lora_r=[4, 8]"])
    assert param_space(run)["lora.r"] == {"grid_search": [4, 8]}


@pytest.mark.parametrize("kind, attention, mlp", [
    ("causal", {"self_attn.q_proj", "self_attn.o_proj"}, {"mlp.gate_proj", "mlp.down_proj"}),
    ("seq2seq", {"SelfAttention.q", "EncDecAttention.v"}, {"DenseReluDense.wi", "DenseReluDense.wo"}),
])
def test_named_target_sets_resolve_per_architecture(kind, attention, mlp, tiny_causal, tiny_seq2seq):
    run = load_config(None, [f"model.name={tiny_causal if kind == 'causal' else tiny_seq2seq}"])
    found_attention, found_other = linear_layers(run)
    assert attention <= set(found_attention) and mlp <= set(found_other)
    assert not set(found_attention) & set(found_other)


def test_gpt2_conv1d_projections_are_found_and_disambiguated(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    attention, other = linear_layers(load_config(None, [f"model.name={tmp_path}"]))
    assert attention == ["attn.c_attn", "attn.c_proj"] and other == ["mlp.c_fc", "mlp.c_proj"]


def test_asha_horizon_covers_the_longest_trial():
    run = load_config(None, ["training.batch_size=8", "tune.space={training.batch_size: {choice: [4, 8]}, training.num_epochs: {choice: [1, 2]}}"])
    assert max_trial_steps(run, n_train=100) == 50  # batch 4, 2 epochs: 25 steps per epoch


def test_relative_paths_become_absolute_for_trial_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"input": "a", "output": "b"}\n')
    run = with_absolute_paths(load_config(None, ["data.path=d.jsonl", "training.output_dir=out", "tune.output_dir=sw"]))
    assert run.data.path == str(tmp_path / "d.jsonl") and run.training.output_dir == str(tmp_path / "out") and run.tune.output_dir == str(tmp_path / "sw")
    assert run.model.name == "smollm2-135m-instruct", "names that are not local paths stay as they are"


def test_shipped_sweep_config_is_a_valid_sweep():
    run = load_config("configs/squad-smollm2.yaml")
    assert yaml.safe_load(open("configs/squad-smollm2.yaml"))["tune"]["metric"] == "eval_f1"
    assert set(run.tune.dimensions()) == {"training.learning_rate", "lora.r", "lora.target_modules"}


def test_optuna_samples_the_space_with_the_configured_seed():
    run = load_config(None, ["tune.search_alg=optuna", "tune.seed=3", "tune.learning_rate=[1e-5, 1e-3]", "tune.lora_r=[4, 8]", "tune.target_modules=[attention, [q_proj, v_proj]]"])

    def suggestions():
        searcher = _search_alg(run, concurrent=2)
        assert searcher.set_search_properties("eval_loss", "min", param_space(run))
        return [searcher.suggest(f"t{i}") for i in range(2)]

    first = suggestions()
    assert first == suggestions(), "same seed, same trials"
    for params in first:
        assert 1e-5 <= params["training.learning_rate"] <= 1e-3 and params["lora.r"] in (4, 8)
        assert params["lora.target_modules"] in ("attention", "q_proj,v_proj")


def test_final_step_between_evaluations_is_evaluated():
    args = SimpleNamespace(eval_strategy="steps", eval_steps=4)
    for step, expected in ((10, True), (8, False), (6, False)):
        control = TrainerControl()
        FinalEvaluationCallback().on_step_end(args, TrainerState(global_step=step, max_steps=10 if step != 8 else 8), control)
        assert control.should_evaluate is expected, step


def test_target_sets_come_from_the_configured_revision(tiny_causal, monkeypatch):
    from transformers import AutoConfig

    asked = []
    real = AutoConfig.from_pretrained.__func__

    def recording(cls, name, **kwargs):
        asked.append(kwargs)
        return real(cls, name, trust_remote_code=kwargs.get("trust_remote_code", False))

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(recording))
    linear_layers(load_config(None, [f"model.name={tiny_causal}", "model.revision=v1.2"]))
    assert asked and asked[0]["revision"] == "v1.2"
