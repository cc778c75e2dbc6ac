"""MoE models' decode step as an AOTInductor package (`lagoon.engine.aoti_step`, the CPU default of
`DecodeStep`): against the eager step on a tiny random MoE model whose experts are packed 4-bit GGUF
blocks (`lagoon::q4_moe_matvec` called from the package), with the routing state that changes between
scheduler steps (the load penalty's window share, a quarantined expert) read live by the package, and a
warm start that loads the package without importing torch._dynamo.

Why: inductor inlines a 0-d or a 1-D tensor of <= 8 values as literals. The package's constants are the
model's live tensors, so the router's `window_share`, `excluded_mask` and `e_score_correction_bias` over
4 experts (zeros at compile time, updated in place between steps) were baked as zeros: a package ignored
the load penalty and quarantine (`aoti_step.AOTI_OPTIONS` now keeps every constant a tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lagoon.engine import aoti_step, cpu_kernels
from lagoon.engine.checkpoint import _Q4_FIELDS
from lagoon.engine.compile import DecodeStep
from lagoon.engine.kernels import kernel_plan
from lagoon.engine.kv_cache import make_cache
from lagoon.engine.packed_experts import PackedExperts, pack_gguf_experts, swap_packed_experts
from lagoon.model.args import ModelArgs
from lagoon.model.transformer import Transformer
from lagoon.moe.layer import SparseMoE
from lagoon.moe.runtime import MoeRuntime

E, H, I = 4, 64, 32  # noqa: E741 - experts, hidden, expert intermediate
ARGS = ModelArgs(family="qwen3_moe", vocab_size=96, dim=H, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 intermediate_size=128, max_position_embeddings=256, num_experts=E, top_k=2,
                 moe_intermediate_size=I, norm_topk_prob=True)
MK = dict(paged=True, max_batch=2, max_seq_len=64, dtype=torch.float32, block_size=8)
PROMPT = [5, 17, 3, 44, 9, 60, 2, 71, 30]
STEPS = 8
QUARANTINE_AT = 3  # from this step on, each layer's most used expert is quarantined


@pytest.fixture
def kernels():
    if kernel_plan().q4_isa is None:
        pytest.skip(f"Lagoon's kernels are not planned here ({cpu_kernels.unavailable_reason() or 'ISA'})")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "lagoon-cache"))
    monkeypatch.delenv("LAGOON_COMPILE_BACKEND", raising=False)
    return tmp_path / "lagoon-cache"


def _q4_0_blocks(rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fresh random Q4_0 blocks [E, rows, bytes]: f16 scale d, then 16 bytes of two 4-bit codes each."""
    b = rng.integers(0, 256, (E, rows, k // 32, 18), dtype=np.uint8)
    b[..., :2] = rng.uniform(0.02, 0.06, (E, rows, k // 32, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(E, rows, -1)


def packed_moe_model() -> Transformer:
    """A tiny MoE model (2 layers, 4 experts, k = 2) whose experts are packed Q4_0 blocks on Lagoon's kernel."""
    torch.manual_seed(11)
    model = Transformer(ARGS).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    rng = np.random.default_rng(12)
    packed = {}
    for layer in range(ARGS.n_layers):
        gate_up = pack_gguf_experts([("Q4_0", _q4_0_blocks(I, H, rng), (E, I, H)),
                                     ("Q4_0", _q4_0_blocks(I, H, rng), (E, I, H))], _Q4_FIELDS)
        down = pack_gguf_experts([("Q4_0", _q4_0_blocks(H, I, rng), (E, H, I))], _Q4_FIELDS)
        packed[layer] = {"gate_up": gate_up, "down": down}
    swap_packed_experts(model, packed, kernel_plan().q4_isa)
    return model


def _runtime(model) -> MoeRuntime:
    """The serving runtime (deferred updates, quarantine) with a strong load penalty, so that the window
    share changes which experts run from one step to the next."""
    from lagoon.config import MoeRoutingSection, MoeSection

    return MoeRuntime(model, MoeRoutingSection(total_experts=E, load_balance_weight=0.5),
                      MoeSection(recalibration_cv=None))


def decode_with_routing_state(compile: bool) -> tuple[torch.Tensor, list[list[list[int]]], DecodeStep]:
    """A fresh model and runtime; prefill eagerly, then `STEPS` greedy steps through a `DecodeStep`, the
    runtime stepped after each (as the scheduler does) and each layer's busiest expert quarantined at
    `QUARANTINE_AT`. Returns (logits [STEPS, V], per step and layer the routed slots per expert, step)."""
    model = packed_moe_model()
    rt = _runtime(model)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    cache = make_cache(ARGS, **MK)
    step = DecodeStep(model, cache, max_batch=2, compile=compile, progress=lambda line: None)
    step.warm_up()
    rt.discard_static()  # the warm-up's padding token is not traffic (as the engine does)
    seen = {name: w.total.tolist() for name, w in rt.monitor.layers.items()}
    cache.allocate(0, PROMPT)
    cache.ensure(0, len(PROMPT) + STEPS)
    pos = torch.arange(len(PROMPT))[None]
    cache.prepare([0], pos)
    logits, counts = [], []
    with torch.no_grad():
        last = int(model(torch.tensor([PROMPT]), pos, cache)[0, -1].argmax())
        rt.step()
        for i in range(STEPS):
            if i == QUARANTINE_AT:
                for layer, b in enumerate(blocks):  # the layer's busiest expert of the steps so far
                    b.quarantine([int(torch.tensor([c[layer] for c in counts]).sum(0).argmax())], "test")
            out = step([0], torch.tensor([[last]]), torch.tensor([[len(PROMPT) + i]]))[0].clone()
            rt.step()
            now = {name: w.total.tolist() for name, w in rt.monitor.layers.items()}
            counts.append([[a - b for a, b in zip(now[n], seen[n], strict=True)] for n in sorted(now)])
            seen = now
            logits.append(out)
            last = int(out.argmax())
    return torch.stack(logits), counts, step


def test_an_moe_package_reads_the_live_routing_state_and_matches_eager(kernels, cache_dir):
    """One cold compile (~35 s on 2 cores). Tolerance: the package fuses the float glue and may round an
    activation differently before the kernels' int8 quantization (a step of 1/254 of a block's maximum):
    2e-3 relative on the logits; the greedy tokens and every step's routed slots per expert exactly (the
    routing choices have margins far above that rounding on these weights; a tie would show as a count
    moved between two experts, which this test reports)."""
    ref, ref_counts, _ = decode_with_routing_state(compile=False)
    got, got_counts, step = decode_with_routing_state(compile=True)
    assert step.backend == "aoti" and step.compiled_buckets == {1} and step.eager_reason is None
    assert "lagoon::q4_moe_matvec" in aoti_step.read_metadata(step.entry(1))["ops"].split(",")
    from test_aoti_step import _package_code

    so, externs = _package_code(step.entry(1))
    assert b"aoti_torch_cpu_q4_moe_matvec" in so and "lagoon::q4_moe_matvec" not in externs  # a C shim, no proxy call
    assert isinstance(step.model.layers[0].mlp.experts, PackedExperts)
    assert float((got - ref).norm() / ref.norm()) <= 2e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert got_counts == ref_counts
    # the test can fail: the penalty moved slots between steps and the quarantined experts ran no slot after
    per_step = {tuple(map(tuple, c)) for c in ref_counts}
    assert len(per_step) > 1
    blocks = [m for m in step.model.modules() if isinstance(m, SparseMoE)]
    for layer, b in enumerate(blocks):
        (bad,) = b.quarantined
        assert all(c[layer][bad] == 0 for c in got_counts[QUARANTINE_AT:])  # it was the busiest before


def test_moe_models_take_the_package_on_cpu_unless_dynamo_is_forced(monkeypatch):
    from lagoon.engine.compile import _default_backend

    model = Transformer(ARGS)
    assert any(isinstance(m, SparseMoE) for m in model.modules())
    monkeypatch.delenv("LAGOON_COMPILE_BACKEND", raising=False)
    assert _default_backend(model, torch.device("cpu")) == "aoti"
    monkeypatch.setenv("LAGOON_COMPILE_BACKEND", "dynamo")
    assert _default_backend(model, torch.device("cpu")) == "dynamo"


WARM = """
import sys
from lagoon.config import EngineSection
from lagoon.engine import load_model
e = load_model(sys.argv[1], precision='native', config=EngineSection(compile=True, max_seq_len=128, max_batch_size=2))
print('EXPERTS', type(e.model.layers[0].mlp.experts).__name__)
print('TOKENS', e.complete('def add(a, b):', e.params(max_new_tokens=6, ignore_eos=True)).token_ids)
print('STEP', e.step.backend, e.step.compiled, sorted(e.step.loaded_buckets))
print('IMPORTED', sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))
"""


@pytest.mark.slow  # the first start compiles the step (~40 s on 2 cores)
@pytest.mark.timeout(1200)
def test_a_warm_start_of_an_moe_gguf_loads_its_package_without_dynamo(kernels, tmp_path):
    """`load_model` (what `lagoon generate` / `serve` / the agent's local route call) on a Q4_0-expert MoE
    GGUF: the first start compiles the AOTInductor package, the second loads it through torch's C++
    loader, imports neither torch._dynamo nor torch._inductor, and decodes the same greedy tokens."""
    import os
    import subprocess
    import sys

    pytest.importorskip("gguf")
    from test_gguf_moe import _gguf_tensors, _write
    from transformers import AutoModelForCausalLM

    from lagoon.engine.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", "qwen3_moe")
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    path = tmp_path / "m.gguf"
    _write(path, hf, "qwen3moe", _gguf_tensors(hf, "qwen3moe"), tokenizer=True,
           expert_kinds=dict.fromkeys(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), "Q4_0"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LAGOON_COMPILE": "1", "LAGOON_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("LAGOON_COMPILE_BACKEND", None)
    runs = [subprocess.run([sys.executable, "-c", WARM, str(path)], capture_output=True, text=True, env=env, timeout=1000)
            for _ in range(2)]
    first, second = (r.stdout for r in runs)
    why = second[-500:] + runs[1].stderr[-2000:]
    assert "EXPERTS PackedExperts" in first and "STEP aoti True []" in first, first[-500:] + runs[0].stderr[-2000:]
    assert "STEP aoti True [1]" in second and "IMPORTED []" in second, why
    tokens = [next(ln for ln in out.splitlines() if ln.startswith("TOKENS")) for out in (first, second)]
    assert tokens[0] == tokens[1], why
