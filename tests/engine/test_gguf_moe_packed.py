"""A quantized MoE GGUF's routed experts stay packed at ``native`` precision (`lagoon.engine.packed_experts`):
Q4_0 / Q4_1 (/ Q4_K) experts in the 4-bit layout, Q8_0 and the wider kinds (and a 4-bit projection paired
with one) as int8 blocks; each projection's weights equal the file's (exactly for 4-bit and Q8_0 codes,
within half an int8 step re-quantized), the experts' output equals the float experts' within the int8
activations' rounding (rel. <= 2e-2: x and the gated unit's output), the model's logits the float32 load's (rel. <= 5e-2, bf16 elsewhere),
the static (compiled-decode) path equals eager bit for bit, `MoeRuntime.compilable` holds; without the
kernels the experts load as float, as before; the repack cache keeps them packed. Slow: a compiled
engine decodes the greedy tokens of the eager one and its monitor counts the same routed slots, at batch 1
and in the dynamic-batch graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gguf_blocks import _oracle, _random_blocks
from test_gguf_moe import _gguf_tensors, _write

from lagoon.engine import cpu_kernels
from lagoon.engine.checkpoint import _Q4_FIELDS, load_gguf
from lagoon.engine.kernels import kernel_plan
from lagoon.engine.kv_cache import make_cache
from lagoon.engine.packed_experts import PackedExperts, pack_gguf_experts
from lagoon.engine.tiny import save_tiny_model
from lagoon.moe.experts import Experts
from lagoon.moe.footprint import count_parameters
from lagoon.moe.layer import SparseMoE
from lagoon.moe.runtime import MoeRuntime

gguf = pytest.importorskip("gguf")
PROJ = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
CASES = {  # gate, up, down -> layouts of gate_up, down
    "q4_0": (("Q4_0", "Q4_0", "Q4_0"), ("q4", "q4")),
    "q4_1": (("Q4_1", "Q4_1", "Q4_1"), ("q4", "q4")),
    "q8_0": (("Q8_0", "Q8_0", "Q8_0"), ("i8", "i8")),
    "mixed": (("Q4_0", "Q5_0", "Q4_1"), ("i8", "q4")),  # a Q4_K_M-like file: one projection wider
}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(autouse=True)
def _kernels(tmp_path, monkeypatch):
    if kernel_plan().q4_isa is None:  # loaded from the usual cache (built there once), then a fresh repack cache
        pytest.skip(f"Lagoon's kernels are not planned here ({cpu_kernels.unavailable_reason() or 'ISA'})")
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("pk") / "m", "qwen3_moe")  # 4 experts, k = 2, H 64, I 32
    return folder, AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _file(tiny, tmp_path, kinds, tokenizer=False):
    _, hf = tiny
    path = tmp_path / "m.gguf"
    _write(path, hf, "qwen3moe", _gguf_tensors(hf, "qwen3moe"), expert_kinds=dict(zip(PROJ, kinds, strict=True)),
           tokenizer=tokenizer)
    return path


def _prefill(model, prompts):
    cache = make_cache(model.args, paged=False, max_batch=prompts.shape[0], max_seq_len=32,
                       dtype=next(model.parameters()).dtype)
    B, T = prompts.shape
    for i in range(B):
        cache.allocate(i, prompts[i].tolist())
        cache.ensure(i, T)
    pos = torch.arange(T).expand(B, T)
    cache.prepare(list(range(B)), pos)
    with torch.no_grad():
        return model(prompts, pos, cache)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_experts_stay_packed_and_match_the_float_experts(tiny, tmp_path, case):
    kinds, layouts = CASES[case]
    path = _file(tiny, tmp_path, kinds)
    packed, f32 = load_gguf(path, "native"), load_gguf(path, "float32")  # float32: the file's values dequantized
    blocks = [m for m in packed.modules() if isinstance(m, SparseMoE)]
    assert blocks and all(isinstance(b.experts, PackedExperts) for b in blocks)
    assert all((b.experts.layouts["gate_up"], b.experts.layouts["down"]) == layouts for b in blocks)
    g = torch.Generator().manual_seed(len(case))
    for b, ref in zip(blocks, (m for m in f32.modules() if isinstance(m, SparseMoE)), strict=True):
        x = torch.randn(5, 64, generator=g)
        ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(5)])
        # the file's weights; two activations rounded to int8 blocks (x, then the gated unit's output)
        assert rel(b.experts.gathered(x, ids), ref.experts.gathered(x, ids)) <= 2e-2
        w = torch.rand(5, 2, generator=g)
        assert torch.allclose(b.experts(x, ids, w), (b.experts.gathered(x, ids) * w[..., None]).sum(1))
    prompts = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    eager = _prefill(packed, prompts)
    assert rel(eager, _prefill(f32, prompts)) <= 5e-2  # bf16 attention and norms (~1.3%), int8 expert activations
    assert MoeRuntime(packed).compilable
    assert count_parameters(packed) == count_parameters(f32)  # `lagoon moe info`, declarations: by shape
    for b in blocks:
        b.static_path = True  # the compiled step's path, run eagerly: the same op calls
    assert torch.allclose(_prefill(packed, prompts), eager, rtol=1e-6, atol=1e-6)


def test_without_the_kernels_the_experts_load_as_float(tiny, tmp_path):
    path = _file(tiny, tmp_path, CASES["q4_1"][0])
    model = load_gguf(path, "native", plan=kernel_plan(native=False))
    assert all(type(m.experts) is Experts for m in model.modules() if isinstance(m, SparseMoE))


@pytest.mark.parametrize(("kinds", "layout"), [(("Q4_K", "Q4_K"), "q4"), (("Q4_K", "Q6_K"), "i8"), (("Q6_K",), "i8")])
def test_k_quant_experts_pack_as_their_file_says(kinds, layout):
    rng = np.random.default_rng(len(kinds) + len(layout))
    E, N, K = 3, 24, 256
    raws = [_random_blocks(kind, E * N * K, rng).reshape(E, N, -1) for kind in kinds]
    got_layout, packed = pack_gguf_experts([(kind, raw, (E, N, K)) for kind, raw in zip(kinds, raws, strict=True)],
                                           _Q4_FIELDS)
    assert got_layout == layout and packed.shape[:3] == (E, -(-len(kinds) * N // 16), K // 32)
    w = torch.stack([torch.cat([_oracle(kind, raw[e].reshape(-1), (N, K)) for kind, raw in zip(kinds, raws, strict=True)])
                     for e in range(E)])  # [E, rows, K]: the file's weights
    isa = kernel_plan().q4_isa
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 2]])
    y = cpu_kernels.moe_matvec(x, packed, ids, len(kinds) * N, isa, layout)
    ref = torch.einsum("tk,tjnk->tjn", x.double(), w[ids].double())
    # 4-bit: the file's weights exactly, int8 activations; i8: plus half an int8 step of re-quantization
    assert rel(y, ref) <= (1e-2 if layout == "q4" else 1.5e-2)


@pytest.mark.slow
def test_compiled_batch_graph_decodes_the_packed_experts_like_eager(tiny, tmp_path):
    """Concurrent requests decode in one batch: the batch 2+ graph (dynamic batch) calls the ops too."""
    import threading

    from lagoon.config import load_config
    from lagoon.engine import engine_from_config

    path = _file(tiny, tmp_path, CASES["q4_1"][0], tokenizer=True)
    prompts = ["def add(a, b):", "x = [1, 2,", "hello world"]
    out: dict[bool, dict[int, list[int]]] = {}
    for compile in (False, True):
        eng = engine_from_config(load_config(f"engine.model={path}", "engine.precision=native",
                                             f"engine.compile={str(compile).lower()}", "engine.max_batch_size=4",
                                             "model_deployment.expert_routing.load_balance_weight=0",
                                             "moe.recalibration_cv=null"))
        try:
            got: dict[int, list[int]] = {}
            params = eng.params(max_new_tokens=8, ignore_eos=True)
            def one(i: int, prompt: str, eng=eng, got=got, params=params) -> None:
                got[i] = eng.complete(prompt, params).token_ids

            threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if compile:
                assert eng.step.compiled_buckets == {1, 2} and eng.step.eager_reason is None
            out[compile] = got
        finally:
            eng.close()
    assert out[True] == out[False]


@pytest.mark.slow
def test_compiled_engine_decodes_the_packed_experts_like_eager(tiny, tmp_path, monkeypatch):
    from lagoon.engine import compute
    from lagoon.engine.engine import load_model
    from lagoon.engine.sampling import SamplingParams
    from lagoon.moe.runtime import runtime_of

    path = _file(tiny, tmp_path, CASES["mixed"][0], tokenizer=True)
    out = {}
    for compile in ("0", "1"):
        monkeypatch.setenv("LAGOON_COMPILE", compile)
        eng = load_model(path, precision="native")
        try:
            assert isinstance(eng.model.layers[0].mlp.experts, PackedExperts)
            assert eng.step.compiled == (compile == "1"), eng.step.eager_reason
            out[compile] = [eng.complete(p, SamplingParams(max_new_tokens=12, ignore_eos=True)).token_ids
                            for p in ("def add(a, b):", "x = [1, 2,")]
            rt = runtime_of(eng.model)
            compute.call(rt.step)
            out[compile + "counts"] = {n: w.total.tolist() for n, w in rt.monitor.layers.items()}
        finally:
            eng.close()
    assert sum(sum(c) for c in out["0counts"].values()) > 0  # the monitor saw the routed slots
    assert out["1"] == out["0"] and out["1counts"] == out["0counts"]


def test_the_repack_cache_keeps_the_packed_experts(tiny, tmp_path):
    from lagoon.engine.repack_cache import entry_path

    path = _file(tiny, tmp_path, CASES["mixed"][0])
    fresh = load_gguf(path, "native")  # writes the entry
    assert entry_path(path, kernel_plan()).is_file()
    cached = load_gguf(path, "native")  # memory-maps it
    for a, b in zip(fresh.modules(), cached.modules(), strict=True):
        if isinstance(a, SparseMoE):
            assert isinstance(b.experts, PackedExperts) and b.experts.layouts == a.experts.layouts
            assert torch.equal(b.experts.gate_up_packed, a.experts.gate_up_packed)
            assert torch.equal(b.experts.down_packed, a.experts.down_packed)
    prompts = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_prefill(cached, prompts), _prefill(fresh, prompts))


@pytest.mark.parametrize("case", ["q4_1", "mixed"])
def test_packed_experts_unpack_to_the_files_values_for_offloading(tiny, tmp_path, case):
    from lagoon.engine.packed_experts import unpack_experts

    path = _file(tiny, tmp_path, CASES[case][0])
    packed, f32 = load_gguf(path, "native"), load_gguf(path, "float32")
    assert unpack_experts(packed) == 2
    for b, ref in zip((m for m in packed.modules() if isinstance(m, SparseMoE)),
                      (m for m in f32.modules() if isinstance(m, SparseMoE)), strict=True):
        assert type(b.experts) is Experts and b.experts.gate_up_proj.dtype == torch.bfloat16
        for name in ("gate_up_proj", "down_proj"):  # 4-bit: the file's values; Q5_0 re-quantized: half an int8 step
            got, want = getattr(b.experts, name).float(), getattr(ref.experts, name)
            tol = want.abs().amax() / 254 + want.abs().amax() / 128 if case == "mixed" else want.abs() / 128 + 1e-6
            assert bool(((got - want).abs() <= tol).all()), name


def test_the_avx2_plan_runs_the_packed_experts_alike(tiny, tmp_path):
    if not cpu_kernels.cpu_has("avx2"):
        pytest.skip("no AVX2 here")
    path = _file(tiny, tmp_path, CASES["mixed"][0])
    plans = [kernel_plan(isa) for isa in ("avx512", "avx2") if cpu_kernels.cpu_has(isa)]
    models = [load_gguf(path, "native", plan=p) for p in plans]
    assert [m.layers[0].mlp.experts.isa for m in models] == [p.q4_isa for p in plans]
    prompts = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    logits = [_prefill(m, prompts) for m in models]
    for y in logits[1:]:  # the same integer sums in another order (bf16 attention rounds the rest alike)
        assert rel(y, logits[0]) <= 1e-2


@pytest.mark.parametrize("kinds", [("Q4_0", "Q4_0"), ("Q4_1",), ("Q4_K", "Q4_K"), ("Q8_0", "Q8_0"), ("Q4_0", "Q6_K")])
def test_packing_moves_the_blocks_as_the_per_expert_packers_do(kinds):
    """The chunked, byte-moving packer equals `pack_q4` / `pack_i8` of each expert's fields (rows off the tile)."""
    from lagoon.engine.gguf_blocks import q8_0_fields

    rng = np.random.default_rng(len("".join(kinds)))
    E, N, K = 5, 24, 256
    raws = [_random_blocks(kind, E * N * K, rng).reshape(E, N, -1) for kind in kinds]
    layout, packed = pack_gguf_experts([(kind, raw, (E, N, K)) for kind, raw in zip(kinds, raws, strict=True)], _Q4_FIELDS)
    for e in range(E):
        blocks = [(kind, torch.from_numpy(np.array(raw[e])).reshape(-1)) for kind, raw in zip(kinds, raws, strict=True)]
        if layout == "q4":
            d, m, q = (torch.cat(f) for f in zip(*(_Q4_FIELDS[kind](raw) for kind, raw in blocks), strict=True))
            want = cpu_kernels.pack_q4(d, m, q, len(kinds) * N, K)
        else:
            ds, qs = [], []
            for kind, raw in blocks:
                if kind == "Q8_0":
                    d, _, q = q8_0_fields(raw)
                    d, q = d.reshape(N, K // 32), q.reshape(N, K)
                else:
                    d, q = cpu_kernels.quantize_i8(_oracle(kind, raw.numpy(), (N, K)))
                ds.append(d)
                qs.append(q)
            want = cpu_kernels.pack_i8(torch.cat(ds), torch.cat(qs))
        assert torch.equal(packed[e], want), e
