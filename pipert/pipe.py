"""The Pipe: the daemon side of a pipeline.

The process that builds a pipe is the daemon. It validates the graph, creates
the shared memory, forks the zygote (before any thread of its own), asks it for
one process per flow, routes events to flows and collects their
acknowledgements, log records and counters. It never runs routines itself.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import os
import secrets
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from . import shm
from .bridge import Hub
from .errors import BuildError, EventError, RecordError
from .events import (BUILTIN_EVENTS, KILL_EVENT_NAME, LOG_DATA_EVENT_NAME, PARAMS_EVENT_NAME, RUNTIME_EVENTS,
                     START_EVENT_NAME, STOP_EVENT_NAME, check_params, describe_handlers, handlers_of)
from .flow import IDLE, RUNNING, Flow, RoutinePlan, channel_key, run_flow
from .frames import FrameFilter
from .metrics import COUNTERS, HISTOGRAMS, EventStats, Totals
from .params import ParamError, convert_params, declared_params, plain, raise_problems, resolve_params
from .recorder import Recording
from .replicas import OrderedMerge, ReplicaChooser, instance_names, replica_name
from .routine import DestinationRoutine, Routine, SourceRoutine
from .signals import STOP_SIGNALS, heeded
from .socket_logger import CockpitHandler
from .transport import Inbox, LocalChannel, Pool, RemoteTarget, RingReader, WireSender, create_ring
from .wire import BLOCK, LATEST, POLICIES, Wire
from .zygote import Zygote

_READY_TIMEOUT = 30.0
_SETTLE = 1.0  # seconds a stop signal seen first in a flow or the zygote waits for the daemon's own
PARAMS_TIMEOUT = 10.0  # seconds set_params waits for the routine to apply new values
_log = logging.getLogger(__name__)


def _default_logger() -> logging.Logger:
    logger = logging.getLogger("pipe")
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(FrameFilter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


class EventResult:
    """The acknowledgements of one event, filled in as its routines report back."""

    def __init__(self, event: str, routines: List[str],
                 observe: Optional[Callable[[str, str, Optional[str], float], None]] = None) -> None:
        self.event = event
        self.routines = list(routines)
        self.handled_by: List[str] = []
        self.errors: Dict[str, str] = {}
        self._pending = set(routines)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._observe = observe  # called with (event, routine, error, seconds since sent) at each ack
        self._sent = time.monotonic()
        if not self._pending:
            self._done.set()

    def _ack(self, routine: str, error: Optional[str]) -> None:
        with self._lock:
            if routine not in self._pending:
                return
            self._pending.discard(routine)
            if self._observe is not None:
                self._observe(self.event, routine, error, time.monotonic() - self._sent)
            if error is None:
                self.handled_by.append(routine)
            else:
                self.errors[routine] = error
            if not self._pending:
                self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Wait until every routine acknowledged (or ``timeout``); the result as a dict."""
        self._done.wait(timeout)
        with self._lock:
            return {"event": self.event, "handled_by": sorted(self.handled_by), "errors": dict(self.errors),
                    "pending": sorted(self._pending)}


@dataclasses.dataclass
class _RemoteWire:
    """A ring between two flows, as the daemon sees it for status and recovery."""

    source: str
    destination: str
    source_flow: str  # flow process names: the flow's, or flow/i for a replica
    destination_flow: str
    target: RemoteTarget


class _FlowState:
    """What the daemon knows of one flow process."""

    def __init__(self) -> None:
        self.restart_times: List[float] = []
        self.last_exit: Optional[Dict[str, Any]] = None
        self.restarting = False
        self.pid: Optional[int] = None
        self.conn: Optional[Connection] = None
        self.reader: Optional[threading.Thread] = None
        self.send_lock = threading.Lock()
        self.ready = threading.Event()
        self.node: Optional[Dict[str, str]] = None  # on a cluster: the Ray node id and host name
        self.alive = False
        self.exit_code: Optional[int] = None
        self.restarts = 0
        self.routines: Dict[str, Dict[str, Any]] = {}
        self.channels: Dict[str, Tuple[int, int]] = {}
        self.totals = Totals()  # counts of the flow's earlier processes


