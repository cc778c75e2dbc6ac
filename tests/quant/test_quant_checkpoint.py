"""save_quantized -> load_quantized gives the same outputs; the scheme comes from quant.json."""

from __future__ import annotations

import json

import pytest
import torch
from quant_models import batches, tiny_lm

from lagoon.errors import CheckpointError, QuantizationError
from lagoon.quant import (
    QuantConfig,
    TokenType,
    calibrate,
    load_quantized,
    quantize_,
    read_metadata,
    save_quantized,
    token_types,
)
from lagoon.quant.checkpoint import METADATA


@pytest.fixture(autouse=True)
def _no_grad():
    # Inference-only tests; a module-level set_grad_enabled(False) would leak into other packages' tests.
    with torch.no_grad():
        yield


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4", "fp8", "bf16"])
def test_round_trip_same_outputs(tmp_path, scheme: str) -> None:
    m = tiny_lm()
    cal = calibrate(m, batches(2, 32))
    quantize_(m, QuantConfig(scheme=scheme, group_size=32, include_lm_head=True, include_embeddings=True), calibration=cal)
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        before = m(ids)
    # a name that suggests another scheme must not matter
    out = save_quantized(m, tmp_path / "int4-q4_k_m", source="tiny")
    meta = read_metadata(out)
    assert meta["scheme"] == scheme and meta["source"] == "tiny" and meta["config"]["group_size"] == 32
    assert "moe.experts" in meta["modules"] and "lm_head" in meta["modules"]
    loaded = load_quantized(tiny_lm(seed=123), out)  # different float weights: all come from the file
    assert torch.equal(loaded(ids), before)
    assert torch.allclose(loaded.moe.experts.gate_up_act_absmax, m.moe.experts.gate_up_act_absmax, equal_nan=True)
    types = [TokenType.CONTEXT] * 20
    with token_types(types):
        assert torch.equal(loaded(ids), m(ids))


def test_resave_replaces_atomically(tmp_path) -> None:
    m = tiny_lm()
    quantize_(m, QuantConfig(scheme="int8"))
    save_quantized(m, tmp_path / "q")
    m2 = tiny_lm()
    quantize_(m2, QuantConfig(scheme="int4", group_size=32))
    save_quantized(m2, tmp_path / "q")
    assert read_metadata(tmp_path / "q")["scheme"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_bad_checkpoints_name_the_problem(tmp_path) -> None:
    with pytest.raises(QuantizationError, match="not quantized"):
        save_quantized(tiny_lm(), tmp_path / "x")
    with pytest.raises(CheckpointError, match="quant.json is missing"):
        load_quantized(tiny_lm(), tmp_path)
    m = tiny_lm()
    quantize_(m, QuantConfig(scheme="int8"))
    out = save_quantized(m, tmp_path / "q")
    meta = json.loads((out / METADATA).read_text())
    meta["modules"]["not.a.module"] = "QuantizedLinear"
    (out / METADATA).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not.a.module"):
        load_quantized(tiny_lm(), out)
    meta["modules"].pop("not.a.module")
    meta["scheme"] = meta["config"]["scheme"] = "int4"
    meta["int4_layout"] = "cuda_tiled"
    (out / METADATA).write_text(json.dumps(meta))
    with pytest.raises(QuantizationError, match="Re-quantize"):
        load_quantized(tiny_lm(), out)
