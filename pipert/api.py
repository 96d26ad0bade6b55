"""Control a running pipe over HTTP: the routes the PipeRT cockpit calls, and a few more.

Every route answers GET and POST, with or without a trailing slash, and takes an
optional JSON body ``{"extra_args": {...}}`` (no body, or an empty one, is
fine; the cockpit often sends none, sometimes with Content-Type json)::

    /start  /pause  /kill                            start, pause (stop event), kill
    /pipe/structure  /status                         the pipe's structure and counters
    /routines/<routine>/events/<event>/execute       send <event> to one routine
    /routines/events/<event>/execute                 send <event> to every routine handling it
    /routines/<routine>/params                       set parameters: the body is {name: value, ...}
    /recording/start  /recording/stop  /recording    record wires to MCAP (extra_args {"path", "wires"}),
                                                     stop it, its status
    /  /dashboard/<file>  /dashboard/stream          the web dashboard, its files, its live stream
    /metrics                                         Prometheus metrics (text format)
    /healthz  /readyz                                health probes (no token needed)

``extra_args`` are the parameters of the event's handlers (start and pause
pass them too; kill, structure and status take none;
``/routines/events/kill/execute`` is ``/kill``). The params route takes the
parameters themselves as its JSON body, not ``extra_args``, and answers with the
acknowledgement and ``params``, the values now in force. Responses are JSON: an event's
acknowledgement ``{"event", "handled_by", "errors", "pending"}``, or
``{"error": "..."}`` with a 4xx status for bad input (400), a missing or wrong
token (401), an unknown route or routine (404) or method (405).

Every request first passes ``pipert.security``: a ``Host`` or a browser page's
origin that is not allowed gets 403 (the cockpit's origin is allowed by
default, and gets CORS headers naming it), a body over 1 MiB 413, a client too
slow to send its request 408. Preflight requests need no token. ``/readyz`` answers
200 ``{"ready": true, "reasons": []}`` or 503 with the reasons the pipeline is not ready.

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
from gevent.pywsgi import LoggingLogAdapter

from . import security
from .control import Control, ControlError
from .dashboard import Dashboard, Reply
from .events import KILL_EVENT_NAME, START_EVENT_NAME, STOP_EVENT_NAME
from .health import readiness
from .metrics import exposition
from .pipe import Pipe

_STOP_TIMEOUT = 3.0  # seconds requests under way get to finish when the server stops
_TOKEN_HELP = "send the header 'Authorization: Bearer TOKEN' or 'X-Pipert-Token: TOKEN'"
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
    (_route("/routines/<routine>/params"), "set_params"),
    (_route("/recording/start"), "start_recording"),
    (_route("/recording/stop"), "stop_recording"),
    (_route("/recording"), "recording"),
    (_route(""), "page"),
    (_route("/dashboard/stream"), "stream"),
    (_route("/dashboard/<asset>"), "asset"),
    (_route("/metrics"), "metrics"),
    (_route("/healthz"), "healthz"),
    (_route("/readyz"), "readyz"),
]
_ROUTE_LIST = "/start, /pause, /kill, /pipe/structure, /status, /routines/<routine>/events/<event>/execute, " \
              "/routines/events/<event>/execute, /routines/<routine>/params, /recording/start, /recording/stop, " \
              "/recording, / (the dashboard), /dashboard/stream, /metrics, /healthz, /readyz"
# served without the token: the dashboard's page and files (code without data), and the health probes
# (a probe carries no token)
_PUBLIC = ("page", "asset", "healthz", "readyz")


def _request_token(environ: Dict[str, Any]) -> Optional[str]:
    scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return environ.get("HTTP_X_PIPERT_TOKEN") or None


def _json_body(environ: Dict[str, Any], expected: str) -> Any:
    """The request's JSON body; None without a body. ``expected`` says what to send instead of bad JSON."""
    body = environ["wsgi.input"].read()  # read whole and bounded by pipert.security
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"the request body is not valid JSON ({exc}): send {expected}") from None


def _extra_args(environ: Dict[str, Any]) -> Dict[str, Any]:
    """The ``extra_args`` of the request's JSON body; {} without a body."""
    document = _json_body(environ, "{\"extra_args\": {...}} or no body")
    if document is None:
        return {}
    if not isinstance(document, dict) or set(document) - {"extra_args"}:
        raise ControlError(f"the request body must be a JSON object {{\"extra_args\": {{...}}}}, not "
                           f"{json.dumps(document)[:200]}")
    extra = document.get("extra_args")
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ControlError(f"\"extra_args\" must be a JSON object of event parameters, not {json.dumps(extra)[:200]}")
    return extra


