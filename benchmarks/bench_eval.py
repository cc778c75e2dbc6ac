"""Benchmark the eval harness: sandbox overhead, parallel workers, and resume.

    .venv/bin/python benchmarks/bench_eval.py [--quick] [--commands 40] [--workers 2]

Measured in one process, each against a reference run in the same process:

- command overhead: `Sandbox.execute` under bubblewrap (fresh mount namespace, no network) against
  the plain temporary-folder mode of the same class (the reference), p50 / p95 over `--commands`
  runs of `true`.
- suite wall time: the oracle over a subset of the starter suite with `--workers` processes against
  one in-process worker (the reference). On a machine with few free cores the ratio stays near 1.
- resume: re-running a finished run folder (every trial found in results.jsonl, nothing re-runs)
  against the full run (the reference).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lagoon.config import load_config
from lagoon.eval import Sandbox, bwrap_available, run_suite

ROOT = Path(__file__).resolve().parents[1]
STARTER = ROOT / "examples" / "suites" / "starter"
SUBSET = ["js-slugify", "js-matrix", "js-lru-cache", "rust-brackets", "sh-checksums", "minicalc__clamp-2"]


def _times(sandbox: Sandbox, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        result = sandbox.execute("true")
        out.append((time.perf_counter() - start) * 1000.0)
        assert result.exit_code == 0, result.output
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer commands and tasks")
    ap.add_argument("--commands", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    n = 10 if args.quick else args.commands
    subset = SUBSET[:3] if args.quick else SUBSET
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        plain = _times(Sandbox(ws, mode="none"), n)
        if bwrap_available():
            boxed = _times(Sandbox(ws, mode="bwrap"), n)
            rows.append(("command p50 (ms)", "bwrap vs plain", statistics.median(boxed), statistics.median(plain)))
            rows.append(("command p95 (ms)", "bwrap vs plain", _pct(boxed, 95), _pct(plain, 95)))
        else:
            print("bubblewrap not installed: sandbox overhead not measured")

        cfg = load_config()
        start = time.perf_counter()
        serial = run_suite(STARTER, "oracle", cfg, Path(tmp) / "serial", workers=1, only=subset)
        t_serial = time.perf_counter() - start
        start = time.perf_counter()
        parallel = run_suite(STARTER, "oracle", cfg, Path(tmp) / "parallel", workers=args.workers, only=subset)
        t_parallel = time.perf_counter() - start
        assert all(r.passed for r in serial.results + parallel.results)
        rows.append((f"suite wall (s), {len(subset)} tasks", f"{args.workers} workers vs 1", t_parallel, t_serial))

        start = time.perf_counter()
        resumed = run_suite(STARTER, "oracle", cfg, Path(tmp) / "serial", workers=1, only=subset)
        t_resume = time.perf_counter() - start
        assert resumed.resumed == len(subset)
        rows.append(("resume a finished run (s)", "resume vs full run", t_resume, t_serial))

    print(f"{'measure':<30} {'comparison':<22} {'value':>10} {'reference':>10} {'ratio':>8}")
    for name, comparison, value, reference in rows:
        ratio = value / reference if reference else float("nan")
        print(f"{name:<30} {comparison:<22} {value:>10.3f} {reference:>10.3f} {ratio:>8.3f}")


if __name__ == "__main__":
    main()
