"""Parameter counts against transformers' own, and the ``model_deployment`` declaration checks
(architecture, total / active parameters, variant)."""

from __future__ import annotations

import logging

import pytest
import torch

from lagoon.config import ModelDeploymentSection, load_config
from lagoon.engine import engine_from_config
from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import CheckpointError, ConfigError
from lagoon.moe.footprint import check_declaration, count_parameters, parse_count
from lagoon.moe.offload import offload_model
from lagoon.telemetry import Telemetry

E, K, L, HID, MI = 8, 2, 2, 64, 24


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    moe = save_tiny_model(root / "moe", "qwen3_moe", num_experts=E, num_experts_per_tok=K, num_hidden_layers=L,
                          moe_intermediate_size=MI)
    return {"moe": moe, "dense": save_tiny_model(root / "dense", "qwen2")}


def test_counts_match_transformers_and_survive_offloading(folders):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folders["moe"])
    model = load_checkpoint(folders["moe"], "float32")
    fp = count_parameters(model)
    assert fp.total == hf.num_parameters()
    assert fp.active == fp.total - L * (E - K) * 3 * HID * MI  # one token runs k of E experts per layer
    assert (fp.moe_layers, fp.num_experts, fp.top_k, fp.architecture) == (L, E, K, "moe_sparse")
    off = offload_model(model, 3)  # offloaded experts are no longer parameters: counted by shape
    assert count_parameters(model) == fp
    off.close()
    from lagoon.quant import QuantConfig, quantize_

    quantized = load_checkpoint(folders["moe"], "float32")
    quantize_(quantized, QuantConfig(scheme="int8"))  # packed buffers, not parameters: counted by shape
    assert count_parameters(quantized) == fp
    dense_hf = AutoModelForCausalLM.from_pretrained(folders["dense"])
    dense = count_parameters(load_checkpoint(folders["dense"], "float32"))
    assert dense.total == dense.active == dense_hf.num_parameters()  # tied embeddings counted once
    assert dense.architecture == "dense" and dense.moe_layers == 0


@pytest.mark.parametrize(("text", "value"), [("33.4B", 33.4e9), ("3b", 3e9), ("135M", 135e6), ("7K", 7e3),
                                             (1.5e9, 1.5e9), ("120", 120.0), (None, None)])
def test_parse_count(text, value):
    assert parse_count(text) == value


def test_parse_count_rejects_words():
    with pytest.raises(ConfigError, match="33.4B"):
        parse_count("lots")


def test_architecture_mismatch_raises_when_declared_notes_when_default(folders, caplog):
    dense = load_checkpoint(folders["dense"], "float32")
    with pytest.raises(CheckpointError, match="model_deployment.architecture=dense"):
        check_declaration(dense, ModelDeploymentSection(architecture="moe_sparse"))
    moe = load_checkpoint(folders["moe"], "float32")
    with pytest.raises(CheckpointError, match=f"{L} MoE layers of {E} experts.*architecture=moe_sparse"):
        check_declaration(moe, ModelDeploymentSection(architecture="dense"))
    with caplog.at_level(logging.INFO, "lagoon.moe.footprint"):
        report = check_declaration(dense, ModelDeploymentSection())  # architecture left at its default
    assert not report.warnings and "only the default" in report.notes[0] and report.to_json()["architecture"] == {
        "declared": "moe_sparse", "actual": "dense", "ok": False}
    assert check_declaration(moe, ModelDeploymentSection(architecture="moe_sparse")).notes == []


def test_parameter_declarations_warn_beyond_ten_percent(folders, caplog):
    model = load_checkpoint(folders["moe"], "float32")
    fp = count_parameters(model)
    tel = Telemetry()
    close = ModelDeploymentSection(variant="tiny-a", total_parameters=fp.total * 1.05,
                                   active_parameters=fp.active * 0.95)
    report = check_declaration(model, close, telemetry=tel)
    assert report.warnings == []
    data = report.to_json()
    assert data["variant"] == "tiny-a" and data["total_parameters"]["actual"] == fp.total
    assert data["active_parameters"]["ok"] and data["total_parameters"]["off_by"] == pytest.approx(0.05 / 1.05)
    assert tel.value("lagoon_model_parameters", {"kind": "active", "variant": "tiny-a"}) == fp.active
    far = ModelDeploymentSection(variant="tiny-b", total_parameters="33.4B", active_parameters=fp.active * 1.2)
    with caplog.at_level(logging.WARNING, "lagoon.moe.footprint"):
        report = check_declaration(model, far, telemetry=tel)
    assert len(report.warnings) == 2 and "total_parameters declares 33.4B" in report.warnings[0]
    assert "fix the declaration" in caplog.text
    assert tel.value("lagoon_alerts_total", {"name": "model_declaration"}) == 2
    assert not report.to_json()["total_parameters"]["ok"]


def test_engine_from_config_checks_the_declaration(folders):
    base = [f"engine.model={folders['moe']}", "engine.precision=float32"]
    with pytest.raises(CheckpointError, match="architecture"):
        engine_from_config(load_config(*base, "model_deployment.architecture=dense"))
    engine = engine_from_config(load_config(*base, "model_deployment.architecture=moe_sparse"))
    assert isinstance(engine.model.lm_head.weight, torch.Tensor)
    engine.close()


def test_moe_info_reports_declaration_and_offload(folders):
    import json

    from typer.testing import CliRunner

    from lagoon.cli.moe_cmd import app

    args = ["info", "-m", str(folders["moe"]), "-c", "engine.precision=float32", "-c", "moe.offload.capacity=3",
            "-c", "model_deployment.variant=tiny-v1", "-c", "model_deployment.total_parameters=33.4B",
            "-c", "model_deployment.inference.async_expert_prefetch=false", "--tokens", "4"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["variant"] == "tiny-v1" and data["total_parameters"]["declared"] == 33.4e9
    assert data["active_parameters"]["actual"] < data["total_parameters"]["actual"]
    assert data["offload"]["capacity"] == 3 and data["offload"]["speculative_accuracy"] > 0
    assert data["decode"]["tokens"] == 4 and len(data["warnings"]) == 1
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "off by" in res.stdout and "offload: capacity 3/8" in res.stdout
    res = CliRunner().invoke(app, ["info", "-m", str(folders["moe"]), "-c", "model_deployment.architecture=dense"])
    assert res.exit_code == 2 and "architecture=moe_sparse" in res.output


def test_known_variant_is_checked_against_the_checkpoint(folders):
    """`model_deployment.variant` naming a known model: its family / experts / k / layers are checked,
    and its published counts stand in for undeclared ones; a free-form name checks nothing."""
    from lagoon.model.variants import VARIANTS

    model = load_checkpoint(folders["moe"], "float32")  # a tiny qwen3_moe
    report = check_declaration(model, ModelDeploymentSection(variant="gpt_oss_20b"))
    text = " ".join(report.warnings)
    assert "'gpt_oss_20b' is a gpt_oss model but the checkpoint is qwen3_moe" in text
    assert "32 routed experts" in text and "24 layers" in text
    assert report.declared_total == VARIANTS["gpt_oss_20b"].total  # the preset's 21B stands in
    same_family = check_declaration(model, ModelDeploymentSection(variant="qwen3_coder_30b_a3b"))
    assert not any("is a qwen3_moe model" in w for w in same_family.warnings)
    assert any("128 routed experts" in w for w in same_family.warnings)
    assert check_declaration(model, ModelDeploymentSection(variant="my-own-label")).warnings == []
