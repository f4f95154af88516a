"""Every choice between CPU and GPU, made once, here, by the process that holds the device.

A Ray Train worker and a Serve replica see the GPU Ray gave them (Ray sets CUDA_VISIBLE_DEVICES, so it is
`cuda:0` there); the driver that validated the config may run on a machine without one. So these functions run
in the worker, the replica or the local `lorafleet eval` process, never in the driver on the worker's behalf.
What the config alone decides stays in the config: `ray.use_gpu` (a GPU per Train worker), `serve.on_gpu` (a GPU
per replica), and `serve.choice` (vLLM on GPU replicas). bitsandbytes' CPU-only kernel switch is turned off on
every device by `jobs.model.one_4bit_kernel`: the flag is read by its CPU path alone.
"""

from __future__ import annotations

import torch


def gpu_has_bf16() -> bool:
    """Ampere and newer (A100, L4, H100) compute in bf16; T4 and V100 do not."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_precision(requested: str, use_gpu: bool) -> str:
    """training.precision: 'auto' is bf16 on a GPU that has it, fp16 on older GPUs, fp32 on CPU
    (mixed precision on CPU is slower than fp32 and its bf16 autocast rounds what the adapter learns)."""
    if requested != "auto":
        return requested
    if not use_gpu:
        return "fp32"
    return "bf16" if gpu_has_bf16() else "fp16"


def compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """quantization.compute_dtype (also the dtype of an unquantized base): 'auto' follows `training_precision` on
    a GPU, so the 4-bit layers compute in the dtype the Trainer autocasts to, and is fp32 on CPU."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if gpu_has_bf16() else torch.float16


def replica_device(on_gpu: bool) -> torch.device:
    """A Serve replica's device. A replica that reserved a GPU and sees none is a broken node: saying so beats
    serving from the CPU at a fraction of the speed nobody asked for."""
    if not on_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "serve.replica_resources reserves a GPU for this replica, but torch sees no CUDA device here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); install a CUDA build of torch on the "
            "GPU nodes, or drop GPU from serve.replica_resources"
        )
    return torch.device("cuda")


def local_device() -> torch.device:
    """`lorafleet eval` runs in the calling process: its GPU if it has one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
