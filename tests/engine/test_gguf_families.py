"""DeepSeek-V2/V3 (``deepseek2``) and gpt-oss (``gpt-oss``) GGUFs in llama.cpp's layout load and match the
same tiny model from safetensors: prefill and 4 cached greedy decode steps, fp32, rel. error <= 1e-5
(and <= 1e-4 against transformers' prefill); greedy tokens equal. Tensor names come from gguf's own
`TensorNameMap` (the table llama.cpp's converter uses), and the tensors are reshaped as that
converter does: MLA's kv_b split into attn_k_b / attn_v_b (or kept whole, as older files do),
gpt-oss's interleaved gate/up de-interleaved, experts stored F32 or MXFP4. A missing or mis-shaped
tensor raises CheckpointError naming the GGUF tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.kv_cache import make_cache
from lagoon.engine.sampling import SamplingParams
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import CheckpointError
from lagoon.model.rope import attention_scaling, inv_freq

gguf = pytest.importorskip("gguf")
MXFP4 = gguf.GGMLQuantizationType.MXFP4


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# ------------------------------------------------------------------------ llama.cpp's layout
def _llama_cpp_tensors(hf, arch, *, split_kv: bool = True, fused: bool = False) -> dict[str, np.ndarray]:
    """HF tensors → llama.cpp's names and shapes (numpy order: experts, out, in). `fused`: the
    converter's fuse_gate_up_exps form, one ffn_gate_up_exps tensor (gate rows, then up rows)."""
    c = hf.config
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    out = {}

    def put(hf_name, t):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"gguf has no name for {hf_name}"
        out[name] = np.ascontiguousarray(t, dtype=np.float32)

    for name, t in hf.state_dict().items():
        t = t.detach().float()
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if name.endswith("sinks"):
            put(name + ".weight", t)  # the converter appends .weight
        elif name.endswith("kv_b_proj.weight") and split_kv:
            h, nope, v = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
            k_b, v_b = t.view(h, nope + v, -1).split([nope, v], dim=1)
            put(name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2))  # [H, R, N]
            put(name.replace("kv_b_proj", "v_b_proj"), v_b)  # [H, V, R]
        elif ".experts.gate_up_proj" in name:
            if arch == gguf.MODEL_ARCH.GPT_OSS:  # [E, H, 2I] / [E, 2I], gate and up interleaved
                t = t.transpose(-1, -2) if t.dim() == 3 else t
                gate, up = t[:, 0::2], t[:, 1::2]
            else:  # transformers' DeepSeek-V3: [E, 2I, H], gate rows then up rows
                gate, up = t.chunk(2, dim=1)
            leaf = ".bias" if name.endswith("_bias") else ".weight"
            if fused:
                bid = int(name.split(".")[2])
                fused_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_UP_EXP].format(bid=bid) + leaf
                out[fused_name] = np.ascontiguousarray(torch.cat([gate, up], dim=1), dtype=np.float32)
                continue
            put(name.split(".gate_up_proj")[0] + ".gate_proj" + leaf, gate)
            put(name.split(".gate_up_proj")[0] + ".up_proj" + leaf, up)
        elif ".experts.down_proj" in name:
            if arch == gguf.MODEL_ARCH.GPT_OSS and not name.endswith("_bias"):
                t = t.transpose(-1, -2)  # [E, I, H] → [E, H, I]
            put(name.replace("down_proj_bias", "down_proj.bias") if name.endswith("_bias") else name + ".weight", t)
        else:
            put(name, t)
    return out


