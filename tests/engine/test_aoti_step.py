"""The decode step as an AOTInductor package (`lagoon.engine.aoti_step`, through `DecodeStep` on CPU):
against the eager step on tiny random models, Lagoon's kernels called from the package, the constants
inductor makes saved beside it and required at load, corrupt and stale packages."""

from __future__ import annotations

import logging

import pytest
import torch

from lagoon.engine import aoti_step, cpu_kernels
from lagoon.engine.compile import DecodeStep
from lagoon.engine.gguf_linear import swap_q4_1
from lagoon.engine.kv_cache import make_cache
from lagoon.model.args import ModelArgs
from lagoon.model.transformer import Transformer

ARGS = ModelArgs(family="llama", vocab_size=96, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                 intermediate_size=128, max_position_embeddings=256)


def _q4_model(native: bool) -> Transformer:
    """One layer whose linears are 4-bit GGUF-like weights: on Lagoon's kernel (`native`) or on torch's
    int4 kernel (`Q4_1Linear`, whose lowering makes inductor create group-size constants)."""
    torch.manual_seed(3)
    model = Transformer(ARGS).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    g = torch.Generator().manual_seed(4)
    fields = {}
    for name, mod in model.named_modules():
        if name.endswith("_proj") and isinstance(mod, torch.nn.Linear):
            N, K = mod.weight.shape
            d = torch.rand(N * K // 32, generator=g) * 0.02 + 0.01
            m = -8 * d
            q = torch.randint(0, 16, (N * K // 32, 32), generator=g, dtype=torch.uint8)
            fields[f"{name}.weight"] = (d, m, q)
    isa = ("avx512" if cpu_kernels.cpu_has("avx512") else "avx2") if native else None
    swap_q4_1(model, fields, dense=torch.float32 if native else None, act_isa=isa)
    return model


def _decode(step: DecodeStep, cache, prompt: list[int], n: int) -> torch.Tensor:
    """Prefill eagerly, then `n` greedy decode steps through `step`; logits [n, V]."""
    cache.allocate(0, prompt)
    cache.ensure(0, len(prompt) + n)
    pos = torch.arange(len(prompt))[None]
    cache.prepare([0], pos)
    with torch.no_grad():
        step.model(torch.tensor([prompt]), pos, cache)
        out, last = [], prompt[-1]
        for i in range(n):
            logits = step([0], torch.tensor([[last]]), torch.tensor([[len(prompt) + i]]))[0]
            out.append(logits.float().clone())
            last = int(logits.argmax())
    return torch.stack(out)


MK = dict(paged=True, max_batch=2, max_seq_len=64, dtype=torch.float32, block_size=8)


def _pair(model, n: int = 4, prompt=(5, 17, 3, 44, 9, 60, 2), **kw):
    """(eager logits, step, its logits) on fresh caches."""
    mk = MK
    ref_cache = make_cache(ARGS, **mk)
    ref = _decode(DecodeStep(model, ref_cache, max_batch=2, compile=False), ref_cache, list(prompt), n)
    cache = make_cache(ARGS, **mk)
    step = DecodeStep(model, cache, max_batch=2, compile=True, progress=lambda line: None, **kw)
    step.warm_up()
    return ref, step, _decode(step, cache, list(prompt), n)


@pytest.fixture
def kernels():
    """Lagoon's kernel library, loaded from the user's cache before `cache_dir` moves it (a build is ~10 s)."""
    if not cpu_kernels.available() or not (cpu_kernels.cpu_has("avx2") or cpu_kernels.cpu_has("avx512")):
        pytest.skip(f"Lagoon's kernels are unavailable here: {cpu_kernels.unavailable_reason() or 'no AVX2'}")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path / "lagoon-cache"))
    return tmp_path / "lagoon-cache"


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def test_a_package_calls_lagoon_kernels_and_matches_eager(kernels, cache_dir):
    """One cold compile (~30 s on 2 cores): batch 1 on Lagoon's 4-bit kernel against the eager step,
    the kernel called from inside the package as a C shim (not through AOTInductor's proxy executor),
    a process without Lagoon's library refused by the package, then a second step loading the package
    from disk. Tolerance: the package fuses the float glue (norms, RoPE, SiLU) and
    may round an activation differently before the kernel's int8 quantization (a step of 1/254 of a
    block's maximum): 2e-3 relative."""
    model = _q4_model(native=True)
    ref, step, got = _pair(model)
    assert step.backend == "aoti" and step.compiled_buckets == {1} and not step.loaded_buckets, step.eager_reason
    assert _rel(got, ref) <= 2e-3 and torch.equal(got.argmax(-1), ref.argmax(-1))
    meta = aoti_step.read_metadata(step.entry(1))
    assert "lagoon::q4_matvec" in meta["ops"].split(",")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step([None], torch.tensor([[1]]), torch.tensor([[3]]))  # a padding slot: writes the scratch block
    assert sum(e.key == "lagoon::q4_matvec" for e in prof.key_averages()) == 1  # called by the package
    so, externs = _package_code(step.entry(1))
    assert b"aoti_torch_cpu_q4_matvec" in so and b"aoti_torch_cpu_i8_matvec" not in so  # the head is float here
    assert "lagoon::q4_matvec" not in externs  # no proxy-executor call left for it
    _refused_without_library(step.entry(1))
    _, again, got2 = _pair(model)
    assert again.loaded_buckets == {1} and again.ready_s[1] < 5 and torch.equal(got2, got)


def _package_code(path) -> tuple[bytes, str]:
    """(the package's compiled library, its proxy executor's extern-kernel descriptions)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        so = b"".join(z.read(n) for n in names if n.endswith(".so"))
        externs = "".join(z.read(n).decode() for n in names if n.endswith(".json") and "metadata" not in n)
    return so, externs


def _refused_without_library(path) -> None:
    """A fresh process that opens the package without Lagoon's kernel library fails on the shims."""
    import subprocess
    import sys

    code = f"import torch; torch._C._aoti.AOTIModelPackageLoader({str(path)!r}, 'model', True, 1, -1)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "aoti_torch_cpu_q4_matvec" in r.stderr, r.stderr[-2000:]


def test_a_package_of_an_older_format_is_refused(tmp_path):
    """A package compiled before the shims (format aoti-1: Lagoon's ops through the proxy executor)
    is refused at load, before its library is opened, so `DecodeStep` compiles afresh."""
    import json
    import zipfile

    pkg = tmp_path / "step-b1.pt2"
    with zipfile.ZipFile(pkg, "w") as z:
        z.writestr("step/data/aotinductor/model/x_metadata.json", json.dumps({"format": "aoti-1", "ops": ""}))
    with pytest.raises(RuntimeError, match="format is 'aoti-1'"):
        aoti_step.load_package(pkg, None, None)


def test_a_corrupt_package_is_deleted_and_the_step_still_answers(cache_dir, monkeypatch, caplog):
    model = _q4_model(native=False)
    step = DecodeStep(model, make_cache(ARGS, **MK), max_batch=2, compile=True, progress=lambda line: None)
    step.cache_dir.mkdir(parents=True)
    step.entry(1).write_bytes(b"PK\x03\x04 not a package")

    def fails(self, b, *args):  # the recompile is not what this test is about: make it fail fast
        raise RuntimeError("compiler unavailable")

    monkeypatch.setattr(DecodeStep, "_compile", fails)
    with caplog.at_level(logging.WARNING, logger="lagoon.engine"):
        ref, step, got = _pair(model, n=3)
    assert "could not be loaded" in caplog.text and "compiler unavailable" in step.eager_reason
    assert not step.entry(1).exists() and not step.compiled and torch.equal(got, ref)


_MODEL_FILE = """
from lagoon.model.transformer import Transformer


class Edited(Transformer):
    pass{tail}
"""


def test_the_traced_sources_include_the_model_class_file_and_notice_an_edit(tmp_path, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "lagoon_aoti_edited.py"
    src.write_text(_MODEL_FILE.format(tail=""))
    model = importlib.import_module("lagoon_aoti_edited").Edited(ARGS)
    cache = make_cache(ARGS, paged=False, max_batch=1, max_seq_len=16, dtype=torch.float32)
    sources = aoti_step.traced_sources(model, cache)
    names = {p.rsplit("/", 1)[-1] for p in sources}
    assert {"lagoon_aoti_edited.py", "transformer.py", "kv_cache.py", "rope.py"} <= names
    assert aoti_step._changed(sources) is None
    src.write_text(_MODEL_FILE.format(tail="  # edited"))
    assert aoti_step._changed(sources).endswith("lagoon_aoti_edited.py")


def test_lagoon_sources_are_recorded_by_package_path_so_checkouts_share_a_package(tmp_path, monkeypatch):
    """A second checkout with the same sources accepts the package; one whose copy differs refuses it."""
    import shutil

    model = Transformer(ARGS)
    cache = make_cache(ARGS, paged=False, max_batch=1, max_seq_len=16, dtype=torch.float32)
    sources = aoti_step.traced_sources(model, cache)
    assert "lagoon/model/transformer.py" in sources and not any(p.startswith("/") for p in sources)
    other = tmp_path / "lagoon"
    shutil.copytree(aoti_step._ROOT, other, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    monkeypatch.setattr(aoti_step, "_ROOT", other)
    assert aoti_step._changed(sources) is None
    (other / "model" / "transformer.py").write_text("# another checkout's edit\n", encoding="utf-8")
    assert aoti_step._changed(sources) == "lagoon/model/transformer.py"


@pytest.mark.slow  # two cold compiles
def test_inductor_constants_are_saved_beside_the_package_and_required(cache_dir, caplog):
    """torch's int4 kernel path: inductor lowers each int4 matmul with a group-size tensor it makes
    itself; those are recorded at compile time and loaded from beside the package. Without that file
    the package is refused (never given guessed values) and compiled afresh."""
    model = _q4_model(native=False)
    ref, step, got = _pair(model)
    assert step.backend == "aoti" and step.compiled, step.eager_reason
    assert _rel(got, ref) <= 1e-4  # float glue around the same int4 kernel
    saved = torch.load(aoti_step.constants_path(step.entry(1)), weights_only=True)
    assert saved["names"] and all(not n.startswith(("model.", "kv_")) for n in saved["names"])
    aoti_step.constants_path(step.entry(1)).unlink()
    with pytest.raises(RuntimeError, match="no tensor for the package's constant"):
        aoti_step.load_package(step.entry(1), model, step.cache)
    with caplog.at_level(logging.WARNING, logger="lagoon.engine"):
        _, again, got2 = _pair(model)
    assert "no tensor for the package's constant" in caplog.text
    assert again.compiled and not again.loaded_buckets and torch.equal(got2, got)
