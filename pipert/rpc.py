"""Control a running pipe over zerorpc.

``RPCPipeWrapper(pipe).run_rpc_server("tcp://127.0.0.1:4242")`` serves the
methods ``execute(name, arguments)``, ``start``, ``pause``, ``kill``,
``join(arguments)``, ``set_params(routine, arguments)``, ``structure``, ``status``,
``start_recording(arguments)``, ``stop_recording`` and ``recording`` (see
``pipert.control`` for the form of ``execute``'s arguments and for what each
returns). Bad input comes
back to the caller as a ``zerorpc.RemoteError`` named ``ControlError``; the
server and the pipe go on. zerorpc speaks msgpack: nothing received is ever
unpickled.

With a token, every call must carry it in its zerorpc event header under
``pipert_token``; a client adds it with the ``SendToken`` middleware::

    context = zerorpc.Context()
    context.register_middleware(SendToken("secret"))
    client = zerorpc.Client("tcp://127.0.0.1:4242", context=context)
    client.execute("PING", '{"value": 1}')
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, Mapping, Optional

import gevent
import zerorpc

from . import security
from .control import Control, ControlError
from .pipe import Pipe

TOKEN_HEADER = "pipert_token"
_TOKEN_HELP = "pass it with `pipert zerorpc --token TOKEN ...` (or PIPERT_TOKEN), or register " \
              "pipert.rpc.SendToken(TOKEN) on your zerorpc client's context"
_log = logging.getLogger(__name__)


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """zerorpc logs a traceback for every exception a method raises; a refused call is the caller's
    error, reported to the caller and logged by us in one line."""
    return not (record.exc_info and isinstance(record.exc_info[1], ControlError))


logging.getLogger("zerorpc.core").addFilter(_not_a_refusal)


class SendToken:
    """Client middleware: puts ``token`` in the header of every call."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_task_context(self) -> Dict[str, str]:
        return {TOKEN_HEADER: self.token}


