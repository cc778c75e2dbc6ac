"""What a warm start of the embedded engine imports (a fresh process, the caches filled): never
transformers (the tokenizer loads from its `FastTokenizer` record), jinja2 only at the first chat
prompt (the template compiles then), neither gguf nor yaml (the repack cache serves the weights;
`lagoon.config`'s loader is not needed), and, with the decode step eager, never torch._dynamo (the
model is built on the meta device without Python meta kernels). Each is
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
e.complete('def', e.params(max_new_tokens=2))
print('BEFORE CHAT', sorted(m for m in ('jinja2', 'transformers', 'torch._dynamo', 'gguf', 'yaml') if m in sys.modules))
e.chat_prompt([{'role': 'user', 'content': 'hi'}])
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
    assert "BEFORE CHAT []" in r.stdout and "IMPORTED []" in r.stdout, r.stdout[-500:] + r.stderr[-2000:]


COMPILED = """
import sys
from lagoon.config import EngineSection
from lagoon.engine import load_model
e = load_model('embedded', config=EngineSection(compile=True, max_seq_len=256, max_batch_size=1))
e.complete('def', e.params(max_new_tokens=2))
print('STEP', e.step.backend, e.step.compiled, sorted(e.step.loaded_buckets))
print('IMPORTED', sorted(m for m in ('transformers', 'torch._dynamo', 'torch._inductor') if m in sys.modules))
"""


@pytest.mark.slow  # the first start compiles the embedded model's step: ~1.5 min on 2 cores
@pytest.mark.timeout(1200)
def test_warm_compiled_start_loads_the_package_without_dynamo_or_inductor():
    """A warm start with the decode step compiled loads its AOTInductor package through torch's C++
    loader: neither torch._dynamo nor torch._inductor (~1.8 s of imports) is imported."""
    from lagoon.engine import embedded_gguf_path

    try:
        embedded_gguf_path()
    except Exception as exc:  # noqa: BLE001 - the wheel is a dev dependency; say why it is skipped
        pytest.skip(f"embedded model unavailable: {exc}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LAGOON_COMPILE": "1"}
    env.pop("LAGOON_COMPILE_BACKEND", None)
    runs = [subprocess.run([sys.executable, "-c", COMPILED], capture_output=True, text=True, env=env, timeout=1000)
            for _ in range(2)]  # the first fills the caches (compiles unless an earlier run did)
    out = runs[1].stdout
    assert "STEP aoti True [1]" in out and "IMPORTED []" in out, out[-500:] + runs[1].stderr[-2000:]
