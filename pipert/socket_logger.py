"""Ship log records to the PipeRT cockpit over socket.io without ever slowing the pipe.

:func:`get_socket_logger` gives a logger whose records reach the cockpit as
``log`` events; :meth:`CockpitHandler.send_pipe_creation` announces the pipe's
structure with a ``pipe_creation`` event. Both payloads are JSON strings
``{"time", "source", "level", "message"}`` (see "Cockpit protocol" in DESIGN.md).

Delivery is best effort, by design: ``emit`` formats the record and puts it in
a bounded queue, nothing more. A background thread owns the socket.io
connection. While the cockpit is unreachable, records are dropped and counted
(``CockpitHandler.dropped``) and the connection is retried with exponential
backoff; after every (re)connection the last pipe structure is sent again, so a
restarted cockpit learns the pipe anew.

Process model: the thread starts on first use, never in the constructor, so a
pipe can create its logger and then fork flow processes from a thread-free
daemon. A handler used in a forked child starts its own queue, thread and
connection there, with counters at zero; the child does not re-send the
parent's pipe structure.

The handler's own diagnostics go to the stdlib logger ``pipert.socket_logger``.
Records of that logger, and of the transport's loggers (socketio, engineio,
requests, urllib3, websocket), are never sent to the cockpit: they would feed
back into the transport that produced them.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from functools import lru_cache
from urllib.parse import urlsplit

import dotenv
import socketio

from pipert.log import PIPE_INFRASTRUCTURE

URL_VARIABLE = "SOCKET_LOGGER_URL"
"""Environment (or ``.env``) variable holding the cockpit's address."""

_log = logging.getLogger(__name__)
_transport_log = logging.getLogger(f"{__name__}.transport")
if _transport_log.level == logging.NOTSET:
    # socket.io warns even about a clean disconnect; the handler's own warnings tell
    # what matters (unreachable, lost, dropped). Lower this level to debug the transport.
    _transport_log.setLevel(logging.ERROR)

_NOT_FORWARDED = ("pipert.socket_logger", "socketio", "engineio", "requests", "urllib3",
                  "websocket", "charset_normalizer")
_NOT_FORWARDED_PREFIXES = tuple(f"{name}." for name in _NOT_FORWARDED)

_COCKPIT_LEVELS = ((PIPE_INFRASTRUCTURE, "PIPE_INFRASTRUCTURE"), (logging.DEBUG, "DEBUG"),
                   (logging.INFO, "INFO"), (logging.WARNING, "WARNING"),
                   (logging.ERROR, "ERROR"), (logging.CRITICAL, "ERROR"))
"""The cockpit stores records per level and knows only these (CRITICAL becomes ERROR)."""

_Record = tuple[float, str, str, str]
"""A queued log record: created, source, cockpit level, formatted message."""

_IDLE_SECONDS = 0.25
"""How often an idle sending thread checks that its connection is still up."""
_warned_no_url = False


@lru_cache(maxsize=None)
def _level_name(levelno: int) -> str:
    """The cockpit level nearest to ``levelno``; a tie goes to the more severe one."""
    return min(_COCKPIT_LEVELS, key=lambda known: (abs(known[0] - levelno), -known[0]))[1]


def _cockpit_level(record: logging.LogRecord) -> str:
    return "EXCEPTION" if record.exc_info or record.exc_text else _level_name(record.levelno)


def _payload(created: float, source: str, level: str, message: str) -> str:
    """The JSON string the cockpit parses; json.dumps keeps it valid whatever the message."""
    msecs = int((created - int(created)) * 1000)
    stamp = time.strftime("%d-%m-%y %H:%M:%S", time.localtime(created)) + f".{msecs:03d}"
    return json.dumps({"time": stamp, "source": source, "level": level, "message": message})


def _structure_message(structure: dict) -> str:
    """``structure`` as JSON with every ``"`` turned into ``'``: the cockpit turns them
    back before parsing.

    A ``'`` inside a string would become a stray ``"`` on the way back, so it is
    written as the JSON escape ``\\u0027`` first; a ``"`` inside a string is ``\\"``
    in JSON, travels as ``\\'`` and comes back as ``\\"``. The round trip is
    exact. Values JSON cannot encode are sent as their ``str()``.
    """
    return json.dumps(structure, default=str).replace("'", "\\u0027").replace('"', "'")


