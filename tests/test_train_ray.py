"""Ray integration tier: the training job on a local Ray with tiny models."""

import json
import os
import socket
import tempfile
from pathlib import Path

import psutil
import pytest
import ray
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from jobs.config import load_config
from jobs.data import DataError
from jobs.data.driver import prepare
from jobs.model import load_adapter, load_base
from jobs.prompting import Prompting
from jobs.train import WORKDIR_PREFIX, train, worker_workdir

pytestmark = pytest.mark.ray
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_bad_data_fails_before_ray_starts(tiny_causal, tmp_path):
    assert not ray.is_initialized()
    (tmp_path / "d.jsonl").write_text('{"input": "x", "output": "y"}\n{"input": "x"}\n')
    run = load_config(None, [f"model.name={tiny_causal}", f"data.path={tmp_path / 'd.jsonl'}", f"training.output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match="row 2: output: missing or empty"):
        train(run)
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_two_worker_qlora_run(local_ray, tiny_causal, tmp_path):
    out, storage = tmp_path / "out", tmp_path / "storage"
    run = load_config(None, [
        f"model.name={tiny_causal}", f"training.output_dir={out}", f"ray.storage_path={storage}",
        "ray.num_workers=2", "data.demo_rows=160", "training.max_steps=16", "training.eval_steps=8",
        "training.logging_steps=2", "training.learning_rate=5e-3", "training.batch_size=4",
        "eval.metrics=[rouge]", "eval.during_training_samples=4", "eval.max_new_tokens=6",
    ])
    outcome = train(run)
    metrics = json.loads((out / "metrics.json").read_text())
    # Task metrics are computed at every evaluation and reach Ray next to the loss.
    evaluations = [e for e in metrics["log_history"] if "eval_loss" in e]
    assert len(evaluations) == 2 and all({"eval_rouge1", "eval_rougeL", "eval_failed_generations"} <= set(e) for e in evaluations)

    assert metrics["final_train_loss"] < metrics["first_train_loss"]
    assert metrics["final_eval_loss"] < metrics["first_eval_loss"]
    assert metrics["steps"] == 16 and metrics["chosen_step"] == 16
    # Both ranks trained: every rank saved its RNG state into the checkpoint.
    checkpoints = sorted(storage.glob("*/checkpoint_*/checkpoint"))
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "rng_state_0.pth", "rng_state_1.pth"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}, "checkpoints hold the adapter, not the frozen base"
        assert sum(p.stat().st_size for p in ckpt.iterdir() if "adapter" in p.name) < 200_000

    # The exported adapter is the final checkpoint's, in plain PEFT format, and reloads exactly.
    tokenizer = AutoTokenizer.from_pretrained(outcome.adapter_dir)
    data = prepare(run.data, Prompting(tokenizer, "causal", True))
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)([data.eval[i] for i in range(3)])
    with torch.no_grad():
        exported = load_adapter(run, outcome.adapter_dir, CPU, "causal").eval()(**batch).logits
        from_checkpoint = load_adapter(run, checkpoints[-1], CPU, "causal").eval()(**batch).logits
        base = load_base(run, CPU, "causal").eval()(**batch).logits
    assert torch.equal(exported, from_checkpoint)
    assert not torch.allclose(exported, base)

    report = (out / "report.md").read_text()
    for section in ("## Model", "## LoRA", "## Hyperparameters", "## Data", "## Loss curve", "## Key metrics", "## Timings"):
        assert section in report
    assert "| Workers | 2 |" in report and "Trainable parameters" in report
    assert (out / "loss.png").stat().st_size > 10_000
    saved = load_config(out / "config.yaml")
    assert saved == run
    assert not list(Path(out).glob(".adapter-*")), "no staging folder left behind"


def _resume_run(tiny_causal, tmp_path, name, max_failures):
    return load_config(None, [
        f"model.name={tiny_causal}", f"training.output_dir={tmp_path / name}", f"ray.storage_path={tmp_path / 'storage'}",
        "ray.num_workers=2", "data.demo_rows=96", "training.max_steps=12", "training.eval_steps=4", "training.logging_steps=1",
        "training.learning_rate=5e-3", "training.batch_size=4", f"ray.max_failures={max_failures}",
    ])


