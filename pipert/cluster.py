"""Running one pipe's flows on several machines, on a Ray cluster.

The driver (the process that builds the pipe) keeps the graph, the events and
the status. Ray places every flow process by its ``resources`` (one small actor
per flow process holds them while it runs); the flows that land on one node are
run by one **node agent** there (one of those actors), which does what a local
pipe does on its host: creates the node's shared memory, forks a zygote and the
flows from it, restarts them by their policy and frees everything at the end.
Flows without resources, and flows Ray places on the driver's own node, run
under the driver itself. Wires between flows on one node are the usual
shared-memory rings; wires between nodes are TCP bridges (``pipert.bridge``).

Each agent keeps one authenticated connection to the driver: events and pacing
go down, acknowledgements, log records, flow states and wire figures come up
(every 0.5 s). A node that goes silent for ``LOST_AFTER`` seconds (its raylet
or machine died) is reported lost; its flows are placed again on another node
with their resources, or reported dead with the reason.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Dict, List, Tuple

from . import shm
from .bridge import Hub, connect
from .errors import BuildError, ClusterError
from .events import KILL_EVENT_NAME, START_EVENT_NAME
from .flow import _forward_logs
from .replicas import replica_name

INSTALL = "pip install pipert-daemon[ray]"
LOST_AFTER = 5.0
"""Seconds without a word from a node agent after which its node counts as lost."""
PLACE_TIMEOUT = 30.0
"""Seconds Ray gets to find a node with a flow's resources free."""
_PUSH_INTERVAL = 0.5
_DRIVER = "driver"
_log = logging.getLogger(__name__)


def import_ray() -> Any:
    """The ``ray`` module, or a ClusterError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"Pipe(cluster=...) runs flows on Ray, which is not installed: {INSTALL}") from None
    return ray


def _options(resources: Dict[str, float]) -> Dict[str, Any]:
    """Ray actor options that reserve a flow's resources (CPU/GPU by their own keywords)."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), "resources": custom,
            "max_restarts": 0}


def _fits(total: Dict[str, float], need: Dict[str, float]) -> bool:
    return all(total.get(k, 0) >= v for k, v in need.items())


def _node_info(ray: Any) -> Dict[str, str]:
    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}


def _ship_by_value(ray: Any, routines: List[Any]) -> None:
    """Routines defined in the user's own modules (not installed packages) travel by value,
    so another node needs no copy of the script."""
    for routine in routines:
        module = sys.modules.get(type(routine).__module__)
        path = getattr(module, "__file__", None) or ""
        if module is None or module.__name__ == "__main__" or module.__name__.split(".")[0] == "pipert":
            continue
        if "site-packages" not in path and "dist-packages" not in path:
            ray.cloudpickle.register_pickle_by_value(module)


