"""Flows: one OS process each, running its routines as threads.

``Flow`` is the user's grouping. ``run_flow`` is the body of a flow process: it
starts one ``_Runner`` thread per routine, routes events from the daemon to
them, forwards their log records and reports their counters.
"""
from __future__ import annotations

import collections
import copy
import ctypes
import logging
import os
import queue
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import TransportError
from .events import (KILL_EVENT_NAME, LOG_DATA_EVENT_NAME, PARAMS_EVENT_NAME, START_EVENT_NAME, STOP_EVENT_NAME,
                     handlers_of)
from .frames import FrameSampler, encode_frame, find_frame, frame_log_message
from .params import plain
from .recorder import FlowTap, switch_tap
from .routine import Routine, SourceRoutine
from .signals import received, signal_pipe
from .timing import Histogram, wall_offset
from .transport import EMPTY, Closed, Inbox, WireSender

IDLE, RUNNING, STOPPED, CRASHED, KILLED = "idle", "running", "stopped", "crashed", "killed"
STATUS_INTERVAL = 0.5  # seconds between two counter reports of a flow
TAP_DRAIN = 2.0  # seconds a flow that ends gives its recording tap to send what it holds
_PR_SET_PDEATHSIG = 1

_log = logging.getLogger(__name__)


RESTART_POLICIES = ("never", "on-failure", "always")


def channel_key(wire: int, destination: str) -> str:
    """How a flow names one of its local channels when it reports their depth and drops."""
    return f"{wire}:{destination}"


class Flow:
    """A named group of routines that runs in its own OS process.

    ``restart`` says what the daemon does when the process ends other than by
    ``kill``: ``never``, ``on-failure`` (a non-zero exit or a signal) or
    ``always``; at most ``max_restarts`` times within ``restart_window``
    seconds, waiting ``restart_backoff`` seconds, doubled at each restart in
    the window (10 s at most). ``replicas`` runs that many copies of the flow,
    each its own process; ``resources`` are the Ray resources a node needs to
    run it on a cluster (e.g. ``{"camera": 1}``).
    """

    def __init__(self, name: str, routines: Sequence[Routine], restart: str = "on-failure",
                 max_restarts: int = 5, restart_window: float = 60.0, restart_backoff: float = 0.5,
                 replicas: int = 1, resources: Optional[Dict[str, float]] = None) -> None:
        if restart not in RESTART_POLICIES:
            raise ValueError(f"flow '{name}': restart policy {restart!r} is unknown: use one of {RESTART_POLICIES}")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ValueError(f"flow '{name}': replicas={replicas!r} must be a whole number >= 1")
        if resources is not None and (not isinstance(resources, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in resources.items())):
            raise ValueError(f"flow '{name}': resources={resources!r} must be a dict of resource name to a "
                             "number >= 0, e.g. {'camera': 1}")
        self.replicas = replicas
        self.resources = dict(resources or {})
        self.name = name
        self.routines = list(routines)
        self.restart = restart
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.restart_backoff = restart_backoff


@dataclass
class Event:
    """One event on its way to a routine."""

    id: int
    name: str
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RoutinePlan:
    """What a routine is connected to, computed by ``Pipe.build`` before flows fork."""

    inbox: Inbox
    senders: List[WireSender]
    local_channels: Dict[int, Any]  # wire index -> local channel or ordered merge into this routine


