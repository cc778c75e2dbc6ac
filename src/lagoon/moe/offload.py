"""Expert offloading: every `SparseMoE` layer keeps only ``capacity`` experts resident and reads the
others from a slower tier on demand, optionally prefetching the ones it expects next.

`offload_model(model, capacity, ...)` swaps each block's ``experts`` for an `OffloadedExperts` (same
``forward(x, indices, weights, plan)`` signature, same math: one ``F.linear`` pair per expert
segment, so outputs equal the resident model's) and returns the `ExpertOffload` that owns the
caches (`lagoon.moe.expert_cache`), the store (`lagoon.moe.expert_store`: ``host`` = pinned host
memory for a GPU cache, ``disk`` = a memory-mapped safetensors file) and the prefetch thread.

A forward call of layer L: pin the needed experts that are ready (hits), wait for the ones a
prefetch is loading (waits), load the rest synchronously into evicted slots (misses), run each
expert's segment, unpin. Readers pin, loaders write only unpinned slots they hold in the *loading*
state, all under one lock — so no reader ever sees a half-written expert.

What gets prefetched for the next MoE layer L+1 (``model_deployment.inference``):

==========================  ==========================  ===============================================
``speculative_routing``     ``async_expert_prefetch``   behaviour
==========================  ==========================  ===============================================
off                         off                         nothing: loads are synchronous, on demand
off                         on                          history guess (the layer-L → L+1 co-activation
                                                        counts of past tokens, MoE-Infinity's idea),
                                                        loaded on a background thread after L routes
on                          off                         router guess (below), loaded at once on the
                                                        calling thread: no overlap, fewer misses
on                          on                          router guess, loaded on the background thread
                                                        while layer L's experts compute
==========================  ==========================  ===============================================

The router guess (the mixtral-offloading paper's trick): apply layer L+1's norm and router to layer
L's residual stream after attention (a pre-hook on ``layers[L].post_attention_layernorm`` of a
`lagoon.model.Transformer`; for bare stacks of MoE blocks, to layer L's MoE input). Its accuracy —
the fraction of the experts L+1 actually needed that the guess named — is in `stats()`.
A guess names at most ``capacity`` experts (most-chosen first); stale requests (the target layer
already ran) are dropped. Quantized experts cannot be offloaded yet (UnsupportedModelError).
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.errors import UnsupportedModelError
from lagoon.moe.dispatch import DispatchPlan, plan_dispatch
from lagoon.moe.expert_cache import ExpertCache, LayerStats
from lagoon.moe.expert_store import ExpertStore, make_store
from lagoon.moe.experts import GLU, StackedExperts, activation
from lagoon.moe.layer import SparseMoE

__all__ = ["ExpertOffload", "OffloadedExperts", "offload_model", "offload_of"]

log = logging.getLogger("lagoon.moe.offload")


class OffloadedExperts(nn.Module):
    """Drop-in for `lagoon.moe.Experts` whose weights live in an `ExpertOffload`."""

    def __init__(self, layer: int, num_experts: int, hidden_size: int, intermediate_size: int, act: str,
                 offload: ExpertOffload) -> None:
        super().__init__()
        self.layer, self.num_experts = layer, num_experts
        self.hidden_size, self.intermediate_size, self.act = hidden_size, intermediate_size, act
        self.act_fn = activation(act)
        self.glu = GLU(act)
        self.gate_up_bias: torch.Tensor | None = None  # [E, 2I] and [E, H]: small, kept resident
        self.down_bias: torch.Tensor | None = None
        self.offload = offload
        self.spec_hooked = False  # True when a Transformer hook speculates for the next layer

    @property
    def expert_numel(self) -> int:
        """Parameters of one expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.intermediate_size

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan | None = None
    ) -> torch.Tensor:
        # T = tokens, H = hidden, I = intermediate, S = kept slots
        off = self.offload
        if plan is None:
            plan = plan_dispatch(indices, self.num_experts)
        if off.speculative and not self.spec_hooked:
            off.speculate(self.layer + 1, x)
        off.after_routing(self.layer, indices)
        xs = x[plan.tokens]  # [S, H] grouped by expert
        ws = weights.reshape(-1)[plan.order]  # [S]
        counts = plan.counts_kept.tolist()
        ends = plan.offsets.tolist()
        ys = xs.new_empty(xs.shape[0], self.hidden_size)  # [S, H]
        for e, gate_up, down in off.experts(self.layer, [e for e, n in enumerate(counts) if n]):
            a, b = ends[e] - counts[e], ends[e]
            gub, db = (None, None) if self.gate_up_bias is None else (self.gate_up_bias[e], self.down_bias[e])
            gate, up = F.linear(xs[a:b], gate_up, gub).chunk(2, dim=-1)  # [n, I] each
            ys[a:b] = F.linear(self.glu(gate, up), down, db)  # [n, H]
        ys = ys * ws.unsqueeze(-1).to(ys.dtype)
        t, k = indices.shape
        slots = ys.new_zeros(t * k, ys.shape[-1]) if plan.dropped else ys.new_empty(t * k, ys.shape[-1])
        slots.index_copy_(0, plan.order, ys)  # [T*k, H]
        return slots.view(t, k, -1).sum(dim=1).to(x.dtype)  # [T, H]

    def extra_repr(self) -> str:
        c = self.offload.caches[self.layer]
        return f"num_experts={self.num_experts}, capacity={c.capacity}, policy={c.policy}"