def _cockpit_url(url: str) -> str:
    """``scheme://host:port`` of ``url``: the cockpit serves socket.io at ``/socket.io/``
    whatever path the URL names. A URL without a scheme is taken as ``http://``."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    scheme = {"http": "http", "ws": "http", "https": "https", "wss": "https"}.get(parts.scheme)
    try:
        parts.port  # raises ValueError on a malformed port
    except ValueError:
        scheme = None
    if scheme is None or not parts.hostname:
        raise ValueError(
            f"cockpit URL {url!r} is not usable: expected http://HOST:PORT, e.g. "
            f"http://localhost:3000. Fix the URL passed to get_socket_logger or {URL_VARIABLE}."
        )
    return f"{scheme}://{parts.netloc}"


class CockpitHandler(logging.Handler):
    """Sends records to the cockpit as socket.io ``log`` events, dropping what it cannot send.

    ``emit`` never blocks and never raises: it formats the record and appends it
    to a bounded in-memory queue, or drops it if ``queue_size`` records are
    already waiting. A daemon thread, started on first use, connects to ``url``
    and sends. When the cockpit is down, what is queued is dropped and the
    connection is retried after ``backoff_initial`` seconds, doubling up to
    ``backoff_max``; records logged before the first connection attempt are
    kept for it. When the cockpit is slow, at most ``queue_size`` records wait
    inside socket.io as well; the rest are dropped.

    ``sent`` counts records handed to a connected socket.io client (records
    handed over just before a connection breaks are lost without being counted
    as dropped); ``dropped`` counts the rest. The drop count is reported through
    the ``pipert.socket_logger`` logger at most every ``report_interval`` seconds.
    ``source`` is the source of ``pipe_creation`` records.
    """

    def __init__(self, url: str, queue_size: int = 1000, connect_timeout: float = 2.0,
                 backoff_initial: float = 0.5, backoff_max: float = 10.0,
                 flush_timeout: float = 1.0, report_interval: float = 30.0,
                 source: str = "pipert", level: int = logging.NOTSET) -> None:
        super().__init__(level)
        if queue_size < 1:
            raise ValueError(f"CockpitHandler queue_size must be at least 1, got {queue_size}.")
        self.url = _cockpit_url(url)
        self.source = source
        self._queue_size = queue_size
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = max(backoff_max, backoff_initial)
        self._flush_timeout = flush_timeout
        self._report_interval = report_interval
        self._structure: str | None = None  # last pipe_creation payload
        self._last_error: Exception | None = None  # last connection failure, for the warnings
        self._closed = False
        self._start_process(os.getpid())

    def _start_process(self, pid: int) -> None:
        """Fresh per-process state: the first use in a forked child calls this again,
        because the parent's thread and connection do not exist there."""
        self._pid = pid
        # A deque, not a queue.Queue: appending takes no lock and wakes no thread,
        # so a burst of records costs the emitting thread next to nothing. The
        # sending thread does the JSON encoding, and only for records it sends.
        self._records: deque[_Record] = deque()
        self._wake = threading.Event()  # set when records arrive in an empty queue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped_full = 0  # counted under self.lock by emitting threads
        self._dropped_unsent = 0  # counted by the sending thread only
        self._sent = 0

    @property
    def dropped(self) -> int:
        """Records of this process that did not reach the cockpit's connection."""
        return self._dropped_full + self._dropped_unsent

    @property
    def sent(self) -> int:
        """Records of this process handed to a connected socket.io client."""
        return self._sent

    def emit(self, record: logging.LogRecord) -> None:
        """Queue ``record`` for the cockpit, or drop it; never blocks, never raises."""
        name = record.name
        if name in _NOT_FORWARDED or name.startswith(_NOT_FORWARDED_PREFIXES):
            return
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._put((record.created, name, _cockpit_level(record), message))

    def send_pipe_creation(self, structure: dict) -> None:
        """Announce the pipe's ``structure`` to the cockpit, now and after every reconnection.

        ``structure`` is ``{"Routines": [{"flow_name", "routine_name", "events"}],
        "Events": [...]}``; see :func:`_structure_message` for its encoding. Only
        the last structure is kept. Never blocks.
        """
        payload = _payload(time.time(), self.source, "INFO", _structure_message(structure))
        with self.lock:
            if self._pid != os.getpid():
                self._start_process(os.getpid())
            self._structure = payload
            self._ensure_thread()
        self._wake.set()

    def _put(self, item: _Record) -> None:
        with self.lock:
            if self._pid != os.getpid():
                self._start_process(os.getpid())
                self._structure = None  # the parent process announces the pipe
            if not self._ensure_thread() or len(self._records) >= self._queue_size:
                self._dropped_full += 1
                return
            self._records.append(item)
        if not self._wake.is_set():
            self._wake.set()

    def _ensure_thread(self) -> bool:
        """Start the sending thread if it is not running; False if it cannot run (closed,
        or no thread can be started). Needs self.lock."""
        if self._closed:
            return False
        if self._thread is None or not self._thread.is_alive():
            thread = threading.Thread(target=self._run, args=(self._records, self._wake, self._stop),
                                      name="pipert-cockpit-logger", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no new threads: the interpreter is exiting, or out of resources
                return False
            self._thread = thread
        return True

    def close(self) -> None:
        """Stop sending: deliver what is queued for at most ``flush_timeout`` seconds, then
        disconnect. Later records are dropped."""
        with self.lock:
            self._closed = True
            self._stop.set()
            self._wake.set()
            thread = self._thread if self._pid == os.getpid() else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._flush_timeout + 0.5)
        super().close()

    # The sending thread. It never takes self.lock: logging.shutdown() holds that
    # lock while it waits in close() for this thread to finish.

    def _run(self, records: deque[_Record], wake: threading.Event,
             stop: threading.Event) -> None:
        client: socketio.Client | None = None
        announced: str | None = None  # the structure payload this connection has sent
        backoff = self._backoff_initial
        failures = 0
        reported, last_report = 0, time.monotonic()
        while not stop.is_set():
            if time.monotonic() - last_report >= self._report_interval:
                reported, last_report = self._report_drops(reported, client is not None)
            if client is None:
                client = self._connect(self._connect_timeout)
                if client is None:
                    failures += 1
                    self._log_failure(failures, backoff)
                    stop.wait(backoff)
                    self._drop_queued(records)
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
                self._log_connected(failures)
                failures, backoff, announced = 0, self._backoff_initial, None
            alive, announced = self._announce(client, announced)
            if not alive:
                client = self._lost(client)
                continue
            if not records:
                wake.wait(_IDLE_SECONDS)
                wake.clear()  # before looking at the queue again: no arrival goes unnoticed
                if not client.connected:
                    client = self._lost(client)
                continue
            if not self._send_log(client, records.popleft()):
                client = self._lost(client)
        self._flush(client, announced, records)

    def _connect(self, timeout: float) -> socketio.Client | None:
        client = socketio.Client(reconnection=False, handle_sigint=False, request_timeout=timeout,
                                 logger=_transport_log, engineio_logger=_transport_log)
        try:
            client.connect(self.url, socketio_path="socket.io", wait_timeout=timeout)
        except Exception as error:  # any failure to connect means: retry later
            self._last_error = error
            _disconnect(client)
            return None
        return client

    def _announce(self, client: socketio.Client, announced: str | None) -> tuple[bool, str | None]:
        """Send the pipe structure if this connection has not sent the current one yet.

        Returns whether the connection is alive and the structure it has now sent.
        """
        structure = self._structure
        if structure is None or structure is announced:
            return True, announced
        return self._emit(client, "pipe_creation", structure), structure

    def _send_log(self, client: socketio.Client, record: _Record) -> bool:
        """Send one record unless ``queue_size`` packets already wait in socket.io (the
        cockpit is too slow: it is dropped); False if the connection is gone."""
        if _backlog(client) >= self._queue_size:
            self._dropped_unsent += 1
            return True
        return self._emit(client, "log", _payload(*record))

    def _emit(self, client: socketio.Client, event: str, payload: str) -> bool:
        """Hand one payload to socket.io; False if the connection is gone."""
        try:
            client.emit(event, payload)
        except Exception:
            self._dropped_unsent += 1
            return False
        self._sent += 1
        return True

    def _lost(self, client: socketio.Client) -> None:
        """Forget a broken connection; returns the new (absent) client."""
        _log.warning("lost the connection to the cockpit at %s; log records are dropped until "
                     "it is back, reconnecting", self.url)
        _disconnect(client)
        return None

    def _drop_queued(self, records: deque[_Record]) -> None:
        for _ in range(len(records)):
            records.popleft()
            self._dropped_unsent += 1

    def _flush(self, client: socketio.Client | None, announced: str | None,
               records: deque[_Record]) -> None:
        """On close: send what is queued (connecting if need be) until ``flush_timeout``."""
        deadline = time.monotonic() + self._flush_timeout
        if client is None and records:
            client = self._connect(max(0.1, min(self._connect_timeout, self._flush_timeout)))
            announced = None
        if client is None:
            self._drop_queued(records)
            return
        delivering, _ = self._announce(client, announced)
        while delivering and records and time.monotonic() < deadline:
            delivering = self._send_log(client, records.popleft())
        while delivering and _backlog(client) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._drop_queued(records)
        _disconnect(client)

    def _log_failure(self, failures: int, backoff: float) -> None:
        if failures == 1:
            _log.warning("cannot reach the cockpit at %s (%s); log records are dropped and the "
                         "connection is retried every %.1f to %.0f s. Check that the cockpit is "
                         "running and that %s points to it.", self.url, self._last_error,
                         self._backoff_initial, self._backoff_max, URL_VARIABLE)
        else:
            _log.debug("cockpit at %s still unreachable (%s); next attempt in %.1f s",
                       self.url, self._last_error, backoff)

    def _log_connected(self, failures: int) -> None:
        if failures:
            _log.warning("connected to the cockpit at %s after %d failed attempts; %d log records "
                         "dropped so far", self.url, failures, self.dropped)
        else:
            _log.debug("connected to the cockpit at %s", self.url)

    def _report_drops(self, reported: int, connected: bool) -> tuple[int, float]:
        """Warn about records dropped since the last report; returns the new baseline."""
        dropped = self.dropped
        if dropped > reported:
            _log.warning("%d log records were not sent to the cockpit at %s in the last %.0f s "
                         "(%d in total): %s", dropped - reported, self.url, self._report_interval,
                         dropped, "it is too slow" if connected else "it is unreachable")
        return dropped, time.monotonic()


