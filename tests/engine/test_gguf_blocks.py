"""GGUF block formats at their own bit width (`lagoon.engine.gguf_blocks`): Q4_K onto the int4
kernel exactly, Q5_0 / Q5_1 / Q6_K / Q8_0 re-quantized to int8 per channel, each against the `gguf`
package's own dequantizer on fresh random blocks, and a GGUF holding all of them loaded `native`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lagoon.engine.gguf_blocks import INT8_KINDS, dequant_q4_k, q4_k_fields, q8_0_fields
from lagoon.engine.gguf_linear import Int8Linear, Q4_1Linear, Q4ActLinear, Q8ActLinear, Q8Linear

_SCALE_AT = {"Q4_K": (0, 4), "Q6_K": (208, 210), "Q2_K": (80, 84), "Q3_K": (108, 110), "Q5_K": (0, 4)}
"""Byte range of the f16 scale(s) in a block of the kinds the gguf package cannot quantize."""


def _random_blocks(kind: str, n_weights: int, rng: np.random.Generator, std: float = 1.0) -> np.ndarray:
    """Fresh random `kind` blocks for `n_weights` weights of about `std` (raw bytes)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind not in _SCALE_AT:  # the package quantizes these: random weights through it
        return gguf.quants.quantize(std * rng.standard_normal((1, n_weights)).astype(np.float32), qtype).reshape(-1)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n_weights // block, size), dtype=np.uint8)  # random codes, scales, mins
    lo, hi = _SCALE_AT[kind]
    unit = {"Q4_K": 4e-3, "Q6_K": 7.5e-4, "Q2_K": 4e-2, "Q3_K": 1e-2, "Q5_K": 2e-3}[kind]  # d, dmin: weights of ~1
    f16 = (std * unit * rng.uniform(0.5, 1.5, (b.shape[0], (hi - lo) // 2))).astype(np.float16)
    b[:, lo:hi] = f16.view(np.uint8)
    return b.reshape(-1)


def _oracle(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    import gguf

    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.array(w, dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_k_runs_exactly_on_the_int4_kernel(seed):
    rng = np.random.default_rng(seed)
    N, K = 48, 512
    raw = _random_blocks("Q4_K", N * K, rng)
    ref_w = _oracle("Q4_K", raw, (N, K))
    t = torch.from_numpy(raw)
    assert torch.equal(dequant_q4_k(t).reshape(N, K), ref_w)  # bit-exact
    layer = Q4_1Linear(*q4_k_fields(t), N, K)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(seed))
    ref = x @ ref_w.t()
    # bf16 activations and group scale / zero (the Q4_1 path's 6e-3 bound)
    assert float((layer(x) - ref).norm() / ref.norm()) <= 6e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_q8_0_runs_exactly_on_two_int4_passes(seed):
    rng = np.random.default_rng(seed)
    N, K = 48, 256
    raw = _random_blocks("Q8_0", N * K, rng)
    ref_w = _oracle("Q8_0", raw, (N, K))
    d, m, q = q8_0_fields(torch.from_numpy(raw))
    assert torch.equal((d * q.float() + m).reshape(N, K), ref_w)  # the fields are the file's values
    x = torch.randn(20, K, generator=torch.Generator().manual_seed(seed))
    low, both = Q8Linear(d, q, N, K), Q8Linear(d, q, N, K, dense=torch.bfloat16)
    ref = x.bfloat16().double() @ ref_w.double().t()
    # bf16 activations, d rounded to bf16 (2^-9 relative), bf16 kernel outputs: measured ~3e-3
    assert float((low(x[:3]).double() - ref[:3]).norm() / ref[:3].norm()) <= 6e-3
    assert float((both(x).double() - ref).norm() / ref.norm()) <= 6e-3  # the dense prefill copy
    assert torch.equal(both(x[:3]), low(x[:3]))  # few rows: the int4 passes themselves


@pytest.mark.parametrize("kind", INT8_KINDS)
def test_wider_kinds_requantize_within_half_an_int8_step(kind):
    rng = np.random.default_rng(len(kind))
    N, K = 32, 512
    ref_w = _oracle(kind, _random_blocks(kind, N * K, rng), (N, K))
    layer = Int8Linear.from_weight(ref_w)
    wd = layer.qweight.float() * layer.scale.float()[:, None]
    rowmax = ref_w.abs().amax(dim=1, keepdim=True)
    assert bool(((wd - ref_w).abs() <= rowmax / 254 * 1.01).all())  # half a step, bf16-rounded scale


def _write_gguf(path, kinds: dict[str, str], dim: int = 256, ffn: int = 512, vocab: int = 96, seed: int = 0,
                arch: str = "llama") -> None:
    """A one-layer `arch` GGUF whose projection `p` (attn_q, ..., ffn_down) is stored as `kinds[p]`
    (random blocks), F32 norms and embedding, and a Q8_0 output head; qwen2 adds q/k/v biases."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    kv = dim // 4 * 2
    shapes = {"attn_q": (dim, dim), "attn_k": (kv, dim), "attn_v": (kv, dim), "attn_output": (dim, dim),
              "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, dim)).astype(np.float32))
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for name, (n, k) in shapes.items():
        kind = kinds[name]
        qtype = gguf.GGMLQuantizationType[kind]
        raw = _random_blocks(kind, n * k, rng, std=0.3 / k**0.5)  # a tame network: errors do not blow up
        w.add_tensor(f"blk.0.{name}.weight", raw.reshape(n, -1), raw_dtype=qtype)  # [rows, bytes a row]
        if arch == "qwen2" and name in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(f"blk.0.{name}.bias", (0.5 * rng.standard_normal(n)).astype(np.float32))
    head = gguf.quants.quantize(0.05 * rng.standard_normal((vocab, dim)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output.weight", head, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MIXED = {"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q8_0", "attn_output": "Q5_0",
         "ffn_gate": "Q4_K", "ffn_up": "Q5_1", "ffn_down": "Q6_K"}
QWEN2 = {"attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q6_K", "attn_output": "Q2_K",  # q/k/v: biased
         "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q3_K"}
_ATTR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def _want(kind: str, isa: str) -> type:
    from lagoon.engine.kernels import kernel_plan

    if kind in ("Q4_K", "Q4_0") and kernel_plan(isa).q4_isa:  # Lagoon's kernel, where it builds
        return Q4ActLinear
    if isa == "avx512":
        return {"Q4_K": Q4_1Linear, "Q4_0": Q4_1Linear, "Q8_0": Q8Linear}.get(kind, Int8Linear)
    return Int8Linear


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_each_kind_loads_at_its_width_and_matches_the_float_file(tmp_path, monkeypatch, isa, arch):
    from lagoon.engine.checkpoint import load_gguf

    monkeypatch.setenv("LAGOON_CPU_ISA", isa)
    monkeypatch.setenv("LAGOON_REPACK_CACHE", "0")
    path = tmp_path / "mixed.gguf"
    _write_gguf(path, MIXED if arch == "llama" else QWEN2, arch=arch)
    kinds = MIXED if arch == "llama" else QWEN2
    ref = load_gguf(path, "float32")  # the gguf package's dequantization of the same blocks
    got = load_gguf(path, "native")
    g = torch.Generator().manual_seed(3)
    for name, kind in kinds.items():
        layer, float_layer = (m.layers[0].get_submodule(_ATTR[name]) for m in (got, ref))
        assert type(layer) is _want(kind, isa), (name, kind, type(layer))
        assert (layer.bias is None) == (float_layer.bias is None)
        for n in (5, 24):  # the low-bit kernel, then the dense prefill copy
            x = torch.randn(n, layer.in_features, generator=g)
            y = float_layer(x)
            # bf16 activations, int8 re-quantization (measured 0.6-0.8%), or int8 activations
            assert float((layer(x).float() - y).norm() / y.norm()) <= 1.5e-2, (name, n)
    from lagoon.engine.kernels import kernel_plan

    assert isinstance(got.lm_head, Q8ActLinear if kernel_plan(isa).head_isa else Int8Linear)
    for n in (5, 24):
        x = torch.randint(0, 96, (2, n), generator=g)
        with torch.no_grad():
            a, b = ref(x), got(x).float()
        # the above, and bf16 norms / embedding, int8 head (measured 0.7-0.8%)
        assert float((a - b).norm() / a.norm()) <= 2e-2


@pytest.mark.slow  # re-quantizes the embedded model with llama.cpp (optional, extra `bench`) and decodes
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_a_llama_cpp_q4_k_m_file_decodes_like_its_float_load(tmp_path, monkeypatch, isa):
    """llama.cpp's own Q4_K_M of the embedded model (Q5_0, Q4_K, Q6_K and Q8_0 linears: SmolLM2's
    576-wide rows make most K-quants fall back): greedy tokens at native precision equal the float32
    load of the same file, and a repack-cache hit equals the fresh load."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from lagoon.engine import embedded_gguf_path
    from lagoon.engine.checkpoint import load_gguf

    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LAGOON_CPU_ISA", isa)
    path = tmp_path / "q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, True, 1
    assert llama_cpp.llama_model_quantize(str(embedded_gguf_path()).encode(), str(path).encode(),
                                          ctypes.byref(params)) == 0
    ref, got, hit = load_gguf(path, "float32"), load_gguf(path, "native"), load_gguf(path, "native")
    kinds = {type(m) for m in got.modules()}
    from lagoon.engine.kernels import kernel_plan

    assert Int8Linear in kinds and (isa == "avx2" or Q8Linear in kinds)
    assert (Q4ActLinear in kinds) == bool(kernel_plan(isa).q4_isa)  # Q4_K on Lagoon's kernel where it builds
    prompts = [[1, 563, 28789, 30, 94, 2145, 46, 216], [504, 3575, 282, 4649, 314]]  # fixed token ids
    agree = 0
    for ids in prompts:
        outs = []
        for m in (ref, got, hit):
            x = torch.tensor([ids])
            with torch.no_grad():
                for _ in range(10):
                    x = torch.cat([x, m(x)[:, -1].float().argmax(-1, keepdim=True)], dim=1)
            outs.append(x[0, len(ids):].tolist())
        assert outs[1] == outs[2]  # the cached model is the same model
        agree += outs[0] == outs[1]
    # measured: equal on every prompt on avx512; int8 everywhere (avx2) may drift after a few tokens
    assert agree == len(prompts) if isa == "avx512" else agree >= 1
