"""What a warm start of the embedded engine imports (a fresh process, the caches filled): never
transformers (the tokenizer loads from its `FastTokenizer` record), and, with the decode step eager,
never torch._dynamo (the model is built on the meta device without Python meta kernels). Each is
~0.35-0.8 s of CPU that `benchmarks/bench_engine.py`'s warm start would pay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import sys
from lagoon.config import EngineSection
from lagoon.engine import load_model
e = load_model('embedded', config=EngineSection(compile=False, max_seq_len=256, max_batch_size=1))
e.chat_prompt([{'role': 'user', 'content': 'hi'}])
e.complete('def', e.params(max_new_tokens=2))
print('IMPORTED', sorted(m for m in ('transformers', 'torch._dynamo') if m in sys.modules))
"""


def test_warm_eager_start_imports_neither_transformers_nor_dynamo():
    from lagoon.engine import embedded_gguf_path, load_model

    try:
        embedded_gguf_path()
    except Exception as exc:  # noqa: BLE001 - the wheel is a dev dependency; say why it is skipped
        pytest.skip(f"embedded model unavailable: {exc}")
    from lagoon.config import EngineSection

    load_model("embedded", config=EngineSection(compile=False, max_seq_len=256, max_batch_size=1)).close()  # fill caches
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)
    assert "IMPORTED []" in r.stdout, r.stdout[-500:] + r.stderr[-2000:]
