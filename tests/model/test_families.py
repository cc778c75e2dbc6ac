"""The per-layer-spec families (GLM-4.5 MoE, Laguna, gpt-oss, DeepSeek-V2 and V3) against transformers 5.24 on tiny random
checkpoints (odd sizes, dense + MoE layers, a sliding window shorter than the prompt): prefill and 8
cached greedy decode steps agree to rel. error <= 1e-4 in fp32 through the contiguous, paged and
prefix-cached paged caches; greedy tokens are equal. Then the expert paths (grouped_mm, loop,
offloaded, int8-quantized) against the gather/einsum oracle on the same loaded models."""

from __future__ import annotations

import copy

import pytest
import torch
from test_transformer import _hf, check_family, rel

from lagoon.engine.checkpoint import load_checkpoint, read_safetensors
from lagoon.engine.tiny import save_tiny_model
from lagoon.model.args import ModelArgs
from lagoon.moe import ReferenceExperts, SparseMoE

NEW = ["glm4_moe", "laguna", "gpt_oss", "deepseek_v2", "deepseek_v3"]
EXPERT_WIDTH = {"gpt_oss": "intermediate_size"}  # the config key of the experts' intermediate size


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    out = {f: save_tiny_model(root / f, f) for f in NEW}
    # torch's int8 kernel needs K % 32 == 0 (it crashes the process otherwise): 32-wide experts to quantize
    out.update({f"{f}_q": save_tiny_model(root / f"{f}_q", f, **{EXPERT_WIDTH.get(f, "moe_intermediate_size"): 32})
                for f in NEW})
    return out


