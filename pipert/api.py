"""Control a running pipe over HTTP: the routes the PipeRT cockpit calls, and a few more.

Every route answers GET and POST, with or without a trailing slash, and takes an
optional JSON body ``{"extra_args": {...}}`` (no body, or an empty one, is
fine; the cockpit often sends none, sometimes with Content-Type json)::

    /start  /pause  /kill                            start, pause (stop event), kill
    /pipe/structure  /status                         the pipe's structure and counters
    /routines/<routine>/events/<event>/execute       send <event> to one routine
    /routines/events/<event>/execute                 send <event> to every routine handling it
    /  /dashboard/<file>  /dashboard/stream          the web dashboard, its files, its live stream

``extra_args`` are the parameters of the event's handlers (start and pause
pass them too; kill, structure and status take none;
``/routines/events/kill/execute`` is ``/kill``). Responses are JSON: an event's
acknowledgement ``{"event", "handled_by", "errors", "pending"}``, or
``{"error": "..."}`` with a 4xx status for bad input (400, 413 over 1 MB), a
missing or wrong token (401), an unknown route or routine (404) or method
(405). CORS is open so the cockpit's browser page can call the API; preflight
requests need no token.

The server is gevent's WSGI server on its own thread and hub; blocking waits
run on that hub's thread pool, so a slow event handler never delays other
requests. Only JSON is parsed: nothing received is ever unpickled.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import gevent
import gevent.pool
from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer

from .control import Control, ControlError
from .dashboard import Dashboard, Reply
from .events import KILL_EVENT_NAME, START_EVENT_NAME, STOP_EVENT_NAME
from .pipe import Pipe

_MAX_BODY = 1 << 20
_MAX_CONNECTIONS = 100
_STOP_TIMEOUT = 3.0  # seconds requests under way get to finish when the server stops
_TOKEN_HELP = "send the header 'Authorization: Bearer TOKEN' or 'X-Pipert-Token: TOKEN'"
_PREFLIGHT = [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
              ("Access-Control-Allow-Headers", "Content-Type, Authorization, X-Pipert-Token"),
              ("Access-Control-Max-Age", "600")]
_STATUS_TEXT = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error"}
_log = logging.getLogger(__name__)


def _route(pattern: str) -> "re.Pattern[str]":
    return re.compile(re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", pattern) + "/?")


_ROUTES: List[Tuple["re.Pattern[str]", str]] = [
    (_route("/start"), "start"),
    (_route("/pause"), "pause"),
    (_route("/kill"), "kill"),
    (_route("/pipe/structure"), "structure"),
    (_route("/status"), "status"),
    (_route("/routines/events/<event>/execute"), "execute_all"),
    (_route("/routines/<routine>/events/<event>/execute"), "execute_routine"),
    (_route(""), "page"),
    (_route("/dashboard/stream"), "stream"),
    (_route("/dashboard/<asset>"), "asset"),
]
_ROUTE_LIST = "/start, /pause, /kill, /pipe/structure, /status, /routines/<routine>/events/<event>/execute, " \
              "/routines/events/<event>/execute, / (the dashboard), /dashboard/stream"
_PUBLIC = ("page", "asset")  # the dashboard's page and files: code without data, served without the token


def _request_token(environ: Dict[str, Any]) -> Optional[str]:
    scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return environ.get("HTTP_X_PIPERT_TOKEN") or None


def _extra_args(environ: Dict[str, Any]) -> Dict[str, Any]:
    """The ``extra_args`` of the request's JSON body; {} without a body."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit() and int(length) > _MAX_BODY:
        raise ControlError(f"the request body has {length} bytes; the limit is {_MAX_BODY}", 413)
    body = environ["wsgi.input"].read(_MAX_BODY + 1)
    if len(body) > _MAX_BODY:
        raise ControlError(f"the request body is over {_MAX_BODY} bytes", 413)
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"the request body is not valid JSON ({exc}): send {{\"extra_args\": {{...}}}} "
                           "or no body") from None
    if not isinstance(document, dict) or set(document) - {"extra_args"}:
        raise ControlError(f"the request body must be a JSON object {{\"extra_args\": {{...}}}}, not "
                           f"{json.dumps(document)[:200]}")
    extra = document.get("extra_args")
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ControlError(f"\"extra_args\" must be a JSON object of event parameters, not {json.dumps(extra)[:200]}")
    return extra


class _Handler(WSGIHandler):
    """Counts the requests being answered, so that stopping waits for them but not for idle
    keep-alive connections."""

    def handle_one_response(self) -> None:
        self.server.answering += 1
        try:
            super().handle_one_response()
        finally:
            self.server.answering -= 1


class _Server(WSGIServer):
    """gevent's WSGI server, answering without Nagle's delay (its response goes out in more than one
    write, which on a keep-alive connection would wait ~40 ms for the client's delayed ACK), and
    stopping as soon as the requests under way are answered."""

    handler_class = _Handler
    answering = 0

    def handle(self, sock: socket.socket, address: Tuple[str, int]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)

    def stop_when_answered(self, timeout: float) -> None:
        """Stop accepting, give the requests under way ``timeout`` seconds, close every connection."""
        self.close()
        deadline = time.monotonic() + timeout
        while self.answering and time.monotonic() < deadline:
            gevent.sleep(0.02)
        self.stop(timeout=0)


