"""`lagoon.gc_pause.paused`: the collector off inside, what is alive frozen at exit, the collector's
state restored (nesting, an error inside), and the real imports (`lagoon`, then `lagoon.engine`
with torch, as the CLI orders them) leaving torch's objects frozen and the collector on."""

import gc
import subprocess
import sys

import pytest

from lagoon.gc_pause import paused


@pytest.fixture
def collector():
    was_on = gc.isenabled()
    gc.enable()
    yield
    if not was_on:
        gc.disable()


def test_paused_turns_the_collector_off_and_freezes_what_the_block_built(collector):
    before = gc.get_freeze_count()
    with paused():
        assert not gc.isenabled()
        built = [[i] for i in range(5000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= before + len(built)
    assert not any(x is built for x in gc.get_objects())  # frozen objects are out of the collector's lists


def test_nested_blocks_restore_only_at_the_outermost_and_after_an_error(collector):
    with paused():
        with paused():
            pass
        assert not gc.isenabled(), "an inner block turned the collector back on inside the outer one"
    assert gc.isenabled()
    with pytest.raises(ValueError), paused():
        raise ValueError("inside")
    assert gc.isenabled()
    gc.disable()
    with paused():
        pass
    assert not gc.isenabled(), "a collector that was off was turned on"


def test_the_cli_import_order_leaves_torch_frozen_and_the_collector_on():
    code = ("import gc, lagoon.cli.app, lagoon.engine, sys; "
            "print(gc.isenabled(), gc.get_freeze_count(), len(gc.get_objects()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    enabled, frozen, tracked, torch = out.stdout.split()
    assert enabled == "True" and torch == "True"
    assert int(frozen) > 100_000 and int(tracked) < 10_000, out.stdout  # torch's objects: frozen, not tracked
