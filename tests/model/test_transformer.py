"""Lagoon's Transformer against transformers on tiny random checkpoints: prefill logits and several
cached decode steps (contiguous and paged caches) agree to rel. error <= 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch

from lagoon.engine.checkpoint import load_checkpoint
from lagoon.engine.kv_cache import make_cache
from lagoon.engine.tiny import save_tiny_model
from lagoon.model.args import ModelArgs
from lagoon.model.transformer import rope_inv_freq

DENSE = ["llama", "qwen2", "qwen3"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def check_family(tmp_path, family: str, steps: int = 8, prefix: bool = True, **config) -> None:
    """Prefill + `steps` cached greedy decode steps against transformers, through the contiguous
    cache, the paged cache, and the paged cache serving the prompts from its prefix cache. Causal
    models make one transformers forward over the final sequences the reference for every step:
    its logits at position p are the step that produced token p + 1, and its argmax there is
    transformers' own greedy choice."""
    folder = save_tiny_model(tmp_path / family, family, **config)
    ref = _hf(folder)
    ours = load_checkpoint(folder, "float32")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 256, (3, 12), generator=g)  # [B, T]
    with torch.no_grad():
        assert rel(ours(prompts), ref(prompts).logits) <= 1e-4, family

    runs = []
    for paged, reuse in ((False, False), (True, False), (True, True))[: 3 if prefix else 2]:
        cache = make_cache(ours.args, paged=paged, max_batch=3, max_seq_len=64, dtype=torch.float32, block_size=4)
        if reuse:  # run the prompts once and free them, so the second run finds their blocks cached
            _decode(ours, cache, prompts, 0)
            for i in range(3):
                cache.free(i, prompts[i].tolist())
        runs.append(((family, paged, reuse), *_decode(ours, cache, prompts, steps)))
        if reuse:
            assert cache.hits >= 3 * 8, "the prefix cache served no prompt blocks"
    tokens = runs[0][1]
    with torch.no_grad():
        full = ref(torch.cat([prompts, torch.tensor(tokens)[:, :-1]], dim=1)).logits  # [B, T + steps, V]
    assert full[:, 11:].argmax(-1).tolist() == tokens, (family, "greedy tokens differ from transformers'")
    for label, toks, logits in runs:
        assert toks == tokens, label
        n = 12 - logits[0].shape[1]  # prompt tokens the prefix cache served
        assert rel(logits[0], full[:, n:12]) <= 1e-4, (*label, "prefill")
        for step, got in enumerate(logits[1:]):
            assert rel(got, full[:, 12 + step : 13 + step]) <= 1e-4, (*label, step)


def _decode(ours, cache, prompts, steps) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill `prompts` into `cache`, then `steps` batched greedy decode steps: the 1 + steps greedy
    tokens of each row and the logits of every forward (prefill [B, T', V], then [B, 1, V] each)."""
    B, T = prompts.shape
    seqs = prompts.tolist()
    out = []
    with torch.no_grad():
        for i in range(B):
            n = cache.allocate(i, seqs[i])
            cache.ensure(i, T)
        pos = torch.arange(n, T).expand(B, T - n)
        cache.prepare(list(range(B)), pos)
        logits = ours(prompts[:, n:], pos, cache)
        out.append(logits)
        for step in range(steps):  # batched cached decode, greedy continuation
            nxt = logits[:, -1].argmax(-1)
            for i in range(B):
                seqs[i].append(int(nxt[i]))
                cache.ensure(i, len(seqs[i]))
            p = torch.full((B, 1), T + step)
            cache.prepare(list(range(B)), p)
            logits = ours(nxt[:, None], p, cache)
            out.append(logits)
        for i in range(B):
            seqs[i].append(int(logits[i, -1].argmax()))
    return [s[T:] for s in seqs], out


@pytest.mark.parametrize("family", DENSE)
def test_dense_family_matches_transformers(tmp_path, family):
    check_family(tmp_path, family)


@pytest.mark.slow  # the inv_freq test below covers the formula; this runs the whole model
def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    check_family(tmp_path, "llama", rope_scaling=scaling)


def test_rope_variants_match_transformers_inv_freq():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in ({"rope_type": "linear", "factor": 4.0},
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}):
        cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, rope_scaling=scaling)
        ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
        args = ModelArgs.from_hf_config(cfg.to_dict())
        assert rel(rope_inv_freq(args), ref) <= 1e-6


def test_unknown_family_lists_known_ones():
    from lagoon.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="llama"):
        ModelArgs.from_hf_config({"model_type": "gpt2"})


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_moe_family_matches_transformers(tmp_path, family):
    check_family(tmp_path, family)
