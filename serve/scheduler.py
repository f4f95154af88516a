"""Iteration-level scheduling for the HF engine: a request joins the running batch at the next decoding step and
leaves it at its own end.

The replica's model thread (`serve.model_thread`) runs the loop. Each turn it
1. prefills the requests that arrived since the last turn, together (left-padded), and gives each its first token;
2. merges their KV caches into the running batch's;
3. runs one decoding step for every running row, each row through its own adapter (`serve.multi_lora`) and
   sampled by its own request's settings (`serve.sampling`); a row that ends leaves the batch at once.
No request waits for another to finish, and nothing waits for a batch to fill.

Written here rather than on transformers' `ContinuousBatchingManager`: that packs every request's tokens into one
row ([1, tokens], paged attention), while the multi-LoRA op routes by batch row, and it has no per-request seed or
grammar. The KV cache is transformers' `DynamicCache`, its rows left-padded to one length: joining concatenates
rows, leaving selects the rest and drops the columns no row uses any more.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from jobs.prompting import Prompting
from serve.generation import Delta, GenRequest, RowText, logprob_of
from serve.grammar import Grammars
from serve.model_thread import ModelThread
from serve.multi_lora import MultiLora
from serve.sampling import RowSampler, pick_tokens

log = logging.getLogger("ray.serve")


def can_schedule(model: torch.nn.Module, kind: str) -> bool:
    """Whether the step loop serves this model: a causal model whose KV cache is plain per-layer keys and values
    (sliding windows, linear attention and encoder-decoders keep the static path)."""
    if kind != "causal":
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


@dataclass(eq=False)
class Ticket:
    """One request in the scheduler: where its deltas go, and the exception that ends it early."""

    request: GenRequest
    emit: Callable[[Delta | Exception], None]
    cancelled: bool = False
    live: int = 0  # its choices still generating
    holds: str | None = None  # the adapter kept loaded for it until it ends


@dataclass(eq=False)
class Row:
    """One choice of a request in the running batch."""

    ticket: Ticket
    sampler: RowSampler
    choice: int
    text: RowText
    last: int = 0  # the token the next step feeds
    length: int = 0  # this row's tokens in the KV cache


@dataclass
class KvBatch:
    """Rows' KV cache, left-padded to one length, and the mask [rows, columns] that hides each row's padding."""

    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None

    def join(self, other: KvBatch) -> None:
        if other.cache is None:
            return
        if self.cache is None:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(0).int().argmax())  # columns before this are every kept row's padding
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zero columns before it up to `width` (keys and values: [rows, heads, columns, dim]; masks:
    [rows, columns])."""
    missing = width - (tensor.shape[2] if tensor.dim() == 4 else tensor.shape[1])
    if not missing:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0) if tensor.dim() == 4 else (missing, 0))


