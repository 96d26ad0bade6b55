"""The ``pipert`` command.

``pipert run TARGET`` runs a pipe as a daemon: it reads TARGET (a pipeline
file, ``.yaml``/``.yml``/``.json``) or imports it (``path/to/file.py:factory`` or
``package.module:factory``, a callable that returns a built or unbuilt ``Pipe``),
sets the ``--param`` values, builds the pipe, starts the control
servers asked for, optionally sends ``start``, and runs until the pipe is killed
(over RPC or HTTP, or by a routine) or the daemon gets SIGTERM, SIGINT or SIGHUP
(a second one stops at once, without waiting for cleanups). Then it kills what
still runs, joins every flow, frees the shared memory, prints what every
routine and wire did, and exits 0 (1 if a flow died on its own). Under systemd
(``Type=notify``) it reports READY=1, STOPPING=1 and watchdog pings.
Settings come from the flags, else the environment, else the nearest ``.env``:
``PIPERT_RPC_ENDPOINT``, ``PIPERT_API_ADDRESS``, ``PIPERT_TOKEN``,
``PIPERT_ALLOWED_ORIGINS``, ``PIPERT_ALLOWED_HOSTS``. A server on an address other
than loopback needs a token (or ``--insecure``). Once the servers listen it
prints their addresses, then ``pipert: ready``.

``pipert plugins`` lists the registered routines, ``pipert check FILE...``
checks pipeline files without running them and ``pipert graph TARGET`` prints a
pipeline as a Mermaid flowchart.

``pipert top [ADDRESS]`` shows a running daemon's routines, wires and flows in the
terminal, refreshed in place, like the dashboard that ``--api`` serves at ``/``.

``pipert zerorpc ARGS...`` is the zerorpc CLI (zerorpc 0.6.3's own, which
crashes on Python 3.10+ at ``collections.Iterator``), with ``--token`` (or
``PIPERT_TOKEN``) for daemons that require one.
"""
from __future__ import annotations

import argparse
import collections
import collections.abc
import datetime
import importlib
import importlib.util
import json
import logging
import os
import queue
import select
import signal
import sys
import threading
import traceback
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import dotenv

from . import registry, sd_notify, security
from .api import APIWrapper
from . import recording as recording_file
from .errors import BuildError, ClusterError, EventError, RecordError
from .events import events_of
from .graph import mermaid
from .params import declared_params
from .pipe import Pipe
from .pipeline_file import check_pipeline, is_pipeline_file, load_pipeline
from .routine import kind_of
from .rpc import RPCPipeWrapper, SendToken
from .signals import heeded, received, signal_pipe
from .top import run_top

RPC_VARIABLE, API_VARIABLE, TOKEN_VARIABLE = "PIPERT_RPC_ENDPOINT", "PIPERT_API_ADDRESS", "PIPERT_TOKEN"
DEFAULT_RPC, DEFAULT_API = "tcp://127.0.0.1:4242", "127.0.0.1:4000"
_POLL = 0.2  # seconds between two checks that every flow has ended
_SERVER_STOP_TIMEOUT = 10.0
_log = logging.getLogger(__name__)


class UsageError(Exception):
    """Something the user passed cannot work; the message says what and how to fix it."""


def _say(message: str) -> None:
    try:
        print(f"pipert: {message}", flush=True)
    except OSError:  # whoever read our output has gone (a pipe, a hung-up terminal); the daemon goes on
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str) -> int:
    print(f"pipert: error: {message}", file=sys.stderr, flush=True)
    return 1


# ----- settings -----

def rpc_endpoint(value: str) -> str:
    """A zerorpc endpoint from ``tcp://HOST:PORT``, ``HOST:PORT`` or ``PORT`` (host 127.0.0.1)."""
    if "://" in value:
        return value
    host, port = api_address(value)
    return f"tcp://{host}:{port}"


def api_address(value: str) -> Tuple[str, int]:
    """(host, port) from ``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1)."""
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"address {value!r} is not HOST:PORT: write e.g. 127.0.0.1:4000, or 4000 for 127.0.0.1")
    return host.strip("[]") or "127.0.0.1", int(port)


