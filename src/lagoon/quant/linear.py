"""`QuantizedLinear`: an `nn.Linear` replacement whose weight is held by a scheme.

A scheme (`int8`, `w8a8`, `int4`, `fp8`, `bf16`; one file each) is a small object with pure
functions over a dict of tensors: `quantize(w [N, K]) -> tensors`, `dequantize(tensors) -> [N, K]`,
`matmul(x [M, K], tensors, act) -> ([M, N], path, n_dynamic)` and `reference(...)`, the fp64 oracle
on dequantized operands (weights *and*, for activation-quantized schemes, activations). The same
functions serve a single Linear (tensors [N, ...]) and one expert of a stacked group
(`lagoon.quant.experts`, tensors [E, N, ...] indexed by expert).

`QuantizedLinear` stores the tensors as buffers (so `state_dict` and safetensors see them), keeps
`act_absmax` [3] — the calibrated static input range per token type, NaN until calibrated — and counts
which kernel path ran (`path_counts`) and how many tokens were scaled dynamically (`dynamic_tokens`).
With SmoothQuant (`lagoon.quant.smooth`) it also keeps ``smooth`` [K]: the stored weight is
``W · s`` and the input is divided by ``s`` before it is quantized; `dequantize` returns the weight
in the original coordinates (``W · s / s``).
It is *not* trainable: no gradients flow through the quantized weight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lagoon.quant.policy import N_TOKEN_TYPES, activation_absmax, current_token_types

__all__ = ["WeightScheme", "ActivationArgs", "QuantizedLinear"]


@dataclass
class ActivationArgs:
    """What an activation-quantized matmul needs to pick per-token scales."""

    static_absmax: torch.Tensor | None  # [N_TOKEN_TYPES], NaN = uncalibrated
    dynamic_threshold: float
    types: torch.Tensor | None  # [M] TokenType codes

    def absmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return activation_absmax(x, self.static_absmax, self.dynamic_threshold, self.types)


class WeightScheme:
    """Base of the schemes: the shared fp64 reference and byte count. Subclasses set `name`."""

    name: ClassVar[str] = ""
    activation_quantized: ClassVar[bool] = False
    GROUP_SIZES: ClassVar[tuple[int, ...]] = ()  # group sizes along K a grouped scheme supports; () = not grouped
    DEFAULT_GROUP_SIZE: ClassVar[int] = 0  # the largest group size tried per layer when the config names none
    PER_CHANNEL: ClassVar[bool] = False  # group_size 0 = per output channel, also where no group size divides K
    GROUP_N_MULTIPLE: ClassVar[int] = 16  # grouped layouts (the int4 CPU kernel's) need N a multiple of this

    def __init__(self, group_size: int = 128) -> None:
        self.group_size = group_size

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:  # w [N, K]
        raise NotImplementedError

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:  # -> [N, K] fp32
        raise NotImplementedError

    def matmul(
        self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs
    ) -> tuple[torch.Tensor, str, int]:  # x [M, K] -> [M, N]
        raise NotImplementedError

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        """The activation as the kernel sees it (identity for weight-only schemes)."""
        return x

    def reference(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> torch.Tensor:
        """fp64 oracle on dequantized operands: what `matmul` computes, up to kernel rounding."""
        xd = self.dequantize_activation(x.double(), act).double()
        return xd @ self.dequantize(t).double().t()


class QuantizedLinear(nn.Module):
    """Drop-in for `nn.Linear` (inference only). Build with `from_float`."""

    def __init__(
        self,
        scheme: WeightScheme,
        tensors: dict[str, torch.Tensor],
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        dynamic_threshold: float = 0.75,
        smooth: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = in_features, out_features
        self.dynamic_threshold = dynamic_threshold
        self._names = list(tensors)
        for k, v in tensors.items():
            self.register_buffer(k, v)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_absmax", torch.full((N_TOKEN_TYPES,), float("nan")))
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())  # [K]
        self.path_counts: Counter[str] = Counter()
        self.dynamic_tokens = 0

    @classmethod
    def from_float(
        cls, linear: nn.Linear, scheme: WeightScheme, dynamic_threshold: float = 0.75, smooth: torch.Tensor | None = None
    ) -> QuantizedLinear:
        """Quantize `linear`'s weight; with `smooth` [K], the weight is scaled by it first."""
        w = linear.weight.detach().float()  # [N, K]
        if smooth is not None:
            w = w * smooth.float().unsqueeze(0)
        tensors = scheme.quantize(w)
        return cls(scheme, tensors, linear.in_features, linear.out_features, linear.bias, dynamic_threshold, smooth)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._names}

    def act_args(self, m: int) -> ActivationArgs:
        static = None if torch.isnan(self.act_absmax).all() else self.act_absmax
        return ActivationArgs(static, self.dynamic_threshold, current_token_types(m))

    def dequantize(self) -> torch.Tensor:
        """The effective weight [N, K] in the input's original coordinates."""
        w = self.scheme.dequantize(self.tensors)
        return w if self.smooth is None else w / self.smooth.unsqueeze(0)

    def _smoothed(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 if self.smooth is None else x2.float() / self.smooth  # [M, K]

    def weight_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self._smoothed(x.reshape(-1, shape[-1]))  # [M, K]
        y, path, n_dyn = self.scheme.matmul(x2, self.tensors, self.act_args(x2.shape[0]))  # [M, N]
        self.path_counts[path] += 1
        self.dynamic_tokens += n_dyn
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """fp64 output on dequantized operands (bias included), for tests and fidelity."""
        x2 = x.reshape(-1, x.shape[-1])
        if self.smooth is not None:
            x2 = x2.double() / self.smooth.double()
        y = self.scheme.reference(x2, self.tensors, self.act_args(x2.shape[0]))
        if self.bias is not None:
            y = y + self.bias.double()
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.scheme.group_size}" if self.scheme.GROUP_SIZES else ""
        sm = ", smoothed" if self.smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}{g}{sm}"

