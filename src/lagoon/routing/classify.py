"""Task classifiers: is a coding task retrieval-bound (the cheap open-weight model will do) or
reasoning-bound (send it to the strong model)?

Registry (`classification.classifier`):

    lexical  → LexicalClassifier   seed 001's keyword rule
    learned  → lagoon.routing.learned.LearnedClassifier   a fitted logistic regression

**lexical** is the seed's rule: r = how many `reasoning_keywords` occur, l = how many
`retrieval_keywords` occur (each keyword counts once, as the seed's `filter(includes)` does); the
task is reasoning-bound when r > l or the context exceeds `context_size_threshold`; confidence is
|r − l| / (r + l + 1), capped at 0.95. One deliberate difference: a keyword matches only at the
*start of a word* (after a character that is not a lowercase letter or digit, so `_`, `-`, `.`
and camelCase humps count as word starts). The seed's substring match counts "prefix" as "fix",
"latest"/"contest" as "test" and "redesign" as "design"; here `fix` matches "fix", "fixes",
"fixing", "fix_parser" but not "prefix"; `design` does not match "redesign".

`apply_safe_side` is the router's policy on top of any classifier: below `confidence_threshold`
the task goes to `safe_side` (default REASONING_BOUND), and `decided_by` says so.

This module is *not* a router: it never calls a model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lagoon.config import ClassificationSection
from lagoon.errors import ConfigError
from lagoon.protocols import Classification, Classifier, TaskType
from lagoon.registry import Registry

__all__ = [
    "CLASSIFIERS",
    "LexicalClassifier",
    "apply_safe_side",
    "build_classifier",
    "keyword_hits",
]

CLASSIFIERS: Registry[Any] = Registry("classifier", {
    "lexical": "lagoon.routing.classify:LexicalClassifier",
    "learned": "lagoon.routing.learned:LearnedClassifier",
}, where="classification.classifier")

REASONING_CAPABILITIES = ("synthesis", "cross_module_reasoning")
RETRIEVAL_CAPABILITIES = ("pattern_matching", "local_transformation")
_CONFIDENCE_CAP = 0.95


def _word_start_pattern(keywords: Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    return [(k, re.compile(r"(?<![a-z0-9])" + re.escape(k.lower()))) for k in keywords if k.strip()]


def _camel_aware_lower(text: str) -> str:
    # "extractMethod" → "extract method": a camelCase hump starts a word.
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text).lower()


def keyword_hits(text: str, patterns: Sequence[tuple[str, re.Pattern[str]]]) -> list[str]:
    """The keywords (each once) that occur at the start of a word in `text`."""
    lowered = _camel_aware_lower(text)
    return [k for k, p in patterns if p.search(lowered)]


class LexicalClassifier:
    """Seed 001's keyword rule with word-start matching (see the module docstring)."""

    name = "lexical"

    def __init__(self, config: ClassificationSection | None = None) -> None:
        self.config = config or ClassificationSection()
        self._reasoning = _word_start_pattern(self.config.reasoning_keywords)
        self._retrieval = _word_start_pattern(self.config.retrieval_keywords)

    def hits(self, prompt: str) -> tuple[list[str], list[str]]:
        """(reasoning keywords found, retrieval keywords found)."""
        return keyword_hits(prompt, self._reasoning), keyword_hits(prompt, self._retrieval)

    def classify(self, prompt: str, context_size: int = 0) -> Classification:
        reasoning, retrieval = self.hits(prompt)
        r, t = len(reasoning), len(retrieval)  # the seed's reasoningScore, retrievalScore
        by_context = context_size > self.config.context_size_threshold
        is_reasoning = r > t or by_context
        confidence = min(abs(r - t) / (r + t + 1), _CONFIDENCE_CAP)
        return Classification(
            type=TaskType.REASONING_BOUND if is_reasoning else TaskType.RETRIEVAL_BOUND,
            confidence=confidence,
            required_capabilities=REASONING_CAPABILITIES if is_reasoning else RETRIEVAL_CAPABILITIES,
            decided_by="lexical:context_size" if by_context and r <= t else "lexical:keywords",
        )


def apply_safe_side(c: Classification, config: ClassificationSection) -> Classification:
    """Send a low-confidence classification to `config.safe_side` (the router's policy)."""
    if c.confidence >= config.confidence_threshold:
        return c
    side = TaskType(config.safe_side)
    caps = REASONING_CAPABILITIES if side is TaskType.REASONING_BOUND else RETRIEVAL_CAPABILITIES
    return replace(c, type=side, required_capabilities=caps, decided_by=f"safe_side({c.decided_by})")


def build_classifier(config: ClassificationSection) -> Classifier:
    """The classifier `config.classifier` names (a learned one is loaded from `config.model_path`)."""
    CLASSIFIERS.check(config.classifier)
    if config.classifier == "learned" and not config.model_path:
        raise ConfigError(
            "classification.model_path is not set but classification.classifier is 'learned'; "
            "fit one with `lagoon router fit DATA.jsonl -o router.joblib` and set model_path to it"
        )
    cls = CLASSIFIERS.load(config.classifier)
    if config.classifier == "learned":
        return cls.load(config.model_path, config=config)
    return cls(config)
