"""Benchmark the cost of constrained decoding: decode tokens/s with a JSON-schema constraint against
the same engine decoding freely, in one process.

    .venv/bin/python benchmarks/bench_grammar.py [--model embedded] [--tokens 64] [--repeats 3] [--batch 1]

Both runs decode `--tokens` tokens from the same prompt (the free run ignores EOS; the schema
demands at least 500 array items, so the constrained run cannot finish early). Decode rate is
(tokens - 1) / (last token - first token), so prefill is left out; the median of `--repeats`
interleaved runs is reported. The constrained run also reports the time spent in the mask itself (llguidance's mask plus
unpacking it), measured around `GrammarMatcher.allowed`, and its share of a decode step: on a
shared, loaded machine the two rates swing more than the mask costs, and the share is the steadier
measure of the overhead. With `--batch N` the N requests decode
together (half of them constrained when N > 1), showing that masks do not serialise a batch.

Target (issue 15): overhead at decode ≤ 10 %.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lagoon.engine import Constraint, load_model
from lagoon.engine.grammar import GrammarMatcher

SCHEMA = {
    "type": "object",
    "properties": {"files": {"type": "array", "items": {"type": "string"}, "minItems": 500}},
    "required": ["files"],
    "additionalProperties": False,
}
PROMPT = "List every file of a large Python web project as JSON: "


def cpu_features() -> str:
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{platform.machine()} torch {torch.__version__} capability={torch.backends.cpu.get_cpu_capability()} " \
           f"threads={torch.get_num_threads()} flags={','.join(keep) or 'none'}"


def decode_rate(engine, n: int, batch: int, constrained: bool) -> tuple[float, int]:
    """Best-effort tokens/s over the batch's decode phase; also the tokens the first request made."""
    ids = engine.encode(PROMPT)
    c = Constraint.json_schema(SCHEMA)
    reqs = []
    for i in range(batch):
        with_c = constrained and (batch == 1 or i % 2 == 0)
        params = engine.params(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        reqs.append(engine.submit(ids, params, None, c if with_c else None))
    for _, stream in reqs:
        list(stream)
    first = min(r.first_token_at for r, _ in reqs)
    done = time.perf_counter()
    tokens = sum(len(r.output_ids) for r, _ in reqs)
    return (tokens - batch) / max(done - first, 1e-9), len(reqs[0][0].output_ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    print(cpu_features())
    engine = load_model(args.model)
    # time inside the mask, wrapped around the real method
    spent = {"s": 0.0, "n": 0}
    real = GrammarMatcher.allowed

    def timed(self, vocab):
        t = time.perf_counter()
        try:
            return real(self, vocab)
        finally:
            spent["s"] += time.perf_counter() - t
            spent["n"] += 1

    GrammarMatcher.allowed = timed
    try:
        decode_rate(engine, 8, 1, True)  # warm: compile the grammar, first forward
        decode_rate(engine, 8, 1, False)
        free, cons = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            free.append(decode_rate(engine, args.tokens, args.batch, False)[0])
            spent["s"], spent["n"] = 0.0, 0
            rate, made = decode_rate(engine, args.tokens, args.batch, True)
            cons.append(rate)
            assert made == args.tokens, f"the constrained run stopped after {made} tokens"
    finally:
        GrammarMatcher.allowed = real
        engine.close()
    print("free runs", [round(x, 1) for x in free], "constrained runs", [round(x, 1) for x in cons])
    f, c = statistics.median(free), statistics.median(cons)
    mask_ms = 1000 * spent["s"] / max(spent["n"], 1)
    k = 1 if args.batch == 1 else (args.batch + 1) // 2  # constrained requests in the batch
    share = mask_ms * k / (1000 * args.batch / c)  # mask time per step / step time (batch / tok/s)
    print("| model | batch | tokens | free tok/s (median) | JSON-schema tok/s (median) | ratio | mask ms/token "
          "| mask share of a step |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {args.batch} | {args.tokens} | {f:.1f} | {c:.1f} | {c / f:.3f} | {mask_ms:.3f} | "
          f"{100 * share:.1f} % |")


if __name__ == "__main__":
    main()
