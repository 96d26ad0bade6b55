"""Who may talk to the daemon's control servers, and how much: the checks every HTTP request passes.

A browser lets any page it shows send requests to ``127.0.0.1``: a form post or a
``fetch(..., {mode: "no-cors"})`` goes out without a CORS preflight, and a name the
attacker controls can be re-pointed at ``127.0.0.1`` (DNS rebinding). So the HTTP
server wraps its application in a ``Guard`` that, before any route runs, refuses (403):

- a ``Host`` that is not this daemon's: the bound address, ``localhost``, a loopback
  address, the address the connection arrived on, or a name given with ``--allow-host``
  (bound to ``0.0.0.0``/``::`` with a token: any ``Host``);
- a request a browser sent for a page whose origin is not allowed: the ``Origin`` header
  (or, without one, the ``Referer``'s origin; without both, ``Sec-Fetch-Site:
  cross-site|same-site``, which modern browsers add to requests from other pages) must be
  the daemon's own origin or on the allow-list (``--allow-origin``,
  ``PIPERT_ALLOWED_ORIGINS``; by default the cockpit's). Requests from programs (curl,
  Python, Prometheus) carry none of these headers and pass.

CORS headers name the allowed origin (never ``*``) and ``Vary: Origin``. The server's
``LimitedHandler`` bounds what one client can cost: head and body sizes, the time to send
them, idle connections, and (with the server's pool) the number of connections.

``check_exposure`` refuses to serve HTTP or RPC on a non-loopback address without a token
unless asked to be insecure, and records the exposure so ``status()`` can warn about it.
"""
from __future__ import annotations

import http
import http.client
import ipaddress
import json
import logging
import socket
import weakref
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

import gevent
import gevent.pool
from gevent.pywsgi import Input, WSGIHandler, WSGIServer

from .errors import PipeError
from .socket_logger import _url_from_environment as cockpit_url

ORIGINS_VARIABLE, HOSTS_VARIABLE = "PIPERT_ALLOWED_ORIGINS", "PIPERT_ALLOWED_HOSTS"
COCKPIT_ORIGIN = "http://localhost:3000"
"""Where the PipeRT cockpit's browser page is served by default; it calls the HTTP API directly."""
WILDCARDS = ("0.0.0.0", "::", "")
LOCAL_ADDRESS = "pipert.local_address"
"""WSGI environ key: the IP address the request's connection arrived on."""
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_HEADERS = "Content-Type, Authorization, X-Pipert-Token"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one HTTP client may cost the daemon. ``timeout`` bounds the time to send a request's
    head (request line and headers, counted from the connection or the previous response), the
    time to send its body, and every single read or write on the socket. The request line's limit
    is gevent's own (``gevent.pywsgi.MAX_REQUEST_LINE``, 8 KiB; 414 beyond it)."""

    max_body: int = 1 << 20
    max_head: int = 64 << 10
    max_connections: int = 512
    timeout: float = 10.0


class InsecureBindingError(PipeError):
    """A control server would listen on a network address without a token."""


# ----- addresses and origins -----

def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
        return address.is_loopback or bool(mapped and mapped.is_loopback)
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def endpoint_host(endpoint: str) -> Optional[str]:
    """The host a zerorpc endpoint listens on (``tcp://HOST:PORT``); None for local transports (ipc, inproc)."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp":
        return None
    return parts.netloc.rpartition(":")[0].strip("[]")


def _hostname(authority: str) -> str:
    """The host of ``host[:port]`` (brackets removed, lower case, no trailing dot); ValueError if malformed."""
    if authority.count(":") > 1 and not authority.startswith("["):  # a bare IPv6 address
        authority = f"[{authority}]"
    parts = urlsplit("//" + authority)
    parts.port  # raises ValueError for a malformed port
    if not parts.hostname or parts.username is not None or parts.path:
        raise ValueError(authority)
    return parts.hostname.rstrip(".")


def normalize_origin(value: str) -> str:
    """``scheme://host[:port]`` in the form browsers send in ``Origin`` (lower case, default port left
    out); ValueError with the fix if ``value`` is no such origin."""
    fix = f"origin {value!r} is not scheme://host[:port]: write e.g. http://localhost:3000 (no path, no '*')"
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError(fix) from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None or "*" in value:
        raise ValueError(fix)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, _DEFAULT_PORTS[parts.scheme]) else "")


def _origin_of(url: str) -> Optional[str]:
    """The origin of ``url`` (as browsers send it), or None."""
    try:
        parts = urlsplit(url)
        return normalize_origin(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}")
    except ValueError:
        return None


def split_list(value: Optional[str]) -> List[str]:
    """The items of a comma-separated setting such as ``PIPERT_ALLOWED_ORIGINS``."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def default_origins() -> List[str]:
    """The cockpit's origins: that of ``SOCKET_LOGGER_URL`` (environment or ``.env``) when set, and
    ``http://localhost:3000``."""
    url = cockpit_url()
    cockpit = _origin_of(url) if url else None
    return list(dict.fromkeys([cockpit, COCKPIT_ORIGIN] if cockpit else [COCKPIT_ORIGIN]))


