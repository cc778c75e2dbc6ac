"""Engine generation: greedy equals transformers, streaming pieces, stop strings, limits, batching."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from lagoon.config import EngineSection
from lagoon.engine import load_model
from lagoon.engine.tiny import save_tiny_model
from lagoon.errors import ContextWindowExceededError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gen") / "m", "qwen3")


@pytest.mark.parametrize("paged", [True, False])
def test_greedy_matches_transformers_generate(folder, paged):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    engine = load_model(folder, precision="float32", paged=paged)
    try:
        for prompt in ("hello there", "def f(x):\n    return"):
            ids = engine.encode(prompt)
            out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            got = engine.complete(ids, engine.params(max_new_tokens=24, ignore_eos=True))
            assert got.token_ids == out[0, len(ids):].tolist()
            assert got.finish_reason == "length"
    finally:
        engine.close()


def test_stream_stop_strings_and_batching(folder):
    engine = load_model(folder, precision="float32", config=EngineSection(max_seq_len=128, max_batch_size=3))
    try:
        p = engine.params(max_new_tokens=30, ignore_eos=True)
        full = engine.complete("abc", p)
        pieces = list(engine.stream("abc", p))
        assert len(pieces) > 1 and "".join(pieces) == "".join(engine.stream("abc", p))
        stop = full.text[5:8]
        cut = engine.complete("abc", engine.params(max_new_tokens=30, ignore_eos=True, stop=(stop,)))
        assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
        # five concurrent requests through three batch slots give the sequential answers
        prompts = [f"p{i}" for i in range(5)]
        seq = [engine.complete(x, p).token_ids for x in prompts]
        with cf.ThreadPoolExecutor(5) as pool:
            assert list(pool.map(lambda x: engine.complete(x, p).token_ids, prompts)) == seq
        # seeded sampling is reproducible
        s = engine.params(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
        assert engine.complete("x", s).token_ids == engine.complete("x", s).token_ids
        with pytest.raises(ContextWindowExceededError, match="max_tokens"):
            engine.complete("abc", engine.params(max_new_tokens=500))
    finally:
        engine.close()


def test_small_pool_queues_instead_of_overcommitting(folder):
    # 6 blocks of 8 = room for two 24-token sequences at once; six requests must all finish correctly
    engine = load_model(folder, precision="float32", config=EngineSection(
        max_seq_len=64, max_batch_size=4, kv_block_size=8, num_kv_blocks=6, prefix_cache=False))
    try:
        p = engine.params(max_new_tokens=16, ignore_eos=True)
        prompts = [[40 + i] * 8 for i in range(6)]
        seq = [engine.complete(x, p).token_ids for x in prompts]
        with cf.ThreadPoolExecutor(6) as pool:
            assert list(pool.map(lambda x: engine.complete(x, p).token_ids, prompts)) == seq
        assert engine.cache.free_blocks == 6
    finally:
        engine.close()


def test_text_stream_decodes_incrementally_and_matches_a_full_decode(folder):
    """`TextStream` with `Engine.decode_step` (tokenizers' DecodeStream, O(1) a token) gives the text
    a full `decode` of the same ids gives; multi-byte characters split over byte tokens wait."""
    import random

    from lagoon.engine.generate import TextStream

    engine = load_model(folder)
    try:
        text = "naïve café — 東京 🚀 done"
        ids = list(engine.tokenizer.encode(text, add_special_tokens=False))
        step = engine.decode_step()
        pieces = [step(i) for i in ids]
        assert "".join(p for p in pieces if p) == engine.decode(ids) == text
        assert pieces.count(None) >= 10  # every continuation byte of a multi-byte character
        rng = random.Random(11)
        for _ in range(20):  # fresh random ids, special ones included
            ids = [rng.randrange(len(engine.tokenizer)) for _ in range(rng.randint(1, 40))]
            step = engine.decode_step()
            got = "".join(p for i in ids if (p := step(i)))
            full = engine.decode(ids)
            assert got == full or (full.endswith("\ufffd") and full.startswith(got)), (ids, got, full)
        # the real path: the same seeded completions through the incremental stream and through one
        # that decodes every id again per token
        for seed in (1, 2, 3):
            params = engine.params(max_new_tokens=30, temperature=1.0, seed=seed, ignore_eos=True, stop=["\n\n"])
            incremental = engine.complete("hello", params)
            req = engine.scheduler.submit(engine.encode("hello"), params)
            redecoding = TextStream(req, engine.decode, engine.eos_ids)  # no `step`
            text = "".join(redecoding)
            assert incremental.token_ids == redecoding.output_ids
            assert (incremental.text, incremental.finish_reason) == (text, redecoding.finish_reason)
    finally:
        engine.close()


def test_batched_greedy_picks_equal_sampling_each_row(folder):
    # the scheduler picks every unconstrained greedy row of a decode step in one reduction; on
    # coarsely rounded logits (many exact ties) each pick must be what `sample` takes for the row
    from lagoon.engine.sampling import sample

    engine = load_model(folder, precision="float32", config=EngineSection(max_seq_len=128, max_batch_size=4))
    real, seen = engine.scheduler.step, []

    def rounded_step(seq_ids, tokens, pos):
        logits = (real(seq_ids, tokens, pos) * 2).round()
        seen.append((list(seq_ids), logits.clone()))
        return logits

    engine.scheduler.step = rounded_step
    try:
        greedy = engine.params(max_new_tokens=12, ignore_eos=True)
        sampled = engine.params(max_new_tokens=12, ignore_eos=True, temperature=0.8, seed=3)
        with cf.ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(engine.submit, ids, p) for ids, p in
                    (([5, 6, 7], greedy), ([9, 1], sampled), ([4, 4, 4, 4], greedy))]
            reqs = [f.result()[0] for f in futs]
            for f in futs:
                list(f.result()[1])
        by_id = {r.id: r for r in reqs}
        checked, steps = 0, dict.fromkeys(by_id, 0)
        for seq_ids, logits in seen:
            for row, sid in enumerate(seq_ids):
                req = by_id[sid]
                steps[sid] += 1  # output token 0 came from the prefill, token n from its n-th decode step
                if req.params.greedy:
                    assert req.output_ids[steps[sid]] == sample(logits[row], req.params)
                    checked += 1
        assert checked >= 16 and any(len(s) > 1 for s, _ in seen)  # batched steps were checked
    finally:
        engine.close()
