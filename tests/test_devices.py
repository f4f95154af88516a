"""Every CPU/GPU decision (jobs.devices and the code that reads it) resolved on a faked CUDA machine.

No GPU here: torch.cuda's answers are replaced, so a GPU config is at least resolved right before any GPU run.
What only a GPU can show (kernels, memory, speed) is bench/gpu_check.py's.
"""

import pytest
import torch

from jobs import devices
from jobs.config import load_config
from jobs.model import quantization_config
from jobs.train import training_arguments
from tune.sweep import max_concurrent_trials


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with one CUDA device: `fake_cuda(bf16=False)` makes it a T4/V100-class one."""

    def install(bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # TrainingArguments picks its device

    return install


def _run(*overrides):
    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    ("gpu", "bf16", "use_gpu", "precision", "expected"),
    [
        (False, False, False, "auto", "fp32"),
        (True, True, True, "auto", "bf16"),
        (True, False, True, "auto", "fp16"),  # T4 / V100: no bf16
        (True, True, False, "auto", "fp32"),  # a GPU on the node, but ray.use_gpu is off: the worker runs on CPU
        (True, True, True, "fp32", "fp32"),  # what the config names wins
    ],
)
def test_training_precision_follows_the_workers_device(fake_cuda, tmp_path, gpu, bf16, use_gpu, precision, expected):
    if gpu:
        fake_cuda(bf16=bf16)
    args = training_arguments(
        _run(f"ray.use_gpu={str(use_gpu).lower()}", f"training.precision={precision}"), str(tmp_path), has_eval=False
    )
    assert (args.bf16, args.fp16) == (expected == "bf16", expected == "fp16")
    assert args.use_cpu is not use_gpu


@pytest.mark.parametrize(
    ("device", "bf16", "requested", "expected"),
    [
        ("cpu", False, "auto", torch.float32),
        ("cuda", True, "auto", torch.bfloat16),
        ("cuda", False, "auto", torch.float16),
        ("cuda", True, "float32", torch.float32),
    ],
)
def test_4bit_compute_dtype_follows_the_device(fake_cuda, device, bf16, requested, expected):
    if device == "cuda":
        fake_cuda(bf16=bf16)
    run = _run(f"quantization.compute_dtype={requested}")
    assert quantization_config(run, torch.device(device)).bnb_4bit_compute_dtype == expected
    assert devices.compute_dtype(requested, torch.device(device)) == expected  # an unquantized base loads in it


def test_precision_and_compute_dtype_agree_on_every_gpu(fake_cuda):
    """The Trainer autocasts to one dtype and the 4-bit layers compute in another only if someone asked for it."""
    for bf16 in (True, False):
        fake_cuda(bf16=bf16)
        precision = devices.training_precision("auto", use_gpu=True)
        dtype = devices.compute_dtype("auto", torch.device("cuda"))
        assert {"bf16": torch.bfloat16, "fp16": torch.float16}[precision] == dtype


def test_a_replica_is_placed_on_the_gpu_it_reserved_or_says_why_not(fake_cuda, monkeypatch):
    assert devices.replica_device(on_gpu=False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="reserves a GPU.*drop GPU from serve.replica_resources"):
        devices.replica_device(on_gpu=True)
    fake_cuda()
    assert devices.replica_device(on_gpu=True) == torch.device("cuda")
    assert devices.replica_device(on_gpu=False) == torch.device("cpu")  # a CPU replica on a GPU node stays on CPU
    assert devices.local_device() == torch.device("cuda")


def test_serve_on_gpu_follows_replica_resources():
    assert _run("serve.replica_resources={CPU: 1, GPU: 1}").serve.on_gpu
    assert not _run("serve.replica_resources={CPU: 2}").serve.on_gpu


def test_vllm_settings_on_gpu_replicas():
    pytest.importorskip("vllm")
    from serve.vllm_engine import engine_args

    gpu = engine_args(_run("serve.replica_resources={GPU: 1}", "serve.max_adapters_per_replica=4"))
    cpu = engine_args(_run("serve.max_adapters_per_replica=4"))
    assert (gpu.enforce_eager, gpu.max_loras, gpu.kv_cache_memory_bytes) == (
        False,
        4,
        None,
    )  # CUDA graphs; no zero adapter
    assert gpu.gpu_memory_utilization == _run().serve.vllm_gpu_memory_utilization
    assert (cpu.enforce_eager, cpu.max_loras) == (True, 5)


def test_a_sweep_runs_as_many_gpu_trials_as_the_cluster_has_gpus(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert max_concurrent_trials(_run("ray.use_gpu=true", "ray.num_workers=1")) == 2
    assert max_concurrent_trials(_run("ray.use_gpu=true", "ray.num_workers=2")) == 1
    assert max_concurrent_trials(_run("ray.num_workers=1", "ray.resources_per_worker={CPU: 4}")) == 4
