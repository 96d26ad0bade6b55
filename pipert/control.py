"""The daemon's control plane: the commands that its RPC and HTTP servers share.

A control surface receives names and JSON from the network. ``Control`` checks
them against the built ``Pipe`` before anything is sent, so bad input changes
nothing and comes back as a ``ControlError`` whose message names the problem and
the fix. Everything it returns is a plain JSON-able dict.

Sending an event waits for its acknowledgements: the reply says which routines
handled it (``handled_by``), the errors their handlers raised (``errors``), and
the routines that did not answer within ``ack_timeout`` seconds (``pending``).
That wait, and ``join``, block a real thread, so they run on the calling gevent
hub's thread pool: a slow handler never stalls the hub, which keeps serving
other calls and zerorpc heartbeats.

Arguments of ``execute(name, arguments)``: a JSON object, as a string (what the
zerorpc CLI sends) or a dict; absent, ``null`` or ``""`` mean none. Two keys
choose the targets, every other key is a parameter of the event's handlers::

    {"value": 1}                                  every routine that handles the event
    {"flows": ["f1"], "value": 1}                 every routine of flow f1 (also "flows": "f1")
    {"routines": ["r1", "r2"]}                    these routines (names are unique pipe-wide)
    {"routines": {"f1": ["r1"], "f2": []}}        by flow, as in Pipe.notify_event; [] = whole flow
    {"flows": ["f2"], "routines": ["r1"]}         both together: the union

A routine named explicitly must handle the event; with ``flows`` or no targets,
the routines that do not handle it are skipped, but at least one must.
``execute("kill")`` and ``execute("join", '{"to_kill": true}')`` are the ``kill`` and
``join`` commands themselves, as in PipeRT 2.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent

from . import security
from .errors import PipeError
from .events import KILL_EVENT_NAME, PARAMS_EVENT_NAME, START_EVENT_NAME, STOP_EVENT_NAME
from .pipe import Pipe

TARGET_KEYS = ("flows", "routines")
JOIN = "join"
_EXAMPLE = '\'{"value": 1}\''


class ControlError(Exception):
    """A command from outside that cannot run; ``status`` is the matching HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_arguments(encoded: Any, what: str) -> Dict[str, Any]:
    """``encoded`` (a JSON object as str or bytes, a dict, or nothing) as a dict with string keys."""
    if encoded is None:
        return {}
    if isinstance(encoded, bytes):
        try:
            encoded = encoded.decode("utf-8")
        except UnicodeDecodeError:
            raise ControlError(f"the arguments of {what} are not UTF-8 text: send a JSON object such as "
                               f"{_EXAMPLE}") from None
    if isinstance(encoded, str):
        if not encoded.strip():
            return {}
        try:
            encoded = json.loads(encoded)
        except json.JSONDecodeError as exc:
            raise ControlError(f"the arguments of {what} are not valid JSON ({exc.msg} at character {exc.pos}): "
                               f"send a JSON object such as {_EXAMPLE}") from None
        if encoded is None:
            return {}
    if not isinstance(encoded, dict):
        raise ControlError(f"the arguments of {what} must be a JSON object such as {_EXAMPLE}, "
                           f"not {type(encoded).__name__} {encoded!r}")
    bad = [key for key in encoded if not isinstance(key, str)]
    if bad:
        raise ControlError(f"the arguments of {what} have keys that are not strings: {bad!r}")
    return dict(encoded)