class _Handler(security.LimitedHandler):
    """Counts the requests being answered, so that stopping waits for them but not for idle
    keep-alive connections."""

    def handle_one_response(self) -> None:
        self.server.answering += 1
        try:
            super().handle_one_response()
        finally:
            self.server.answering -= 1


class _Server(security.GuardedServer):
    """The guarded WSGI server, answering without Nagle's delay (its response goes out in more than one
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
    requests that lack it. ``ack_timeout`` bounds the wait for an event's acknowledgements.

    Browser pages may call it from ``allowed_origins`` (None: the cockpit's, see
    ``security.default_origins``) besides its own; it answers the ``Host`` names ``allowed_hosts``
    besides its addresses. A non-loopback ``host`` needs a ``token``, or ``insecure=True``.
    ``limits`` bound what one client may cost (``security.Limits``)."""

    def __init__(self, host: str, port: int, pipe: Pipe, token: Optional[str] = None,
                 ack_timeout: float = 10.0, allowed_origins: Optional[Iterable[str]] = None,
                 allowed_hosts: Iterable[str] = (), insecure: bool = False,
                 limits: security.Limits = security.Limits()) -> None:
        self.host = host
        self.port = port
        self.control = Control(pipe, token, ack_timeout)
        self.dashboard = Dashboard(self.control)
        self.policy = security.AccessPolicy(host, token, allowed_origins, allowed_hosts)
        self.insecure = insecure
        self.limits = limits
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
        security.check_exposure(self.control.pipe, f"HTTP on {self.host}:{self.port}", self.host, self.control.token,
                                self.insecure)
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
            server = _Server((self.host, self.port), self, self.policy, self.limits,
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
            if method == "OPTIONS":  # a browser's CORS preflight (security adds its headers): no credentials
                self._find(path)
                return self._respond(start_response, 204, None, [("Allow", "GET, POST, OPTIONS")])
            if self._route_name(path) not in _PUBLIC:
                self.control.authorize(_request_token(environ), _TOKEN_HELP)
            handler, match = self._find(path)
            if method not in ("GET", "POST"):
                raise ControlError(f"{path} answers GET and POST, not {method}", 405)
            body = _json_body(environ, "a JSON object") if handler == self._set_params else _extra_args(environ)
            result = handler(body, **match)
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

    _respond = staticmethod(security.json_response)

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

    def _metrics(self, extra_args: Dict[str, Any]) -> Reply:
        self._no_arguments("/metrics", extra_args)
        body, content_type = exposition(self.control.pipe)
        return Reply.fixed(content_type, body)

    def _healthz(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        return {"status": "serving", "pipe": self.control.pipe.id}

    def _readyz(self, extra_args: Dict[str, Any]) -> Reply:
        reasons = readiness(self.control.pipe)
        body = json.dumps({"ready": not reasons, "reasons": reasons}).encode("utf-8")
        return Reply.fixed("application/json", body, status=503 if reasons else 200)

    def _execute_routine(self, extra_args: Dict[str, Any], event: str, routine: str) -> Dict[str, Any]:
        return self.control.send(event, {self.control.flow_of(routine): [routine]}, extra_args)

    def _set_params(self, values: Any, routine: str) -> Dict[str, Any]:
        return self.control.set_params(routine, {} if values is None else values)

    def _start_recording(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        return self.control.start_recording(extra_args)

    def _stop_recording(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        self._no_arguments("/recording/stop", extra_args)
        return self.control.stop_recording()

    def _recording(self, extra_args: Dict[str, Any]) -> Dict[str, Any]:
        self._no_arguments("/recording", extra_args)
        return self.control.recording()

    def _page(self, extra_args: Dict[str, Any]) -> Reply:
        return self.dashboard.asset("index.html")

    def _asset(self, extra_args: Dict[str, Any], asset: str) -> Reply:
        return self.dashboard.asset(asset)

    def _stream(self, extra_args: Dict[str, Any]) -> Reply:
        self._no_arguments("/dashboard/stream", extra_args)
        return self.dashboard.stream()
