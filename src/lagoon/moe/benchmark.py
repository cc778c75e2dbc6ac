"""The MoE block benchmark behind ``benchmarks/bench_moe.py`` and ``lagoon moe bench``.

Speed: for each shape (experts E, top-k, hidden H, intermediate I) and token count T, one random
transformers ``Qwen3MoeSparseMoeBlock`` (fp32, ``norm_topk_prob=True``) is timed with its
``eager`` and its default ``grouped_mm`` experts implementation, and Lagoon's `SparseMoE` built
from it with ``SparseMoE.from_hf(share=True)`` (same tensors) with each experts impl. Calls are
interleaved round-robin and the median is reported, because this machine is shared. ``ratio`` is
(faster HF median) / (this row's median): above 1 means faster than the best HF path. ``max err``
is max |y − y_eager| / max |y_eager| on the timed input.

Balancing: a random-weight `SparseMoE` fed a stream of skewed batches (every token shares one
offset, which drives the router to a few experts), runtime balancing off vs on at several
``load_balance_weight`` values. It reports the load CV over the stream with balancing off
(before) and on (after), and the KL divergence it costs: a random unembedding turns the block's
output (plus the residual) into a next-token distribution, and KL(p_off ‖ p_on) is averaged over
tokens.

This module is *not* a test: it asserts nothing and its numbers depend on the machine's load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lagoon.moe.layer import SparseMoE
from lagoon.moe.router import coefficient_of_variation

__all__ = [
    "SHAPES",
    "SpeedRow",
    "BalanceRow",
    "speed_rows",
    "balance_rows",
    "format_speed",
    "format_balance",
    "run",
]

SHAPES = [(8, 2, 1024, 2816), (64, 8, 1024, 512), (128, 8, 2048, 768)]
TOKENS = [1, 512]


@dataclass
class SpeedRow:
    shape: tuple[int, int, int, int]
    tokens: int
    path: str
    ms: float
    ratio: float
    max_err: float


@dataclass
class BalanceRow:
    weight: float
    cv_off: float
    cv_on: float
    kl: float
    changed: float  # share of token selections that differ from the unbalanced router


def _hf_block(e: int, k: int, h: int, i: int):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k, norm_topk_prob=True)
    cfg._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return block


def _interleaved(fns: dict[str, Callable[[], torch.Tensor]], reps: int, warmup: int = 2) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def speed_rows(
    shapes=SHAPES, tokens=TOKENS, reps_decode: int = 20, reps_prefill: int = 5, progress=None
) -> list[SpeedRow]:
    rows: list[SpeedRow] = []
    for shape in shapes:
        block = _hf_block(*shape)
        experts_cfg = block.experts.config
        lagoon = {impl: SparseMoE.from_hf(block, share=True, experts_impl=impl).eval() for impl in ("loop", "grouped_mm")}

        def hf(impl: str, x: torch.Tensor, block=block, experts_cfg=experts_cfg) -> torch.Tensor:
            experts_cfg._experts_implementation = impl
            return block(x)

        for t in tokens:
            x = torch.randn(1, t, shape[2])
            fns = {
                "hf eager": lambda x=x: hf("eager", x),
                "hf grouped_mm": lambda x=x: hf("grouped_mm", x),
                "lagoon loop": lambda x=x, m=lagoon["loop"]: m(x),
                "lagoon grouped_mm": lambda x=x, m=lagoon["grouped_mm"]: m(x),
            }
            with torch.no_grad():
                ref = hf("eager", x)
                outs = {name: fn() for name, fn in fns.items()}
            ms = _interleaved(fns, reps_decode if t == 1 else reps_prefill)
            best_hf = min(ms["hf eager"], ms["hf grouped_mm"])
            for name in fns:
                err = float((outs[name] - ref).abs().max() / ref.abs().max())
                rows.append(SpeedRow(shape, t, name, ms[name], best_hf / ms[name], err))
            if progress:
                progress(rows[-len(fns) :])
        del block, lagoon
    return rows


def _skewed(n: int, h: int, offset: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return offset + torch.randn(n, h, generator=g)


def balance_rows(
    weights=(0.05, 0.15, 0.5, 2.0), num_experts: int = 64, top_k: int = 8, hidden: int = 256, steps: int = 200,
    batch: int = 8, vocab: int = 2048,
) -> list[BalanceRow]:
    torch.manual_seed(0)
    base = SparseMoE(hidden, 128, num_experts, top_k).eval()
    unembed = torch.randn(vocab, hidden) / hidden**0.5  # [V, H]
    g = torch.Generator().manual_seed(1)
    offset = torch.randn(hidden, generator=g) * 2.0
    stream = [_skewed(batch, hidden, offset, g) for _ in range(steps)]
    rows = []
    for w in weights:
        off = SparseMoE(hidden, 128, num_experts, top_k).eval()
        on = SparseMoE(hidden, 128, num_experts, top_k, load_balance_weight=w, balance_window=100).eval()
        off.load_state_dict(base.state_dict())
        on.load_state_dict(base.state_dict())
        load_off, load_on = torch.zeros(num_experts), torch.zeros(num_experts)
        kl_sum, changed, n = 0.0, 0, 0
        with torch.no_grad():
            for x in stream:
                y_off, y_on = off(x), on(x)
                load_off += off.last_counts
                load_on += on.last_counts
                logp_off = ((x + y_off) @ unembed.T).log_softmax(-1)  # [T, V]
                logp_on = ((x + y_on) @ unembed.T).log_softmax(-1)
                kl_sum += float((logp_off.exp() * (logp_off - logp_on)).sum(-1).sum())
                a = off.last_routing.indices.sort(-1)[0]
                b = on.last_routing.indices.sort(-1)[0]
                changed += int((a != b).any(-1).sum())
                n += x.shape[0]
        rows.append(BalanceRow(w, coefficient_of_variation(load_off), coefficient_of_variation(load_on), kl_sum / n, changed / n))
    return rows


def format_speed(rows: list[SpeedRow]) -> str:
    lines = [
        f"{'experts/k':>9} {'hidden':>6} {'inter':>6} {'tokens':>6}  {'path':<18} {'ms':>9} {'ratio':>6} {'max err':>9}",
    ]
    for r in rows:
        e, k, h, i = r.shape
        lines.append(
            f"{f'{e}/{k}':>9} {h:>6} {i:>6} {r.tokens:>6}  {r.path:<18} {r.ms:>9.2f} {r.ratio:>5.2f}x {r.max_err:>9.1e}"
        )
    return "\n".join(lines)


def format_balance(rows: list[BalanceRow]) -> str:
    lines = [f"{'weight':>6} {'CV off':>7} {'CV on':>7} {'KL(off||on)':>12} {'tokens rerouted':>16}"]
    for r in rows:
        lines.append(f"{r.weight:>6.2f} {r.cv_off:>7.3f} {r.cv_on:>7.3f} {r.kl:>12.2e} {r.changed:>15.1%}")
    return "\n".join(lines)


def run(quick: bool = False, threads: int | None = 2, echo: Callable[[str], None] = print) -> None:
    """Both tables, as ``benchmarks/bench_moe.py`` prints them (``quick``: two shapes, 1/128 tokens)."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    shapes = SHAPES[:2] if quick else SHAPES
    tokens = [1, 128] if quick else TOKENS
    reps = (8, 3) if quick else (20, 5)
    echo(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; median of {reps[0]} (decode) / "
        f"{reps[1]} (prefill) interleaved calls"
    )
    rows = speed_rows(shapes, tokens, reps_decode=reps[0], reps_prefill=reps[1], progress=lambda r: echo(format_speed(r)))
    echo("\n== speed (ratio = faster HF path / this path; Lagoon's default 'auto' = grouped_mm on CPU) ==")
    echo(format_speed(rows))
    echo("\n== runtime balancing, random-weight block (64 experts, top-8), skewed input stream ==")
    echo(format_balance(balance_rows(steps=100 if quick else 200)))
    echo(f"\ntotal {time.perf_counter() - started:.0f} s")
