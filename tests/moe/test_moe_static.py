"""The static-shape MoE path (what the compiled decode step runs, `SparseMoE._forward_static`) against
the eager path, run eagerly here (plain torch, no compiling): every MoE family's tiny model, quarantine
(also with fewer healthy experts than k), capacity drops, the load penalty, non-finite experts,
per-channel int8 experts, and the in-graph statistics drained into the router window, the load
monitor and quarantine. fp32 on both sides: the only difference is the order of the sums (1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch

from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.tiny import save_tiny_model
from lagoon.moe import SparseMoE
from lagoon.moe.runtime import MoeRuntime

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "laguna", "gpt_oss", "deepseek_v2", "deepseek_v3"]
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    out = {f: load_checkpoint(save_tiny_model(root / f, f), "float32") for f in FAMILIES}
    # the `lagoon moefy` kind (unit weights, k = E): the embedded-moe preset's routing
    out["unit"] = load_checkpoint(save_tiny_model(root / "unit", "mixtral", num_experts_per_tok=4,
                                                  lagoon_expert_weighting="unit"), "float32")
    return out


def _blocks(model) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def _static(model, on: bool = True):
    for b in _blocks(model):
        b.static_path = on
    return model


def _hidden(block: SparseMoE, t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, block.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", [*FAMILIES, "unit"])
def test_static_path_matches_eager_for_every_family(models, family):
    model = models[family]
    if family == "unit":
        assert {b.router.weighting for b in _blocks(model)} == {"unit"}
    ids = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = _static(model, False)(ids)
        got = _static(model)(ids)
        _static(model, False)
        assert [int(b.drain_static()[0].sum()) for b in _blocks(model)] == [3 * 6 * b.top_k for b in _blocks(model)]
        for i, b in enumerate(_blocks(model)):  # decode-sized calls: 1 and 3 tokens
            for t in (1, 3):
                x = _hidden(b, t, 10 * i + t)
                eager = b(x)
                b.static_path = True
                assert rel(b(x), eager) <= TOL, (i, t)
                b.static_path = False
                assert torch.equal(b.drain_static()[0], b.router(x).indices.flatten().bincount(minlength=b.num_experts))
    assert rel(got, want) <= TOL


def test_quarantine_mask_applies_also_below_k(models):
    block = copy.deepcopy(_blocks(models["glm4_moe"])[0])  # 8 experts, k = 2, grouped sigmoid router, shared expert
    x = _hidden(block, 4, 1)
    with torch.no_grad():
        # one expert out; 2 = k healthy; 1 < k healthy (k shrinks to 1)
        for bad in ([2], [0, 1, 3, 4, 5, 6], [0, 1, 3, 4, 5, 6, 7]):
            block.restore(range(block.num_experts))
            block.quarantine(bad, "test")
            eager = block(x)
            want = block.last_counts.clone()
            block.static_path = True
            assert rel(block(x), eager) <= TOL, bad
            assert torch.equal(block.drain_static()[0], want), bad
            block.static_path = False
        assert want.tolist() == [0, 0, 4, 0, 0, 0, 0, 0]


def test_capacity_drops_match_eager(models):
    block = copy.deepcopy(_blocks(models["qwen3_moe"])[0])
    block.capacity_factor = 0.5
    x = _hidden(block, 6, 2)
    with torch.no_grad():
        eager = block(x)
        assert block.last_dropped > 0
        want_dropped, want_counts = block.last_dropped, block.last_counts.clone()
        block.static_path = True
        assert rel(block(x), eager) <= TOL
        counts, dropped = block.drain_static()
    assert dropped == want_dropped and torch.equal(counts, want_counts)


def test_load_penalty_reads_the_window_share(models):
    block = copy.deepcopy(_blocks(models["mixtral"])[0])
    block.router.load_balance_weight = 1.0
    x = _hidden(block, 5, 3)
    with torch.no_grad():
        block.router.observe(torch.tensor([9.0, 0.0, 1.0, 0.0]))  # a skewed window: expert 0 penalised
        block.router.deferred = True  # the calls below queue their loads: both see the same window
        assert block.router.window_share[0] == 0.9
        eager = block(x)
        block.static_path = True
        got = block(x)
    assert rel(got, eager) <= TOL
    block.router.load_balance_weight = 0.0
    with torch.no_grad():
        assert rel(block(x), got) > 1e-3  # the penalty changed the routing


def test_drained_statistics_reach_window_monitor_and_quarantine(models):
    model = copy.deepcopy(models["qwen3_moe"])
    rt = MoeRuntime(model)
    blocks = _blocks(model)
    for b in blocks:
        b.router.load_balance_weight = 0.1  # tracking: the window fills
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _static(model)(ids)
        assert [w.total.sum() for w in rt.monitor.layers.values()] == [0, 0]  # nothing recorded in-graph
        rt.step()
        for name, b in rt.blocks:
            assert rt.monitor.layers[name].total.sum() == 2 * 5 * b.top_k
            assert b.router.window_load().sum() == 2 * 5 * b.top_k
            assert not b.static_stats.any()
        rt.step()  # nothing new: unchanged
        assert [w.total.sum() for w in rt.monitor.layers.values()] == [20, 20]
        block = blocks[1]
        block.experts.down_proj[3].fill_(float("nan"))  # fails at run time, not at load
        x = _hidden(block, 16, 5)
        y = block(x)  # static: the NaN slot contributes zero for this call
        assert torch.isfinite(y).all()
        assert block.quarantined == {}
        rt.step()
        assert block.quarantined == {3: "non-finite output"} and block.router.excluded == [3]
        block.static_path = False
        eager = block(x)
        block.static_path = True
        assert rel(block(x), eager) <= TOL  # from the next step on: routed around, as eager


def test_int8_per_channel_experts_gathered_match_their_forward(models):
    from lagoon.quant.quantize import QuantConfig, quantize_

    model = copy.deepcopy(models["gpt_oss"])  # biases and the clamped SwiGLU
    quantize_(model, QuantConfig(scheme="int8", group_size=0, keep=(r"self_attn", r"lm_head", r"embed_tokens")))
    block = _blocks(model)[0]
    assert type(block.experts).__name__ == "QuantizedExperts" and block.static_ready
    x = _hidden(block, 3, 6)
    with torch.no_grad():
        eager = block(x)
        block.static_path = True
        got = block(x)
    assert rel(got, eager) <= 1e-2  # the kernel rounds its output to bf16; the gathered path sums in fp32
    grouped = copy.deepcopy(models["qwen3_moe"])
    quantize_(grouped, QuantConfig(scheme="int8", keep=(r"self_attn", r"lm_head", r"embed_tokens")))
    assert not _blocks(grouped)[0].static_ready  # packed layout: decode stays eager
    assert not MoeRuntime(grouped).compilable and MoeRuntime(copy.deepcopy(models["olmoe"])).compilable


def test_bf16_model_static_path_matches_eager(models):
    """bf16 experts: the static path sums in fp32 where eager rounds each matmul's output to bf16 (2^-8)."""
    model = copy.deepcopy(models["gpt_oss"]).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = _static(model, False)(ids).float()
        got = _static(model)(ids).float()
    assert got.dtype == want.dtype and rel(got, want) <= 2e-2
