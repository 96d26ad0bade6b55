"""systemd's service notification protocol (``sd_notify``), without a dependency.

Under ``Type=notify`` systemd puts the path of a Unix datagram socket in
``NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace); a service
sends it newline-separated ``KEY=value`` states, one datagram each time:
``READY=1`` once it serves, ``STOPPING=1`` when it begins to stop, ``STATUS=...``
for ``systemctl status``, and ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
microseconds when the unit has ``WatchdogSec=``. Outside systemd (no
``NOTIFY_SOCKET``) every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

_log = logging.getLogger(__name__)


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=running"``) to systemd; False if not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as exc:
        _log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


class Watchdog:
    """``WATCHDOG=1`` pings at half the interval systemd asked for in ``WATCHDOG_USEC`` (if it asked
    this process: ``WATCHDOG_PID`` unset or ours). Call ``ping`` from the loop whose progress it proves."""

    def __init__(self) -> None:
        usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.interval: Optional[float] = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None
        self._due = 0.0

    def timeout(self, longest: float) -> float:
        """How long the caller may wait before the next ``ping`` (at most ``longest``)."""
        if self.interval is None:
            return longest
        return max(0.0, min(longest, self._due - time.monotonic()))

    def ping(self) -> None:
        """Send ``WATCHDOG=1`` if a ping is due."""
        now = time.monotonic()
        if self.interval is not None and now >= self._due:
            notify("WATCHDOG=1")
            self._due = now + self.interval
