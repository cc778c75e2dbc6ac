import importlib.util


def load():
    spec = importlib.util.spec_from_file_location("fizzbuzz", "/app/fizzbuzz.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_small():
    assert load().fizzbuzz(5) == ["1", "2", "Fizz", "4", "Buzz"]


def test_fifteen():
    out = load().fizzbuzz(30)
    assert out[14] == "FizzBuzz" and out[29] == "FizzBuzz"
    assert out[8] == "Fizz" and out[9] == "Buzz"
