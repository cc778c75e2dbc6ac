"""`ExpertStore`: the slow tier that holds every routed expert's weights while only a few are resident.

An offloaded MoE layer (`lagoon.moe.offload`) keeps a fixed number of experts in fast memory and
reads the others from a store, one expert at a time, straight into a cache slot:

* ``host`` (`HostStore`): the stacked ``gate_up [E, 2I, H]`` / ``down [E, H, I]`` tensors in host
  memory, page-locked when a CUDA device holds the cache (so ``copy_(non_blocking=True)`` is a real
  DMA). On a CPU-only machine host and cache are the same memory: useful for tests, not for saving RAM.
* ``disk`` (`DiskStore`): every expert as two tensors in one safetensors file, memory-mapped once;
  a read is a zero-copy view of the mapped bytes copied into the slot (one copy; the OS page cache
  decides what stays in RAM). The file is written atomically (temp + rename) by `DiskStore.write`.

``read_into(layer, expert, gate_up_out, down_out) -> bytes`` is the whole contract; reads from
several threads at once are safe (views of an immutable mapping, or of tensors nobody writes).
Not here: which experts are resident (the cache policy) or when they are read (prefetch).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from lagoon.atomic import atomic_path
from lagoon.errors import CheckpointError, ConfigError
from lagoon.protocols import ExpertStore

__all__ = ["ExpertStore", "HostStore", "DiskStore", "STORE_TIERS", "make_store"]

STORE_TIERS = ("host", "disk")

# safetensors dtype names (the format's spec) for the dtypes experts are stored in
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class HostStore:
    """Experts in host memory: ``layers[l] = (gate_up [E, 2I, H], down [E, H, I])``."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *, pin: bool = False) -> None:
        self.layers = []
        for gu, down in layers:
            gu, down = gu.detach().cpu(), down.detach().cpu()
            if pin:  # page-locked so host→device copies can overlap compute
                gu, down = gu.pin_memory(), down.pin_memory()
            self.layers.append((gu, down))
        self.pinned = pin

    def read_into(self, layer: int, expert: int, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> int:
        gu, down = self.layers[layer]
        gate_up_out.copy_(gu[expert], non_blocking=self.pinned)
        down_out.copy_(down[expert], non_blocking=self.pinned)
        return gu[expert].nbytes + down[expert].nbytes

    def close(self) -> None:
        self.layers = []


class DiskStore:
    """Experts in one memory-mapped safetensors file (``{layer}.{expert}.gate_up`` / ``.down``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private pages, writable views
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"expert store {self.path} is unreadable ({exc}); delete it and offload again") from exc
        base = 8 + header_len
        self._views: dict[str, torch.Tensor] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            dtype = _TORCH_DTYPES[meta["dtype"]]
            count = (end - start) // dtype.itemsize
            flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=base + start)
            self._views[name] = flat.view(meta["shape"])

    @staticmethod
    def write(path: str | Path, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Path:
        """Write every expert of `layers` to `path` (temp file + rename; never half-written)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for li, (gu, down) in enumerate(layers):
            if gu.dtype not in _ST_DTYPES:
                raise ConfigError(f"experts in {gu.dtype} cannot go to the disk tier; use float32/bfloat16/float16")
            for e in range(gu.shape[0]):
                tensors[f"{li}.{e}.gate_up"] = gu[e].detach().cpu().contiguous()
                tensors[f"{li}.{e}.down"] = down[e].detach().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "lagoon": "expert-store-v1"})
        return path

    def read_into(self, layer: int, expert: int, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> int:
        gu, down = self._views[f"{layer}.{expert}.gate_up"], self._views[f"{layer}.{expert}.down"]
        gate_up_out.copy_(gu)
        down_out.copy_(down)
        return gu.nbytes + down.nbytes

    def close(self) -> None:
        self._views.clear()
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes when it does
            pass


def make_store(
    tier: str, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *, path: str | Path | None = None,
    pin: bool = False,
) -> ExpertStore:
    """The `tier` store holding `layers`' experts (``disk`` needs `path`, the file to write)."""
    if tier == "host":
        return HostStore(layers, pin=pin)
    if tier == "disk":
        if path is None:
            raise ConfigError("the disk expert tier needs a file path; set moe.offload.dir")
        return DiskStore(DiskStore.write(path, layers))
    raise ConfigError(f"unknown expert store tier {tier!r}; valid: {', '.join(STORE_TIERS)}")
