"""Metrics for operations: a pipe's counters, gauges and histograms in Prometheus' format.

Flows report the cumulative counts of their own process. ``Totals`` carries the
last counts of a process that ended forward, so that counters never go down,
also across flow restarts. ``EventStats`` counts the acknowledgements of events
in the daemon. At scrape time ``PipeCollector`` turns ``Pipe.metrics()`` into
metric families and ``prometheus_client`` writes the exposition (text or
OpenMetrics, as the scraper asks).
"""
from __future__ import annotations

import socket
import threading
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from .timing import BUCKETS, Histogram

COUNTERS = ("messages_in", "messages_out", "calls", "errors")
"""Per-routine counts a flow reports; they restart from zero with the flow's process."""
HISTOGRAMS = ("latency_seconds", "main_logic_seconds")
"""Per-routine histograms a flow reports, cumulative like the counters."""
STATES = ("idle", "running", "stopped", "crashed", "killed", "dead")
"""Every state ``pipert_routine_state`` has a series for."""


def _add_histograms(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not a or not b:
        return a or b
    return {"buckets": [x + y for x, y in zip(a["buckets"], b["buckets"])], "count": a["count"] + b["count"],
            "sum": a["sum"] + b["sum"]}


class Totals:
    """The counts of a flow's processes that ended, added to what its live process reports."""

    def __init__(self) -> None:
        self._routines: Dict[str, Dict[str, Any]] = {}
        self._dropped: Dict[str, int] = {}

    def take(self, routines: Dict[str, Dict[str, Any]], channels: Dict[str, Tuple[int, int]]) -> None:
        """Move the counts out of the last reports of a process that ended (``routines`` by routine,
        ``channels`` as (depth, dropped) by channel key) into the totals."""
        for name, reported in routines.items():
            reported["fps"] = 0.0  # the process is gone: nothing runs
            carried = self._routines.setdefault(name, {})
            for key in COUNTERS:
                carried[key] = carried.get(key, 0) + reported.pop(key, 0)
            for key in HISTOGRAMS:
                carried[key] = _add_histograms(carried.get(key), reported.pop(key, None))
        for key, (_, dropped) in channels.items():
            self._dropped[key] = self._dropped.get(key, 0) + dropped
        channels.clear()

    def routine(self, name: str, reported: Dict[str, Any]) -> Dict[str, Any]:
        """``reported`` (the live process's last report of routine ``name``) with the earlier counts added."""
        carried = self._routines.get(name, {})
        merged = dict(reported)
        for key in COUNTERS:
            merged[key] = reported.get(key, 0) + carried.get(key, 0)
        for key in HISTOGRAMS:
            merged[key] = _add_histograms(carried.get(key), reported.get(key))
        return merged

    def dropped(self, key: str, reported: int) -> int:
        """The drops of local channel ``key``: ``reported`` by the live process plus earlier ones."""
        return reported + self._dropped.get(key, 0)


class EventStats:
    """Acknowledgements of events in the daemon: counts by outcome and the time each took."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Dict[Tuple[str, str, str, str], int] = {}
        self._acks: Dict[Tuple[str, str, str], Histogram] = {}

    def observe(self, event: str, flow: str, routine: str, error: Optional[str], seconds: float) -> None:
        """Routine ``routine`` of ``flow`` acknowledged ``event`` ``seconds`` after it was sent (``error``
        is its handler's error, or why the daemon gave up on it)."""
        outcome = "ok" if error is None else "error"
        with self._lock:
            key = (event, flow, routine, outcome)
            self._counts[key] = self._counts.get(key, 0) + 1
            self._acks.setdefault((event, flow, routine), Histogram()).samples.append(seconds)

    def snapshot(self) -> Dict[str, List[Dict[str, Any]]]:
        """The counts and ack-time histograms so far, as plain JSON."""
        with self._lock:
            counts = [{"event": e, "flow": f, "routine": r, "outcome": o, "count": n}
                      for (e, f, r, o), n in self._counts.items()]
            acks = []
            for (event, flow, routine), histogram in self._acks.items():
                histogram.fold()
                acks.append({"event": event, "flow": flow, "routine": routine, **histogram.report()})
        return {"counts": counts, "acks": acks}


def wire_names(pipe: Any) -> Dict[Tuple[str, str], str]:
    """The name of the wire of each (source, destination) edge: ``source->dest1,dest2``."""
    names = {}
    for wire in pipe.wires:
        name = f"{wire.source.name}->{','.join(d.name for d in wire.destinations)}"
        for destination in wire.destinations:
            names[(wire.source.name, destination.name)] = name
    return names


def _histogram(family: HistogramMetricFamily, labels: List[str], report: Optional[Dict[str, Any]]) -> None:
    buckets = report["buckets"] if report else [0] * (len(BUCKETS) + 1)
    family.add_metric(labels, [(str(bound), count) for bound, count in zip(BUCKETS, buckets)]
                      + [("+Inf", buckets[-1])], report["sum"] if report else 0.0)


class PipeCollector(Collector):
    """Collects a pipe's metrics at scrape time, from ``Pipe.metrics()``."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def describe(self) -> Iterable[Metric]:
        return []  # the families depend on the pipe; registering must not collect

    def collect(self) -> Iterator[Metric]:
        snapshot = self.pipe.metrics()
        here = socket.gethostname()
        node = {name: flow.get("node") or here for name, flow in snapshot["flows"].items()}
        routine_labels = ["flow", "routine", "node"]
        families = {
            "in": CounterMetricFamily("pipert_routine_messages_in", "Messages a routine received.",
                                      labels=routine_labels),
            "out": CounterMetricFamily("pipert_routine_messages_out", "Messages a routine sent on.",
                                       labels=routine_labels),
            "errors": CounterMetricFamily("pipert_routine_errors", "Exceptions raised in a routine's setup, "
                                          "main_logic, event handlers or cleanup, and sends that failed.",
                                          labels=routine_labels),
            "fps": GaugeMetricFamily("pipert_routine_fps", "main_logic calls per second over the last "
                                     "report (0.5 s).", labels=routine_labels),
            "capacity": GaugeMetricFamily("pipert_routine_capacity", "Calls per second main_logic could do: "
                                          "1 / median duration of its last 64 calls.", labels=routine_labels),
            "state": GaugeMetricFamily("pipert_routine_state", "1 for the routine's current state, 0 for "
                                       "the others.", labels=routine_labels + ["state"]),
            "main_logic": HistogramMetricFamily("pipert_routine_main_logic_seconds", "Duration of main_logic "
                                                "calls.", labels=routine_labels),
            "latency": HistogramMetricFamily("pipert_latency_seconds", "Age of the messages a routine receives: "
                                             "time since their source produced the message they came from.",
                                             labels=routine_labels),
        }
        for name, routine in snapshot["routines"].items():
            labels = [routine["flow"], name, node.get(routine["flow"], here)]
            families["in"].add_metric(labels, routine["messages_in"])
            families["out"].add_metric(labels, routine["messages_out"])
            families["errors"].add_metric(labels, routine["errors"])
            families["fps"].add_metric(labels, routine["fps"] or 0.0)
            if routine["capacity"] is not None:
                families["capacity"].add_metric(labels, routine["capacity"])
            for state in STATES:
                families["state"].add_metric(labels + [state], 1.0 if routine["state"] == state else 0.0)
            _histogram(families["main_logic"], labels, routine["main_logic_seconds"])
            _histogram(families["latency"], labels, routine["latency_seconds"])
        yield from families.values()
        yield from self._wires(snapshot, node, here)
        yield from self._flows(snapshot, node)
        yield from self._events(snapshot, node, here)
        dropped = CounterMetricFamily("pipert_cockpit_dropped_records", "Log records the daemon could not "
                                      "send to the PipeRT cockpit (unreachable or too slow).", labels=["node"])
        dropped.add_metric([here], snapshot["cockpit_dropped_records"])
        yield dropped

    def _wires(self, snapshot: Dict[str, Any], node: Dict[str, str], here: str) -> Iterator[Metric]:
        labels = ["wire", "source", "destination", "flow", "node"]
        depth = GaugeMetricFamily("pipert_wire_depth", "Messages waiting on a wire for a destination.",
                                  labels=labels)
        dropped = CounterMetricFamily("pipert_wire_dropped", "Messages a wire dropped for a destination "
                                      "(latest policy, or its flow was dead).", labels=labels)
        names = wire_names(self.pipe)
        for wire in snapshot["wires"]:
            flow = snapshot["routines"][wire["destination"]]["flow"]
            values = [names[(wire["source"], wire["destination"])], wire["source"], wire["destination"], flow,
                      node.get(flow, here)]
            depth.add_metric(values, wire["depth"])
            dropped.add_metric(values, wire["dropped"])
        yield depth
        yield dropped

    @staticmethod
    def _flows(snapshot: Dict[str, Any], node: Dict[str, str]) -> Iterator[Metric]:
        alive = GaugeMetricFamily("pipert_flow_alive", "1 while the flow's process runs.", labels=["flow", "node"])
        restarts = CounterMetricFamily("pipert_flow_restarts", "Times the flow's process was restarted.",
                                       labels=["flow", "node"])
        for name, flow in snapshot["flows"].items():
            alive.add_metric([name, node[name]], 1.0 if flow["alive"] else 0.0)
            restarts.add_metric([name, node[name]], flow["restarts"])
        yield alive
        yield restarts

    @staticmethod
    def _events(snapshot: Dict[str, Any], node: Dict[str, str], here: str) -> Iterator[Metric]:
        total = CounterMetricFamily("pipert_events", "Events acknowledged by a routine, by outcome (error: its "
                                    "handler failed or its flow was not running).",
                                    labels=["event", "flow", "routine", "node", "outcome"])
        for count in snapshot["events"]["counts"]:
            total.add_metric([count["event"], count["flow"], count["routine"], node.get(count["flow"], here),
                              count["outcome"]], count["count"])
        acks = HistogramMetricFamily("pipert_event_ack_seconds", "Time from sending an event until a routine "
                                     "acknowledged it.", labels=["event", "flow", "routine", "node"])
        for ack in snapshot["events"]["acks"]:
            _histogram(acks, [ack["event"], ack["flow"], ack["routine"], node.get(ack["flow"], here)], ack)
        yield total
        yield acks


def exposition(pipe: Any) -> Tuple[bytes, str]:
    """The pipe's metrics in Prometheus' text format: (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipeCollector(pipe))
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
