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


_BUSY_AT_EXIT = """
import time, torch
from lagoon.engine import compute
x = torch.randn(256, 256)
def tick():
    for _ in range(50):
        x @ x  # torch releases the GIL inside: the thread is in C++ when the interpreter exits
    return True
compute.attach(tick)
time.sleep(0.3)
compute.call(lambda: None)
print("exiting", flush=True)
"""


def test_a_process_exiting_while_the_loop_runs_torch_exits_cleanly():
    # without the exit handler this aborted ("terminate called without an active exception",
    # status 134) in 3 of 3 runs: the daemon thread was killed inside a torch op at finalization
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BUSY_AT_EXIT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "exiting" in out.stdout
    assert "terminate called" not in out.stderr
