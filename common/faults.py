"""Test hook: named crash points, so a test can kill a real process at an exact step.

Code that must survive a crash at any moment (the checkpoint writer) calls
`crash_point("checkpoint.manifest.renamed")` between its steps. Normally that
costs one environment lookup and does nothing. Two variables, meant for tests
only, change that:

- `LBGM_TEST_CRASH_AT=name:n` sends SIGKILL to the own process the n-th time
  (1-based; `name` alone means the first) this process reaches `name`: a real
  crash, with no cleanup, no flush and no atexit handler.
- `LBGM_TEST_FAULT_TRACE=path` appends each point's name to `path` as it is
  reached, so a test can first list every step of an uninterrupted run and then
  crash at each one.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_AT = "LBGM_TEST_CRASH_AT"
TRACE = "LBGM_TEST_FAULT_TRACE"

_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Kill this process here if the test hook names this point and occurrence; trace it if asked."""
    trace = os.environ.get(TRACE)
    if trace:
        with open(trace, "a") as handle:
            handle.write(name + "\n")
    target = os.environ.get(CRASH_AT)
    if not target:
        return
    _reached[name] += 1
    point, _, occurrence = target.partition(":")
    if point == name and _reached[name] == int(occurrence or 1):
        os.kill(os.getpid(), signal.SIGKILL)
