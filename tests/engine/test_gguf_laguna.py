"""A Laguna GGUF in llama.cpp's layout (``laguna``: conversion/laguna.py's keys and tensor names,
written here as strings: gguf-py 0.19.0 has no LAGUNA) loads and matches the same tiny model from
safetensors: prefill and 4 cached greedy decode steps, fp32, rel. error <= 1e-5, greedy tokens equal.

The tiny model has XS.2's shape in small: 5 layers full / sliding x3 / full (the period-4
pattern llama.cpp assumes when the file names none), a sliding window (5) shorter than the
prompt (9), per-layer query heads, a dense first layer, a shared expert, partial rotary on both
layer types (YaRN on the full layers), no router softcap (a GGUF cannot carry one). Also: F32
and Q8_0 tensors, per-head and per-element gates, the file's eos + eot ids stop the engine (Laguna
ends a turn with ``</assistant>``, which the converter writes as eot), a missing or mis-shaped
tensor raises CheckpointError naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_families import _decode  # the same prefill + greedy cached-decode driver

from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.sampling import SamplingParams
from lagoon.engine.tiny import byte_tokenizer, save_tiny_model
from lagoon.errors import CheckpointError
from lagoon.model.rope import attention_scaling, inv_freq

gguf = pytest.importorskip("gguf")
ARCH = "laguna"
TEMPLATE = Path(__file__).parents[1] / "fixtures" / "chat_templates" / "laguna_xs2.jinja"
FULL, SLIDE = "full_attention", "sliding_attention"
XS2_LIKE = dict(
    num_hidden_layers=5, layer_types=[FULL, SLIDE, SLIDE, SLIDE, FULL], num_attention_heads_per_layer=[6, 4, 4, 2, 6],
    mlp_layer_types=["dense"] + ["sparse"] * 4, moe_router_logit_softcapping=0.0, moe_routed_scaling_factor=2.5,
    rope_parameters={
        FULL: {"rope_type": "yarn", "rope_theta": 500000.0, "partial_rotary_factor": 0.5, "factor": 4.0,
               "original_max_position_embeddings": 128, "beta_fast": 64.0, "beta_slow": 1.0},
        SLIDE: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def laguna(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("lag") / "m", "laguna", **XS2_LIKE)
    return folder, _hf(folder)


# ------------------------------------------------------------------------ llama.cpp's layout
_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "g_proj": "attn_gate"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _tensors(hf) -> dict[str, np.ndarray]:
    """HF Laguna tensors → llama.cpp's laguna names and shapes (numpy order: experts, out, in),
    experts split into ffn_{gate,up,down}_exps as its converter stacks them."""
    out: dict[str, np.ndarray] = {}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, t in hf.state_dict().items():
        t = t.detach().float()
        if name in top:
            out[top[name]] = t.numpy()
            continue
        _, _, i, *path = name.split(".")
        blk, leaf = f"blk.{i}", path[-1]
        if path[0] in _LAYER:
            out[f"{blk}.{_LAYER[path[0]]}.weight"] = t.numpy()
        elif path[0] == "self_attn":
            out[f"{blk}.{_ATTN[path[1]]}.{leaf}"] = t.numpy()
        elif path[1] in _MLP:  # the dense layer
            out[f"{blk}.{_MLP[path[1]]}.weight"] = t.numpy()
        elif path[1] == "shared_experts":
            out[f"{blk}.{_MLP[path[2]]}_shexp.weight"] = t.numpy()
        elif path[1] == "gate":  # the router and its selection bias
            out[f"{blk}.ffn_gate_inp.weight" if leaf == "weight" else f"{blk}.exp_probs_b.bias"] = t.numpy()
        elif path[2] == "gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
            gate, up = t.chunk(2, dim=1)
            out[f"{blk}.ffn_gate_exps.weight"], out[f"{blk}.ffn_up_exps.weight"] = gate.numpy(), up.numpy()
        elif path[2] == "down_proj":
            out[f"{blk}.ffn_down_exps.weight"] = t.numpy()
        else:
            raise AssertionError(f"no llama.cpp name for {name}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _write(path, hf, tensors, *, quant: dict | None = None, tokenizer: dict | None = None, pattern=None) -> None:
    """The keys llama.cpp's TextModel + LagunaModel converters write (no sliding_window_pattern:
    llama.cpp then assumes XS.2's period 4). `quant`: {name: Q8_0 bytes}."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), ARCH)
    if tokenizer is not None:
        _add_tokenizer(w, c.vocab_size, **tokenizer)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(list(c.num_attention_heads_per_layer))
    w.add_head_count_kv(c.num_key_value_heads)
    full, swa = c.rope_parameters[FULL], c.rope_parameters[SLIDE]
    if full["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(full["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(full["beta_slow"])
    w.add_rope_freq_base(full["rope_theta"])
    w.add_rope_freq_base_swa(swa["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(c.moe_routed_scaling_factor)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(c.mlp_layer_types.index("sparse"))
    w.add_rope_dimension_count(int(c.head_dim * full.get("partial_rotary_factor", 1.0)))
    w.add_rope_dimension_count_swa(int(c.head_dim * swa.get("partial_rotary_factor", 1.0)))
    for name, t in tensors.items():
        if quant and name in quant:
            w.add_tensor(name, quant[name], raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w, vocab_size: int, *, eos: int, eot: int | None = None, extra: tuple[str, ...] = (),
                   template: str | None = None) -> None:
    """The tiny models' byte-level vocabulary as llama.cpp's gpt2 tokenizer keys, `extra` tokens
    after it as CONTROL tokens (the converter marks Laguna's ``</assistant>`` so), eos and eot."""
    tok = byte_tokenizer()
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])] + ["ĠĠ", *extra]
    n = len(tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(n, vocab_size)])
    w.add_token_types([1] * 256 + [3] * 3 + [1] + [3] * len(extra) + [5] * (vocab_size - n))
    w.add_token_merges(["Ġ Ġ"])
    w.add_eos_token_id(eos)
    if eot is not None:
        w.add_eot_token_id(eot)
    w.add_chat_template(template or tok.chat_template)


