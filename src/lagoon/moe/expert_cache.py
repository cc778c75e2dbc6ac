"""`ExpertCache`: a fixed number of one MoE layer's experts resident in fast memory, and who to evict.

A cache has ``capacity`` slots, each a ``gate_up [2I, H]`` / ``down [H, I]`` pair preallocated on
the compute device. A slot is empty, *loading* (its bytes are being written; nobody may read it) or
*ready*; ``pins`` counts the readers of a ready slot (a pinned slot is never chosen for eviction,
which is what keeps a reader from seeing torn weights). All state changes happen under the owning
`ExpertOffload`'s lock; this class only keeps the books and picks victims.

Eviction policies (registry ``POLICIES``; the victim is the unpinned ready slot with the lowest key,
empty slots first):

==========  ===========================================================  ==========================
policy      key                                                          behaves like
==========  ===========================================================  ==========================
``lru``     last use                                                     mixtral-offloading's cache
``lfu``     (uses, last use)                                             pure frequency
``lrfu``    (Σ 2^(−age/half_life) over past uses, last use)              LRU ↔ LFU blend (default)
==========  ===========================================================  ==========================

Use history is kept per expert, also while it is not resident. ``lrfu`` (Lee et al., 1999) is the default because routing is heavy-tailed: a few experts of a
layer take most tokens for long stretches, and LRU alone throws a hot expert out after k cold ones
pass through (``NOTES.md``: LRU is a weak policy for MoE). Age is counted in calls of *this* layer,
with a half-life of ``LRFU_HALF_LIFE`` calls, so a burst of new experts cannot flush a hot one that
keeps being used, yet an expert that stopped being routed to fades within a few dozen tokens.

Not here: loading bytes (`lagoon.moe.expert_store`), threads or prefetch (`lagoon.moe.offload`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from lagoon.errors import ConfigError

__all__ = ["ExpertCache", "LayerStats", "POLICIES", "LRFU_HALF_LIFE"]

POLICIES = ("lru", "lfu", "lrfu")
LRFU_HALF_LIFE = 16.0  # layer calls
_DECAY = 0.5 ** (1.0 / LRFU_HALF_LIFE)


@dataclass
class LayerStats:
    """Counters of one offloaded layer (every expert a forward call needed is exactly one of
    hit / wait / miss)."""

    hits: int = 0  # needed and ready in the cache
    waits: int = 0  # needed while a prefetch was still loading it: waited, no load of our own
    misses: int = 0  # needed, absent: loaded synchronously on demand
    prefetch_loads: int = 0  # loaded ahead of need (background thread or speculative guess)
    prefetch_used: int = 0  # of those, later needed before being evicted
    bytes_loaded: int = 0  # every byte copied from the store (misses + prefetches)
    spec_actual: int = 0  # experts needed by calls that had a speculative guess
    spec_correct: int = 0  # of those, how many the guess named

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ExpertCache:
    """Slots and bookkeeping for one layer's resident experts (see the module docstring)."""

    def __init__(
        self, layer: int, num_experts: int, capacity: int, gate_up_shape: tuple[int, int],
        down_shape: tuple[int, int], *, dtype: torch.dtype, device: torch.device | str, policy: str = "lrfu",
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown expert cache policy {policy!r}; valid: {', '.join(POLICIES)}")
        if capacity < 1:
            raise ConfigError(f"expert cache capacity must be >= 1 (got {capacity}); set moe.offload.capacity")
        capacity = min(capacity, num_experts)
        self.layer, self.num_experts, self.capacity, self.policy = layer, num_experts, capacity, policy
        self.gate_up = torch.empty(capacity, *gate_up_shape, dtype=dtype, device=device)  # [C, 2I, H]
        self.down = torch.empty(capacity, *down_shape, dtype=dtype, device=device)  # [C, H, I]
        self.expert = [-1] * capacity  # slot -> expert (-1 empty)
        self.where: dict[int, int] = {}  # expert -> slot (ready or loading)
        self.ready = [False] * capacity
        self.pins = [0] * capacity
        self.prefetched = [False] * capacity  # loaded by a prefetch and not used since
        self.prefetch_clock = [-1] * capacity  # the layer clock the prefetch was made for
        self.free_event: list[Any] = [None] * capacity  # CUDA: readers' last kernel on the slot
        # use history per *expert*, kept across evictions: a hot expert that a scan pushed out
        # comes back with its frequency intact (LRFU/LFU would otherwise restart it at zero)
        self.last = [0.0] * num_experts
        self.uses = [0] * num_experts
        self.score = [0.0] * num_experts
        self.clock = 0  # forward calls of this layer
        self.guess: set[int] | None = None  # the speculative guess for the next call
        self.stats = LayerStats()

    @property
    def expert_bytes(self) -> int:
        return self.gate_up[0].nbytes + self.down[0].nbytes

    def resident(self) -> list[int]:
        """Experts whose slot is ready, by slot."""
        return [e for s, e in enumerate(self.expert) if e >= 0 and self.ready[s]]

    def _key(self, s: int) -> tuple[float, float]:
        e = self.expert[s]
        if self.policy == "lru":
            return (self.last[e], 0.0)
        if self.policy == "lfu":
            return (float(self.uses[e]), self.last[e])
        return (self.score[e] * _DECAY ** (self.clock - self.last[e]), self.last[e])

    def victim(self, *, for_prefetch: bool = False) -> int | None:
        """An evictable slot (empty first, then the lowest policy key), or None if all are busy.

        A prefetch never evicts another prefetch made for the same coming call (it would undo it).
        """
        best, best_key = None, None
        for s in range(self.capacity):
            if self.pins[s] or (for_prefetch and self.prefetched[s] and self.prefetch_clock[s] == self.clock):
                continue
            if self.expert[s] < 0:
                return s
            if not self.ready[s]:
                continue
            key = self._key(s)
            if best_key is None or key < best_key:
                best, best_key = s, key
        return best

    def claim(self, s: int, expert: int, *, prefetch: bool) -> None:
        """Give slot `s` to `expert`, loading (not readable) and pinned by the loader."""
        old = self.expert[s]
        if old >= 0:
            del self.where[old]
        self.expert[s], self.where[expert] = expert, s
        self.ready[s], self.pins[s], self.prefetched[s] = False, 1, prefetch
        self.prefetch_clock[s] = self.clock if prefetch else -1

    def use(self, s: int) -> None:
        """Record a use of slot `s`'s expert now (policy bookkeeping)."""
        e = self.expert[s]
        self.score[e] = self.score[e] * _DECAY ** (self.clock - self.last[e]) + 1.0
        self.last[e] = float(self.clock)
        self.uses[e] += 1
