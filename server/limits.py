"""Bounds on what one call may hold on the server, kept free of gRPC.

gRPC's synchronous server gives every call a pool thread for its whole life, and that
thread blocks while it waits for the client's next message or for the client to take
the server's. A client that stalls would hold its thread for as long as it liked, so:

- every stage of a call (one message in, or one message out) has a deadline, and a
  `Watchdog` runs the call's cancel callback when a stage outlives it;
- a worker has at most one call of each kind (poll, upload) running: `LatestCalls` lets
  the newest one through and cancels the one before it, which belongs to a crashed or
  retrying process of the same worker, or to whoever stole its token.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallLimits:
    """What a call may hold. `stall_seconds` bounds each wait for one message in either direction
    (a 1 MiB chunk in 60 s needs 140 kbit/s); `control_calls` bounds the Join, GetStatus, health and
    reflection calls running at once, on threads of their own, so they never take a worker's."""

    stall_seconds: float = 60.0
    control_calls: int = 8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.stall_seconds) and self.stall_seconds > 0):
            raise ValueError(f"stall_seconds must be a finite number > 0, got {self.stall_seconds}")
        if self.control_calls < 1:
            raise ValueError(f"control_calls must be >= 1, got {self.control_calls}")


def poll_window(requested: float, longest: float) -> float:
    """How long a long poll may wait: what the worker asked for, at most `longest` seconds.
    NaN would make every wait return at once (a busy loop), so anything but a finite number >= 0
    is refused rather than clamped."""
    if not math.isfinite(requested) or requested < 0:
        raise ValueError(f"max_wait_seconds must be a finite number >= 0, got {requested!r}")
    return min(requested, longest)


class Watchdog:
    """One thread that calls `expire` for every stage that outlives its deadline."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._tickets = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the watchdog's thread wakes up next by itself

    @contextmanager
    def stage(self, seconds: float, expire: Callable[[], None]) -> Iterator[None]:
        """Run the body; if it is still running after `seconds`, `expire()` is called (once, from the
        watchdog's thread), which must make the body return, for example by cancelling its call."""
        ticket = next(self._tickets)
        with self._cond:
            deadline = self._clock() + seconds
            self._armed[ticket] = (deadline, expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="call-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wakes_at:  # else it wakes in time anyway: no thread switch per message
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._armed.pop(ticket, None)

    def armed(self) -> int:
        """Stages being watched now."""
        with self._cond:
            return len(self._armed)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = self._clock()
                expired = [ticket for ticket, (deadline, _) in self._armed.items() if deadline <= now]
                callbacks = [self._armed.pop(ticket)[1] for ticket in expired]
                if not callbacks:
                    self._wakes_at = min((deadline for deadline, _ in self._armed.values()), default=math.inf)
                    self._cond.wait(None if self._wakes_at == math.inf else self._wakes_at - now)
                    self._wakes_at = -math.inf  # awake: it looks at every stage before it sleeps again
                    continue
            for expire in callbacks:
                try:
                    expire()
                except Exception:  # noqa: BLE001 - one failing callback must not stop the watchdog
                    log.exception("cancelling a stalled call failed")


class LatestCalls:
    """The running call of each key (worker, method); a new call cancels the one before it."""

    def __init__(self) -> None:
        self._running: dict[Hashable, tuple[object, Callable[[], None]]] = {}
        self._lock = threading.Lock()

    def enter(self, key: Hashable, cancel: Callable[[], None]) -> Callable[[], None]:
        """Register a call that `cancel()` ends; returns the function to call when it is over."""
        ticket = object()
        with self._lock:
            previous = self._running.get(key)
            self._running[key] = (ticket, cancel)
        if previous is not None:
            previous[1]()

        def leave() -> None:
            with self._lock:
                if self._running.get(key, (None,))[0] is ticket:
                    del self._running[key]

        return leave

    def __len__(self) -> int:
        with self._lock:
            return len(self._running)