# ------------------------------------------------------------------------ checks
def _matches(ours, folder, tol=1e-5):
    ref = load_checkpoint(folder, "float32")
    a, b = ours.args, ref.args
    assert a.layers == b.layers and (a.num_experts, a.top_k, a.shared_intermediate_size) == (
        b.num_experts, b.top_k, b.shared_intermediate_size)
    assert (a.scoring, a.norm_topk_prob, a.routed_scaling_factor) == (b.scoring, b.norm_topk_prob, b.routed_scaling_factor)
    assert dict(a.ropes).keys() == dict(b.ropes).keys()
    for name, x in a.ropes:
        y = b.rope_table(name)
        assert x.dim == y.dim and x.kind == y.kind, name
        assert torch.allclose(inv_freq(x), inv_freq(y)) and attention_scaling(x) == attention_scaling(y), name
    prompts = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    toks, logits = _decode(ours, prompts, 4)
    ref_toks, ref_logits = _decode(ref, prompts, 4)
    assert toks == ref_toks
    for got, want in zip(logits, ref_logits, strict=True):
        assert rel(got, want) <= tol


def test_laguna_gguf_matches_the_safetensors_model(laguna, tmp_path):
    folder, hf = laguna
    path = tmp_path / "l.gguf"
    _write(path, hf, _tensors(hf))
    model = load_checkpoint(path, "float32")
    a = model.args
    assert a.family == "laguna" and [s.window for s in a.layers] == [None, 5, 5, 5, None]
    assert [s.n_heads for s in a.layers] == [6, 4, 4, 2, 6] and [s.mlp for s in a.layers] == ["dense"] + ["moe"] * 4
    assert {s.output_gate for s in a.layers} == {"head"} and a.routed_scaling_factor == 2.5
    assert (a.rope_table(FULL).dim, a.rope_table(SLIDE).dim, a.rope_table(FULL).kind) == (8, 12, "yarn")
    _matches(model, folder)
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel(model(x), hf(x).logits) <= 1e-4  # and transformers itself, past the window


def test_per_element_gate_and_an_explicit_pattern(tmp_path):
    """A per-element gate (M.1's) is read from attn_gate's rows; a per-layer sliding_window_pattern
    array overrides the period (here layers that do not follow XS.2's full-first rule)."""
    types = [SLIDE, FULL, FULL, SLIDE, SLIDE]
    folder = save_tiny_model(tmp_path / "m", "laguna", **{**XS2_LIKE, "gating": "per-element", "layer_types": types})
    hf = _hf(folder)
    path = tmp_path / "e.gguf"
    _write(path, hf, _tensors(hf), pattern=[t == SLIDE for t in types])
    model = load_checkpoint(path, "float32")
    assert {s.output_gate for s in model.args.layers} == {"element"}
    assert [s.window for s in model.args.layers] == [5, None, None, 5, 5]
    _matches(model, folder)


