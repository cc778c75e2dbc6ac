"""`lagoon moefy`: a dense FFN split into equal neuron groups sums back to the dense FFN, so k = all
experts reproduces the dense logits (fp32, rel. error <= 1e-5) — in memory, through the saved HF
folder `load_model` reads, and offloaded; fewer experts change the logits; bad sizes are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lagoon.engine import load_model
from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import ConfigError, UnsupportedModelError
from lagoon.moe import SparseMoE
from lagoon.moe.moefy import build, moefy, split_ffn
from lagoon.moe.runtime import CHECKSUM_FILE, runtime_of

TOL = 1e-5


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mf") / "dense", "llama", num_hidden_layers=2)


def ids(seed: int, n: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_split_is_an_equal_partition():
    gate = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))
    groups, centroids = split_ffn(gate, 6)
    assert groups.shape == (6, 16) and centroids.shape == (6, 16)
    assert np.array_equal(np.sort(groups.ravel()), np.arange(96))
    with pytest.raises(ConfigError, match="must divide"):
        split_ffn(gate, 7)


@pytest.mark.parametrize("calibrated", [False, True])
def test_all_experts_reproduce_dense_logits(dense_folder, calibrated):
    dense = load_checkpoint(dense_folder, "float32")
    sparse = moefy(dense, 4, 4, calibration=ids(9, 64)[0] if calibrated else None)
    blocks = [m for m in sparse.modules() if isinstance(m, SparseMoE)]
    assert len(blocks) == 2 and all(b.num_experts == 4 and b.router.weighting == "unit" for b in blocks)
    x = ids(1)
    with torch.no_grad():
        want = dense(x)
        assert rel(sparse(x), want) <= TOL
        for b in blocks:
            b.router.top_k = 2
        assert rel(sparse(x), want) > 1e-3  # half the neurons gone: not the dense model any more


def test_saved_folder_loads_serves_and_offloads(dense_folder, tmp_path):
    from lagoon.config import OffloadSection

    out = build(dense_folder, tmp_path / "moe", 4, 4, calibration=None)
    assert {"config.json", "model.safetensors", CHECKSUM_FILE, "moefy.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["lagoon_expert_weighting"] == "unit"
    dense = load_model(dense_folder, precision="float32")
    moe = load_model(out, precision="float32")
    off = load_model(out, precision="float32", offload=OffloadSection(capacity=2, tier="host"))
    try:
        x = ids(2)
        with torch.no_grad():
            assert rel(moe.model(x), dense.model(x)) <= TOL
        assert runtime_of(moe.model).quarantined() == []  # checksums verified, all healthy
        params = dense.params(max_new_tokens=8, ignore_eos=True)
        text = dense.complete("hello", params).token_ids
        assert moe.complete("hello", params).token_ids == text == off.complete("hello", params).token_ids
    finally:
        for e in (dense, moe, off):
            e.close()


def test_bad_inputs_are_named(dense_folder, tmp_path):
    dense = load_checkpoint(dense_folder, "float32")
    with pytest.raises(ConfigError, match="top_k"):
        moefy(dense, 4, 5)
    with pytest.raises(UnsupportedModelError, match="already MoE"):
        moefy(moefy(dense, 4, 2), 4, 2)
    res = CliRunner().invoke(__import__("lagoon.cli.app", fromlist=["app"]).app,
                             ["moefy", str(dense_folder), str(tmp_path / "x"), "-e", "3", "-k", "2"])
    assert res.exit_code == 2 and "must divide" in res.output and not (tmp_path / "x").exists()


def test_cli_writes_and_reports(dense_folder, tmp_path):
    from lagoon.cli.app import app

    res = CliRunner().invoke(app, ["moefy", str(dense_folder), str(tmp_path / "m"), "-e", "4", "-k", "2",
                                   "--no-calibration", "-r", "4", "-r", "2"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "m" / "fidelity.json").read_text())
    assert [r["k"] for r in rows] == [4, 2] and rows[0]["top1"] == 1.0 and rows[0]["kl"] < 1e-9
    assert rows[1]["kl"] > rows[0]["kl"]


@pytest.mark.slow
def test_embedded_moe_preset_builds_once_and_offloads_identically(tmp_path, monkeypatch):
    """The embedded SmolLM2 moefied (minutes on 2 cores: k-means of 30 FFNs, then three loads)."""
    from lagoon.config import OffloadSection
    from lagoon.moe.moefy import PRESET, embedded_moe_path

    monkeypatch.setenv("LAGOON_CACHE", str(tmp_path))
    folder = embedded_moe_path()
    assert folder.parent == tmp_path / "models" and embedded_moe_path() == folder  # cached, not rebuilt
    meta = json.loads((folder / "moefy.json").read_text())
    assert (meta["num_experts"], meta["top_k"]) == (PRESET["num_experts"], PRESET["top_k"])
    resident = load_model("embedded-moe", precision="float32")
    off = load_model("embedded-moe", precision="float32",
                     offload=OffloadSection(capacity=PRESET["num_experts"] // 2, tier="disk", dir=str(tmp_path)))
    try:
        params = resident.params(max_new_tokens=12, ignore_eos=True)
        prompt = "def fibonacci(n):"
        assert resident.complete(prompt, params).token_ids == off.complete(prompt, params).token_ids
        assert runtime_of(resident.model).quarantined() == []
    finally:
        resident.close()
        off.close()
