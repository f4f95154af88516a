"""Many LoRA adapters on one base model, each row of a batch through its own adapter in one batched op per layer.

Every adapted linear layer of the base gets a forward hook that adds, for each row b,
`x_b @ A[slot_b]^T @ B[slot_b]^T`, with A and B stacked over slots and ranks padded to the largest loaded
(Punica's BGMV, in torch): a gather and two batched matmuls per layer, whatever the number of adapters in the
batch. Slot 0 is no adapter: its matrices are zero, so a base row adds exactly zero, and a layer that an adapter
does not adapt is zero in that adapter's slot. Loading an adapter fills a free slot, evicting it zeroes the slot.

Written by hand because no maintained library does it for transformers' generate: PEFT's mixed-adapter path
(`adapter_names`) runs one sub-batch per adapter per layer, tiny matmuls that made 8 mixed adapters 0.3x one on a
CPU, and vLLM's CPU LoRA ops gather a full per-token matrix per layer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from jobs.adapter import CONFIG, WEIGHTS

DENSE_WIDTH = 512  # up to this many slot x rank columns a layer computes every slot and masks (see _Stack.delta)
UNSUPPORTED = {  # adapter_config.json settings this op does not compute, and why
    "use_dora": "DoRA rescales the base weight per adapter",
    "modules_to_save": "it replaces whole modules",
    "layer_replication": "it changes the base's layers",
    "alpha_pattern": "per-module alphas",
    "lora_bias": "LoRA biases",
}


class AdapterFormatError(ValueError):
    """The adapter uses a LoRA feature the stacked op does not compute."""


class _Stack:
    """One layer's adapters: A [slots, rank, in] and B [out, slots, rank] (B carries the scaling), so that both
    flatten to every slot's matrices side by side without a copy."""

    def __init__(self, fan_in: int, fan_out: int, slots: int, device: torch.device):
        self.A = torch.zeros(slots, 0, fan_in, device=device)
        self.B = torch.zeros(fan_out, slots, 0, device=device)

    def fit(self, slots: int, rank: int) -> None:
        have_slots, have_rank = self.A.shape[0], self.A.shape[1]
        if slots <= have_slots and rank <= have_rank:
            return
        slots, rank = max(slots, have_slots), max(rank, have_rank)
        A = torch.zeros(slots, rank, self.A.shape[2], device=self.A.device)
        B = torch.zeros(self.B.shape[0], slots, rank, device=self.B.device)
        A[:have_slots, :have_rank], B[:, :have_slots, :have_rank] = self.A, self.B
        self.A, self.B = A, B

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.fit(slot + 1, a.shape[0])
        self.clear(slot)
        self.A[slot, : a.shape[0]] = a.to(self.A.device)
        self.B[:, slot, : b.shape[1]] = b.to(self.B.device)

    def clear(self, slot: int) -> None:
        if slot < self.A.shape[0]:
            self.A[slot].zero_()
            self.B[:, slot].zero_()

    def delta(self, x: torch.Tensor, route: _Route) -> torch.Tensor:
        """The adapters' sum for input `x` [batch, ..., in], row b through slot route.rows[b]."""
        x = x.to(self.A.dtype)
        linear = torch.nn.functional.linear
        if route.single is not None:  # every row on one adapter: two plain matmuls
            return linear(linear(x, self.A[route.single]), self.B[:, route.single])
        slots, rank, fan_in = self.A.shape
        if slots * rank <= DENSE_WIDTH:
            # every slot's A at once, each row keeping only its own slot's columns, then every slot's B at once:
            # two plain matmuls, no per-row copy of weights
            low = linear(x, self.A.reshape(slots * rank, fan_in)) * route.columns(slots, rank, x.dim())
            return linear(low, self.B.reshape(self.B.shape[0], slots * rank))
        flat = x.reshape(x.shape[0], -1, fan_in)  # many wide slots: gather each row's own A and B
        low = torch.bmm(flat, self.A[route.rows].transpose(1, 2))
        return torch.bmm(low, self.B[:, route.rows].permute(1, 2, 0)).reshape(*x.shape[:-1], self.B.shape[0])