def host_name(value: str) -> str:
    """A name given with ``--allow-host``, as compared with a request's ``Host``."""
    try:
        if "://" in value or "/" in value:
            raise ValueError(value)
        return _hostname(value.strip())
    except ValueError:
        raise ValueError(f"host {value!r} is not a host name: write e.g. pipert.example.org or 192.168.1.20 "
                         "(no scheme, no path)") from None


# ----- exposure without a token -----

_exposed: "weakref.WeakKeyDictionary[Any, List[str]]" = weakref.WeakKeyDictionary()


def needs_token(host: Optional[str], token: Optional[str]) -> bool:
    """True if a server listening on ``host`` (None: a local transport) would be open to others without
    a token: it is not loopback and no token is set."""
    return not token and host is not None and not is_loopback(host)


_FIX = "Pass token=TOKEN (clients then send it), bind to 127.0.0.1, or pass insecure=True to serve without one anyway"


def check_exposure(owner: Any, where: str, host: Optional[str], token: Optional[str], insecure: bool,
                   fix: str = _FIX) -> None:
    """Refuse (``InsecureBindingError``, whose message ends with ``fix``) to serve ``where`` (e.g. "HTTP
    on 0.0.0.0:4000") on a non-loopback ``host`` without a token, unless ``insecure``; then log a loud
    warning and record the exposure on ``owner`` (the pipe) for ``exposure``."""
    if not needs_token(host, token):
        return
    if not insecure:
        raise InsecureBindingError(f"refusing to serve {where} without a token: anyone who can reach that "
                                   f"address could pause, kill or drive the pipeline. {fix}")
    _log.warning("INSECURE: %s serves WITHOUT A TOKEN (insecure mode): anyone who can reach it controls the "
                 "pipeline. Set a token (--token, PIPERT_TOKEN in the environment or .env)", where)
    _exposed.setdefault(owner, []).append(where)


def exposure(owner: Any) -> Dict[str, Any]:
    """``{"insecure": bool}``, plus ``"security_warning"`` naming the servers open without a token."""
    servers = _exposed.get(owner)
    if not servers:
        return {"insecure": False}
    serve, them = ("serves", "it") if len(servers) == 1 else ("serve", "them")
    return {"insecure": True,
            "security_warning": f"{' and '.join(servers)} {serve} without a token (--insecure): anyone who can "
                                f"reach {them} can pause, kill or drive this pipeline; set a token (--token or "
                                "PIPERT_TOKEN)"}


# ----- the request check -----