def _setting(flag: Optional[str], variable: str) -> Optional[str]:
    return flag if flag is not None else (os.environ.get(variable) or None)


def _access(args: argparse.Namespace, servers: List[Tuple[str, Optional[str]]],
            token: Optional[str]) -> Tuple[Optional[List[str]], List[str]]:
    """The allowed browser origins (None: the cockpit's) and extra Host names; refuses servers
    (what, host) off loopback without a token unless --insecure."""
    origins = args.allow_origin or security.split_list(os.environ.get(security.ORIGINS_VARIABLE)) or None
    hosts = args.allow_host or security.split_list(os.environ.get(security.HOSTS_VARIABLE))
    try:
        origins = None if origins is None else [security.normalize_origin(origin) for origin in origins]
        hosts = [security.host_name(host) for host in hosts]
    except ValueError as exc:
        raise UsageError(f"{exc} (from --allow-origin/--allow-host, {security.ORIGINS_VARIABLE} or "
                         f"{security.HOSTS_VARIABLE})") from None
    for what, host in servers:
        if not args.insecure and security.needs_token(host, token):
            raise UsageError(f"refusing to serve {what} without a token: anyone who can reach that "
                             f"address could pause, kill or drive the pipeline. Set one with --token TOKEN, or "
                             f"{TOKEN_VARIABLE}=TOKEN in the environment or in .env (clients then send it); or "
                             "bind to 127.0.0.1; or pass --insecure to serve without one anyway")
    return origins, hosts


# ----- the target -----

def load_target(spec: str) -> Pipe:
    """The pipe of a pipeline file (``.yaml``, ``.yml``, ``.json``), or of a factory: import
    ``path/to/file.py:factory`` or ``package.module:factory`` and return the pipe it makes."""
    if is_pipeline_file(spec):
        if not os.path.isfile(spec):
            raise UsageError(f"there is no pipeline file {os.path.abspath(spec)}")
        return load_pipeline(spec)
    location, _, attribute = spec.rpartition(":")
    if not location or not attribute:
        raise UsageError(f"TARGET {spec!r} names no factory: write path/to/file.py:factory or "
                         "package.module:factory")
    if location.endswith(".py") or os.sep in location:
        path = os.path.abspath(location)
        if not os.path.isfile(path):
            raise UsageError(f"TARGET {spec!r}: there is no file {path}")
        name = "pipert_target_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, os.path.dirname(path))
        sys.modules[name] = module  # so that pickle finds classes of the file in every flow
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as exc:
            if exc.name is None or not location.startswith(exc.name):
                raise
            raise UsageError(f"TARGET {spec!r}: there is no module {exc.name!r}: check the name, or give a "
                             "file path such as path/to/file.py:factory") from None
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise UsageError(f"TARGET {spec!r}: {location} has no attribute {attribute!r}: name the function "
                             "that returns your Pipe")
        factory = getattr(factory, part)
    pipe = factory if isinstance(factory, Pipe) else factory() if callable(factory) else None
    if not isinstance(pipe, Pipe):
        got = factory if pipe is None else pipe
        raise UsageError(f"TARGET {spec!r} gave {type(got).__name__}, not a Pipe: make {attribute} a function "
                         "that returns the Pipe")
    return pipe


# ----- servers -----

def _serve_rpc(pipe: Pipe, endpoint: str, token: Optional[str], ack_timeout: float,
               insecure: bool) -> threading.Thread:
    """Run an RPCPipeWrapper on its own thread (and gevent hub); returns once it is bound."""
    bound: "queue.Queue[Optional[BaseException]]" = queue.Queue()

    def serve() -> None:
        try:
            server = RPCPipeWrapper(pipe, token=token, ack_timeout=ack_timeout, insecure=insecure)
            server.bind(endpoint)
        except BaseException as exc:
            bound.put(exc)
            return
        bound.put(None)
        server.run()

    thread = threading.Thread(target=serve, name="pipert-rpc", daemon=True)
    thread.start()
    error = bound.get()
    if error is not None:
        raise UsageError(f"cannot serve RPC on {endpoint}: {error}: choose another endpoint with --rpc or "
                         f"{RPC_VARIABLE}")
    return thread