def test_worker_killed_mid_run_resumes_from_latest_checkpoint(local_ray, tiny_causal, tmp_path, monkeypatch):
    reference = train(_resume_run(tiny_causal, tmp_path, "uninterrupted", 0)).metrics
    monkeypatch.setenv("LORAFLEET_FAIL_AT", "1:6")  # rank 1 dies at step 6; the latest checkpoint is step 4
    with pytest.raises(ray.train.TrainingFailedError):
        train(_resume_run(tiny_causal, tmp_path, "no-retries", 0))
    resumed = train(_resume_run(tiny_causal, tmp_path, "resumed", 1)).metrics

    assert resumed["final_step"] == 12
    history = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["log_history"]
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == list(range(1, 13)), "steps 5..12 rerun once after resuming at step 4; nothing else is redone"
    assert resumed["resumed_from_steps"] == [4] and reference["resumed_from_steps"] == []
    assert "| Resumed after a failure from step | 4 |" in (tmp_path / "resumed" / "report.md").read_text()
    assert resumed["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], rel=1e-3)
    assert not _dead_workers_folders(), "the killed worker's folder is removed by the workers that came after it"


def _dead_workers_folders() -> list[Path]:
    mine = f"{WORKDIR_PREFIX}{socket.gethostname()}-"
    names = [f.name.removeprefix(mine).split("-") for f in Path(tempfile.gettempdir()).glob(f"{mine}*-*")]
    return [name for name in names if len(name) == 2 and not psutil.pid_exists(int(name[0]))]  # <pid>-<suffix>


def test_a_worker_removes_its_hosts_folders_of_dead_workers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = f"{WORKDIR_PREFIX}{socket.gethostname()}-"
    dead, living = tmp_path / f"{mine}{2**31 - 1}-a", tmp_path / f"{mine}{os.getpid()}-b"
    elsewhere = tmp_path / f"{WORKDIR_PREFIX}another-host-{2**31 - 1}-c"  # another container's process-id space
    # A host named `<this host>-2147483647` (a dead pid here), its worker's folder: not this host's to remove.
    longer = tmp_path / f"{mine}{2**31 - 1}-{os.getpid()}-d"
    for folder in (dead, living, elsewhere, longer):
        (folder / "hf" / "checkpoint-4").mkdir(parents=True)
    made = worker_workdir()
    assert not dead.exists() and living.exists() and elsewhere.exists() and longer.exists() and made.is_dir()
    assert made.name.startswith(f"{mine}{os.getpid()}-") and _dead_workers_folders() == []


def test_deepspeed_zero2_with_4bit_on_two_workers(local_ray, tiny_causal, tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed (make setup installs it)")
    out, storage = tmp_path / "out", tmp_path / "storage"
    run = load_config(None, [
        f"model.name={tiny_causal}", f"training.output_dir={out}", f"ray.storage_path={storage}", "quantization.mode=4bit",
        "ray.num_workers=2", "data.demo_rows=96", "training.max_steps=8", "training.eval_steps=8", "training.logging_steps=1",
        "training.learning_rate=5e-3", "training.batch_size=4", "training.deepspeed={zero_optimization: {stage: 2}}",
    ])
    outcome = train(run)
    assert outcome.metrics["final_train_loss"] < outcome.metrics["first_train_loss"]
    # ZeRO-2 ran: DeepSpeed's checkpoint has one optimizer partition per rank ...
    (checkpoint,) = storage.glob("*/checkpoint_*/checkpoint")
    (zero_dir,) = checkpoint.glob("global_step8")
    assert {p.name for p in zero_dir.glob("zero_pp_rank_*_optim_states.pt")} == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    # ... and its model states leave out the frozen 4-bit base weights (only LoRA and quantization constants).
    states = torch.load(zero_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any("lora_A" in k for k in states) and not any(k.endswith("base_layer.weight") for k in states)
    with torch.no_grad():
        tokenizer = AutoTokenizer.from_pretrained(outcome.adapter_dir)
        batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)([prepare(run.data, Prompting(tokenizer, "causal", True)).eval[i] for i in range(2)])
        tuned = load_adapter(run, outcome.adapter_dir, CPU, "causal").eval()(**batch).logits
        base = load_base(run, CPU, "causal").eval()(**batch).logits
    assert not torch.allclose(tuned, base)


def test_padding_free_training_on_ray_follows_the_padded_run(local_ray, tiny_causal, tmp_path):
    def run(name, *extra):
        return train(load_config(None, [
            f"model.name={tiny_causal}", f"training.output_dir={tmp_path / name}", f"ray.storage_path={tmp_path / 'storage'}",
            "quantization.mode=none", "data.demo_rows=48", "training.max_steps=4", "training.eval_steps=4", "training.logging_steps=1",
            "training.learning_rate=5e-3", "training.batch_size=4", *extra]))

    padded, packed = run("padded"), run("packed", "training.packing=padding_free")
    losses = [[e["loss"] for e in json.loads((tmp_path / n / "metrics.json").read_text())["log_history"] if "loss" in e]
              for n in ("padded", "packed")]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-3)  # same batches, same loss
    assert packed.metrics["final_eval_loss"] == pytest.approx(padded.metrics["final_eval_loss"], rel=1e-3)