class _Runner:
    """Runs one routine in its own thread: events first, then ``main_logic`` on the next input."""

    def __init__(self, routine: Routine, plan: RoutinePlan, flow: "_FlowProcess") -> None:
        self.routine = routine
        self.plan = plan
        self.flow = flow
        self.handlers = handlers_of(routine)
        self.events: collections.deque = collections.deque()
        self.state = IDLE
        self.error: Optional[str] = None
        self.errors = 0  # exceptions in the routine's code, and sends that failed
        self.killing = False
        self.setup_done = False
        self.messages_in = 0
        self.messages_out = 0
        self.calls = 0
        self.stamp = 0.0  # source time (time.time()) of the message being processed, or of the source's output
        self.meta: Any = None  # its order stamp (into and out of replicas), carried on to its outputs
        self.wall_offset = wall_offset()  # time.time() - time.perf_counter(), refreshed at every report
        self.durations = Histogram()  # seconds per main_logic call
        self.latency = Histogram()  # age of each message received: now - its source time
        self.started_at = self.ended_at = 0.0  # time.perf_counter() around the last main_logic call
        self.auto_interval = 0.0  # seconds between main_logic calls set by auto pacing
        self.log_data = False
        self.samplers = {d: FrameSampler(flow.pipe._frames_per_second) for d in ("input", "output")}
        self.tap: Optional[FlowTap] = None  # set while this routine's output is recorded
        self.thread = threading.Thread(target=self._guarded_run, name=routine.name, daemon=True)

    def deliver(self, event: Event) -> None:
        """Queue ``event`` for this routine's thread (called from the flow's main thread)."""
        if event.name == KILL_EVENT_NAME:
            self.killing = True
        self.events.append(event)
        self.plan.inbox.bell.release()

    def _should_stop(self) -> bool:
        return self.killing

    def _guarded_run(self) -> None:
        """The routine's thread: a failure of pipert itself crashes this routine, visibly, not silently."""
        try:
            self._run()
        except Exception as exc:
            self.routine.logger.exception("routine '%s' stopped on an internal error", self.routine.name)
            self.state = CRASHED
            self.error = f"internal: {exc!r}"
            self.errors += 1
            self.flow.failed = True

    def _run(self) -> None:
        events = self.events
        inbox = self.plan.inbox
        routine = self.routine
        source = isinstance(routine, SourceRoutine)
        writable = routine.writable_input
        add_age = self.latency.samples.append
        while True:
            if events:
                if not self._handle(events.popleft()):
                    return
                continue
            if self.state != RUNNING:
                inbox.bell.acquire()
                continue
            if source:
                data = self._call(routine.main_logic)
                self.stamp = self.ended_at + self.wall_offset
            else:
                try:
                    message = inbox.next()
                except Exception:
                    routine.logger.exception("routine '%s' could not read a message; skipping it", routine.name)
                    continue
                if message is EMPTY:
                    continue
                self.stamp, message = message
                self.meta = inbox.meta
                self.messages_in += 1
                if self.log_data:
                    self._show("input", message)
                data = self._call(routine.main_logic, copy.deepcopy(message) if writable else message)
                add_age(self.started_at + self.wall_offset - self.stamp)
            if data is not None:
                if self.log_data:
                    self._show("output", data)
                if self.plan.senders:
                    self._send(data)
            message = data = None  # so the transport sees the arrays are gone before it waits again

    def _pace(self) -> None:
        """Wait until the routine's rate cap (const FPS or auto pacing) lets the next call start."""
        fps = self.routine._const_fps
        interval = max(1.0 / fps if fps else 0.0, self.auto_interval)
        remaining = self.started_at + interval - time.perf_counter()
        while remaining > 0 and not self.events:
            time.sleep(min(remaining, 0.05))
            remaining = self.started_at + interval - time.perf_counter()

    def _show(self, direction: str, data: Any) -> None:
        """Hand a sampled frame of ``data`` to the flow's frame logger."""
        if self.samplers[direction].due():
            try:
                frame = find_frame(data)
            except Exception:
                frame = None
            if frame is not None:
                self.flow.frames.offer(self.routine.logger, direction, frame)

    def _call(self, main_logic: Callable, *args: Any) -> Any:
        """Run ``main_logic`` once its rate cap allows; log its exception and give None instead."""
        if self.routine._const_fps or self.auto_interval:
            self._pace()
        self.calls += 1
        self.started_at = started = time.perf_counter()
        try:
            return main_logic(*args)
        except Exception as exc:
            self.routine.logger.exception("main_logic of routine '%s' failed; going on with the next input",
                                          self.routine.name)
            self.error = f"main_logic: {exc!r}"
            self.errors += 1
            return None
        finally:
            self.ended_at = time.perf_counter()
            self.durations.samples.append(self.ended_at - started)

    def _send(self, data: Any) -> None:
        try:
            for sender in self.plan.senders:
                sender.send(data, self.stamp, self._should_stop, self.meta)
        except Closed:
            return
        except TransportError as exc:
            self.routine.logger.error("%s", exc)
            self.error = str(exc)
            self.errors += 1
            return
        self.messages_out += 1
        tap = self.tap
        if tap is not None:
            tap.offer(self.routine.name, data, self.stamp)

    def _handle(self, event: Event) -> bool:
        """Run one event; False once the routine is killed."""
        error = None
        if event.name == START_EVENT_NAME and not self.setup_done:
            try:
                self.routine.setup()
                self.setup_done = True
            except Exception as exc:
                self.routine.logger.exception("setup of routine '%s' failed; it stays stopped until the "
                                              "next start", self.routine.name)
                self.state = CRASHED
                self.error = error = f"setup: {exc!r}"
                self.errors += 1
        if event.name == START_EVENT_NAME and self.setup_done:
            self.state = RUNNING
        elif event.name == STOP_EVENT_NAME and self.state == RUNNING:
            self.state = STOPPED
        elif event.name == LOG_DATA_EVENT_NAME:
            self.log_data = bool(event.params.get("enabled", not self.log_data))
            self.routine.logger.info("sending %s frames to the cockpit: %s", self.routine.name,
                                     "on" if self.log_data else "off")
        elif event.name == PARAMS_EVENT_NAME:
            error = self._apply_params(event.params)
        for handler in self.handlers.get(event.name, ()):
            try:
                handler(**event.params)
            except Exception as exc:
                self.routine.logger.exception("handler %s of event '%s' failed in routine '%s'",
                                              handler.__name__, event.name, self.routine.name)
                error = f"{handler.__name__}: {exc!r}"
                self.errors += 1
        if event.name == KILL_EVENT_NAME:
            self._cleanup()
        self.flow.ack(event.id, self.routine.name, error, self.counters())
        return event.name != KILL_EVENT_NAME

    def _apply_params(self, values: Dict[str, Any]) -> Optional[str]:
        """Put checked parameter values in force and tell the routine (after its setup; before it,
        setup sees them); if ``params_changed`` raises, the old values stay. The error, if any."""
        routine = self.routine
        old = routine.params
        routine._params.update(values)
        if self.setup_done:
            try:
                routine.params_changed(dict(values))
            except Exception as exc:
                routine._params = old
                routine.logger.exception("routine '%s' refused parameters %s", routine.name, values)
                return f"params_changed: {exc!r}"
        routine.logger.info("parameters of routine '%s' now %s", routine.name, values)
        return None

    def _cleanup(self) -> None:
        self.state = KILLED
        if self.setup_done:
            try:
                self.routine.cleanup()
            except Exception:
                self.routine.logger.exception("cleanup of routine '%s' failed", self.routine.name)
                self.errors += 1

    def timings(self) -> Dict[str, Any]:
        """Fold the latest measurements (from the flow's main thread): the histograms of message ages
        and main_logic durations, and the p50/p99 age of the messages of the last few seconds."""
        self.wall_offset = wall_offset()
        self.durations.fold()
        self.latency.fold()
        quantiles = self.latency.quantiles(0.5, 0.99)
        return {"latency": None if quantiles is None else {"p50": round(quantiles[0], 6),
                                                            "p99": round(quantiles[1], 6)},
                "latency_seconds": self.latency.report(), "main_logic_seconds": self.durations.report()}

    def counters(self) -> Dict[str, Any]:
        durations = list(self.durations.last)
        median = statistics.median(durations) if durations else 0.0
        return {"state": self.state, "error": self.error, "condition": self.routine._condition,
                "messages_in": self.messages_in, "errors": self.errors,
                "messages_out": self.messages_out, "calls": self.calls, "log_data": self.log_data,
                "params": plain(self.routine.params),
                "capacity": round(1.0 / median, 2) if median > 0 else None,
                "paced_fps": round(1.0 / self.auto_interval, 2) if self.auto_interval else None}