class _Signals:
    """The daemon's stop signals (SIGTERM, SIGINT, SIGHUP). While the pipe is loaded and built the first
    interrupts (KeyboardInterrupt); once it runs they only wake the main loop (``wait``), so that the
    daemon's shutdown is never cut short."""

    def __init__(self) -> None:
        self.received: List[int] = []
        self._pipe: Optional[Tuple[Any, Any]] = None
        for signum in heeded():
            signal.signal(signum, self._interrupt)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            raise KeyboardInterrupt

    def route(self) -> None:
        """From now on, signals are only recorded (read them with ``wait``)."""
        self._pipe = signal_pipe()

    def wait(self, timeout: float) -> List[int]:
        """Every signal received so far, after waiting up to ``timeout`` s for a new one."""
        if select.select([self._pipe[0]], [], [], timeout)[0]:
            self.received += received(self._pipe[0])
        return self.received


def run(target: str, rpc: Optional[str], api: Optional[Tuple[str, int]], token: Optional[str],
        start: bool, ack_timeout: float, params: Sequence[str] = (),
        allowed_origins: Optional[List[str]] = None, allowed_hosts: Iterable[str] = (),
        insecure: bool = False, record: Optional[str] = None, record_wires: Optional[str] = None,
        cluster: Optional[str] = None) -> int:
    """Run the daemon (see the module docstring); the process's exit code."""
    signals = _Signals()  # before build(), so the pipe leaves SIGTERM to us
    try:
        pipe = load_target(target)
        if cluster is not None:
            if pipe.built:
                raise UsageError(f"--cluster needs TARGET {target!r} to return the pipe before build(): "
                                 "remove the build() call from the factory")
            pipe.set_cluster(cluster)
        apply_param_flags(pipe, params)
        if not pipe.status()["flows"]:  # flows get a status at build
            pipe.build()
        signals.route()
    except KeyboardInterrupt:
        _say("interrupted before the pipe ran")
        return 0
    except (UsageError, BuildError, ClusterError) as exc:
        return _fail(str(exc))
    except Exception:
        traceback.print_exc()
        return _fail(f"TARGET {target!r} failed while making or building the pipe (traceback above)")
    flows = pipe.status()["flows"]
    _say(f"pipe {pipe.id} built: " + ", ".join(f"flow {n} (pid {f['pid']})" for n, f in flows.items()))
    servers: List[Any] = []  # each stops on its own once the pipe is shut down; join(timeout) waits for it
    try:
        if record is not None:
            try:
                recording = pipe.record(record, record_wires)
            except RecordError as exc:
                raise UsageError(f"--record: {exc}") from None
            _say(f"recording {', '.join(recording.wires)} to {recording.path}")
        if rpc is not None:
            servers.append(_serve_rpc(pipe, rpc, token, ack_timeout, insecure))
            _say(f"rpc listening on {rpc}")
        if api is not None:
            http = APIWrapper(api[0], api[1], pipe, token=token, ack_timeout=ack_timeout,
                              allowed_origins=allowed_origins, allowed_hosts=allowed_hosts, insecure=insecure)
            try:
                http.run()
            except OSError as exc:
                raise UsageError(f"cannot serve HTTP on {api[0]}:{api[1]}: {exc.strerror or exc}: choose another "
                                 f"address with --api or {API_VARIABLE}") from None
            servers.append(http)
            host, port = http.address
            _say(f"http listening on http://{f'[{host}]' if ':' in host else host}:{port}")
            origins = ", ".join(sorted(http.policy.origins)) or "no other"
            _say(f"http answers browser pages from its own origin and {origins}")
    except UsageError as exc:
        pipe.join(to_kill=True)
        _join_all(servers)
        return _fail(str(exc))
    if start and not signals.wait(0):
        ack = pipe.send_event("start").wait(ack_timeout)
        _say(f"started: {len(ack['handled_by'])} routines" + (f", errors {ack['errors']}" if ack["errors"] else ""))
    _say("ready")
    sd_notify.notify("READY=1", f"STATUS=pipe {pipe.id} running {len(flows)} flows")
    _supervise(pipe, signals)
    _join_all(servers)
    status = pipe.status()
    for name, routine in status["routines"].items():
        _say(f"routine {name} (flow {routine['flow']}): {routine['state']}, in {routine['messages_in']}, "
             f"out {routine['messages_out']}")
    for wire in status["wires"]:
        _say(f"wire {wire['source']} -> {wire['destination']}: dropped {wire['dropped']}")
    if status["recording"] is not None:
        _say(_recording_line(status["recording"]))
    died = sorted({r["flow"] for r in status["routines"].values() if r["state"] == "dead"})
    _say(f"pipe {pipe.id} stopped" + (f"; flows that died on their own: {died}" if died else ""))
    return 1 if died else 0


