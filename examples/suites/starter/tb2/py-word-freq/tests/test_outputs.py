import importlib.util


def load():
    spec = importlib.util.spec_from_file_location("wordfreq", "/app/wordfreq.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.top_words


def test_counts_and_ties():
    top = load()
    text = "The cat and the hat. The cat's hat! And a bat."
    assert top(text, 3) == [("the", 3), ("and", 2), ("hat", 2)]


def test_k_larger_than_vocabulary():
    assert load()("b a b", 10) == [("b", 2), ("a", 1)]
