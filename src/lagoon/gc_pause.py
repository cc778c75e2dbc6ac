"""`paused()`: the cyclic garbage collector paused over a block of start-up imports, and everything
alive at the block's end frozen (`gc.freeze`: out of the collector's reach for good).

Why: importing torch builds ~1M objects that live as long as the process. With the collector on,
the heap's growth triggers full collections that rescan all of them: 0.15-0.7 s of a warm start on
2 cores, the more the more was imported before torch (`lagoon` and its pydantic config come first
on the CLI's path), and again at exit (a warm `lagoon generate`'s interpreter exit: ~2 s -> ~0.5 s).
Frozen, later collections (the engine's modules, a server's requests) never walk them again. The
price: a reference cycle that becomes garbage inside the block is never freed (importing torch
leaves ~7k such objects; module state lives anyway). Blocks nest: each exit freezes, only the
outermost turns the collector back on (and only if it was on). This module is *not* a memory
manager; the package's imports (`lagoon`, `lagoon.engine`) are its only users.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused"]


@contextmanager
def paused() -> Iterator[None]:
    """Collector off inside; at exit (error or not) freeze what is alive, restore the collector."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_on:
            gc.enable()
