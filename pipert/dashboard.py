"""The built-in web dashboard: its page, its live stream, and the logs and frames it shows.

The daemon's HTTP server (``APIWrapper``) serves the page at ``/`` and its files at
``/dashboard/<file>``; they ship inside the package (``pipert/static``), so the
dashboard needs no build step, no CDN and no internet. The page and its files
hold no data and are served without the token; everything else asks for it.

``/dashboard/stream`` pushes the live state as Server-Sent Events
(``text/event-stream``), one greenlet per client on the server's gevent hub::

    event: structure   once per connection: structure() and the pipe's id
    event: status      status(), checked every second and sent when it changed
    event: log         {"records": [...], "skipped": n}; its id resumes the log after a reconnection
    event: frame       {"routine", "direction", "jpeg"} for the routine named by ?frames=ROUTINE
    event: bye         the pipe has ended; the daemon stops serving
    : heartbeat        a comment after 10 s of silence

A client costs no queue: each stream keeps only a cursor into the daemon's
bounded log book and the number of the last frame it sent, and makes its next
message only when the previous one was written. A client too slow to take a
message is disconnected by the server's socket timeout (``security.Limits``).

Frames: a stream opened with ``?frames=ROUTINE`` turns that routine's
``log_data`` on (when it was off) and off again when the last such stream
closes, so a closed tab leaves nothing running. The frames reach the daemon as
the cockpit's ``input:``/``output:`` log records; :class:`LogBook` keeps the
latest of each instead of logging them.
"""
from __future__ import annotations

import collections
import http
import importlib.resources
import json
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs

import gevent

from .control import Control, ControlError
from .errors import PipeError
from .events import LOG_DATA_EVENT_NAME
from .frames import parse_frame_message
from .log import PIPE_INFRASTRUCTURE

_TICK = 0.25  # seconds between two looks for new log records and frames
_STATUS_EVERY = 4  # ticks between two looks at status(): about one update a second
_HEARTBEAT = 10.0  # seconds of silence before a heartbeat comment
_LOG_BATCH = 200  # log records in one message at most
_FRAMES_RETRY = 2.0  # seconds between two attempts to turn a watched routine's frames back on
_ASSETS = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
           "dashboard.css": "text/css; charset=utf-8"}
_PAGE_HEADERS = [("Cache-Control", "no-cache"),
                 ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                             "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")]
_log = logging.getLogger(__name__)


