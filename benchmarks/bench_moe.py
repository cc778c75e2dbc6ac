"""MoE block speed vs transformers (eager and grouped_mm) and the cost of runtime balancing.

    .venv/bin/python benchmarks/bench_moe.py [--quick] [--threads N]
    .venv/bin/python benchmarks/bench_moe.py --model embedded-moe [--lam 0.15] [--window 64]

Prints two tables (see `lagoon.moe.benchmark` for what each column means). `--quick` runs the first
two shapes, 1 and 128 tokens, with fewer repetitions. Same as `lagoon moe bench`.

With ``--model`` (an MoE folder or ``embedded-moe``) it measures expert utilization on real text
(the shipped coding sample) before and after runtime balancing: the checkpoint's own routing, then
the same text streamed in 32-token steps through the serving runtime with the load penalty and the
15% recalibration on (state committed between steps, as the scheduler does), measured on a second
pass after a warm-up pass; also the share of next-token argmaxes that balancing changed (for a
moefied model balancing changes the function, not only the placement).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lagoon.moe.benchmark import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, 1 and 128 tokens, fewer repetitions")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--model", default=None, help="an MoE checkpoint or `embedded-moe`: utilization before/after")
    ap.add_argument("--lam", type=float, default=0.15, help="load penalty for the balanced pass")
    ap.add_argument("--window", type=int, default=64, help="balance window (steps) for the balanced pass")
    ap.add_argument("--top-k", type=int, default=None, help="route this many experts (default: the checkpoint's)")
    args = ap.parse_args(argv)
    if args.model:
        return real_model(args)
    run(quick=args.quick, threads=args.threads, echo=lambda line: print(line, flush=True))
    return 0


def real_model(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from lagoon.config import MoeRoutingSection, MoeSection
    from lagoon.engine import load_model
    from lagoon.moe.balance import ExpertLoadMonitor, load_stats
    from lagoon.moe.runtime import MoeRuntime
    from lagoon.moe.utilization import CODING_SAMPLE, measure_utilization

    torch.set_num_threads(args.threads)
    from lagoon.moe.layer import SparseMoE

    engine = load_model(args.model, precision="float32")
    model = engine.model
    if args.top_k:  # e.g. embedded-moe routes all 8 of 8: nothing to balance at its own k
        for m in model.modules():
            if isinstance(m, SparseMoE):
                m.router.top_k = args.top_k
    ids = engine.encode(CODING_SAMPLE.read_text())
    before, _ = measure_utilization(model, ids)
    t = torch.tensor(ids)
    step = 32
    with torch.no_grad():
        plain = [model(t[None, : s + step])[0, -step:].argmax(-1) for s in range(0, t.numel() - step, step * 4)]
    rt = MoeRuntime(model, MoeRoutingSection(load_balance_weight=args.lam),
                    MoeSection(balance_window=args.window, recalibration_cv=0.15))
    monitor = None
    with torch.no_grad():
        for p in range(2):  # warm-up pass, then the measured one
            if p == 1:
                monitor = ExpertLoadMonitor(window=10**6).attach(model)
            for s in range(0, t.numel(), step):
                model(t[None, s : s + step])
                rt.step()
        monitor.detach()
        balanced = [model(t[None, : s + step])[0, -step:].argmax(-1) for s in range(0, t.numel() - step, step * 4)]
    changed = float(np.mean([float((a != b).float().mean()) for a, b in zip(plain, balanced, strict=True)]))
    after = [load_stats(load) for load in monitor.loads()]
    engine.close()

    def summary(layers: list[dict]) -> tuple[float, float, float, int]:
        return (float(np.mean([x["cv"] for x in layers])), float(np.mean([x["balancedness"] for x in layers])),
                float(np.mean([x["entropy_norm"] for x in layers])), sum(x["cv"] > 0.15 for x in layers))

    k = next(m.top_k for m in model.modules() if isinstance(m, SparseMoE))
    print(f"model: {args.model} (top-{k}); text: {CODING_SAMPLE.name} ({len(ids)} tokens); balanced pass: penalty "
          f"{args.lam}, window {args.window} steps of {step} tokens, recalibration at CV 15%")
    head = f"{'routing':<26} {'mean CV':>8} {'balancedness':>12} {'entropy':>8} {'layers CV>15%':>14}"
    print(head + "\n" + "-" * len(head))
    for name, layers in (("checkpoint's own", before["layers"]), ("balanced (serving runtime)", after)):
        cv, bal, ent, over = summary(layers)
        print(f"{name:<26} {cv:8.3f} {bal:12.3f} {ent:8.3f} {over:>8}/{len(layers)}")
    print(f"recalibrations: {rt.stats()['recalibrations']}; next-token argmax changed by balancing: {changed:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
