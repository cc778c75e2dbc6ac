"""`skip_meta_init`: a model built on meta inside it has the same parameters and buffers (names,
shapes, dtypes) as one built without it, no initializer reaches torch's random ops for its meta
tensors, and a tensor on a real device built inside it is still initialized."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from lagoon.model.args import ModelArgs
from lagoon.model.meta_init import skip_meta_init
from lagoon.model.transformer import Transformer

ARGS = ModelArgs(family="llama", vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 intermediate_size=96)


class _CountRandomOps(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        self.calls += getattr(func, "__name__", "") in ("uniform_", "normal_", "kaiming_uniform_")
        return func(*args, **(kwargs or {}))


def _signature(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
    return [(k, tuple(v.shape), v.dtype, v.is_meta) for k, v in model.state_dict(keep_vars=True).items()]


def test_meta_build_skips_initializers_and_keeps_every_tensor():
    with _CountRandomOps() as plain_count, torch.device("meta"):
        plain = Transformer(ARGS)
    with _CountRandomOps() as skipped_count, torch.device("meta"), skip_meta_init():
        skipped = Transformer(ARGS)
    assert plain_count.calls > 0, "the counter sees no initializer: this test checks nothing"
    assert skipped_count.calls == 0
    assert _signature(skipped) == _signature(plain)


def test_a_real_tensor_built_inside_is_still_initialized():
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 5)
    torch.manual_seed(0)
    with skip_meta_init():
        inside = torch.nn.Linear(8, 5)
    assert torch.equal(inside.weight, reference.weight) and torch.equal(inside.bias, reference.bias)