class Reply:
    """A route's answer that is not a JSON document: a page, a file, a stream, metrics or a probe.

    ``body(environ)`` runs when the reply is sent: it may still raise ControlError
    (a bad query), and a stream reads its query and headers there.
    """

    def __init__(self, content_type: str, body: Callable[[Dict[str, Any]], Iterable[bytes]],
                 headers: Iterable[Tuple[str, str]] = (), status: int = 200) -> None:
        self.content_type = content_type
        self.body = body
        self.headers = list(headers)
        self.status = status

    @classmethod
    def fixed(cls, content_type: str, data: bytes, headers: Iterable[Tuple[str, str]] = (),
              status: int = 200) -> "Reply":
        """A reply whose body is known in full: ``data``, with its Content-Length."""
        return cls(content_type, lambda environ: [data], [*headers, ("Content-Length", str(len(data)))], status)

    def send(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        body = self.body(environ)
        start_response(f"{self.status} {http.HTTPStatus(self.status).phrase}",
                       [("Content-Type", self.content_type), *self.headers])
        return body


class LogBook(logging.Handler):
    """The pipe's recent log records (at most ``capacity``) and each routine's latest frames.

    Attached to the pipe's logger in the daemon, it sees the records of every flow. Records
    are numbered; a reader asks for those after the last number it saw. ``fps:`` records are
    left out (the dashboard shows FPS from ``status()``); frame records only replace the
    routine's latest frame of that direction.
    """

    def __init__(self, base: str, capacity: int = 1000) -> None:
        super().__init__(level=logging.NOTSET)
        self.base = base
        self._records: collections.deque = collections.deque(maxlen=capacity)
        self._frames: Dict[Tuple[str, str], Tuple[int, str]] = {}
        self._logged = 0  # records numbered so far
        self._framed = 0  # frames numbered so far
        self._guard = threading.Lock()

    def _routine(self, name: str) -> Optional[str]:
        return name.rsplit(".", 1)[-1] if name.startswith(self.base + ".") else None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            routine = self._routine(record.name)
            frame = parse_frame_message(message) if routine else None
            if frame is not None:
                with self._guard:
                    self._framed += 1
                    self._frames[(routine, frame[0])] = (self._framed, frame[1])
                return
            if record.levelno == PIPE_INFRASTRUCTURE and message.startswith("fps: "):
                return
            if record.exc_text:
                message = f"{message}\n{record.exc_text}"
            with self._guard:
                self._logged += 1
                self._records.append({"id": self._logged, "time": record.created, "level": record.levelname,
                                      "source": record.name, "routine": routine, "message": message})
        except Exception:
            self.handleError(record)

    def since(self, after: int) -> Tuple[List[Dict[str, Any]], int]:
        """Records numbered above ``after`` (at most a batch), and how many of them are gone already."""
        with self._guard:
            first = self._records[0]["id"] if self._records else self._logged + 1
            records = [r for r in self._records if r["id"] > after][:_LOG_BATCH]
        return records, max(0, first - after - 1)

    @property
    def last(self) -> int:
        """The number of the newest record."""
        return self._logged

    def frame(self, routine: str, direction: str) -> Optional[Tuple[int, str]]:
        """(number, base64 JPEG) of ``routine``'s latest ``direction`` frame, if any arrived."""
        with self._guard:
            return self._frames.get((routine, direction))


def _event(kind: str, data: Any, event_id: Optional[str] = None) -> bytes:
    lines = [f"event: {kind}"] + ([f"id: {event_id}"] if event_id else []) + [f"data: {json.dumps(data)}"]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class Dashboard:
    """The dashboard's routes for one ``APIWrapper``: page, files and stream."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.pipe = control.pipe
        self.logbook = LogBook(self.pipe.logger.name)
        self.pipe.logger.addHandler(self.logbook)
        self._closing = False
        self._watchers: Dict[str, int] = {}
        self._turned_on: Dict[str, float] = {}  # routine -> when we last turned its frames on
        self._watch_lock = threading.Lock()

    def close(self) -> None:
        """End every stream (with a ``bye``) and stop collecting records: the pipe has ended."""
        self._closing = True
        self.pipe.logger.removeHandler(self.logbook)

    # ----- page and files -----

    def asset(self, name: str) -> Reply:
        """The page (``index.html``) or one of its files."""
        if name not in _ASSETS:
            raise ControlError(f"the dashboard has no file {name!r}; it has {sorted(_ASSETS)}", 404)
        data = importlib.resources.files(__package__).joinpath("static", name).read_bytes()
        return Reply.fixed(_ASSETS[name], data, _PAGE_HEADERS)

    # ----- the stream -----

    def stream(self) -> Reply:
        """The live stream (see the module docstring)."""
        return Reply("text/event-stream; charset=utf-8", self._open,
                     [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")])

    def _open(self, environ: Dict[str, Any]) -> Iterator[bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        frames_of = (query.get("frames") or [None])[0] or None
        if frames_of is not None:
            self.control.flow_of(frames_of)  # 404 for an unknown routine, before the stream starts
        resume = environ.get("HTTP_LAST_EVENT_ID") or (query.get("after") or [""])[0]
        pipe_id, _, number = resume.partition(":")
        after = int(number) if pipe_id == self.pipe.id and number.isdigit() else 0
        return self._messages(frames_of, after)

    def _messages(self, frames_of: Optional[str], after: int) -> Iterator[bytes]:
        if frames_of is not None:
            self._watch(frames_of)
        try:
            yield _event("structure", {"pipe": self.pipe.id, **self.control.structure()})
            sent_status, sent_frames, silent_since, tick = None, {}, time.monotonic(), 0
            while not self._closing:
                messages = []
                if tick % _STATUS_EVERY == 0:
                    status = self.control.status()
                    if frames_of is not None:
                        self._keep_frames_on(frames_of, status)
                    text = json.dumps(status, sort_keys=True)
                    if text != sent_status:
                        sent_status = text
                        messages.append(_event("status", status))
                records, skipped = self.logbook.since(after)
                if records or skipped:
                    after = records[-1]["id"] if records else self.logbook.last
                    messages.append(_event("log", {"records": records, "skipped": skipped},
                                           f"{self.pipe.id}:{after}"))
                for direction in ("input", "output") if frames_of is not None else ():
                    frame = self.logbook.frame(frames_of, direction)
                    if frame is not None and sent_frames.get(direction) != frame[0]:
                        sent_frames[direction] = frame[0]
                        messages.append(_event("frame", {"routine": frames_of, "direction": direction,
                                                         "jpeg": frame[1]}))
                if not messages and time.monotonic() - silent_since >= _HEARTBEAT:
                    messages.append(b": heartbeat\n\n")
                for message in messages:
                    yield message
                    silent_since = time.monotonic()
                gevent.sleep(_TICK)
                tick += 1
            yield _event("bye", {"pipe": self.pipe.id, "reason": "the pipe has ended"})
        finally:
            if frames_of is not None:
                self._unwatch(frames_of)

    # ----- frames on demand -----

    def _switch_frames(self, routine: str, on: bool) -> None:
        try:
            self.pipe.send_event(LOG_DATA_EVENT_NAME, {self.control.flow_of(routine): [routine]}, {"enabled": on})
        except (PipeError, ControlError) as exc:
            _log.debug("could not turn frames of %s %s: %s", routine, "on" if on else "off", exc)

    def _watch(self, routine: str) -> None:
        with self._watch_lock:
            self._watchers[routine] = self._watchers.get(routine, 0) + 1
            first = self._watchers[routine] == 1
        if first and not self.control.status()["routines"][routine]["log_data"]:
            self._turned_on[routine] = time.monotonic()
            self._switch_frames(routine, True)

    def _keep_frames_on(self, routine: str, status: Dict[str, Any]) -> None:
        """Turn a watched routine's frames on again after its flow restarted (a new process starts
        with them off)."""
        if routine in self._turned_on and not status["routines"][routine]["log_data"] \
                and time.monotonic() - self._turned_on[routine] >= _FRAMES_RETRY:
            self._turned_on[routine] = time.monotonic()
            self._switch_frames(routine, True)

    def _unwatch(self, routine: str) -> None:
        with self._watch_lock:
            self._watchers[routine] -= 1
            last = not self._watchers[routine]
        if last and self._turned_on.pop(routine, None) is not None and not self._closing:
            self._switch_frames(routine, False)
