"""`plan_placement`: replicate hot experts and pack them onto devices for expert-parallel serving.

The EPLB idea (DeepSeek's expert-parallel load balancer, also vLLM's ``rebalance_algo``), global
policy, per layer:

1. *Replicate*: every logical expert gets one physical slot; each of the ``num_redundant`` extra
   slots goes to the expert with the highest load per replica at that moment (ties → lower id).
2. *Pack*: the ``E + R`` replicas (each carrying ``load / replicas`` of its expert) are placed
   heaviest first onto the device with the least load that still has a free slot; every device
   holds ``(E + R) / num_devices`` slots.

Balancedness of a placement is mean device load / max device load (vLLM's metric), averaged over
layers; ``before`` is the naive placement (experts in id order, E / D contiguous per device, no
replicas; an uneven split gives the first devices one more). Tokens of a replicated expert are assumed split evenly over its replicas.

Not here: moving weights or serving (vLLM/SGLang do expert parallelism; Lagoon hands them the map).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from lagoon.errors import ConfigError

__all__ = ["Placement", "plan_placement", "balancedness"]


@dataclass
class Placement:
    """A logical→physical expert map; ``phy2log[l][p]`` is the expert in physical slot p of layer l.

    Physical slot p lives on device ``p // slots_per_device``.
    """

    phy2log: np.ndarray  # [L, P]
    replicas: np.ndarray  # [L, E] replica count per logical expert
    num_devices: int
    device_load: np.ndarray  # [L, D] load per device after placement
    balancedness_before: float
    balancedness_after: float

    @property
    def slots_per_device(self) -> int:
        return self.phy2log.shape[1] // self.num_devices

    def log2phy(self) -> list[list[list[int]]]:
        """For each layer and logical expert, its physical slots."""
        out: list[list[list[int]]] = []
        for row, reps in zip(self.phy2log, self.replicas, strict=True):
            slots: list[list[int]] = [[] for _ in range(len(reps))]
            for p, e in enumerate(row.tolist()):
                slots[e].append(p)
            out.append(slots)
        return out

    def to_sglang(self) -> dict[str, Any]:
        """SGLang's ``--init-expert-location FILE.json`` (``ExpertLocationMetadata.init_by_mapping``):
        only ``physical_to_logical_map [layers, physical experts]``; one row per MoE layer."""
        return {"physical_to_logical_map": self.phy2log.tolist()}

    def to_vllm(self) -> dict[str, Any]:
        """The three maps vLLM's EPLB (``distributed/eplb/rebalance_algo.rebalance_experts``) returns
        and keeps in its ``EplbState``: ``physical_to_logical_map [L, P]``,
        ``logical_to_physical_map [L, E, max replicas]`` (-1 padded) and ``logical_replica_count
        [L, E]``, plus the ``--eplb-config`` that reproduces the replica budget. vLLM computes its
        placement at run time from its own load window; this is the plan to compare it with."""
        width = int(self.replicas.max()) if self.replicas.size else 1
        l2p = [[slots + [-1] * (width - len(slots)) for slots in layer] for layer in self.log2phy()]
        redundant = int(self.phy2log.shape[1] - self.replicas.shape[1])
        return {
            "physical_to_logical_map": self.phy2log.tolist(),
            "logical_to_physical_map": l2p,
            "logical_replica_count": self.replicas.tolist(),
            "eplb_config": {"num_redundant_experts": redundant},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "num_devices": self.num_devices,
            "slots_per_device": self.slots_per_device,
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy(),
            "replicas": self.replicas.tolist(),
            "device_load": self.device_load.tolist(),
            "balancedness_before": self.balancedness_before,
            "balancedness_after": self.balancedness_after,
        }


def balancedness(device_load: np.ndarray) -> float:
    """mean / max of device loads ``[L, D]`` per layer, averaged over layers (1 for an empty layer)."""
    device_load = np.atleast_2d(np.asarray(device_load, dtype=np.float64))
    peak = device_load.max(axis=1)
    per_layer = np.divide(device_load.mean(axis=1), peak, out=np.ones_like(peak), where=peak > 0)
    return float(per_layer.mean())


def plan_placement(loads: Any, num_devices: int, num_redundant: int = 0) -> Placement:
    """Place the experts of each layer of ``loads [L, E]`` (or ``[E]``) on `num_devices` devices."""
    loads = np.atleast_2d(np.asarray(loads, dtype=np.float64))
    if loads.ndim != 2 or loads.size == 0:
        raise ConfigError(f"loads must be a non-empty [layers, experts] array (got shape {loads.shape})")
    if (loads < 0).any() or not np.isfinite(loads).all():
        raise ConfigError("loads must be finite and non-negative token counts")
    num_layers, num_experts = loads.shape
    if num_devices < 1 or num_redundant < 0:
        raise ConfigError(f"need num_devices >= 1 and num_redundant >= 0 (got {num_devices}, {num_redundant})")
    num_phys = num_experts + num_redundant
    if num_phys % num_devices:
        raise ConfigError(
            f"{num_experts} experts + {num_redundant} redundant = {num_phys} slots must split evenly over "
            f"{num_devices} devices; change num_redundant or num_devices"
        )
    per_dev = num_phys // num_devices
    chunks = np.array_split(np.arange(num_experts), num_devices)
    naive = np.stack([loads[:, c].sum(axis=1) for c in chunks], axis=1)  # [L, D]

    phy2log = np.zeros((num_layers, num_phys), dtype=np.int64)
    replicas = np.ones((num_layers, num_experts), dtype=np.int64)
    device_load = np.zeros((num_layers, num_devices))
    for layer in range(num_layers):
        load, reps = loads[layer], replicas[layer]
        for _ in range(num_redundant):
            reps[int(np.argmax(load / reps))] += 1  # argmax picks the lowest id on ties
        items = [(load[e] / reps[e], e) for e in range(num_experts) for _ in range(reps[e])]
        items.sort(key=lambda it: (-it[0], it[1]))
        heap = [(0.0, d) for d in range(num_devices)]  # (device load, device)
        filled = [0] * num_devices
        for share, e in items:
            dev_load, d = heapq.heappop(heap)
            phy2log[layer, d * per_dev + filled[d]] = e
            filled[d] += 1
            device_load[layer, d] = dev_load + share
            if filled[d] < per_dev:
                heapq.heappush(heap, (dev_load + share, d))
    return Placement(
        phy2log=phy2log,
        replicas=replicas,
        num_devices=num_devices,
        device_load=device_load,
        balancedness_before=balancedness(naive),
        balancedness_after=balancedness(device_load),
    )
