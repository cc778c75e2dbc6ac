"""`QuantizedExperts`: a stacked group of MoE experts with quantized weights.

Replaces an experts module that holds stacked parameters ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` (Lagoon's `lagoon.moe.Experts`, HF Qwen3-MoE / OLMoE / Mixtral in
transformers 5). Each expert's two matrices are quantized by the scheme one expert at a time and
the resulting tensors are stacked (``gate_up.<name> [E, ...]``), so one buffer per tensor kind holds
the whole group and `expert_linear(e, ...)` indexes it — the dispatch keeps working on a contiguous
group instead of E separate modules.

Activation ranges are per expert: ``gate_up_act_absmax`` / ``down_act_absmax`` [E, 3] (one per token
type; NaN = no calibration, which means dynamic scaling — what a starved expert gets).

Kernel choice follows each expert's token count (w8a8 takes `_int_mm` except for 2..16 tokens).

`forward(x [T, H], indices [T, k], weights [T, k], plan=None) -> [T, H]` is `lagoon.moe.Experts`'
signature (also HF's, without the plan): the dispatch plan's expert segments run one expert at a
time and are combined with `index_copy_` into slot order and a sum over each token's k slots;
capacity drops in the plan are respected. The token-type tags (`lagoon.quant.policy`) are gathered
per routed slot.

`gathered(x [T, H], indices [T, k]) -> [T, k, H]` is the static-shape path of the compiled decode
step (`lagoon.moe.experts` explains it): each slot reads only its expert's stored rows and the
product is written as multiply + sum so inductor fuses the gather, the int8 → float conversion and
the reduction. It exists for weight-only schemes whose tensors index per row (``qweight`` [E, N, K]
with an optional per-row ``scale`` [E, N]: per-channel int8, bf16); `gathered_ok` is False for the
packed int4 / group-wise int8 layouts (opaque kernel order) and activation-quantized schemes, whose
MoE decode stays eager. Not a router: routing stays in full precision in the MoE block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.moe.dispatch import DispatchPlan, plan_dispatch
from lagoon.quant.linear import ActivationArgs, WeightScheme
from lagoon.quant.policy import N_TOKEN_TYPES, current_token_types

__all__ = ["QuantizedExperts", "PROJ"]

PROJ = ("gate_up", "down")


def _stack(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


class QuantizedExperts(nn.Module):
    """E experts, SwiGLU-style: down_e( act(gate_e·x) ⊙ up_e·x ). Build with `from_float`."""

    def __init__(
        self,
        scheme: WeightScheme,
        gate_up: dict[str, torch.Tensor],
        down: dict[str, torch.Tensor],
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dynamic_threshold: float = 0.75,
        down_scheme: WeightScheme | None = None,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        # grouped schemes pick a group size per K: gate_up's K is H, down's is I
        self.schemes = {"gate_up": scheme, "down": down_scheme or scheme}
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn if act_fn is not None else F.silu
        self.glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # set: replaces act(gate)·up
        self.register_buffer("gate_up_bias", None)  # [E, 2I] float, when the experts have biases
        self.register_buffer("down_bias", None)  # [E, H]
        self.dynamic_threshold = dynamic_threshold
        self._names = {"gate_up": list(gate_up), "down": list(down)}
        for proj, tensors in (("gate_up", gate_up), ("down", down)):
            for k, v in tensors.items():
                self.register_buffer(f"{proj}_{k}", v)
            self.register_buffer(f"{proj}_act_absmax", torch.full((num_experts, N_TOKEN_TYPES), float("nan")))
        self.path_counts: Counter[str] = Counter()
        self.dynamic_tokens = 0

    @classmethod
    def from_float(
        cls, experts: nn.Module, scheme: WeightScheme, dynamic_threshold: float = 0.75, down_scheme: WeightScheme | None = None
    ) -> QuantizedExperts:
        """Quantize each expert; `down_scheme` (default: `scheme`) for the down projections."""
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2I, H], [E, H, I]
        e, two_i, h = gu.shape
        down_scheme = down_scheme or scheme
        gate_up = _stack([scheme.quantize(gu[i].float()) for i in range(e)])
        down = _stack([down_scheme.quantize(dn[i].float()) for i in range(e)])
        act = getattr(experts, "act_fn", None)
        q = cls(scheme, gate_up, down, e, h, two_i // 2, act, dynamic_threshold, down_scheme)
        q.glu = getattr(experts, "glu", None)  # lagoon.moe.GLU: the experts' own gated unit
        if getattr(experts, "gate_up_bias", None) is not None:  # gpt-oss: biases stay float
            q.gate_up_bias = experts.gate_up_bias.detach().float()
            q.down_bias = experts.down_bias.detach().float()
        return q

    def tensors(self, proj: str, e: int) -> dict[str, torch.Tensor]:
        """The scheme tensors of expert `e` for `proj` ('gate_up' or 'down')."""
        return {k: getattr(self, f"{proj}_{k}")[e] for k in self._names[proj]}

    def act_args(self, proj: str, e: int, types: torch.Tensor | None) -> ActivationArgs:
        static = getattr(self, f"{proj}_act_absmax")[e]
        return ActivationArgs(None if torch.isnan(static).all() else static, self.dynamic_threshold, types)

    def dequantize(self, proj: str, e: int) -> torch.Tensor:
        return self.schemes[proj].dequantize(self.tensors(proj, e))

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if not n.endswith("act_absmax"))

    def expert_linear(self, e: int, proj: str, x: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, K] -> [n, N] through expert `e`'s quantized `proj` matrix."""
        y, path, n_dyn = self.schemes[proj].matmul(x, self.tensors(proj, e), self.act_args(proj, e, types))
        self.path_counts[path] += 1
        self.dynamic_tokens += n_dyn
        return y.float()

    def gathered_ok(self) -> bool:
        """Whether `gathered` supports these schemes (see the module docstring)."""
        return all(not s.activation_quantized and "qweight" in self._names[p] and set(self._names[p]) <= {"qweight", "scale"}
                   for p, s in self.schemes.items())

    def _gathered_linear(self, proj: str, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # x [T, k or 1, K] -> [T, k, N] fp32; the activation rounded as the scheme's kernel rounds it
        q = getattr(self, f"{proj}_qweight")[indices].float()  # [T, k, N, K]
        xa = self.schemes[proj].dequantize_activation(x, None).float()
        y = (q * xa[..., None, :]).sum(-1)  # [T, k, N]
        if "scale" in self._names[proj]:
            y = y * getattr(self, f"{proj}_scale")[indices].float()  # per-row scale after the sum: exact
        return y

    def gathered(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each slot through its own quantized expert: [T, H], [T, k] -> [T, k, H] fp32."""
        h = self._gathered_linear("gate_up", x[:, None, :], indices)  # [T, k, 2I]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[indices]
        gate, up = h.chunk(2, dim=-1)
        h = self.glu(gate, up) if self.glu is not None else self.act_fn(gate) * up
        y = self._gathered_linear("down", h, indices)  # [T, k, H]
        return y if self.down_bias is None else y + self.down_bias[indices]

    def expert_forward(self, e: int, x: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, H] -> [n, H] through expert `e` (no routing weight)."""
        h = self.expert_linear(e, "gate_up", x, types)  # [n, 2I]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[e]
        gate, up = h.chunk(2, dim=-1)  # [n, I] each
        h = self.glu(gate, up) if self.glu is not None else self.act_fn(gate) * up
        y = self.expert_linear(e, "down", h, types)
        return y if self.down_bias is None else y + self.down_bias[e]

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan | None = None
    ) -> torch.Tensor:
        # T = tokens, k = experts per token, H = hidden, S = kept slots
        t = indices.shape[0]
        if plan is None:
            plan = plan_dispatch(indices, self.num_experts)
        types = current_token_types(t)
        slot_types = None if types is None else types.to(x.device)[plan.tokens]  # [S]
        ws = weights.reshape(-1)[plan.order].float()  # [S]
        ys = torch.empty(plan.tokens.numel(), self.hidden_dim, dtype=torch.float32, device=x.device)  # [S, H]
        start = 0
        for e, n in enumerate(plan.counts_kept.tolist()):
            if n == 0:
                continue
            seg = slice(start, start + n)
            ys[seg] = self.expert_forward(e, x[plan.tokens[seg]], None if slot_types is None else slot_types[seg])
            start += n
        # combine: back to slot order, then sum each token's k slots (index_add_ with repeated
        # indices is slow on CPU; dropped slots stay zero)
        k = indices.shape[-1]
        slots = ys.new_zeros(t * k, self.hidden_dim) if plan.dropped else ys.new_empty(t * k, self.hidden_dim)
        slots.index_copy_(0, plan.order, ys * ws.unsqueeze(-1))  # [T*k, H]
        return slots.view(t, k, -1).sum(dim=1).to(x.dtype)  # [T, H]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, scheme={self.scheme.name}"
