"""Lagoon's decode-attention kernel (`torch.ops.lagoon.decode_attention`, `lagoon.engine.cpu_kernels`)
against SDPA on fresh random inputs (each ISA variant, bf16 and fp32 pools, grouped-query ratios,
batches of different lengths, lengths across block boundaries), and the model's decode through
`cache.attend` (paged and contiguous caches, eager and compiled) against the SDPA path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_compile import prefill_each  # the same eager prefill as the compiled-step tests

from lagoon.engine import cpu_kernels
from lagoon.engine.aoti_step import read_metadata
from lagoon.engine.compile import DecodeStep
from lagoon.engine.kv_cache import make_cache, use_native_attention
from lagoon.model.args import LayerSpec, ModelArgs
from lagoon.model.transformer import Transformer

ISAS = ("avx512", "avx2", "default")
ARGS = ModelArgs(family="llama", vocab_size=96, dim=64, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16,
                 intermediate_size=64, max_position_embeddings=256)


def _need(isa: str) -> None:
    if not cpu_kernels.cpu_has(isa):
        pytest.skip(f"this CPU has no {isa}, or the kernels did not build ({cpu_kernels.unavailable_reason()})")


def _reference(q, kp, vp, slots, pos) -> torch.Tensor:
    """fp32 SDPA per sequence over its gathered positions 0..pos: [B, H, Dv]."""
    out = []
    for b in range(q.shape[0]):
        idx = slots[b, : int(pos[b]) + 1]
        k, v = kp[idx].float().transpose(0, 1)[None], vp[idx].float().transpose(0, 1)[None]  # [1, K, S, D]
        out.append(F.scaled_dot_product_attention(q[b].float()[None, :, None], k, v, enable_gqa=True)[0, :, 0])
    return torch.stack(out)


# (B, H, K, D, lengths): MHA, GQA 3:1 (SmolLM2's 9 / 3, head_dim 64), 4:1 with head_dim 128, MQA,
# lengths 1, across 16-position blocks, past one 32-position tile and past a 256-position chunk
CASES = [(1, 9, 3, 64, [130]), (2, 8, 2, 128, [17, 300]), (3, 4, 4, 64, [1, 33, 1100]), (2, 6, 1, 32, [64, 65]),
         (2, 6, 2, 24, [7, 40])]  # head_dim 24: not a multiple of the vector width (plain loops)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_sdpa(isa, dtype):
    _need(isa)
    g = torch.Generator().manual_seed(7)
    for B, H, K, D, lens in CASES:
        N = 2048  # a pool with the sequences' slots scattered over it, as a paged cache's blocks are
        kp, vp = (torch.randn(N, K, D, generator=g).to(dtype) for _ in range(2))
        S = max(lens) + 3  # slots past a sequence's length are never read
        slots = torch.stack([torch.randperm(N, generator=g)[:S] for _ in range(B)])
        pos = torch.tensor(lens)[:, None] - 1  # [B, 1], as the model passes it
        q = torch.randn(B, H, D, generator=g).to(dtype)
        got = cpu_kernels.decode_attention(q, kp, vp, slots, pos, D**-0.5, isa)
        ref = _reference(q, kp, vp, slots, pos)
        assert got.dtype == dtype and got.shape == (B, H, D)
        # fp32: summation order only; bf16: the output's rounding (half an ulp, |out| < 2)
        tol = 1e-5 if dtype == torch.float32 else 2**-8
        assert float((got.float() - ref).abs().max()) <= tol, (isa, dtype, B, H, K, D, lens)


def test_kernel_reads_strided_q_and_checks_its_inputs():
    _need("default")
    g = torch.Generator().manual_seed(1)
    kp, vp = torch.randn(64, 2, 16, generator=g), torch.randn(64, 2, 16, generator=g)
    q = torch.randn(2, 1, 4, 16, generator=g).transpose(1, 2)[:, :, 0]  # [B, H, D] non-contiguous
    slots, pos = torch.arange(40).reshape(2, 20), torch.tensor([19, 4])
    got = cpu_kernels.decode_attention(q, kp, vp, slots, pos, 0.25, "default")
    assert torch.allclose(got, _reference(q * 0.25 / 16**-0.5, kp, vp, slots, pos), atol=1e-5)
    with pytest.raises(RuntimeError, match="needs 21 slots"):
        cpu_kernels.decode_attention(q, kp, vp, slots, torch.tensor([20, 4]), 0.25, "default")
    with pytest.raises(RuntimeError, match="outside the pool"):
        cpu_kernels.decode_attention(q, kp, vp, slots + 60, pos, 0.25, "default")


def _model(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(args).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return m.to(dtype)


def _decode(m, cache, prompts: list[list[int]], n_steps: int, step: DecodeStep | None = None) -> torch.Tensor:
    """Prefill each prompt, then decode all together, feeding back token (step · 7 + row) % 13 (the
    same path for both sides, whatever their near-ties); logits [steps, B, V]."""
    prefill_each(m, cache, prompts, n_steps)
    out, last, lens = [], [ids[-1] for ids in prompts], [len(ids) for ids in prompts]
    for i in range(n_steps):
        tokens, pos = torch.tensor([[t] for t in last]), torch.tensor([[n + i] for n in lens])
        if step is None:
            cache.prepare(list(range(len(prompts))), pos)
            logits = m(tokens, pos, cache)[:, -1]
        else:
            logits = step(list(range(len(prompts))), tokens, pos)
        out.append(logits.float().clone())
        last = [(i * 7 + b) % 13 for b in range(len(prompts))]
    return torch.stack(out)


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_on_the_kernel_matches_sdpa(paged, dtype):
    _need("default")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 17, 9)]
    kw = dict(paged=paged, max_batch=4, max_seq_len=64, dtype=dtype, block_size=8)
    m = _model(ARGS, dtype)
    with torch.no_grad():
        ref = _decode(m, make_cache(ARGS, **kw), prompts, 12)
        cache = make_cache(ARGS, **kw)
        assert use_native_attention(m, cache) == ARGS.n_layers
        got = _decode(m, cache, prompts, 12)
    # fp32: up to summation order; bf16: up to where each layer rounds (SDPA's output, ours)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((got - ref).norm() / ref.norm()) <= tol


def test_only_plain_layers_switch_and_the_switch_turns_it_off(monkeypatch):
    _need("default")
    layers = (LayerSpec(n_heads=6, n_kv_heads=2, head_dim=16, window=8), LayerSpec(n_heads=6, n_kv_heads=2, head_dim=16),
              LayerSpec(n_heads=6, n_kv_heads=2, head_dim=16, sinks=True))
    args = ModelArgs(family="llama", vocab_size=96, dim=64, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16,
                     intermediate_size=64, max_position_embeddings=256, layers=layers)
    m = _model(args, torch.float32)
    cache = make_cache(args, paged=True, max_batch=2, max_seq_len=64, dtype=torch.float32, block_size=8)
    assert use_native_attention(m, cache) == 1
    assert [layer.self_attn.decode_isa is not None for layer in m.layers] == [False, True, False]
    with torch.no_grad():  # the mixed model decodes as the all-SDPA one
        ref = _decode(_model(args, torch.float32), make_cache(args, paged=True, max_batch=2, max_seq_len=64,
                                                             dtype=torch.float32, block_size=8), [[1, 2, 3]], 4)
        got = _decode(m, cache, [[1, 2, 3]], 4)
    assert float((got - ref).norm() / ref.norm()) <= 1e-5
    monkeypatch.setenv("LAGOON_NATIVE_ATTENTION", "0")
    assert use_native_attention(_model(args, torch.float32), cache) == 0
    assert use_native_attention(_model(args, torch.float16), make_cache(
        args, paged=True, max_batch=2, max_seq_len=64, dtype=torch.float16, block_size=8)) == 0


@pytest.mark.slow  # cold inductor compiles of a tiny model take 20-110 s on 2 shared cores
@pytest.mark.parametrize(("paged", "backend"), [(True, "aoti"), (False, "aoti"), (True, "dynamo")])
def test_compiled_step_calls_the_kernel_and_matches_eager(tmp_path, monkeypatch, paged, backend):
    _need("default")
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LAGOON_COMPILE_BACKEND", backend)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 17, 9)]
    kw = dict(paged=paged, max_batch=4, max_seq_len=64, dtype=torch.float32, block_size=8)
    m = _model(ARGS, torch.float32)
    with torch.no_grad():
        ref_cache = make_cache(ARGS, **kw)
        use_native_attention(m, ref_cache)
        ref = _decode(m, ref_cache, prompts, 6)
        cache = make_cache(ARGS, **kw)
        step = DecodeStep(m, cache, max_batch=4, compile=True, progress=lambda line: None)
        got = _decode(m, cache, prompts, 6, step)
        cache1 = make_cache(ARGS, **kw)
        step1 = DecodeStep(m, cache1, max_batch=4, compile=True, progress=lambda line: None)
        one = _decode(m, cache1, prompts[1:2], 4, step1)  # the batch-1 graph
        one_ref = _decode(m, make_cache(ARGS, **kw), prompts[1:2], 4)
    assert step.compiled_buckets == {2} and step1.compiled_buckets == {1} and not (step.eager_reason or step1.eager_reason)
    assert step.backend == backend
    assert float((got - ref).norm() / ref.norm()) <= 1e-4 and float((one - one_ref).norm() / one_ref.norm()) <= 1e-4
    if backend == "aoti":  # the package resolves Lagoon's op through the dispatcher
        assert "lagoon::decode_attention" in read_metadata(step.entry(2))["ops"]
    else:  # an extern kernel call in the saved step
        assert "lagoon.decode_attention" in "\n".join(p.read_text() for p in (tmp_path / "compile").rglob("*.py"))


@pytest.mark.parametrize("forced", ["avx2", "default"])
def test_the_forced_isa_picks_the_attention_variant(monkeypatch, forced):
    _need(forced)
    monkeypatch.setenv("LAGOON_CPU_ISA", forced)  # as a CPU without AVX-512 (or AVX2) would choose
    m = _model(ARGS, torch.bfloat16)
    cache = make_cache(ARGS, paged=True, max_batch=2, max_seq_len=64, dtype=torch.bfloat16, block_size=8)
    assert use_native_attention(m, cache) == ARGS.n_layers
    assert {layer.self_attn.decode_isa for layer in m.layers} == {forced}
    with torch.no_grad():
        ref = _decode(_model(ARGS, torch.bfloat16), make_cache(ARGS, paged=True, max_batch=2, max_seq_len=64,
                                                              dtype=torch.bfloat16, block_size=8), [[5, 6, 7, 8]], 6)
        got = _decode(m, cache, [[5, 6, 7, 8]], 6)
    assert float((got - ref).norm() / ref.norm()) <= 2e-2  # bf16, as test_model_decode_on_the_kernel_matches_sdpa
