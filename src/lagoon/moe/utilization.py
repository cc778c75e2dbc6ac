"""`measure_utilization`: per-layer expert utilization of a real MoE model over real text.

The model runs over the text's tokens in windows of `window` tokens with its *own* routing (no
load penalty, no recalibration: the numbers describe the checkpoint, not the balancer), and an
`ExpertLoadMonitor` whose window holds every call records the routed slots per layer and expert.
The result is the monitor's snapshot (format version 1; per layer ``tokens``, ``cv``,
``balancedness`` = mean/max as vLLM and SGLang report it, ``max_violation`` = max/mean − 1,
``entropy`` / ``entropy_norm``) plus ``max_over_mean``, the text's token count, and the verdict
of the recalibration rule: a layer whose CV passes ``recalibration_cv`` (``moe.recalibration_cv``,
15% by default) would be recalibrated in serving. `lagoon moe placement` reads this JSON.

``CODING_SAMPLE`` is a ~1,100-token Python file shipped in the package (the default text).
Not here: balancing (`lagoon.moe.router`) or plotting (`ExpertLoadMonitor.plot`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lagoon.errors import UnsupportedModelError
from lagoon.moe.balance import ExpertLoadMonitor
from lagoon.moe.layer import SparseMoE

__all__ = ["CODING_SAMPLE", "measure_utilization"]

CODING_SAMPLE = Path(__file__).resolve().parent / "data" / "coding_sample.txt"


def measure_utilization(model: nn.Module, ids: list[int], *, window: int = 256,
                        recalibration_cv: float | None = 0.15) -> tuple[dict[str, Any], ExpertLoadMonitor]:
    """Run `model` over `ids` and return (snapshot with verdicts, the monitor for plotting)."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not blocks:
        raise UnsupportedModelError("the model has no MoE layers (a dense model?); `lagoon moefy` makes one")
    saved = [(b.router.load_balance_weight, b.router.recalibration_cv, b.router.deferred) for b in blocks]
    for b in blocks:  # the checkpoint's own routing
        b.router.load_balance_weight, b.router.recalibration_cv, b.router.deferred = 0.0, None, False
    monitor = ExpertLoadMonitor(window=len(ids) // max(window, 1) + 2).attach(model)
    try:
        t = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            for s in range(0, t.numel(), window):
                model(t[None, s : s + window])
    finally:
        monitor.detach()
        for b, (lam, cv, deferred) in zip(blocks, saved, strict=True):
            b.router.load_balance_weight, b.router.recalibration_cv, b.router.deferred = lam, cv, deferred
    snap = monitor.snapshot()
    for layer in snap["layers"]:
        layer["max_over_mean"] = layer["max_violation"] + 1.0
        layer["would_recalibrate"] = recalibration_cv is not None and layer["cv"] > recalibration_cv
    snap["tokens_in_text"] = len(ids)
    snap["recalibration_cv"] = recalibration_cv
    snap["would_recalibrate"] = [layer["name"] for layer in snap["layers"] if layer["would_recalibrate"]]
    return snap, monitor
