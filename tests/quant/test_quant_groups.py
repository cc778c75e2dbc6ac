"""Group sizes chosen per layer: the largest of 128/64/32 that divides K, recorded in the checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lagoon.errors import QuantizationError
from lagoon.moe import SparseMoE
from lagoon.quant import QuantConfig, load_quantized, quantize_, read_metadata, save_quantized
from lagoon.quant.fidelity import sqnr_db
from lagoon.quant.quantize import layer_group_size


class Wide(nn.Module):
    """576-wide layers (SmolLM2's hidden size), a 1536-wide one, a 96-wide one and a 100-wide one."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(576, 1536, bias=False)
        self.down = nn.Linear(1536, 576, bias=False)
        self.narrow = nn.Linear(576, 96, bias=False)
        self.back = nn.Linear(96, 576, bias=False)
        self.odd = nn.Linear(100, 100, bias=False)
        self.moe = SparseMoE(576, 96, 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(torch.relu(self.up(x)))
        x = x + self.back(self.narrow(x))
        return x + self.moe(x)


@pytest.fixture
def wide() -> Wide:
    torch.manual_seed(0)
    return Wide().eval()


def test_layer_group_size_rule() -> None:
    assert [layer_group_size("int4", k, 128) for k in (576, 1536, 96, 100, 4096)] == [64, 128, 32, None, 128]
    assert [layer_group_size("int4", k) for k in (576, 1536, 100)] == [32, 32, None]  # the default: 32
    assert [layer_group_size("int4", k, 32) for k in (576, 1536)] == [32, 32]
    assert layer_group_size("int4", 576, 64) == 64 and layer_group_size("w8a8", 576) == 0  # ungrouped: unchanged
    assert layer_group_size("int4", 576, n=8) is None and layer_group_size("int8", 576, n=8) == 0  # N % 16


@torch.no_grad()
def test_int4_group_128_adapts_per_layer_and_round_trips(wide: Wide, tmp_path) -> None:
    x = torch.randn(5, 576)
    ref = wide(x)
    report = quantize_(wide, QuantConfig(scheme="int4", group_size=128))
    got = {n: m.scheme.group_size for n, m in wide.named_modules() if hasattr(m, "scheme") and n != "moe.experts"}
    assert got == {"up": 64, "down": 128, "narrow": 64, "back": 32}
    assert wide.moe.experts.schemes["gate_up"].group_size == 64 and wide.moe.experts.schemes["down"].group_size == 32
    assert "odd" in report.kept and "100" in report.kept["odd"] and isinstance(wide.odd, nn.Linear)
    y = wide(x)
    assert sqnr_db(ref, y) > 12.0  # int4 (~20 dB a layer on Gaussian weights), compounded over three layers
    meta = read_metadata(save_quantized(wide, tmp_path / "q"))
    assert meta["group_sizes"] == {
        "up": 64, "down": 128, "narrow": 64, "back": 32, "moe.experts.gate_up": 64, "moe.experts.down": 32,
    }
    torch.manual_seed(5)
    loaded = load_quantized(Wide().eval(), tmp_path / "q")
    assert torch.equal(loaded(x), y)


def test_group_size_errors_name_the_fix() -> None:
    with pytest.raises(QuantizationError, match=r"use one of \(32, 64, 128\).*leave it unset"):
        QuantConfig(scheme="int4", group_size=48)
    only_odd = nn.Sequential(nn.Linear(100, 10))
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        quantize_(only_odd, QuantConfig(scheme="int4"))