class _Agent:
    """A Ray actor on one node. Every flow process gets one, placed by its resources, to hold
    them; the first on each node also runs that node's flows (``prepare``/``start``)."""

    def __init__(self) -> None:
        self.pipe: Any = None
        self._stopping = False

    def where(self) -> Dict[str, str]:
        """The node this actor runs on."""
        import ray
        return _node_info(ray)

    def prepare(self, pipe: Any, host: str, here: List[str], authkey: bytes) -> Tuple[str, int]:
        """Create this node's shared memory, bridges and zygote; return where its hub listens."""
        import ray
        self.pipe = pipe
        pipe._here = set(here)
        pipe._node = _node_info(ray)
        pipe._hub = Hub(ray.util.get_node_ip_address(), authkey)
        pipe._event_ids = itertools.count(-1, -1)  # its own events (restarts, kill) are not the driver's
        pipe._built = pipe._building = True
        shm.sweep_stale()
        pipe._start_host(detach=True)
        return pipe._hub.address

    def start(self, host: str, driver: Tuple[str, int], authkey: bytes,
              addresses: Dict[str, Tuple[str, int]]) -> Dict[str, Dict[str, Any]]:
        """Connect to the driver and the other hosts, fork this node's flows; their states once ready."""
        pipe = self.pipe
        pipe._upstream = Connection(connect(driver, authkey, ("agent", host)).detach())
        _forward_logs(pipe, pipe._upstream_send)
        pipe._hub.start(addresses)
        threading.Thread(target=self._serve, name="pipert-agent", daemon=True).start()
        try:
            pipe._start_flows()
        finally:
            pipe._building = False
        threading.Thread(target=self._push, name="pipert-agent-push", daemon=True).start()
        return self._flows()

    def stop(self) -> None:
        """End this node's part of the pipe: kill what runs, free the shared memory."""
        self._stopping = True
        if self.pipe is not None:
            self.pipe._shutdown()

    def _flows(self) -> Dict[str, Dict[str, Any]]:
        return {name: {"pid": s.pid, "alive": s.alive, "restarts": s.restarts, "restarting": s.restarting,
                       "exit_code": s.exit_code, "last_exit": s.last_exit, "routines": dict(s.routines),
                       "channels": dict(s.channels)}
                for name, s in list(self.pipe._states.items())}

    def _push(self) -> None:
        """Report flow states and wire figures to the driver; the heartbeat it watches."""
        pipe = self.pipe
        while not pipe._closed:
            pipe._upstream_send(("flows", self._flows()))
            pipe._upstream_send(("wires", pipe.status()["wires"]))
            time.sleep(_PUSH_INTERVAL)

    def _serve(self) -> None:
        """Carry the driver's messages to this node's flows; end the node's part when the driver is gone."""
        pipe = self.pipe
        armed = False
        while True:
            try:
                message = pipe._upstream.recv()
            except (EOFError, OSError):
                break
            if message[0] == "hosts":
                pipe._hub.start(message[1])
                continue
            if message[0] == "terminate":
                pipe.terminate()
                continue
            _, instance, inner = message
            if inner[0] == "event":
                pipe._note_event(inner[2], {instance: inner[3]})
                if inner[2] == KILL_EVENT_NAME and not armed:
                    armed = True
                    pipe._arm_stragglers()
            if not pipe._send_to_flow(instance, inner) and inner[0] == "event":
                flow = pipe._instances[instance].name
                for routine in inner[3]:
                    pipe._ack(inner[1], replica_name(routine, instance, flow), f"flow '{instance}' is not running")
        if not self._stopping:
            _log.warning("the pipe's driver is gone: ending this node's flows")
            pipe._shutdown()


