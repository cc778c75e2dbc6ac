"""The compute thread: every torch forward of every engine runs on one thread (see
`lagoon.engine.compute` for the OpenMP reason), calls return results and raise errors, and a caller
on that thread is refused rather than left waiting on itself."""

from __future__ import annotations

import threading

import pytest

from lagoon.engine import compute, load_model
from lagoon.engine.tiny import save_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_call_returns_raises_and_runs_inline_on_its_own_thread():
    me = threading.current_thread()
    where = compute.call(threading.current_thread)
    assert where is not me and where.name == "lagoon-compute"
    assert compute.on_thread() is False
    assert compute.call(lambda a, b=0: a * 10 + b, 4, b=2) == 42
    with pytest.raises(ZeroDivisionError):
        compute.call(lambda: 1 / 0)
    # nested: a call made from the compute thread runs inline instead of queueing behind itself
    assert compute.call(lambda: compute.call(lambda: threading.current_thread())) is where


def test_every_forward_of_two_engines_runs_on_the_compute_thread(folder):
    threads: set[str] = set()
    engines = [load_model(folder, precision="float32") for _ in range(2)]
    try:
        for e in engines:
            e.model.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
        done = []
        workers = [threading.Thread(target=lambda e=e: done.append(e.complete("def f(x):", e.params(max_new_tokens=5, ignore_eos=True))))
                   for e in engines for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        assert len(done) == 4 and all(c.completion_tokens == 5 for c in done)
        assert threads == {"lagoon-compute"}  # prefill and decode of both engines, never the callers'
    finally:
        for e in engines:
            e.close()


def test_a_tick_that_raises_is_detached_and_the_loop_lives_on():
    calls = []

    def bad() -> bool:
        calls.append(1)
        raise RuntimeError("a bug in a tick")

    compute.attach(bad)
    compute.wake()
    assert compute.call(lambda: 7) == 7  # the loop survived the failing tick
    compute.call(lambda: None)
    assert calls == [1]  # ran once, then detached
    assert compute.alive()


def test_submit_on_the_compute_thread_is_refused(folder):
    e = load_model(folder, precision="float32")
    try:
        with pytest.raises(RuntimeError, match="compute thread"):
            compute.call(e.complete, "x")
    finally:
        e.close()
