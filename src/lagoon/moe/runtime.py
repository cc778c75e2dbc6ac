"""`MoeRuntime`: the serving-time control of a loaded model's MoE blocks — config, balancing
state changes at scheduler-step boundaries, the load monitor, and degraded-expert quarantine.

`lagoon.engine.load_model` builds one for every model with `SparseMoE` blocks (`runtime_of(model)`
finds it) and the engine's scheduler calls `step()` after each scheduler step.

Config (``model_deployment.expert_routing`` and ``moe``) reaches every MoE block:

* ``total_experts`` / ``active_per_token``, when set explicitly, are checked against / applied to
  the checkpoint (a mismatch of ``total_experts`` is a `CheckpointError`); left at their defaults,
  the checkpoint's own expert count and k are kept (a config does not silently re-route a model
  it was not written for).
* ``temperature``, ``load_balance_weight``, ``moe.recalibration_cv``, ``moe.bias_update_rate``,
  ``moe.balance_window`` and ``moe.capacity_factor`` always apply; the monitor's window is
  ``moe.balance_window``.

Determinism contract (docs/architecture.md): with ``load_balance_weight = 0`` and
``recalibration_cv = null`` routing state never changes, so greedy output for a request never
depends on other traffic. With either on, routers run *deferred*: a step's loads are queued and
`step()` applies them once per scheduler step, so the state changes only between steps (all
requests of one batched step see the same state); each committed change is logged at debug and
counted (``lagoon_moe_routing_state_updates_total``; recalibrations also at info and in
``lagoon_moe_recalibrations_total``).

Compiled decode: a compiled step runs each block's static path (`lagoon.moe.layer`), whose
statistics are tensors updated in-graph; `step()` first drains them (`SparseMoE.drain_static`: router
window, load monitor, drops, experts that emitted non-finite values) and then commits, so
`lagoon moe stats`, /metrics, balancing and quarantine see compiled steps as they see eager ones.
`compilable` says whether every block has a static expert path: float experts, per-row quantized
ones, and a quantized GGUF's packed experts (`lagoon.engine.packed_experts`, Lagoon's MoE kernels)
do; `lagoon.quant`'s packed int4 / group-wise / activation-quantized experts do not (eager decode).

Degraded experts are quarantined (`SparseMoE.quarantine`: masked out of routing, logged once,
``lagoon_moe_quarantined_total`` / ``lagoon_moe_quarantined_experts`` on /metrics, listed by
``lagoon moe info``): at load, experts whose weights are non-finite (a tensor missing from the
checkpoint is loaded as NaN) or whose bytes fail the checkpoint's ``experts.sha256.json``; at run
time, experts that emit non-finite values; and the operator's ``moe.quarantine`` list.
``moe.restore`` puts listed experts back whatever the checks said. Both take ``"LAYER:EXPERT"``
strings (LAYER = the decoder layer index, or ``*`` for every MoE layer).

Not here: routing math (`lagoon.moe.router`), monitoring math (`lagoon.moe.balance`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lagoon.errors import CheckpointError, ConfigError
from lagoon.moe.balance import ExpertLoadMonitor
from lagoon.moe.layer import SparseMoE

__all__ = ["MoeRuntime", "runtime_of", "expert_checksums", "write_expert_checksums", "CHECKSUM_FILE"]

log = logging.getLogger("lagoon.moe.runtime")

CHECKSUM_FILE = "experts.sha256.json"
_REF = re.compile(r"^\s*(\*|\d+)\s*:\s*(\d+)\s*$")


def _layer_index(name: str, ordinal: int) -> int:
    m = re.search(r"layers\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else ordinal


def _expert_bytes(block: SparseMoE, e: int) -> list[torch.Tensor] | None:
    experts = block.experts
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None  # quantized or offloaded experts: checked where their weights live
    return [gu[e], down[e]]


def expert_checksums(model: nn.Module) -> dict[str, Any]:
    """sha256 of each expert's float32 weights (gate_up then down), per MoE block name; JSON-able."""
    out: dict[str, Any] = {"version": 1, "layers": {}}
    for name, block in _blocks(model):
        parts = _expert_bytes(block, 0)
        if parts is None:
            raise CheckpointError(f"{name}: experts are {type(block.experts).__name__}; checksum the float model")
        out["dtype"] = str(parts[0].dtype).removeprefix("torch.")
        out["layers"][name] = expert_checksums_of(block)
    return out