class ExpertOffload:
    """Caches, store, prefetch thread and counters of an offloaded model (see the module docstring)."""

    def __init__(self, caches: list[ExpertCache], store: ExpertStore, routers: list[Any], *,
                 async_prefetch: bool = False, speculative: bool = False, tier: str = "host") -> None:
        self.caches, self.store, self.routers = caches, store, routers
        self.async_prefetch, self.speculative, self.tier = async_prefetch, speculative, tier
        self.cond = threading.Condition()
        self.telemetry: Any = None
        self.labels: dict[str, str] = {}
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._prev_indices: list[torch.Tensor | None] = [None] * len(caches)
        self._coact = [torch.zeros(c.num_experts, n.num_experts) for c, n in zip(caches, caches[1:], strict=False)]
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._cuda = caches[0].gate_up.device.type == "cuda" if caches else False
        self._copy_stream = torch.cuda.Stream(caches[0].gate_up.device) if self._cuda else None
        self._calls = 0
        if async_prefetch:  # the thread holds only a weak reference: a dropped model stops it
            self._worker = threading.Thread(target=_work, args=(weakref.ref(self), self._queue),
                                            name="lagoon-expert-prefetch", daemon=True)
            self._worker.start()
            weakref.finalize(self, self._queue.put, None)

    # ------------------------------------------------------------------ demand path (calling thread)
    def experts(self, layer: int, need: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(expert, gate_up [2I, H], down [H, I])`` for each of `need`, each resident and
        pinned while the caller uses it (ready ones first, so loads never evict them)."""
        cache = self.caches[layer]
        with self.cond:
            cache.clock += 1
            if cache.guess is not None:
                cache.stats.spec_actual += len(need)
                cache.stats.spec_correct += len(cache.guess.intersection(need))
                cache.guess = None
            ready = [e for e in need if e in cache.where and cache.ready[cache.where[e]]]
            for e in ready:
                cache.pins[cache.where[e]] += 1
        held = set(ready)
        order = ready + [e for e in need if e not in held]
        try:
            for e in order:
                s = self._acquire(cache, e, pinned=e in held)
                held.discard(e)
                try:
                    yield e, cache.gate_up[s], cache.down[s]
                finally:
                    self._release(cache, s)
        finally:
            with self.cond:  # an abandoned iteration unpins what it still holds
                for e in held:
                    cache.pins[cache.where[e]] -= 1
                self.cond.notify_all()
        self._calls += 1
        if self.telemetry is not None and self._calls % 64 == 0:
            self.publish()

    def _acquire(self, cache: ExpertCache, e: int, *, pinned: bool) -> int:
        waited = False
        with self.cond:
            while True:
                s = cache.where.get(e)
                if s is not None and cache.ready[s]:
                    if not pinned:
                        cache.pins[s] += 1
                    if waited:
                        cache.stats.waits += 1
                    else:
                        cache.stats.hits += 1
                    if cache.prefetched[s]:
                        cache.stats.prefetch_used += 1
                        cache.prefetched[s] = False
                    cache.use(s)
                    return s
                if s is None and (v := cache.victim()) is not None:
                    cache.claim(v, e, prefetch=False)
                    break
                waited = True  # a prefetch is loading it, or every slot is busy: wait for a change
                self.cond.wait()
        try:
            nbytes = self._load(cache, e, v, on_copy_stream=False)
        except BaseException:
            self._abandon(cache, e, v)
            raise
        with self.cond:
            cache.ready[v] = True
            cache.stats.misses += 1
            cache.stats.bytes_loaded += nbytes
            cache.use(v)
            self.cond.notify_all()
        return v

    def _abandon(self, cache: ExpertCache, e: int, s: int) -> None:
        """A load failed: give the slot back empty (a reader waiting for `e` will load it itself)."""
        with self.cond:
            del cache.where[e]
            cache.expert[s], cache.pins[s], cache.prefetched[s] = -1, 0, False
            self.cond.notify_all()

    def _release(self, cache: ExpertCache, s: int) -> None:
        event = None
        if self._cuda:  # the slot's readers are queued kernels: loaders must wait for them
            event = torch.cuda.Event()
            event.record()
        with self.cond:
            cache.pins[s] -= 1
            cache.free_event[s] = event
            self.cond.notify_all()

    def _load(self, cache: ExpertCache, e: int, s: int, *, on_copy_stream: bool) -> int:
        if self._copy_stream is not None and on_copy_stream:
            with torch.cuda.stream(self._copy_stream):
                if cache.free_event[s] is not None:
                    self._copy_stream.wait_event(cache.free_event[s])
                n = self.store.read_into(cache.layer, e, cache.gate_up[s], cache.down[s])
            self._copy_stream.synchronize()
            return n
        return self.store.read_into(cache.layer, e, cache.gate_up[s], cache.down[s])

    # ------------------------------------------------------------------ prediction and prefetch
    @torch.no_grad()
    def speculate(self, layer: int, hidden: torch.Tensor) -> None:
        """Guess `layer`'s experts by running its router on `hidden` (already normed for it) and prefetch."""
        if not self.speculative or layer >= len(self.caches):
            return
        router, h = self.routers[layer], hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        if router.scoring == "softmax" and router.load_balance_weight == 0 and not router.n_group > 1 \
                and not bool(router.e_score_correction_bias.any()):
            # softmax is monotonic: the top-k logits are the router's choice (ties aside), for a
            # fraction of the full router's cost — this runs once per layer per decode step
            idx = F.linear(h, router.weight.to(h.dtype)).topk(router.top_k, dim=-1).indices  # [T, k]
        else:
            idx = router(h).indices  # [T, k]
        if idx.shape[0] == 1:
            guess = idx[0].tolist()[: self.caches[layer].capacity]
        else:
            guess = self._top(torch.bincount(idx.reshape(-1), minlength=self.caches[layer].num_experts),
                              self.caches[layer].capacity)
        with self.cond:
            self.caches[layer].guess = set(guess)
        self._prefetch(layer, guess)

    @torch.no_grad()
    def after_routing(self, layer: int, indices: torch.Tensor) -> None:
        """Learn the L-1 → L co-activations; without speculation, prefetch L+1's history guess."""
        if self.speculative or not self.async_prefetch:  # the history guess is not used
            return
        idx = indices.detach().cpu()  # [T, k]
        prev = self._prev_indices[layer - 1] if layer > 0 else None
        if prev is not None and prev.shape[0] == idx.shape[0]:
            e_next = self.caches[layer].num_experts
            pairs = prev[:, :, None] * e_next + idx[:, None, :]  # [T, k_prev, k]
            co = self._coact[layer - 1]
            co.view(-1).add_(torch.bincount(pairs.reshape(-1), minlength=co.numel()).to(co.dtype))
        self._prev_indices[layer] = idx
        if layer + 1 >= len(self.caches):
            return
        votes = self._coact[layer][idx.reshape(-1)].sum(dim=0)  # [E_next]
        want = min(self.caches[layer + 1].capacity, idx.numel())
        self._prefetch(layer + 1, [e for e in self._top(votes, want) if votes[e] > 0])

    @staticmethod
    def _top(votes: torch.Tensor, n: int) -> list[int]:
        order = torch.sort(votes, descending=True, stable=True)[1]  # ties -> lower expert id
        return [int(e) for e in order[: min(n, int((votes > 0).sum()))]]

    def _prefetch(self, layer: int, experts: list[int]) -> None:
        if not experts:
            return
        clock = self.caches[layer].clock
        if self.async_prefetch:
            self._queue.put((layer, experts, clock))
        else:
            for e in experts:
                self._prefetch_one(layer, e, clock)

    def _prefetch_one(self, layer: int, e: int, clock: int) -> None:
        cache = self.caches[layer]
        with self.cond:
            if cache.clock != clock or e in cache.where:  # stale (the layer ran) or already there
                return
            s = cache.victim(for_prefetch=True)
            if s is None:
                return
            cache.claim(s, e, prefetch=True)
        try:
            nbytes = self._load(cache, e, s, on_copy_stream=True)
        except BaseException:
            self._abandon(cache, e, s)
            raise
        with self.cond:
            cache.ready[s] = True
            cache.pins[s] -= 1
            cache.stats.prefetch_loads += 1
            cache.stats.bytes_loaded += nbytes
            self.cond.notify_all()

    def _run_request(self, layer: int, experts: list[int], clock: int) -> None:
        try:
            with torch.no_grad():
                for e in experts:
                    self._prefetch_one(layer, e, clock)
        except Exception:  # a failed prefetch only costs a miss later; keep the thread alive
            log.exception("prefetch of layer %d experts %s failed", layer, experts)

    # ------------------------------------------------------------------ reporting and lifetime
    def stats(self) -> dict[str, Any]:
        """Totals, rates and per-layer counters (JSON-able); also published to telemetry if attached."""
        with self.cond:
            layers = [c.stats.to_json() for c in self.caches]
        total = {k: sum(layer[k] for layer in layers) for k in LayerStats().to_json()}
        needed = total["hits"] + total["waits"] + total["misses"]
        out = {
            **total,
            "hit_rate": (total["hits"] + total["waits"]) / needed if needed else 0.0,
            "speculative_accuracy": total["spec_correct"] / total["spec_actual"] if total["spec_actual"] else 0.0,
            "prefetch_accuracy": total["prefetch_used"] / total["prefetch_loads"] if total["prefetch_loads"] else 0.0,
            "capacity": self.caches[0].capacity if self.caches else 0,
            "num_experts": self.caches[0].num_experts if self.caches else 0,
            "policy": self.caches[0].policy if self.caches else "",
            "tier": self.tier,
            "async_prefetch": self.async_prefetch,
            "speculative_routing": self.speculative,
            "layers": layers,
        }
        if self.telemetry is not None:
            self._publish(out)
        return out

    def reset_stats(self) -> None:
        with self.cond:
            for c in self.caches:
                c.stats = LayerStats()

    def attach_telemetry(self, telemetry: Any, **labels: str) -> ExpertOffload:
        """Publish ``lagoon_moe_offload_*`` gauges (labelled, e.g. ``variant=...``) every 64 calls."""
        self.telemetry, self.labels = telemetry, dict(labels)
        return self

    def publish(self) -> None:
        self.stats()

    def _publish(self, s: dict[str, Any]) -> None:
        for key in ("hits", "waits", "misses", "prefetch_loads", "bytes_loaded", "hit_rate",
                    "speculative_accuracy", "prefetch_accuracy"):
            self.telemetry.set(f"lagoon_moe_offload_{key}", float(s[key]), labels=self.labels,
                               doc=f"Expert offloading: {key.replace('_', ' ')} (all MoE layers)")

    def drain(self) -> None:
        """Block until the prefetch thread has handled everything queued so far."""
        if self._worker is not None:
            done = threading.Event()
            self._queue.put(done)
            done.wait()

    def close(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=10)
            self._worker = None
        self.store.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _work(ref: weakref.ReferenceType, requests: queue.SimpleQueue) -> None:
    """The prefetch thread: handle requests in order until None (close, or the manager was dropped)."""
    while True:
        item = requests.get()
        if item is None:
            return
        if isinstance(item, threading.Event):  # drain() marker: everything before it is done
            item.set()
            continue
        off = ref()
        if off is None:
            return
        off._run_request(*item)
        del off


def offload_model(
    model: nn.Module, capacity: int, *, tier: str = "host", policy: str = "lrfu", path: str | Path | None = None,
    async_prefetch: bool = False, speculative: bool = False, device: torch.device | str | None = None,
) -> ExpertOffload:
    """Offload the routed experts of every `SparseMoE` in `model` (in module order); returns the manager.

    `tier` ``host`` keeps the full experts in (pinned, if `device` is CUDA) host memory, ``disk``
    writes them to `path` (a folder; a temporary one when None) and memory-maps them. The model's
    own expert tensors are dropped. `device`: where the cache lives (default: the experts' device).
    """
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not blocks:
        raise UnsupportedModelError("the model has no SparseMoE layers: nothing to offload (a dense model?)")
    for i, b in enumerate(blocks):
        if not isinstance(b.experts, StackedExperts):
            raise UnsupportedModelError(
                f"MoE layer {i} holds {type(b.experts).__name__}; only float stacked experts can be offloaded "
                "(offload before quantizing is not supported either: load the float model)"
            )
    first = blocks[0].experts.gate_up_proj
    device = torch.device(device) if device is not None else first.device
    layers = [(b.experts.gate_up_proj.detach(), b.experts.down_proj.detach()) for b in blocks]
    tmpdir = None
    if tier == "disk":
        if path is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="lagoon-experts-")
            path = tmpdir.name
        path = Path(path) / "experts.safetensors"
    store = make_store(tier, layers, path=path, pin=device.type == "cuda")
    caches = [
        ExpertCache(i, b.num_experts, capacity, tuple(b.experts.gate_up_proj.shape[1:]),
                    tuple(b.experts.down_proj.shape[1:]), dtype=first.dtype, device=device, policy=policy)
        for i, b in enumerate(blocks)
    ]
    off = ExpertOffload(caches, store, [b.router for b in blocks], async_prefetch=async_prefetch,
                        speculative=speculative, tier=tier)
    off._tmpdir = tmpdir
    for i, b in enumerate(blocks):
        old = b.experts
        b.experts = OffloadedExperts(i, b.num_experts, old.hidden_size, old.intermediate_size, old.act, off)
        b.experts.glu = old.glu
        b.experts.gate_up_bias, b.experts.down_bias = old.gate_up_bias, old.down_bias
    _hook_speculation(model, blocks, off)
    return off


def _hook_speculation(model: nn.Module, blocks: list[SparseMoE], off: ExpertOffload) -> None:
    """In a `Transformer`, speculate for the next MoE layer from the residual after attention."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return
    index = {id(b): i for i, b in enumerate(blocks)}
    moe_layers = [(layer, index[id(layer.mlp)]) for layer in layers
                  if id(getattr(layer, "mlp", None)) in index and hasattr(layer, "post_attention_layernorm")]
    for (layer, i), (nxt, j) in zip(moe_layers, moe_layers[1:], strict=False):
        norm = nxt.post_attention_layernorm

        def hook(_mod: nn.Module, args: tuple, j: int = j, norm: nn.Module = norm) -> None:
            if off.speculative:  # .forward: the next norm's own hook must not fire here
                off.speculate(j, norm.forward(args[0]))

        layer.post_attention_layernorm.register_forward_pre_hook(hook)
        blocks[i].experts.spec_hooked = True


def offload_of(model: nn.Module) -> ExpertOffload | None:
    """The `ExpertOffload` managing `model`'s experts, or None when nothing is offloaded."""
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            return m.offload
    return None
