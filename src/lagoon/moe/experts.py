"""Routed experts stored as stacked tensors, run on contiguous per-expert segments.

Layout (transformers 5.23's, so a HF ``*Experts`` module's state dict loads 1:1):
``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows) and ``down_proj [E, H, I]``.
Expert e computes ``down_proj[e] @ glu(gate, up) (+ down_bias[e])`` with ``gate, up = gate_up_proj[e] @ x
(+ gate_up_bias[e])``. The gated unit and the biases are properties of the experts (`GLU`): ``gated``
is ``act(gate) * up`` (every SwiGLU family); ``clamped`` is gpt-oss's
``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``; gpt-oss also
carries ``gate_up_bias [E, 2I]`` and ``down_bias [E, H]``. Every expert path (fast, reference,
offloaded, quantized) calls the same `GLU` and adds the same biases.

* `Experts` — the fast path: `plan_dispatch` sorts slots by expert, each expert runs its
  contiguous segment (``impl``: ``loop`` = one ``F.linear`` pair per non-empty expert,
  ``grouped_mm`` = ``torch.nn.functional.grouped_mm`` over the offsets, ``auto`` = ``grouped_mm``
  where the kernel exists for the device and dtype (it matched or beat the loop on CPU in
  ``benchmarks/bench_moe.py``), else ``loop``), then outputs are weighted, put back in slot order
  and summed over each token's k slots (combine).
* `ReferenceExperts` — the oracle: gathers every slot's expert weights and applies them with
  ``einsum``; slow and memory-hungry (T*k copies of the weights) but obviously right. Every fast,
  quantized or offloaded expert path is tested against it.

Both take ``forward(x [T, H], indices [T, k], weights [T, k], plan=None) -> [T, H]``; a plan with
capacity drops zeroes the dropped slots in both.

* ``gathered(x [T, H], indices [T, k]) -> [T, k, H]`` fp32 (both) — the static-shape path of the
  compiled decode step (`lagoon.moe.layer`): every slot's output before weighting, each slot reading
  its own expert's rows (llama.cpp's mul_mat_id). Written as index + multiply + sum rather than a
  matmul so that inductor fuses the gather into the reduction and reads only the chosen experts'
  bytes once; run eagerly it materialises T*k weight copies (fine for the tests, not for prefill).
  A quantized GGUF's experts are swapped from outside for `lagoon.engine.packed_experts.PackedExperts`,
  whose ``forward`` and ``gathered`` are Lagoon's MoE kernels (the same slots, at the file's bit width).

Not here: routing (`lagoon.moe.router`) or shared experts (`lagoon.moe.layer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.errors import ConfigError
from lagoon.moe.dispatch import DispatchPlan, plan_dispatch
from lagoon.registry import Registry

__all__ = ["ACTIVATIONS", "EXPERT_IMPLS", "GLU", "GLU_KINDS", "Experts", "ReferenceExperts", "StackedExperts", "activation"]

ACTIVATIONS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("activation", {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
})

EXPERT_IMPLS = ("auto", "loop", "grouped_mm")
GLU_KINDS = ("gated", "clamped")


@dataclass(frozen=True)
class GLU:
    """The gated unit between an expert's two matmuls: ``glu(gate, up) -> [n, I]``."""

    act: str = "silu"
    kind: str = "gated"
    alpha: float = 1.702  # clamped: sigmoid sharpness
    limit: float = 7.0  # clamped: gate <= limit, |up| <= limit

    def __post_init__(self) -> None:
        if self.kind not in GLU_KINDS:
            raise ConfigError(f"unknown expert GLU {self.kind!r}; valid: {', '.join(GLU_KINDS)}")
        activation(self.act)  # fail at build time on an unknown activation

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return activation(self.act)(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name` (HF ``hidden_act`` spelling); ConfigError lists the valid ones."""
    return ACTIVATIONS.load(name)


def _grouped_mm_ok(xs: torch.Tensor, intermediate: int) -> bool:
    # CPU: any float dtype, and it matched or beat the loop at every shape benchmarked (decode is
    # memory-bound either way; prefill gained up to ~2x). CUDA kernels want bf16 on SM80+.
    # Every operand's row stride must be whole 16-byte units (bf16 experts 20 wide are not)
    if not hasattr(F, "grouped_mm") or any(n * xs.element_size() % 16 for n in (xs.shape[-1], intermediate)):
        return False
    if xs.device.type == "cpu":
        return True
    return xs.device.type == "cuda" and xs.dtype == torch.bfloat16 and torch.cuda.get_device_capability(xs.device) >= (8, 0)


class StackedExperts(nn.Module):
    """Parameters and activation shared by the fast and the reference experts."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu", *,
        glu: GLU | None = None, bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.act = act
        self.act_fn = activation(act)
        self.glu = glu or GLU(act)
        e, h, i = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(e, h, i))  # [E, H, I]
        if not self.down_proj.is_meta:  # on meta (every checkpoint load) normal_'s meta kernel imports torch._dynamo
            nn.init.normal_(self.gate_up_proj, std=h**-0.5)
            nn.init.normal_(self.down_proj, std=i**-0.5)
        self.gate_up_bias = nn.Parameter(torch.zeros(e, 2 * i)) if bias else None  # [E, 2I]
        self.down_bias = nn.Parameter(torch.zeros(e, h)) if bias else None  # [E, H]

    def gathered_ok(self) -> bool:
        return True

    def gathered(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each slot through its own expert: [T, H], [T, k] -> [T, k, H] fp32 (no routing weight)."""
        # T = tokens, k = top_k, H = hidden, I = intermediate
        xf = x.float()[:, None, None, :]  # [T, 1, 1, H]
        h = (self.gate_up_proj[indices].float() * xf).sum(-1)  # [T, k, 2I]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[indices].float()
        gate, up = h.chunk(2, dim=-1)
        g = self.glu(gate, up)[:, :, None, :]  # [T, k, 1, I]
        y = (self.down_proj[indices].float() * g).sum(-1)  # [T, k, H]
        return y if self.down_bias is None else y + self.down_bias[indices].float()

    def share_weights(self, other: StackedExperts) -> StackedExperts:
        """Point this module's parameters (and GLU) at `other`'s (no copy); returns self."""
        self.gate_up_proj = other.gate_up_proj
        self.down_proj = other.down_proj
        self.gate_up_bias, self.down_bias, self.glu = other.gate_up_bias, other.down_bias, other.glu
        return self

    def extra_repr(self) -> str:
        bias = ", bias" if self.gate_up_bias is not None else ""
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"act={self.act}, glu={self.glu.kind}{bias}")


class Experts(StackedExperts):
    """Sort-by-expert dispatch, contiguous segments, weighted index-add combine."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu", impl: str = "auto",
        *, glu: GLU | None = None, bias: bool = False,
    ) -> None:
        super().__init__(num_experts, hidden_size, intermediate_size, act, glu=glu, bias=bias)
        if impl not in EXPERT_IMPLS:
            raise ConfigError(f"unknown experts impl {impl!r}; valid: {', '.join(EXPERT_IMPLS)}")
        self.impl = impl

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan | None = None
    ) -> torch.Tensor:
        # T = tokens, H = hidden, I = intermediate, S = kept slots
        if plan is None:
            plan = plan_dispatch(indices, self.num_experts)
        xs = x[plan.tokens]  # [S, H] grouped by expert
        ws = weights.reshape(-1)[plan.order]  # [S]
        impl = self.impl
        if impl == "auto":
            impl = "grouped_mm" if _grouped_mm_ok(xs, self.intermediate_size) else "loop"
        ys = self._grouped(xs, plan) if impl == "grouped_mm" else self._loop(xs, plan)  # [S, H]
        ys = ys * ws.unsqueeze(-1).to(ys.dtype)
        # combine: back to slot order, then sum each token's k slots. (index_add_ with repeated
        # indices took ~50 ms for one token on a busy 2-core CPU; this is deterministic and cheap.)
        t, k = indices.shape
        slots = ys.new_zeros(t * k, ys.shape[-1]) if plan.dropped else ys.new_empty(t * k, ys.shape[-1])
        slots.index_copy_(0, plan.order, ys)  # [T*k, H]
        return slots.view(t, k, -1).sum(dim=1).to(x.dtype)  # [T, H]

    def _loop(self, xs: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        outs = []
        start = 0
        for e, n in enumerate(plan.counts_kept.tolist()):
            if n == 0:
                continue
            seg = xs[start : start + n]  # [n, H]
            gub, db = (None, None) if self.gate_up_bias is None else (self.gate_up_bias[e], self.down_bias[e])
            gate, up = F.linear(seg, self.gate_up_proj[e], gub).chunk(2, dim=-1)  # [n, I] each
            outs.append(F.linear(self.glu(gate, up), self.down_proj[e], db))  # [n, H]
            start += n
        if not outs:
            return xs.new_zeros(0, self.hidden_size)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _grouped(self, xs: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        offs = plan.offsets.to(xs.device)
        h = F.grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs)  # [S, 2I]
        eid = None
        if self.gate_up_bias is not None:
            eid = torch.repeat_interleave(torch.arange(self.num_experts, device=xs.device), plan.counts_kept.to(xs.device))
            h = h + self.gate_up_bias[eid]  # [S, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = F.grouped_mm(self.glu(gate, up), self.down_proj.transpose(-2, -1), offs=offs)  # [S, H]
        return y if eid is None else y + self.down_bias[eid]


class ReferenceExperts(StackedExperts):
    """Oracle: per-slot weight gather + einsum. Slow; for tests and as the ground truth."""

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan | None = None
    ) -> torch.Tensor:
        # T = tokens, k = top_k, H = hidden, I = intermediate
        if plan is not None:
            weights = weights * plan.kept.view(indices.shape).to(weights.dtype)
        w_gu = self.gate_up_proj[indices]  # [T, k, 2I, H]
        w_d = self.down_proj[indices]  # [T, k, H, I]
        h = torch.einsum("th,tkoh->tko", x, w_gu)  # [T, k, 2I]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[indices]
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tki,tkhi->tkh", self.glu(gate, up), w_d)  # [T, k, H]
        if self.down_bias is not None:
            y = y + self.down_bias[indices]
        return torch.einsum("tkh,tk->th", y, weights.to(y.dtype))  # [T, H]
