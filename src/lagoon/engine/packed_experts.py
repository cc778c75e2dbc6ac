"""`PackedExperts`: an MoE layer's routed experts kept at a GGUF's own bit width, in the layouts of
Lagoon's kernels, and run by the MoE ops of `lagoon.engine.cpu_kernels` (`csrc/moe_matvec.cpp`).

Why: a 4-bit MoE GGUF (Qwen3-30B-A3B, DeepSeek, Laguna at Q4_K_M) was dequantized to bf16 at load,
3.6x its bytes, and decode read 16 bits a weight. Here each projection stays packed, one weight per
expert stacked on a leading axis: ``gate_up_packed [E, 2I/16, H/32, tile]`` (an expert's gate rows, then
its up rows, one kernel call for both) and ``down_packed [E, H/16, I/32, tile]``, each in layout
``q4`` (`cpu_kernels.pack_q4`: Q4_0 / Q4_1 / Q4_K codes as they are, f16 scales) or ``i8``
(`cpu_kernels.pack_i8`: Q8_0's own codes; Q5_0 / Q5_1 / Q2_K / Q3_K / Q5_K / Q6_K re-quantized to int8
blocks of 32, Q8_0's rounding, the dense linears' int8 price; also a 4-bit projection whose partner is
not 4-bit, as in Q4_K_M files with a Q6_K ``up``). The activations are quantized to int8 per block of 32,
as for the dense 4-bit linears.

The module has the experts' interface (`lagoon.moe.experts`): ``forward(x [T, H], indices [T, k],
weights [T, k], plan=None) -> [T, H]`` for eager decode and prefill (a plan's capacity drops zero
their slots) and ``gathered(x, indices) -> [T, k, H]`` fp32, the static path of the compiled decode
step (`gathered_ok` is True, so `MoeRuntime.compilable` holds): both are the same two op calls, which
the compiled step calls as extern kernels. The gated unit (`lagoon.moe.experts.GLU`) and biases are
the float experts' own. It is applied from outside (`swap_packed_experts`, by `lagoon.engine.checkpoint`
at ``native`` precision when the kernels are planned): the model definition keeps its float `Experts`.
Not here: which GGUF tensors pack (`lagoon.engine.gguf_moe.packed_expert_layers`), the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lagoon.engine import cpu_kernels
from lagoon.moe.dispatch import DispatchPlan
from lagoon.moe.experts import GLU, Experts

__all__ = ["LAYOUTS", "PackedExperts", "pack_gguf_experts", "swap_packed_experts", "unpack_experts", "unpack_weight"]

LAYOUTS = ("q4", "i8")
_TILE_BYTES = {"q4": 320, "i8": 576}
Q4_KINDS = ("Q4_0", "Q4_1", "Q4_K")

Fields = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class PackedExperts(nn.Module):
    """E experts whose two projections stay packed (see the module docstring)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, layouts: tuple[str, str], hidden_size: int,
                 intermediate_size: int, isa: str, glu: GLU | None = None, *,
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        e, h, i = gate_up.shape[0], hidden_size, intermediate_size
        for (name, t), layout, (rows, cols) in zip((("gate_up", gate_up), ("down", down)), layouts,
                                                    ((2 * i, h), (h, i)), strict=True):
            want = (e, -(-rows // 16), cols // 32, _TILE_BYTES.get(layout, -1))
            if layout not in LAYOUTS or tuple(t.shape) != want or t.dtype != torch.uint8:
                raise ValueError(f"PackedExperts: {name} is {layout} {tuple(t.shape)} {t.dtype}, expected one of "
                                 f"{LAYOUTS} shaped {want} uint8")
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.layouts = {"gate_up": layouts[0], "down": layouts[1]}
        self.isa = isa
        self._isa_code = cpu_kernels.ISA_CODES[isa]
        self.glu = glu or GLU()
        self.register_buffer("gate_up_packed", gate_up)
        self.register_buffer("down_packed", down)
        self.register_buffer("gate_up_bias", gate_up_bias)  # [E, 2I] float (gpt-oss-style experts)
        self.register_buffer("down_bias", down_bias)  # [E, H]
        cpu_kernels.library()  # loaded (and the fake impls registered) before any trace reaches the ops

    def gathered_ok(self) -> bool:
        return True

    def _matvec(self, proj: str, x: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
        op = torch.ops.lagoon.q4_moe_matvec if self.layouts[proj] == "q4" else torch.ops.lagoon.i8_moe_matvec
        return op(x, getattr(self, f"{proj}_packed"), indices, n, self._isa_code)

    def gathered(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each slot through its own expert: [T, H], [T, k] -> [T, k, H] fp32 (no routing weight)."""
        ids = indices.long()
        h = self._matvec("gate_up", x, ids, 2 * self.intermediate_size)  # [T, k, 2I]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[ids].float()
        gate, up = h.chunk(2, dim=-1)
        y = self._matvec("down", self.glu(gate, up), ids, self.hidden_size)  # [T, k, H]
        return y if self.down_bias is None else y + self.down_bias[ids].float()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                plan: DispatchPlan | None = None) -> torch.Tensor:
        w = weights.float()  # [T, k]
        if plan is not None and plan.dropped:
            w = w * plan.kept.view(indices.shape)
        return (self.gathered(x, indices) * w.unsqueeze(-1)).sum(dim=1).to(x.dtype)  # [T, H]

    def to_float(self, dtype: torch.dtype = torch.bfloat16) -> Experts:
        """The same experts as float `Experts` (the packed values, `unpack_weight`), e.g. to offload them."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        with torch.device("meta"):
            out = Experts(e, h, i, self.glu.act, glu=self.glu, bias=self.gate_up_bias is not None)
        out.gate_up_proj = nn.Parameter(unpack_weight(self.gate_up_packed, self.layouts["gate_up"], 2 * i).to(dtype),
                                        requires_grad=False)
        out.down_proj = nn.Parameter(unpack_weight(self.down_packed, self.layouts["down"], h).to(dtype), requires_grad=False)
        if self.gate_up_bias is not None:
            out.gate_up_bias = nn.Parameter(self.gate_up_bias.to(dtype), requires_grad=False)
            out.down_bias = nn.Parameter(self.down_bias.to(dtype), requires_grad=False)
        return out

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers() if b is not None)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"gate_up={self.layouts['gate_up']}, down={self.layouts['down']}, isa={self.isa}, glu={self.glu.kind}")


# ------------------------------------------------------------------------------------- from a GGUF
def _layout(kinds: list[str]) -> str:
    return "q4" if all(k in Q4_KINDS for k in kinds) else "i8"


def pack_gguf_experts(parts: list[tuple[str, Any, tuple[int, int, int]]], q4_fields: dict[str, Fields]) -> tuple[str, torch.Tensor]:
    """One stacked projection from its GGUF tensors (``ffn_gate_exps`` + ``ffn_up_exps``, or one
    tensor): each part is (GGML type name, its raw blocks [E, rows, bytes] (a memory map, read a
    few experts at a time), shape [E, rows, K]); the parts' rows are stacked in order. Returns the
    layout and the packed [E, rows/16, K/32, tile] tensor, equal to `cpu_kernels.pack_q4` /
    `pack_i8` of each expert. Q4_0 / Q4_1 / Q8_0 blocks are moved byte for byte (their nibble order is
    the tiles'); the others go through their codes (Q4_K) or are re-quantized to int8 blocks."""
    layout = _layout([kind for kind, _, _ in parts])
    e, k = parts[0][2][0], parts[0][2][2]
    rows = sum(shape[1] for _, _, shape in parts)
    out = torch.empty((e, -(-rows // 16), k // 32, _TILE_BYTES[layout]), dtype=torch.uint8)
    step = max(1, (64 << 20) // max(1, sum(int(np.prod(data.shape[1:])) for _, data, _ in parts)))  # ~64 MB of blocks
    for e0 in range(0, e, step):
        chunk = [(kind, torch.from_numpy(np.array(data[e0 : e0 + step])), n) for kind, data, (_, n, _) in parts]
        out[e0 : e0 + step] = (_tiles_q4 if layout == "q4" else _tiles_i8)(chunk, k, q4_fields)
    return layout, out


def _rows_to_tiles(t: torch.Tensor) -> torch.Tensor:
    """[n, rows, kb, ...] -> [n, tiles, kb, 16, ...] (zero rows pad the last tile)."""
    pad = -t.shape[1] % 16
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)
    n, r, kb = t.shape[:3]
    return t.reshape(n, r // 16, 16, kb, *t.shape[3:]).transpose(2, 3)


def _tiles_q4(chunk: list[tuple[str, torch.Tensor, int]], k: int, q4_fields: dict[str, Fields]) -> torch.Tensor:
    nibs, ds, ms = [], [], []
    kb = k // 32
    for kind, raw, n in chunk:
        e = raw.shape[0]
        if kind in ("Q4_0", "Q4_1"):  # GGUF byte j: code j (low nibble) and code 16 + j (high), as the tiles want
            b = raw.reshape(e, n, kb, 18 if kind == "Q4_0" else 20)
            d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]
            m = (-8 * d.float()).half() if kind == "Q4_0" else b[..., 2:4].contiguous().view(torch.float16)[..., 0]
            nib = b[..., -16:]
        else:
            d, m, q = q4_fields[kind](raw.reshape(-1))
            q = q.reshape(e, n, kb, 32)
            nib = q[..., :16] | (q[..., 16:] << 4)
            d, m = (t.reshape(e, n, kb).half() for t in (d, m))
        nibs.append(nib)
        ds.append(d)
        ms.append(m)
    nib = _rows_to_tiles(torch.cat(nibs, 1))  # [e, nt, kb, 16 rows, 16 bytes]
    e, nt = nib.shape[:2]
    nib = nib.reshape(e, nt, kb, 16, 4, 4).transpose(3, 4).reshape(e, nt, kb, 256)  # [chunk c][row][byte i]
    d, m = (_rows_to_tiles(torch.cat(t, 1)).contiguous().view(torch.uint8).reshape(e, nt, kb, 32) for t in (ds, ms))
    return torch.cat([nib, d, m], dim=-1)


def _tiles_i8(chunk: list[tuple[str, torch.Tensor, int]], k: int, q4_fields: dict[str, Fields]) -> torch.Tensor:
    import gguf

    ds, qs = [], []
    kb = k // 32
    for kind, raw, n in chunk:
        e = raw.shape[0]
        d = q = None
        if kind == "Q8_0":  # its own codes, unless one is -128 (the AVX2 kernel cannot take it)
            b = raw.reshape(e, n, kb, 34)
            q = b[..., 2:].contiguous().view(torch.int8)
            d = b[..., 0:2].contiguous().view(torch.float16)[..., 0] if int(q.min()) >= -127 else None
        if d is None:
            w = np.asarray(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[kind]), dtype=np.float32)
            d, q = cpu_kernels.quantize_i8(torch.from_numpy(w).reshape(e * n, k))
            d, q = d.reshape(e, n, kb), q.reshape(e, n, kb, 32)
        ds.append(d)
        qs.append(q)
    q = _rows_to_tiles(torch.cat(qs, 1))  # [e, nt, kb, 16, 32]
    e, nt = q.shape[:2]
    q = q.reshape(e, nt, kb, 16, 8, 4).transpose(3, 4)  # [e, nt, kb, group g, row, byte i]
    sums = q.to(torch.int32).sum((3, 5)).to(torch.int16)  # [e, nt, kb, row]
    d = _rows_to_tiles(torch.cat(ds, 1))  # [e, nt, kb, 16] f16
    return torch.cat([q.reshape(e, nt, kb, 512).view(torch.uint8), sums.contiguous().view(torch.uint8).reshape(e, nt, kb, 32),
                      d.contiguous().view(torch.uint8).reshape(e, nt, kb, 32)], dim=-1)


def swap_packed_experts(model: nn.Module, packed: dict[int, dict[str, tuple[str, torch.Tensor]]], isa: str) -> int:
    """Replace layer L's float experts by `PackedExperts` for each ``packed[L] = {"gate_up": (layout,
    tensor), "down": (layout, tensor)}`` (the float experts' GLU and biases move over); returns how many."""
    for layer, proj in packed.items():
        moe = model.layers[layer].mlp
        old = moe.experts
        moe.experts = PackedExperts(proj["gate_up"][1], proj["down"][1], (proj["gate_up"][0], proj["down"][0]),
                                    old.hidden_size, old.intermediate_size, isa, old.glu,
                                    gate_up_bias=_real(old.gate_up_bias), down_bias=_real(old.down_bias))
    return len(packed)


def unpack_weight(packed: torch.Tensor, layout: str, rows: int) -> torch.Tensor:
    """The float32 weights [E, rows, K] a stack of `pack_q4` / `pack_i8` tiles holds (their inverse)."""
    e, nt, kb, _ = packed.shape
    if layout == "q4":
        nib = packed[..., :256].reshape(e, nt, kb, 4, 16, 4)  # [e, tile, block, chunk, row, byte]
        q = torch.stack([nib & 15, nib >> 4], dim=-1).permute(0, 1, 4, 2, 6, 3, 5)  # [e, tile, row, block, nibble, chunk, byte]
        d, m = (packed[..., a : a + 32].contiguous().view(torch.float16) for a in (256, 288))  # [e, tile, block, row]
        w = q.reshape(e, nt, 16, kb, 32).float() * d.transpose(2, 3).float().unsqueeze(-1) + m.transpose(2, 3).float().unsqueeze(-1)
    else:
        q = packed[..., :512].contiguous().view(torch.int8).reshape(e, nt, kb, 8, 16, 4).permute(0, 1, 4, 2, 3, 5)
        d = packed[..., 544:576].contiguous().view(torch.float16)  # [e, tile, block, row]
        w = q.reshape(e, nt, 16, kb, 32).float() * d.transpose(2, 3).float().unsqueeze(-1)
    return w.reshape(e, nt * 16, kb * 32)[:, :rows]


def unpack_experts(model: nn.Module) -> int:
    """Turn every `PackedExperts` of `model` back into bf16 `Experts` (expert offloading moves float
    experts between tiers); returns how many."""
    n = 0
    for mod in list(model.modules()):
        if isinstance(getattr(mod, "experts", None), PackedExperts):
            mod.experts = mod.experts.to_float()
            n += 1
    return n


def _real(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float()
