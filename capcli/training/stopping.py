"""Why a run stops before its last epoch: its time budget (``train.max_minutes``) or a signal
(Ctrl-C, a scheduler's SIGTERM).

The budget bounds the whole run from its first second (cache pass, epochs, validation). The
trainer keeps back what a validation and a checkpoint take (measured, or probed before the first
validation), stops stepping when only that is left, validates the weights it has, saves and ends
inside the budget.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Callable


class Budget:
    """A run's wall-clock budget and the durations that decide when to stop stepping."""

    def __init__(self, max_minutes: float, start: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.clock = clock  # every duration the trainer measures (a test may swap it)
        self.t0 = clock() if start is None else start  # the budget counts from here
        self.seconds = max_minutes * 60 if max_minutes else math.inf
        self.val_seconds = 0.0  # the last validation (or a probe of the first)
        self.save_seconds = 0.0  # the slowest checkpoint save
        self.step_seconds = 0.0  # the last training step

    @property
    def limited(self) -> bool:
        return math.isfinite(self.seconds)

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def deadline(self) -> float | None:
        """The ``time.perf_counter()`` value at which the budget ends (None without one)."""
        return time.perf_counter() + self.seconds - self.elapsed() if self.limited else None

    def out_of_time(self, steps: int = 1) -> bool:
        """True when ``steps`` more steps, then a validation and a checkpoint, would pass the budget
        (1% of it kept as a margin)."""
        if not self.limited:
            return False
        reserve = self.val_seconds + 2 * self.save_seconds + steps * self.step_seconds
        return self.elapsed() + reserve + 0.01 * self.seconds > self.seconds


class StopSignals:
    """While active (``with``), SIGTERM and SIGINT set :attr:`received` (the signal's name) instead
    of ending the process, so the run finishes its step, saves and returns; a second one raises
    KeyboardInterrupt at once. Only the main thread can install handlers: elsewhere a no-op."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False
