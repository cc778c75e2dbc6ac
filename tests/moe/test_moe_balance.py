import json
import math

import numpy as np
import pytest
import torch

from lagoon.errors import UnsupportedModelError
from lagoon.moe import SparseMoE
from lagoon.moe.balance import ExpertLoadMonitor, load_stats
from lagoon.telemetry import Telemetry


def test_metrics_by_hand():
    s = load_stats(np.array([6, 2, 2, 2]))
    # mean 3, max 6, std sqrt(((3)^2 + 3*(1)^2)/4) = sqrt(3)
    assert math.isclose(s["balancedness"], 0.5)
    assert math.isclose(s["cv"], math.sqrt(3) / 3)
    assert math.isclose(s["max_violation"], 1.0)
    p = np.array([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert math.isclose(s["entropy"], float(-(p * np.log(p)).sum()))
    assert math.isclose(s["entropy_norm"], s["entropy"] / math.log(4))
    even = load_stats(np.array([5, 5, 5, 5]))
    assert even["balancedness"] == 1.0 and even["cv"] == 0.0 and math.isclose(even["entropy_norm"], 1.0)
    assert load_stats(np.zeros(4))["balancedness"] == 1.0


def test_window_rolls_and_known_assignment():
    mon = ExpertLoadMonitor(window=2)
    mon.record("l0", np.array([4, 0, 0, 0]), dropped=1)
    mon.record("l0", np.array([0, 2, 2, 0]))
    mon.record("l0", np.array([1, 1, 1, 1]), dropped=3)  # first step leaves the window
    snap = mon.snapshot()
    layer = snap["layers"][0]
    assert layer["tokens"] == [1, 3, 3, 1] and layer["dropped"] == 3 and layer["steps"] == 2
    assert math.isclose(layer["balancedness"], 2 / 3)
    assert math.isclose(layer["max_violation"], 0.5)
    json.dumps(snap)


def test_attach_counts_real_routing_and_publishes_gauges(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(SparseMoE(16, 8, 4, 2), SparseMoE(16, 8, 4, 1, capacity_factor=0.5))
    tel = Telemetry()
    mon = ExpertLoadMonitor(window=10, telemetry=tel).attach(model)
    x = torch.randn(12, 16)
    with torch.no_grad():
        model(x)
        model(x)
    idx0 = model[0].last_routing.indices
    expect0 = torch.bincount(idx0.flatten(), minlength=4) * 2
    snap = mon.snapshot()
    names = [layer["name"] for layer in snap["layers"]]
    assert names == ["0", "1"]
    assert snap["layers"][0]["tokens"] == expect0.tolist()
    assert sum(snap["layers"][1]["tokens"]) == 24  # top-1, 12 tokens, 2 calls (routed, before drops)
    assert snap["layers"][1]["dropped"] == 2 * model[1].last_dropped > 0
    assert tel.value("lagoon_moe_balancedness", {"layer": "0"}) == pytest.approx(snap["layers"][0]["balancedness"])
    assert tel.value("lagoon_moe_dropped_slots_total", {"layer": "1"}) == snap["layers"][1]["dropped"]
    assert b"lagoon_moe_load_cv" in tel.prometheus_text()
    png = mon.plot(tmp_path / "heat" / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mon.detach()
    model(x)
    assert mon.snapshot()["layers"][0]["steps"] == 2


def test_attach_needs_moe_blocks():
    with pytest.raises(UnsupportedModelError, match="no SparseMoE"):
        ExpertLoadMonitor().attach(torch.nn.Linear(2, 2))