def _backlog(client: socketio.Client) -> int:
    """Packets waiting in the engine.io client's send queue (an internal of python-engineio)."""
    pending = getattr(client.eio, "queue", None)
    return pending.qsize() if pending is not None else 0


def _disconnect(client: socketio.Client) -> None:
    try:
        client.disconnect()
    except Exception as error:  # a half-open connection may fail to close; it is gone anyway
        _log.debug("error while disconnecting from the cockpit: %s", error)


def _url_from_environment() -> str | None:
    """``SOCKET_LOGGER_URL`` from the environment, else from the nearest ``.env`` file
    upwards from the current directory. The environment is not modified."""
    url = os.environ.get(URL_VARIABLE)
    if url:
        return url
    path = dotenv.find_dotenv(usecwd=True)
    return (dotenv.dotenv_values(path).get(URL_VARIABLE) or None) if path else None


class _StderrFallback(logging.StreamHandler):
    """What :func:`get_socket_logger` attaches when no cockpit address is configured."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def find_cockpit_handler(logger: logging.Logger) -> CockpitHandler | None:
    """The :class:`CockpitHandler` that records of ``logger`` reach, if any, following
    propagation like logging does; use it to call ``send_pipe_creation``."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, CockpitHandler):
                return handler
        current = current.parent if current.propagate else None
    return None


