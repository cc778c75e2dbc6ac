"""The decoding loop: a `Scheduler` that prefills each admitted request, then decodes every active
request together in one batched forward per step, and `TextStream`, which turns a request's token
ids into text pieces (incremental detokenisation, stop strings, finish reason).

The process's compute thread (`lagoon.engine.compute`) runs every scheduler's steps and so owns
the model and the KV cache; callers `submit` and read their request's queue, so concurrent requests
share decode steps. A request is admitted when the cache has room for
its prompt plus `max_new_tokens`; otherwise it waits.

Every forward runs inside `lagoon.quant.policy.token_types`: prompt tokens carry the types given to
`submit` (from the chat messages they came from; CONTEXT when none are given), decoded tokens are
REASONING. A request with a grammar (`lagoon.engine.grammar.GrammarMatcher`) samples inside that
grammar's token mask, in the same batch as unconstrained ones, and ends when the grammar is complete.
Quantized layers with activation scales use the tags to choose static (calibrated) or
dynamic per-token scales; float layers ignore them. `cancel` (a stop string, a disconnected
client) ends a request at the next step and frees its cache. This module is *not* the HTTP layer
(see `lagoon.engine.server`).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lagoon.engine import compute
from lagoon.engine.compile import DecodeStep
from lagoon.engine.grammar import GrammarMatcher
from lagoon.engine.sampling import (
    SamplingParams,
    TokenLogprob,
    greedy_picks,
    make_generator,
    sample,
    token_logprobs,
)
from lagoon.errors import BadRequestError, ContextWindowExceededError, LagoonError
from lagoon.quant.policy import TokenType, reasoning_types, token_types

__all__ = ["Scheduler", "Request", "TextStream"]

log = logging.getLogger("lagoon.engine")
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    events: queue.Queue = field(default_factory=queue.Queue)  # int token ids, then ("done", reason) or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    prompt_types: torch.Tensor | None = None  # [len(prompt_ids)] TokenType codes
    grammar: GrammarMatcher | None = None  # constrained decoding: the allowed next tokens
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id when params.logprobs is set

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Runs `model` over `cache` on the compute thread; `submit` returns a `Request` to read."""

    def __init__(
        self, model: torch.nn.Module, cache, *, max_batch: int, eos_ids: Sequence[int],
        on_token: Callable[[Request, float], None] | None = None,
        on_step: Callable[[], None] | None = None, step: DecodeStep | None = None,
    ) -> None:
        self.model, self.cache, self.max_batch = model, cache, max_batch
        # the decode forward: compiled from outside (lagoon.engine.compile) or, by default, eager
        self.step = step or DecodeStep(model, cache, max_batch=max_batch, compile=False)
        self.eos_ids = frozenset(eos_ids)
        self.on_token = on_token
        self.on_step = on_step  # between steps: MoE routing state changes only here
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.pending: list[Request] = []
        self.active: list[Request] = []
        self._stop = False
        compute.attach(self._tick)

    # ------------------------------------------------------------------ API
    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, prompt_types: Sequence[int] | None = None,
        grammar: GrammarMatcher | None = None,
    ) -> Request:
        """Queue a request; `prompt_types` tags each prompt token (TokenType codes, default CONTEXT);
        `grammar` constrains what it may generate."""
        need = len(prompt_ids) + params.max_new_tokens
        if not prompt_ids:
            raise BadRequestError("the prompt is empty")
        if prompt_types is not None and len(prompt_types) != len(prompt_ids):
            raise BadRequestError(
                f"prompt_types has {len(prompt_types)} entries for {len(prompt_ids)} prompt tokens; give one per token"
            )
        if need > self.cache.max_seq_len:
            raise ContextWindowExceededError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                f"engine's window of {self.cache.max_seq_len}; shorten the prompt or lower max_tokens",
                needed=need, window=self.cache.max_seq_len,
            )
        req = Request(list(prompt_ids), params, grammar=grammar)
        types = [int(TokenType.CONTEXT)] * len(prompt_ids) if prompt_types is None else [int(t) for t in prompt_types]
        if any(t not in TokenType._value2member_map_ for t in types):
            raise BadRequestError(f"prompt_types must be TokenType codes {[(m.name, int(m)) for m in TokenType]}")
        req.prompt_types = torch.tensor(types, dtype=torch.int64)
        req.generator = None if params.greedy else make_generator(params.seed)
        self.waiting.put(req)
        compute.wake()
        return req

    def close(self) -> None:
        self._stop = True
        compute.detach(self._tick)

    @property
    def running(self) -> bool:
        """Whether the worker still decodes (False once closed, or if the compute thread died)."""
        return not self._stop and compute.alive()

    @property
    def load(self) -> int:
        return self.waiting.qsize() + len(self.pending) + len(self.active)

    # ------------------------------------------------------------------ worker
    def _tick(self) -> bool:
        """One scheduler step on the compute thread; True while requests are in flight."""
        if self._stop:
            return False
        try:
            self._admit()
            busy = bool(self.active)
            if busy:
                self._decode()
            if self.on_step is not None:
                self.on_step()
            return busy or bool(self.pending)
        except Exception as exc:  # never let the worker die silently: fail the requests in flight
            log.exception("engine step failed")
            for req in self.active + self.pending:
                self._finish(req, None, exc)
            self.active, self.pending = [], []
            return False

    def _admit(self) -> None:
        while True:
            try:
                self.pending.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        still: list[Request] = []
        for req in self.pending:
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
                continue
            need = len(req.prompt_ids) + req.params.max_new_tokens
            # blocks the running requests will still take, so admission never overcommits the pool
            growth = sum(self.cache.growth(r.id, len(r.prompt_ids) + r.params.max_new_tokens) for r in self.active)
            if len(self.active) < self.max_batch and self.cache.can_admit(need, growth):
                try:
                    self._prefill(req)
                except Exception as exc:  # this request fails alone; the batch carries on
                    log.exception("prefill failed")
                    if req in self.active:
                        self.active.remove(req)
                    self.cache.free(req.id)
                    self._finish(req, None, exc)
            else:
                still.append(req)
        self.pending = still

    def _prefill(self, req: Request) -> None:
        ids = req.prompt_ids
        n_cached = self.cache.allocate(req.id, ids)
        req.cached_tokens = n_cached
        self.cache.ensure(req.id, len(ids))
        tokens = torch.tensor([ids[n_cached:]])  # [1, T]
        pos = torch.arange(n_cached, len(ids))[None]  # [1, T]
        self.cache.prepare([req.id], pos)
        with token_types(req.prompt_types[n_cached:]):
            logits = self.model(tokens, pos, self.cache, last_only=True)  # [1, 1, V]
        self.active.append(req)
        self._emit(req, logits[0, -1])

    def _decode(self) -> None:
        batch = list(self.active)  # _emit may retire requests from self.active
        for req in batch:
            self.cache.ensure(req.id, len(req.prompt_ids) + len(req.output_ids))
        tokens = torch.tensor([r.output_ids[-1] for r in batch]).view(-1, 1)  # [B, 1]
        pos = torch.tensor([len(r.prompt_ids) + len(r.output_ids) - 1 for r in batch]).view(-1, 1)  # [B, 1]
        with token_types(reasoning_types(len(batch))):
            logits = self.step([r.id for r in batch], tokens, pos)  # [B, V]
        # every unconstrained greedy row's pick in one reduction (what `sample` picks, row by row)
        picks = (greedy_picks(logits) if any(r.params.greedy and r.grammar is None for r in batch)
                 else [None] * len(batch))
        for i, req in enumerate(batch):
            self._emit(req, logits[i], picks[i])

    def _emit(self, req: Request, logits: torch.Tensor, greedy_pick: int | None = None) -> None:
        now = time.perf_counter()
        if req.cancelled.is_set():
            self._retire(req, "cancelled")
            return
        try:
            allowed = None if req.grammar is None else req.grammar.allowed(logits.shape[-1])  # [V]
            if greedy_pick is not None and req.params.greedy and allowed is None:
                tok = greedy_pick
            else:
                tok = sample(logits, req.params, req.generator, allowed)
            is_eos = tok in self.eos_ids and not req.params.ignore_eos
            if req.grammar is not None and not is_eos:
                req.grammar.accept(tok)
        except LagoonError as exc:  # this request's constraint failed alone; the batch carries on
            self._retire(req, None, exc)
            return
        req.output_ids.append(tok)
        if req.params.logprobs is not None:
            req.logprobs.append(token_logprobs(logits, tok, req.params.logprobs))
        if req.first_token_at is None:
            req.first_token_at = now
        if self.on_token is not None:
            self.on_token(req, now)
        req.events.put(tok)
        if is_eos or (req.grammar is not None and req.grammar.done):
            self._retire(req, "stop")
        elif len(req.output_ids) >= req.params.max_new_tokens:
            self._retire(req, "length")

    def _retire(self, req: Request, reason: str | None, exc: Exception | None = None) -> None:
        if req in self.active:
            self.active.remove(req)
        # the cache holds KV for prompt + all but the last sampled token
        self.cache.free(req.id, req.prompt_ids + req.output_ids[:-1])
        self._finish(req, reason, exc)

    @staticmethod
    def _finish(req: Request, reason: str | None, exc: Exception | None = None) -> None:
        req.events.put(exc if exc is not None else ("done", reason))