@dataclass
class Scheduler:
    """The step loop over one model; `submit` from any thread, deltas come back through each ticket's `emit`."""

    model: torch.nn.Module
    lora: MultiLora
    prompting: Prompting
    eos: set[int]
    grammars: Grammars
    thread: ModelThread  # runs the turns; adapters load and unload between them
    max_rows: int
    ensure_adapter: Callable[[str], None]  # loads an adapter the multiplexer evicted before its request ran
    on_error: Callable[[Exception], Exception]  # what the requests of a failed turn receive
    waiting: list[Ticket] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    batch: KvBatch = field(default_factory=KvBatch)

    def __post_init__(self):
        self.arrivals = threading.Lock()
        self.device = next(self.model.parameters()).device
        self.thread.work = self._next_turn

    def submit(self, request: GenRequest, emit: Callable[[Delta | Exception], None]) -> Ticket:
        ticket = Ticket(request, emit)
        with self.arrivals:
            self.waiting.append(ticket)
        self.thread.wake()
        return ticket

    def _next_turn(self) -> bool:
        """One turn if there is anything to do; whether there is more."""
        with self.arrivals:
            arrived = [t for t in self.waiting if not t.cancelled]
            self.waiting.clear()
        if arrived or self.rows:
            self._turn(arrived)
        return bool(self.rows or self.waiting)

    def _turn(self, arrived: list[Ticket]) -> None:
        later: list[Ticket] = []
        try:
            with torch.inference_mode():
                self._leave([i for i, row in enumerate(self.rows) if not row.ticket.cancelled])
                admitted, later = self._admissible(arrived)
                if admitted:
                    self._prefill(admitted)
                if self.rows:
                    self._decode()
        except Exception as exc:  # the turn's requests end with it; later arrivals start afresh
            failed = {row.ticket for row in self.rows} | set(arrived)
            log.exception("generation failed for %d request(s)", len(failed))
            failure = self.on_error(exc)
            self._leave([])
            for ticket in failed:
                self._end(ticket)
                ticket.emit(failure)
            later = []
        with self.arrivals:
            self.waiting[:0] = later

    def _admissible(self, arrived: list[Ticket]) -> tuple[list[Ticket], list[Ticket]]:
        """The arrivals that fit in the batch now (a request wider than the batch runs alone), and the rest."""
        room = self.max_rows - len(self.rows)
        admitted, later = [], []
        for ticket in arrived:
            n = ticket.request.n
            if n <= room or (not self.rows and not admitted):
                if self._adapter_ready(ticket):
                    admitted.append(ticket)
                    room -= n
            else:
                later.append(ticket)
        return admitted, later

    def _adapter_ready(self, ticket: Ticket) -> bool:
        name = ticket.request.adapter
        if name:
            try:
                self.ensure_adapter(name)
            except Exception as exc:  # this request's adapter, not the batch's problem
                ticket.emit(exc)
                return False
            self.lora.hold(name)
            ticket.holds = name
        return True

    def _prefill(self, tickets: list[Ticket]) -> None:
        """The arrivals' prompts in one forward pass; each row's first token; the rows that go on join the batch."""
        rows = []
        for ticket in tickets:
            req = ticket.request
            sampler = RowSampler(
                req, self.grammars.matchers(req.response_format, req.n) if req.response_format else None
            )
            rows += [Row(ticket, sampler, c, RowText(req, self.prompting.tokenizer, self.eos)) for c in range(req.n)]
            ticket.live = req.n
        inputs = self.prompting.pad_for_generation([r.ticket.request.prompt_ids for r in rows]).to(self.device)
        mask = inputs["attention_mask"]
        cache = DynamicCache(config=self.model.config)
        with self.lora.routing([r.ticket.request.adapter for r in rows]):
            logits = self.model(
                input_ids=inputs["input_ids"],
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        for row, length in zip(rows, mask.sum(1).tolist(), strict=True):
            row.length = length
        joining = KvBatch(cache, mask)
        going_on = self._advance(rows, logits)
        for row in (rows[i] for i in set(range(len(rows))) - set(going_on)):
            self._retire(row)
        joining.keep(going_on)
        self.rows += [rows[i] for i in going_on]
        self.batch.join(joining)

    def _decode(self) -> None:
        """One new token for every running row."""
        mask = torch.nn.functional.pad(self.batch.mask, (0, 1), value=1)
        with self.lora.routing([r.ticket.request.adapter for r in self.rows]):
            logits = self.model(
                input_ids=torch.tensor([[r.last] for r in self.rows], device=self.device),
                attention_mask=mask,
                position_ids=torch.tensor([[r.length] for r in self.rows], device=self.device),
                past_key_values=self.batch.cache,
                use_cache=True,
            ).logits[:, -1]
        self.batch.mask = mask
        for row in self.rows:
            row.length += 1
        self._leave(self._advance(self.rows, logits))

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits, sent on as text; the indices of the rows that go on."""
        going_on = []
        picked = pick_tokens(logits, [(row.sampler, row.choice) for row in rows])
        for i, (row, (token, dist)) in enumerate(zip(rows, picked, strict=True)):
            k = row.ticket.request.logprobs
            entry = logprob_of(dist, token, k, self.prompting.tokenizer) if dist is not None else None
            delta = row.text.advance(token, entry)
            if delta is not None:
                delta.index = row.choice
                row.ticket.emit(delta)
            row.last = token
            if row.text.finished is None:
                going_on.append(i)
        return going_on

    def _leave(self, staying: list[int]) -> None:
        """Keep only the rows at `staying`; the others leave the batch (ended, cancelled or failed)."""
        if len(staying) == len(self.rows):
            return
        kept = set(staying)
        for row in (row for i, row in enumerate(self.rows) if i not in kept):
            self._retire(row)
        self.rows = [self.rows[i] for i in staying]
        self.batch.keep(staying)

    def _retire(self, row: Row) -> None:
        row.ticket.live -= 1
        if row.ticket.live <= 0:
            self._end(row.ticket)

    def _end(self, ticket: Ticket) -> None:
        """The request generates no more: its adapter may be evicted."""
        if ticket.holds:
            self.lora.release(ticket.holds)
            ticket.holds = None
