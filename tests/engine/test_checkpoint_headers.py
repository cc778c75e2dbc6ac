"""Malformed safetensors headers: `CheckpointError`, and from `lagoon generate` / `lagoon serve`
exit code 2 with one line on the terminal, never a traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lagoon.cli.app import app
from lagoon.engine.checkpoint import read_safetensors
from lagoon.errors import CheckpointError

W = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
CASES = {
    "a JSON list": (b"[1, 2, 3]", "JSON list, not an object"),
    "a JSON string": (b'"x"', "JSON str, not an object"),
    "not JSON": (b"{not json", "not a safetensors file"),
    "not UTF-8": (b'{"\xff": 1}', "not a safetensors file"),
    "entry not an object": ({"w": [0, 32]}, "JSON list, not an object"),
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [2, 4]}}, "no 'data_offsets'"),
    "no shape": ({"w": {"dtype": "F32", "data_offsets": [0, 32]}}, "no 'shape'"),
    "no dtype": ({"w": {"shape": [2, 4], "data_offsets": [0, 32]}}, "no 'dtype'"),
    "unknown dtype": ({"w": {**W, "dtype": "F128"}}, "unsupported dtype 'F128'"),
    "begin > end": ({"w": {**W, "data_offsets": [32, 0]}}, "begin 32 is past end 0"),
    "offsets not ints": ({"w": {**W, "data_offsets": ["0", 32]}}, "is not \\[begin, end\\]"),
    "three offsets": ({"w": {**W, "data_offsets": [0, 16, 32]}}, "is not \\[begin, end\\]"),
    "negative dim": ({"w": {**W, "shape": [-2, -4]}}, "not a list of non-negative integers"),
    "float dim": ({"w": {**W, "shape": [2.0, 4]}}, "not a list of non-negative integers"),
    "shape vs bytes": ({"w": {**W, "shape": [4, 4]}}, "needs 64 bytes but data_offsets span 32"),
    "past the data": ({"w": {**W, "shape": [4, 8], "data_offsets": [0, 128]}}, "truncated"),
}


def _write(path, header, data: bytes = bytes(64)) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_header_raises_checkpoint_error(tmp_path, case):
    header, message = CASES[case]
    path = tmp_path / "model.safetensors"
    _write(path, header)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors(path)


def test_header_length_and_tiny_files(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="cut off"):
        read_safetensors(path)


def test_a_valid_hand_written_header_still_loads(tmp_path):
    # the validator must not refuse what it should read: fresh random data, zero-size and unaligned tensors
    w = torch.randn(2, 4)
    b = torch.randint(-100, 100, (3,), dtype=torch.int16)
    data = w.numpy().tobytes() + b"\x00" + b.numpy().tobytes()
    header = {"__metadata__": {"format": "pt"}, "w": W, "empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [32, 32]},
              "b": {"dtype": "I16", "shape": [3], "data_offsets": [33, 39]}}
    path = tmp_path / "ok.safetensors"
    _write(path, header, data)
    got = read_safetensors(path)
    assert torch.equal(got["w"], w) and torch.equal(got["b"], b) and got["empty"].shape == (0, 4)


# enough config.json for the loader to reach the weights (which it reads before any tokenizer)
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
          "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def _one_line_exit_2(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_generate_and_serve_exit_2_with_one_line(folder, tmp_path, monkeypatch, case):
    import lagoon.engine.server as server

    def must_not_serve(*a, **k):  # a header that slipped through would serve forever: fail instead
        raise AssertionError("the malformed checkpoint was loaded and served")

    monkeypatch.setattr(server, "serve", must_not_serve)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((folder / "config.json").read_bytes())
    header, _ = CASES[case]
    _write(bad / "model.safetensors", header)
    for argv in (["generate", "--model", str(bad), "--prompt", "x"], ["serve", "--model", str(bad)]):
        line = _one_line_exit_2(CliRunner().invoke(app, argv))
        assert "safetensors" in line or "tensor 'w'" in line


@pytest.mark.parametrize("raw,message", [(b"[1, 2]", "JSON list, not an object"), (b"\xff{", "not valid JSON")])
def test_malformed_config_json_exits_2_with_one_line(tmp_path, raw, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes(raw)
    line = _one_line_exit_2(CliRunner().invoke(app, ["generate", "--model", str(bad), "--prompt", "x"]))
    assert message in line


@pytest.mark.slow  # a fresh interpreter importing torch; the CliRunner cases above cover every header
def test_lagoon_serve_binary_exits_2_with_one_line(tmp_path, folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((folder / "config.json").read_bytes())
    _write(bad / "model.safetensors", {"w": {**W, "data_offsets": [32, 0]}})
    lagoon = os.path.join(os.path.dirname(sys.executable), "lagoon")
    done = subprocess.run([lagoon, "serve", "--model", str(bad), "--port", "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1 and "begin 32 is past end 0" in done.stderr