class Cluster:
    """The driver's side of a pipe on a Ray cluster: placement, node agents and their reports."""

    def __init__(self, pipe: Any, address: str) -> None:
        if not isinstance(address, str) or not address:
            raise ClusterError(f"cluster={address!r}: use 'ray', 'ray://HOST:PORT' or a Ray address HOST:PORT")
        self.ray = import_ray()
        self._pipe = pipe
        self._address = address
        self._authkey = os.urandom(32)
        self._started_ray = False
        self._lock = threading.Lock()
        self._holders: Dict[str, Any] = {}  # flow process -> the actor that holds its resources
        self._agents: Dict[str, Any] = {}  # host -> its node agent
        self._hosts: Dict[str, List[str]] = {}  # host -> its flow processes
        self._nodes: Dict[str, Dict[str, str]] = {}  # host -> node id and host name
        self._conns: Dict[str, Connection] = {}
        self._connected: Dict[str, threading.Event] = {}
        self._heard: Dict[str, float] = {}
        self._wires: Dict[str, List[Dict[str, Any]]] = {}
        self._addresses: Dict[str, Tuple[str, int]] = {}  # host -> where its hub listens
        self._hosts_made = 0
        self._stopped = False

    # ----- build -----

    def _connect(self) -> None:
        """ray.init, keeping the process's own SIGTERM handler (Ray's would exit without our shutdown)."""
        ray = self.ray
        if ray.is_initialized():
            return
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        try:
            self._init()
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        self._started_ray = True

    def _init(self) -> None:
        ray = self.ray
        if self._address == "ray":
            try:
                ray.init(address="auto", logging_level=logging.WARNING)
            except ConnectionError:
                ray.init(logging_level=logging.WARNING)
        else:
            try:
                ray.init(address=self._address, logging_level=logging.WARNING)
            except Exception as exc:
                raise ClusterError(f"cannot reach the Ray cluster at {self._address!r} ({exc}): start it with "
                                   "`ray start --head` and pass its address") from None

    def _check_feasible(self) -> None:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        for flow in self._pipe._flow_list:
            if flow.resources and not any(_fits(n.get("Resources", {}), flow.resources) for n in nodes):
                have = [{k: v for k, v in n.get("Resources", {}).items() if not k.startswith(("node:", "memory",
                                                                                           "object_store"))}
                        for n in nodes]
                raise BuildError(f"flow '{flow.name}' needs resources {flow.resources}, which no node of the "
                                 f"cluster has (nodes have {have}): start a node with them, e.g. "
                                 f"`ray start --address HEAD:6379 --resources '{{\"{next(iter(flow.resources))}\": "
                                 "1}'`")

    def _place(self, instances: List[str]) -> Dict[str, Dict[str, str]]:
        """Reserve each flow process's resources with an actor Ray places; the node each landed on.

        An actor that dies before it runs (Ray placed it on a node that was just lost, before it
        noticed) is placed again, until ``PLACE_TIMEOUT``. (No ``ray.nodes()`` here: it runs in a
        background thread, and Ray's global state client is not safe to use from two threads.)"""
        ray = self.ray
        agent_class = ray.remote(_Agent)
        deadline = time.monotonic() + PLACE_TIMEOUT
        placed: Dict[str, Dict[str, str]] = {}
        while len(placed) < len(instances):
            todo = [i for i in instances if i not in placed]
            for instance in todo:
                self._holders[instance] = agent_class.options(
                    **_options(self._pipe._instances[instance].resources)).remote()
            refs = {self._holders[i].where.remote(): i for i in todo}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
                if not ready:
                    waiting = sorted(refs[r] for r in pending)
                    raise BuildError(f"flow processes {waiting} could not be placed within {PLACE_TIMEOUT:.0f} s: "
                                     "the nodes with their resources are busy (too many replicas, or other work "
                                     "holds them); add nodes or lower replicas")
                try:
                    placed[refs[ready[0]]] = ray.get(ready[0])
                except ray.exceptions.RayActorError:
                    pass
        return placed

    def _new_host(self, node: Dict[str, str], instances: List[str]) -> str:
        self._hosts_made += 1
        host = f"node{self._hosts_made}"
        self._hosts[host] = instances
        self._nodes[host] = node
        self._agents[host] = self._holders[instances[0]]
        self._connected[host] = threading.Event()
        for instance in instances:
            self._pipe._host_of[instance] = host
        return host

    def place(self) -> None:
        """Connect to Ray, check every flow can run somewhere, and choose where each flow process runs."""
        from .pipe import _FlowState
        pipe, ray = self._pipe, self.ray
        self._connect()
        self._check_feasible()
        try:
            driver_node = ray.get_runtime_context().get_node_id()
        except Exception:  # a Ray Client driver is on no node of its own
            driver_node = None
        pipe._node = {"node_id": driver_node, "host": socket.gethostname()}
        placed = self._place([i for i, f in pipe._instances.items() if f.resources])
        by_node: Dict[str, List[str]] = {}
        for instance, node in placed.items():
            by_node.setdefault(node["node_id"], []).append(instance)
        pipe._here = {i for i, f in pipe._instances.items() if not f.resources} | set(by_node.pop(driver_node, []))
        pipe._host_of.update(dict.fromkeys(pipe._here, _DRIVER))
        for instances in by_node.values():
            self._new_host(placed[instances[0]], instances)
        pipe._hub = Hub(ray.util.get_node_ip_address(), self._authkey, self._agent_connected)
        self._addresses[_DRIVER] = pipe._hub.address
        for host, instances in self._hosts.items():
            for instance in instances:
                pipe._states[instance] = _FlowState()
                pipe._states[instance].node = self._nodes[host]

    def _start_agents(self, hosts: List[str]) -> None:
        """Have the agents of ``hosts`` build their part of the pipe and start their flows."""
        pipe, ray = self._pipe, self.ray
        _ship_by_value(ray, [r for f in pipe._flow_list for r in f.routines])
        try:
            listening = ray.get([self._agents[h].prepare.remote(pipe, h, self._hosts[h], self._authkey)
                                 for h in hosts])
            self._addresses.update(zip(hosts, listening))
            addresses = {i: self._addresses[h] for i, h in pipe._host_of.items() if h in self._addresses}
            for host in list(self._conns):
                self._send(host, ("hosts", addresses))
            pipe._hub.start(addresses)
            flows = ray.get([self._agents[h].start.remote(h, pipe._hub.address, self._authkey, addresses)
                             for h in hosts])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None)
            raise BuildError(f"a node agent failed to start its flows: {cause or exc}") from None
        for host, states in zip(hosts, flows):
            self._connected[host].wait(10.0)
            self._update(host, states)

    def start(self) -> None:
        """Start every node agent's flows (after the driver's own host part exists)."""
        self._start_agents(list(self._hosts))
        threading.Thread(target=self._watch, name="pipert-cluster-watch", daemon=True).start()

    # ----- running -----

    def _agent_connected(self, host: str, conn: Connection) -> None:
        with self._lock:
            old = self._conns.get(host)
            self._conns[host] = conn
            self._heard[host] = time.monotonic()
        if old is not None:
            old.close()
        threading.Thread(target=self._read_agent, args=(host, conn), name=f"pipert-agent-{host}",
                         daemon=True).start()
        self._connected[host].set()

    def _send(self, host: str, message: tuple) -> bool:
        with self._lock:
            conn = self._conns.get(host)
            if conn is None:
                return False
            try:
                conn.send(message)
            except (OSError, ValueError):
                return False
        return True

    def send(self, instance: str, message: tuple) -> bool:
        """Pass an event or pacing message to a flow process on another node."""
        if not self._pipe._states[instance].alive:
            return False
        return self._send(self._pipe._host_of[instance], ("send", instance, message))

    def terminate(self) -> None:
        """Have every node agent kill its flows at once (``Pipe.terminate``)."""
        for host in list(self._conns):
            self._send(host, ("terminate",))

    def _read_agent(self, host: str, conn: Connection) -> None:
        pipe = self._pipe
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._heard[host] = time.monotonic()
            kind = message[0]
            if kind == "ack":
                pipe._ack(message[1], message[2], message[3])
            elif kind == "log":
                record = logging.makeLogRecord(message[1])
                logging.getLogger(record.name).handle(record)
            elif kind == "notify":
                pipe._notify(host, message[1], message[2], message[3])
            elif kind == "flows":
                self._update(host, message[1])
            elif kind == "wires":
                self._wires[host] = message[1]
        if self._conns.get(host) is conn:
            self._lost(host)

    def _update(self, host: str, flows: Dict[str, Dict[str, Any]]) -> None:
        """Take the flow states an agent reported; events its dead flows will never acknowledge fail."""
        pipe = self._pipe
        for instance, fields in flows.items():
            if pipe._host_of.get(instance) != host:
                continue
            state = pipe._states[instance]
            was_alive = state.alive
            for key, value in fields.items():
                setattr(state, key, value)
            if was_alive and not state.alive:
                pipe._ended(instance, (state.last_exit or {}).get("how", "ended"))
        pipe._check_all_exited()

    def _watch(self) -> None:
        """Count a node agent that went silent as lost (its raylet or machine died)."""
        while not self._stopped and not self._pipe._closed:
            now = time.monotonic()
            for host, heard in list(self._heard.items()):
                conn = self._conns.get(host)
                if conn is not None and now - heard > LOST_AFTER:
                    _log.debug("node agent %s silent for %.1f s", host, now - heard)
                    with self._lock:
                        self._conns.pop(host, None)
                    conn.close()
                    self._lost(host)
            time.sleep(0.5)

    def _lost(self, host: str) -> None:
        """A node is gone: report its flows, then place them again elsewhere if their resources allow."""
        pipe = self._pipe
        with self._lock:
            self._conns.pop(host, None)
        if self._stopped or pipe._closed or pipe._killing:
            return
        instances = self._hosts.get(host, [])
        node = self._nodes.get(host, {})
        pipe.logger.error("node %s (%s) is lost: its flows %s stopped", node.get("host"), node.get("node_id"),
                          instances)
        for instance in instances:
            state = pipe._states[instance]
            was_alive, state.alive, state.restarting = state.alive, False, True
            state.last_exit = {"pid": state.pid, "how": f"node {node.get('node_id')} lost", "time": time.time()}
            for routine in pipe._instances[instance].routines:
                state.routines.setdefault(routine.name, {})["state"] = "dead"
            if was_alive:
                pipe._ended(instance, "node lost")
        self._addresses.pop(host, None)
        gone = dict.fromkeys(instances)
        for other in list(self._conns):
            self._send(other, ("hosts", gone))
        pipe._hub.start(gone)
        threading.Thread(target=self._replace, args=(host,), name="pipert-replace", daemon=True).start()

    def _replace(self, lost: str) -> None:
        """Run a lost node's flow processes on another node with their resources, or mark them dead."""
        pipe, ray = self._pipe, self.ray
        instances = self._hosts.pop(lost, [])
        for instance in instances:
            try:
                ray.kill(self._holders.pop(instance))
            except Exception:
                pass
        try:
            placed = self._place(instances)
        except BuildError as exc:
            for instance in instances:
                state = pipe._states[instance]
                state.restarting = False
                state.last_exit = dict(state.last_exit or {}, how=f"node lost; not restarted: {exc}")
            pipe.logger.error("flows %s of a lost node cannot run elsewhere: %s", instances, exc)
            pipe._check_all_exited()
            return
        by_node: Dict[str, List[str]] = {}
        for instance, node in placed.items():
            by_node.setdefault(node["node_id"], []).append(instance)
        hosts = [self._new_host(placed[group[0]], group) for group in by_node.values()]
        for host in hosts:
            for instance in self._hosts[host]:
                pipe._states[instance].node = self._nodes[host]
        try:
            self._start_agents(hosts)
        except BuildError as exc:
            pipe.logger.error("flows %s could not be restarted on another node: %s", instances, exc)
            return
        for host in hosts:
            for instance in self._hosts[host]:
                state = pipe._states[instance]
                state.restarting = False
                state.restarts += 1
                wanted = [r.name for r in pipe._instances[instance].routines
                          if pipe._wanted.get(r.name) == START_EVENT_NAME]
                if wanted:
                    pipe._dispatch(START_EVENT_NAME, {instance: wanted}, {}, processes=True)
            pipe.logger.warning("flows %s restarted on node %s (%s)", self._hosts[host],
                                self._nodes[host]["host"], self._nodes[host]["node_id"])

    def wires(self, local: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Every wire's figures: a wire between nodes has a ring on each side, counted together."""
        merged: Dict[Tuple[str, str, bool], Dict[str, Any]] = {}
        for wire in local + [w for host in list(self._wires) for w in self._wires.get(host, [])]:
            key = (wire["source"], wire["destination"], wire.get("ordered", False))
            if key in merged:
                merged[key]["depth"] += wire["depth"]
                merged[key]["dropped"] += wire["dropped"]
            else:
                merged[key] = dict(wire)
        return list(merged.values())

    def stop(self) -> None:
        """End every node's part of the pipe, release the actors, and Ray if the pipe started it."""
        if self._stopped:
            return
        self._stopped = True
        ray = self.ray
        refs = [agent.stop.remote() for host, agent in self._agents.items() if host in self._hosts]
        try:
            ray.get(refs, timeout=self._pipe._kill_grace + 10)
        except Exception as exc:
            _log.warning("a node agent did not stop cleanly: %s", exc)
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
        for holder in self._holders.values():
            try:
                ray.kill(holder)
            except Exception:
                pass
        if self._started_ray:
            ray.shutdown()