def _supervise(pipe: Pipe, signals: _Signals) -> None:
    """Wait until every flow has ended: the first stop signal kills the pipe (cleanups run), a second
    terminates its flows at once; systemd's watchdog is pinged meanwhile."""
    joiner = threading.Thread(target=pipe.join, name="pipert-join", daemon=True)  # returns once all flows ended
    joiner.start()
    watchdog = sd_notify.Watchdog()
    handled = 0
    while joiner.is_alive():
        watchdog.ping()
        got = signals.wait(watchdog.timeout(_POLL))
        for signum in got[handled:]:
            name = signal.Signals(signum).name
            if handled == 0:
                _say(f"stopping on {name}")
                sd_notify.notify("STOPPING=1", f"STATUS=stopping on {name}")
                pipe.kill()
            elif handled == 1:
                _say(f"{name} again: stopping now, without waiting for cleanups")
                pipe.terminate()
            handled += 1
    if not handled:
        sd_notify.notify("STOPPING=1", "STATUS=stopping: every flow has ended")


# ----- routine parameters, plugins, pipeline files (issue 13) -----

def apply_param_flags(pipe: Pipe, assignments: Sequence[str]) -> None:
    """Apply ``--param`` assignments to an unbuilt pipe: ``NAME=VALUE`` cascades like the pipe's
    params, ``ROUTINE.NAME=VALUE`` sets one routine's; the text is converted to the declared type."""
    for assignment in assignments:
        target, equals, value = assignment.partition("=")
        routine, dot, name = target.rpartition(".")
        if not equals or not name.isidentifier() or (dot and not routine):
            raise UsageError(f"--param {assignment!r} is not NAME=VALUE or ROUTINE.NAME=VALUE: write e.g. "
                             "--param fps=30 or --param det.min_area=800")
        if pipe.built:
            raise UsageError(f"--param {assignment!r}: the target built its pipe itself; return it unbuilt so "
                             "that parameters can be set before the flows start")
        if routine:
            try:
                pipe.set_params(routine, **{name: value})
            except EventError as exc:
                raise UsageError(f"--param {assignment!r}: {exc}") from None
        else:
            pipe.params[name] = value


def _describe_param(name: str, described: Dict[str, Any]) -> str:
    parts = [described["type"]]
    parts += [f"one of {described['choices']}"] if "choices" in described else []
    parts += [f"{bound} {described[key]}" for key, bound in (("min", ">="), ("max", "<=")) if key in described]
    parts.append("required" if described["required"] else f"default {described['default']!r}")
    return f"{name} ({', '.join(parts)})" + (f": {described['help']}" if described["help"] else "")


def plugins_main(as_json: bool) -> int:
    """``pipert plugins``: every registered routine with its kind, package, parameters and events."""
    listing = [{"name": r.name, "kind": kind_of(r.cls), "package": r.package,
                "class": f"{r.cls.__module__}:{r.cls.__qualname__}", "events": events_of(r.cls),
                "params": {n: p.describe() for n, p in declared_params(r.cls).items()}}
               for r in registry.routines().values()]
    failures = registry.failures()
    if as_json:
        print(json.dumps({"routines": listing, "failed": failures}, indent=2, default=repr))
    else:
        for entry in listing:
            print(f"{entry['name']}  ({entry['kind']}; package {entry['package']}; {entry['class']})")
            for name, described in entry["params"].items():
                print(f"    {_describe_param(name, described)}")
            print(f"    events: {', '.join(entry['events']) or 'none'}")
        if not listing:
            print("no routines are registered: install a plugin package or use @pipert.register")
    for plugin, error in failures.items():
        print(f"pipert: plugin {plugin} failed to load: {error}", file=sys.stderr)
    return 1 if failures else 0


