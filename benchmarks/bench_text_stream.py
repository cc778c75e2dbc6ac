"""TextStream decoding cost per token: incremental (tokenizers' DecodeStream, `Engine.decode_step`)
against decoding every id again per token (the path without `step`), same ids, same process.

    python benchmarks/bench_text_stream.py [--tokens 2000]

Prints the CPU features, ms for the whole sequence both ways and the ratio; asserts the two texts
match. Decoding only (no model loaded): random ids of the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

from lagoon.engine import embedded_gguf_path
from lagoon.engine.generate import incremental_decoder
from lagoon.engine.tokenizer import load_tokenizer


def cpu_features() -> str:
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile") if f in flags]
    return f"{platform.machine()} {platform.processor() or ''} flags={','.join(keep) or 'none'}".strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    args = ap.parse_args()
    print(cpu_features())
    tok = load_tokenizer(embedded_gguf_path())  # the engine's tokenizer, without loading the model
    rng = random.Random(0)
    ids = [rng.randrange(len(tok)) for _ in range(args.tokens)]
    t0 = time.perf_counter()
    step = incremental_decoder(tok)
    incremental = "".join(p for i in ids if (p := step(i)))
    t1 = time.perf_counter()
    text = ""
    for n in range(1, len(ids) + 1):  # what TextStream does without `step` (Engine.decode)
        text = tok.decode(ids[:n], skip_special_tokens=True)
    t2 = time.perf_counter()
    assert incremental == text, "the two decodings differ"
    inc_ms, full_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
    print(f"{args.tokens} tokens: incremental {inc_ms:.1f} ms, re-decoding {full_ms:.1f} ms, "
          f"ratio {full_ms / inc_ms:.1f}x")


if __name__ == "__main__":
    main()