class APIWrapper:
    """An HTTP server on ``host``:``port`` that controls ``pipe``; with ``token`` set it refuses
    requests that lack it. ``ack_timeout`` bounds the wait for an event's acknowledgements."""

    def __init__(self, host: str, port: int, pipe: Pipe, token: Optional[str] = None,
                 ack_timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.control = Control(pipe, token, ack_timeout)
        self.dashboard = Dashboard(self.control)
        self.address: Optional[Tuple[str, int]] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    # ----- serving -----

    def run(self) -> None:
        """Start serving on a background thread; returns once the server listens (raises OSError if it
        cannot). The server stops once every flow of the (built) pipe has exited for good and the pipe
        is shut down, after answering the requests under way."""
        if self._thread is not None:
            raise RuntimeError("this APIWrapper already runs: create one per server")
        listening = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(listening,), name="pipert-http", daemon=True)
        self._thread.start()
        listening.wait()
        if self._error is not None:
            raise self._error

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the server has stopped; False if it still runs after ``timeout`` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _serve(self, listening: threading.Event) -> None:
        try:
            server = _Server((self.host, self.port), self, spawn=gevent.pool.Pool(_MAX_CONNECTIONS),
                             log=LoggingLogAdapter(_log, logging.DEBUG), error_log=_log)
            server.start()
        except BaseException as exc:
            self._error = exc
            listening.set()
            return
        self.address = server.address[:2]
        listening.set()
        try:
            self.control.wait_ended()
        finally:
            self.dashboard.close()
            server.stop_when_answered(_STOP_TIMEOUT)

    # ----- the WSGI application -----

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        try:
            if method == "OPTIONS":  # a browser's CORS preflight: it carries no credentials
                self._find(path)
                return self._respond(start_response, 204, None, _PREFLIGHT)
            if self._route_name(path) not in _PUBLIC:
                self.control.authorize(_request_token(environ), _TOKEN_HELP)
            handler, match = self._find(path)
            if method not in ("GET", "POST"):
                raise ControlError(f"{path} answers GET and POST, not {method}", 405)
            result = handler(_extra_args(environ), **match)
            if isinstance(result, Reply):
                return result.send(environ, start_response)
            return self._respond(start_response, 200, result)
        except ControlError as exc:
            _log.warning("refused HTTP %s %s: %s", method, path, exc)
            headers = [("Allow", "GET, POST, OPTIONS")] if exc.status == 405 else []
            if exc.status == 401:
                headers.append(("WWW-Authenticate", 'Bearer realm="pipert"'))
            return self._respond(start_response, exc.status, {"error": str(exc)}, headers)
        except Exception:
            _log.exception("HTTP %s %s failed", method, path)
            return self._respond(start_response, 500, {"error": f"{method} {path} failed inside the daemon: "
                                                                "see its log"})

    @staticmethod
    def _route_name(path: str) -> Optional[str]:
        return next((name for pattern, name in _ROUTES if pattern.fullmatch(path)), None)

    def _find(self, path: str) -> Tuple[Callable[..., Any], Dict[str, str]]:
        for pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match:
                return getattr(self, f"_{name}"), match.groupdict()
        raise ControlError(f"there is no route {path}; routes are {_ROUTE_LIST}", 404)

    @staticmethod
    def _respond(start_response: Callable, status: int, document: Any,
                 headers: Iterable[Tuple[str, str]] = ()) -> List[bytes]:
        body = b"" if document is None else json.dumps(document).encode("utf-8")
        all_headers = [("Access-Control-Allow-Origin", "*"), *headers]
        if document is not None:
            all_headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(f"{status} {_STATUS_TEXT[status]}", all_headers)
        return [body]

    # ----- routes -----

    @staticmethod
    def _no_arguments(route: str, extra_args: Dict[str, Any]) -> None:
        if extra_args:
            raise ControlError(f"{route} takes no extra_args (got {sorted(extra_args)}): send no body or "
                               "{\"extra_args\": {}}")

    def _start(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        return self.control.send(START_EVENT_NAME, None, extra_args)

    def _pause(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        return self.control.send(STOP_EVENT_NAME, None, extra_args)

    def _kill(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        self._no_arguments("/kill", extra_args)
        return self.control.kill()

    def _structure(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        self._no_arguments("/pipe/structure", extra_args)
        return self.control.structure()

    def _status(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        self._no_arguments("/status", extra_args)
        return self.control.status()

    def _execute_all(self, extra_args: Dict[str, Any], event: str) -> Dict[str, Any]:
        if event == KILL_EVENT_NAME:  # the cockpit's "kill" for the whole pipe: as /kill
            return self._kill(extra_args)
        return self.control.send(event, None, extra_args)

    def _execute_routine(self, extra_args: Dict[str, Any], event: str, routine: str) -> Dict[str, Any]:
        return self.control.send(event, {self.control.flow_of(routine): [routine]}, extra_args)

    def _page(self, extra_args: Dict[str, Any]) -> Reply:
        return self.dashboard.asset("index.html")

    def _asset(self, extra_args: Dict[str, Any], asset: str) -> Reply:
        return self.dashboard.asset(asset)

    def _stream(self, extra_args: Dict[str, Any]) -> Reply:
        self._no_arguments("/dashboard/stream", extra_args)
        return self.dashboard.stream()