def check_main(paths: Sequence[str]) -> int:
    """``pipert check FILE...``: every problem of each pipeline file, as FILE:LINE: message; 1 if any."""
    failed = False
    for path in paths:
        pipe, problems = check_pipeline(path)
        for problem in problems:
            print(problem)
        if pipe is not None:
            routines = sum(len(flow.routines) for flow in pipe.flows.values())
            print(f"{path}: ok: {len(pipe.flows)} flows, {routines} routines, {len(pipe.wires)} wires")
        failed = failed or pipe is None
    return 1 if failed else 0


def graph_main(target: str) -> int:
    """``pipert graph TARGET``: the pipeline as a Mermaid flowchart."""
    pipe = load_target(target)
    if not pipe.built:
        pipe.validate()
    print(mermaid(pipe), end="")
    return 0


def _join_all(servers: List[Any]) -> None:
    """Wait for the servers to answer what is under way and stop (whoever ran Pipe.join's clean-up
    may be one of them: the process must not exit before it is done)."""
    for server in servers:
        server.join(_SERVER_STOP_TIMEOUT)


def _recording_line(recording: Dict[str, Any]) -> str:
    counts = ", ".join(f"{w} {recording['messages'][w]} (dropped {recording['dropped'][w]})"
                       for w in recording["wires"])
    error = f"; error: {recording['error']}" if recording["error"] else ""
    return f"recording {recording['path']} {recording['state']}: {counts}{error}"


# ----- recordings -----

def _time(ns: Optional[int]) -> str:
    if ns is None:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="milliseconds")


def record_info(path: str) -> int:
    """``pipert record info FILE``: topics, message counts, duration, rates, drops."""
    summary = recording_file.info(path)
    state = "complete" if summary["complete"] else \
        f"not finished (still being written, or cut short): read up to its last complete chunk ({summary['error']})"
    print(f"{path}: {state}")
    print(f"  start {_time(summary['start'])}, end {_time(summary['end'])}, duration {summary['duration']:.3f} s")
    print(f"  {'topic':28} {'messages':>9} {'rate/s':>8} {'dropped':>8}  encoding")
    for topic, entry in summary["topics"].items():
        rate = "-" if entry["rate"] is None else f"{entry['rate']:.2f}"
        encoding = ", ".join(entry["encodings"]) + (f" ({entry['schema']})" if entry["schema"] else "")
        print(f"  {topic:28} {entry['messages']:>9} {rate:>8} {entry['dropped']:>8}  {encoding}")
    return 0


def replay_print(path: str, topics: Optional[List[str]], limit: Optional[int]) -> int:
    """``pipert replay FILE``: each message as one line: time offset, topic, summary (no pixels)."""
    start = None
    shown = 0
    for message in recording_file.in_time_order(recording_file.read_messages(path, topics)):
        if message.topic.endswith(recording_file.IMAGE_SUFFIX) or message.topic == recording_file.STATS_TOPIC:
            continue
        start = message.log_time if start is None else start
        print(f"{(message.log_time - start) / 1e9:10.3f}  {message.topic}  #{message.sequence}  "
              f"{recording_file.summarize(message.value())}")
        shown += 1
        if limit is not None and shown >= limit:
            break
    return 0


# ----- the zerorpc CLI -----

def _pop_token(args: List[str]) -> Tuple[Optional[str], List[str]]:
    token, rest = None, []
    arguments = iter(args)
    for arg in arguments:
        if arg == "--token":
            token = next(arguments, None)
            if token is None:
                raise UsageError("--token needs a value: --token TOKEN")
        elif arg.startswith("--token="):
            token = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return token, rest


