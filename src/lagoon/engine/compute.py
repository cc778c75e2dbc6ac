"""`compute`: the one thread per process that runs the engine's torch work — loading and repacking
weights, compiling, prefill and every decode step of every `Scheduler`.

Why one thread: torch's CPU kernels run on OpenMP, and libgomp keeps a separate pool of workers for
each thread that has started a parallel region. Once two threads own pools (the main thread loaded
the model, a scheduler thread decodes), libgomp counts more managed threads than cores and throttles
its spin-waits to futex sleeps, so every parallel kernel then pays a wake-up. Measured on 2 cores,
torch 2.13, SmolLM2-135M: the int4 matrix-vector kernel went from 20 to 70 us a call and a compiled
decode step from 10.9 to 28.8 ms, in both threads, for the rest of the process. Everything here
runs on a single thread, so the process keeps one pool.

    compute.call(fn, *args)   # run fn on the compute thread, wait, return its result (or raise)
    compute.attach(tick)      # tick() -> bool (busy), called in a loop until detached
    compute.wake()            # a tick has new work: stop idling now

A tick is one scheduler step; ticks of several engines (a router's two local models) interleave.
Calls made from the compute thread itself run inline. A caller on the compute thread must never
wait for a tick's result (it would wait for itself); `on_thread()` lets the engine refuse that
with an error. This module is *not* a scheduler (see `lagoon.engine.generate`).

At interpreter exit (`atexit`) the loop is stopped and joined after the tick it is in: a daemon thread
still inside a torch op when Python finalizes is killed by `pthread_exit` while a C++ frame is on its
stack (torch's bindings release the GIL), which aborts the process with "terminate called without an
active exception" and exit status 134 (tests/engine/test_compute.py).
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

__all__ = ["call", "attach", "detach", "wake", "on_thread", "alive"]

log = logging.getLogger("lagoon.engine")
T = TypeVar("T")

_IDLE_S = 0.05  # how long an idle loop sleeps before polling its ticks again
_EXIT_JOIN_S = 60.0  # at exit, how long to wait for the step (or a compile) in progress


class _ComputeThread:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._tasks: deque[tuple[Callable[[], Any], Future]] = deque()
        self._ticks: list[Callable[[], bool]] = []
        self._thread: threading.Thread | None = None
        self._woken = False  # a wake() since the loop last looked: do not idle
        self._stopping = False  # set at interpreter exit: the loop returns after its current tick

    def _ensure(self) -> threading.Thread:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lagoon-compute", daemon=True)
                self._thread.start()
            return self._thread

    def on_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.on_thread() or self._stopping:  # stopping: an exit handler's call runs on its own thread
            return fn(*args, **kwargs)
        fut: Future = Future()
        with self._cv:
            self._tasks.append((lambda: fn(*args, **kwargs), fut))
            self._cv.notify()
        self._ensure()
        return fut.result()

    def attach(self, tick: Callable[[], bool]) -> None:
        with self._cv:
            self._ticks.append(tick)
            self._cv.notify()
        self._ensure()

    def detach(self, tick: Callable[[], bool]) -> None:
        with self._cv:
            if tick in self._ticks:
                self._ticks.remove(tick)

    def wake(self) -> None:
        with self._cv:
            self._woken = True
            self._cv.notify()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """End the loop after the tick or task in progress and wait for it (at exit)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_EXIT_JOIN_S)

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    return
                tasks, self._tasks = list(self._tasks), deque()
                ticks = list(self._ticks)
                self._woken = False
            for fn, fut in tasks:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller, who re-raises it
                        fut.set_exception(exc)
            busy = False
            with torch.no_grad():
                for tick in ticks:
                    try:
                        busy = tick() or busy
                    except Exception:  # a tick handles its own requests' errors; this one is a bug
                        log.exception("engine loop failed; it is stopped")
                        self.detach(tick)
            if not busy:
                with self._cv:
                    if not self._tasks and not self._woken:
                        self._cv.wait(_IDLE_S)


_compute = _ComputeThread()
atexit.register(_compute.stop)
call = _compute.call
attach = _compute.attach
detach = _compute.detach
wake = _compute.wake
on_thread = _compute.on_thread
alive = _compute.alive
