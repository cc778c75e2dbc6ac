"""Each `engine.*`, `server.*` and `kv_cache_sharding` key changes what the engine or server does."""

from __future__ import annotations

import httpx
import pytest
import torch

from lagoon.config import load_config
from lagoon.engine import compute, engine_from_config
from lagoon.engine.kv_cache import KVCache, PagedKVCache
from lagoon.engine.server import start_test_server
from lagoon.engine.tiny import save_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cfg") / "m", "llama")


def build(folder, *over):
    return engine_from_config(load_config(f"engine.model={folder}", "engine.precision=float32", *over))


def test_cache_layout_keys(folder):
    e = build(folder, "model_deployment.memory.kv_cache_sharding=false", "engine.max_batch_size=3",
              "engine.max_seq_len=100")
    assert isinstance(e.cache, KVCache) and len(e.cache.k) == e.args.n_layers and e.cache.k[0].shape[:2] == (3 + 1, 100)
    e.close()
    e = build(folder, "engine.kv_block_size=4", "engine.num_kv_blocks=9", "engine.precision=bfloat16")
    assert isinstance(e.cache, PagedKVCache) and (e.cache.block_size, e.cache.num_blocks) == (4, 9)
    assert e.model.lm_head.weight.dtype == torch.bfloat16 and e.cache.k[0].dtype == torch.bfloat16
    e.close()


@pytest.mark.parametrize("on", [True, False])
def test_prefix_cache_key(folder, on):
    e = build(folder, f"engine.prefix_cache={str(on).lower()}", "engine.kv_block_size=4")
    try:
        prompt = list(range(40, 80))
        p = e.params(max_new_tokens=3)
        first = e.complete(prompt, p)
        again = e.complete(prompt, p)
        assert first.cached_tokens == 0
        assert again.cached_tokens == (36 if on else 0)
        assert again.token_ids == first.token_ids
    finally:
        e.close()


def test_seed_and_threads_keys(folder):
    before = compute.call(torch.get_num_threads)
    outs = []
    try:
        for seed in (1, 1, 2):
            e = build(folder, f"engine.seed={seed}", "engine.threads=1")
            assert compute.call(torch.get_num_threads) == 1  # where every forward runs
            outs.append(e.complete("x", e.params(max_new_tokens=12, temperature=1.0, ignore_eos=True)).token_ids)
            e.close()
    finally:
        compute.call(torch.set_num_threads, before)
    assert outs[0] == outs[1] != outs[2]


def test_served_name_and_max_queue(folder):
    cfg = load_config("server.served_model_name=tiny-coder", "server.max_queue=1")
    e = build(folder)
    base, stop = start_test_server(e, server=cfg.server)
    try:
        assert httpx.get(f"{base}/models").json()["data"][0]["id"] == "tiny-coder"
        req, _ = e.submit(e.encode("busy"), e.params(max_new_tokens=400, ignore_eos=True))
        r = httpx.post(f"{base}/completions", json={"model": "tiny-coder", "prompt": "x", "max_tokens": 2})
        req.cancel()
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    finally:
        stop()
        e.close()


def test_compile_key_reaches_the_engine(folder, monkeypatch):
    # off by the key, and off when unset under LAGOON_COMPILE=0; the compiled path itself is
    # exercised in tests/engine/test_compile.py (slow: it compiles)
    e = build(folder, "engine.compile=false")
    try:
        assert e.scheduler.step is e.step and e.step.eager_reason == "engine.compile is off"
        assert e.complete([5, 6, 7], e.params(max_new_tokens=3, ignore_eos=True)).completion_tokens == 3
    finally:
        e.close()
    monkeypatch.setenv("LAGOON_COMPILE", "0")
    e = build(folder)
    try:
        assert e.step.eager_reason == "engine.compile is off" and not e.step.compiled
    finally:
        e.close()
