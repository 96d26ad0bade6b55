"""The ``pipert`` command.

``pipert run TARGET`` runs a pipe as a daemon: it imports TARGET
(``path/to/file.py:factory`` or ``package.module:factory``, a callable that
returns a built or unbuilt ``Pipe``), builds the pipe, starts the control
servers asked for, optionally sends ``start``, and runs until the pipe is killed
(over RPC or HTTP, or by a routine) or the daemon gets SIGINT/SIGTERM. Then it
kills what still runs, joins every flow, frees the shared memory, prints what
every routine and wire did, and exits 0 (1 if a flow died on its own).
Settings come from the flags, else the environment, else the nearest ``.env``:
``PIPERT_RPC_ENDPOINT``, ``PIPERT_API_ADDRESS``, ``PIPERT_TOKEN``. Once the
servers listen it prints their addresses, then ``pipert: ready``.

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
import ipaddress
import logging
import os
import queue
import signal
import sys
import threading
import traceback
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

import dotenv

from .api import APIWrapper
from . import recording as recording_file
from .errors import BuildError, RecordError
from .pipe import Pipe
from .rpc import RPCPipeWrapper, SendToken

RPC_VARIABLE, API_VARIABLE, TOKEN_VARIABLE = "PIPERT_RPC_ENDPOINT", "PIPERT_API_ADDRESS", "PIPERT_TOKEN"
DEFAULT_RPC, DEFAULT_API = "tcp://127.0.0.1:4242", "127.0.0.1:4000"
_POLL = 0.2  # seconds between two checks for a signal
_SERVER_STOP_TIMEOUT = 10.0
_log = logging.getLogger(__name__)


class UsageError(Exception):
    """Something the user passed cannot work; the message says what and how to fix it."""


def _say(message: str) -> None:
    try:
        print(f"pipert: {message}", flush=True)
    except BrokenPipeError:  # whoever read our output has gone; the daemon goes on without it
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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ----- the target -----

def load_target(spec: str) -> Pipe:
    """Import ``path/to/file.py:factory`` or ``package.module:factory`` and return the pipe it makes."""
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

def _serve_rpc(pipe: Pipe, endpoint: str, token: Optional[str], ack_timeout: float) -> threading.Thread:
    """Run an RPCPipeWrapper on its own thread (and gevent hub); returns once it is bound."""
    bound: "queue.Queue[Optional[BaseException]]" = queue.Queue()

    def serve() -> None:
        try:
            server = RPCPipeWrapper(pipe, token=token, ack_timeout=ack_timeout)
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
    """SIGINT/SIGTERM handler: interrupts loading and building (KeyboardInterrupt), and once the pipe runs
    only records the request, so that the daemon's shutdown is never cut short."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.interruptible = True
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self)

    def __call__(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signum
        if first and self.interruptible:
            raise KeyboardInterrupt


def run(target: str, rpc: Optional[str], api: Optional[Tuple[str, int]], token: Optional[str],
        start: bool, ack_timeout: float, record: Optional[str] = None, record_wires: Optional[str] = None) -> int:
    """Run the daemon (see the module docstring); the process's exit code."""
    signals = _Signals()  # before build(), so the pipe leaves SIGTERM to us
    try:
        pipe = load_target(target)
        if not pipe.status()["flows"]:  # flows get a status at build
            pipe.build()
    except KeyboardInterrupt:
        _say("interrupted before the pipe ran")
        return 0
    except (UsageError, BuildError) as exc:
        return _fail(str(exc))
    except Exception:
        traceback.print_exc()
        return _fail(f"TARGET {target!r} failed while making or building the pipe (traceback above)")
    signals.interruptible = False
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
            servers.append(_serve_rpc(pipe, rpc, token, ack_timeout))
            _say(f"rpc listening on {rpc}")
        if api is not None:
            http = APIWrapper(api[0], api[1], pipe, token=token, ack_timeout=ack_timeout)
            try:
                http.run()
            except OSError as exc:
                raise UsageError(f"cannot serve HTTP on {api[0]}:{api[1]}: {exc.strerror or exc}: choose another "
                                 f"address with --api or {API_VARIABLE}") from None
            servers.append(http)
            host, port = http.address
            _say(f"http listening on http://{f'[{host}]' if ':' in host else host}:{port}")
    except UsageError as exc:
        pipe.join(to_kill=True)
        _join_all(servers)
        return _fail(str(exc))
    if start and signals.received is None:
        ack = pipe.send_event("start").wait(ack_timeout)
        _say(f"started: {len(ack['handled_by'])} routines" + (f", errors {ack['errors']}" if ack["errors"] else ""))
    _say("ready")
    joiner = threading.Thread(target=pipe.join, name="pipert-join", daemon=True)  # returns once all flows ended
    joiner.start()
    while signals.received is None and joiner.is_alive():
        joiner.join(_POLL)
    if signals.received is not None:
        _say(f"stopping on {signal.Signals(signals.received).name}")
        pipe.kill()
    joiner.join()
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


def _join_all(servers: List[Any]) -> None:
    """Wait for the servers to answer what is under way and stop (whoever ran Pipe.join's clean-up
    may be one of them: the process must not exit before it is done)."""
    for server in servers:
        server.join(_SERVER_STOP_TIMEOUT)


def _recording_line(recording: Dict[str, Any]) -> str:
    counts = ", ".join(f"{w} {recording['messages'][w]} (dropped {recording['dropped'][w]})" for w in recording["wires"])
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
    state = "complete" if summary["complete"] else f"cut short, read up to its last complete chunk ({summary['error']})"
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
    runner.add_argument("target", metavar="TARGET", help="path/to/file.py:factory or package.module:factory")
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pipert`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    dotenv.load_dotenv(dotenv.find_dotenv(usecwd=True), override=False)
    try:
        if argv[:1] == ["zerorpc"]:
            return zerorpc_main(argv[1:])
        args = _parser().parse_args(argv)
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
        hosts = ([urlsplit(rpc).hostname or rpc] if rpc else []) + ([api[0]] if api else [])
        public = [host for host in hosts if not _is_loopback(host)]
        if public and not token:
            _log.warning("control servers listen on %s without a token: anyone who reaches them controls the "
                         "pipe; set %s", public, TOKEN_VARIABLE)
        if args.record_wires and not args.record:
            raise UsageError("--record-wires needs --record FILE.mcap")
        return run(args.target, rpc, api, token, args.start, args.ack_timeout, args.record, args.record_wires)
    except UsageError as exc:
        print(f"pipert: error: {exc}", file=sys.stderr)
        return 2
