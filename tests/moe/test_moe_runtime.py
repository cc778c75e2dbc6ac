"""Seed 000's MoE mechanisms in serving: config reaches every block of a loaded model, balancing
changes routing state only between scheduler steps (and raises recalibrations / lowers the CV on a
skewed stream), outputs do not depend on other traffic with balancing off, and degraded experts
(non-finite output, corrupt file, missing tensor, operator list) are quarantined so that the model
equals the same model with those experts removed from routing (fp32, rel. error <= 1e-5)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lagoon.config import load_config
from lagoon.engine import engine_from_config
from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import CheckpointError, ConfigError
from lagoon.moe import SparseMoE
from lagoon.moe.balance import load_stats
from lagoon.moe.runtime import MoeRuntime, runtime_of, write_expert_checksums
from lagoon.telemetry import Telemetry

E, K, L = 8, 2, 3
OFF = ["model_deployment.routing.load_balance_weight=0", "moe.recalibration_cv=null"]
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rt") / "m", "qwen3_moe", num_experts=E, num_experts_per_tok=K,
                           num_hidden_layers=L, moe_intermediate_size=24)


def engine(folder, *over: str):
    return engine_from_config(load_config(f"engine.model={folder}", "engine.precision=float32", *over))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def without(block: SparseMoE, drop: int) -> SparseMoE:
    """The same block with expert `drop` deleted (router row and weights)."""
    keep = [e for e in range(block.num_experts) if e != drop]
    out = SparseMoE(block.hidden_size, block.intermediate_size, len(keep), block.top_k,
                    norm_topk_prob=block.router.norm_topk_prob)
    with torch.no_grad():
        out.router.weight.copy_(block.router.weight[keep])
        out.experts.gate_up_proj.copy_(block.experts.gate_up_proj[keep])
        out.experts.down_proj.copy_(block.experts.down_proj[keep])
    return out.eval()


def prompt_ids(seed: int, n: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- config
def test_config_reaches_every_block_and_monitor_window(folder):
    eng = engine(folder, "model_deployment.routing.active_per_token=3", "model_deployment.routing.temperature=0.5",
                 "model_deployment.routing.load_balance_weight=0.3", "moe.recalibration_cv=0.4",
                 "moe.balance_window=7", "moe.capacity_factor=2.0")
    try:
        rt = runtime_of(eng.model)
        assert rt is not None and rt.monitor.window == 7 and len(rt.blocks) == L
        for _, b in rt.blocks:
            r = b.router
            assert (r.top_k, r.temperature, r.load_balance_weight, r.recalibration_cv, r.balance_window) == (
                3, 0.5, 0.3, 0.4, 7)
            assert b.capacity_factor == 2.0 and r.deferred
    finally:
        eng.close()
    with pytest.raises(CheckpointError, match=f"total_experts={E}"):
        engine(folder, "model_deployment.routing.total_experts=64")
    plain = engine(folder)  # defaults: the checkpoint's own k, balancing per the seed defaults
    try:
        r = runtime_of(plain.model).blocks[0][1].router
        assert r.top_k == K and r.load_balance_weight == 0.15 and r.recalibration_cv == 0.15
    finally:
        plain.close()


def test_state_changes_only_when_committed():
    torch.manual_seed(0)
    block = SparseMoE(16, 8, E, K, load_balance_weight=1.0).eval()
    block.router.deferred = True
    x = torch.randn(5, 16) + 3 * torch.randn(16)
    with torch.no_grad():
        first = block(x)
        again = block(x)  # same step: the window is not updated yet
        assert torch.equal(first, again) and block.router.load_share().sum() == 0
        assert block.router.commit() == 2 and block.router.commit() == 0
        assert block.router.load_share().sum() > 0


# ------------------------------------------------------------------------------------- balancing
def _skewed_stream(eng, n: int = 6) -> None:
    params = eng.params(max_new_tokens=8, ignore_eos=True)
    for _ in range(n):
        eng.complete("aaaaaaaaaaaaaaaaaaaaaaaa", params)


def test_skewed_stream_recalibrates_on_metrics_and_lowers_cv(folder):
    from fastapi.testclient import TestClient

    from lagoon.engine.server import create_app

    cvs = {}
    for mode, over in {"off": OFF, "on": ["model_deployment.routing.load_balance_weight=0.5",
                                          "moe.recalibration_cv=0.3", "moe.balance_window=16"]}.items():
        eng = engine(folder, *over)
        try:
            tel = Telemetry()
            client = TestClient(create_app(eng, telemetry=tel))
            _skewed_stream(eng)
            text = client.get("/metrics").text
            rt = runtime_of(eng.model)
            cvs[mode] = float(np.mean([load_stats(w.load)["cv"] for w in rt.monitor.layers.values()]))
            if mode == "on":
                assert rt.stats()["recalibrations"] > 0 and rt.steps > 0
                assert "lagoon_moe_recalibrations_total" in text and "lagoon_moe_routing_state_updates_total" in text
                assert tel.value("lagoon_moe_routing_state_updates_total") == rt.steps
            else:
                assert rt.stats()["recalibrations"] == 0 and rt.steps == 0
                assert "lagoon_moe_routing_state_updates_total" not in text
            assert "lagoon_moe_load_cv" in text
        finally:
            eng.close()
    assert cvs["on"] < cvs["off"], cvs


def test_balancing_off_outputs_do_not_depend_on_other_traffic(folder):
    eng = engine(folder, *OFF, "engine.max_batch_size=4")
    try:
        params = eng.params(max_new_tokens=10, ignore_eos=True)
        alone = eng.complete("def add(a, b):", params).token_ids
        _skewed_stream(eng, 2)
        results: dict[str, list[int]] = {}
        prompts = {"a": "def add(a, b):", "b": "zzzzzzzzzzzz", "c": "import os\nprint(1)"}
        threads = [threading.Thread(target=lambda k=k, p=p: results.__setitem__(k, eng.complete(p, params).token_ids))
                   for k, p in prompts.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["a"] == alone == eng.complete("def add(a, b):", params).token_ids
    finally:
        eng.close()


# ----------------------------------------------------------------------------------- quarantine
def test_nonfinite_expert_is_quarantined_and_equals_the_model_without_it(folder, caplog):
    eng = engine(folder, *OFF)
    try:
        model = eng.model
        ref = copy.deepcopy(model)
        ref.layers[1].mlp = without(ref.layers[1].mlp, 3)
        with torch.no_grad():
            model.layers[1].mlp.experts.down_proj[3].fill_(float("nan"))  # a fault that shows at run time
            tokens = prompt_ids(0, 40)
            with caplog.at_level("WARNING", "lagoon.moe.health"):
                got = model(tokens)
                model(tokens)  # logged once
            want = ref(tokens)
        assert torch.isfinite(got).all() and rel(got, want) <= TOL
        assert model.layers[1].mlp.quarantined == {3: "non-finite output"}
        assert sum("expert 3 quarantined" in r.message for r in caplog.records) == 1
        assert runtime_of(model).quarantined() == [
            {"layer": 1, "name": "layers.1.mlp", "expert": 3, "reason": "non-finite output"}]
        done = eng.complete("hello", eng.params(max_new_tokens=4, ignore_eos=True))  # the request completes
        assert done.completion_tokens == 4
    finally:
        eng.close()


def _corrupt(folder, tmp_path, edit) -> object:
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(folder, out)
    write_expert_checksums(load_checkpoint(folder, "float32"), out)
    path = out / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return out


def _expert_key(state: dict, layer: int, expert: int, proj: str) -> str:
    keys = [k for k in state if f"layers.{layer}.mlp.experts." in k]
    per = [k for k in keys if f".experts.{expert}.{proj}" in k]
    return per[0] if per else next(k for k in keys if k.endswith(proj if proj != "up_proj" else "gate_up_proj"))


def test_corrupt_expert_file_is_quarantined_by_checksum(folder, tmp_path):
    def edit(state):
        key = _expert_key(state, 2, 5, "down_proj")
        t = state[key]
        if t.dim() == 3:  # stacked [E, H, I]
            t[5] += 0.05
        else:
            state[key] = t + 0.05

    bad = _corrupt(folder, tmp_path, edit)
    eng = engine(bad, *OFF)
    clean = load_checkpoint(folder, "float32")
    clean.layers[2].mlp = without(clean.layers[2].mlp, 5)
    try:
        assert runtime_of(eng.model).quarantined() == [
            {"layer": 2, "name": "layers.2.mlp", "expert": 5, "reason": "checksum mismatch"}]
        tokens = prompt_ids(1, 30)
        with torch.no_grad():
            assert rel(eng.model(tokens), clean(tokens)) <= TOL
    finally:
        eng.close()
    restored = engine(bad, *OFF, "moe.restore=['2:5']")  # the operator overrides the check
    try:
        assert runtime_of(restored.model).quarantined() == []
    finally:
        restored.close()


def test_missing_expert_tensor_is_quarantined_not_fatal(folder, tmp_path):
    bad = _corrupt(folder, tmp_path, lambda state: state.pop("model.layers.0.mlp.experts.4.gate_proj.weight"))
    eng = engine(bad, *OFF)
    clean = load_checkpoint(folder, "float32")
    clean.layers[0].mlp = without(clean.layers[0].mlp, 4)
    try:
        assert runtime_of(eng.model).quarantined() == [
            {"layer": 0, "name": "layers.0.mlp", "expert": 4, "reason": "weights failed to load (non-finite)"}]
        tokens = prompt_ids(3, 30)
        with torch.no_grad():
            assert rel(eng.model(tokens), clean(tokens)) <= TOL
        assert eng.complete("hi", eng.params(max_new_tokens=3, ignore_eos=True)).completion_tokens == 3
    finally:
        eng.close()


def test_operator_quarantine_by_config_and_bad_refs(folder):
    eng = engine(folder, *OFF, "moe.quarantine=['0:1', '*:6']")
    ref = load_checkpoint(folder, "float32")
    ref.layers[0].mlp.quarantine([1], "x")
    try:
        q = {(d["layer"], d["expert"]) for d in runtime_of(eng.model).quarantined()}
        assert q == {(0, 1), (0, 6), (1, 6), (2, 6)}
        for i in range(L):
            ref.layers[i].mlp.quarantine([6], "x")
        tokens = prompt_ids(2, 20)
        with torch.no_grad():
            assert rel(eng.model(tokens), ref(tokens)) <= TOL
    finally:
        eng.close()
    for bad, match in (("['7']", "LAYER:EXPERT"), ("['9:1']", "no MoE block"), ("['0:99']", "out of range")):
        with pytest.raises(ConfigError, match=match):
            engine(folder, f"moe.quarantine={bad}")


def test_too_few_healthy_experts_shrinks_k_and_all_is_refused():
    torch.manual_seed(1)
    block = SparseMoE(16, 8, 4, 3).eval()
    block.quarantine([0, 1], "test")
    with torch.no_grad():
        block(torch.randn(3, 16))
    assert block.last_routing.indices.shape == (3, 2) and not set(block.last_routing.indices.flatten().tolist()) & {0, 1}
    with pytest.raises(ConfigError, match="cannot exclude all"):
        block.quarantine([2, 3], "test")
    assert block.quarantined == {0: "test", 1: "test"}
    block.restore([0, 1])
    assert block.router.excluded == [] and not block.quarantined


def test_runtime_without_config_keeps_checkpoint_routing(folder):
    model = load_checkpoint(folder, "float32")
    rt = MoeRuntime(model)
    assert not rt.balancing and all(b.router.top_k == K for _, b in rt.blocks)


def test_moe_info_lists_quarantined_experts(folder):
    import json

    from typer.testing import CliRunner

    from lagoon.cli.moe_cmd import app

    args = ["info", "-m", str(folder), "-c", "engine.precision=float32", "-c", "moe.quarantine=['1:2']"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    rt = json.loads(res.stdout)["runtime"]
    assert rt["quarantined"] == [{"layer": 1, "name": "layers.1.mlp", "expert": 2, "reason": "operator"}]
    res = CliRunner().invoke(app, args)
    assert "quarantined: layer 1 expert 2 (operator)" in res.stdout
