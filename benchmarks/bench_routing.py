"""Benchmark the hybrid router: a fault run through real SDK backends, the router's overhead, and
the learned classifier against the lexical rule.

    .venv/bin/python benchmarks/bench_routing.py [--quick] [--calls 240] [--embeddings]

1. **Fault run** — two loopback `FaultServer`s: the open-weight route speaks OpenAI chat
   completions, the strong route speaks Anthropic Messages. Both inject faults at the rates below
   (5xx, 429 with Retry-After, timeouts, malformed JSON, bodies cut midway). `--calls` prompts from
   the shipped set go through `Router.chat`; the table says how many completed and by which path
   (first try, after retries, by fallback, failed), the breaker transitions, and the time the router
   spent outside backend calls and backoff sleeps.
2. **Overhead** — on fault-free servers: the same backend called directly (the reference) vs
   through the router (classify, context check, breaker, telemetry); ratio and µs per call.
3. **Classifier** — `examples/routing/prompts.jsonl` split by template (held-out templates), and
   at random: accuracy of the learned classifier vs the lexical rule, raw and with the safe side.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from lagoon.config import load_config
from lagoon.protocols import ChatMessage
from lagoon.routing import build_router
from lagoon.routing.backends import build_backend
from lagoon.routing.evaluation import compare_on_holdout
from lagoon.routing.fault_server import FaultServer
from lagoon.routing.learned import embeddings_available, load_rows
from lagoon.testing import ScriptedChatModel

DATA = Path(__file__).resolve().parents[1] / "examples" / "routing" / "prompts.jsonl"
CHEAP_FAULTS = {"500": 0.10, "503": 0.08, "429": 0.08, "timeout": 0.04, "malformed": 0.04, "cut": 0.04}
STRONG_FAULTS = {"529": 0.06, "429": 0.05, "timeout": 0.03, "malformed": 0.03, "cut": 0.03}


class Timed:
    """Wraps a backend and sums the time spent inside its chat calls."""

    def __init__(self, inner):
        self.inner, self.name, self.spent = inner, inner.name, 0.0

    @property
    def context_window(self):
        return self.inner.context_window

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)

    def chat(self, messages, **kw):
        start = time.perf_counter()
        try:
            return self.inner.chat(messages, **kw)
        finally:
            self.spent += time.perf_counter() - start


def router_config(cheap, strong, breaker_ms=300):
    return load_config({
        "router": {
            "retrieval_bound": {"model": "coder", "endpoint": cheap.url + "/v1/chat/completions", "timeout_s": 0.15,
                                "context_window": 32768, "price_input_per_mtok": 0.2, "price_output_per_mtok": 0.6},
            "reasoning_bound": {"model": "claude", "endpoint": strong.url + "/v1/messages", "timeout_s": 0.15,
                                "context_window": 200000, "price_input_per_mtok": 3.0, "price_output_per_mtok": 15.0},
            "backoff_base_s": 0.005, "max_retries": 2, "breaker_fail_max": 3,
        },
        "validation": {"circuit_breaker_timeout_ms": breaker_ms},
        "telemetry": {"enable_task_classification_logging": False},
        # The raw lexical decision (no safe side), so both routes carry traffic.
        "classification": {"confidence_threshold": 0.0},
    })


def fault_run(n_calls: int, prompts: list[str]) -> None:
    with FaultServer(fault_rates=CHEAP_FAULTS, seed=1, retry_after=0.01, hang_s=0.3) as cheap, \
         FaultServer(fault_rates=STRONG_FAULTS, seed=2, retry_after=0.01, hang_s=0.3) as strong:
        cfg = router_config(cheap, strong)
        plain = build_router(cfg)
        timed = {k: Timed(b) for k, b in plain.backends.items()}
        router = build_router(cfg, telemetry=plain.telemetry, backends=timed)
        slept = [0.0]

        def sleep(s):
            slept[0] += s
            time.sleep(s)

        router._sleep = sleep
        paths, answered_by, failures = Counter(), Counter(), Counter()
        overhead = []
        start_all = time.perf_counter()
        for i in range(n_calls):
            msgs = [ChatMessage("user", prompts[i % len(prompts)])]
            before = sum(t.spent for t in timed.values()) + slept[0]
            t0 = time.perf_counter()
            try:
                r = router.chat(msgs, max_tokens=64)
            except Exception as exc:  # counted, not hidden: the table shows every failure
                failures[type(exc).__name__] += 1
                paths["failed"] += 1
            else:
                answered_by[r.backend] += 1
                if r.route["fallbacks"]:
                    paths["fallback (" + r.route["fallbacks"][-1]["reason"].split(":")[-1] + ")"] += 1
                elif r.route["retries"]:
                    paths["after retries"] += 1
                else:
                    paths["first try"] += 1
            wall = time.perf_counter() - t0
            inside = sum(t.spent for t in timed.values()) + slept[0] - before
            overhead.append(wall - inside)
        total = time.perf_counter() - start_all
    completed = n_calls - paths["failed"]
    print(f"\n## Fault run: {n_calls} calls, injected faults cheap={CHEAP_FAULTS} strong={STRONG_FAULTS}")
    print(f"completed {completed}/{n_calls} ({completed / n_calls:.1%}) in {total:.1f}s")
    print("| path | calls |\n|---|---|")
    for k, v in sorted(paths.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v} |")
    print(f"answered by: {dict(answered_by)}; failures: {dict(failures) or 'none'}")
    print(f"server faults served: cheap {dict(cheap.served)}, strong {dict(strong.served)}")
    for key, br in router.breakers.items():
        print(f"breaker {key}: {len(br.state_changes)} transitions, final {br.state.value}")
    t = router.telemetry
    cost = sum(t.value("lagoon_routing_backend_cost_usd_total", {"backend": k}) or 0 for k in router.backends)
    print(f"retries {sum(t.value('lagoon_routing_retries_total', {'backend': k}) or 0 for k in router.backends):.0f}, "
          f"cost ${cost:.6f}")
    us = sorted(o * 1e6 for o in overhead)
    print(f"router time outside backend calls and backoff: p50 {statistics.median(us):.0f} µs, "
          f"p95 {us[int(len(us) * 0.95)]:.0f} µs per call")


def overhead_run(n: int) -> None:
    with FaultServer() as cheap, FaultServer() as strong:
        cfg = router_config(cheap, strong)
        direct = build_backend(cfg.router.retrieval_bound)
        router = build_router(cfg)
        msgs = [ChatMessage("user", "fix the failing lint test in parser.py")]
        for _ in range(5):  # warm both paths
            direct.chat(msgs, max_tokens=16)
            router.chat(msgs, max_tokens=16)
        d, r = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            direct.chat(msgs, max_tokens=16)
            d.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            router.chat(msgs, max_tokens=16)
            r.append(time.perf_counter() - t0)
    # In process: a deterministic model with no I/O shows the router's own cost.
    inner = ScriptedChatModel.of(["ok"], repeat_last=True)
    local_router = build_router(cfg, backends={"retrieval_bound": ScriptedChatModel.of(["ok"], repeat_last=True),
                                               "reasoning_bound": ScriptedChatModel.of(["ok"], repeat_last=True)})
    di, ri = [], []
    for _ in range(n * 20):
        t0 = time.perf_counter()
        inner.chat(msgs)
        di.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        local_router.chat(msgs)
        ri.append(time.perf_counter() - t0)
    md, mr = statistics.median(d), statistics.median(r)
    mdi, mri = statistics.median(di), statistics.median(ri)
    print(f"\n## Overhead, fault-free (median; HTTP {n} calls each, in-process {n * 20})")
    print("| path | µs/call | ratio |\n|---|---|---|")
    print(f"| HTTP backend directly (reference) | {md * 1e6:.0f} | 1.00 |")
    print(f"| HTTP backend through the router | {mr * 1e6:.0f} | {mr / md:.2f} |")
    print(f"| in-process model directly (reference) | {mdi * 1e6:.0f} | 1.00 |")
    print(f"| in-process model through the router | {mri * 1e6:.0f} | {mri / mdi:.2f} |")
    print(f"router adds {(mri - mdi) * 1e6:.0f} µs per call (classify, context check, breaker, telemetry)")


def classifier_run(embeddings: bool) -> None:
    rows = load_rows(DATA)
    print(f"\n## Classifier on {DATA.name} ({len(rows)} rows; labels by task scope/spec, see examples/routing/README.md)")
    print("| split | features | n test | learned | lexical | learned+safe side | lexical+safe side |")
    print("|---|---|---|---|---|---|---|")
    variants = [(False, "tfidf+lexical+context")] + ([(True, "+ MiniLM")] if embeddings else [])
    for emb, label in variants:
        for holdout_rows, split in ((rows, "held-out templates"), ([r.__class__(r.prompt, r.label, r.context_size) for r in rows], "random rows")):
            rep = compare_on_holdout(holdout_rows, embeddings=emb, seed=0)
            print(f"| {split} | {label} | {rep['n_test']} | {rep['learned_accuracy']:.3f} | {rep['lexical_accuracy']:.3f} "
                  f"| {rep['learned_accuracy_with_safe_side']:.3f} | {rep['lexical_accuracy_with_safe_side']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls, no embeddings")
    ap.add_argument("--calls", type=int, default=240)
    ap.add_argument("--embeddings", action="store_true", help="also fit with MiniLM embeddings (slow to load)")
    args = ap.parse_args()
    logging.getLogger("lagoon").setLevel(logging.ERROR)  # breaker transitions are counted in the table
    calls = 200 if args.quick else args.calls
    prompts = [r.prompt for r in load_rows(DATA)]
    random.Random(0).shuffle(prompts)
    fault_run(calls, prompts)
    overhead_run(30 if args.quick else 100)
    classifier_run(args.embeddings and embeddings_available() and not args.quick)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