def test_q8_0_tensors(laguna, tmp_path, monkeypatch):
    """Q8_0 matrices (wherever K is whole blocks: attention incl. the gate, dense and shared MLPs,
    routers, gate/up experts) read as exactly the values gguf's dequantizer gives, and run
    natively (int8 / 4-bit linears, bf16 activations) within twice the error of reading the same
    file in bf16 (random 0.2-std weights through 5 layers and top-k routing: ~7% for bf16 alone)."""
    _, hf = laguna
    tensors = _tensors(hf)
    q8 = {n: gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0) for n, t in tensors.items()
          if n.startswith("blk.") and t.ndim >= 2 and t.shape[-1] % 32 == 0}
    assert {"blk.1.attn_gate.weight", "blk.0.ffn_gate.weight", "blk.2.ffn_up_exps.weight"} <= set(q8)
    path, ref_path = tmp_path / "q8.gguf", tmp_path / "dq.gguf"
    _write(path, hf, tensors, quant=q8)
    dq = {n: gguf.quants.dequantize(q8[n], gguf.GGMLQuantizationType.Q8_0).reshape(t.shape) if n in q8 else t
          for n, t in tensors.items()}
    _write(ref_path, hf, dq)
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(8))
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))  # native loads keep a repack cache
    with torch.no_grad():
        exact = load_checkpoint(path, "float32")(x)
        assert rel(exact, load_checkpoint(ref_path, "float32")(x)) <= 1e-6
        assert 0 < rel(exact, hf(x).logits) <= 0.1  # 8-bit weights: a real change, not noise
        native = load_checkpoint(path, "native")
        assert type(native.layers[1].self_attn.g_proj).__name__ != "Linear"
        bf16 = rel(load_checkpoint(path, "bfloat16")(x).float(), exact)
        assert rel(native(x).float(), exact) <= 2 * bf16


@pytest.mark.parametrize(("edit", "named"), [
    ("drop", "blk.2.attn_gate.weight"),
    ("shape", "blk.3.attn_gate.weight"),
    ("drop", "blk.1.ffn_down_shexp.weight"),
    ("drop", "blk.4.exp_probs_b.bias"),
    ("shape", "blk.3.attn_q.weight"),
    ("shape", "blk.2.ffn_up_exps.weight"),
    ("drop", "blk.0.ffn_gate.weight"),
])
def test_missing_or_misshaped_tensor_is_named(laguna, tmp_path, edit, named):
    _, hf = laguna
    tensors = _tensors(hf)
    if edit == "drop":
        del tensors[named]
    else:
        tensors[named] = np.ascontiguousarray(tensors[named][..., :-1, :])
    path = tmp_path / "bad.gguf"
    _write(path, hf, tensors)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_checkpoint(path, "float32")


def test_load_model_serves_the_gguf_like_the_folder(laguna, tmp_path, monkeypatch):
    """`load_model` (what `lagoon serve --model x.gguf` calls) takes the Laguna GGUF, tokenizer and
    template included, and greedy-decodes the same tokens as the safetensors folder."""
    from lagoon.engine import load_model

    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))
    folder, hf = laguna
    path = tmp_path / "m.gguf"
    _write(path, hf, _tensors(hf), tokenizer={"eos": 258})
    prompt = "def add(a, b):"
    want = load_model(folder, precision="float32").complete(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine = load_model(path, precision="float32")
    assert engine.model.args.family == "laguna" and engine.tokenizer.chat_template
    got = engine.complete(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert got.token_ids == want.token_ids and got.prompt_tokens == want.prompt_tokens


def test_the_files_eot_stops_the_engine(laguna, tmp_path, monkeypatch):
    """llama.cpp's converter writes Laguna's eos list [eos, </assistant>] as eos + eot; the engine
    stops on either. The eot here is the token the model greedily writes third, so the run stops
    there; without the eot key it runs on to max_new_tokens."""
    from lagoon.engine import load_model

    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))
    _, hf = laguna
    prompt = "def add(a, b):"
    runs = {}
    for eot in (None, "third"):
        path = tmp_path / f"{eot}.gguf"
        if eot == "third":
            eot = runs[None].token_ids[2]
            assert eot not in runs[None].token_ids[:2]
        _write(path, hf, _tensors(hf), tokenizer={"eos": 256, "eot": eot})
        engine = load_model(path, precision="float32")
        assert engine.eos_ids == ({256} if eot is None else {256, eot})
        runs[eot] = engine.complete(prompt, SamplingParams(max_new_tokens=8))
    plain, stopped = runs.pop(None), runs.popitem()[1]
    assert plain.finish_reason == "length" and len(plain.token_ids) == 8
    assert stopped.finish_reason == "stop" and stopped.token_ids[:2] == plain.token_ids[:2]
    assert len(stopped.token_ids) <= 3


