import copy
import importlib.util


def load():
    spec = importlib.util.spec_from_file_location("merge", "/app/merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.deep_merge


def test_nested_merge():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    over = {"a": {"y": [3], "z": 4}, "c": 5}
    assert load()(base, over) == {"a": {"x": 1, "y": [3], "z": 4}, "b": 2, "c": 5}


def test_inputs_untouched():
    base = {"a": {"x": 1}}
    over = {"a": {"x": 2}}
    keep_b, keep_o = copy.deepcopy(base), copy.deepcopy(over)
    load()(base, over)
    assert base == keep_b and over == keep_o
