"""Held-out comparison of the learned classifier with the lexical rule (used by `lagoon router
fit` and `benchmarks/bench_routing.py`).

Rows that share a group (a template, a repository) stay on one side of the split, so the learned
model is scored on kinds of task it has not seen; rows without groups are split at random.
Accuracy is of the raw decision (before the router's safe side), plus the share each sends to the
strong model. This module is *not* a training loop; it calls `LearnedClassifier.fit` once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lagoon.config import ClassificationSection
from lagoon.protocols import TaskType
from lagoon.routing.classify import LexicalClassifier, apply_safe_side
from lagoon.routing.learned import LabelledPrompt, LearnedClassifier

__all__ = ["split_rows", "compare_on_holdout"]


def split_rows(rows: Sequence[LabelledPrompt], holdout: float, seed: int = 0) -> tuple[list, list, str]:
    """(train, test, kind): by group when every row has one, else by row."""
    rng = random.Random(seed)
    if all(r.group for r in rows):
        groups = sorted({r.group for r in rows})
        rng.shuffle(groups)
        held = set(groups[: max(1, round(len(groups) * holdout))])
        return [r for r in rows if r.group not in held], [r for r in rows if r.group in held], "group"
    shuffled = list(rows)
    rng.shuffle(shuffled)
    n = max(1, round(len(shuffled) * holdout))
    return shuffled[n:], shuffled[:n], "random"


def _acc(pred: Sequence[TaskType], rows: Sequence[LabelledPrompt]) -> float:
    return sum(p is r.label for p, r in zip(pred, rows, strict=True)) / len(rows)


def _strong(pred: Sequence[TaskType]) -> float:
    return sum(p is TaskType.REASONING_BOUND for p in pred) / len(pred)


def compare_on_holdout(
    rows: Sequence[LabelledPrompt],
    config: ClassificationSection | None = None,
    *,
    holdout: float = 0.25,
    seed: int = 0,
    embeddings: bool = False,
    target_strong_share: float | None = None,
) -> dict[str, Any]:
    config = config or ClassificationSection()
    train, test, kind = split_rows(rows, holdout, seed)
    model = LearnedClassifier.fit(train, config, embeddings=embeddings, seed=seed, target_strong_share=target_strong_share)
    prompts, sizes = [r.prompt for r in test], [r.context_size for r in test]
    learned = model.predict(prompts, sizes)
    lex = LexicalClassifier(config)
    lex_raw = [lex.classify(p, s) for p, s in zip(prompts, sizes, strict=True)]
    learned_policy = [apply_safe_side(model.classify(p, s), config).type for p, s in zip(prompts, sizes, strict=True)]
    lexical_policy = [apply_safe_side(c, config).type for c in lex_raw]
    return {
        "split": kind,
        "n_train": len(train),
        "n_test": len(test),
        "embeddings": embeddings,
        "learned_accuracy": _acc(learned, test),
        "lexical_accuracy": _acc([c.type for c in lex_raw], test),
        "learned_accuracy_with_safe_side": _acc(learned_policy, test),
        "lexical_accuracy_with_safe_side": _acc(lexical_policy, test),
        "learned_strong_share": _strong(learned),
        "lexical_strong_share": _strong([c.type for c in lex_raw]),
        "true_strong_share": _strong([r.label for r in test]),
        "model_id": model.meta["model_id"],
    }
