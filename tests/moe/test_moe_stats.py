"""`lagoon moe stats`: per-layer utilization of a real checkpoint on the shipped coding sample (or
--text), table + JSON + heat map, the recalibration verdict against moe.recalibration_cv, and
`lagoon moe placement` reading that JSON into the lagoon / SGLang / vLLM plan formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lagoon.cli.moe_cmd import app
from lagoon.engine.tiny import save_tiny_model
from lagoon.moe.balance import load_stats
from lagoon.moe.placement import plan_placement
from lagoon.moe.utilization import CODING_SAMPLE

E = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("st") / "m", "qwen3_moe", num_experts=E, num_experts_per_tok=2,
                           num_hidden_layers=2, moe_intermediate_size=16)


def test_stats_table_json_plot_and_verdict(folder, tmp_path):
    assert 3000 < len(CODING_SAMPLE.read_text()) < 6000  # ~1,000 tokens of Python
    out, png = tmp_path / "u.json", tmp_path / "u.png"
    res = CliRunner().invoke(app, ["stats", str(folder), "--json", str(out), "--plot", str(png),
                                   "-c", "engine.precision=float32", "-c", "moe.recalibration_cv=0.0"])
    assert res.exit_code == 0, res.output
    snap = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [layer["name"] for layer in snap["layers"]] == ["layers.0.mlp", "layers.1.mlp"]
    n_tokens = snap["tokens_in_text"]
    for layer in snap["layers"]:
        assert sum(layer["tokens"]) == 2 * n_tokens  # k slots per token, every token counted
        want = load_stats(np.array(layer["tokens"]))
        assert layer["cv"] == pytest.approx(want["cv"]) and layer["balancedness"] == pytest.approx(want["balancedness"])
        assert layer["max_over_mean"] == pytest.approx(1 + want["max_violation"])
        assert layer["would_recalibrate"]  # threshold 0: any unevenness triggers
    assert "2 of 2 layers over CV 0% would trigger recalibration" in res.stdout
    text = tmp_path / "t.txt"
    text.write_text("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    res = CliRunner().invoke(app, ["stats", str(folder), "--text", str(text), "--json", str(tmp_path / "a.json"),
                                   "-c", "engine.precision=float32", "-c", "moe.recalibration_cv=9"])
    assert res.exit_code == 0 and json.loads((tmp_path / "a.json").read_text())["tokens_in_text"] == 40
    assert "0 of 2 layers" in res.stdout
    res = CliRunner().invoke(app, ["stats", str(folder), "--text", str(tmp_path / "nope.txt")])
    assert res.exit_code == 2 and "unreadable" in res.output

    # the placement command reads stats output
    for fmt in ("lagoon", "sglang", "vllm"):
        plan_path = tmp_path / f"plan-{fmt}.json"
        res = CliRunner().invoke(app, ["placement", str(out), "-d", "4", "-r", "4", "-f", fmt, "-o", str(plan_path)])
        assert res.exit_code == 0, res.output
    plan = plan_placement([layer["tokens"] for layer in snap["layers"]], 4, 4)
    sg = json.loads((tmp_path / "plan-sglang.json").read_text())
    assert list(sg) == ["physical_to_logical_map"] and np.array_equal(sg["physical_to_logical_map"], plan.phy2log)
    vl = json.loads((tmp_path / "plan-vllm.json").read_text())
    assert vl["eplb_config"] == {"num_redundant_experts": 4}
    for p2l, l2p, cnt in zip(vl["physical_to_logical_map"], vl["logical_to_physical_map"],
                             vl["logical_replica_count"], strict=True):
        assert len(p2l) == E + 4 and sum(cnt) == E + 4
        for e in range(E):  # every listed slot holds that expert; padding is -1
            slots = [p for p in l2p[e] if p >= 0]
            assert len(slots) == cnt[e] and all(p2l[p] == e for p in slots)
    res = CliRunner().invoke(app, ["placement", str(out), "-f", "ray"])
    assert res.exit_code == 2 and "sglang" in res.output


def test_stats_on_a_dense_model_is_a_clear_error(tmp_path):
    dense = save_tiny_model(tmp_path / "d", "llama")
    res = CliRunner().invoke(app, ["stats", str(dense), "-c", "engine.precision=float32"])
    assert res.exit_code == 2 and "moefy" in res.output
