"""Offloaded experts give the resident model's outputs (fp32, rel. error ≤ 1e-6) for decode and
prefill, with a cache smaller than the expert count, every prefetch mode and both tiers; the
prefetch / speculative keys show in the counters; no reader sees a half-loaded expert."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

from lagoon.config import load_config
from lagoon.engine import engine_from_config
from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import CheckpointError, ConfigError, UnsupportedModelError
from lagoon.moe import ReferenceExperts, SparseMoE
from lagoon.moe.expert_cache import ExpertCache
from lagoon.moe.expert_store import DiskStore, HostStore, make_store
from lagoon.moe.offload import ExpertOffload, offload_model, offload_of
from lagoon.telemetry import Telemetry

TOL = 1e-6
H, IM, E, K = 48, 24, 12, 2
MODES = [(False, False), (True, False), (False, True), (True, True)]  # (async_prefetch, speculative)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def stack(seed: int = 0, layers: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[SparseMoE(H, IM, E, K) for _ in range(layers)]).eval()


def inputs(seed: int, shapes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, H, generator=g) for t in shapes]


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("off") / "m", "qwen3_moe", num_experts=16, num_experts_per_tok=2,
                           num_hidden_layers=3, moe_intermediate_size=24)


@pytest.mark.parametrize(("tier", "async_prefetch", "speculative"),
                         [("host", *m) for m in MODES] + [("disk", False, False), ("disk", True, True)])
def test_offloaded_stack_matches_resident_and_reference(tier, async_prefetch, speculative, tmp_path):
    base = stack()
    ref = copy.deepcopy(base)
    for b in ref:  # the gather/einsum oracle
        b.experts = ReferenceExperts(E, H, IM).share_weights(b.experts)
    model = copy.deepcopy(base)
    off = offload_model(model, 3, tier=tier, path=tmp_path, async_prefetch=async_prefetch, speculative=speculative)
    try:
        with torch.no_grad():
            for x in inputs(1, [9, 1, 1, 1, 32]):  # prefill, decode, a batch wider than the cache
                y = model(x)
                assert rel(y, base(x)) <= TOL and rel(y, ref(x)) <= 1e-5
        off.drain()
        s = off.stats()
        assert all(c.capacity == 3 and len(c.resident()) <= 3 for c in off.caches)
        assert s["misses"] > 0 and s["bytes_loaded"] == (s["misses"] + s["prefetch_loads"]) * off.caches[0].expert_bytes
    finally:
        off.close()


def test_every_needed_expert_is_one_hit_wait_or_miss():
    model = stack(1)
    off = offload_model(model, 4)
    xs = inputs(2, [1] * 10 + [7])
    with torch.no_grad():
        needed = 0
        for x in xs:
            model(x)
            needed += sum(int((b.last_counts > 0).sum()) for b in model)
    s = off.stats()
    assert s["hits"] + s["waits"] + s["misses"] == needed and s["hits"] > 0
    assert s["prefetch_loads"] == s["spec_actual"] == 0  # both keys off: synchronous, on demand only
    assert 0 < s["hit_rate"] < 1


def _transformer(folder, capacity, *, async_prefetch, speculative, drain=False):
    model = load_checkpoint(folder, "float32").eval()
    off = offload_model(model, capacity, async_prefetch=async_prefetch, speculative=speculative)
    if drain:  # let every prefetch finish before the layer computes (the case prefetch is built for)
        for layer in model.layers:
            layer.mlp.register_forward_pre_hook(lambda *_: off.drain())
    return model, off


def _decode(model, steps=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [model(torch.randint(0, 300, (1, 1), generator=g)) for _ in range(steps)]


def test_speculative_and_prefetch_keys_change_the_counters(moe_folder):
    results = {}
    for mode in [(False, False), (False, True), (True, True), (True, False)]:
        model, off = _transformer(moe_folder, 4, async_prefetch=mode[0], speculative=mode[1], drain=mode[0])
        _decode(model)
        off.drain()
        results[mode] = off.stats()
        off.close()
    off_off = results[(False, False)]
    assert off_off["prefetch_loads"] == 0 and off_off["spec_actual"] == 0 and off_off["speculative_accuracy"] == 0
    for mode in [(False, True), (True, True)]:
        s = results[mode]
        assert s["prefetch_loads"] > 0 and s["misses"] < off_off["misses"]
        assert s["spec_actual"] > 0 and 2 / 16 < s["speculative_accuracy"] <= 1  # better than chance (k/E)
    history = results[(True, False)]  # async without speculation: co-activation guesses, no router guess
    assert history["prefetch_loads"] > 0 and history["spec_actual"] == 0


def test_offloaded_transformer_matches_for_prefill_and_decode(moe_folder):
    base = load_checkpoint(moe_folder, "float32").eval()
    for async_prefetch, speculative in [(False, False), (True, True)]:  # all four: the stack test
        model, off = _transformer(moe_folder, 5, async_prefetch=async_prefetch, speculative=speculative)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for tokens in (torch.randint(0, 300, (2, 11), generator=g), torch.randint(0, 300, (1, 1), generator=g)):
                assert rel(model(tokens), base(tokens)) <= TOL
        for a, b in zip(_decode(model, 4), _decode(base, 4), strict=True):
            assert rel(a, b) <= TOL
        off.close()


class SlowStore:
    """Writes each expert in two halves with a pause between: a reader of a loading slot would see
    half-new weights."""

    def __init__(self, inner: HostStore) -> None:
        self.inner = inner

    def read_into(self, layer, expert, gate_up_out, down_out):
        gu, down = self.inner.layers[layer]
        half = gu.shape[1] // 2
        gate_up_out[:half].copy_(gu[expert, :half])
        time.sleep(0.002)
        gate_up_out[half:].copy_(gu[expert, half:])
        down_out.copy_(down[expert])
        return gu[expert].nbytes + down[expert].nbytes

    def close(self):
        self.inner.close()


def test_no_torn_reads_under_concurrent_prefetch():
    base = stack(4, layers=4)
    model = copy.deepcopy(base)
    off = offload_model(model, 2, async_prefetch=True, speculative=True)
    off.store = SlowStore(off.store)
    errors = []

    def run(seed):
        with torch.no_grad():
            for x in inputs(seed, [1, 3, 1, 1, 2, 1]):
                errors.append(rel(model(x), base(x)))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(3)]  # concurrent callers too
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    off.drain()
    assert len(errors) == 18 and max(errors) <= TOL
    assert off.stats()["prefetch_loads"] > 0
    assert all(p == 0 for c in off.caches for p in c.pins)
    off.close()


def _cache_run(policy: str, calls: list[list[int]]) -> dict[int, int]:
    """Misses per expert when one layer (16 experts, capacity 3) is called with each of `calls`."""
    torch.manual_seed(0)
    store = HostStore([(torch.randn(16, 2 * IM, H), torch.randn(16, H, IM))])
    cache = ExpertCache(0, 16, 3, (2 * IM, H), (H, IM), dtype=torch.float32, device="cpu", policy=policy)
    off = ExpertOffload([cache], store, [None])
    misses = dict.fromkeys(range(16), 0)
    for need in calls:
        resident = set(cache.resident())
        for e, gate_up, _down in off.experts(0, need):
            assert torch.equal(gate_up, store.layers[0][0][e])
            misses[e] += e not in resident
    assert sum(misses.values()) == cache.stats.misses
    return misses


def test_lrfu_keeps_a_hot_expert_that_lru_loses_to_scans():
    # expert 0 every third call; in between, four cold experts (of 15, cycling) pass through
    cold = [1 + i % 15 for i in range(80)]
    calls = [c for r in range(20) for c in ([0], cold[4 * r : 4 * r + 2], cold[4 * r + 2 : 4 * r + 4])]
    lru, lrfu = _cache_run("lru", calls), _cache_run("lrfu", calls)
    assert lru[0] == 20  # LRU evicts the hot expert on every scan
    assert lrfu[0] <= 5  # LRFU learns it is hot and keeps it
    assert sum(lrfu.values()) < sum(lru.values())
    with pytest.raises(ConfigError, match="lru, lfu, lrfu"):
        _cache_run("fifo", calls)


def test_disk_store_round_trip_and_bad_file(tmp_path):
    torch.manual_seed(5)
    layers = [(torch.randn(4, 2 * IM, H), torch.randn(4, H, IM)) for _ in range(2)]
    store = make_store("disk", layers, path=tmp_path / "x.safetensors")
    gu, down = torch.empty(2 * IM, H), torch.empty(H, IM)
    assert store.read_into(1, 3, gu, down) == gu.nbytes + down.nbytes
    assert torch.equal(gu, layers[1][0][3]) and torch.equal(down, layers[1][1][3])
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    store.close()
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="delete it"):
        DiskStore(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="host, disk"):
        make_store("tape", layers)


def test_offloading_refuses_dense_and_quantized_models():
    with pytest.raises(UnsupportedModelError, match="no SparseMoE"):
        offload_model(nn.Sequential(nn.Linear(4, 4)), 2)
    model = stack()
    model[1].experts = nn.Identity()  # stands in for quantized experts
    with pytest.raises(UnsupportedModelError, match="only float stacked experts"):
        offload_model(model, 2)


def test_telemetry_gauges_carry_the_variant():
    model = stack()
    tel = Telemetry()
    off = offload_model(model, 3).attach_telemetry(tel, variant="laguna_xs2")
    with torch.no_grad():
        for x in inputs(0, [1, 4]):
            model(x)
    s = off.stats()
    assert tel.value("lagoon_moe_offload_misses", {"variant": "laguna_xs2"}) == s["misses"] > 0
    assert tel.value("lagoon_moe_offload_hit_rate", {"variant": "laguna_xs2"}) == pytest.approx(s["hit_rate"])


def test_config_keys_reach_the_engine(moe_folder, tmp_path):
    common = [f"engine.model={moe_folder}", "engine.precision=float32", "model_deployment.routing.total_experts=16"]
    plain = engine_from_config(load_config(*common))
    assert offload_of(plain.model) is None  # capacity None: everything resident
    engine = engine_from_config(load_config(
        *common, "moe.offload.capacity=3", "moe.offload.policy=lru", "moe.offload.tier=disk",
        f"moe.offload.dir={tmp_path}", "model_deployment.inference.async_expert_prefetch=false",
        "model_deployment.inference.speculative_routing=true"))
    try:
        off = offload_of(engine.model)
        assert (off.async_prefetch, off.speculative, off.tier) == (False, True, "disk")
        assert {c.capacity for c in off.caches} == {3} and {c.policy for c in off.caches} == {"lru"}
        assert (tmp_path / "experts.safetensors").is_file()
        params = engine.params(max_new_tokens=6, ignore_eos=True)
        assert engine.complete("hello there", params).token_ids == plain.complete("hello there", params).token_ids
        s = off.stats()
        assert s["spec_actual"] > 0 and s["prefetch_loads"] > 0
    finally:
        engine.close()
        plain.close()
    auto = engine_from_config(load_config(*common, "moe.offload.capacity=2"))
    assert offload_of(auto.model).tier == "disk"  # auto on a CPU-only machine
    auto.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_with_pinned_host_tier_matches_resident():
    base = stack(6, layers=4).cuda()
    model = copy.deepcopy(base)
    off = offload_model(model, 3, tier="host", async_prefetch=True, speculative=True)
    assert off.caches[0].gate_up.is_cuda and off.store.pinned
    with torch.no_grad():
        for x in inputs(8, [1, 1, 6, 1, 1, 1]):
            x = x.cuda()
            assert rel(model(x), base(x)) <= 1e-5  # TF32/kernel order may differ from CPU fp32
    off.drain()
    assert off.stats()["misses"] > 0
    off.close()


class FlakyStore:
    """Fails the first `failures` reads, then reads normally."""

    def __init__(self, inner, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def read_into(self, *args):
        if self.failures:
            self.failures -= 1
            raise OSError("disk went away")
        return self.inner.read_into(*args)

    def close(self):
        self.inner.close()


def test_a_failed_load_frees_its_slot():
    base = stack(9)
    model = copy.deepcopy(base)
    off = offload_model(model, 2)
    off.store = FlakyStore(off.store, 1)
    x = inputs(10, [1])[0]
    with torch.no_grad(), pytest.raises(OSError, match="went away"):
        model(x)
    with torch.no_grad():  # nothing is left claimed or pinned: the same call now succeeds
        assert rel(model(x), base(x)) <= TOL
    assert all(p == 0 for c in off.caches for p in c.pins)
    prefetching = copy.deepcopy(base)
    spec = offload_model(prefetching, 2, async_prefetch=False, speculative=True)
    spec.store = FlakyStore(spec.store, 0)
    with torch.no_grad():
        prefetching(x)  # warm: the next call's guess has something to evict
        spec.store.failures = 1  # the next read (a sync speculative prefetch or a miss) fails
        with pytest.raises(OSError):
            prefetching(inputs(11, [1])[0])
        for x in inputs(12, [1, 1]):
            assert rel(prefetching(x), base(x)) <= TOL
    assert all(p == 0 for c in spec.caches for p in c.pins)


def test_server_publishes_offload_gauges_and_close_stops_prefetch(moe_folder):
    from fastapi.testclient import TestClient

    from lagoon.engine.server.app import create_app

    engine = engine_from_config(load_config(
        f"engine.model={moe_folder}", "engine.precision=float32", "model_deployment.routing.total_experts=16",
        "moe.offload.capacity=3", "moe.offload.tier=host"))
    off = offload_of(engine.model)
    try:
        with TestClient(create_app(engine)) as client:
            body = {"model": engine.name, "prompt": "hello there", "max_tokens": 80, "ignore_eos": True}
            assert client.post("/v1/completions", json=body).status_code == 200
            text = client.get("/metrics").text
        assert 'lagoon_moe_offload_misses{model="' in text and "lagoon_moe_offload_hit_rate" in text
    finally:
        engine.close()
    assert off._worker is None  # the engine closed its offloading (prefetch thread joined)
