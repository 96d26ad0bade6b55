"""Health probes: is the daemon serving (liveness), is the pipeline doing its work (readiness)."""
from __future__ import annotations

import datetime
from typing import Any, List

from .flow import CRASHED, RUNNING


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="seconds")


def readiness(pipe: Any) -> List[str]:
    """Why ``pipe`` is not ready, one sentence per problem; empty once it is built, every flow is alive
    and every routine that was started (its last start/stop event was ``start``) is running."""
    if not pipe.built:
        return ["the pipe is not built yet"]
    status = pipe.status()
    reasons, dead = [], set()
    for name, flow in status["flows"].items():
        if flow["alive"]:
            continue
        dead.add(name)
        last = flow["last_exit"]
        reason = f"flow '{name}' dead" + (f" since {_when(last['time'])} ({last['how']})" if last else "")
        reasons.append(reason + (", restarting" if flow["restarting"] else ""))
    started = set(pipe.started_routines())
    for name, routine in status["routines"].items():
        if routine["flow"] in dead:
            continue
        if routine["state"] == CRASHED:
            reasons.append(f"routine '{name}' crashed: {routine['error']}")
        elif name in started and routine["state"] != RUNNING:
            reasons.append(f"routine '{name}' was started but is {routine['state']}")
    return reasons