def test_lagunas_turn_end_is_an_end_of_generation_token(laguna, tmp_path, monkeypatch):
    """With Laguna's own template (tests/fixtures, XS.2's) and its vocabulary's ``〈|EOS|〉`` and
    ``</assistant>`` as the converter writes them (CONTROL tokens; eos and eot), every assistant
    turn the template renders ends in the one token the engine stops on. ``〈|EOS|〉`` is spelled
    outside the byte alphabet: it keeps its own id (transformers alone gave it a new one, past the
    model's vocabulary), so the rendered chat runs."""
    from lagoon.engine import load_model

    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))
    _, hf = laguna
    path = tmp_path / "t.gguf"
    eos, eot = 260, 261  # after the 256 bytes, 3 ChatML specials and one merge
    _write(path, hf, _tensors(hf), tokenizer={"eos": eos, "eot": eot, "extra": ("〈|EOS|〉", "</assistant>"),
                                              "template": TEMPLATE.read_text()})
    engine = load_model(path, precision="float32")
    assert {eos, eot} <= engine.eos_ids
    tok = engine.tokenizer
    assert tok.convert_tokens_to_ids(["〈|EOS|〉", "</assistant>"]) == [eos, eot]
    text = engine.chat_format.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                      {"role": "user", "content": "again"}])
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == eos and ids.count(eot) == 1  # the template opens with 〈|EOS|〉; one closed assistant turn
    after = ids[ids.index(eot) + 1:]
    assert tok.decode(after).startswith("\n<user>") and max(ids) < hf.config.vocab_size
    assert engine.complete(text, SamplingParams(max_new_tokens=2, ignore_eos=True)).completion_tokens == 2


def test_laguna_metadata_rules():
    """The sliding pattern: a per-layer array, attention.layer_types strings, else llama.cpp's
    dense-first period (4 when absent; 0: every layer slides); no sliding_window: every layer full.
    Required keys and Laguna's router are checked."""
    from lagoon.engine.gguf_arch import arch_config

    def fields(d):
        return lambda key, default=None: d.get(key, default)

    n = 6
    base = {"num_hidden_layers": n, "head_dim": 16, "num_attention_heads": 4, "rope_theta": 1e4, "num_experts": 4}
    keys = {"laguna.attention.sliding_window": 8, "laguna.leading_dense_block_count": 2,
            "laguna.expert_shared_feed_forward_length": 24, "laguna.rope.dimension_count": 10}
    gates = {f"blk.{i}.attn_gate.weight": (4, 64) for i in range(n)}

    def cfg(**over):
        return arch_config("laguna", fields({**keys, **{f"laguna.{k}": v for k, v in over.items()}}), base, gates)

    def slides(c):
        return [t == SLIDE for t in c["layer_types"]]

    got = cfg()
    assert slides(got) == [False, True, True, True, False, True] and got["mlp_layer_types"][:3] == ["dense"] * 2 + ["sparse"]
    assert int(16 * got["rope_parameters"][FULL]["partial_rotary_factor"]) == 10
    assert int(16 * got["rope_parameters"][SLIDE]["partial_rotary_factor"]) == 10  # dimension_count_swa absent
    assert slides(cfg(**{"attention.sliding_window_pattern": 2})) == [False, True] * 3
    assert slides(cfg(**{"attention.sliding_window_pattern": 0})) == [True] * n
    assert slides(cfg(**{"attention.sliding_window_pattern": [True] * 5 + [False]})) == [True] * 5 + [False]
    assert slides(cfg(**{"attention.layer_types": [SLIDE, FULL] * 3})) == [True, False] * 3
    no_swa = arch_config("laguna", fields({k: v for k, v in keys.items() if "sliding" not in k}), base, gates)
    assert slides(no_swa) == [False] * n and no_swa["sliding_window"] is None
    with pytest.raises(CheckpointError, match="sliding_window_pattern lists 5"):
        cfg(**{"attention.sliding_window_pattern": [True] * 5})
    with pytest.raises(CheckpointError, match="sigmoid"):
        cfg(expert_gating_func=1)
    with pytest.raises(CheckpointError, match="leading_dense_block_count is missing"):
        arch_config("laguna", fields({k: v for k, v in keys.items() if "leading" not in k}), base, gates)
    with pytest.raises(CheckpointError, match="rope dimension count of 18"):
        cfg(**{"rope.dimension_count_swa": 18})
    mixed = {**gates, "blk.5.attn_gate.weight": (64, 64)}
    with pytest.raises(CheckpointError, match="per head and others per element"):
        arch_config("laguna", fields(keys), base, mixed)