def zerorpc_main(args: List[str]) -> int:
    """Run zerorpc's own CLI with ``args`` (after taking out ``--token TOKEN``)."""
    token, rest = _pop_token(args)
    token = token or os.environ.get(TOKEN_VARIABLE) or None
    if not hasattr(collections, "Iterator"):  # zerorpc.cli still looks for it there (0rpc/zerorpc-python#250)
        collections.Iterator = collections.abc.Iterator  # type: ignore[attr-defined]
    sys.argv = ["pipert zerorpc", *rest]  # before the import: zerorpc.cli builds its parser from it
    import zerorpc
    import zerorpc.cli
    if token:
        zerorpc.Context.get_instance().register_middleware(SendToken(token))
    try:
        code = zerorpc.cli.main()
    except zerorpc.RemoteError as exc:
        print(f"pipert zerorpc: {exc.name}: {exc.msg}", file=sys.stderr)
        return 1
    except (zerorpc.TimeoutExpired, zerorpc.LostRemote) as exc:
        print(f"pipert zerorpc: {exc}: is the daemon running at that address?", file=sys.stderr)
        return 1
    return code or 0


# ----- entry point -----

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipert", description="Run and control pipert pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runner = commands.add_parser("run", help="run a pipe as a daemon with its control servers",
                                 description=__doc__.split("\n\n")[1])
    runner.add_argument("target", metavar="TARGET", help="a pipeline file (.yaml, .yml, .json), "
                                                         "path/to/file.py:factory or package.module:factory")
    runner.add_argument("--rpc", nargs="?", const=DEFAULT_RPC, metavar="ENDPOINT",
                        help=f"serve zerorpc on ENDPOINT (tcp://HOST:PORT, HOST:PORT or PORT; host 127.0.0.1); "
                             f"alone: {DEFAULT_RPC}; default ${RPC_VARIABLE}")
    runner.add_argument("--api", nargs="?", const=DEFAULT_API, metavar="HOST:PORT",
                        help=f"serve HTTP on HOST:PORT (or PORT; host 127.0.0.1); alone: {DEFAULT_API}; "
                             f"default ${API_VARIABLE}")
    runner.add_argument("--start", action="store_true", help="send the start event once the servers are up")
    runner.add_argument("--token", metavar="TOKEN",
                        help=f"refuse RPC calls and HTTP requests without TOKEN; default ${TOKEN_VARIABLE} "
                             "(prefer it: flags show in ps)")
    runner.add_argument("--ack-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long a control call waits for an event's handlers (default 10)")
    runner.add_argument("--param", action="append", default=[], metavar="[ROUTINE.]NAME=VALUE",
                        help="set a parameter before the pipe starts: NAME=VALUE for every routine declaring it "
                             "(unless the routine sets its own), ROUTINE.NAME=VALUE for one; repeatable")
    runner.add_argument("--cluster", nargs="?", const="ray", metavar="ADDRESS",
                        help="run the flows on a Ray cluster (ray, ray://HOST:PORT or HOST:PORT; alone: ray), "
                             "whatever the pipe's own cluster= says; needs pip install pipert-daemon[ray]")
    plugins = commands.add_parser("plugins", help="list the registered routines: kind, package, parameters, events")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of text")
    checker = commands.add_parser("check", help="check pipeline files without running them: every problem, "
                                                "with FILE:LINE")
    checker.add_argument("files", nargs="+", metavar="FILE", help="a pipeline file (.yaml, .yml or .json)")
    grapher = commands.add_parser("graph", help="print a pipeline as a Mermaid flowchart")
    grapher.add_argument("target", metavar="TARGET", help="a pipeline file, path/to/file.py:factory or "
                                                          "package.module:factory")
    runner.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                        help="let browser pages from ORIGIN (scheme://host[:port]) call the HTTP API; repeatable; "
                             f"default ${security.ORIGINS_VARIABLE} (comma-separated), else the cockpit's "
                             f"(SOCKET_LOGGER_URL's origin and {security.COCKPIT_ORIGIN})")
    runner.add_argument("--allow-host", action="append", metavar="NAME",
                        help="answer HTTP requests addressed to NAME (Host header) besides the bound address, "
                             f"localhost and loopback; repeatable; default ${security.HOSTS_VARIABLE}")
    runner.add_argument("--insecure", action="store_true",
                        help="serve on a non-loopback address without a token (anyone who reaches it controls "
                             "the pipe; warned at start and in status)")
    runner.add_argument("--record", metavar="FILE.mcap", help="record the wires into FILE.mcap (MCAP) from the start")
    runner.add_argument("--record-wires", metavar="ROUTINES",
                        help="with --record: record only the outputs of these routines (comma-separated)")
    commands.add_parser("zerorpc", help="the zerorpc CLI (fixed for Python 3.10+), plus --token TOKEN",
                        add_help=False)
    record = commands.add_parser("record", help="look into recordings").add_subparsers(
        dest="record_command", required=True, metavar="SUBCOMMAND")
    record.add_parser("info", help="topics, message counts, duration, rates, drops of a recording").add_argument(
        "file", metavar="FILE")
    replay = commands.add_parser("replay", help="print a recording's messages (summaries, not pixels)")
    replay.add_argument("file", metavar="FILE")
    replay.add_argument("--topic", action="append", metavar="TOPIC", help="only this topic (repeatable)")
    replay.add_argument("--limit", type=int, metavar="N", help="stop after N messages")
    top = commands.add_parser("top", help="the routine, wire and flow tables of a running daemon, refreshed in "
                                          "place (q quits)")
    top.add_argument("address", nargs="?", metavar="ADDRESS",
                     help=f"the daemon's HTTP API: HOST:PORT, PORT or http://HOST:PORT; default ${API_VARIABLE}, "
                          f"else {DEFAULT_API}")
    top.add_argument("--token", metavar="TOKEN", help=f"the daemon's token; default ${TOKEN_VARIABLE}")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)")
    top.add_argument("--once", action="store_true", help="print the tables once and exit (also when the output "
                                                         "is not a terminal)")
    return parser