def _prompts(seed: int = 1, shape=(3, 12)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", NEW)
def test_family_matches_transformers_prefill_decode_paged_prefix(tmp_path, family):
    check_family(tmp_path, family, steps=8, prefix=True)


def test_specs_read_from_the_configs(folders):
    glm = ModelArgs.from_folder(folders["glm4_moe"])
    assert [s.mlp for s in glm.layers] == ["dense", "moe", "moe"]
    assert glm.scoring == "sigmoid" and (glm.n_group, glm.topk_group) == (2, 1)
    assert glm.rope_table("default").dim == 8  # half of head_dim 16 rotates
    lag = ModelArgs.from_folder(folders["laguna"])
    assert [s.window for s in lag.layers] == [5, None, 5, None]
    assert [s.n_heads for s in lag.layers] == [4, 6, 2, 4]
    assert [s.rope for s in lag.layers] == ["sliding_attention", "full_attention"] * 2
    assert lag.rope_table("full_attention").kind == "yarn" and lag.rope_table("full_attention").dim == 8
    assert lag.router_softcap == 2.0 and lag.routed_scaling_factor == 1.5
    assert {s.output_gate for s in lag.layers} == {"head"}


def test_sliding_window_and_softcap_change_the_output(folders):
    """The window (5 < 12 prompt tokens) and the router softcap are live paths, not dead config."""
    model = load_checkpoint(folders["laguna"], "float32")
    x = _prompts()
    with torch.no_grad():
        base = model(x)
        model.layers[0].self_attn.window = None
        assert rel(model(x), base) > 1e-3
        model.layers[0].self_attn.window = 5
        model.layers[1].mlp.router.logit_softcap = 0.0
        assert rel(model(x), base) > 1e-6


@pytest.mark.parametrize("over", [{"gating": "per-element"}, {"moe_router_logit_softcapping": 0.0, "sliding_window": 3}])
def test_laguna_variants_prefill(tmp_path, over):
    folder = save_tiny_model(tmp_path / "l", "laguna", **over)
    x = _prompts(2, (2, 9))
    with torch.no_grad():
        assert rel(load_checkpoint(folder, "float32")(x), _hf(folder)(x).logits) <= 1e-4


def test_glm_mtp_layers_are_skipped_by_name(folders, tmp_path):
    """GLM-4.5 checkpoints carry `num_nextn_predict_layers` extra layers past num_hidden_layers."""
    from safetensors.torch import save_file

    src = folders["glm4_moe"]
    dst = tmp_path / "glm_mtp"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    state = {k: v.clone() for k, v in read_safetensors(src / "model.safetensors").items()}
    state["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    state["model.layers.3.mlp.experts.0.gate_proj.weight"] = torch.randn(24, 64)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    x = _prompts()
    with torch.no_grad():
        assert rel(load_checkpoint(dst, "float32")(x), load_checkpoint(src, "float32")(x)) == 0


def _with_experts(model, make):
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, SparseMoE):
            m.experts = make(m.experts)
    return model


@pytest.mark.parametrize("family", NEW)
def test_expert_paths_match_the_oracle(folders, family):
    """grouped_mm / loop / offloaded experts give the gather-einsum oracle's logits (fp32, 1e-5);
    int8 weight-only experts give the oracle run on their dequantized weights (to bf16 activation
    rounding, 1e-2)."""
    from lagoon.moe.offload import offload_model
    from lagoon.quant.quantize import QuantConfig, quantize_

    base = load_checkpoint(folders[family], "float32")
    oracle = _with_experts(base, _reference)
    x = _prompts(3, (2, 10))
    with torch.no_grad():
        want = oracle(x)
        for impl in ("grouped_mm", "loop"):
            for m in base.modules():
                if isinstance(m, SparseMoE):
                    m.experts.impl = impl
            assert rel(base(x), want) <= 1e-5, impl
        off_model = copy.deepcopy(base)
        off = offload_model(off_model, 2)  # fewer slots than the 6-8 experts
        try:
            assert rel(off_model(x), want) <= 1e-5
            assert rel(off_model(x[:, :1]), oracle(x[:, :1])) <= 1e-5
        finally:
            off.close()
        oracle = _with_experts(load_checkpoint(folders[f"{family}_q"], "float32"), _reference)
        quant = load_checkpoint(folders[f"{family}_q"], "float32")
        quantize_(quant, QuantConfig(scheme="int8", keep=(r"self_attn", r"shared_expert", r"mlp\.(gate|up|down)_proj",
                                                          r"embed_tokens")))
        deq = copy.deepcopy(oracle)
        for (name, q), (_, r) in zip(_experts(quant), _experts(deq), strict=True):
            assert type(q).__name__ == "QuantizedExperts", name
            for e in range(q.num_experts):
                r.gate_up_proj.data[e] = q.dequantize("gate_up", e)
                r.down_proj.data[e] = q.dequantize("down", e)
        assert rel(quant(x), deq(x)) <= 1e-2  # the scheme rounds activations to bf16 (2^-8 relative)


def _reference(e):
    return ReferenceExperts(e.num_experts, e.hidden_size, e.intermediate_size, e.act).share_weights(e)


def _experts(model):
    return [(n, m.experts) for n, m in model.named_modules() if isinstance(m, SparseMoE)]


def test_gpt_oss_sinks_clamp_and_biases_are_live(folders):
    model = load_checkpoint(folders["gpt_oss"], "float32")
    blk = model.layers[1]
    assert blk.self_attn.sinks is not None and blk.mlp.router.bias is not None
    assert blk.mlp.experts.glu.kind == "clamped" and blk.mlp.experts.down_bias is not None
    x = _prompts()
    with torch.no_grad():
        base = model(x)
        for change in ("sinks", "limit", "bias"):
            m = copy.deepcopy(model)
            for layer in m.layers:
                if change == "sinks":
                    layer.self_attn.sinks.data.fill_(-1e4)  # a sink that takes no mass = plain attention
                elif change == "limit":
                    layer.mlp.experts.glu = type(layer.mlp.experts.glu)("silu", "clamped", 1.702, 1e9)
                else:
                    layer.mlp.experts.down_bias.data.zero_()
            assert rel(m(x), base) > 1e-4, change


def _to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K % 32 == 0) → blocks [..., K/32, 16] uint8, scales [..., K/32] uint8 (round to nearest)."""
    from lagoon.engine.mxfp4 import FP4_VALUES

    g = w.reshape(*w.shape[:-1], -1, 32)
    exp = torch.floor(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)  # max → <= 6
    grid = torch.tensor(FP4_VALUES[:8])
    scaled = g / torch.exp2(exp).unsqueeze(-1)
    code = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1) + 8 * (scaled < 0)  # [..., G, 32]
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_load_as_their_dequantized_weights(folders, tmp_path):
    """A checkpoint whose experts are MXFP4 blocks/scales (the released gpt-oss layout: [E, out, in])
    loads to the same model as the float checkpoint of the same (FP4-representable) weights, which
    matches transformers; a missing _scales tensor is named."""
    from safetensors.torch import save_file

    from lagoon.engine.mxfp4 import dequant_mxfp4
    from lagoon.errors import CheckpointError

    src = folders["gpt_oss_q"]  # 32-wide experts: K % 32 == 0 for both projections
    state = {k: v.clone() for k, v in read_safetensors(src / "model.safetensors").items()}
    floats, packed = dict(state), dict(state)
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        rows = state[name].transpose(1, 2).contiguous()  # HF [E, in, out] → [E, out, in]
        blocks, scales = _to_mxfp4(rows)
        assert rel(dequant_mxfp4(blocks, scales), rows) < 0.2  # FP4 is coarse; the loader must be exact
        floats[name] = dequant_mxfp4(blocks, scales).transpose(1, 2).contiguous()
        del packed[name]
        packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
    for folder, st in (("f", floats), ("q", packed)):
        (tmp_path / folder).mkdir()
        for f in src.iterdir():
            if f.name != "model.safetensors":
                (tmp_path / folder / f.name).write_bytes(f.read_bytes())
        save_file(st, str(tmp_path / folder / "model.safetensors"), metadata={"format": "pt"})
    x = _prompts(4, (2, 9))
    with torch.no_grad():
        want = _hf(tmp_path / "f")(x).logits
        assert rel(load_checkpoint(tmp_path / "f", "float32")(x), want) <= 1e-4
        assert rel(load_checkpoint(tmp_path / "q", "float32")(x), want) <= 1e-4
    broken = {k: v for k, v in packed.items() if not k.endswith("layers.1.mlp.experts.down_proj_scales")}
    save_file(broken, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.experts.down_proj_scales"):
        load_checkpoint(tmp_path / "q", "float32")


def test_deepseek_v3_caches_the_latent_not_per_head_kv(folders):
    from lagoon.engine.kv_cache import make_cache

    args = ModelArgs.from_folder(folders["deepseek_v3"])
    assert {s.attention for s in args.layers} == {"mla"} and [s.mlp for s in args.layers] == ["dense", "moe", "moe"]
    for paged in (False, True):
        cache = make_cache(args, paged=paged, max_batch=2, max_seq_len=32, dtype=torch.float32)
        assert cache.k[0].shape[-2:] == (1, 24) and cache.v[0].shape[-2:] == (1, 8)  # latent R=24, shared roped key P=8
    per_head = 2 * args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim)  # what expanded K/V would take
    assert sum(args.kv_cache_dims[1:]) * 4 < per_head


@pytest.mark.parametrize("over", [{"q_lora_rank": None}, {"rope_interleave": False, "rope_parameters": None}])
def test_deepseek_v3_variants_prefill(tmp_path, over):
    folder = save_tiny_model(tmp_path / "d", "deepseek_v3", **over)
    x = _prompts(2, (2, 9))
    with torch.no_grad():
        assert rel(load_checkpoint(folder, "float32")(x), _hf(folder)(x).logits) <= 1e-4


def test_deepseek_v2_group_limited_greedy_is_read_and_live(folders, tmp_path):
    """V2's config keys become a softmax router over 4 groups (2 kept) without renormalisation;
    routing without the group limit gives other logits than transformers', so the test above
    checks the group rule (tests/moe/test_moe_router.py tells V2's rule from V3's). `greedy`
    (V2-Lite) ignores n_group; an unknown topk_method is refused by name."""
    from lagoon.errors import UnsupportedModelError

    args = ModelArgs.from_folder(folders["deepseek_v2"])
    assert (args.family, args.scoring, args.n_group, args.topk_group) == ("deepseek_v2", "softmax", 4, 2)
    assert not args.norm_topk_prob and args.routed_scaling_factor == 1.5 and not args.q_lora_rank
    from lagoon.model.variants import check_variant  # the presets name V2's family: only the sizes differ

    for name in ("deepseek_coder_v2_lite", "deepseek_v25"):
        warns = " ".join(check_variant(name, args, args.num_experts, args.top_k))
        assert "checkpoint is deepseek_v2" not in warns and "routed experts" in warns and "experts per token" in warns
    model = load_checkpoint(folders["deepseek_v2"], "float32")
    x = _prompts()
    with torch.no_grad():
        base = model(x)
        assert rel(base, _hf(folders["deepseek_v2"])(x).logits) <= 1e-4
        ungrouped = copy.deepcopy(model)
        for layer in ungrouped.layers[1:]:
            layer.mlp.router.n_group = 1
        assert rel(ungrouped(x), base) > 1e-3
    greedy = save_tiny_model(tmp_path / "g", "deepseek_v2", topk_method="greedy")
    assert ModelArgs.from_folder(greedy).n_group == 1
    with torch.no_grad():
        assert rel(load_checkpoint(greedy, "float32")(x), _hf(greedy)(x).logits) <= 1e-4
    cfg = tmp_path / "g" / "config.json"
    cfg.write_text(cfg.read_text().replace('"greedy"', '"noaux_tc"'))
    with pytest.raises(UnsupportedModelError, match="topk_method 'noaux_tc'"):
        ModelArgs.from_folder(greedy)



def test_generation_config_eos_ids_join_the_stop_set(tmp_path):
    """Chat checkpoints often list their end-of-turn id only in generation_config.json; it stops
    generation as in transformers and vLLM. A broken generation_config.json is optional and ignored."""
    folder = save_tiny_model(tmp_path / "m", "llama")
    base = ModelArgs.from_folder(folder).eos_token_ids
    (folder / "generation_config.json").write_text('{"eos_token_id": [258, 7, 11]}')
    assert ModelArgs.from_folder(folder).eos_token_ids == tuple(dict.fromkeys(base + (258, 7, 11)))
    (folder / "generation_config.json").write_text("{not json")
    assert ModelArgs.from_folder(folder).eos_token_ids == base
