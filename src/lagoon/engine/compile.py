"""`DecodeStep`: the scheduler's decode forward (one new token per sequence), compiled from outside.

The model stays the plain `Transformer`; this module wraps its forward for T = 1 with
`torch.compile` (inductor, `fullgraph=True`), gpt-fast style:

- two graphs: batch 1 (static, what an agent runs) and batch 2+ (the batch dimension marked dynamic,
  what a server decoding several requests together runs); in both the attended length S is marked
  dynamic, so one graph serves every position. Batch 1 is compiled when the engine starts
  (`warm_up`), batch 2+ on first use (one stall, announced on the terminal, cached for later
  starts). The warm-up writes only the cache's scratch row / block;
- the KV cache writes are in-place `index_put_` on one tensor per layer, which inductor keeps in
  place; the cache's bookkeeping (rows, block tables, mask) runs eagerly in `cache.prepare`;
- compiled artefacts (inductor's FX-graph and kernel caches) live under
  ``~/.cache/lagoon/compile/<key>``, the key hashing torch's version, the CPU's vector ISA and the
  model's tensor names / shapes / dtypes, so a second start loads them instead of compiling;
- any failure (tracing, compiling, loading a corrupt cache entry) is logged with its reason, the
  cache entry is cleared, and that graph's batches run eagerly from then on: never worse than eager.

`LAGOON_CACHE_DIR` moves the cache root. This module is *not* a scheduler (see `generate`) and
does not choose kernels (see `lagoon.engine.kernels`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lagoon.engine.kernels import cpu_isa

__all__ = ["DecodeStep", "cache_root", "compile_key", "compile_enabled"]

log = logging.getLogger("lagoon.engine")

# round bf16 intermediates where eager rounds them, so greedy tokens match the eager model's
_INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def cache_root() -> Path:
    """Where Lagoon keeps compiled and repacked artefacts (`LAGOON_CACHE_DIR`, else ~/.cache/lagoon)."""
    env = os.environ.get("LAGOON_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lagoon"


def compile_enabled(config) -> bool:
    """`engine.compile`; when unset, on unless `LAGOON_COMPILE=0` (the default test run sets it)."""
    if config.compile is not None:
        return bool(config.compile)
    return os.environ.get("LAGOON_COMPILE", "1").strip() not in ("0", "false", "off", "no")


def compile_key(model: torch.nn.Module, device: torch.device) -> str:
    """Hash of what a compiled step depends on: torch, CPU ISA / device, the model's tensors."""
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{cpu_isa()}|{device}|{type(model).__name__}".encode())
    for name, t in _tensors(model):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for name, mod in model.named_modules():
        h.update(f"{name}={type(mod).__name__};".encode())
    return h.hexdigest()[:20]


def _tensors(model: torch.nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


@contextlib.contextmanager
def _inductor_cache(path: Path):
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


class DecodeStep:
    """`step(seq_ids, tokens [B, 1], pos [B, 1]) -> logits [B, V]` over `cache` (prepared here).

    `compile=False` runs the model eagerly (same cache calls). `progress` receives one line when a
    graph (batch 1, batch 2+) compiles for the first time in this process (stderr by default)."""

    def __init__(
        self, model: torch.nn.Module, cache, *, max_batch: int, compile: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.cache = model, cache
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.device = next(model.parameters()).device
        self.eager_reason: str | None = None if compile else "engine.compile is off"
        self.compiled_buckets: set[int] = set()
        self._failed: dict[int, str] = {}
        self._fn: Callable | None = None
        self.cache_dir: Path | None = None
        if compile:
            self.cache_dir = cache_root() / "compile" / compile_key(model, self.device)
            self._fn = torch.compile(self._forward, fullgraph=True, dynamic=False, options=_INDUCTOR_OPTIONS)

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, pos, self.cache)[:, -1]  # [B, V]

    @property
    def compiled(self) -> bool:
        return self._fn is not None and bool(self.compiled_buckets)

    @staticmethod
    def bucket(n: int) -> int:
        """1 for a single sequence, 2 for the dynamic-batch graph."""
        return 1 if n == 1 else 2

    def __call__(self, seq_ids: Sequence[int], tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = len(seq_ids)
        b = self.bucket(n)
        if self._fn is None or b in self._failed:
            self.cache.prepare(list(seq_ids), pos)
            return self.model(tokens, pos, self.cache)[:, -1]
        self.cache.prepare(list(seq_ids), pos, static=True)
        for t in self.cache.bound_tensors():
            if t.dim() >= 2 and t.shape[-1] > 1:  # the attended length S (mask, block reads)
                torch._dynamo.mark_dynamic(t, t.dim() - 1)
            if b > 1:  # rows, positions, mask, block tables: [B, ...]
                torch._dynamo.mark_dynamic(t, 0)
        if b > 1:
            torch._dynamo.mark_dynamic(tokens, 0)
            torch._dynamo.mark_dynamic(pos, 0)
        first = b not in self.compiled_buckets
        t0 = time.perf_counter()
        try:
            if first:
                self.progress(f"lagoon: compiling the decode step for batch {'1' if b == 1 else '2+'} (first start is slow; "
                              f"cached in {self.cache_dir}) ...")
            with _inductor_cache(self.cache_dir), torch.no_grad():  # grad mode is part of the graph's guards
                out = self._fn(tokens, pos)
        except Exception as exc:  # any compile/cached-artefact failure: eager for this bucket, say why
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._failed[b] = reason
            self.eager_reason = reason
            log.warning("compiled decode step for batch %s failed (%s); running it eagerly and clearing %s",
                        "1" if b == 1 else "2+", reason, self.cache_dir)
            shutil.rmtree(self.cache_dir, ignore_errors=True)  # the next start compiles afresh
            self.cache.prepare(list(seq_ids), pos)
            return self.model(tokens, pos, self.cache)[:, -1]
        if first:
            self.compiled_buckets.add(b)
            self.progress(f"lagoon: decode step ready in {time.perf_counter() - t0:.1f} s")
        return out

    def warm_up(self, batch: int = 1) -> None:
        """Compile (or load from the cache) the graph for `batch` now rather than on the first request."""
        if self._fn is None:
            return
        seq_ids = [None] * batch
        tokens = torch.zeros(batch, 1, dtype=torch.int64)
        pos = torch.zeros(batch, 1, dtype=torch.int64)
        # padding slots (`None`) only: every write lands in the cache's scratch row / block
        pos[:, 0] = 1  # S = 2, so the S dimension is traced as dynamic
        self(seq_ids, tokens, pos)
