"""Native low-bit GGUF linears. `Q4_1Linear` runs a GGUF Q4_0 / Q4_1 / Q4_K weight on torch's CPU
int4 kernel with no re-quantization, because each maps exactly onto torch's layout (the fields come
from `lagoon.engine.gguf_blocks`):

    Q4_1 (blocks of 32):  w = d·q + m,            q in 0..15
    Q4_0 (blocks of 32):  w = d·(q − 8)           (m = −8·d)
    Q4_K (sub-blocks of 32): w = (d·sc)·q − dmin·mn  (d ← d·sc, m = −dmin·mn)
    torch int4 (group g): w = (q − 8)·scale + zero  →  scale = d, zero = m + 8·d, g = 32

`Q4ActLinear` holds the same (d, m, q) in `lagoon.engine.cpu_kernels`' layout (f16 d and m, which
Q4_0 / Q4_1 store exactly) and runs Lagoon's own kernel with int8 activations, the faster choice
where its library builds (`lagoon.engine.kernels`); `Q8ActLinear` likewise runs the output head in int8 blocks of 32
(Q8_0's own codes when the head is a Q8_0 tensor, where `Int8Linear` re-quantizes per channel).

`Int8Linear` is weight-only int8 per output channel on `torch._weight_int8pack_mm`: the output head
(tied to a Q8_0 embedding) everywhere, Q5_0 / Q5_1 / Q6_K / Q8_0 linears, and 4-bit linears on
CPUs where int8 is the faster kernel (`lagoon.engine.kernels`). Its re-quantization error is below
a 4-bit file's own step. Both can be rebuilt from their stored buffers (`from_packed`,
`from_buffers`) by `lagoon.engine.repack_cache`.

The only loss beyond the file's own is bf16 scales and bf16 activations (the kernel's input type).
`swap_q4_1(model, fields)` replaces the named `nn.Linear`s from outside; the model file never
branches on it. This is *not* a general quantizer (that is `lagoon.quant`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.quant.int8 import int8pack_fits, quantize_per_channel_int8

__all__ = ["Q4ActLinear", "Q4_1Linear", "Q8Linear", "Int8Linear", "Q8ActLinear", "swap_q4_1", "swap_q8", "swap_int8", "GROUP",
           "FUSED", "fuse_projections", "install_fused"]

GROUP = 32
PREFILL_MIN_M = 16
"""Rows (tokens) from which a linear holding a `dense` copy multiplies by it instead: the low-bit
matrix-vector kernels are bandwidth-bound wins at decode but 8-10x slower than a bf16 (AMX/AVX-512)
or fp32 GEMM at prefill (576x1536, M = 1000: int4pack 20 ms, int8pack 20 ms, bf16 1.8 ms, fp32 11 ms)."""


def _out(y: torch.Tensor, bias: torch.Tensor | None, shape: torch.Size, n: int, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:  # Qwen2's q/k/v projections carry one
        y = y + bias
    return y.reshape(*shape[:-1], n).to(dtype)


def _take_bias(new: nn.Module, old: nn.Linear) -> nn.Module:
    new.bias = None if old.bias is None else old.bias.detach()
    return new


def _prefill(x2: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor | None:
    if dense is None or x2.shape[0] < PREFILL_MIN_M:
        return None
    return F.linear(x2.to(dense.dtype), dense)  # [M, N]


class Q4_1Linear(nn.Module):
    """A Q4_0 / Q4_1 weight on the int4 kernel; with `dense` (a dtype) also a dense copy of the same
    values for prefill-sized inputs (`PREFILL_MIN_M`)."""

    def __init__(self, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, out_features: int, in_features: int,
                 dense: torch.dtype | None = None) -> None:
        # d, m [N*K/32, 1] f32; q [N*K/32, 32] uint8 (row-major blocks of the [N, K] weight)
        super().__init__()
        N, K = out_features, in_features
        qi = q.reshape(N, K).to(torch.int32)  # [N, K]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 2)
        d = d.reshape(N, K // GROUP)
        m = m.reshape(N, K // GROUP)
        sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()  # [K/32, N, 2]
        w = None
        if dense is not None:  # the kernel's own values: (q - 8)·scale + zero with its bf16 scales
            scale, zero = (sz.to(torch.bfloat16).float()[..., i].t().unsqueeze(-1) for i in (0, 1))  # [N, K/32, 1]
            w = ((qi.reshape(N, K // GROUP, GROUP).float() - 8) * scale + zero).reshape(N, K).to(dense)
        self._attach(packed, sz.to(torch.bfloat16), w, N, K)

    def _attach(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, dense: torch.Tensor | None,
                out_features: int, in_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/32, N, 2] bf16
        self.register_buffer("dense", dense, persistent=False)  # [N, K] or None
        self.register_buffer("bias", None)  # [N] or None (set by the swap)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales_and_zeros: torch.Tensor, dense: torch.Tensor | None,
                    out_features: int, in_features: int) -> Q4_1Linear:
        """The layer from buffers an earlier one held (`lagoon.engine.repack_cache`), no repacking."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(packed, scales_and_zeros, dense, out_features, in_features)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [M, K]
        y = _prefill(x2, self.dense)
        if y is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_and_zeros)  # [M, N]
        return _out(y, self.bias, shape, self.out_features, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf=Q4_1"


class Q4ActLinear(nn.Module):
    """A Q4_0 / Q4_1 / Q4_K weight on `lagoon.engine.cpu_kernels`' int8-activation kernel (variant
    `isa`: 'avx512' | 'avx2' | 'default'); with `dense` (a dtype) also a dense copy of the same values
    for prefill-sized inputs (`PREFILL_MIN_M`). Any number of output rows; in_features % 32 == 0."""

    def __init__(self, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, out_features: int, in_features: int,
                 isa: str, dense: torch.dtype | None = None) -> None:
        # d, m [N*K/32, 1] f32; q [N*K/32, 32] uint8 (row-major blocks of the [N, K] weight)
        from lagoon.engine.cpu_kernels import pack_q4

        super().__init__()
        N, K = out_features, in_features
        w = None
        if dense is not None:  # the kernel's own values: q·d + m with f16 d and m
            d16, m16 = (t.reshape(-1, 1).to(torch.float16).float() for t in (d, m))
            w = (q.reshape(-1, GROUP).float() * d16 + m16).reshape(N, K).to(dense)
        self._attach(pack_q4(d, m, q, N, K), w, N, K, isa)

    def _attach(self, packed: torch.Tensor, dense: torch.Tensor | None, out_features: int, in_features: int,
                isa: str) -> None:
        from lagoon.engine.cpu_kernels import ISA_CODES

        self.in_features, self.out_features = in_features, out_features
        self.isa = ISA_CODES[isa]  # a plain int: a constant in the compiled graph (and in its cache key)
        self.register_buffer("packed", packed)  # [ceil(N/16), K/32, 320] uint8
        self.register_buffer("dense", dense, persistent=False)  # [N, K] or None
        self.register_buffer("bias", None)  # [N] or None (set by the swap)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, dense: torch.Tensor | None, out_features: int, in_features: int,
                    isa: str) -> Q4ActLinear:
        """The layer from buffers an earlier one held (`lagoon.engine.repack_cache`), no repacking."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(packed, dense, out_features, in_features, isa)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        y = _prefill(x2, self.dense)
        if y is None:
            if x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.float()
            y = torch.ops.lagoon.q4_matvec(x2, self.packed, self.out_features, self.isa)  # [M, N]
        return _out(y, self.bias, shape, self.out_features, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf=Q4, int8 activations"


def swap_q4_1(model: nn.Module, fields: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              dense: torch.dtype | None = None, act_isa: str | None = None) -> int:
    """Replace each `nn.Linear` whose weight name is in `fields` ({'layers.0.mlp.up_proj.weight':
    (d, m, q)}) by a `Q4_1Linear`, or with `act_isa` a `Q4ActLinear` running that kernel variant
    (with a `dense` prefill copy in that dtype, if given); returns how many were swapped."""
    n = 0
    for name, (d, m, q) in fields.items():
        path = name.removesuffix(".weight").split(".")
        parent = model.get_submodule(".".join(path[:-1]))
        old = getattr(parent, path[-1])
        if not isinstance(old, nn.Linear) or old.in_features % GROUP:
            continue
        N, K = old.out_features, old.in_features
        new = Q4_1Linear(d, m, q, N, K, dense) if act_isa is None else Q4ActLinear(d, m, q, N, K, act_isa, dense)
        setattr(parent, path[-1], _take_bias(new, old))
        n += 1
    return n


class Q8Linear(nn.Module):
    """A GGUF Q8_0 weight (blocks of 32: w = d·q, q int8) exactly, up to bf16 scales, on the int4
    kernel: codes c = q + 128 split into nibbles c = 16·h + l, and

        x·wᵀ = int4mm(x, h; scale 16·d, zero 0) + int4mm(x, l; scale d, zero 8·d)

    (the kernel computes (nibble − 8)·scale + zero per group of 32), the group-wise int8 layout of
    `lagoon.quant.int8`. With `dense` (a dtype) also a dense copy for prefill-sized inputs."""

    def __init__(self, d: torch.Tensor, q: torch.Tensor, out_features: int, in_features: int,
                 dense: torch.dtype | None = None) -> None:
        # d [N*K/32, 1] f32; q [N*K/32, 32] int8 (row-major blocks of the [N, K] weight)
        super().__init__()
        N, K = out_features, in_features
        c = (q.reshape(N, K).to(torch.int32) + 128)  # [N, K] in 0..255
        hi = torch.ops.aten._convert_weight_to_int4pack_for_cpu((c >> 4).contiguous(), 2)
        lo = torch.ops.aten._convert_weight_to_int4pack_for_cpu((c & 15).contiguous(), 2)
        s = d.reshape(N, K // GROUP).t().to(torch.bfloat16)  # [K/32, N]
        w = None
        if dense is not None:  # the kernels' own values: q·d with d in bf16
            w = (q.reshape(N, K // GROUP, GROUP).float() * s.t().float().unsqueeze(-1)).reshape(N, K).to(dense)
        self._attach(hi, lo, torch.stack([s * 16, torch.zeros_like(s)], dim=-1), w, N, K)

    def _attach(self, packed_hi: torch.Tensor, packed_lo: torch.Tensor, scales_and_zeros: torch.Tensor,
                dense: torch.Tensor | None, out_features: int, in_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed_hi", packed_hi)
        self.register_buffer("packed_lo", packed_lo)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/32, N, 2] bf16: (16·d, 0)
        s = scales_and_zeros[..., 0]  # the low nibbles' (d, 8·d), exact in bf16; built once (100 us a call)
        self.register_buffer("low_scales", torch.stack([s / 16, s / 2], dim=-1), persistent=False)
        self.register_buffer("dense", dense, persistent=False)  # [N, K] or None
        self.register_buffer("bias", None)  # [N] or None (set by the swap)

    @classmethod
    def from_packed(cls, packed_hi: torch.Tensor, packed_lo: torch.Tensor, scales_and_zeros: torch.Tensor,
                    dense: torch.Tensor | None, out_features: int, in_features: int) -> Q8Linear:
        """The layer from buffers an earlier one held (`lagoon.engine.repack_cache`), no repacking."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(packed_hi, packed_lo, scales_and_zeros, dense, out_features, in_features)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [M, K]
        y = _prefill(x2, self.dense)
        if y is None:
            hi = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed_hi, GROUP, self.scales_and_zeros)
            y = hi.float() + torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed_lo, GROUP, self.low_scales)
        return _out(y, self.bias, shape, self.out_features, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf=Q8_0"


def swap_q8(model: nn.Module, fields: dict[str, tuple[torch.Tensor, torch.Tensor]],
            dense: torch.dtype | None = None) -> int:
    """Replace each `nn.Linear` whose weight name is in `fields` ({name: (d, q)}) by a `Q8Linear`;
    returns how many were swapped."""
    n = 0
    for name, (d, q) in fields.items():
        path = name.removesuffix(".weight").split(".")
        parent = model.get_submodule(".".join(path[:-1]))
        old = getattr(parent, path[-1])
        if not isinstance(old, nn.Linear) or old.in_features % GROUP:
            continue
        setattr(parent, path[-1], _take_bias(Q8Linear(d, q, old.out_features, old.in_features, dense), old))
        n += 1
    return n


class Int8Linear(nn.Module):
    """w ≈ qweight · scale (per output channel), bf16 activations. With `dense` (a dtype)
    also a dense copy of the same values for prefill-sized inputs (`PREFILL_MIN_M`)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dense: torch.dtype | None = None) -> None:
        # qweight [N, K] int8, scale [N] bf16 (the kernel's dtype)
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        w = None if dense is None else (qweight.float() * scale.float()[:, None]).to(dense)
        self.register_buffer("dense", w, persistent=False)  # [N, K] or None
        self.register_buffer("bias", None)  # [N] or None (set by the swap)

    @classmethod
    def from_buffers(cls, qweight: torch.Tensor, scale: torch.Tensor, dense: torch.Tensor | None) -> Int8Linear:
        """The layer from buffers an earlier one held (`lagoon.engine.repack_cache`), no recomputing."""
        layer = cls(qweight, scale)
        layer.dense = dense
        return layer

    @classmethod
    def from_weight(cls, w: torch.Tensor, dense: torch.dtype | None = None) -> Int8Linear:
        return cls(*quantize_per_channel_int8(w, torch.bfloat16), dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [M, K]
        y = _prefill(x2, self.dense)
        if y is None and not int8pack_fits(self.in_features):
            y = (x2.float() @ self.qweight.float().t()) * self.scale.float()  # [M, N]
        if y is None:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)  # [M, N]
        return _out(y, self.bias, shape, self.out_features, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Q8ActLinear(nn.Module):
    """A weight in int8 blocks of 32 along each row (w = d·q, GGUF Q8_0's rounding; a weight read
    from a Q8_0 file gets its own codes back) on `lagoon.engine.cpu_kernels`' int8-activation kernel
    (variant `isa`). For the output head: one row per sequence at decode and at prefill, so no
    dense copy. in_features % 32 == 0."""

    def __init__(self, w: torch.Tensor, isa: str) -> None:
        # w [N, K] float
        from lagoon.engine.cpu_kernels import pack_i8, quantize_i8

        super().__init__()
        self._attach(pack_i8(*quantize_i8(w)), *w.shape, isa)

    def _attach(self, packed: torch.Tensor, out_features: int, in_features: int, isa: str) -> None:
        from lagoon.engine.cpu_kernels import ISA_CODES

        self.out_features, self.in_features = out_features, in_features
        self.isa = ISA_CODES[isa]  # a plain int: a constant in the compiled graph (and in its cache key)
        self.register_buffer("packed", packed)  # [ceil(N/16), K/32, 576] uint8
        self.register_buffer("bias", None)  # [N] or None (set by the swap)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, out_features: int, in_features: int, isa: str) -> Q8ActLinear:
        """The layer from buffers an earlier one held (`lagoon.engine.repack_cache`), no repacking."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(packed, out_features, in_features, isa)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        y = torch.ops.lagoon.i8_matvec(x2, self.packed, self.out_features, self.isa)  # [M, N]
        return _out(y, self.bias, shape, self.out_features, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of 32, int8 activations"


def swap_int8(model: nn.Module, weights: dict[str, torch.Tensor], dense: torch.dtype | None = None,
              act_isa: str | None = None) -> int:
    """Replace each `nn.Linear` (keeping its bias) named in `weights` ({'lm_head.weight': w [N, K] float}) by
    an `Int8Linear` quantized from `w` (with a `dense` prefill copy, if given), or with `act_isa` (and
    no `dense`) a `Q8ActLinear` running that kernel variant; returns how many were swapped."""
    n = 0
    for name, w in weights.items():
        path = name.removesuffix(".weight").split(".")
        parent = model.get_submodule(".".join(path[:-1]))
        old = getattr(parent, path[-1])
        if not isinstance(old, nn.Linear):
            continue
        if act_isa is not None and dense is None and old.in_features % GROUP == 0:
            new: nn.Module = Q8ActLinear(w, act_isa)
        else:
            new = Int8Linear.from_weight(w.float(), dense)
        setattr(parent, path[-1], _take_bias(new, old))
        n += 1
    return n


FUSED: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""The model's joined linears (attributes of its attention / MLP, None until set) -> the linears each
joins, in row order."""


def _fused(parts: list[nn.Module]) -> Q4ActLinear | None:
    """One `Q4ActLinear` whose rows are `parts`' rows in order, or None when they cannot share one:
    not all Lagoon-kernel 4-bit linears, a bias, different inputs or kernels, a part whose rows end
    inside a 16-row tile, or a dense copy on some only."""
    from lagoon.engine.cpu_kernels import ISA_CODES

    if not all(type(p) is Q4ActLinear and p.bias is None for p in parts):
        return None
    first = parts[0]
    if any(p.in_features != first.in_features or p.isa != first.isa or p.out_features % 16 for p in parts):
        return None
    if len({p.dense is None or p.dense.dtype for p in parts}) != 1:
        return None
    dense = None if first.dense is None else torch.cat([p.dense for p in parts])
    isa = {v: k for k, v in ISA_CODES.items()}[first.isa]
    return Q4ActLinear.from_packed(torch.cat([p.packed for p in parts]), dense,
                                   sum(p.out_features for p in parts), first.in_features, isa)


def fuse_projections(model: nn.Module) -> int:
    """Join each attention's q/k/v and each MLP's gate/up into one `Q4ActLinear` (the model's
    `qkv_proj` / `gate_up_proj`): one kernel call and one activation quantization instead of three
    and two. Exact: the kernel gives each output row what it gives alone (tests). Returns how many
    were joined; the separate linears are removed so nothing holds their bytes twice."""
    n = 0
    for module in list(model.modules()):
        for target, names in FUSED.items():
            if not hasattr(module, target) or getattr(module, target) is not None:
                continue
            parts = [getattr(module, a, None) for a in names]
            fused = None if None in parts else _fused(parts)
            if fused is None:
                continue
            install_fused(module, target, fused)
            n += 1
    return n


def install_fused(module: nn.Module, target: str, fused: nn.Module) -> None:
    """Put `fused` in `module` as `target` (a key of `FUSED`) and remove the linears it joins. One
    place for both a fresh fusion and the repack cache's rebuild of one, so both give the same module
    order (the compiled step's cache key hashes the module names in order)."""
    setattr(module, target, fused)
    for a in FUSED[target]:
        delattr(module, a)
