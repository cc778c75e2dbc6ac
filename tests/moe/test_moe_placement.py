import numpy as np
import pytest

from lagoon.errors import ConfigError
from lagoon.moe.placement import balancedness, plan_placement


def test_by_hand_small_case():
    # 4 experts on 2 devices, 2 redundant slots -> 3 slots per device
    p = plan_placement([[8, 4, 2, 2]], num_devices=2, num_redundant=2)
    # replicas: 8 -> 2 copies (4 each), then max load/replica is 4 (expert 0 at 4, expert 1 at 4) -> expert 0
    assert p.replicas.tolist() == [[3, 1, 1, 1]]
    # pack heaviest first into the lightest device with room (3 slots each):
    # e1 4 -> d0 (4); e0 8/3 -> d1 (8/3); e0 -> d1 (16/3); e0 -> d0 (20/3); e2 2 -> d1 (22/3, full); e3 -> d0
    assert p.device_load[0].tolist() == pytest.approx([26 / 3, 22 / 3])
    assert p.phy2log[0].tolist() == [1, 0, 3, 0, 0, 2]
    assert p.balancedness_before == pytest.approx(8 / 12)  # naive devices: [12, 4] -> mean 8 / max 12
    assert p.balancedness_after == pytest.approx(8 / (26 / 3))
    slots = p.log2phy()[0]
    assert len(slots[0]) == 3 and all(len(s) == 1 for s in slots[1:])
    assert sorted(p.phy2log[0].tolist()) == [0, 0, 0, 1, 2, 3]


def test_eplb_readme_loads_improve():
    w = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    p = plan_placement(w, num_devices=8, num_redundant=4)
    assert p.phy2log.shape == (2, 16) and (p.replicas.sum(axis=1) == 16).all()
    assert p.balancedness_after > 0.85 > 0.5 > p.balancedness_before
    np.testing.assert_allclose(p.device_load.sum(axis=1), np.asarray(w).sum(axis=1))
    assert p.to_json()["version"] == 1


def test_no_redundancy_is_a_permutation_and_bad_input():
    p = plan_placement(np.arange(1, 9), num_devices=4)
    assert sorted(p.phy2log[0].tolist()) == list(range(8))
    assert balancedness([[0, 0]]) == 1.0
    with pytest.raises(ConfigError, match="split evenly"):
        plan_placement([1, 2, 3], num_devices=2)
    with pytest.raises(ConfigError, match="non-negative"):
        plan_placement([1, -2], num_devices=1)
