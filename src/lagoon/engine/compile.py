"""`DecodeStep`: the scheduler's decode forward (one new token per sequence), compiled from outside.

The model stays the plain `Transformer`; this module wraps its forward for T = 1 with
`torch.compile` (inductor, `fullgraph=True`), gpt-fast style:

- static shapes: the batch is padded to a bucket (1, 2, 4, 8, … up to `max_batch`; padding slots
  write the cache's scratch row / block and attend position 0 only), so each bucket is one graph;
  the attended length S is marked dynamic, so one graph serves every position;
- the KV cache writes are in-place `index_put_` on one tensor per layer, which inductor keeps in
  place; the cache's bookkeeping (rows, block tables, mask) runs eagerly in `cache.prepare`;
- compiled artefacts (inductor's FX-graph and kernel caches) live under
  ``~/.cache/lagoon/compile/<key>``, the key hashing torch's version, the CPU's vector ISA and the
  model's tensor names / shapes / dtypes, so a second start loads them instead of compiling;
- any failure (tracing, compiling, loading a corrupt cache entry) is logged with its reason, the
  cache entry is cleared, and that bucket runs eagerly from then on: never worse than eager.

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

__all__ = ["DecodeStep", "cache_root", "compile_key", "batch_buckets", "compile_enabled"]

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


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of two below `max_batch`, then `max_batch` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


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

    `compile=False` runs the model eagerly (same cache calls, no padding). `progress` receives one
    line when a bucket compiles for the first time in this process (the CLI prints it)."""

    def __init__(
        self, model: torch.nn.Module, cache, *, max_batch: int, compile: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(max_batch)
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

    def bucket(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), n)

    def __call__(self, seq_ids: Sequence[int], tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = len(seq_ids)
        b = self.bucket(n)
        if self._fn is None or b in self._failed:
            self.cache.prepare(list(seq_ids), pos)
            return self.model(tokens, pos, self.cache)[:, -1]
        pad = b - n
        ids = [*seq_ids, *([None] * pad)]
        tokens = torch.cat([tokens, tokens.new_zeros(pad, 1)]) if pad else tokens
        pos = torch.cat([pos, pos.new_zeros(pad, 1)]) if pad else pos
        self.cache.prepare(ids, pos, static=True)
        for t in self.cache.bound_tensors():
            if t.dim() >= 2 and t.shape[-1] > 1:  # the attended length S (mask, block reads)
                torch._dynamo.mark_dynamic(t, t.dim() - 1)
        first = b not in self.compiled_buckets
        t0 = time.perf_counter()
        try:
            if first:
                self.progress(f"lagoon: compiling the decode step for batch {b} (first start is slow; "
                              f"cached in {self.cache_dir}) ...")
            with _inductor_cache(self.cache_dir), torch.no_grad():  # grad mode is part of the graph's guards
                out = self._fn(tokens, pos)
        except Exception as exc:  # any compile/cached-artefact failure: eager for this bucket, say why
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._failed[b] = reason
            self.eager_reason = reason
            log.warning("compiled decode step for batch %d failed (%s); running it eagerly and clearing %s",
                        b, reason, self.cache_dir)
            shutil.rmtree(self.cache_dir, ignore_errors=True)  # the next start compiles afresh
            self.cache.prepare(list(seq_ids), pos[:n])
            return self.model(tokens[:n], pos[:n], self.cache)[:, -1]
        if first:
            self.compiled_buckets.add(b)
            self.progress(f"lagoon: decode step for batch {b} ready in {time.perf_counter() - t0:.1f} s")
        return out[:n]

    def warm_up(self, batch: int = 1) -> None:
        """Compile (or load from the cache) the bucket for `batch` now rather than on the first request."""
        if self._fn is None:
            return
        seq_ids = [None] * batch
        tokens = torch.zeros(batch, 1, dtype=torch.int64)
        pos = torch.zeros(batch, 1, dtype=torch.int64)
        # padding slots only: every write lands in the cache's scratch row / block
        pos[:, 0] = 1  # S = 2, so the S dimension is traced as dynamic
        self(seq_ids, tokens, pos)
