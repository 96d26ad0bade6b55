"""``replay``: a recording standing in for a live source.

It emits the messages of one topic of a recording (``pipe.record``, ``pipert run
--record``) with their original spacing and bit-exact content, so a pipeline
can run on yesterday's cameras: from code, ``Replay(name="cam", path="run.mcap",
channel="cam")``; in a pipeline file, type ``replay`` with the same parameters.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterator, Optional

from ..params import Param
from ..recording import JSON_ENCODING, PICKLE_ENCODING, STATS_TOPIC, RecordedMessage, info, read_messages
from ..registry import register
from ..routine import SourceRoutine

_SLICE = 0.05  # longest sleep in one main_logic call, so that events (stop, kill) are never kept waiting
_LATE = 0.002  # a message later than this (a busy CPU, a stop) moves the timeline instead of causing a burst


@register("replay")
class Replay(SourceRoutine):
    """Emits the recorded messages of ``channel`` from ``path``.

    ``rate`` 1.0 keeps the original timing, 2.0 plays twice as fast, 0 as fast as
    the pipe takes them. ``start``/``end`` are offsets in seconds from the first
    message of the recording; ``loop`` starts again at ``start`` after the last
    message, one average interval later. A message that goes out late (a busy
    CPU, a ``stop``) delays the ones after it, so the spacing stays the original
    one and nothing comes in a burst. ``set_params`` may change any of them while it runs. At the end (without ``loop``) the routine logs
    it and sends nothing more.
    """

    path = Param(str, help="the recording, an MCAP file made by pipe.record or pipert run --record")
    channel = Param(str, help="the topic to replay: the name of the routine whose output was recorded")
    rate = Param(float, default=1.0, min=0.0, help="speed: 1.0 = original timing, 0 = as fast as possible")
    loop = Param(bool, default=False, help="start again from `start` after the last message")
    start = Param(float, default=0.0, min=0.0, help="seconds into the recording to begin at")
    end = Param(float, default=None, min=0.0, help="seconds into the recording to stop at (default: its end)")

    def setup(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"replay '{self.name}': there is no recording {self.path}: give the path of an "
                                    "MCAP file made with pipe.record() or pipert run --record")
        first = next((m for m in read_messages(self.path) if m.topic != STATS_TOPIC), None)
        if first is None or next(read_messages(self.path, [self.channel]), None) is None:
            topics = [t for t, e in info(self.path)["topics"].items()
                      if {PICKLE_ENCODING, JSON_ENCODING} & set(e["encodings"])]
            raise ValueError(f"replay '{self.name}': {self.path} has no messages on channel '{self.channel}'; "
                             f"its channels are {topics}")
        self._origin = first.log_time
        self._passes = 0
        self._ended = False
        self._begin()

    def _begin(self) -> None:
        """Start a pass over the chosen part of the recording."""
        self._messages: Iterator[RecordedMessage] = self._window()
        self._next: Optional[RecordedMessage] = None
        self._pass_origin: Optional[int] = None  # log time of this pass's first message
        self._last: Optional[int] = None
        self._emitted = 0
        self._passes += 1

    def _window(self) -> Iterator[RecordedMessage]:
        """The channel's messages from ``start`` until the first at or after ``end``."""
        low = self._origin + int(self.start * 1e9)
        high = None if self.end is None else self._origin + int(self.end * 1e9)
        for message in read_messages(self.path, [self.channel]):
            if high is not None and message.log_time >= high:
                return
            if message.log_time >= low:
                yield message

    def _due(self, log_time: int) -> float:
        if self.rate == 0:
            return 0.0
        return self._clock + (log_time - self._pass_origin) / 1e9 / self.rate

    def main_logic(self) -> Any:
        if self._next is None:
            self._next = next(self._messages, None)
            if self._next is None:
                return self._at_end()
            if self._pass_origin is None:
                self._pass_origin = self._next.log_time
                if self._passes == 1 or self.rate == 0:
                    self._clock = time.perf_counter()
        wait = self._due(self._next.log_time) - time.perf_counter()
        if self.rate and wait < -_LATE:  # keep the spacing: what follows is due after this one, not at once
            self._clock -= wait
            wait = 0.0
        if wait > 0:
            time.sleep(min(wait, _SLICE))
            if wait > _SLICE:
                return None
        message, self._next = self._next, None
        self._last = message.log_time
        self._last_due = self._due(message.log_time) if self.rate else time.perf_counter()
        self._emitted += 1
        return message.value()

    def params_changed(self, changed: Dict[str, Any]) -> None:
        """A new recording, channel or window starts again from ``start`` (a bad one is refused and
        the old values stay); a new rate applies from the next message on."""
        if {"path", "channel", "start", "end"} & set(changed):
            self.setup()
        elif "rate" in changed and self._last is not None:
            self._pass_origin, self._clock = self._last, self._last_due

    def _at_end(self) -> None:
        if self.loop and self._emitted:
            span, count, last_due = self._last - self._pass_origin, self._emitted, self._due(self._last)
            self._begin()
            self._clock = last_due + (span / (count - 1) / 1e9 / self.rate if count > 1 and self.rate else 0.0)
            return None
        if not self._ended:
            self._ended = True
            self.logger.info("replay of '%s' from %s ended after %d messages", self.channel, self.path, self._emitted)
        time.sleep(_SLICE)
        return None
