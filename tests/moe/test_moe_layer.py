import sys
from pathlib import Path

import pytest
import torch

from lagoon.errors import CheckpointError, ConfigError, UnsupportedModelError
from lagoon.moe import Experts, ReferenceExperts, SparseMoE, plan_dispatch

sys.path.insert(0, str(Path(__file__).parent))
from hf_blocks import FAMILIES, H, hf_block  # noqa: E402

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("shape", [(1, 1, H), (3, 17, H)], ids=["decode", "prefill"])
def test_matches_hf_block(family, impl, shape):
    block = hf_block(family, impl, seed=1)
    moe = SparseMoE.from_hf(block, experts_impl="loop" if impl == "eager" else "grouped_mm").eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel_err(moe(x), block(x)) <= RTOL


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("norm", [True, False])
def test_norm_topk_prob_follows_hf(family, norm):
    block = hf_block(family, norm_topk_prob=norm)
    moe = SparseMoE.from_hf(block).eval()
    assert moe.router.norm_topk_prob is norm
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        assert rel_err(moe(x), block(x)) <= RTOL


def test_flat_input_and_hf_state_dict_names():
    block = hf_block("qwen2_moe")
    moe = SparseMoE.from_hf(block).eval()
    x = torch.randn(5, H)
    with torch.no_grad():
        assert moe(x).shape == (5, H)
        assert rel_err(moe(x), block(x.unsqueeze(0))[0]) <= RTOL
    names = set(moe.state_dict())
    assert {"router.weight", "experts.gate_up_proj", "experts.down_proj", "shared_expert_gate.weight"} <= names
    assert "shared_expert.gate_proj.weight" in names
    # DeepSeek's plural spelling and HF's gate.* load into the same module
    ds = hf_block("deepseek_v3")
    lag = SparseMoE.from_hf(ds)
    assert "router.e_score_correction_bias" in lag.state_dict()
    torch.testing.assert_close(lag.router.e_score_correction_bias, ds.gate.e_score_correction_bias)


def test_shape_mismatch_names_the_tensor():
    moe = SparseMoE(H, 48, 8, 2)
    bad = {k: v for k, v in hf_block("mixtral").state_dict().items()}
    bad["experts.down_proj"] = torch.randn(8, H, 40)
    with pytest.raises(CheckpointError, match="experts.down_proj"):
        moe.load_state_dict(bad)


def test_unsupported_block_and_bad_args():
    with pytest.raises(UnsupportedModelError, match="MixtralSparseMoeBlock"):
        SparseMoE.from_hf(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="valid: softmax, sigmoid"):
        SparseMoE(H, 8, 4, 2, scoring="relu")
    with pytest.raises(ConfigError, match="valid:"):
        SparseMoE(H, 8, 4, 2, act="nope")
    with pytest.raises(ConfigError, match="top_k"):
        SparseMoE(H, 8, 4, 5)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("tokens", [1, 33])
def test_fast_experts_match_reference(impl, tokens):
    torch.manual_seed(3)
    fast = Experts(16, H, 24, impl=impl)
    ref = ReferenceExperts(16, H, 24).share_weights(fast)
    x = torch.randn(tokens, H)
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(tokens)])  # [T, 4] distinct
    w = torch.rand(tokens, 4)
    with torch.no_grad():
        assert rel_err(fast(x, idx, w), ref(x, idx, w)) <= RTOL


def test_capacity_drops_counted_and_match_reference():
    torch.manual_seed(0)
    t, e, k = 20, 4, 2
    idx = torch.tensor([[0, 1]] * 12 + [[2, 3]] * 8)  # expert 0,1: 12 slots; 2,3: 8
    plan = plan_dispatch(idx, e, capacity_factor=1.0)  # capacity ceil(40/4) = 10
    assert plan.capacity == 10
    assert plan.dropped == 4  # 2 from expert 0, 2 from expert 1
    assert plan.counts.tolist() == [12, 12, 8, 8] and plan.counts_kept.tolist() == [10, 10, 8, 8]
    # later tokens are the ones dropped
    assert not plan.kept.view(t, k)[10:12, :].any() and plan.kept.view(t, k)[:10].all()
    fast = Experts(e, H, 16)
    ref = ReferenceExperts(e, H, 16).share_weights(fast)
    x, w = torch.randn(t, H), torch.rand(t, k)
    with torch.no_grad():
        out = fast(x, idx, w, plan)
        assert rel_err(out, ref(x, idx, w, plan)) <= RTOL
        assert out[10:12].abs().max() == 0  # both slots dropped: no routed output

    moe = SparseMoE(H, 16, 4, 2, capacity_factor=0.5)
    moe(torch.randn(64, H))
    assert moe.last_dropped > 0 and moe.dropped_total == moe.last_dropped
    assert SparseMoE(H, 16, 4, 2)(torch.randn(64, H)) is not None


def test_training_backward_through_both_impls():
    for impl in ["loop", "grouped_mm"]:
        moe = SparseMoE(H, 16, 8, 2, experts_impl=impl)
        moe(torch.randn(10, H)).pow(2).sum().backward()
        assert moe.router.weight.grad is not None and moe.experts.gate_up_proj.grad.abs().sum() > 0


def test_public_api_complete():
    import lagoon.moe as moe

    for name in moe.__all__:
        assert hasattr(moe, name), name
    public = {n for n in dir(moe) if not n.startswith("_") and not isinstance(getattr(moe, n), type(moe))}
    assert public <= set(moe.__all__) | {"annotations"}


def test_from_hf_share_reuses_tensors():
    block = hf_block("mixtral")
    shared = SparseMoE.from_hf(block, share=True)
    copied = SparseMoE.from_hf(block)
    assert shared.experts.gate_up_proj.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert copied.experts.gate_up_proj.data_ptr() != block.experts.gate_up_proj.data_ptr()
    x = torch.randn(4, H)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), copied(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_reference():
    torch.manual_seed(0)
    fast = Experts(16, 64, 32).cuda().to(torch.bfloat16)
    ref = ReferenceExperts(16, 64, 32).share_weights(fast)
    x = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(40)])
    w = torch.rand(40, 4, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_err(fast(x, idx, w).float(), ref(x, idx, w).float()) <= 2e-2  # bf16 rounding


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_bf16_block_close_to_fp32(impl):
    torch.manual_seed(4)
    moe = SparseMoE(H, 24, 8, 2, shared_intermediate_size=16, shared_expert_gate=True, experts_impl=impl).eval()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        ref = moe(x)
        low = moe.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), ref) <= 2e-2  # bf16 weights and activations