class Pipe:
    """A pipeline of flows (processes) of routines (threads) linked by wires.

    ``wire_policy``/``wire_depth`` are the defaults of wires that set none;
    ``ring_capacity`` is the byte size of each inter-flow ring (small messages
    travel inline, large buffers through a pool of ``pool_slots`` slots per
    wire, default ``2 * depth + 4``); ``kill_grace`` is how long flows get to
    finish at kill before they are terminated.

    Observability: every routine logs ``fps: <rate>`` at PIPE_INFRASTRUCTURE
    every ``fps_log_interval`` seconds; after a ``log_data`` event it sends at
    most ``frames_per_second`` input and output frames a second, JPEG at
    ``jpeg_quality``. With ``auto_pacing_mechanism`` every source is slowed to
    the capacity of the slowest routine downstream of it times
    ``pacing_multiplier``, so no work is spent on frames that would be dropped.

    ``params`` cascade: each applies to every routine that declares a parameter
    of that name (see ``pipert.Param``) and does not set it itself.

    ``cluster`` runs the flows on a Ray cluster: ``"ray"`` (the cluster this
    machine belongs to, or a local one), ``"ray://HOST:PORT"`` or a Ray address;
    see ``pipert.cluster``. None (the default) runs everything on this host.
    """

    def __init__(self, logger: Optional[logging.Logger] = None, wire_policy: str = LATEST, wire_depth: int = 1,
                 ring_capacity: int = 4 << 20, pool_slots: Optional[int] = None, kill_grace: float = 5.0,
                 auto_pacing_mechanism: bool = False, pacing_multiplier: float = 1.1,
                 fps_log_interval: float = 3.0, frames_per_second: float = 2.0, jpeg_quality: int = 70,
                 params: Optional[Dict[str, Any]] = None, cluster: Optional[str] = None) -> None:
        if wire_policy not in POLICIES:
            raise ValueError(f"wire_policy {wire_policy!r} is unknown: use 'latest' or 'block'")
        self._cluster: Any = None
        self.set_cluster(cluster)
        self._here: Optional[set] = None  # the flow processes this host runs (None: all of them)
        self._host_of: Dict[str, str] = {}  # flow process -> the host that runs it (on a cluster)
        self._hub: Optional[Hub] = None
        self._bridge_bells: List[Any] = []
        self._upstream: Any = None  # on a node agent: its connection to the driver
        self._node: Optional[Dict[str, str]] = None  # on a cluster: this host's Ray node id and host name
        self.logger = logger if logger is not None else _default_logger()
        self.id = secrets.token_hex(4)
        self.params: Dict[str, Any] = dict(params or {})
        self.flows: Dict[str, Flow] = {}
        self.wires: List[Wire] = []
        self._flow_list: List[Flow] = []
        self._wire_policy = wire_policy
        self._wire_depth = wire_depth
        self._ring_capacity = ring_capacity
        self._pool_slots = pool_slots
        self._kill_grace = kill_grace
        self._auto_pacing = auto_pacing_mechanism
        self._pacing_multiplier = pacing_multiplier
        self._fps_log_interval = fps_log_interval
        self._frames_per_second = frames_per_second
        self._jpeg_quality = jpeg_quality
        self._plans: Dict[str, Dict[str, RoutinePlan]] = {}  # flow process -> routine -> plan
        self._instances: Dict[str, Flow] = {}  # flow process name (flow, or flow/i for replicas) -> flow
        self._instance_names: Dict[str, List[str]] = {}  # flow -> its process names
        self._params_set: Set[str] = set()  # routines whose parameters set_params changed since build
        self._flow_of: Dict[str, str] = {}
        self._remote: List[_RemoteWire] = []
        self._wanted: Dict[str, str] = {}
        self._event_stats = EventStats()
        self._local: List[Tuple[str, str, str, str]] = []
        self._states: Dict[str, _FlowState] = {}
        self._results: Dict[int, EventResult] = {}
        self._event_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._all_exited = threading.Event()
        self._zygote: Optional[Zygote] = None
        self._built = False
        self._building = False
        self._closed = False
        self._shut_down = threading.Event()
        self._killing = False
        self._zygote_lost = False
        self._settled_until = 0.0  # until then, a stop signal reported by a flow needs no new wait
        self._replaced_handlers: Dict[int, Any] = {}
        self._recording: Optional[Recording] = None
        self._record_lock = threading.Lock()

    _SETTINGS = {"logger": "logger", "wire_policy": "_wire_policy", "wire_depth": "_wire_depth",
                 "ring_capacity": "_ring_capacity", "pool_slots": "_pool_slots", "kill_grace": "_kill_grace",
                 "auto_pacing_mechanism": "_auto_pacing", "pacing_multiplier": "_pacing_multiplier",
                 "fps_log_interval": "_fps_log_interval", "frames_per_second": "_frames_per_second",
                 "jpeg_quality": "_jpeg_quality", "params": "params"}
    _GRAPH = ("id", "flows", "wires", "_flow_list", "_flow_of", "_instances", "_instance_names", "_host_of")

    def __getstate__(self) -> Dict[str, Any]:
        """The settings and graph of a validated pipe, for a node agent that runs part of it."""
        return {"settings": {k: getattr(self, a) for k, a in self._SETTINGS.items()},
                "graph": {a: getattr(self, a) for a in self._GRAPH}, "log_level": self.logger.getEffectiveLevel()}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state["settings"])
        self.__dict__.update(state["graph"])
        self.logger.setLevel(state["log_level"])

    def set_cluster(self, cluster: Optional[str]) -> None:
        """Run on ``cluster`` (see the class docstring; None: this host) instead of what the pipe
        was made with; before ``build()``. Without Ray installed this fails at once."""
        if getattr(self, "_built", False):
            raise BuildError("set_cluster() comes before build(): the pipe's flows already run")
        self._cluster = None
        if cluster is not None:
            from .cluster import Cluster
            self._cluster = Cluster(self, cluster)

    # ----- declaring the graph -----

    def create_flow(self, flow_name: str, auto_wire: bool, *routines: Routine, restart: str = "on-failure",
                    max_restarts: int = 5, restart_window: float = 60.0, restart_backoff: float = 0.5,
                    replicas: int = 1, resources: Optional[Dict[str, float]] = None) -> Flow:
        """Add a flow running ``routines``; with ``auto_wire`` link each to the next.

        The keyword arguments set the flow's restart policy, its number of
        ``replicas`` (processes ``flow/0`` .. sharing its input) and the
        ``resources`` it needs on a cluster (see ``Flow``).
        """
        flow = Flow(flow_name, routines, restart, max_restarts, restart_window, restart_backoff, replicas, resources)
        for routine in routines:
            if isinstance(routine, Routine):
                routine.flow_name = flow_name
        self._flow_list.append(flow)
        self.flows.setdefault(flow_name, flow)
        if auto_wire:
            for source, destination in zip(routines, routines[1:]):
                self.link(Wire(source=source, destinations=(destination,)))
        return flow

    def link(self, *wires: Wire) -> None:
        """Add wires between routines."""
        self.wires.extend(wires)

    # ----- validation and build -----

    def validate(self) -> None:
        """Check the graph and every routine's parameters as ``build()`` does, starting nothing;
        raises BuildError (ParamError, listing every one, for parameters)."""
        self._validate()

    def _validate(self) -> Dict[str, str]:
        flow_of: Dict[int, str] = {}
        names: Dict[str, Routine] = {}
        if not self._flow_list:
            raise BuildError("the pipe has no flows: add one with pipe.create_flow(name, auto_wire, *routines)")
        seen_flows = set()
        for flow in self._flow_list:
            if flow.name in seen_flows:
                raise BuildError(f"flow name '{flow.name}' is used twice: give each flow its own name")
            if "/" in flow.name:
                raise BuildError(f"flow name '{flow.name}' contains '/', which names replicas (flow/0): "
                                 "choose a name without it")
            seen_flows.add(flow.name)
            if not flow.routines:
                raise BuildError(f"flow '{flow.name}' has no routines: pass them to create_flow")
            for routine in flow.routines:
                if not isinstance(routine, Routine):
                    raise BuildError(f"flow '{flow.name}' holds {routine!r}, which is not a routine: pass "
                                     "SourceRoutine, MiddleRoutine or DestinationRoutine instances")
                if id(routine) in flow_of:
                    raise BuildError(f"routine '{routine.name}' is in two flows ('{flow_of[id(routine)]}' and "
                                     f"'{flow.name}'): create a separate instance for each flow")
                if routine.name in names:
                    raise BuildError(f"routine name '{routine.name}' is used twice: give each routine its own "
                                     "name, e.g. MyRoutine(name='my-routine-2')")
                flow_of[id(routine)] = flow.name
                names[routine.name] = routine
        inputs: Dict[str, int] = {n: 0 for n in names}
        outputs: Dict[str, int] = {n: 0 for n in names}
        edges: Dict[str, List[str]] = {n: [] for n in names}
        seen_edges = set()
        for wire in self.wires:
            for end in (wire.source, *wire.destinations):
                if id(end) not in flow_of:
                    raise BuildError(f"a wire links {end!r}, which is in no flow: add it to a flow with "
                                     "create_flow before linking it")
            if not wire.destinations:
                raise BuildError(f"the wire from routine '{wire.source.name}' has no destinations")
            if isinstance(wire.source, DestinationRoutine):
                raise BuildError(f"destination routine '{wire.source.name}' cannot have outputs: make it a "
                                 "MiddleRoutine to send data on")
            for destination in wire.destinations:
                if isinstance(destination, SourceRoutine):
                    raise BuildError(f"source routine '{destination.name}' cannot have inputs: make it a "
                                     "MiddleRoutine to receive data")
                edge = (wire.source.name, destination.name)
                if edge in seen_edges:
                    raise BuildError(f"routine '{edge[0]}' is wired to '{edge[1]}' twice: remove one wire")
                seen_edges.add(edge)
                outputs[wire.source.name] += 1
                inputs[destination.name] += 1
                edges[wire.source.name].append(destination.name)
            if wire.policy is None:
                wire.policy = self._wire_policy
            if wire.depth is None:
                wire.depth = self._wire_depth
        for name, routine in names.items():
            if not inputs[name] and not outputs[name]:
                raise BuildError(f"routine '{name}' is linked to nothing: wire it with pipe.link(Wire(...)) "
                                 "or create its flow with auto_wire=True")
            if not isinstance(routine, SourceRoutine) and not inputs[name]:
                raise BuildError(f"routine '{name}' has no inputs, so it would never run: wire a routine into it")
            if not isinstance(routine, DestinationRoutine) and not outputs[name]:
                raise BuildError(f"routine '{name}' has no outputs: wire it to a destination, or make it a "
                                 "DestinationRoutine")
        self._check_acyclic(edges)
        self._settle_params(names.values())
        return {name: flow_of[id(routine)] for name, routine in names.items()}

    def _settle_params(self, routines: Iterable[Routine]) -> None:
        """Fix every routine's parameters (its own, else the pipe's, else defaults); one ParamError
        lists every missing, unknown or invalid one, so nothing starts with a bad value."""
        problems: List[object] = []
        settled = []
        for routine in routines:
            values, found = resolve_params(routine.name, type(routine), routine._given, self.params)
            problems += found
            settled.append((routine, values))
        declared = {name for routine, _ in settled for name in declared_params(type(routine))}
        for name in self.params:
            if name not in declared:
                problems.append(f"pipe parameter '{name}' (given {self.params[name]!r}) is declared by no routine: "
                                f"remove it or check its spelling; routines declare {sorted(declared) or 'none'}")
        raise_problems(problems)
        for routine, values in settled:
            routine._params = values

    @staticmethod
    def _check_acyclic(edges: Dict[str, List[str]]) -> None:
        colour: Dict[str, int] = {}

        def visit(node: str, path: List[str]) -> None:
            colour[node] = 1
            for nxt in edges[node]:
                if colour.get(nxt) == 1:
                    cycle = path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
                    raise BuildError(f"the wires form a cycle: {' -> '.join(cycle)}: remove one of these wires")
                if nxt not in colour:
                    visit(nxt, path + [node])
            colour[node] = 2

        for node in edges:
            if node not in colour:
                visit(node, [])

    def _is_here(self, instance: str) -> bool:
        return self._here is None or instance in self._here

    def _plan(self, flow_of: Dict[str, str]) -> None:
        """Every routine's inputs and outputs in the flow processes of this host: local channels
        inside a process, one ring per (wire, source process, destination routine process)
        between them. A ring to or from a process on another node ends in a bridge."""
        pid = os.getpid()
        bells = itertools.count()
        plans = {instance: {r.name: RoutinePlan(Inbox(shm.create_semaphore(shm.name(self.id, pid, f"bell{next(bells)}"),
                                                                            0)), [], {})
                            for r in flow.routines}
                 for instance, flow in self._instances.items() if self._is_here(instance)}
        slots = self._pool_slots
        for index, wire in enumerate(self.wires):
            source, source_flow = wire.source.name, flow_of[wire.source.name]
            choose = ReplicaChooser(f"wire from routine '{source}'", wire.key)
            merges: Dict[Tuple[str, str], List[RingReader]] = {}
            receivers = sum(self.flows[flow_of[d.name]].replicas for d in wire.destinations
                            if flow_of[d.name] != source_flow)
            for number, instance in enumerate(self._instance_names[source_flow]):
                here = self._is_here(instance)
                pool = None
                if receivers and here:
                    pool = Pool(self.id, f"{index}_{number}", slots or 2 * wire.depth + 4, receivers)
                local, remote, replicated, receiver = [], [], [], 0
                for destination in wire.destinations:
                    if flow_of[destination.name] == source_flow:
                        if here:
                            plan = plans[instance][destination.name]
                            channel = LocalChannel(wire.depth, wire.policy, plan.inbox.bell)
                            local.append(channel)
                            plan.local_channels[index] = channel
                            plan.inbox.readers.append(channel)
                            self._local.append((source, destination.name, instance,
                                                channel_key(index, destination.name)))
                        continue
                    group = []
                    for target_instance in self._instance_names[flow_of[destination.name]]:
                        tag, receiver = f"{index}_{number}_{receiver}", receiver + 1
                        there = self._is_here(target_instance)
                        if not here and not there:
                            continue
                        ring = create_ring(self.id, tag, self._ring_capacity, wire.depth, wire.policy)
                        if here and not there:  # to another node: a bridge reads the ring
                            bell = shm.create_semaphore(shm.name(self.id, pid, f"bridge{tag}"), 0)
                            self._bridge_bells.append(bell)
                            target = RemoteTarget(ring, bell, receiver - 1, pool)
                            self._hub.send(tag, target_instance, ring, pool, receiver - 1, bell)
                        else:
                            plan = plans[target_instance][destination.name]
                            if here:
                                target = RemoteTarget(ring, plan.inbox.bell, receiver - 1, pool)
                                reader = RingReader(ring, pool, receiver - 1)
                            else:  # from another node: a bridge writes the ring, through a pool of its own
                                bridge_pool = Pool(self.id, f"in{tag}", slots or 2 * wire.depth + 4, 1)
                                target = RemoteTarget(ring, plan.inbox.bell, 0, bridge_pool)
                                reader = RingReader(ring, bridge_pool, 0)
                                self._hub.expect(tag, ring, bridge_pool, plan.inbox.bell, wire.policy)
                            if wire.ordered:
                                merges.setdefault((target_instance, destination.name), []).append(reader)
                            else:
                                plan.inbox.readers.append(reader)
                        self._remote.append(_RemoteWire(source, destination.name, instance, target_instance, target))
                        group.append(target)
                    if not here:
                        continue
                    if len(group) > 1:
                        replicated.append(group)
                    else:
                        remote.extend(group)
                if here:  # a sender into replicas stamps its own order stream: wire and source process
                    plans[instance][source].senders.append(
                        WireSender(source, wire.policy == BLOCK, local, remote, pool, replicated,
                                   choose if replicated else None, (index << 8 | number) + 1 if replicated else None))
            for (instance, destination), readers in merges.items():
                merge = OrderedMerge(readers)
                plan = plans[instance][destination]
                plan.inbox.readers.append(merge)
                plan.local_channels[index] = merge
                self._local.append((source, destination, instance, channel_key(index, destination)))
        self._plans = plans

    def build(self) -> None:
        """Validate the graph, create shared memory and start one process per flow."""
        if self._built:
            raise BuildError("this pipe is already built: build() runs once per pipe")
        self._flow_of = self._validate()
        self.flows = {flow.name: flow for flow in self._flow_list}
        self._instance_names = {f.name: instance_names(f.name, f.replicas) for f in self._flow_list}
        self._instances = {i: f for f in self._flow_list for i in self._instance_names[f.name]}
        shm.sweep_stale()
        self._built = self._building = True
        try:
            if self._cluster is not None:
                self._cluster.place()
            self._start_host()
            if self._cluster is not None:
                self._cluster.start()
            self._start_flows()
        except BaseException:
            self._shutdown()
            raise
        finally:
            self._building = False
        self._install_stop_handlers()
        if self._auto_pacing:
            threading.Thread(target=self._pace_sources, name="pipert-pacing", daemon=True).start()
        structure = self.structure()
        for handler in self.logger.handlers:
            if hasattr(handler, "send_pipe_creation"):
                handler.send_pipe_creation(structure)
        self.logger.plog("pipe %s built: %d flows, %d routines", self.id, len(self.flows), len(self._flow_of))

    def _start_host(self, detach: bool = False) -> None:
        """The per-host part of build: this host's shared memory and bridges, and the zygote
        that forks its flow processes (on a cluster, each node agent does the same, ``detach``)."""
        self._plan(self._flow_of)
        self._zygote = Zygote(self.id, lambda flow, fd: run_flow(self, flow, fd), detach)
        threading.Thread(target=self._read_zygote, name="pipert-zygote-reader", daemon=True).start()
        atexit.register(self._shutdown)

    def _start_flows(self) -> None:
        """Fork this host's flow processes and wait until each one is ready."""
        local = [name for name in self._instances if self._is_here(name)]
        for name in local:
            self._states[name] = _FlowState()
            self._states[name].node = self._node
            self._spawn(name)
        deadline = time.monotonic() + _READY_TIMEOUT
        for name in local:
            state = self._states[name]
            while not state.ready.wait(0.05):
                if state.last_exit is not None:
                    raise BuildError(f"flow '{name}' ended while starting ({state.last_exit['how']}): "
                                     "see its log")
                if time.monotonic() > deadline:
                    raise BuildError(f"flow '{name}' did not start within {_READY_TIMEOUT:.0f} s: "
                                     "see its log")

    def _install_stop_handlers(self) -> None:
        """In a script: SIGTERM and SIGHUP, unless the script handles them, exit like Ctrl-C does (so
        ``join`` and atexit shut the pipe down) instead of ending the daemon without clean-up."""
        if threading.current_thread() is not threading.main_thread():
            return
        def stop(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                self._replaced_handlers[signum] = signal.SIG_DFL
                signal.signal(signum, stop)

    def _spawn(self, flow: str) -> None:
        ours, theirs = socket.socketpair()
        state = self._states[flow]
        state.conn = Connection(ours.detach())
        state.ready.clear()
        state.alive = True
        self._zygote.spawn(flow, theirs.fileno())
        theirs.close()
        state.reader = threading.Thread(target=self._read_flow, args=(flow, state.conn),
                                        name=f"pipert-{flow}-reader", daemon=True)
        state.reader.start()

    # ----- messages from flows and the zygote -----

    def _read_flow(self, flow: str, conn: Connection) -> None:
        state = self._states[flow]
        name = self._instances[flow].name
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                conn.close()
                with self._lock:  # this process reports no more: its counts carry forward
                    state.totals.take(state.routines, state.channels)
                return
            kind = message[0]
            if kind == "ack":  # counts only grow within a process: an ack older than the last report keeps those
                known = state.routines.setdefault(message[2], {})
                known.update({k: max(v, known.get(k, v)) if k in COUNTERS else v for k, v in message[4].items()})
                self._ack(message[1], replica_name(message[2], flow, name), message[3])
            elif kind == "status":
                state.routines.update(message[2])
                state.channels = message[3]
            elif kind == "log" and self._upstream is not None:
                self._upstream_send(message)
            elif kind == "log":
                record = logging.makeLogRecord(message[1])
                logging.getLogger(record.name).handle(record)
            elif kind == "notify" and self._upstream is not None:
                self._upstream_send(message)
            elif kind == "notify":
                self._notify(flow, message[1], message[2], message[3])
            elif kind == "ready":
                state.pid = message[2]
                state.ready.set()

    def _ack(self, event_id: int, routine: str, error: Optional[str]) -> None:
        """A routine (``det/1`` for a replica) acknowledged an event; a node agent passes the
        acknowledgements of the driver's events (positive ids) on to it."""
        if self._upstream is not None:
            if event_id > 0:
                self._upstream_send(("ack", event_id, routine, error))
            return
        result = self._results.get(event_id)
        if result is not None:
            result._ack(routine, error)

    def _notify(self, flow: str, name: str, targets: Optional[Dict[str, Any]], params: Dict[str, Any]) -> None:
        """An event a routine sent (from flow process ``flow``)."""
        try:
            self._dispatch(name, self._resolve(name, targets, params, False), params)
        except Exception:
            self.logger.exception("event '%s' from flow '%s' could not be delivered", name, flow)

    def _upstream_send(self, message: tuple) -> None:
        with self._lock:
            try:
                self._upstream.send(message)
            except (OSError, ValueError):
                pass

    def _read_zygote(self) -> None:
        while True:
            try:
                report = self._zygote.receive()
            except OSError:
                report = ()
            if not report:
                if not self._closed:
                    self._lost_zygote()
                return
            if report[0] == "spawned":
                self._states[report[1]].pid = report[2]
            elif report[0] == "exited":
                self._flow_exited(report[1], report[2], report[3])
            elif report[0] == "signalled" and not self._stopping():
                self._zygote_signalled(report[1])

    def _stopping(self) -> bool:
        """Whether the pipe is being killed or shut down, after waiting up to ``_SETTLE`` s for that.

        A stop signal sent to the whole process group (or cgroup) reaches the daemon, the zygote and
        every flow at about the same moment, and a flow or the zygote may report theirs first: only
        if the daemon has not begun to stop by then was the signal meant for them alone.
        """
        now = time.monotonic()
        deadline = now + _SETTLE if now >= self._settled_until else now  # one wait serves a burst of reports
        while not (self._killing or self._closed) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not (self._killing or self._closed):
            self._settled_until = time.monotonic() + _SETTLE
        return self._killing or self._closed

    def _zygote_signalled(self, signum: int) -> None:
        """A stop signal reached the zygote alone. The zygote lives on (only it can fork flows) but
        passes the signal to its flows: they stop, cleanups run, and each restarts by its policy."""
        name = signal.Signals(signum).name
        self.logger.warning("the zygote (pid %d) got %s: passing it to its flows, which restart by their "
                            "policy", self._zygote.pid, name)
        for name, state in self._states.items():
            if state.alive and state.pid and self._is_here(name):
                try:
                    os.kill(state.pid, signum)
                except ProcessLookupError:
                    pass

    def _lost_zygote(self) -> None:
        """The zygote died (SIGKILL, a crash): its flows died with it and none can be forked again."""
        self._zygote_lost = True
        self.logger.error("the zygote (pid %d) ended unexpectedly: its flows ended with it and cannot be "
                          "restarted", self._zygote.pid)
        for flow, state in list(self._states.items()):
            if state.alive and self._is_here(flow):
                self._flow_exited(flow, state.pid or 0, -signal.SIGKILL)

    def _flow_exited(self, flow: str, pid: int, code: int) -> None:
        """A flow process ended: free its shared memory, unwedge its wires, maybe restart it."""
        state = self._states[flow]
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        stop_signal = -code in STOP_SIGNALS
        if stop_signal:
            self._stopping()  # a signal to the whole group is a stop, not a fault of this flow
        with self._lock:
            state.alive = False
            state.exit_code = code
            state.last_exit = {"pid": pid, "how": how, "time": time.time()}
            for routine in self._instances[flow].routines:
                state.routines.setdefault(routine.name, {})["state"] = "killed" if self._killing else "dead"
        shm.unlink_owned(self.id, pid)
        self._recover_wires(flow)
        if not self._killing or (code != 0 and not stop_signal):
            self.logger.error("flow '%s' (pid %d) ended: %s", flow, pid, how)
        self._ended(flow, how)
        if not self._killing and self._schedule_restart(flow, code):
            return
        self._check_all_exited()

    def _ended(self, flow: str, how: str) -> None:
        """Events that flow process ``flow`` will never acknowledge now fail for its routines."""
        for result in list(self._results.values()):
            for routine in self._instances[flow].routines:
                result._ack(replica_name(routine.name, flow, self._instances[flow].name),
                            f"flow '{flow}' ended ({how})")

    def _check_all_exited(self) -> None:
        if not any(s.alive or s.restarting for s in self._states.values()):
            self._all_exited.set()

    def _recover_wires(self, flow: str) -> None:
        """Make the rings of a dead flow safe: no slot held forever, no producer waiting
        forever for a dead consumer."""
        for wire in self._remote:
            target = wire.target
            if wire.source_flow == flow:
                target.ring.recover(wire.destination_flow == flow)
                target.pool.release_all(target.receiver)
            elif wire.destination_flow == flow:
                kept = target.ring.recover(True)
                target.pool.release_all(target.receiver, kept)

    def _schedule_restart(self, flow: str, code: int) -> bool:
        """Restart ``flow`` later if its policy and budget allow; True if scheduled."""
        spec, state = self._instances[flow], self._states[flow]
        if spec.restart == "never" or (spec.restart == "on-failure" and code == 0) or self._closed \
                or self._building or self._zygote_lost:
            return False
        now = time.monotonic()
        state.restart_times = [t for t in state.restart_times if now - t < spec.restart_window]
        if len(state.restart_times) >= spec.max_restarts:
            self.logger.error("flow '%s' failed %d times within %.0f s: not restarting it again", flow,
                              len(state.restart_times), spec.restart_window)
            return False
        delay = min(spec.restart_backoff * 2 ** len(state.restart_times), 10.0)
        state.restart_times.append(now)
        state.restarting = True
        self.logger.warning("restarting flow '%s' in %.1f s (restart %d within %.0f s)", flow, delay,
                            len(state.restart_times), spec.restart_window)
        timer = threading.Timer(delay, self._restart, (flow,))
        timer.daemon = True
        timer.start()
        return True

    def _restart(self, flow: str) -> None:
        state = self._states[flow]
        try:
            if self._closed or self._killing or self._zygote_lost:
                return
            for wire in self._remote:  # before the new consumer reads: producers stop dropping for it
                if wire.destination_flow == flow:
                    wire.target.ring.consumer_back()
            self._spawn(flow)
            if not state.ready.wait(_READY_TIMEOUT):
                self.logger.error("restarted flow '%s' did not start within %.0f s", flow, _READY_TIMEOUT)
                return
            state.restarts += 1
            for routine in self._instances[flow].routines:  # the zygote holds the values of build time
                if routine.name in self._params_set:
                    self._dispatch(PARAMS_EVENT_NAME, {flow: [routine.name]}, routine.params, processes=True)
            if self._recording is not None:
                self._recording.flow_started(flow)
            wanted = [r.name for r in self._instances[flow].routines if self._wanted.get(r.name) == START_EVENT_NAME]
            if wanted:
                self._dispatch(START_EVENT_NAME, {flow: wanted}, {}, processes=True)
            self.logger.info("flow '%s' restarted (pid %s)", flow, state.pid)
        finally:
            state.restarting = False
            self._check_all_exited()

    def _downstream(self) -> Dict[str, List[str]]:
        """For every source routine, every routine its data reaches."""
        edges: Dict[str, List[str]] = {}
        for wire in self.wires:
            edges.setdefault(wire.source.name, []).extend(d.name for d in wire.destinations)
        reach: Dict[str, List[str]] = {}
        for flow in self._flow_list:
            for routine in flow.routines:
                if isinstance(routine, SourceRoutine):
                    seen, todo = [], list(edges.get(routine.name, []))
                    while todo:
                        name = todo.pop()
                        if name not in seen:
                            seen.append(name)
                            todo.extend(edges.get(name, []))
                    reach[routine.name] = seen
        return reach

    def _pace_sources(self) -> None:
        """Auto pacing: once a second, cap each source at its slowest downstream routine's capacity."""
        reach = self._downstream()
        paced: Dict[str, Optional[float]] = {}
        while not self._closed and not self._killing:
            capacities = {name: r["capacity"] for name, r in self.status()["routines"].items()}
            for source, downstream in reach.items():
                known = [capacities[d] for d in downstream if capacities.get(d)]
                own = capacities.get(source)
                target = round(min(known) * self._pacing_multiplier, 2) if known else None
                if target is not None and own is not None and own <= target:
                    target = None
                if paced.get(source) != target:
                    paced[source] = target
                    for instance in self._instance_names[self._flow_of[source]]:
                        self._send_to_flow(instance, ("pace", {source: target}))
            time.sleep(1.0)

    def _send_to_flow(self, flow: str, message: tuple) -> bool:
        if not self._is_here(flow):
            return self._cluster.send(flow, message)
        state = self._states[flow]
        with state.send_lock:
            if not state.alive:
                return False
            try:
                state.conn.send(message)
            except OSError:
                return False
        return True

    # ----- events -----

    def _resolve(self, name: str, targets: Optional[Dict[str, Any]], params: Dict[str, Any],
                 strict: bool = True) -> Dict[str, List[str]]:
        """The routines, by flow, that ``name`` goes to.

        Unknown flows or routines and parameters that fit no handler raise. An
        event that no chosen routine handles raises when ``strict``, else it is
        logged and goes nowhere (PipeRT 2 scripts send such events freely).
        """
        if not isinstance(name, str) or not name:
            raise EventError(f"event name {name!r} must be a non-empty string")
        explicit: set = set()
        chosen: Dict[str, List[Routine]] = {}
        if not targets:
            chosen = {flow.name: list(flow.routines) for flow in self.flows.values()}
        else:
            if not isinstance(targets, dict):
                raise EventError(f"event targets {targets!r} must be a dict {{flow: [routine, ...]}}")
            for flow_name, routine_names in targets.items():
                flow = self.flows.get(flow_name)
                if flow is None:
                    raise EventError(f"event '{name}': there is no flow '{flow_name}'; flows are "
                                     f"{sorted(self.flows)}")
                if isinstance(routine_names, str):
                    routine_names = [routine_names]
                by_name = {r.name: r for r in flow.routines}
                if not routine_names:
                    chosen[flow_name] = list(flow.routines)
                    continue
                for routine_name in routine_names:
                    if routine_name not in by_name:
                        raise EventError(f"event '{name}': flow '{flow_name}' has no routine '{routine_name}'; "
                                         f"it has {sorted(by_name)}")
                    explicit.add(routine_name)
                chosen[flow_name] = [by_name[r] for r in routine_names]
        resolved: Dict[str, List[str]] = {}
        for flow_name, routines in chosen.items():
            for routine in routines:
                handlers = handlers_of(routine).get(name, [])
                if name not in RUNTIME_EVENTS and not handlers:
                    if routine.name in explicit and strict:
                        raise EventError(f"routine '{routine.name}' does not handle event '{name}': declare a "
                                         f"method with @events('{name}') on {type(routine).__name__}")
                    continue
                for handler in handlers:
                    check_params(handler, name, routine.name, params)
                allowed = {"enabled"} if name == LOG_DATA_EVENT_NAME else set()
                if name in RUNTIME_EVENTS and set(params) - allowed and not handlers:
                    raise EventError(f"event '{name}' takes {sorted(allowed) or 'no'} parameters for routine "
                                     f"'{routine.name}' (got {sorted(params)})")
                resolved.setdefault(flow_name, []).append(routine.name)
        if not resolved and strict:
            declared = sorted({e for f in self.flows.values() for r in f.routines for e in handlers_of(r)})
            raise EventError(f"no routine handles event '{name}'; events declared with @events are "
                             f"{declared}, built-in ones are {list(RUNTIME_EVENTS)}")
        return resolved

    def _dispatch(self, name: str, targets: Dict[str, List[str]], params: Dict[str, Any],
                  processes: bool = False) -> EventResult:
        """Send an event to ``targets`` ({flow: [routine]}; every replica of each flow, or with
        ``processes`` {flow process: [routine]}); each replica acknowledges on its own."""
        if not processes:
            targets = {instance: routines for flow, routines in targets.items()
                       for instance in self._instance_names[flow]}
        event_id = next(self._event_ids)
        result = EventResult(name, [replica_name(r, instance, self._instances[instance].name)
                                    for instance, routines in targets.items() for r in routines], self._observe_ack)
        self._results[event_id] = result
        self._note_event(name, targets)
        for flow, routines in targets.items():
            if not self._send_to_flow(flow, ("event", event_id, name, routines, params)):
                for routine in routines:
                    result._ack(replica_name(routine, flow, self._instances[flow].name),
                                f"flow '{flow}' is not running")
        if len(self._results) > 1000:
            with self._lock:
                for old in [k for k, r in list(self._results.items()) if r.done][:-100]:
                    self._results.pop(old, None)
        return result

    def _note_event(self, name: str, targets: Dict[str, List[str]]) -> None:
        """Remember what an event means for supervision: kill ends the pipe, start/stop are replayed
        to a restarted flow."""
        if name == KILL_EVENT_NAME:
            self._killing = True
        if name in (START_EVENT_NAME, STOP_EVENT_NAME):
            for routines in targets.values():
                self._wanted.update(dict.fromkeys(routines, name))

    def notify_event(self, event_name: str, specific_flow_routines: Optional[Dict[str, Any]] = None,
                     **params: Any) -> EventResult:
        """Send an event to all routines, the routines of chosen flows (``{flow: []}``) or chosen
        routines (``{flow: [routine]}``), with keyword ``params`` for the handlers.

        Returns at once; ``.wait(timeout)`` on the result waits for the acknowledgements.
        """
        return self.send_event(event_name, specific_flow_routines, params, strict=False)

    def send_event(self, event_name: str, targets: Optional[Dict[str, Any]] = None,
                   params: Optional[Dict[str, Any]] = None, strict: bool = True) -> EventResult:
        """``notify_event`` for control surfaces: an event no chosen routine handles raises EventError."""
        if not self._built:
            raise EventError(f"event '{event_name}' sent before build(): call pipe.build() first")
        params = dict(params or {})
        resolved = self._resolve(event_name, targets, params, strict)
        if not resolved:
            self.logger.warning("event '%s' goes nowhere: no chosen routine handles it", event_name)
        return self._dispatch(event_name, resolved, params)

    # ----- recording -----

    def record(self, path: str, wires: Optional[List[str]] = None, **options: Any) -> Recording:
        """Record the outputs of the routines ``wires`` (all routines with an output when None) into
        the MCAP file ``path``, one topic per routine, until ``stop_recording()``, kill or exit.

        Recording never slows the pipe: what it cannot keep up with is dropped and counted, in the
        file and in ``status()["recording"]``. ``options`` are those of ``pipert.recorder.Recording``
        (``compression``, ``chunk_size``, ``flush_interval``, ``queue``, ``buffer``, ``images``,
        ``jpeg_quality``, ``overwrite``). Raises RecordError for a bad path, wire or option.
        """
        if not self._built or self._closed:
            raise RecordError("record() needs a running pipe: call pipe.build() first")
        with self._record_lock:
            if self._recording is not None and self._recording.state in ("starting", "recording", "stopping"):
                raise RecordError(f"the pipe already records to {self._recording.path}: stop_recording() first")
            self._recording = Recording(self, path, wires, **options)
            return self._recording

    def stop_recording(self) -> Dict[str, Any]:
        """End the recording: the flows send what they hold, the file is finished. Its final status."""
        recording = self._recording
        if recording is None:
            raise RecordError("the pipe is not recording: start with pipe.record(path)")
        return recording.stop()

    # ----- parameters at runtime -----

    def _routine(self, name: str) -> Routine:
        for flow in self._flow_list:
            for routine in flow.routines:
                if isinstance(routine, Routine) and routine.name == name:
                    return routine
        names = sorted(r.name for f in self._flow_list for r in f.routines if isinstance(r, Routine))
        raise EventError(f"there is no routine '{name}'; routines are {names}")

    def set_params(self, routine: str, /, **values: Any) -> Dict[str, Any]:
        """Change parameters of ``routine`` and return the values now in force.

        The values are converted and checked first (ParamError names what is wrong, and nothing
        changes); then the routine applies them in its own thread between two ``main_logic``
        calls, and calls its ``params_changed``. Waits up to ``PARAMS_TIMEOUT`` seconds for that
        acknowledgement; a routine that refuses them (its ``params_changed`` raised) keeps its
        old values and this raises ParamError. Before ``build()`` the values are simply set.
        """
        result = self.apply_params(routine, values, PARAMS_TIMEOUT)
        if result["errors"]:
            raise ParamError(f"routine '{routine}' did not take parameters {values}: "
                             f"{'; '.join(result['errors'].values())}")
        if result["pending"]:
            raise EventError(f"routine '{routine}' did not apply parameters {values} within {PARAMS_TIMEOUT:.0f} s "
                             "(is its main_logic stuck?); they apply once it finishes the current call")
        return result["params"]

    def apply_params(self, routine: str, values: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
        """``set_params`` for control surfaces: the acknowledgement (``handled_by``, ``errors``,
        ``pending``) with ``params``, the values in force after it, instead of exceptions for a refusal
        by the routine or a timeout. Invalid values raise ParamError."""
        target = self._routine(routine)
        declared = declared_params(type(target))
        if not values:
            raise ParamError(f"set_params for routine '{routine}' names no parameter: give name=value pairs; its "
                             f"parameters are {sorted(declared) or 'none'}")
        changed, problems = convert_params(routine, type(target), values)
        raise_problems(problems)
        if not self._built:
            target._given.update(changed)
            target._params.update(changed)
            return {"event": PARAMS_EVENT_NAME, "handled_by": [routine], "errors": {}, "pending": [],
                    "params": plain(target.params)}
        if self._killing or self._closed:
            raise EventError(f"the pipe is being killed or has ended: the parameters of routine '{routine}' can "
                             "no longer change")
        ack = self._dispatch(PARAMS_EVENT_NAME, {self._flow_of[routine]: [routine]}, changed).wait(timeout)
        if not ack["errors"] and not ack["pending"]:
            target._params.update(changed)
            self._params_set.add(routine)
        ack["params"] = self.status()["routines"][routine]["params"]
        return ack

    # ----- ending -----

    def processes_of(self, flow: str) -> List[str]:
        """The names of a built flow's processes: its own name, or ``flow/0`` .. with replicas."""
        return list(self._instance_names.get(flow, [flow]))

    def flow_of_process(self, process: str) -> str:
        """The flow a process named by ``processes_of`` runs."""
        return self._instances[process].name

    def flow_of(self, routine: str) -> Optional[str]:
        """The name of the flow that runs ``routine`` once built, or None if there is no such routine."""
        return self._flow_of.get(routine)

    @property
    def built(self) -> bool:
        """Whether ``build()`` has run (the pipe may have ended since)."""
        return self._built

    def kill(self) -> None:
        """Send ``kill`` to every running flow and return; ``join`` waits for them to exit.

        A flow that has not exited ``kill_grace`` seconds later (a routine stuck in
        ``main_logic``) is terminated.
        """
        self._killing = True
        alive = {self._instances[name].name: [] for name, state in self._states.items() if state.alive}
        if alive:
            self._dispatch(KILL_EVENT_NAME, self._resolve(KILL_EVENT_NAME, alive, {}), {})
            self._arm_stragglers()

    def _arm_stragglers(self) -> None:
        timer = threading.Timer(self._kill_grace, self._terminate_stragglers)
        timer.daemon = True
        timer.start()

    def terminate(self) -> None:
        """Kill every flow process at once (SIGKILL), without waiting for cleanups: what a second stop
        signal does. ``join`` returns once their exits are reported; shared memory is freed as usual.
        Safe to call from a signal handler (it only sends signals)."""
        self._killing = True
        for name, state in list(self._states.items()):
            if state.alive and state.pid and self._is_here(name):
                try:
                    os.kill(state.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._cluster is not None:  # other nodes' flows: their agents kill them
            threading.Thread(target=self._cluster.terminate, name="pipert-terminate", daemon=True).start()

    def _terminate_stragglers(self) -> None:
        for name, state in self._states.items():
            if state.alive and state.pid and self._is_here(name):
                self.logger.warning("flow '%s' did not finish within %.1f s of kill (a routine stuck in "
                                    "main_logic?): terminating it", name, self._kill_grace)
        self.terminate()

    def join(self, to_kill: bool = False) -> None:
        """Wait until every flow has exited (after ``kill``); ``to_kill=True`` kills first.

        Ctrl-C or SIGTERM while waiting kills the pipe before the exception goes on.
        """
        if not self._built:
            raise BuildError("join() needs a built pipe: call pipe.build() first")
        try:
            if to_kill:
                self.kill()
            while not self._all_exited.wait(0.2):
                pass
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        """Kill what still runs, wait for it, free every shared-memory object. Idempotent."""
        with self._lock:
            closing_elsewhere = self._closed
            self._closed = True
        if closing_elsewhere:
            self._shut_down.wait()
            return
        main = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.getsignal(signum) for signum in heeded()} if main else {}
        for signum in previous:  # a stop signal now hurries the shutdown instead of cutting it short
            signal.signal(signum, lambda signum, frame: self.terminate())
        try:
            self._stop_everything()
        finally:
            if main:
                previous.update(self._replaced_handlers)
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
            self._shut_down.set()

    def _stop_everything(self) -> None:
        """The body of ``_shutdown``, run once."""
        if any(s.alive for s in self._states.values()):
            self.kill()
            if not self._all_exited.wait(self._kill_grace + 0.5):
                self._terminate_stragglers()
                self._all_exited.wait(5.0)
        if self._recording is not None:
            self._recording.stop()
        if self._cluster is not None:
            self._cluster.stop()
        if self._hub is not None:
            self._hub.close()
        if self._zygote is not None:
            self._zygote.stop()
        for state in self._states.values():
            if state.reader is not None:
                state.reader.join(2.0)
        shm.unlink_owned(self.id)
        self._close_shared_memory()
        atexit.unregister(self._shutdown)

    def _close_shared_memory(self) -> None:
        """Close the daemon's own mappings and semaphores (they hold file descriptors)."""
        pools = {id(w.target.pool): w.target.pool for w in self._remote if w.target.pool is not None}
        for wire in self._remote:
            wire.target.ring.close()
        for pool in pools.values():
            pool.close()
        for plans in self._plans.values():
            for plan in plans.values():
                plan.inbox.bell.close()
        for bell in self._bridge_bells:
            bell.close()

    # ----- introspection -----

    def _routine_logger_name(self, flow: str, routine: str) -> str:
        return f"{self.logger.name}.{flow}.{routine}"

    def structure(self) -> Dict[str, Any]:
        """The routines, the events they handle with their handlers' parameters and the parameters
        they declare (the cockpit's ``pipe_creation`` message), the wires, one per destination,
        with policy and depth, and each flow's replicas, resources and (on a cluster) nodes."""
        return {
            "Routines": [{"flow_name": flow.name, "routine_name": r.name,
                          "events": sorted(e for e in handlers_of(r) if e not in BUILTIN_EVENTS),
                          "event_params": {e: p for e, p in describe_handlers(r).items() if e not in BUILTIN_EVENTS},
                          "params": {n: p.describe() for n, p in declared_params(type(r)).items()}}
                         for flow in self._flow_list for r in flow.routines],
            "Flows": {flow.name: {"replicas": flow.replicas, "resources": flow.resources,
                                  "nodes": {i: self._states[i].node for i in self._instance_names.get(flow.name, [])
                                            if i in self._states and self._states[i].node}}
                      for flow in self._flow_list},
            "Events": list(BUILTIN_EVENTS),
            "Wires": [{"source": w.source.name, "destination": d.name, "policy": w.policy or self._wire_policy,
                       "depth": w.depth or self._wire_depth} for w in self.wires for d in w.destinations],
        }

    def _routine_status(self, flow: Flow, routine: Routine) -> Dict[str, Any]:
        """One routine's state, counters and parameters; over replicas the counters are summed, the
        latency is the slowest replica's, the state is ``running`` while any replica runs, and
        ``replicas`` holds each one's state."""
        reports = self._replica_reports(flow, routine)
        states = [r.get("state", IDLE) for r in reports]
        capacities = [r["capacity"] for r in reports if r.get("capacity")]
        paced = [r["paced_fps"] for r in reports if r.get("paced_fps")]
        status = {
            "flow": flow.name, "state": RUNNING if RUNNING in states else states[0],
            "messages_in": sum(r["messages_in"] for r in reports),
            "messages_out": sum(r["messages_out"] for r in reports),
            "errors": sum(r["errors"] for r in reports),
            "fps": round(sum(r.get("fps", 0.0) for r in reports), 2),
            "capacity": round(sum(capacities), 2) if capacities else None,
            "paced_fps": paced[0] if paced else None,
            "log_data": any(r.get("log_data", False) for r in reports),
            "error": next((r["error"] for r in reports if r.get("error")), None),
            "condition": next((r["condition"] for r in reports if r.get("condition")), None),
            "latency": max((r["latency"] for r in reports if r.get("latency")), key=lambda q: q["p99"], default=None),
            "params": reports[0].get("params", plain(routine.params))}
        if flow.replicas > 1:
            status["replicas"] = dict(zip(self._instance_names.get(flow.name, []), states))
        return status

    def status(self) -> Dict[str, Any]:
        """Routine states, counters and parameter values, flow processes, and wire depths and drops, as
        plain JSON."""
        routines = {r.name: self._routine_status(flow, r) for flow in self._flow_list for r in flow.routines}
        flows = {name: {"pid": s.pid, "alive": s.alive, "restarts": s.restarts, "restarting": s.restarting,
                        "exit_code": s.exit_code, "last_exit": s.last_exit}
                 for name, s in self._states.items()}
        for name, s in self._states.items():
            if s.node is not None:
                flows[name]["node"] = s.node
        wires = []
        for wire in self._remote:
            depth, dropped = wire.target.ring.stats()
            wires.append({"source": self._qualified(wire.source, wire.source_flow),
                          "destination": self._qualified(wire.destination, wire.destination_flow), "depth": depth,
                          "dropped": dropped})
        for source, destination, flow, key in self._local:
            state = self._states.get(flow)
            with self._lock:
                depth, dropped = state.channels.get(key, (0, 0)) if state else (0, 0)
                dropped = state.totals.dropped(key, dropped) if state else dropped
            if self._flow_of[source] == self._instances[flow].name:
                wires.append({"source": self._qualified(source, flow),
                              "destination": self._qualified(destination, flow), "depth": depth, "dropped": dropped})
            else:  # the ordered merge of a wire out of replicas: held back, and skipped
                wires.append({"source": source, "destination": self._qualified(destination, flow), "ordered": True,
                              "depth": depth, "dropped": dropped})
        if self._cluster is not None:
            wires = self._cluster.wires(wires)
        recording = self._recording.status() if self._recording is not None else None
        return {"pipe": self.id, "routines": routines, "flows": flows, "wires": wires, "recording": recording}

    def _qualified(self, routine: str, instance: str) -> str:
        return replica_name(routine, instance, self._instances[instance].name)

    def _replica_reports(self, flow: Flow, routine: Routine) -> List[Dict[str, Any]]:
        """The last report of ``routine`` in each process of ``flow``, with the counts of that
        process's predecessors added."""
        empty = _FlowState()
        with self._lock:
            return [state.totals.routine(routine.name, state.routines.get(routine.name, {}))
                    for instance in self._instance_names.get(flow.name, [flow.name])
                    for state in [self._states.get(instance, empty)]]

    def _reports(self) -> Dict[str, Dict[str, Any]]:
        """Each routine's last report, with the counts of its flow's earlier processes added, and
        over replicas the counts and histograms of all of them."""
        merged = {}
        for flow in self._flow_list:
            for routine in flow.routines:
                reports = self._replica_reports(flow, routine)
                totals = Totals()
                for report in reports[1:]:
                    totals.take({routine.name: dict(report)}, {})
                merged[routine.name] = totals.routine(routine.name, reports[0])
        return merged

    def _observe_ack(self, event: str, routine: str, error: Optional[str], seconds: float) -> None:
        flow = self._flow_of.get(routine) or self._flow_of.get(routine.rsplit("/", 1)[0], "")  # det/1: a replica
        self._event_stats.observe(event, flow, routine, error, seconds)

    def started_routines(self) -> List[str]:
        """The routines whose last ``start``/``stop`` event was ``start``: they should be running."""
        return sorted(name for name, event in self._wanted.items() if event == START_EVENT_NAME)

    def metrics(self) -> Dict[str, Any]:
        """What ``/metrics`` exposes, as plain JSON: ``status()`` with each routine's histograms (latency,
        main_logic durations), the acknowledgements of events, and the log records the cockpit missed."""
        snapshot = self.status()
        for name, reported in self._reports().items():
            snapshot["routines"][name].update({key: reported[key] for key in HISTOGRAMS})
        snapshot["events"] = self._event_stats.snapshot()
        snapshot["cockpit_dropped_records"] = sum(h.dropped for h in self.logger.handlers
                                                  if isinstance(h, CockpitHandler))
        return snapshot
