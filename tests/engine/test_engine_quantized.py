"""`load_model(DIR)` on a `lagoon quantize` output runs the quantized model (scheme from quant.json)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from lagoon.cli.app import app
from lagoon.engine import load_model
from lagoon.engine.tiny import save_tiny_model
from lagoon.quant.linear import QuantizedLinear

runner = CliRunner()


def test_quantized_folder_loads_and_matches_its_float_model(tmp_path):
    src = save_tiny_model(tmp_path / "llama", "llama")
    out = tmp_path / "int8-out"
    r = runner.invoke(app, ["quantize", "--model", str(src), "--scheme", "int8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    quant = load_model(out, precision="float32")
    ref = load_model(src, precision="float32")
    try:
        kinds = {type(m).__name__ for m in quant.model.modules()}
        assert "QuantizedLinear" in kinds and not any(isinstance(m, QuantizedLinear) for m in ref.model.modules())
        ids = torch.randint(3, 200, (1, 12))
        with torch.no_grad():
            a = quant.model(ids).float()
            b = ref.model(ids).float()
        # int8 per-channel weights with bf16 activations: close to float, not equal to it.
        rel = (a - b).norm() / b.norm()
        assert 0 < rel < 0.05, rel
        text = quant.complete("hello", quant.params(max_new_tokens=5, temperature=0.0)).text
        assert isinstance(text, str)
    finally:
        quant.close()
        ref.close()