class AccessPolicy:
    """Which ``Host`` and ``Origin`` values the HTTP server bound to ``host`` answers."""

    def __init__(self, host: str, token: Optional[str], origins: Optional[Iterable[str]] = None,
                 hosts: Iterable[str] = ()) -> None:
        """``origins``: allowed web origins besides the daemon's own (None: ``default_origins()``);
        ``hosts``: extra names the daemon is reached by. ValueError names a malformed entry."""
        wildcard = host in WILDCARDS
        self.any_host = wildcard and bool(token)
        self.hosts = {"localhost", *(host_name(name) for name in hosts)}
        if not wildcard:
            self.hosts.add(host_name(host))
        self.origins = {normalize_origin(origin) for origin in (default_origins() if origins is None else origins)}

    def _host_allowed(self, name: str, environ: Dict[str, Any]) -> bool:
        if self.any_host or name in self.hosts or name == environ.get(LOCAL_ADDRESS):
            return True
        return is_loopback(name)

    @staticmethod
    def _own_origins(environ: Dict[str, Any]) -> List[Optional[str]]:
        """The origins of a page this daemon served: the scheme and ``Host`` the request was sent to."""
        host = environ.get("HTTP_HOST")
        return [_origin_of(f"{scheme}://{host}") for scheme in _DEFAULT_PORTS] if host else []

    def refusal(self, environ: Dict[str, Any]) -> Optional[str]:
        """Why the request must be refused (403), or None."""
        host = environ.get("HTTP_HOST")
        if host is not None:
            try:
                name = _hostname(host)
            except ValueError:
                return f"the Host header {host!r} is malformed"
            if not self._host_allowed(name, environ):
                return (f"Host {host!r} is not a name of this daemon (a page that re-points its own name at "
                        f"this address sends such a Host): if you reach the daemon by that name, start it with "
                        f"--allow-host {name} (or {HOSTS_VARIABLE})")
        origin = environ.get("HTTP_ORIGIN")
        if origin is None and environ.get("HTTP_REFERER"):
            origin = _origin_of(environ["HTTP_REFERER"]) or "a page whose Referer names no origin"
        if origin is None:
            site = environ.get("HTTP_SEC_FETCH_SITE", "none")
            if site in ("same-origin", "none"):
                return None  # no browser page asked for this (or one of ours did)
            return (f"a page of another site made the browser send this request without naming its origin "
                    f"(Sec-Fetch-Site: {site}): open the URL yourself, or call it with fetch() from an allowed "
                    "origin")
        normal = _origin_of(origin)
        if normal is not None and (normal in self.origins or normal in self._own_origins(environ)):
            return None
        return (f"the request comes from a page at {origin}, which may not control this daemon: if you trust it, "
                f"start the daemon with --allow-origin {normal or 'ORIGIN'} (or {ORIGINS_VARIABLE})")

    @staticmethod
    def cors_headers(environ: Dict[str, Any]) -> List[Tuple[str, str]]:
        """Headers for the answer to an allowed request: the CORS ones name its origin (never ``*``);
        a preflight (OPTIONS with Access-Control-Request-Method) also gets the methods and headers."""
        headers = [("Vary", "Origin"), ("X-Content-Type-Options", "nosniff")]
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            return headers
        headers.append(("Access-Control-Allow-Origin", origin))
        if environ["REQUEST_METHOD"] == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
            headers += [("Access-Control-Allow-Methods", _CORS_METHODS),
                        ("Access-Control-Allow-Headers", _CORS_HEADERS),
                        ("Access-Control-Max-Age", "600")]
            if environ.get("HTTP_ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK") == "true":
                headers.append(("Access-Control-Allow-Private-Network", "true"))
        return headers


def json_response(start_response: Callable, status: int, document: Any,
                  headers: Iterable[Tuple[str, str]] = ()) -> List[bytes]:
    """Answer ``document`` as JSON with ``status`` (None: no body)."""
    body = b"" if document is None else json.dumps(document).encode("utf-8")
    all_headers = list(headers)
    if document is not None:
        all_headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(f"{status} {http.HTTPStatus(status).phrase}", all_headers)
    return [body]


