"""File-level bug localization on SWE-bench Lite issues: Lagoon's retriever vs whole-file BM25.

    .venv/bin/python benchmarks/bench_localization.py [--limit 30] [--repos django/django,pallets/flask]
        [--rerank] [--cached-only] [--data PATH] [--cache ~/.cache/lagoon/sdists]

For each instance of `swebench-lite-localization.jsonl` (see its README), the project's code comes
from the release's sdist on PyPI (`pip download --no-deps --no-binary :all: NAME==VERSION`, cached
with its extracted tree under --cache). The issue text is the query. Rankers, in one process:

- whole-file BM25 (the reference, as in the SWE-bench paper): bm25s over every `.py` file's text,
  bm25s's default tokenizer with English stop words; also with test files left out;
- Lagoon BM25, file = best chunk: `CodeIndex` over the sdist (its default file selection), BM25's
  top chunks aggregated to `.py` files by their best chunk (the previous aggregation);
- Lagoon `CodeRetriever.files` (BM25): the retriever's file ranking (decayed sum of a file's chunk
  scores), and the same with files the issue names boosted;
- the same with MiniLM reranking BM25's top chunks first (with --rerank);
- Lagoon `CodeRetriever.files` on the evidence-grown query the agent's gate uses
  (`lagoon.context.evidence.Evidence`): the issue text read as tool output — traceback frames mapped
  onto the sdist's files (innermost first, code before tests) and exception lines — appended to the
  issue (all frames, and the default: the innermost code frame only). The data holds no test run,
  so the failing-test part of the evidence is not exercised; the rows with a traceback in the issue
  are also reported on their own. Measured (157 instances of django, flask, requests, pylint,
  pytest, sphinx; 2-core Xeon, AVX512-VNNI/BF16): issue text 0.605 / 0.860 / 0.892 at @1/@5/@10,
  evidence (all frames) 0.586 / 0.841 / 0.885, innermost frame 0.592 / 0.847 / 0.885; on the 28 with
  a traceback, 0.393 / 0.786 / 0.786 for both the issue alone and the innermost frame.

Every Lagoon ranker leaves test files out (the gold file is never a test). Sdists that cannot be
fetched are listed at the end with the reason.

Reported: file-level recall@1/@5/@10 (each instance has exactly one gold file).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import bm25s

from lagoon.config import ContextSection
from lagoon.context.evidence import Evidence
from lagoon.context.index import CodeIndex, Hit
from lagoon.context.retriever import FILE_POOL, CodeRetriever, is_test_path, rank_files

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "swebench-lite-localization.jsonl"
KS = (1, 5, 10)


def fetch_sdist(name: str, version: str, cache: Path) -> Path:
    """The extracted sdist folder's parent (downloaded once, then reused)."""
    out = cache / "extracted" / f"{name}-{version}"
    if out.is_dir() and any(out.iterdir()):
        return out
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    archives = [p for p in dl.iterdir() if _matches(p.name, name, version)]
    if not archives:
        base = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dl),
            "-q",
        ]
        spec = f"{name}=={version}"
        r = subprocess.run([*base, spec], capture_output=True, text=True)
        if r.returncode != 0:
            r = subprocess.run([*base, "--no-build-isolation", spec], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip download {spec} failed: {r.stderr.strip()[-400:]}")
        archives = [p for p in dl.iterdir() if _matches(p.name, name, version)]
    if not archives:
        raise RuntimeError(f"no sdist archive for {name}=={version} in {dl}")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    arc = archives[0]
    if arc.name.endswith(".zip"):
        with zipfile.ZipFile(arc) as z:
            z.extractall(tmp)
    else:
        with tarfile.open(arc) as t:
            t.extractall(tmp, filter="data")
    tmp.rename(out)
    return out


def _matches(filename: str, name: str, version: str) -> bool:
    norm = filename.lower().replace("_", "-")
    return norm.startswith(f"{name.lower().replace('_', '-')}-{version}.") and norm.endswith(
        (".tar.gz", ".zip")
    )


class WholeFileBM25:
    def __init__(self, root: Path) -> None:
        self.paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
        texts = [(root / p).read_text(encoding="utf-8", errors="replace") for p in self.paths]
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def rank(self, query: str, k: int) -> list[str]:
        q = bm25s.tokenize([query], stopwords="en", show_progress=False)
        docs, _ = self.bm25.retrieve(q, k=min(k, len(self.paths)), show_progress=False)
        return [self.paths[i] for i in docs[0]]


def files_by_best_chunk(hits: list[Hit], k: int) -> list[str]:
    """The previous aggregation, kept for comparison: a file scores its best chunk."""
    best: dict[str, float] = {}
    for h in hits:
        if h.chunk.path.endswith(".py") and not is_test_path(h.chunk.path):
            best[h.chunk.path] = max(best.get(h.chunk.path, float("-inf")), h.score)
    return sorted(best, key=best.__getitem__, reverse=True)[:k]


def reranked_files(rr: CodeRetriever, query: str, pool: list[Hit], k: int) -> list[str]:
    """MiniLM reranks BM25's top `lexical_candidates` chunks; their fused scores (in [0, 1]) are put
    on BM25's scale (times the top BM25 score), the rest of the pool keeps its BM25 scores, then
    files are ranked as `CodeRetriever.files` does."""
    n = rr.config.lexical_candidates
    head = rr.reranker.rerank(query, pool[:n]) if rr.reranker and len(pool) > 1 else pool[:n]
    top = pool[0].score if pool else 1.0
    hits = [Hit(h.chunk, top * h.score) for h in head] + pool[n:]
    return [f.path for f in rank_files(hits, k, query=query, suffixes=(".py",))]


_POOLS: dict[str, list[Hit]] = {}


def pool_of(ix: CodeIndex, query: str) -> list[Hit]:
    """BM25's file pool for `query` (the issue text alone: searched once per instance)."""
    if query not in _POOLS:
        _POOLS.clear()
        _POOLS[query] = ix.search(query, FILE_POOL)
    return _POOLS[query]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lagoon" / "sdists")
    ap.add_argument("--limit", type=int, default=None, help="instances sampled at random (seed 0)")
    ap.add_argument("--repos", default="", help="comma-separated repos (e.g. pallets/flask,psf/requests)")
    ap.add_argument("--rerank", action="store_true", help="also run BM25 + MiniLM rerank (slow on CPU)")
    ap.add_argument("--quick", action="store_true", help="same as --limit 10")
    ap.add_argument(
        "--cached-only", action="store_true", help="only instances whose sdist is already in --cache"
    )
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.repos:
        wanted = {r.strip() for r in args.repos.split(",") if r.strip()}
        rows = [r for r in rows if r["repo"] in wanted]
    if args.cached_only:
        rows = [
            r for r in rows if (args.cache / "extracted" / f"{r['pypi_name']}-{r['pypi_version']}").is_dir()
        ]
    limit = 10 if args.quick and args.limit is None else args.limit
    if limit is not None and limit < len(rows):
        rows = random.Random(0).sample(rows, limit)
    rows.sort(key=lambda r: (r["pypi_name"], r["pypi_version"], r["instance_id"]))

    methods = [
        "whole-file BM25 (reference)",
        "whole-file BM25, tests left out",
        "Lagoon BM25, file = best chunk",
        "Lagoon CodeRetriever.files (BM25)",
        "Lagoon files, named files boosted ×1.5",
        "Lagoon files, evidence-grown query",
        "Lagoon files, evidence, innermost code frame only",
    ]
    if args.rerank:
        methods.append("Lagoon files, BM25 + MiniLM rerank")
    evidence_m = methods[5]
    inner_m = methods[6]
    main_methods = [methods[0], methods[3], evidence_m, inner_m] + ([methods[7]] if args.rerank else [])
    traced = {m: {k: 0 for k in KS} for m in (methods[3], evidence_m, inner_m)}
    n_traced = 0
    hits_at = {m: {k: 0 for k in KS} for m in methods}
    per_repo: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0] * len(KS)))
    n_repo: dict[str, int] = defaultdict(int)
    skipped, done, t_start = [], 0, time.perf_counter()
    cfg = ContextSection(rerank=False)
    current = None
    for row in rows:
        key = (row["pypi_name"], row["pypi_version"])
        try:
            if current is None or current[0] != key:
                base = fetch_sdist(*key, args.cache)
                root = base / row["sdist_root"]
                t0 = time.perf_counter()
                ix = CodeIndex(root, cfg)
                st = ix.update()
                print(
                    f"  {key[0]} {key[1]}: {st.files} files, {st.chunks} chunks, "
                    f"index {time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                )
                ref = WholeFileBM25(root)
                rr = CodeRetriever(root, cfg.model_copy(update={"rerank": True}), index=ix, auto_update=False)
                repo_files = frozenset(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
                current = (key, ix, ref, rr, repo_files)
        except (RuntimeError, OSError) as exc:
            skipped.append((row["instance_id"], str(exc)[:200]))
            continue
        _, ix, ref, rr, repo_files = current
        query = row["problem_statement"]
        evidence = Evidence(root=None, files=repo_files)
        evidence.observe_output("", query, None)
        grown = evidence.query(query)
        epool = ix.search(grown, FILE_POOL) if grown != query else pool_of(ix, query)
        evidence.max_frames = 1
        inner = evidence.query(query)
        ipool = ix.search(inner, FILE_POOL) if inner != query else pool_of(ix, query)
        gold = set(row["gold_files"])
        pool = pool_of(ix, query)
        top = max(KS)
        ranked = {
            methods[0]: ref.rank(query, top),
            methods[1]: [p for p in ref.rank(query, 200) if not is_test_path(p)][:top],
            methods[2]: files_by_best_chunk(pool, top),
            methods[3]: [f.path for f in rank_files(pool, top, query=query, suffixes=(".py",))],
            methods[4]: [
                f.path for f in rank_files(pool, top, query=query, suffixes=(".py",), path_boost=0.5)
            ],
        }
        ranked[evidence_m] = [f.path for f in rank_files(epool, top, query=grown, suffixes=(".py",))]
        ranked[inner_m] = [f.path for f in rank_files(ipool, top, query=inner, suffixes=(".py",))]
        if args.rerank:
            ranked[methods[7]] = reranked_files(rr, query, pool, top)
        if evidence.frames:
            n_traced += 1
            for m in traced:
                for k in KS:
                    traced[m][k] += bool(gold & set(ranked[m][:k]))
        n_repo[row["repo"]] += 1
        for m, files in ranked.items():
            for i, k in enumerate(KS):
                got = bool(gold & set(files[:k]))
                hits_at[m][k] += got
                per_repo[row["repo"]][m][i] += got
        done += 1

    print(
        f"\n{done} instances over {len(n_repo)} repos ({len(skipped)} skipped) in "
        f"{time.perf_counter() - t_start:.0f} s\n"
    )
    print("| ranker | recall@1 | recall@5 | recall@10 |")
    print("|---|---|---|---|")
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{hits_at[m][k] / max(1, done):.3f}" for k in KS) + " |")
    print(f"\n{n_traced} issues hold a traceback into the project; on those alone:\n")
    print("| ranker | recall@1 | recall@5 | recall@10 |")
    print("|---|---|---|---|")
    for m in traced:
        print(f"| {m} | " + " | ".join(f"{traced[m][k] / max(1, n_traced):.3f}" for k in KS) + " |")
    print("\nrecall@1 / @5 / @10 per repository:\n")
    print("| repo | n | " + " | ".join(main_methods) + " |")
    print("|---|---|" + "---|" * len(main_methods))
    for repo in sorted(n_repo):
        n = n_repo[repo]
        cells = [" / ".join(f"{h / n:.2f}" for h in per_repo[repo][m]) for m in main_methods]
        print(f"| {repo} | {n} | " + " | ".join(cells) + " |")
    for iid, why in skipped:
        print(f"skipped {iid}: {why}")


if __name__ == "__main__":
    main()
