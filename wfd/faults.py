"""Fault points for tests: one switch, `WFD_FAULTS`, shared by every crash test.

`WFD_FAULTS="commit=raise@3,after-claim=kill"` makes the third pass through the
point `commit` raise `FaultInjected` and the first pass through `after-claim`
SIGKILL the daemon. Points are named where `hit` is called; `@N` (default 1)
picks the pass. Unset, `hit` is one dict lookup that finds nothing. The
variable is read once, at import; steps never see it (every inherited `WFD_*`
variable is stripped from a step's environment).
"""

from __future__ import annotations

import os
import signal

ACTIONS = ("raise", "kill")


class FaultInjected(RuntimeError):
    """Raised at a fault point a test switched on with `WFD_FAULTS`."""


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    faults: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        if action in ACTIONS:
            faults[point] = (action, int(nth) if nth.isdigit() else 1)
    return faults


_FAULTS = _parse(os.environ.get("WFD_FAULTS", ""))
_passes: dict[str, int] = {}


def hit(point: str) -> None:
    """A fault point: does nothing unless a test switched `point` on."""
    fault = _FAULTS.get(point)
    if fault is None:
        return
    _passes[point] = count = _passes.get(point, 0) + 1
    action, nth = fault
    if count != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FaultInjected(f"fault injected at {point} (pass {count})")
