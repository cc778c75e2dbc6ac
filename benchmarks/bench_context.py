"""Benchmark Lagoon's code index on the Python standard library of this interpreter.

    .venv/bin/python benchmarks/bench_context.py [--quick] [--queries 200] [--rerank-queries 100]

The corpus is every `.py` file of the stdlib (site-packages left out) with docstrings blanked out in
place (line numbers kept), copied to a temp folder. Queries are the first lines of those docstrings
(≥ 4 words), sampled with seed 0; a query is answered at rank k when one of the top-k chunks
overlaps the documented function's lines. Measured in one process: cold build (time, CPU time here
and in the parse workers, peak RSS), no-op update, one-file update (10 random files, each edited,
updated, restored, updated: the index keeps delta segments), query latency p50/p99 for Lagoon and for `rank-bm25` (BM25Okapi over
the same chunks and tokens; the reference), and recall@1/@5 for BM25 alone and BM25 + MiniLM rerank.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import resource
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from lagoon.config import ContextSection
from lagoon.context.index import CodeIndex
from lagoon.context.retriever import CodeRetriever
from lagoon.context.tokens import code_tokens


def strip_docstrings(text: str) -> tuple[str, list[tuple[str, int, int]]]:
    """Blank out docstrings (keeping line numbers); return (text, [(first line, start, end) per function])."""
    tree = ast.parse(text)
    lines = text.split("\n")
    targets, spans = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            continue
        body = node.body
        if not body or not isinstance(body[0], ast.Expr) or not isinstance(body[0].value, ast.Constant):
            continue
        if not isinstance(body[0].value.value, str):
            continue
        doc = body[0].value
        spans.append((doc.lineno, doc.col_offset, doc.end_lineno, doc.end_col_offset))
        first = body[0].value.value.strip().split("\n")[0].strip()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and len(first.split()) >= 4:
            targets.append((first, node.lineno, node.end_lineno))
    for a, ac, b, bc in sorted(spans, reverse=True):
        head, tail = lines[a - 1][:ac], lines[b - 1][bc:]
        lines[a - 1 : b] = [head + "..." + tail] + [""] * (b - a)
    return "\n".join(lines), targets


def build_corpus(src: Path, dst: Path, limit: int | None) -> list[tuple[str, str, int, int]]:
    files = sorted(p for p in src.rglob("*.py") if "site-packages" not in p.parts)
    if limit:
        files = files[:limit]
    queries = []
    for p in files:
        rel = p.relative_to(src).as_posix()
        text = p.read_text(encoding="utf-8", errors="replace")
        try:
            text, targets = strip_docstrings(text)
        except (SyntaxError, ValueError, RecursionError):
            targets = []
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        queries.extend((q, rel, a, b) for q, a, b in targets)
    return queries


def _cpu() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its finished children (parse workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def recall(ranked_lists, queries, ks=(1, 5)) -> dict[int, float]:
    out = {}
    for k in ks:
        hit = 0
        for chunks, (_, path, a, b) in zip(ranked_lists, queries, strict=True):
            hit += any(c.path == path and c.start_line <= b and c.end_line >= a for c in chunks[:k])
        out[k] = hit / max(1, len(queries))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 files, 60 queries, 10 reranked")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rerank-queries", type=int, default=30)
    ap.add_argument("--reference-queries", type=int, default=30, help="queries timed on rank-bm25")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = ap.parse_args()
    limit = 300 if args.quick else None
    if args.quick:
        args.queries, args.rerank_queries, args.reference_queries = 60, 10, 15

    work = Path(tempfile.mkdtemp(prefix="lagoon-bench-context-"))
    try:
        queries = build_corpus(args.stdlib, work / "repo", limit)
        repo = work / "repo"
        size_mb = sum(p.stat().st_size for p in repo.rglob("*.py")) / 1e6
        random.Random(0).shuffle(queries)
        queries = queries[: args.queries]
        cfg = ContextSection(rerank=False)

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu0 = _cpu()
        t0 = time.perf_counter()
        ix = CodeIndex(repo, cfg)
        stats = ix.update()
        cold = time.perf_counter() - t0
        cpu_self, cpu_workers = (b - a for a, b in zip(cpu0, _cpu(), strict=True))
        rss_peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024

        noop = statistics.median(ix.update().seconds for _ in range(3))
        one, segments = [], 1
        for rel in random.Random(1).sample(sorted(ix.files), min(10, len(ix.files))):
            p = repo / rel
            original = p.read_text()
            p.write_text(original + "\ndef edited_by_the_benchmark():\n    return 1\n")
            st = ix.update()
            one.append(st.seconds)
            segments = max(segments, st.segments)
            p.write_text(original)
            ix.update()
        one_file = statistics.median(one)
        t0 = time.perf_counter()
        CodeIndex(repo, cfg)._load()
        load_s = time.perf_counter() - t0

        lat, bm25_lists = [], []
        for q, *_ in queries:
            t0 = time.perf_counter()
            hits = ix.search(q, 10)
            lat.append(time.perf_counter() - t0)
            bm25_lists.append([h.chunk for h in hits])

        from rank_bm25 import BM25Okapi

        corpus = [code_tokens(f"{c.path}\n{c.symbol or ''}\n{c.header}\n{c.text}") for c in ix.chunks]
        t0 = time.perf_counter()
        ref = BM25Okapi(corpus)
        ref_build = time.perf_counter() - t0
        ref_lat = []
        for q, *_ in queries[: args.reference_queries]:
            t0 = time.perf_counter()
            scores = ref.get_scores(code_tokens(q))
            np.argpartition(-scores, 10)[:10]
            ref_lat.append(time.perf_counter() - t0)

        r_bm25 = recall(bm25_lists, queries)
        rerank_row = None
        if args.rerank_queries:
            from lagoon.context.rerank import reranker_available

            if reranker_available():
                sub = queries[: args.rerank_queries]
                rr = CodeRetriever(repo, cfg.model_copy(update={"rerank": True}), index=ix, auto_update=False)
                t0 = time.perf_counter()
                rr_lists = [[h.chunk for h in rr.candidates(q)] for q, *_ in sub]
                rr_s = (time.perf_counter() - t0) / len(sub)
                rerank_row = (len(sub), recall(bm25_lists[: len(sub)], sub), recall(rr_lists, sub), rr_s)

        print(
            f"\ncorpus: {len(ix.files)} stdlib .py files, {size_mb:.1f} MB, {stats.chunks} chunks, "
            f"{len(queries)} queries; {os.cpu_count()} CPUs (load avg {os.getloadavg()[0]:.1f})\n"
        )
        print("| measure | Lagoon | rank-bm25 (reference) | ratio |")
        print("|---|---|---|---|")
        print(
            f"| cold build | {cold:.2f} s (CPU: {cpu_self:.1f} s here + {cpu_workers:.1f} s in workers; "
            f"peak RSS +{rss_peak_mb:.0f} MB) | index only: {ref_build:.2f} s | — |"
        )
        print(f"| no-op update | {noop * 1000:.0f} ms | — | — |")
        print(
            f"| one-file update (median of {len(one)}, max {max(one) * 1000:.0f} ms, "
            f"≤ {segments} segments) | {one_file * 1000:.0f} ms | — | — |"
        )
        print(f"| load from disk | {load_s:.2f} s | — | — |")
        p50, p99, rp50, rp99 = pct(lat, 50), pct(lat, 99), pct(ref_lat, 50), pct(ref_lat, 99)
        print(
            f"| query p50 (incl. tokenizing) | {p50 * 1000:.2f} ms | {rp50 * 1000:.1f} ms | {rp50 / p50:.0f}x |"
        )
        print(f"| query p99 | {p99 * 1000:.2f} ms | {rp99 * 1000:.1f} ms | {rp99 / p99:.0f}x |")
        print(f"\n| retrieval ({len(queries)} queries) | recall@1 | recall@5 |")
        print("|---|---|---|")
        print(f"| BM25 | {r_bm25[1]:.3f} | {r_bm25[5]:.3f} |")
        if rerank_row:
            n, base, rr, per_q = rerank_row
            print(f"| BM25, first {n} queries | {base[1]:.3f} | {base[5]:.3f} |")
            print(f"| BM25 + MiniLM rerank, same {n} ({per_q:.2f} s/query) | {rr[1]:.3f} | {rr[5]:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
