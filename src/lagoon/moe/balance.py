"""`ExpertLoadMonitor`: live per-layer expert load of every MoE block in a model.

``attach(model)`` hooks every `SparseMoE` (named by its module path) and records, after each
forward, the routed slots per expert and the slots dropped by the capacity limit, over a rolling
window of the last ``window`` forward calls per layer. From the window's per-expert load
``n [E]`` (mean m = Σn / E) it reports, per layer and over all layers:

* ``balancedness`` = m / max(n) — vLLM's and SGLang's metric; 1 is perfect, 1/E is collapse;
* ``cv`` = std(n) / m (population std) — the number `moe.recalibration_cv` is compared with;
* ``max_violation`` = max(n) / m − 1;
* ``entropy`` = −Σ p log p with p = n / Σn (nats), and ``entropy_norm`` = entropy / log E;
* ``dropped`` = slots dropped in the window, and ``tokens`` = n itself.

An empty window reports balancedness 1, cv 0, max_violation 0, entropy 0. `snapshot()` returns all
of it as JSON-able data (format version 1) and publishes gauges (``lagoon_moe_balancedness``,
``lagoon_moe_load_cv``, ``lagoon_moe_max_violation``, ``lagoon_moe_load_entropy``, labelled by
layer) plus the ``lagoon_moe_dropped_slots_total`` counter to the `Telemetry` it was given, so
``/metrics`` shows them; gauges are also refreshed every ``publish_every`` records. Attaching also
gives each router the telemetry, so its recalibrations are counted there. ``plot(path)`` writes a
PNG heat map (layer × expert, load relative to the even share) with matplotlib's Agg backend.

Not here: changing routing (`lagoon.moe.router`) or placing experts (`lagoon.moe.placement`).
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lagoon.atomic import atomic_path

__all__ = ["ExpertLoadMonitor", "load_stats"]

FORMAT_VERSION = 1


def load_stats(load: np.ndarray) -> dict[str, float]:
    """Balance metrics of one per-expert load vector (see the module docstring)."""
    n = np.asarray(load, dtype=np.float64)
    total = float(n.sum())
    if total <= 0:
        return {"balancedness": 1.0, "cv": 0.0, "max_violation": 0.0, "entropy": 0.0, "entropy_norm": 0.0}
    mean, peak = total / n.size, float(n.max())
    p = n[n > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    return {
        "balancedness": mean / peak,
        "cv": float(n.std() / mean),
        "max_violation": peak / mean - 1.0,
        "entropy": entropy,
        "entropy_norm": entropy / math.log(n.size) if n.size > 1 else 1.0,
    }


class _LayerWindow:
    def __init__(self, num_experts: int, window: int) -> None:
        self.steps: deque[tuple[np.ndarray, int]] = deque(maxlen=window)
        self.load = np.zeros(num_experts, dtype=np.int64)
        self.total = np.zeros(num_experts, dtype=np.int64)  # since attach, not windowed (eval trials diff it)
        self.dropped = 0

    def push(self, counts: np.ndarray, dropped: int) -> None:
        if len(self.steps) == self.steps.maxlen:
            old, old_dropped = self.steps[0]
            self.load -= old
            self.dropped -= old_dropped
        self.steps.append((counts, dropped))
        self.load += counts
        self.total += counts
        self.dropped += dropped


class ExpertLoadMonitor:
    """Per-layer rolling expert-load window with metrics, telemetry gauges and a heat map."""

    def __init__(self, window: int = 1000, telemetry: Any = None, publish_every: int = 16) -> None:
        self.window, self.telemetry, self.publish_every = window, telemetry, publish_every
        self.layers: dict[str, _LayerWindow] = {}
        self._routers: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._records = 0

    @classmethod
    def from_config(cls, cfg: Any, telemetry: Any = None) -> ExpertLoadMonitor:
        """Window from ``moe.balance_window``."""
        return cls(window=cfg.moe.balance_window, telemetry=telemetry)

    def attach(self, model: nn.Module) -> ExpertLoadMonitor:
        """Hook every `SparseMoE` in `model`; returns self. Raises if there is none."""
        from lagoon.errors import UnsupportedModelError
        from lagoon.moe.layer import SparseMoE

        found = [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]
        if not found:
            raise UnsupportedModelError(f"{type(model).__name__} has no SparseMoE blocks to monitor")
        for name, block in found:
            block.router.name = name
            if self.telemetry is not None:
                block.router.telemetry = self.telemetry
            self._routers[name] = block.router
            self.layers[name] = _LayerWindow(block.num_experts, self.window)
            self._handles.append(block.register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # a static (compiled-decode) call keeps its counts in tensors: `MoeRuntime.step` records them
            if torch.compiler.is_compiling() or module.static_path:
                return
            self.record(name, module.last_counts, module.last_dropped)

        return hook

    def record(self, layer: str, counts: torch.Tensor | np.ndarray, dropped: int = 0) -> None:
        """Add one forward call's routed slots per expert (and drops) to `layer`'s window."""
        counts = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
        counts = counts.astype(np.int64)
        if layer not in self.layers:
            self.layers[layer] = _LayerWindow(counts.size, self.window)
        self.layers[layer].push(counts, int(dropped))
        if dropped and self.telemetry is not None:
            self.telemetry.inc(
                "lagoon_moe_dropped_slots_total", dropped, labels={"layer": layer},
                doc="Token slots dropped by the MoE capacity limit",
            )
        self._records += 1
        if self.telemetry is not None and self._records % self.publish_every == 0:
            self.publish()

    def loads(self) -> np.ndarray:
        """Window load per layer and expert, ``[L, E]`` int64 (layers in attach order)."""
        return np.stack([w.load for w in self.layers.values()]) if self.layers else np.zeros((0, 0), np.int64)

    def total_load(self) -> np.ndarray | None:
        """Slots routed to each expert since attach, summed over layers, ``[E]`` int64 (None when no
        layer recorded yet or layers differ in expert count)."""
        totals = [w.total for w in self.layers.values()]
        if not totals or len({t.size for t in totals}) != 1:
            return None
        return np.sum(totals, axis=0)

    def snapshot(self) -> dict[str, Any]:
        """Every layer's window load and metrics, plus the all-layer metrics; also publishes gauges."""
        layers = []
        for name, w in self.layers.items():
            router = self._routers.get(name)
            layers.append({
                "name": name,
                "steps": len(w.steps),
                "tokens": w.load.tolist(),
                "dropped": int(w.dropped),
                "recalibrations": int(router.recalibrations) if router is not None else 0,
                **load_stats(w.load),
            })
        overall = load_stats(self.loads().sum(axis=0)) if layers else load_stats(np.zeros(1))
        if layers:
            overall["balancedness"] = float(np.mean([layer["balancedness"] for layer in layers]))
        snap = {"version": FORMAT_VERSION, "window": self.window, "layers": layers, "overall": overall}
        self.publish(snap)
        return snap

    def publish(self, snap: dict[str, Any] | None = None) -> None:
        """Set the per-layer gauges in the telemetry registry (no-op without telemetry)."""
        if self.telemetry is None:
            return
        if snap is None:
            snap = {"layers": [{"name": n, **load_stats(w.load)} for n, w in self.layers.items()]}
        gauges = {
            "balancedness": ("lagoon_moe_balancedness", "Mean/max expert load over the window"),
            "cv": ("lagoon_moe_load_cv", "Coefficient of variation of expert load over the window"),
            "max_violation": ("lagoon_moe_max_violation", "Max/mean expert load minus 1 over the window"),
            "entropy_norm": ("lagoon_moe_load_entropy", "Normalised entropy of expert load (1 = even)"),
        }
        for layer in snap["layers"]:
            for key, (metric, doc) in gauges.items():
                self.telemetry.set(metric, layer[key], labels={"layer": layer["name"]}, doc=doc)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG heat map of load / even share (layer × expert); atomic; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        loads = self.loads().astype(np.float64)
        if loads.size == 0:
            from lagoon.errors import LagoonError

            raise LagoonError("no expert load recorded yet; run the model after attach() before plot()")
        totals = loads.sum(axis=1, keepdims=True)
        rel = np.divide(loads * loads.shape[1], totals, out=np.zeros_like(loads), where=totals > 0)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * loads.shape[1] + 2), max(2.5, 0.3 * loads.shape[0] + 1.5)))
        im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(self.layers)), list(self.layers), fontsize=6)
        ax.set_title(f"expert load / even share (window {self.window})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        try:
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        finally:
            plt.close(fig)
        return path
