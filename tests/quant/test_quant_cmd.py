"""`lagoon quantize` writes a loadable checkpoint; `lagoon quant fidelity --json` reports on it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lagoon.cli import quant_cmd
from lagoon.cli.app import app
from lagoon.engine.tiny import save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


def test_quantize_then_fidelity_json_dense(tiny_dense, tmp_path) -> None:
    out = tmp_path / "q"
    cal = ["--calibration", str(quant_cmd.HELDOUT)]
    keep = ["--keep", r"layers\.0\.mlp\.down_proj$"]
    r = runner.invoke(app, ["quantize", "--model", str(tiny_dense), "--scheme", "int8", *cal, *keep, "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "quant.json").read_text())
    assert "layers.0.mlp.down_proj" not in meta["modules"] and "layers.1.mlp.down_proj" in meta["modules"]
    r = runner.invoke(app, ["quant", "fidelity", "--model", str(tiny_dense), "--quantized", str(out), "--json", "--max-tokens", "300"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["meta"]["scheme"] == "int8" and rep["text"]["tokens"] == 299
    # measured: top-1 0.960, mean KL 0.0009 (group-wise int8 on the tiny llama, down_proj 0 kept float)
    assert rep["text"]["top1_agreement"] > 0.93 and rep["text"]["mean_kl"] < 0.003
    assert {lf["kind"] for lf in rep["layers"]} == {"QuantizedLinear"} and rep["worst_layer"]
    assert [p["policy"] for p in rep["token_types"]] == ["policy"]  # weight-only: one pass
    assert [t["token_type"] for t in rep["token_types"][0]["per_type"]] == ["CONTEXT", "TOOL_OUTPUT", "REASONING"]
    assert rep["token_types"][0]["per_type"][0]["tokens"] > 0  # byte tokens: 300 reach only the first messages
    r = runner.invoke(app, ["quant", "fidelity", "--model", str(tiny_dense), "--quantized", str(out), "--max-tokens", "100"])
    assert r.exit_code == 0 and "top-1 agreement" in r.output


@pytest.mark.slow
def test_quantize_then_fidelity_json_moe(tiny_moe, tmp_path) -> None:
    out = tmp_path / "q"
    r = runner.invoke(
        app,
        ["quantize", "--model", str(tiny_moe), "--scheme", "w8a8", "--calibration", str(quant_cmd.HELDOUT), "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "w8a8: quantized" in r.output and (out / "quant.json").is_file()
    r = runner.invoke(app, ["quant", "fidelity", "--model", str(tiny_moe), "--quantized", str(out), "--json", "--max-tokens", "300"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["meta"]["scheme"] == "w8a8" and rep["text"]["tokens"] == 299
    # measured: top-1 0.950, mean KL 0.0045 (w8a8 on the tiny qwen3_moe)
    assert 0.0 < rep["text"]["mean_kl"] < 0.015 and rep["text"]["top1_agreement"] > 0.9
    experts = [lf for lf in rep["layers"] if lf["kind"] == "QuantizedExperts"]
    assert len(experts) == 2 and all(lf["worst_expert"] is not None for lf in experts)
    assert not any(".router" in lf["name"] for lf in rep["layers"])


def test_profile_from_config_and_clean_errors(tiny_dense, tmp_path) -> None:
    tiny_moe = tiny_dense
    out = tmp_path / "q4"
    r = runner.invoke(
        app, ["quantize", "--model", str(tiny_moe), "--out", str(out), "--group-size", "32", "-c", "model_deployment.quantization.profile=INT4"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "quant.json").read_text())["scheme"] == "int4"
    r = runner.invoke(app, ["quantize", "--model", str(tiny_moe), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "FP16" in r.output
    r = runner.invoke(app, ["quantize", "--model", str(tiny_moe), "--scheme", "int3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "valid: int8" in r.output
    r = runner.invoke(app, ["quant", "fidelity", "--model", str(tiny_moe), "--quantized", str(tmp_path)])
    assert r.exit_code == 2 and "quant.json is missing" in r.output


def test_w8a8_calibrates_by_default_and_says_when_it_does_not(tiny_dense, tmp_path) -> None:
    r = runner.invoke(app, ["quantize", "--model", str(tiny_dense), "--scheme", "w8a8", "--out", str(tmp_path / "cal")])
    assert r.exit_code == 0, r.output
    assert "UNCALIBRATED" not in r.output and "calibrated on" in r.output and "calibration.txt" in r.output
    meta = json.loads((tmp_path / "cal" / "quant.json").read_text())
    assert meta["calibrated"] is True and meta["calibration"].endswith("calibration.txt")
    r = runner.invoke(app, ["quantize", "--model", str(tiny_dense), "--scheme", "w8a8", "--no-calibration", "--out", str(tmp_path / "dyn")])
    assert r.exit_code == 0, r.output
    assert "UNCALIBRATED" in r.output and "drop --no-calibration" in r.output
    meta = json.loads((tmp_path / "dyn" / "quant.json").read_text())
    assert meta["calibrated"] is False and meta["calibration"] is None
    r = runner.invoke(app, ["quant", "fidelity", "--model", str(tiny_dense), "--quantized", str(tmp_path / "dyn"), "--max-tokens", "64"])
    assert r.exit_code == 0 and "UNCALIBRATED" in r.output, r.output
    assert "per token type" in r.output and "all-static" in r.output and "all-dynamic" in r.output
    r = runner.invoke(
        app, ["quantize", "--model", str(tiny_dense), "--scheme", "w8a8", "--no-calibration", "--calibration", str(quant_cmd.HELDOUT),
              "--out", str(tmp_path / "x")],
    )
    assert r.exit_code == 2 and "give one of them" in r.output


def test_int8_weight_only_runs_without_calibration_and_says_nothing_about_it(tiny_dense, tmp_path) -> None:
    r = runner.invoke(app, ["quantize", "--model", str(tiny_dense), "--scheme", "int8", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0 and "calibrat" not in r.output, r.output


def test_int4_default_on_576_wide_model_loads_in_the_engine(tmp_path) -> None:
    # SmolLM2's widths (hidden 576, intermediate 1536): 576 % 128 != 0 used to be an error
    src = save_tiny_model(
        tmp_path / "wide", "llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
        num_key_value_heads=3,
    )
    r = runner.invoke(app, ["quantize", "--model", str(src), "--scheme", "int4", "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert set(json.loads((tmp_path / "d" / "quant.json").read_text())["group_sizes"].values()) == {32}  # default
    assert "GPTQ-rounded 7 Linears" in r.output  # calibrated by default: q/k/v/o/gate/up/down
    r = runner.invoke(app, ["quantize", "--model", str(src), "--scheme", "int4", "--no-calibration", "--out", str(tmp_path / "n")])
    assert r.exit_code == 0 and "round-to-nearest" in r.output, r.output
    r = runner.invoke(app, ["quantize", "--model", str(src), "--scheme", "int4", "--group-size", "128", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    sizes = json.loads((tmp_path / "q" / "quant.json").read_text())["group_sizes"]
    assert sizes["layers.0.mlp.down_proj"] == 128 and sizes["layers.0.mlp.up_proj"] == 64
    assert set(sizes.values()) == {64, 128}
    from lagoon.engine import load_model

    eng = load_model(tmp_path / "q")
    try:
        c = eng.complete(eng.tokenizer.encode("hi"), eng.params(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        assert c.completion_tokens == 3
    finally:
        eng.close()


def test_against_gguf_without_llama_cpp_names_the_install(tiny_dense, tmp_path, monkeypatch) -> None:
    import sys

    out = tmp_path / "q"
    assert runner.invoke(app, ["quantize", "--model", str(tiny_dense), "--scheme", "int8", "--out", str(out)]).exit_code == 0
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails, as where it is not installed
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    r = runner.invoke(app, ["quant", "fidelity", "--model", str(tiny_dense), "--quantized", str(out), "--against-gguf", str(gguf)])
    assert r.exit_code == 2 and "pip install llama-cpp-python" in r.output, r.output


def test_against_gguf_scores_llama_cpp_logits_on_the_same_ids(tiny_dense, tmp_path, monkeypatch) -> None:
    """A stand-in `llama_cpp` module with the binding's surface (Llama, n_vocab, reset, eval, scores),
    computing the float model's own logits: the llama.cpp row must then agree exactly."""
    import sys
    import types

    import torch

    from lagoon.engine.checkpoint import load_checkpoint

    class Llama:
        def __init__(self, model_path: str, n_ctx: int, logits_all: bool, verbose: bool) -> None:
            assert logits_all and model_path.endswith(".gguf")
            self.model, self.n_ctx, self._scores = load_checkpoint(tiny_dense, "float32"), n_ctx, None

        def n_vocab(self) -> int:
            return self.model.lm_head.out_features

        def reset(self) -> None:
            self._scores = None

        def eval(self, toks: list[int]) -> None:
            assert self._scores is None and len(toks) <= self.n_ctx  # reset before every window
            with torch.no_grad():
                self._scores = self.model(torch.tensor([toks]))[0].numpy()

        @property
        def scores(self):
            return self._scores

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    out = tmp_path / "q"
    assert runner.invoke(app, ["quantize", "--model", str(tiny_dense), "--scheme", "int8", "--out", str(out)]).exit_code == 0
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    r = runner.invoke(
        app,
        ["quant", "fidelity", "--model", str(tiny_dense), "--quantized", str(out), "--against-gguf", str(gguf),
         "--json", "--max-tokens", "200", "--window", "100"],
    )
    assert r.exit_code == 0, r.output
    g = json.loads(r.output)["against_gguf"]
    assert g["tokens"] == 199 and g["top1_agreement"] == 1.0 and abs(g["mean_kl"]) < 1e-9
