"""The daemon's clock: wall time read once at start, then advanced by a clock that
never steps.

Deadlines (timeouts, retry times) and event timestamps both come from `now()`,
so an NTP step, a restored VM snapshot or a hand-set clock cannot make a 60 s
timeout run for an hour or kill every step at the next tick (docs/design.md,
"Time"). CLOCK_BOOTTIME rather than CLOCK_MONOTONIC: a suspended laptop's
sleep counts as time passed, as it does for the wall clock the times are shown
in. The price: a wall clock corrected while the daemon runs shows in event
times only from the next start on.
"""

from __future__ import annotations

import time

_STEADY = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class Clock:
    def __init__(self) -> None:
        self._wall0 = time.time()
        self._steady0 = time.clock_gettime(_STEADY)

    def now(self) -> float:
        """Seconds since the epoch, as the wall clock said at start plus time since."""
        return self._wall0 + (time.clock_gettime(_STEADY) - self._steady0)
