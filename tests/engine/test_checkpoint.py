"""HF folder loading: sharded checkpoints, tied embeddings, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch

from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import CheckpointError


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "m", "llama")
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(str(sharded), max_shard_size="60KB")
    (sharded / "model.safetensors.index.json").is_file() or pytest.fail("not sharded")
    ours = load_checkpoint(sharded, "float32")
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x).logits, rtol=0, atol=1e-5)


def test_precision_casts(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "qwen2")  # tied embeddings
    m = load_checkpoint(folder, "bfloat16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.lm_head.weight is m.embed_tokens.weight
    assert load_checkpoint(folder, "native").norm.weight.dtype == torch.float32


def test_truncated_file_names_the_tensor(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "llama")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"tensor '.*' .*truncated"):
        load_checkpoint(folder)


def test_mismatched_config_names_the_tensor(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape"):
        load_checkpoint(folder)


def test_missing_layer_and_missing_shard(tmp_path):
    folder = save_tiny_model(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.2\..* is missing"):
        load_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "x.safetensors"}}))
    with pytest.raises(CheckpointError, match="x.safetensors .*lm_head.weight.* missing"):
        load_checkpoint(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="expected a HF checkpoint folder"):
        load_checkpoint(tmp_path / "nothing.bin")