def write_expert_checksums(model: nn.Module, folder: str | Path) -> Path:
    """Write `expert_checksums(model)` to ``folder/experts.sha256.json`` (atomically)."""
    from lagoon.atomic import write_json_atomic

    path = Path(folder) / CHECKSUM_FILE
    write_json_atomic(path, expert_checksums(model))
    return path


def _blocks(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    return [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


class MoeRuntime:
    """Config, deferred balancing, monitor and quarantine for every `SparseMoE` of one model."""

    def __init__(self, model: nn.Module, routing: Any = None, moe: Any = None, *, checkpoint: str | Path | None = None) -> None:
        from lagoon.config import MoeRoutingSection, MoeSection

        routing = routing if routing is not None else MoeRoutingSection(load_balance_weight=0.0)
        moe = moe if moe is not None else MoeSection(recalibration_cv=None)
        self.blocks = _blocks(model)
        if not self.blocks:
            raise ConfigError("the model has no SparseMoE blocks; MoeRuntime is for MoE models")
        self.layers = {_layer_index(name, i): block for i, (name, block) in enumerate(self.blocks)}
        self._apply(routing, moe)
        self.monitor = ExpertLoadMonitor(window=moe.balance_window).attach(model)
        self.steps = 0  # scheduler steps that changed routing state
        self.telemetry: Any = None
        self._scan_weights()
        if checkpoint is not None and (Path(checkpoint) / CHECKSUM_FILE).is_file():
            self.verify_checksums(Path(checkpoint) / CHECKSUM_FILE)
        for layer, e in self._refs(moe.quarantine, "moe.quarantine"):
            self.layers[layer].quarantine([e], "operator")
        for layer, e in self._refs(moe.restore, "moe.restore"):
            self.layers[layer].restore([e])
        model._lagoon_moe_runtime = self  # type: ignore[assignment]

    # ------------------------------------------------------------------ config
    def _apply(self, routing: Any, moe: Any) -> None:
        explicit = routing.model_fields_set
        for name, block in self.blocks:
            if "total_experts" in explicit and block.num_experts != routing.total_experts:
                raise CheckpointError(
                    f"{name} has {block.num_experts} experts but model_deployment.expert_routing.total_experts is "
                    f"{routing.total_experts}; set total_experts={block.num_experts} or leave it unset"
                )
            r = block.router
            if "active_per_token" in explicit:
                if routing.active_per_token > block.num_experts:
                    raise CheckpointError(
                        f"active_per_token={routing.active_per_token} exceeds the {block.num_experts} experts of {name}"
                    )
                r.top_k = routing.active_per_token
            r.name = name
            r.temperature = routing.temperature
            r.load_balance_weight = routing.load_balance_weight
            r.bias_update_rate = moe.bias_update_rate
            r.recalibration_cv = moe.recalibration_cv
            r.balance_window = moe.balance_window
            r.deferred = True
            block.capacity_factor = moe.capacity_factor
            block.check_finite = True

    @property
    def balancing(self) -> bool:
        """Whether routing state can change with traffic (penalty or recalibration on)."""
        r = self.blocks[0][1].router
        return r.load_balance_weight > 0 or r.recalibration_cv is not None

    def _refs(self, items: list[str], key: str) -> list[tuple[int, int]]:
        out = []
        for item in items:
            m = _REF.match(str(item))
            if m is None:
                raise ConfigError(f"{key}: {item!r} is not LAYER:EXPERT (e.g. '3:5' or '*:5')")
            layers = sorted(self.layers) if m.group(1) == "*" else [int(m.group(1))]
            for layer in layers:
                if layer not in self.layers:
                    raise ConfigError(f"{key}: layer {layer} has no MoE block; MoE layers are {sorted(self.layers)}")
                e = int(m.group(2))
                if e >= self.layers[layer].num_experts:
                    raise ConfigError(f"{key}: expert {e} out of range for layer {layer} "
                                      f"({self.layers[layer].num_experts} experts)")
                out.append((layer, e))
        return out

    # ------------------------------------------------------------------ load-time checks
    def _scan_weights(self) -> None:
        for _, block in self.blocks:
            for e in range(block.num_experts):
                parts = _expert_bytes(block, e)
                if parts is not None and not all(bool(torch.isfinite(t).all()) for t in parts):
                    block.quarantine([e], "weights failed to load (non-finite)")

    def verify_checksums(self, path: Path) -> None:
        """Quarantine experts whose float32 bytes differ from `path`'s sha256 (a lossy load skips it)."""
        try:
            data = json.loads(path.read_text())
            layers, dtype = data["layers"], data.get("dtype", "float32")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is unreadable ({exc}); delete it or re-write it with the checkpoint") from exc
        for name, block in self.blocks:
            sums = layers.get(name)
            parts = _expert_bytes(block, 0)
            if sums is None or parts is None:
                continue
            loaded = str(parts[0].dtype).removeprefix("torch.")
            if loaded != dtype and loaded != "float32":
                log.info("%s: experts loaded as %s, checksums are of %s; not verified", name, loaded, dtype)
                continue
            got = expert_checksums_of(block)
            for e, (want, have) in enumerate(zip(sums, got, strict=False)):
                if want != have:
                    block.quarantine([e], "checksum mismatch")

    # ------------------------------------------------------------------ serving
    @property
    def compilable(self) -> bool:
        """Whether every block's experts have a static-shape path, so a decode step can compile."""
        return all(block.static_ready for _, block in self.blocks)

    @torch.no_grad()
    def _drain_static(self) -> None:
        stats = [block.static_stats for _, block in self.blocks]
        if any(t.is_meta for t in stats):
            return
        rows = torch.cat(stats).tolist()  # one host read for every layer (~30 per-layer reads cost ~2 ms a step)
        at = 0
        for (name, block), t in zip(self.blocks, stats, strict=True):
            row, at = rows[at : at + t.numel()], at + t.numel()
            if row[2 * block.num_experts]:
                block.reset_static()
                drained = block.apply_static(row)
                if drained is not None:
                    self.monitor.record(name, *drained)

    def discard_static(self) -> None:
        """Forget the static calls since the last step (a compile warm-up's padding token is not traffic)."""
        for _, block in self.blocks:
            block.reset_static()

    def step(self) -> None:
        """Drain the compiled steps' statistics, then apply the routing-state updates queued during
        one scheduler step (call between steps)."""
        self._drain_static()
        changed = 0
        recal_before = sum(b.router.recalibrations for _, b in self.blocks)
        for _, block in self.blocks:
            changed += block.router.commit() > 0
        if not changed:
            return
        self.steps += 1
        recal = sum(b.router.recalibrations for _, b in self.blocks) - recal_before
        log.debug("routing state updated in %d layers after scheduler step (%d recalibrations)", changed, recal)
        if self.telemetry is not None:
            self.telemetry.inc("lagoon_moe_routing_state_updates_total",
                               doc="Scheduler steps after which MoE routing state (load window, bias) changed")

    def attach_telemetry(self, telemetry: Any) -> MoeRuntime:
        """Publish monitor gauges, recalibrations, state updates and quarantines to `telemetry`."""
        self.telemetry = telemetry
        self.monitor.telemetry = telemetry
        for _, block in self.blocks:
            block.router.telemetry = telemetry
        self.publish()
        return self

    def publish(self) -> None:
        if self.telemetry is None:
            return
        self.monitor.publish()
        for name, block in self.blocks:
            self.telemetry.set("lagoon_moe_quarantined_experts", len(block.quarantined), labels={"layer": name},
                               doc="Experts currently masked out of routing, by layer")

    def quarantined(self) -> list[dict[str, Any]]:
        return [{"layer": layer, "name": b.router.name, "expert": e, "reason": why}
                for layer, b in sorted(self.layers.items()) for e, why in sorted(b.quarantined.items())]

    def stats(self) -> dict[str, Any]:
        return {
            "balancing": self.balancing,
            "state_update_steps": self.steps,
            "recalibrations": sum(b.router.recalibrations for _, b in self.blocks),
            "window": self.monitor.window,
            "quarantined": self.quarantined(),
        }


def expert_checksums_of(block: SparseMoE) -> list[str]:
    out = []
    for e in range(block.num_experts):
        h = hashlib.sha256()
        for t in _expert_bytes(block, e) or []:
            h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def runtime_of(model: nn.Module) -> MoeRuntime | None:
    """The `MoeRuntime` of a loaded model, or None (dense, or built without `load_model`)."""
    return getattr(model, "_lagoon_moe_runtime", None)
