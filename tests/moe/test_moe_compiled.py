"""MoE models compile their decode step (the static path, `lagoon.moe.layer`) and the compiled engine
equals the eager one: greedy tokens of each family's tiny model (fp32) and the routing statistics the
load monitor recorded (the compiled steps' in-graph counts drained by `MoeRuntime.step`, the compile
warm-up left out); batch 1 and the dynamic-batch graph. On CPU the step is an AOTInductor package (the
default backend), and dynamo's artefact where `LAGOON_COMPILE_BACKEND=dynamo` forces it. Slow: each
engine compiles cold (30-110 s)."""

from __future__ import annotations

import threading

import pytest

from lagoon.config import load_config
from lagoon.engine import compute, engine_from_config
from lagoon.engine.tiny import save_tiny_model
from lagoon.moe.runtime import runtime_of

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "laguna", "gpt_oss", "deepseek_v2", "deepseek_v3"]
PROMPTS = ["def add(a, b):", "x = [", "hello world, this is"]


def _engine(folder, compile: bool, *over: str):
    return engine_from_config(load_config(f"engine.model={folder}", "engine.precision=float32",
                                          f"engine.compile={str(compile).lower()}", "engine.max_batch_size=4", *over))


def _run(eng, prompts: list[str], together: bool) -> tuple[list[list[int]], dict[str, list[int]]]:
    params = eng.params(max_new_tokens=10, ignore_eos=True)
    out: dict[int, list[int]] = {}
    if together:  # concurrent requests decode in one batch (the dynamic-batch graph)
        threads = [threading.Thread(target=lambda i=i, p=p: out.__setitem__(i, eng.complete(p, params).token_ids))
                   for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        out = {i: eng.complete(p, params).token_ids for i, p in enumerate(prompts)}
    rt = runtime_of(eng.model)
    compute.call(rt.step)  # the scheduler drains after each step; make sure the last one is in
    return [out[i] for i in range(len(prompts))], {n: w.total.tolist() for n, w in rt.monitor.layers.items()}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "lagoon-cache"))
    monkeypatch.delenv("LAGOON_COMPILE_BACKEND", raising=False)


def _compiled_equals_eager(folder, backend: str) -> None:
    results = {}  # the default config: load penalty and recalibration on (routing state changes between steps)
    for compile in (False, True):
        eng = _engine(folder, compile)
        try:
            assert eng.step.compiled == compile and (eng.step.eager_reason is None) == compile
            assert not compile or eng.step.backend == backend
            results[compile] = _run(eng, PROMPTS[:1], together=False)
        finally:
            eng.close()
    assert results[True] == results[False]


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, "unit"])
def test_compiled_moe_engine_equals_eager(tmp_path, cache_dir, family):
    # "unit": what `lagoon moefy` writes (the embedded-moe preset): unit expert weights, k = E
    over = {"num_experts_per_tok": 4, "lagoon_expert_weighting": "unit"} if family == "unit" else {}
    _compiled_equals_eager(save_tiny_model(tmp_path / family, "mixtral" if family == "unit" else family, **over), "aoti")


@pytest.mark.slow
def test_dynamo_forced_still_compiles_an_moe_engine_like_eager(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("LAGOON_COMPILE_BACKEND", "dynamo")
    _compiled_equals_eager(save_tiny_model(tmp_path / "m", "mixtral"), "dynamo")


@pytest.mark.slow
def test_compiled_moe_batch_graph_equals_eager(tmp_path, cache_dir):
    folder = save_tiny_model(tmp_path / "m", "qwen2_moe")  # softmax router, gated shared expert
    results = {}
    for compile in (False, True):
        # balancing off: with it on, routing depends on how the threads' requests were batched
        eng = _engine(folder, compile, "model_deployment.expert_routing.load_balance_weight=0", "moe.recalibration_cv=null")
        try:
            results[compile] = _run(eng, PROMPTS, together=True)
            if compile:
                assert eng.step.compiled_buckets == {1, 2} and eng.step.eager_reason is None
        finally:
            eng.close()
    assert results[True] == results[False]


@pytest.mark.slow
def test_compiled_step_with_int8_experts_matches_eager(tmp_path, cache_dir):
    """Per-channel int8 experts compile through `QuantizedExperts.gathered`; the eager step runs them on
    torch's int8 kernel, whose bf16 output rounding is the only difference (1e-2 relative)."""
    import torch

    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.compile import DecodeStep
    from lagoon.engine.kv_cache import make_cache
    from lagoon.quant.quantize import QuantConfig, quantize_

    model = load_checkpoint(save_tiny_model(tmp_path / "q", "qwen3_moe", moe_intermediate_size=32), "float32")
    quantize_(model, QuantConfig(scheme="int8", group_size=0, keep=(r"self_attn", r"lm_head", r"embed_tokens")))
    ids = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    feed = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = {}
    with torch.no_grad():
        for compile in (False, True):
            cache = make_cache(model.args, paged=True, max_batch=2, max_seq_len=64, dtype=torch.float32)
            step = DecodeStep(model, cache, max_batch=2, compile=compile, progress=lambda line: None)
            cache.allocate(0, ids)
            cache.ensure(0, len(ids) + 4)
            pos = torch.arange(len(ids))[None]
            cache.prepare([0], pos)
            model(torch.tensor([ids]), pos, cache)
            out = [step([0], torch.tensor([[tok]]), torch.tensor([[len(ids) + i]]))[0].clone()  # the same fed tokens
                   for i, tok in enumerate(feed)]
            logits[compile] = torch.stack(out)
            assert step.compiled == compile
    assert float((logits[True] - logits[False]).norm() / logits[False].norm()) <= 1e-2