class _FrameLogger:
    """Encodes sampled frames to JPEG off the routines' threads and logs them for the cockpit.

    At most a few frames wait; when the encoder is busy, new ones are dropped,
    so showing frames never slows a routine down.
    """

    def __init__(self, quality: int) -> None:
        self._quality = quality
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._thread: Optional[threading.Thread] = None

    def offer(self, logger: logging.Logger, direction: str, frame: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pipert-frames", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((logger, direction, frame))
        except queue.Full:
            pass

    def _run(self) -> None:
        while True:
            logger, direction, frame = self._queue.get()
            try:
                logger.info(frame_log_message(direction, encode_frame(frame, self._quality)))
            except Exception:
                logger.exception("could not encode a %s frame for the cockpit", direction)


class _ForwardHandler(logging.Handler):
    """Sends a flow's log records to the daemon, which hands them to the pipe's handlers.

    ``emit`` only queues (bounded; when full the record is dropped and counted)
    and a background thread sends, so logging never blocks a routine even when
    the daemon is slow to read.
    """

    def __init__(self, send: Callable[[tuple], None], capacity: int = 1000) -> None:
        super().__init__()
        self._send = send
        self._capacity = capacity
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if len(self._queue) >= self._capacity:
                self.dropped += 1
                return
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            fields["exc_info"] = None
            self._queue.append(fields)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pipert-log-forward", daemon=True)
                self._thread.start()
            self._wake.set()
        except Exception:
            self.handleError(record)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Send what is queued (at the end of the flow)."""
        while self._queue:
            self._send(("log", self._queue.popleft()))


class _FlowProcess:
    """The main thread of a flow process."""

    def __init__(self, pipe: Any, instance: str, conn: Connection) -> None:
        self.pipe = pipe
        self.instance = instance  # the flow's name, or flow/i for a replica
        self.flow = flow = pipe._instances[instance]
        self.conn = conn
        self._send_lock = threading.Lock()
        self.frames = _FrameLogger(pipe._jpeg_quality)
        self.failed = False  # a routine thread ended on an internal error: the flow exits non-zero
        self.stop_signal: Optional[int] = None  # the stop signal this process got, if any
        self.hurried = False  # a second stop signal: exit without waiting for the routines
        self.runners = {r.name: _Runner(r, pipe._plans[instance][r.name], self) for r in flow.routines}
        self.tap: Optional[FlowTap] = None

    def send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except OSError:
                pass

    def ack(self, event_id: int, routine: str, error: Optional[str], counters: Dict[str, Any]) -> None:
        """Report that ``routine`` handled an event, with its state right after it."""
        self.send(("ack", event_id, routine, error, counters))

    def allocate(self, routine: str, shape: Tuple[int, ...], dtype: Any) -> Optional[Any]:
        """An array in the pool of one of ``routine``'s wires to other flows, if it has one."""
        runner = self.runners[routine]
        try:
            for sender in runner.plan.senders:
                array = sender.allocate(shape, dtype, runner._should_stop)
                if array is not None:
                    return array
        except Closed:
            pass
        return None

    def notify_event(self, name: str, targets: Optional[dict], params: dict) -> None:
        if self.pipe._resolve(name, targets, params, strict=False):
            self.send(("notify", name, targets, params))
        else:
            logging.getLogger(self.pipe.logger.name).warning("event '%s' goes nowhere: no chosen routine "
                                                             "handles it", name)

    def _report(self, last: Dict[str, int], elapsed: float, log_fps: bool) -> None:
        routines = {}
        for name, runner in self.runners.items():
            timings = runner.timings()
            counters = runner.counters()
            counters.update(timings)
            counters["fps"] = round((counters["calls"] - last.get(name, 0)) / elapsed, 2) if elapsed > 0 else 0.0
            last[name] = counters["calls"]
            routines[name] = counters
            if log_fps and runner.state == RUNNING:
                runner.routine.logger.plog("fps: %.2f", counters["fps"])
        channels = {channel_key(wire, name): (channel.depth(), channel.dropped)
                    for name, runner in self.runners.items()
                    for wire, channel in runner.plan.local_channels.items()}
        self.send(("status", self.instance, routines, channels))

    def _kill_all(self) -> None:
        for runner in self.runners.values():
            runner.deliver(Event(0, KILL_EVENT_NAME))

    def _on_signals(self, signums: List[int]) -> Optional[float]:
        """A stop signal: stop the routines as ``kill`` does (cleanups run); another one: give up on
        them. Returns the deadline for the routines to finish, if this started the stop."""
        deadline = None
        for signum in signums:
            if self.stop_signal is not None:
                _log.warning("flow '%s' got %s while stopping: exiting without waiting for cleanups",
                             self.instance, signal.Signals(signum).name)
                self.hurried = True
                return None
            self.stop_signal = signum
            _log.info("flow '%s' stopping on %s", self.instance, signal.Signals(signum).name)
            self._kill_all()
            deadline = time.monotonic() + self.pipe._kill_grace
        return deadline

    def run(self, signals: Any) -> None:
        """Run the routines until every one is killed (by the daemon, a stop signal or the loss of the
        daemon); ``signals`` is the read end of the process's ``signal_pipe``."""
        replica = self.pipe._instance_names[self.flow.name].index(self.instance)
        for routine in self.flow.routines:
            routine._runtime = self
            routine.replica = replica
            routine.node = self.pipe._node
            routine.logger = logging.getLogger(self.pipe._routine_logger_name(self.instance, routine.name))
        for runner in self.runners.values():
            runner.thread.start()
        self.send(("ready", self.instance, os.getpid()))
        last: Dict[str, int] = {}
        reported = fps_logged = time.monotonic()
        deadline: Optional[float] = None
        waited: List[Any] = [self.conn, signals]
        while any(r.thread.is_alive() for r in self.runners.values()):
            if deadline is not None and time.monotonic() > deadline:
                _log.warning("flow '%s': routines did not finish within %.1f s of the stop signal: exiting "
                             "without them", self.instance, self.pipe._kill_grace)
                return
            try:
                for ready in wait(waited, STATUS_INTERVAL):
                    if ready is signals:
                        deadline = self._on_signals(received(signals)) or deadline
                        if self.hurried:
                            return
                        continue
                    message = self.conn.recv()
                    if message[0] == "pace":
                        for routine, fps in message[1].items():
                            self.runners[routine].auto_interval = 1.0 / fps if fps else 0.0
                        continue
                    if message[0] == "record":
                        self.tap = switch_tap(self.tap, message[1], self.runners)
                        continue
                    _, event_id, name, routines, params = message
                    for routine in routines:
                        self.runners[routine].deliver(Event(event_id, name, params))
            except (EOFError, OSError):
                _log.warning("flow '%s' lost its daemon; killing its routines", self.instance)
                self._kill_all()
                self.conn.close()
                waited = [signals]
            now = time.monotonic()
            if now - reported >= STATUS_INTERVAL and not self.conn.closed:
                log_fps = now - fps_logged >= self.pipe._fps_log_interval
                self._report(last, now - reported, log_fps)
                reported = now
                fps_logged = now if log_fps else fps_logged
        for runner in self.runners.values():
            runner.thread.join()
        if self.tap is not None:
            self.tap.join(TAP_DRAIN)
        self._report(last, time.monotonic() - reported, False)


def _forward_logs(pipe: Any, send: Callable[[tuple], None]) -> _ForwardHandler:
    base = logging.getLogger(pipe.logger.name)
    for handler in list(base.handlers):
        base.removeHandler(handler)
    forward = _ForwardHandler(send)
    base.addHandler(forward)
    base.propagate = False
    return forward


def run_flow(pipe: Any, flow_name: str, fd: int) -> None:
    """Body of a flow process (forked from the zygote) of ``flow_name`` (``flow/i`` for a
    replica); never returns.

    A flow that stopped on a stop signal ends by that signal (its exit status says
    so), after its routines' cleanups, so the daemon sees why it ended.
    """
    code = 0
    process = None
    try:
        signals = signal_pipe()
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        process = _FlowProcess(pipe, flow_name, Connection(fd))
        forward = _forward_logs(pipe, process.send)
        process.run(signals[0])
        if not process.hurried:
            forward.flush()
        code = 1 if process.failed else 0
    except BaseException:
        _log.exception("flow '%s' failed", flow_name)
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed terminal (SIGHUP) or pipe
                pass
        if process is not None and process.stop_signal is not None:
            signal.signal(process.stop_signal, signal.SIG_DFL)
            os.kill(os.getpid(), process.stop_signal)
        os._exit(code)
