"""MoE block speed vs transformers (eager and grouped_mm) and the cost of runtime balancing.

    .venv/bin/python benchmarks/bench_moe.py [--quick] [--threads N]

Prints two tables (see `lagoon.moe.benchmark` for what each column means). `--quick` runs the first
two shapes, 1 and 128 tokens, with fewer repetitions. Same as `lagoon moe bench`.
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
    args = ap.parse_args(argv)
    run(quick=args.quick, threads=args.threads, echo=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