class Guard:
    """WSGI middleware: every request passes ``policy`` before ``application`` sees it, and every
    answer gets the policy's CORS headers (the application's own Access-Control-* are dropped)."""

    def __init__(self, application: Callable, policy: AccessPolicy) -> None:
        self.application = application
        self.policy = policy

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        refusal = self.policy.refusal(environ)
        if refusal is not None:
            _log.warning("refused HTTP %s %s from %s: %s", environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                         environ.get("REMOTE_ADDR", "?"), refusal)
            return json_response(start_response, 403, {"error": f"refused: {refusal}"}, [("Vary", "Origin")])
        extra = self.policy.cors_headers(environ)

        def start(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
            kept = [(name, value) for name, value in headers if not name.lower().startswith("access-control-")]
            return start_response(status, kept + extra, exc_info)

        return self.application(environ, start)


# ----- limits -----

class _HeadTooLarge(ValueError):
    pass


class _HeadCut(ValueError):
    pass


class _SlowRequest(socket.timeout):
    pass


class _Budget:
    """A request head's reader that refuses to read more than ``left`` bytes in all, or a head that
    the connection's end cuts short (http.client would take it as complete)."""

    def __init__(self, stream: Any, left: int) -> None:
        self.stream = stream
        self.left = left

    def readline(self, size: int = -1) -> bytes:
        line = self.stream.readline(self.left + 1 if size < 0 else min(size, self.left + 1))
        if not line:
            raise _HeadCut("the connection ended before the request's headers did")
        self.left -= len(line)
        if self.left < 0:
            raise _HeadTooLarge("the request's headers are too large")
        return line


def _raw_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode("utf-8")
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


def _refuse(status: int, message: str) -> Callable:
    def application(environ: Dict[str, Any], start_response: Callable) -> List[bytes]:
        return json_response(start_response, status, {"error": message})
    return application


class LimitedHandler(WSGIHandler):
    """gevent's WSGI handler with the server's ``Limits``: a head over ``max_head`` bytes gets 431, a
    body over ``max_body`` 413 (not read), a head or body not sent within ``timeout`` 408 (or the
    connection is closed), and no socket read or write waits longer than ``timeout``. The body is
    read before the application runs, so a route never waits on a slow client."""

    server: "GuardedServer"
    _head_timer: Optional[gevent.Timeout] = None

    def __init__(self, sock: socket.socket, address: Any, server: "GuardedServer", rfile: Any = None) -> None:
        sock.settimeout(server.limits.timeout)
        super().__init__(sock, address, server, rfile)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError as exc:  # the client left or stalled while it was being refused
            _log.debug("HTTP connection from %s ended: %s", self.client_address, exc)

    def handle_one_request(self) -> Any:
        timeout = self.server.limits.timeout
        self._head_timer = gevent.Timeout.start_new(
            timeout, _SlowRequest(f"the request's head did not arrive within {timeout:g} s"))
        try:
            return super().handle_one_request()
        finally:
            self._head_timer.close()

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            self._head_timer.cancel()

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 (gevent's name)
        budget = _Budget(fp, self.server.limits.max_head - len(self.requestline))
        try:
            return super().MessageClass(budget, *args)
        except http.client.HTTPException:  # more header lines than http.client parses (100)
            raise _HeadTooLarge("the request has too many headers") from None

    def _handle_client_error(self, ex: BaseException) -> Any:
        limits = self.server.limits
        if isinstance(ex, _HeadTooLarge):
            return "431", _raw_response(431, f"{ex}: the limit is {limits.max_head} bytes of headers")
        if isinstance(ex, _HeadCut):
            return "400", _raw_response(400, str(ex))
        if isinstance(ex, socket.timeout):
            return "408", _raw_response(408, str(ex) if isinstance(ex, _SlowRequest) else
                                        f"the client sent nothing for {limits.timeout:g} s")
        return super()._handle_client_error(ex)

    def handle_error(self, kind: Any, value: BaseException, traceback: Any) -> None:
        """A client that took nothing for ``timeout`` seconds while its answer was being written (a
        stalled dashboard stream, say) is cut off with one warning instead of a traceback."""
        if isinstance(value, socket.timeout) and self.headers_sent:
            _log.warning("HTTP %s %s: the client at %s took nothing for %g s; disconnected", self.command,
                         self.path, self.client_address[0], self.server.limits.timeout)
            self.close_connection = True
            return
        super().handle_error(kind, value, traceback)

    def get_environ(self) -> Dict[str, Any]:
        environ = super().get_environ()
        try:
            environ[LOCAL_ADDRESS] = self.socket.getsockname()[0]
        except OSError:
            pass
        return environ

    def run_application(self) -> None:
        refusal = self._take_body()
        if refusal is not None:
            self.close_connection = True
            self.application = refusal
        super().run_application()

    def _take_body(self) -> Optional[Callable]:
        """Read the whole body (at most ``max_body`` bytes, within ``timeout``) into ``wsgi.input``;
        the application that refuses the request instead, if it cannot be."""
        limits = self.server.limits
        received = self.wsgi_input
        if self.environ["wsgi.input"] is not received:  # a connection upgrade: the body is a stream
            return None
        if self.content_length is not None and self.content_length > limits.max_body:
            self.wsgi_input = Input(BytesIO(), 0)  # closing the connection, not reading what was sent
            return _refuse(413, f"the request body has {self.content_length} bytes; the limit is {limits.max_body}")
        if not self.content_length and not received.chunked_input:
            return None
        try:
            with gevent.Timeout(limits.timeout, _SlowRequest(f"the request body did not arrive within "
                                                             f"{limits.timeout:g} s")):
                body = received.read(limits.max_body + 1)
        except socket.timeout as exc:
            self.wsgi_input = Input(BytesIO(), 0)
            return _refuse(408, str(exc) if isinstance(exc, _SlowRequest) else
                           f"the client sent nothing for {limits.timeout:g} s")
        except OSError as exc:  # the body ended early, or its chunks are malformed
            self.wsgi_input = Input(BytesIO(), 0)
            return _refuse(400, f"the request body cannot be read: {exc}")
        if len(body) > limits.max_body:
            self.wsgi_input = Input(BytesIO(), 0)
            return _refuse(413, f"the request body is over {limits.max_body} bytes")
        self.environ["wsgi.input"] = BytesIO(body)
        self.environ["CONTENT_LENGTH"] = str(len(body))
        return None


class GuardedServer(WSGIServer):
    """gevent's WSGI server with every request passing ``Guard(application, policy)`` and at most
    ``limits.max_connections`` connections (more wait in the listen backlog)."""

    handler_class = LimitedHandler

    def __init__(self, listener: Tuple[str, int], application: Callable, policy: AccessPolicy,
                 limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(listener, Guard(application, policy), spawn=gevent.pool.Pool(limits.max_connections),
                         **kwargs)