def _names(value: Any, key: str) -> List[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ControlError(f'"{key}" must be a name or a list of names, not {value!r}')
    if not names:
        raise ControlError(f'"{key}" is empty: name at least one, or leave "{key}" out to reach every routine')
    return names


class Control:
    """Commands on a built ``pipe`` for control surfaces, with an optional shared-secret ``token``."""

    def __init__(self, pipe: Pipe, token: Optional[str] = None, ack_timeout: float = 10.0) -> None:
        self.pipe = pipe
        self.token = token or None
        self.ack_timeout = ack_timeout

    # ----- access -----

    def authorize(self, given: Optional[str], how: str) -> None:
        """Refuse (401) a request without the token, if one is set; ``how`` tells the caller how to pass it."""
        if self.token is None:
            return
        if given is None or not hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8")):
            reason = "carries no token" if given is None else "carries a wrong token"
            raise ControlError(f"refused: this pipert daemon requires a token and the request {reason}: {how}",
                               401)

    # ----- targets -----

    def flow_of(self, routine: str) -> str:
        """The flow of ``routine``; 404 if there is none of that name."""
        flow = self.pipe.flow_of(routine)
        if flow is None:
            names = sorted(r["routine_name"] for r in self.pipe.structure()["Routines"])
            raise ControlError(f"there is no routine '{routine}'; routines are {names}", 404)
        return flow

    def _targets(self, flows: Any, routines: Any) -> Optional[Dict[str, List[str]]]:
        if flows is None and routines is None:
            return None
        targets: Dict[str, List[str]] = {}
        whole = set()
        if flows is not None:
            for flow in _names(flows, "flows"):
                if flow not in self.pipe.flows:
                    raise ControlError(f"there is no flow '{flow}'; flows are {sorted(self.pipe.flows)}", 404)
                targets[flow] = []
                whole.add(flow)
        if isinstance(routines, dict):
            if not routines:
                raise ControlError('"routines" is empty: name at least one flow or routine')
            chosen = []
            for flow, names in routines.items():
                if flow not in self.pipe.flows:
                    raise ControlError(f"there is no flow '{flow}'; flows are {sorted(self.pipe.flows)}", 404)
                names = [names] if isinstance(names, str) else names
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ControlError(f'"routines" of flow \'{flow}\' must be a list of routine names, not {names!r}')
                if not names:
                    targets[flow] = []
                    whole.add(flow)
                chosen.extend((flow, name) for name in names)
        elif routines is not None:
            chosen = [(self.flow_of(name), name) for name in _names(routines, "routines")]
        else:
            chosen = []
        for flow, name in chosen:
            if flow not in whole and name not in targets.setdefault(flow, []):
                targets[flow].append(name)
        return targets

    # ----- events -----

    def _off_hub(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking ``function`` on the hub's thread pool; the calling greenlet waits, the hub does not.

        Its exception is raised here, in the caller (the pool would also print it as a crash).
        """
        def call() -> Tuple[Any, Optional[Exception]]:
            try:
                return function(*args), None
            except Exception as exc:
                return None, exc

        value, error = gevent.get_hub().threadpool.apply(call)
        if error is not None:
            raise error
        return value

    def _send_and_wait(self, name: str, targets: Optional[Dict[str, List[str]]],
                       params: Dict[str, Any]) -> Dict[str, Any]:
        try:
            result = self.pipe.send_event(name, targets, params)
        except (PipeError, TypeError) as exc:  # send_event raises TypeError only for params no handler accepts
            raise ControlError(str(exc)) from None
        return result.wait(self.ack_timeout)

    def send(self, name: Any, targets: Optional[Dict[str, List[str]]] = None,
             params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Send event ``name`` to ``targets`` ({flow: [routine]}, None = all) and wait for its acknowledgement.

        The event ``set_params`` to one routine is ``set_params`` (so the cockpit's event routes set parameters).
        """
        if not isinstance(name, str) or not name:
            raise ControlError(f"event name {name!r} must be a non-empty string, e.g. 'start' or 'PING'")
        if name == PARAMS_EVENT_NAME:
            routines = [routine for chosen in (targets or {}).values() for routine in chosen]
            if len(routines) != 1:
                raise ControlError(f"'{PARAMS_EVENT_NAME}' goes to exactly one routine, named in \"routines\": e.g. "
                                   f"execute {PARAMS_EVENT_NAME} '{{\"routines\": [\"det\"], \"min_area\": 800}}'")
            return self.set_params(routines[0], params)
        return self._off_hub(self._send_and_wait, name, targets, dict(params or {}))

    def execute(self, name: Any, arguments: Any = None) -> Dict[str, Any]:
        """Send event ``name`` with ``arguments`` (see the module docstring) and wait for its acknowledgement.

        ``execute("kill")`` is ``kill`` and ``execute("join", '{"to_kill": true}')`` is ``join``, as in PipeRT 2.
        """
        if name == JOIN:
            return self.join(arguments)
        if name == KILL_EVENT_NAME:
            if parse_arguments(arguments, "kill"):
                raise ControlError(f"kill takes no arguments (got {arguments!r}): it ends the whole pipeline")
            return self.kill()
        params = parse_arguments(arguments, f"event '{name}'")
        targets = self._targets(*(params.pop(key, None) for key in TARGET_KEYS))
        return self.send(name, targets, params)

    def start(self) -> Dict[str, Any]:
        """Start (or resume) every routine."""
        return self.send(START_EVENT_NAME)

    def pause(self) -> Dict[str, Any]:
        """Pause every routine (the ``stop`` event); ``start`` resumes them."""
        return self.send(STOP_EVENT_NAME)

    # ----- parameters -----

    def set_params(self, routine: Any, arguments: Any = None) -> Dict[str, Any]:
        """Change parameters of ``routine``: ``arguments`` is a JSON object ``{name: value}`` (text is
        converted to the declared types). Waits until the routine applied them, between two
        ``main_logic`` calls; returns the acknowledgement with ``params``, the values now in force."""
        if not isinstance(routine, str) or not routine:
            raise ControlError(f"routine name {routine!r} must be a non-empty string")
        self.flow_of(routine)
        values = parse_arguments(arguments, f"set_params of routine '{routine}'")
        try:
            return self._off_hub(self.pipe.apply_params, routine, values, self.ack_timeout)
        except PipeError as exc:
            raise ControlError(str(exc)) from None

    # ----- ending -----

    def alive_flows(self) -> List[str]:
        """Names of the flows whose process runs."""
        return sorted(name for name, flow in self.pipe.status()["flows"].items() if flow["alive"])

    def wait_ended(self) -> None:
        """Block the calling greenlet (not its hub) until every flow has exited for good (killed, or
        failed past its restart policy); the pipe's shared memory is freed by then (``Pipe.join``)."""
        self._off_hub(self.pipe.join)

    def kill(self) -> Dict[str, Any]:
        """Send ``kill`` to every running flow; returns at once (``join`` waits for the exit)."""
        alive = self.alive_flows()
        self._off_hub(self.pipe.kill)
        return {"event": "kill", "flows": alive}

    def join(self, arguments: Any = None) -> Dict[str, Any]:
        """Wait until every flow has exited; ``{"to_kill": true}`` kills first. Returns the flows' exit status."""
        options = parse_arguments(arguments, "join")
        to_kill = options.pop("to_kill", False)
        if options or not isinstance(to_kill, bool):
            raise ControlError(f"join takes only {{\"to_kill\": true|false}}, not {arguments!r}: "
                               "e.g. join '{\"to_kill\": true}'")
        try:
            self._off_hub(self.pipe.join, to_kill)
        except PipeError as exc:
            raise ControlError(str(exc)) from None
        return {"flows": self.pipe.status()["flows"]}

    # ----- recording -----

    def start_recording(self, arguments: Any = None) -> Dict[str, Any]:
        """Start recording: ``{"path": "run.mcap", "wires": ["cam", "det"]}`` plus any option of
        ``Pipe.record`` but ``overwrite``: a control surface never replaces an existing file, and its
        path must end in ``.mcap``. Returns the recording's status."""
        options = parse_arguments(arguments, "start_recording")
        path = options.pop("path", None)
        if not isinstance(path, str) or not path.endswith(".mcap"):
            raise ControlError(f'start_recording needs "path", a file name ending in .mcap (got {path!r}), e.g. '
                               '{"path": "run.mcap", "wires": ["cam"]}')
        if "overwrite" in options:
            raise ControlError("a recording started over RPC or HTTP never overwrites a file: choose a new path")
        try:
            return self._off_hub(lambda: self.pipe.record(path, overwrite=False, **options).status())
        except TypeError as exc:
            raise ControlError(f"start_recording: {exc}: options are path, wires, compression, chunk_size, "
                               "flush_interval, queue, buffer, images, jpeg_quality") from None
        except PipeError as exc:
            raise ControlError(str(exc)) from None

    def stop_recording(self) -> Dict[str, Any]:
        """Stop the recording and finish its file; its final status."""
        try:
            return self._off_hub(self.pipe.stop_recording)
        except PipeError as exc:
            raise ControlError(str(exc)) from None

    def recording(self) -> Dict[str, Any]:
        """The status of the recording (the latest one, if none runs); ``{"state": "none"}`` if never."""
        return self.pipe.status()["recording"] or {"state": "none"}

    # ----- introspection -----

    def structure(self) -> Dict[str, Any]:
        """The routines, their flows and the events they handle."""
        return self.pipe.structure()

    def status(self) -> Dict[str, Any]:
        """Per routine state, messages in/out and FPS; per wire depth and drops; per flow pid and alive;
        ``insecure`` (and a ``security_warning``) when a control server runs without a token off loopback."""
        return {**self.pipe.status(), **security.exposure(self.pipe)}

