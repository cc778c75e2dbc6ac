"""The lexical classifier: the seed's rule, word-start matching, safe side, the registry."""

import pytest

from lagoon.config import ClassificationSection
from lagoon.errors import ConfigError
from lagoon.protocols import TaskType
from lagoon.routing.classify import LexicalClassifier, apply_safe_side, build_classifier


def seed_rule(prompt, context_size, reasoning, retrieval, threshold=15000):
    """Seed 001's TaskClassifier, transcribed (substring match)."""
    low = prompt.lower()
    r = len([k for k in reasoning if k in low])
    t = len([k for k in retrieval if k in low])
    is_reasoning = r > t or context_size > threshold
    return ("REASONING_BOUND" if is_reasoning else "RETRIEVAL_BOUND"), min(abs(r - t) / (r + t + 1), 0.95)


@pytest.mark.parametrize(
    "prompt,ctx",
    [
        ("Fix the failing test in parser.py", 0),
        ("Refactor the module architecture and its design", 0),
        ("Design a caching layer; optimize the hot path and fix the lint", 0),
        ("Extract the helper and format the file", 20000),
        ("explain this", 0),
        ("Architect, design, refactor, optimize, synthesize everything", 0),
    ],
)
def test_lexical_matches_the_seed_when_no_keyword_hides_inside_a_word(prompt, ctx):
    cfg = ClassificationSection()
    c = LexicalClassifier(cfg).classify(prompt, ctx)
    kind, conf = seed_rule(prompt, ctx, cfg.reasoning_keywords, cfg.retrieval_keywords)
    assert c.type.value == kind and c.confidence == pytest.approx(conf)


def test_word_start_matching_differs_from_the_seed_on_substrings():
    clf = LexicalClassifier()
    # The seed counts "prefix" as "fix" and "latest" as "test"; word-start matching does not.
    assert clf.hits("update the prefix to the latest value") == ([], [])
    assert seed_rule("update the prefix to the latest value", 0, ["design"], ["fix", "test"])[1] == pytest.approx(2 / 3)
    assert clf.hits("fixes, fixing, fix_parser, testCase, extractMethod") == ([], ["fix", "test", "extract"])
    assert clf.hits("redesign the page") == ([], [])


def test_confidence_is_capped_and_context_size_forces_reasoning():
    clf = LexicalClassifier(ClassificationSection(reasoning_keywords=[f"k{i}" for i in range(60)]))
    c = clf.classify(" ".join(f"k{i}" for i in range(60)))
    assert c.confidence == 0.95 and c.type is TaskType.REASONING_BOUND
    c = LexicalClassifier().classify("fix the lint", context_size=15001)
    assert c.type is TaskType.REASONING_BOUND and c.decided_by == "lexical:context_size"
    c = LexicalClassifier(ClassificationSection(context_size_threshold=20000)).classify("fix the lint", 15001)
    assert c.type is TaskType.RETRIEVAL_BOUND and c.decided_by == "lexical:keywords"


def test_keyword_lists_come_from_config():
    c = LexicalClassifier(ClassificationSection(reasoning_keywords=["migrate"], retrieval_keywords=[])).classify(
        "migrate the schema"
    )
    assert c.type is TaskType.REASONING_BOUND and c.confidence == pytest.approx(0.5)


def test_safe_side_applies_below_the_confidence_threshold():
    cfg = ClassificationSection()
    low = LexicalClassifier(cfg).classify("fix it")  # one hit → confidence 0.5 < 0.65
    assert low.type is TaskType.RETRIEVAL_BOUND
    routed = apply_safe_side(low, cfg)
    assert routed.type is TaskType.REASONING_BOUND and routed.decided_by == "safe_side(lexical:keywords)"
    lenient = ClassificationSection(confidence_threshold=0.4)
    assert apply_safe_side(low, lenient).type is TaskType.RETRIEVAL_BOUND
    other = ClassificationSection(safe_side="RETRIEVAL_BOUND")
    assert apply_safe_side(LexicalClassifier(other).classify("design it"), other).type is TaskType.RETRIEVAL_BOUND


def test_registry_names_and_errors():
    assert isinstance(build_classifier(ClassificationSection()), LexicalClassifier)
    with pytest.raises(ConfigError, match="model_path"):
        build_classifier(ClassificationSection(classifier="learned"))