def top_main(args: argparse.Namespace) -> int:
    """``pipert top``: see ``pipert.top``."""
    address = _setting(args.address, API_VARIABLE) or DEFAULT_API
    if "://" not in address:
        host, port = api_address(address)
        address = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if args.interval <= 0:
        raise UsageError(f"--interval {args.interval} must be a positive number of seconds")
    return run_top(address, _setting(args.token, TOKEN_VARIABLE), args.interval, args.once or not sys.stdout.isatty())


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pipert`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    dotenv.load_dotenv(dotenv.find_dotenv(usecwd=True), override=False)
    try:
        if argv[:1] == ["zerorpc"]:
            return zerorpc_main(argv[1:])
        args = _parser().parse_args(argv)
        if args.command in ("plugins", "check", "graph"):
            return _offline_command(args)
        if args.command == "top":
            return top_main(args)
        if args.command in ("record", "replay"):
            try:
                if args.command == "record":
                    return record_info(args.file)
                return replay_print(args.file, args.topic, args.limit)
            except OSError as exc:
                return _fail(f"{exc}: give the path of a recording made with --record or pipe.record()")
            except ValueError as exc:
                return _fail(str(exc))
            except BrokenPipeError:
                return 0
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("pipert").addHandler(handler)
        logging.getLogger("pipert").setLevel(logging.INFO)
        rpc = _setting(args.rpc, RPC_VARIABLE)
        rpc = rpc_endpoint(rpc) if rpc else None
        api = _setting(args.api, API_VARIABLE)
        api = api_address(api) if api else None
        token = _setting(args.token, TOKEN_VARIABLE)
        servers = ([(f"RPC on {rpc}", security.endpoint_host(rpc))] if rpc else []) + \
            ([(f"HTTP on {api[0]}:{api[1]}", api[0])] if api else [])
        origins, hosts = _access(args, servers, token)
        if args.record_wires and not args.record:
            raise UsageError("--record-wires needs --record FILE.mcap")
        return run(args.target, rpc, api, token, args.start, args.ack_timeout, args.param, origins, hosts,
                   args.insecure, args.record, args.record_wires, args.cluster)
    except UsageError as exc:
        print(f"pipert: error: {exc}", file=sys.stderr)
        return 2


def _offline_command(args: argparse.Namespace) -> int:
    """The subcommands that read and print and run nothing: plugins, check, graph."""
    logging.basicConfig(format="pipert: %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        if args.command == "plugins":
            return plugins_main(args.json)
        if args.command == "check":
            return check_main(args.files)
        return graph_main(args.target)
    except (UsageError, BuildError) as exc:
        return _fail(str(exc))