def _write(path, hf, arch, tensors, *, split_kv: bool = True, mxfp4: dict | None = None, gating: int = 2,
           tokenizer: bool = False, quant: tuple | None = None) -> None:
    """A GGUF with the metadata llama.cpp's converter writes for `arch` (deepseek2 or gpt-oss)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    if tokenizer:
        _add_tokenizer(w, c.vocab_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch == gguf.MODEL_ARCH.DEEPSEEK2:
        rank, rot, nope = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim
        w.add_head_count_kv(1 if split_kv else c.num_attention_heads)  # MLA as MQA since the split
        w.add_q_lora_rank(c.q_lora_rank or 0)
        w.add_kv_lora_rank(rank)
        if split_kv:
            w.add_key_length(rank + rot)
            w.add_value_length(rank)
            w.add_key_length_mla(nope + rot)
            w.add_value_length_mla(c.v_head_dim)
        else:
            w.add_key_length(nope + rot)
            w.add_value_length(c.v_head_dim)
        w.add_rope_dimension_count(rot)
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_shared_count(c.n_shared_experts)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        if c.norm_topk_prob:  # the converter writes the key only when true
            w.add_expert_weights_norm(True)
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
        if gating:  # 0: a file from before the key existed
            w.add_expert_gating_func(gguf.ExpertGatingFuncType(gating))
    else:
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_expert_count(c.num_local_experts)
        w.add_expert_feed_forward_length(c.intermediate_size)
        w.add_sliding_window(c.sliding_window)
    for name, t in tensors.items():
        if mxfp4 and name in mxfp4:
            w.add_tensor(name, mxfp4[name], raw_dtype=MXFP4)
        elif quant and name in quant[1]:  # (ggml type, {name: quantized bytes})
            w.add_tensor(name, quant[1][name], raw_dtype=quant[0])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w, vocab_size: int) -> None:
    """The tiny models' byte-level vocabulary as llama.cpp's gpt2 tokenizer keys (one merge: a real
    file has merges), with the ChatML template."""
    from lagoon.engine.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])] + ["ĠĠ"]
    n = len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(n, vocab_size)])
    w.add_token_types([1] * 256 + [3] * (n - 257) + [1] + [5] * (vocab_size - n))
    w.add_token_merges(["Ġ Ġ"])
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_chat_template(tok.chat_template)


# ------------------------------------------------------------------------ checks
def _decode(model, prompts, steps):
    cache = make_cache(model.args, paged=False, max_batch=prompts.shape[0], max_seq_len=32, dtype=torch.float32)
    B, T = prompts.shape
    logits_all, toks = [], []
    with torch.no_grad():
        for i in range(B):
            cache.allocate(i, prompts[i].tolist())
            cache.ensure(i, T + steps)
        pos = torch.arange(T).expand(B, T)
        cache.prepare(list(range(B)), pos)
        logits = model(prompts, pos, cache)
        logits_all.append(logits)
        for s in range(steps):
            nxt = logits[:, -1].argmax(-1)
            toks.append(nxt.tolist())
            pos = torch.full((B, 1), T + s)
            cache.prepare(list(range(B)), pos)
            logits = model(nxt[:, None], pos, cache)
            logits_all.append(logits)
    return toks, logits_all


def _matches(gguf_path, folder, hf, tol=1e-5):
    ours = load_checkpoint(gguf_path, "float32")
    ref = load_checkpoint(folder, "float32")
    a, b = ours.args, ref.args  # the same network (norm eps differs by its f32 storage in GGUF)
    assert a.layers == b.layers and a.num_experts == b.num_experts and a.top_k == b.top_k
    for (name, x), (_, y) in zip(a.ropes, b.ropes, strict=True):
        assert torch.allclose(inv_freq(x), inv_freq(y)) and attention_scaling(x) == attention_scaling(y), name
    prompts = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    toks, logits = _decode(ours, prompts, 4)
    ref_toks, ref_logits = _decode(ref, prompts, 4)
    assert toks == ref_toks
    for got, want in zip(logits, ref_logits, strict=True):
        assert rel(got, want) <= tol
    with torch.no_grad():
        assert rel(logits[0], hf(prompts).logits) <= 1e-4


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("ds") / "m", "deepseek_v3")
    return folder, _hf(folder)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """Experts 32 wide (whole MXFP4 blocks); the real SwiGLU limit 7.0, which GGUF does not carry."""
    folder = save_tiny_model(tmp_path_factory.mktemp("go") / "m", "gpt_oss", intermediate_size=32, swiglu_limit=7.0)
    return folder, _hf(folder)


@pytest.mark.parametrize("split_kv", [True, False], ids=["k_b+v_b", "kv_b"])
def test_deepseek2_gguf_matches_the_safetensors_model(deepseek, tmp_path, split_kv):
    folder, hf = deepseek
    path = tmp_path / "ds.gguf"
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    _write(path, hf, arch, _llama_cpp_tensors(hf, arch, split_kv=split_kv), split_kv=split_kv)
    model = load_checkpoint(path, "float32")
    a = model.args
    assert (a.family, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.v_head_dim) == ("deepseek_v3", 40, 24, 12, 20)
    assert a.scoring == "sigmoid" and (a.n_group, a.topk_group, a.routed_scaling_factor) == (2, 1, 1.5)
    assert [s.mlp for s in a.layers] == ["dense", "moe", "moe"] and a.rope_table("default").kind == "yarn"
    _matches(path, folder, hf)


@pytest.mark.parametrize("fused", [False, True], ids=["gate+up", "gate_up"])
def test_gpt_oss_gguf_matches_the_safetensors_model(gpt_oss, tmp_path, fused):
    folder, hf = gpt_oss
    path = tmp_path / "go.gguf"
    arch = gguf.MODEL_ARCH.GPT_OSS
    tensors = _llama_cpp_tensors(hf, arch, fused=fused)
    assert ("blk.0.ffn_gate_up_exps.bias" in tensors) == fused
    _write(path, hf, arch, tensors)
    a = load_checkpoint(path, "float32").args
    assert [s.window for s in a.layers] == [5, None, 5] and all(s.sinks for s in a.layers)
    assert a.router_bias and a.expert_bias and a.rope_table("default").params["truncate"] is False
    _matches(path, folder, hf)


def test_gpt_oss_mxfp4_experts(gpt_oss, tmp_path):
    """Experts stored as ggml MXFP4 load to exactly the values gguf's own dequantizer gives: the
    safetensors model is given those values, and the two then match to float rounding."""
    folder, original = gpt_oss
    hf = _hf(folder)  # a copy: its experts are replaced below
    arch = gguf.MODEL_ARCH.GPT_OSS
    tensors = _llama_cpp_tensors(hf, arch)
    packed = {n: gguf.quants.quantize(t, MXFP4) for n, t in tensors.items() if n.endswith("_exps.weight")}
    for n, q in packed.items():
        tensors[n] = gguf.quants.dequantize(q, MXFP4).reshape(tensors[n].shape)
    with torch.no_grad():  # write the dequantized experts back into the HF model, in its interleaved layout
        for i, layer in enumerate(hf.model.layers):
            ex = layer.mlp.experts
            gu = torch.empty(ex.gate_up_proj.transpose(1, 2).shape)
            gu[:, 0::2] = torch.from_numpy(tensors[f"blk.{i}.ffn_gate_exps.weight"])
            gu[:, 1::2] = torch.from_numpy(tensors[f"blk.{i}.ffn_up_exps.weight"])
            ex.gate_up_proj.copy_(gu.transpose(1, 2))
            ex.down_proj.copy_(torch.from_numpy(tensors[f"blk.{i}.ffn_down_exps.weight"]).transpose(1, 2))
    folder = tmp_path / "dq"
    hf.save_pretrained(str(folder))
    path = tmp_path / "mx.gguf"
    _write(path, hf, arch, tensors, mxfp4=packed)
    _matches(path, tmp_path / "dq", hf)
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # the 4-bit experts are a real change from the float ones
        assert rel(load_checkpoint(path, "float32")(x), original(x).logits) > 1e-3


@pytest.mark.parametrize(("family", "edit", "named"), [
    ("deepseek", "drop", "blk.1.attn_kv_a_mqa.weight"),
    ("deepseek", "drop", "blk.2.attn_v_b.weight"),
    ("deepseek", "shape", "blk.1.attn_k_b.weight"),
    ("deepseek", "shape", "blk.0.attn_q_b.weight"),
    ("deepseek", "drop", "blk.2.exp_probs_b.bias"),
    ("gpt_oss", "drop", "blk.0.attn_sinks.weight"),
    ("gpt_oss", "drop", "blk.1.ffn_up_exps.bias"),
    ("gpt_oss", "shape", "blk.2.ffn_gate_inp.bias"),
    ("gpt_oss", "drop", "blk.1.post_attention_norm.weight"),
])
def test_missing_or_misshaped_tensor_is_named(request, tmp_path, family, edit, named):
    _, hf = request.getfixturevalue(family)
    arch = gguf.MODEL_ARCH.DEEPSEEK2 if family == "deepseek" else gguf.MODEL_ARCH.GPT_OSS
    tensors = _llama_cpp_tensors(hf, arch)
    if edit == "drop":
        del tensors[named]
    else:
        tensors[named] = np.ascontiguousarray(tensors[named][..., :-1])
    path = tmp_path / "bad.gguf"
    _write(path, hf, arch, tensors)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_checkpoint(path, "float32")


def test_mxfp4_dequantizer_equals_gguf_bit_for_bit(monkeypatch):
    """Lagoon's ggml-MXFP4 reader against gguf's `dequantize` on every exponent byte (0 and 1 are
    subnormal scales, 255 overflows) and random codes, and on values quantized by gguf itself;
    read in chunks of 7 blocks so the chunk seams are crossed."""
    from lagoon.engine import mxfp4
    from lagoon.engine.mxfp4 import dequant_mxfp4_ggml

    monkeypatch.setattr(mxfp4, "_CHUNK", 7)

    rng = np.random.default_rng(0)
    raw = np.zeros((256, 17), np.uint8)
    raw[:, 0] = np.arange(256)
    raw[:, 1:] = rng.integers(0, 256, (256, 16))
    with np.errstate(over="ignore"):
        want = gguf.quants.dequantize(raw.reshape(-1), MXFP4).reshape(-1)
    got = dequant_mxfp4_ggml(torch.from_numpy(raw).reshape(-1)).numpy()
    assert np.array_equal(got, want, equal_nan=True)
    x = (rng.standard_normal((6, 96)) * np.exp(rng.uniform(-8, 8, (6, 1)))).astype(np.float32)
    q = gguf.quants.quantize(x, MXFP4)
    got = dequant_mxfp4_ggml(torch.from_numpy(q).reshape(-1)).reshape(6, 96).numpy()
    assert np.array_equal(got, gguf.quants.dequantize(q, MXFP4))
    assert 0 < np.abs(got - x).max() <= 0.25 * np.abs(x).max()  # 4-bit: close, not equal


def test_deepseek2_softmax_router_without_q_lora(tmp_path):
    """A DeepSeek-V2-Lite-shaped file: plain attn_q (no q_lora_rank), softmax routing over ungrouped
    experts (expert_gating_func absent: llama.cpp's rule for old V2 files), no exp_probs_b, no
    renormalisation. The reference is the safetensors model with its routers switched to softmax."""
    folder = save_tiny_model(tmp_path / "m", "deepseek_v3", q_lora_rank=None, n_group=1, topk_group=1,
                             norm_topk_prob=False, routed_scaling_factor=1.0)
    hf = _hf(folder)
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    tensors = {n: t for n, t in _llama_cpp_tensors(hf, arch).items() if "exp_probs_b" not in n}
    assert "blk.0.attn_q.weight" in tensors
    path = tmp_path / "v2.gguf"
    _write(path, hf, arch, tensors, gating=0)
    ours = load_checkpoint(path, "float32")
    assert ours.args.family == "deepseek_v2" and ours.args.n_group == 1
    assert ours.args.scoring == "softmax" and not ours.args.q_lora_rank and not ours.args.norm_topk_prob
    ref = load_checkpoint(folder, "float32")
    for layer in ref.layers[1:]:
        layer.mlp.router.scoring = "softmax"
        layer.mlp.router.e_score_correction_bias.zero_()
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = ours(x)
        assert rel(got, ref(x)) <= 1e-5
        assert rel(got, load_checkpoint(folder, "float32")(x)) > 1e-4  # softmax routing really differs


def test_deepseek2_grouped_softmax_is_deepseek_v2(tmp_path):
    """A DeepSeek-V2 / V2.5-shaped file: softmax gating over 4 expert groups, 2 used (V2's
    group-limited greedy) loads and matches the same model from safetensors (`deepseek_v2`) and
    transformers' DeepseekV2 through prefill and cached decode."""
    folder = save_tiny_model(tmp_path / "m", "deepseek_v2")
    hf = _hf(folder)
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    path = tmp_path / "g.gguf"
    _write(path, hf, arch, _llama_cpp_tensors(hf, arch), gating=1)
    a = load_checkpoint(path, "float32").args
    assert a.family == "deepseek_v2" and a.scoring == "softmax"
    assert (a.n_group, a.topk_group, a.routed_scaling_factor) == (4, 2, 1.5)
    assert not a.norm_topk_prob
    _matches(path, folder, hf)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_load_model_runs_the_gguf_like_the_folder(deepseek, gpt_oss, tmp_path, monkeypatch, family):
    """`load_model` (what `lagoon serve --model x.gguf` calls) takes these GGUFs, tokenizer and chat
    template included (transformers cannot read deepseek2's config; the tokenizer needs none), and
    greedy-decodes the same tokens as the safetensors folder."""
    from lagoon.engine import load_model

    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))
    folder, hf = deepseek if family == "deepseek_v3" else gpt_oss
    arch = gguf.MODEL_ARCH.DEEPSEEK2 if family == "deepseek_v3" else gguf.MODEL_ARCH.GPT_OSS
    path = tmp_path / "m.gguf"
    _write(path, hf, arch, _llama_cpp_tensors(hf, arch), tokenizer=True)
    prompt = "def add(a, b):"
    want = load_model(folder, precision="float32").complete(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    for _ in range(2):  # the second load reads the cached tokenizer
        engine = load_model(path, precision="float32")
        assert engine.tokenizer.chat_template and engine.model.args.family == family
        got = engine.complete(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert got.token_ids == want.token_ids and got.prompt_tokens == want.prompt_tokens


def test_deepseek2_q4_0_runs_natively(tmp_path, monkeypatch):
    """Q4_0 matrices (wherever K is whole blocks) under `native`: MLA's q_a_proj (48 rows) becomes a
    4-bit (or int8) linear; projections whose rows are not a multiple of 16 (torch's int4 packing
    refuses them) run int8; the output is the float reading of the same file to bf16 rounding."""
    folder = save_tiny_model(tmp_path / "m", "deepseek_v3", q_lora_rank=48)
    hf = _hf(folder)
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    tensors = _llama_cpp_tensors(hf, arch)
    q4 = {n: gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q4_0) for n, t in tensors.items()
          if n.startswith("blk.") and t.ndim == 2 and t.shape[1] % 32 == 0}
    assert "blk.0.attn_q_a.weight" in q4 and "blk.1.attn_kv_a_mqa.weight" in q4
    path = tmp_path / "q4.gguf"
    _write(path, hf, arch, tensors, quant=(gguf.GGMLQuantizationType.Q4_0, q4))
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))  # native loads keep a repack cache
    native = load_checkpoint(path, "native")
    assert type(native.layers[0].self_attn.q_a_proj).__name__ in ("Q4_1Linear", "Q4ActLinear", "Int8Linear")
    ref = load_checkpoint(path, "float32")
    close = 0
    for seed in range(8, 14):
        x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            exact = ref(x)
            close += rel(native(x).float(), exact) <= 5e-2
            if seed == 8:
                assert 0 < rel(exact, hf(x).logits) <= 0.5  # 4-bit weights: a real change, not noise
    # a near-tie in this random model's MoE router flips an expert for some token on a few inputs
    # (measured 2 of these 6 on both torch's bf16 kernels and Lagoon's int8-activation kernel)
    assert close >= 4