def get_socket_logger(name: str, level: int = logging.INFO, url: str | None = None) -> logging.Logger:
    """``logging.getLogger(name)`` at ``level``, sending its records to the cockpit.

    The cockpit's address is ``url``, else ``SOCKET_LOGGER_URL`` from the
    environment, else from the nearest ``.env`` file. Without an address the
    records go to stderr instead, and one warning per process says so. Calling
    it again does not add a second handler; with a different address the
    logger's cockpit (or stderr) handler is closed and replaced.
    """
    global _warned_no_url
    logger = logging.getLogger(name)
    logger.setLevel(level)
    target = url or _url_from_environment()
    target = _cockpit_url(target) if target else None
    for existing in list(logger.handlers):
        if isinstance(existing, (CockpitHandler, _StderrFallback)):
            if (existing.url if isinstance(existing, CockpitHandler) else None) == target:
                return logger
            logger.removeHandler(existing)
            existing.close()
    handler: logging.Handler
    if target is None:
        handler = _StderrFallback()
        if not _warned_no_url:
            _warned_no_url = True
            _log.warning("%s is not set (not passed, not in the environment, not in a .env file): "
                         "logs of %r go to stderr, not to the PipeRT cockpit. To send them, set "
                         "%s=http://HOST:PORT in the environment or in .env.",
                         URL_VARIABLE, name, URL_VARIABLE)
    else:
        handler = CockpitHandler(target, source=name)
    logger.addHandler(handler)
    return logger