class _Route:
    """Each row's slot for the forward passes inside `MultiLora.routing`."""

    def __init__(self, slots: list[int], device: torch.device):
        self.rows = torch.tensor(slots, device=device)
        self.single = slots[0] if len(set(slots)) == 1 else None
        self._columns: dict[tuple[int, int, int], torch.Tensor] = {}

    def columns(self, slots: int, rank: int, dims: int) -> torch.Tensor:
        """1 where a row's own slot's rank columns are among `slots` x `rank`, 0 elsewhere; shaped to broadcast."""
        key = (slots, rank, dims)
        if key not in self._columns:
            own = torch.nn.functional.one_hot(self.rows, slots).repeat_interleave(rank, dim=1).float()
            self._columns[key] = own.view(own.shape[0], *([1] * (dims - 2)), slots * rank)
        return self._columns[key]


class MultiLora:
    """The adapters of one base model, by key, each in its own slot; `routing` sets each row's adapter for a
    forward pass (or a whole `generate`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.layers: dict[str, _Stack] = {}
        self.slots: dict[str, int] = {}
        self.route: _Route | None = None
        self.held: Counter[str] = Counter()  # requests still generating with each adapter
        self.retired: set[str] = set()  # evicted while held: unloaded when the last such request ends

    def __contains__(self, name: str) -> bool:
        return name in self.slots and name not in self.retired

    def hold(self, name: str) -> None:
        """Keep `name` in its slot until `release`: the step loop's requests use it across many forward passes."""
        self.held[name] += 1

    def release(self, name: str) -> None:
        self.held[name] -= 1
        if self.held[name] <= 0:
            del self.held[name]
            if name in self.retired:
                self.retired.discard(name)
                self.unload(name)

    @torch.inference_mode()  # the step loop's forward passes run in inference mode: its slots are inference tensors
    def load(self, name: str, folder: Path) -> None:
        """Fill a free slot with the adapter in `folder` (PEFT's files); AdapterFormatError for what it cannot do."""
        if name in self.retired:  # evicted, still held, wanted again: it never left its slot
            self.retired.discard(name)
            return
        config = json.loads((folder / CONFIG).read_text())
        used = [f"{key} ({why})" for key, why in UNSUPPORTED.items() if config.get(key)]
        if config.get("peft_type", "LORA") != "LORA" or used:
            raise AdapterFormatError(f"{config.get('peft_type')} with {', '.join(used) or 'another method'}")
        pairs = _pairs(load_file(folder / WEIGHTS))
        slot = min(set(range(1, len(self.slots) + 2)) - set(self.slots.values()))
        try:
            for path, (a, b) in pairs.items():
                rank = a.shape[0]
                alpha = config.get("lora_alpha", rank)
                scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
                self._stack(path, a.shape[1], b.shape[0]).put(slot, a.float(), b.float() * scaling)
        except Exception:
            self._clear(slot)  # a slot is all of one adapter or zero
            raise
        for stack in self.layers.values():  # layers this adapter leaves alone: a zero slot to gather
            stack.fit(slot + 1, 0)
        self.slots[name] = slot

    @torch.inference_mode()
    def unload(self, name: str) -> None:
        if self.held[name]:
            self.retired.add(name)
            return
        slot = self.slots.pop(name, None)
        if slot is not None:
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        for stack in self.layers.values():
            stack.clear(slot)

    def _stack(self, path: str, fan_in: int, fan_out: int) -> _Stack:
        if path not in self.layers:
            module = self.model.get_submodule(path)
            stack = self.layers[path] = _Stack(fan_in, fan_out, len(self.slots) + 2, self.device)
            module.register_forward_hook(self._hook(stack))
        return self.layers[path]

    def _hook(self, stack: _Stack):
        def add_adapters(module, args, output):
            if self.route is None:
                return output
            return output + stack.delta(args[0], self.route).to(output.dtype)

        return add_adapters

    @contextmanager
    def routing(self, names: list[str | None]) -> Iterator[None]:
        """Row b of every forward inside goes through adapter names[b] (None: the base alone)."""
        slots = [self.slots[n] if n else 0 for n in names]
        if not any(slots):
            yield
            return
        self.route = _Route(slots, self.device)
        try:
            yield
        finally:
            self.route = None


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A [r, in], B [out, r])} from PEFT's saved keys."""
    pairs = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if key.endswith(".bias"):
                raise AdapterFormatError(
                    f"{key}: trained biases (lora.bias: all or lora_only) change the base per adapter; retrain with "
                    "lora.bias: none"
                )
            if ".lora_B." not in key:
                raise AdapterFormatError(f"a tensor this op does not compute: {key}")
            continue
        path = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterFormatError(f"{path}: lora_A and lora_B do not pair up as [r, in] and [out, r]")
        pairs[path] = (a, b)
    return pairs