def test_rope_scaling_and_window_pattern_metadata():
    """`rope.scaling.*` → HF rope parameters (linear, YaRN with DeepSeek's log multiplier, none), bad
    or incomplete scaling refused; gpt-oss's sliding_window_pattern as a per-layer list or a period."""
    from lagoon.engine.gguf_arch import arch_config, rope_parameters

    def fields(d):
        return lambda key, default=None: d.get(key, default)

    assert rope_parameters("qwen2", fields({})) == {}
    assert rope_parameters("qwen2", fields({"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 1.0})) == {}
    assert rope_parameters("llama", fields({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})) == {
        "rope_type": "linear", "factor": 2.0}
    yarn = {"deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 40.0,
            "deepseek2.rope.scaling.original_context_length": 4096, "deepseek2.rope.scaling.yarn_log_multiplier": 0.0707,
            "deepseek2.rope.scaling.yarn_beta_fast": 16.0}
    got = rope_parameters("deepseek2", fields(yarn))
    assert got == {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
                   "mscale": 0.707, "mscale_all_dim": 0.707}
    with pytest.raises(CheckpointError, match="original_context_length"):
        rope_parameters("deepseek2", fields({k: v for k, v in yarn.items() if "original" not in k}))
    with pytest.raises(CheckpointError, match="longrope"):
        rope_parameters("qwen2", fields({"qwen2.rope.scaling.type": "longrope"}))
    base = {"num_hidden_layers": 4}
    pattern = {"gpt-oss.attention.sliding_window": 128}
    assert arch_config("gpt-oss", fields(pattern), base, {})["layer_types"] == [
        "sliding_attention", "full_attention"] * 2  # llama.cpp's default: even layers slide
    listed = {**pattern, "gpt-oss.attention.sliding_window_pattern": [False, True, True, False]}
    assert arch_config("gpt-oss", fields(listed), base, {})["layer_types"] == [
        "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    period = {**pattern, "gpt-oss.attention.sliding_window_pattern": 4}
    assert arch_config("gpt-oss", fields(period), base, {})["layer_types"][-1] == "full_attention"
    with pytest.raises(CheckpointError, match="sliding_window is missing"):
        arch_config("gpt-oss", fields({}), base, {})
