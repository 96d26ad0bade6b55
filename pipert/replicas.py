"""Replicas: N processes of one flow, how messages are shared out to them and merged back.

A flow created with ``replicas=N`` runs as N flow processes named ``flow/0`` ..
``flow/N-1``. A wire into it gives each message to one live replica: in turn,
or by a ``key`` of the message so equal keys reach the same replica. A wire out
of it merges the replicas' outputs; with ``ordered=True`` an ``OrderedMerge``
puts them back into the order in which they entered the replicated stage.
"""
from __future__ import annotations

import heapq
import itertools
import time
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .errors import TransportError
from .transport import EMPTY, Meta, RemoteTarget

ORDER_WINDOW = 256
"""Messages an ordered merge holds back at most before it gives up on a missing one."""
ORDER_TIMEOUT = 1.0
"""Seconds an ordered merge waits for a missing message (lost with a dead replica) before skipping it."""


def instance_names(flow: str, replicas: int) -> List[str]:
    """The names of a flow's processes: the flow's own name, or ``flow/0`` .. for replicas."""
    return [flow] if replicas == 1 else [f"{flow}/{i}" for i in range(replicas)]


def replica_name(routine: str, instance: str, flow: str) -> str:
    """How a routine of one replica is named in acknowledgements (``det/1``); unchanged without replicas."""
    return routine if instance == flow else f"{routine}{instance[len(flow):]}"


def _stable_hash(value: Any) -> int:
    """A hash that is the same in every process (Python's ``hash`` of a str is not)."""
    if isinstance(value, int):
        return value & 0xFFFFFFFF
    if isinstance(value, bytes):
        return zlib.crc32(value)
    return zlib.crc32(repr(value).encode("utf-8", "backslashreplace"))


class ReplicaChooser:
    """Picks the replica target of one message: round-robin, or by ``key`` (a dict key or
    attribute of the message). A replica whose process is down is passed over; a key goes
    back to its own replica once that replica runs again."""

    def __init__(self, wire: str, key: Optional[str]) -> None:
        self._wire = wire
        self._key = key
        self._turn = itertools.count()

    def _key_of(self, message: Any) -> Any:
        try:
            if isinstance(message, Mapping):
                return message[self._key]
            return getattr(message, self._key)
        except (KeyError, AttributeError):
            raise TransportError(f"the {self._wire} shares messages out by key {self._key!r}, but a "
                                 f"{type(message).__name__} without it was sent: give every message that "
                                 "key (dict key or attribute) or remove key= from the wire") from None

    def __call__(self, targets: Sequence[RemoteTarget], message: Any) -> RemoteTarget:
        live = [t for t in targets if not t.ring.gone] or list(targets)
        if self._key is None:
            return live[next(self._turn) % len(live)]
        number = _stable_hash(self._key_of(message))
        own = targets[number % len(targets)]
        return own if not own.ring.gone else live[number % len(live)]


class _Stream:
    """The messages of one entry stream waiting in an ordered merge."""

    def __init__(self, inputs: int) -> None:
        self.expected = 0
        self.waiting: List[tuple] = []  # heap of (seq, arrival number, message)
        self.last = [-1] * inputs  # the highest sequence number seen from each replica
        self.gap_since: Optional[float] = None


class OrderedMerge:
    """One input of a routine that merges the outputs of replicas in stage-entry order.

    Each replica's output keeps the order of its own input, so a missing sequence
    number is known to be gone once every replica has sent a later one; otherwise
    (a replica died with it, or a routine returned None for it) it is skipped after
    ``timeout`` seconds or when ``window`` messages wait behind it, and counted in
    ``dropped``. A message that arrives after its place was skipped is dropped and
    counted too. Messages without an order stamp pass straight through.
    """

    def __init__(self, readers: Sequence[Any], window: int = ORDER_WINDOW, timeout: float = ORDER_TIMEOUT) -> None:
        self._readers = list(readers)
        self._window = window
        self._timeout = timeout
        self._streams: Dict[int, _Stream] = {}
        self._arrivals = itertools.count()
        self._held = 0
        self._unstamped: List[Any] = []
        self.dropped = 0
        self.meta: Meta = None

    def _take(self) -> None:
        """Move what the replicas have sent into the merge, up to the window."""
        for index, reader in enumerate(self._readers):
            while self._held < self._window:
                obj = reader.poll()
                if obj is EMPTY:
                    break
                if reader.meta is None:
                    self._unstamped.append(obj)
                    continue
                stream_id, seq = reader.meta
                stream = self._streams.get(stream_id)
                if stream is None:
                    stream = self._streams[stream_id] = _Stream(len(self._readers))
                stream.last[index] = max(stream.last[index], seq)
                if seq < stream.expected:
                    self.dropped += 1
                    continue
                heapq.heappush(stream.waiting, (seq, next(self._arrivals), obj))
                self._held += 1

    def _release(self, stream_id: int, stream: _Stream) -> Any:
        seq, _, obj = heapq.heappop(stream.waiting)
        self._held -= 1
        stream.expected = seq + 1
        stream.gap_since = None
        self.meta = (stream_id, seq)
        return obj

    def poll(self) -> object:
        self._take()
        if self._unstamped:
            self.meta = None
            return self._unstamped.pop(0)
        now = time.monotonic()
        for stream_id, stream in self._streams.items():
            if not stream.waiting:
                continue
            first = stream.waiting[0][0]
            if first == stream.expected:
                return self._release(stream_id, stream)
            if stream.gap_since is None:
                stream.gap_since = now
            passed = all(last > stream.expected for last in stream.last)
            if passed or self._held >= self._window or now - stream.gap_since >= self._timeout:
                self.dropped += first - stream.expected
                return self._release(stream_id, stream)
        return EMPTY

    def wait_hint(self) -> Optional[float]:
        """Seconds until a held-back message may be given up on; None when nothing is held."""
        gaps = [s.gap_since for s in self._streams.values() if s.waiting and s.gap_since is not None]
        if not gaps:
            return None if not self._held else self._timeout
        return min(gaps) + self._timeout - time.monotonic()

    def depth(self) -> int:
        """Messages held back, waiting for an earlier one."""
        return self._held
