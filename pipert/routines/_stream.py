"""Frame streams: what the ready-made video routines share.

A frame message is a dict: ``frame`` (a numpy image), ``frame_number`` (1, 2, ...),
``timestamp`` (``time.time()`` when the source had the frame) and ``source`` (the
source's id), plus what each routine adds (``boxes``, ``objects``, ...).

A finite source (a file's end, a frame limit) ends with an end-of-stream message
``{"end": True, "frames": N, "source": ..., "flow": ...}``; middle routines pass it
on; a sink that receives it closes its output, logs what it wrote and answers the
source with the event ``SINK_DONE``. With ``at_end: kill`` the source then sends
``kill`` once the sinks in ``wait_for`` have answered (or ``end_timeout`` passed),
so that a pipeline that plays a file stops by itself with complete outputs.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from ..errors import EventError
from ..events import events
from ..params import Param
from ..routine import DestinationRoutine, SourceRoutine

END: Any = object()
"""What ``FrameSource.produce`` returns when its stream has ended."""

SINK_DONE = "SINK_DONE"
_IDLE_WAIT = 0.05  # seconds a source that has ended sleeps per call, so that it does not spin


def is_end(data: Any) -> bool:
    """Whether ``data`` is an end-of-stream message."""
    return isinstance(data, dict) and data.get("end") is True


class FrameSource(SourceRoutine):
    """Base of the frame sources: numbering, metadata, the frame limit and the end of the stream.

    Subclasses implement ``produce()``: the fields of the next message (at least
    ``frame``), None when there is none yet, or ``END``.
    """

    frames = Param(int, default=0, min=0, help="end the stream after this many frames (0: no limit)")
    at_end = Param(str, default="stay", choices=("stay", "kill"),
                   help="at the end of the stream: stay (the pipe keeps running) or kill the pipe once the "
                        "sinks in wait_for have written everything")
    wait_for = Param(list, default=[], help="sinks whose SINK_DONE 'at_end: kill' waits for")
    end_timeout = Param(float, default=10.0, min=0, help="seconds 'at_end: kill' waits for those sinks at most")
    source_id = Param(str, default=None, help="the source id messages carry (default: the routine's name)")

    def setup(self) -> None:
        self.count = 0
        self.ended = False
        self.kill_sent = False
        self.waiting = set(self.wait_for)
        self.deadline = 0.0

    def produce(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define produce(self)")

    def main_logic(self) -> Optional[Dict[str, Any]]:
        if self.ended:
            self._kill_when_sinks_done()
            time.sleep(_IDLE_WAIT)
            return None
        if self.frames and self.count >= self.frames:
            return self._end()
        produced = self.produce()
        if produced is END:
            return self._end()
        if produced is None:
            return None
        self.count += 1
        return {"frame_number": self.count, "timestamp": time.time(), "source": self.source_id or self.name,
                **produced}

    def _end(self) -> Dict[str, Any]:
        self.ended = True
        self.deadline = time.monotonic() + self.end_timeout
        waits = f": waiting for {sorted(self.waiting)} to finish" if self.at_end == "kill" and self.waiting else ""
        self.logger.info("end of the stream after %d frames%s", self.count, waits)
        return {"end": True, "frames": self.count, "source": self.name, "flow": self.flow_name}

    def _kill_when_sinks_done(self) -> None:
        if self.at_end != "kill" or self.kill_sent:
            return
        if self.waiting and time.monotonic() < self.deadline:
            return
        if self.waiting:
            self.logger.warning("%s did not finish within %.0f s; killing the pipe anyway", sorted(self.waiting),
                                self.end_timeout)
        self.kill_sent = True
        self.notify_event("kill")

    @events(SINK_DONE)
    def sink_done(self, sink: str) -> None:
        """A sink has written everything up to this source's end-of-stream message."""
        self.waiting.discard(sink)


class FrameSink(DestinationRoutine):
    """Base of the writers: measures source-to-sink latency, and at the end of the stream (or at
    kill) closes its output, logs a summary and answers the source with ``SINK_DONE``.

    Subclasses implement ``write(data)`` and ``close()``, and name their output ``path``.
    """

    def setup(self) -> None:
        self.latencies: List[float] = []
        self.finished = False

    def main_logic(self, data: Dict[str, Any]) -> None:
        if is_end(data):
            self._finish(data.get("frames"))
            self._answer(data)
            return
        if "timestamp" in data:
            self.latencies.append(time.time() - data["timestamp"])
        self.write(data)

    def _answer(self, end: Dict[str, Any]) -> None:
        try:
            self.notify_event(SINK_DONE, {end["flow"]: [end["source"]]}, sink=self.name)
        except (EventError, KeyError) as exc:  # an end message from no source of this pipe (a replay, say)
            self.logger.debug("no source to tell that %s is done: %s", self.name, exc)

    def _finish(self, sent: Optional[int]) -> None:
        if self.finished:
            return
        self.finished = True
        self.close()
        received = len(self.latencies)
        counts = f"{received} frames" if sent is None else f"{received} of {sent} frames ({sent - received} dropped)"
        ms = sorted(1e3 * s for s in self.latencies) or [0.0]
        self.logger.info("%s to %s; latency source->sink mean %.1f ms, p99 %.1f ms", counts, self.path,
                         sum(ms) / len(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))])

    def cleanup(self) -> None:
        self._finish(None)

    def write(self, data: Dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define write(self, data)")

    def close(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define close(self)")