def incremental_decoder(tokenizer: Any) -> Callable[[int], str | None] | None:
    """One request's incremental decoder over a transformers tokenizer: `tokenizers`' DecodeStream
    (the text one more id adds, special tokens skipped; None while a UTF-8 sequence is incomplete).
    None for a tokenizer without a `tokenizers` backend (a slow one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # transformers' fast tokenizers have one
    if backend is None:
        return None
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    return lambda token_id: stream.step(backend, token_id)


class TextStream:
    """Iterate a request's text pieces; afterwards `finish_reason`, `text` and `output_ids` hold.

    With `step` (an incremental decoder: one id in, the new text out, None while a UTF-8 sequence
    is incomplete — `tokenizers`' DecodeStream) each token costs O(1); without it the ids decoded
    so far are decoded again per token. `decode` still renders the final text once at the end."""

    def __init__(self, req: Request, decode: Callable[[list[int]], str], eos_ids: frozenset[int], timeout: float = 600,
                 step: Callable[[int], str | None] | None = None):
        self.req, self.decode, self.eos_ids, self.timeout, self.step = req, decode, eos_ids, timeout, step
        self._decoded = ""  # the text of every id so far (with `step`)
        self.text = ""
        self.finish_reason: str | None = None
        self.ids: list[int] = []

    @property
    def output_ids(self) -> list[int]:
        return self.ids

    def __iter__(self) -> Iterator[str]:
        stops = self.req.params.stop
        hold = max((len(s) for s in stops), default=1) - 1
        emitted = 0
        while True:
            try:
                ev = self.req.events.get(timeout=self.timeout)
            except queue.Empty as exc:
                self.req.cancel()
                raise LagoonError("the engine produced nothing within the timeout") from exc
            if isinstance(ev, Exception):
                raise ev
            if isinstance(ev, tuple):
                if self.finish_reason is None:
                    self.finish_reason = "stop" if ev[1] == "cancelled" else ev[1]
                    self.text = self.decode(self.ids)  # flush a held-back tail
                if emitted < len(self.text):
                    yield self.text[emitted:]
                return
            if self.finish_reason is not None:
                continue  # draining after a stop string
            if ev in self.eos_ids and not self.req.params.ignore_eos:
                continue
            self.ids.append(ev)
            if self.step is not None:
                piece = self.step(ev)
                if piece is None:
                    continue  # an incomplete UTF-8 sequence; wait for the rest
                text = self._decoded = self._decoded + piece
            else:
                text = self.decode(self.ids)
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence; wait for the rest
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = text[:cut], "stop"
                self.req.cancel()
                continue
            self.text = text
            safe = len(text) - hold if stops else len(text)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
