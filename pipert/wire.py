"""Wires: the links from one routine's output to the inputs of others."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

LATEST = "latest"
BLOCK = "block"
POLICIES = (LATEST, BLOCK)


@dataclass(eq=False)
class Wire:
    """Carries every output of ``source`` to each routine in ``destinations``.

    ``policy`` is ``"latest"`` (bounded by ``depth``; when full the oldest waiting
    message is dropped, so a slow consumer always gets the newest one) or
    ``"block"`` (lossless: the producer waits for room). ``None`` takes the pipe's
    default. Drops are counted per destination.

    Into a flow with replicas, each message goes to one replica: in turn, or with
    ``key`` (a dict key or attribute of the message) equal keys go to the same
    replica. Out of a flow with replicas, ``ordered=True`` delivers messages in
    the order in which they entered the replicated flow.
    """

    source: object
    destinations: Tuple[object, ...] = field(default_factory=tuple)
    policy: Optional[str] = None
    depth: Optional[int] = None
    key: Optional[str] = None
    ordered: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.destinations, (tuple, list)):
            self.destinations = (self.destinations,)
        self.destinations = tuple(self.destinations)
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"Wire policy {self.policy!r} is unknown: use 'latest' or 'block'")
        if self.depth is not None and (not isinstance(self.depth, int) or self.depth < 1):
            raise ValueError(f"Wire depth {self.depth!r} must be a whole number >= 1")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise ValueError(f"Wire key {self.key!r} must be the name of a dict key or attribute of the messages")
