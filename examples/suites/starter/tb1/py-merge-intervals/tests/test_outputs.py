import importlib.util
import random


def load():
    spec = importlib.util.spec_from_file_location("intervals", "/app/intervals.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.merge


def brute(intervals):
    covered = set()
    for a, b in intervals:
        covered.update(x / 2 for x in range(2 * a, 2 * b + 1))
    out = []
    for x in sorted(covered):
        if out and x - out[-1][1] <= 0.5:
            out[-1][1] = x
        else:
            out.append([x, x])
    return [[int(a), int(b)] for a, b in out]


def test_examples():
    merge = load()
    assert merge([[1, 3], [2, 6], [8, 10], [15, 18]]) == [[1, 6], [8, 10], [15, 18]]
    assert merge([[1, 2], [2, 3]]) == [[1, 3]]
    assert merge([]) == []


def test_random_against_brute_force():
    merge = load()
    rng = random.Random(7)
    for _ in range(200):
        ivs = []
        for _ in range(rng.randint(1, 6)):
            a = rng.randint(0, 20)
            ivs.append([a, a + rng.randint(0, 5)])
        assert [list(x) for x in merge(ivs)] == brute(ivs)
