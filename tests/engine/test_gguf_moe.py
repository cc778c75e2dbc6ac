"""MoE GGUFs in llama.cpp's layout (ffn_{gate,up,down}_exps, ffn_gate_inp, *_shexp, exp_probs_b and
the expert_* metadata) load and give the same logits as the same tiny model from safetensors
(F32: rel. error <= 1e-5; Q8_0 experts: <= 2e-2 against the float model); a missing or mis-shaped
expert tensor raises CheckpointError naming the GGUF tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import CheckpointError

ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "glm4_moe": "glm4moe", "mixtral": "llama"}
_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _gguf_tensors(hf, arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names (llama arch: Q/K rows permuted as its converter does)."""
    c = hf.config
    out = {}
    for name, t in hf.state_dict().items():
        t = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
            continue
        if name == "model.norm.weight":
            out["output_norm.weight"] = t
            continue
        if name == "lm_head.weight":
            out["output.weight"] = t
            continue
        p = name.split(".")  # model.layers.N.<...>
        blk, rest = f"blk.{p[2]}", p[3:]
        if rest[0] in ("input_layernorm", "post_attention_layernorm"):
            out[f"{blk}.{'attn_norm' if rest[0] == 'input_layernorm' else 'ffn_norm'}.weight"] = t
        elif rest[0] == "self_attn":
            if arch == "llama" and rest[1] in ("q_proj", "k_proj"):
                heads = c.num_attention_heads if rest[1] == "q_proj" else c.num_key_value_heads
                t = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
            out[f"{blk}.{_ATTN[rest[1]]}.{rest[2]}"] = t
        elif rest[1] in _MLP:  # dense layer
            out[f"{blk}.{_MLP[rest[1]]}.weight"] = t
        elif rest[1] == "gate" and rest[2] == "weight":
            out[f"{blk}.ffn_gate_inp.weight"] = t
        elif rest[-1] == "e_score_correction_bias":
            out[f"{blk}.exp_probs_b.bias"] = t
        elif rest[1] == "experts" and rest[2] == "gate_up_proj":
            gate, up = np.split(t, 2, axis=1)
            out[f"{blk}.ffn_gate_exps.weight"], out[f"{blk}.ffn_up_exps.weight"] = gate, up
        elif rest[1] == "experts" and rest[2] == "down_proj":
            out[f"{blk}.ffn_down_exps.weight"] = t
        elif rest[1] in ("shared_expert", "shared_experts"):
            out[f"{blk}.{_MLP[rest[2]]}_shexp.weight"] = t
        elif rest[1] == "shared_expert_gate":
            out[f"{blk}.ffn_gate_inp_shexp.weight"] = t.reshape(-1)  # llama.cpp stores [H]
        else:
            raise AssertionError(f"no GGUF name for {name}")
    return out


def _write(path, hf, arch: str, tensors: dict[str, np.ndarray], q8_experts: bool = False, mtp: int = 0, *,
           expert_kinds: dict[str, str] | None = None, tokenizer: bool = False) -> None:
    """`expert_kinds`: GGML type per expert tensor kind (``ffn_gate_exps`` ...), quantized by the gguf
    package; `tokenizer`: the tiny byte-level vocabulary and ChatML template (an engine can load it)."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    if tokenizer:
        from test_gguf_families import _add_tokenizer

        _add_tokenizer(w, c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    u32 = {"block_count": c.num_hidden_layers + mtp, "embedding_length": c.hidden_size,
           "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
           "attention.head_count_kv": c.num_key_value_heads, "attention.key_length": head_dim,
           "context_length": c.max_position_embeddings, "expert_used_count": c.num_experts_per_tok}
    n_exp = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or c.n_routed_experts
    u32["expert_count"] = n_exp
    u32["expert_feed_forward_length"] = getattr(c, "moe_intermediate_size", c.intermediate_size)
    if arch == "qwen2moe":
        u32["expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    if arch == "glm4moe":
        u32.update(leading_dense_block_count=c.first_k_dense_replace, expert_shared_count=c.n_shared_experts,
                   expert_group_count=c.n_group, expert_group_used_count=c.topk_group, expert_gating_func=2,
                   nextn_predict_layers=mtp, **{"rope.dimension_count": int(head_dim * 0.5)})
        w.add_float32(f"{arch}.expert_weights_scale", c.routed_scaling_factor)
        w.add_bool(f"{arch}.expert_weights_norm", c.norm_topk_prob)
    for k, v in u32.items():
        w.add_uint32(f"{arch}.{k}", int(v))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", float(c.rope_parameters["rope_theta"]))
    for name, t in tensors.items():
        kind_name = (expert_kinds or {}).get(name.split(".")[2] if name.startswith("blk.") else "") or ("Q8_0" if q8_experts and "_exps" in name else None)
        if kind_name is not None:
            kind = gguf.GGMLQuantizationType[kind_name]
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(t), kind), raw_dtype=kind)
        else:
            w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ggm")
    out = {}
    for family in ARCH:
        folder = save_tiny_model(root / family, family)
        out[family] = (folder, AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval())
    return out


@pytest.mark.parametrize("family", list(ARCH))
def test_moe_gguf_matches_the_safetensors_model(models, family, tmp_path):
    folder, hf = models[family]
    path = tmp_path / f"{family}.gguf"
    tensors = _gguf_tensors(hf, ARCH[family])
    mtp = 0
    if family == "glm4_moe":  # one MTP block past the model's layers: skipped by name
        mtp = 1
        tensors["blk.3.eh_proj.weight"] = np.random.randn(64, 128).astype(np.float32)
        tensors["blk.3.ffn_gate_inp.weight"] = np.random.randn(8, 64).astype(np.float32)
    _write(path, hf, ARCH[family], tensors, mtp=mtp)
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    ours = load_checkpoint(path, "float32")
    assert ours.args.family == family and ours.args.n_layers == hf.config.num_hidden_layers
    with torch.no_grad():
        assert rel(ours(x), load_checkpoint(folder, "float32")(x)) <= 1e-5
        assert rel(ours(x), hf(x).logits) <= 1e-4


def test_q8_0_experts_run_dequantized(models, tmp_path):
    folder, hf = models["qwen3_moe"]  # experts 32 wide: Q8_0 blocks fit both projections
    path = tmp_path / "q8.gguf"
    _write(path, hf, "qwen3moe", _gguf_tensors(hf, "qwen3moe"), q8_experts=True)
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        err = rel(load_checkpoint(path, "float32")(x), hf(x).logits)
    assert 0 < err <= 2e-2  # 8-bit experts: close to, not equal to, the float model


@pytest.mark.parametrize(("edit", "named"), [
    ("drop", "blk.1.ffn_up_exps.weight"),
    ("shape", "blk.1.ffn_down_exps.weight"),
])
def test_missing_or_misshaped_expert_tensor_is_named(models, tmp_path, edit, named):
    folder, hf = models["qwen3_moe"]
    tensors = _gguf_tensors(hf, "qwen3moe")
    if edit == "drop":
        del tensors[named]
    else:
        tensors[named] = tensors[named][:, :, :-1]
    path = tmp_path / "bad.gguf"
    _write(path, hf, "qwen3moe", tensors)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_checkpoint(path, "float32")
