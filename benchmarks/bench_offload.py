"""Expert offloading: decode tokens/s of a Qwen3-MoE-shaped random checkpoint with every expert
resident (the reference, same process) against offloaded caches of k experts per layer — host or
disk tier, prefetch off/on, speculative routing off/on — with the hit rate, the speculative guess
accuracy, the share of prefetched experts that were used, and the bytes moved per token. Every row
also checks that greedy decoding produced the resident model's tokens.

    .venv/bin/python benchmarks/bench_offload.py [--quick] [--threads N] [--tokens N]
    .venv/bin/python benchmarks/bench_offload.py --model embedded-moe   # real weights, real text

With ``--model`` (an MoE folder, or ``embedded-moe``: the embedded SmolLM2 moefied, see
`lagoon.moe.moefy`) the prompt is the start of the shipped coding sample and the rows are 100 / 50 /
25% of the experts resident, each with prefetch off, history (co-activation) prefetch, and
speculative prefetch, LRU eviction.

On a CPU-only machine the cache and the host tier are the same RAM, so offloading can only cost
time here: the table shows what the copies cost and how much of it prefetch hides. ``cache MiB`` is
the expert memory kept resident (all of it for the reference): what a GPU would hold; the host tier
keeps the rest in RAM, the disk tier in the page cache. On a GPU the host tier is pinned memory and
copies overlap compute.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lagoon.config import EngineSection, ModelDeploymentSection, MoeSection, OffloadSection  # noqa: E402
from lagoon.engine import load_model  # noqa: E402
from lagoon.engine.tiny import save_tiny_model  # noqa: E402
from lagoon.moe.offload import offload_of  # noqa: E402

PROMPT = list(range(40, 56))  # 16 byte tokens


def shape(quick: bool) -> dict:
    if quick:
        return dict(hidden_size=256, num_hidden_layers=4, num_experts=16, num_experts_per_tok=2,
                    moe_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return dict(hidden_size=384, num_hidden_layers=6, num_experts=32, num_experts_per_tok=4,
                moe_intermediate_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=64)


class Row:
    """One configuration, loaded once; `measure` runs one greedy decode and keeps the best."""

    def __init__(self, name: str, folder: str, offload: OffloadSection | None, async_prefetch: bool,
                 speculative: bool, prompt: list[int] | None = None, top_k: int | None = None) -> None:
        self.prompt = prompt or PROMPT
        self.name, self.async_prefetch, self.speculative = name, async_prefetch, speculative
        routing = {"load_balance_weight": 0.0, **({"active_per_token": top_k} if top_k else {})}
        deployment = ModelDeploymentSection(inference={"async_expert_prefetch": async_prefetch,
                                                       "speculative_routing": speculative}, expert_routing=routing)
        moe = MoeSection(recalibration_cv=None, offload=offload or OffloadSection())  # routing fixed
        self.engine = load_model(folder, precision="float32", deployment=deployment, moe=moe,
                                 config=EngineSection(max_batch_size=1, prefix_cache=False))
        self.engine.complete(self.prompt, self.engine.params(max_new_tokens=4, ignore_eos=True))  # warm-up
        self.off = offload_of(self.engine.model)
        self.decode, self.ids, self.stats = 0.0, None, None
        if self.off is not None:
            self.resident_mib = sum(c.capacity * c.expert_bytes for c in self.off.caches) / 2**20
        else:
            experts = [m for m in self.engine.model.modules() if hasattr(m, "gate_up_proj")]
            self.resident_mib = sum(m.gate_up_proj.nbytes + m.down_proj.nbytes for m in experts) / 2**20

    def measure(self, n_new: int) -> None:
        if self.off is not None:
            self.off.reset_stats()
        c = self.engine.complete(self.prompt, self.engine.params(max_new_tokens=n_new, ignore_eos=True))
        rate = (c.completion_tokens - 1) / (c.duration_s - c.ttft_s)
        if rate > self.decode:
            self.decode, self.ids = rate, c.token_ids
            self.stats = self.off.stats() if self.off is not None else None

    def close(self) -> None:
        self.engine.close()
        if self.off is not None:
            self.off.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, fewer rows and tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 32, quick 16)")
    ap.add_argument("--model", default=None, help="an MoE checkpoint or `embedded-moe` (real weights, real text)")
    ap.add_argument("--top-k", type=int, default=None, help="with --model: route this many experts")
    args = ap.parse_args()
    if args.model:
        return real_model(args)
    torch.set_num_threads(args.threads)
    n_new = args.tokens or (16 if args.quick else 32)
    repeats = 3 if args.quick else 5
    cfg = shape(args.quick)
    e, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    modes = [(False, False), (True, False), (False, True), (True, True)]
    rows = [("resident", None, False, False)]
    caps = [e // 4] if args.quick else [e // 4, e // 2]
    for cap in caps:
        for a, s in ([(False, False), (True, True), (False, True)] if args.quick else modes):
            rows.append((f"host k={cap}", OffloadSection(capacity=cap, tier="host"), a, s))
    disk = [(False, False), (True, True)]
    for a, s in disk[1:] if args.quick else disk:
        rows.append((f"disk k={caps[0]}", OffloadSection(capacity=caps[0], tier="disk"), a, s))
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(save_tiny_model(f"{tmp}/m", "qwen3_moe", seed=0, **cfg))
        print(f"model: qwen3_moe-shaped, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
              f"{e} experts top-{k}, expert intermediate {cfg['moe_intermediate_size']}; fp32, "
              f"{args.threads} threads, {n_new} new tokens, best of {repeats} interleaved rounds")
        built = [Row(name, folder, offload, a, s) for name, offload, a, s in rows]
        for r in range(repeats):  # interleaved, so a busy moment on a shared machine hits every row alike
            for row in built:
                row.measure(n_new)
            print(f"  round {r + 1}/{repeats} done", flush=True)
        for row in built:
            row.close()
    ref = built[0]
    head = (f"{'row':<11} {'prefetch':>8} {'spec':>5} {'tok/s':>7} {'ratio':>6} {'hit':>6} {'spec acc':>8} "
            f"{'pf used':>7} {'MiB/tok':>8} {'cache MiB':>10} {'same ids':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in built:
        st, a, s = r.stats, r.async_prefetch, r.speculative
        hit = f"{st['hit_rate']:.1%}" if st else "-"
        acc = f"{st['speculative_accuracy']:.1%}" if st and s else "-"
        used = f"{st['prefetch_accuracy']:.1%}" if st and st["prefetch_loads"] else "-"
        mib = f"{st['bytes_loaded'] / 2**20 / n_new:.2f}" if st else "0"
        print(f"{r.name:<11} {'on' if a else 'off':>8} {'on' if s else 'off':>5} {r.decode:7.1f} "
              f"{r.decode / ref.decode:6.2f} {hit:>6} {acc:>8} {used:>7} {mib:>8} "
              f"{r.resident_mib:10.1f} {str(r.ids == ref.ids):>8}")

def real_model(args: argparse.Namespace) -> None:
    """Rows for a real checkpoint: 100/50/25% experts resident x prefetch off / history / speculative."""
    from lagoon.engine.engine import resolve_model
    from lagoon.moe.layer import SparseMoE
    from lagoon.moe.utilization import CODING_SAMPLE

    torch.set_num_threads(args.threads)
    folder = str(resolve_model(args.model))
    n_new = args.tokens or 24
    repeats = 2 if args.quick else 3
    probe = load_model(folder, precision="float32")
    prompt = probe.encode(CODING_SAMPLE.read_text())[:64]
    block = next(m for m in probe.model.modules() if isinstance(m, SparseMoE))
    e, n_layers = block.num_experts, sum(isinstance(m, SparseMoE) for m in probe.model.modules())
    k = args.top_k or block.top_k
    probe.close()
    rows = [("100%", None, False, False)]
    for frac in ("50%", "25%"):
        cap = max(1, e * int(frac[:-1]) // 100)
        for name, a, s in (("off", False, False), ("history", True, False), ("speculative", True, True)):
            rows.append((f"{frac} ({cap}) {name}", OffloadSection(capacity=cap, tier="host", policy="lru"), a, s))
    print(f"model: {args.model} ({n_layers} MoE layers, {e} experts top-{k}); fp32, {args.threads} threads, "
          f"prompt {len(prompt)} tokens of the coding sample, {n_new} new tokens, best of {repeats}; "
          f"CPU: {cpu_features()}")
    built = [Row(name, folder, off, a, s, prompt, args.top_k) for name, off, a, s in rows]
    for r in range(repeats):
        for row in built:
            row.measure(n_new)
        print(f"  round {r + 1}/{repeats} done", flush=True)
    for row in built:
        row.close()
    ref = built[0]
    head = f"{'resident / prefetch':<20} {'tok/s':>7} {'ratio':>6} {'hit':>6} {'spec recall':>11} {'pf used':>7} {'same ids':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in built:
        st = r.stats
        hit = f"{st['hit_rate']:.1%}" if st else "-"
        acc = f"{st['speculative_accuracy']:.1%}" if st and r.speculative else "-"
        used = f"{st['prefetch_accuracy']:.1%}" if st and st["prefetch_loads"] else "-"
        print(f"{r.name:<20} {r.decode:7.1f} {r.decode / ref.decode:6.2f} {hit:>6} {acc:>11} {used:>7} "
              f"{str(r.ids == ref.ids):>8}")


def cpu_features() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return ",".join(f for f in keep if f in flags) or "no AVX2"


if __name__ == "__main__":
    main()