class _CheckToken:
    """Server middleware: refuses calls without the control's token (before the method runs)."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def load_task_context(self, header: Mapping[str, Any]) -> None:
        token = header.get(TOKEN_HEADER)
        try:
            self.control.authorize(token if isinstance(token, str) else None, _TOKEN_HELP)
        except ControlError as exc:
            _log.warning("%s", exc)
            raise


def _introspectable(method: Callable) -> Callable:
    """Give ``method`` the argument spec zerorpc's introspection asks for (zerorpc would call
    inspect.getargspec, gone since Python 3.11), so `pipert zerorpc ENDPOINT` can list the methods."""
    spec = inspect.getfullargspec(method)
    method._zerorpc_args = lambda: (spec.args[1:], spec.varargs, spec.varkw, spec.defaults)
    return method


class RPCPipeWrapper(zerorpc.Server):
    """A zerorpc server that controls ``pipe``; with ``token`` set it refuses calls that lack it.

    ``ack_timeout`` bounds how long a call waits for an event's acknowledgements. Binding to a
    non-loopback address needs a ``token``, or ``insecure=True``.
    """

    COMMANDS = ("execute", "start", "pause", "kill", "join", "set_params", "structure", "status",
                "start_recording", "stop_recording", "recording")

    def __init__(self, pipe: Pipe, token: Optional[str] = None, ack_timeout: float = 10.0,
                 heartbeat: int = 5, insecure: bool = False) -> None:
        self.control = Control(pipe, token, ack_timeout)
        self.insecure = insecure
        context = zerorpc.Context()
        context.register_middleware(_CheckToken(self.control))
        methods = {name: getattr(self, name) for name in self.COMMANDS}
        super().__init__(methods=methods, name="pipert", context=context, heartbeat=heartbeat)

    def bind(self, endpoint: str, resolve: bool = True) -> None:
        """Listen on ``endpoint``; refused (``security.InsecureBindingError``) off loopback without a token."""
        security.check_exposure(self.control.pipe, f"RPC on {endpoint}", security.endpoint_host(endpoint),
                                self.control.token, self.insecure)
        super().bind(endpoint, resolve)

    def run_rpc_server(self, endpoint: str) -> None:
        """Bind to ``endpoint`` (e.g. ``tcp://127.0.0.1:4242``) and serve until the pipeline has ended."""
        self.bind(endpoint)
        self.run()

    def run(self) -> None:
        """Serve on the bound endpoints until every flow has exited for good (killed over RPC or HTTP,
        by a signal or by a routine) and the pipe is shut down, or until ``stop()``. Calls under way
        are answered first."""
        watcher = gevent.spawn(self._stop_when_ended)
        try:
            super().run()
        finally:
            watcher.kill()
        watcher.get()  # raises what wait_ended raised, e.g. for a pipe that was never built

    def _stop_when_ended(self) -> None:
        try:
            self.control.wait_ended()
        finally:
            self.stop()

    def _call(self, command: Callable[..., Dict[str, Any]], *args: Any) -> Dict[str, Any]:
        try:
            return command(*args)
        except ControlError as exc:
            _log.warning("refused RPC %s%r: %s", command.__name__, args, exc)
            raise

    @_introspectable
    def execute(self, name: str, encoded_arguments: Any = None) -> Dict[str, Any]:
        """Send event NAME with a JSON object of arguments; returns its acknowledgement.

        Keys "flows" (["f1"]) and "routines" (["r1"] or {"f1": ["r1"]}) choose the targets;
        the other keys are the handlers' parameters. E.g. execute PING '{"routines": ["r1"], "value": 1}'
        """
        return self._call(self.control.execute, name, encoded_arguments)

    @_introspectable
    def start(self) -> Dict[str, Any]:
        """Start (or resume) every routine; returns the acknowledgement."""
        return self._call(self.control.start)

    @_introspectable
    def pause(self) -> Dict[str, Any]:
        """Pause every routine (the stop event); start resumes. Returns the acknowledgement."""
        return self._call(self.control.pause)

    @_introspectable
    def kill(self) -> Dict[str, Any]:
        """Kill the pipeline; returns at once. The daemon exits once every flow has exited."""
        return self._call(self.control.kill)

    @_introspectable
    def join(self, encoded_arguments: Any = None) -> Dict[str, Any]:
        """Wait until every flow has exited; '{"to_kill": true}' kills first. Returns the flows."""
        return self._call(self.control.join, encoded_arguments)

    @_introspectable
    def set_params(self, routine: str, encoded_params: Any = None) -> Dict[str, Any]:
        """Change parameters of ROUTINE with a JSON object of name: value, applied between two main_logic
        calls; returns the acknowledgement with "params", the values now in force.
        E.g. set_params det '{"min_area": 800}'"""
        return self._call(self.control.set_params, routine, encoded_params)

    @_introspectable
    def structure(self) -> Dict[str, Any]:
        """The routines, their flows and the events they handle."""
        return self._call(self.control.structure)

    @_introspectable
    def status(self) -> Dict[str, Any]:
        """Routine states, messages in/out and FPS; wire depths and drops; flow pids."""
        return self._call(self.control.status)

    @_introspectable
    def start_recording(self, encoded_arguments: Any = None) -> Dict[str, Any]:
        """Record wires into a new MCAP file: '{"path": "run.mcap", "wires": ["cam", "det"]}' (all wires
        without "wires"). Returns the recording's status."""
        return self._call(self.control.start_recording, encoded_arguments)

    @_introspectable
    def stop_recording(self) -> Dict[str, Any]:
        """Stop the recording and finish its file; returns its final status."""
        return self._call(self.control.stop_recording)

    @_introspectable
    def recording(self) -> Dict[str, Any]:
        """The recording's status: path, wires, state, messages and drops per wire, error."""
        return self._call(self.control.recording)
