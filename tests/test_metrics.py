"""Metrics for operations: /metrics scraped with prometheus_client's parser, health probes, latency."""
import json
import os
import signal
import statistics
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from helpers import Counter, free_port, read_lines, wait_for
from pipert import APIWrapper, DestinationRoutine, MiddleRoutine, SourceRoutine, Wire

TOKEN = "m3trics"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAMES = ["pipert_routine_messages_in", "pipert_routine_messages_out", "pipert_routine_errors", "pipert_routine_fps",
         "pipert_routine_capacity", "pipert_routine_state", "pipert_routine_main_logic_seconds", "pipert_wire_depth",
         "pipert_wire_dropped", "pipert_flow_alive", "pipert_flow_restarts", "pipert_events",
         "pipert_event_ack_seconds", "pipert_latency_seconds", "pipert_cockpit_dropped_records"]


class Sink(DestinationRoutine):
    """Counts what it gets and fails on every tenth message (errors_total must count it)."""

    def setup(self):
        self.n = 0

    def main_logic(self, data):
        self.n += 1
        if self.n % 10 == 0:
            raise ValueError("every tenth message fails")


def scrape(url):
    """{(family, sample name, frozenset of labels): value} from /metrics, and the families' types."""
    response = requests.get(f"{url}/metrics", headers=AUTH, timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples, types = {}, {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def value(samples, name, **labels):
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def serve(pipe):
    api = APIWrapper("127.0.0.1", free_port(), pipe, token=TOKEN)
    api.run()
    return f"http://127.0.0.1:{api.address[1]}"


def test_metrics_counters_survive_a_flow_restart_and_readyz_follows_it(make_pipe):
    pipe = make_pipe(kill_grace=2.0)
    source, sink = Counter(period=0.002, name="counter"), Sink(name="sink")
    pipe.create_flow("producer", False, source)
    pipe.create_flow("consumer", False, sink, restart_backoff=1.0)
    pipe.link(Wire(source=source, destinations=(sink,), policy="latest", depth=2))
    pipe.build()
    url = serve(pipe)
    assert requests.get(f"{url}/metrics", timeout=5).status_code == 401, "the token guards /metrics"
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    pipe.notify_event("start").wait(5)
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200)

    wait_for(lambda: value(scrape(url)[0], "pipert_routine_messages_in_total", routine="sink") > 30)
    first, types = scrape(url)
    assert {name for name in NAMES} <= set(types), set(NAMES) - set(types)
    assert types["pipert_latency_seconds"] == types["pipert_routine_main_logic_seconds"] == "histogram"
    assert types["pipert_routine_messages_in"] == types["pipert_wire_dropped"] == "counter"
    sink_labels = {"flow": "consumer", "routine": "sink"}
    assert value(first, "pipert_routine_state", state="running", **sink_labels) == 1
    assert value(first, "pipert_routine_state", state="idle", **sink_labels) == 0
    assert value(first, "pipert_routine_errors_total", **sink_labels) >= 3
    assert value(first, "pipert_latency_seconds_count", **sink_labels) > 30
    assert value(first, "pipert_routine_main_logic_seconds_count", routine="counter") > 30
    assert value(first, "pipert_wire_depth", wire="counter->sink", destination="sink") <= 2
    assert value(first, "pipert_flow_alive", flow="consumer") == 1
    assert value(first, "pipert_events_total", event="start", routine="sink", outcome="ok") == 1
    assert value(first, "pipert_event_ack_seconds_count", event="start", routine="sink") == 1
    assert value(first, "pipert_cockpit_dropped_records_total") == 0

    old_pid = pipe.status()["flows"]["consumer"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: not pipe.status()["flows"]["consumer"]["alive"], timeout=5)
    ready = requests.get(f"{url}/readyz", timeout=5)
    if pipe.status()["flows"]["consumer"]["alive"]:  # restarted already: no 503 to see
        raise AssertionError("the flow restarted before /readyz could be asked; raise restart_backoff")
    assert ready.status_code == 503
    reasons = ready.json()["reasons"]
    assert any("flow 'consumer' dead since" in r and "signal 9" in r and "restarting" in r for r in reasons), reasons

    counters = ["pipert_routine_messages_in_total", "pipert_routine_errors_total", "pipert_latency_seconds_count",
                "pipert_routine_main_logic_seconds_count"]
    previous = {name: value(first, name, **sink_labels) for name in counters}
    previous["pipert_wire_dropped_total"] = value(first, "pipert_wire_dropped_total", destination="sink")

    def rose_after_restart():
        samples = scrape(url)[0]
        now = {name: value(samples, name, **sink_labels) for name in counters}
        now["pipert_wire_dropped_total"] = value(samples, "pipert_wire_dropped_total", destination="sink")
        for name, before in previous.items():
            assert now[name] >= before, f"{name} went down from {before} to {now[name]} across the restart"
        previous.update(now)
        return value(samples, "pipert_flow_restarts_total", flow="consumer") == 1 and \
            value(samples, "pipert_routine_state", state="running", **sink_labels) == 1 and \
            now["pipert_routine_messages_in_total"] > value(first, "pipert_routine_messages_in_total", **sink_labels) + 30

    wait_for(rose_after_restart, timeout=15, interval=0.1)
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200)
    assert requests.get(f"{url}/readyz", timeout=5).json() == {"ready": True, "reasons": []}
    status = pipe.status()["routines"]["sink"]
    assert status["messages_in"] >= previous["pipert_routine_messages_in_total"], "status() carries counts too"
    pipe.join(to_kill=True)


def test_readyz_names_a_routine_that_crashed_in_setup(make_pipe):
    class Broken(DestinationRoutine):
        def setup(self):
            raise RuntimeError("no camera")

        def main_logic(self, data):
            pass

    pipe = make_pipe()
    pipe.create_flow("only", True, Counter(period=0.01, name="ticks"), Broken(name="broken"))
    pipe.build()
    url = serve(pipe)
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 200, "built, nothing started: ready"
    pipe.notify_event("start").wait(5)
    ready = requests.get(f"{url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["reasons"] == ["routine 'broken' crashed: setup: RuntimeError('no camera')"]
    pipe.join(to_kill=True)


class Stamped(SourceRoutine):
    """Sends the wall-clock time it produced each message, 20 times a second."""

    def setup(self):
        self.set_const_fps(20)

    def main_logic(self):
        return {"t": time.time()}


class AgeLog:
    """Writes the true age of what it receives to a file, then takes ``delay`` seconds."""

    def __init__(self, path, name, delay=0.0):
        super().__init__(name)
        self.path = path
        self.delay = delay

    def main_logic(self, data):
        with open(self.path, "a") as f:
            f.write(json.dumps({"age": time.time() - data["t"]}) + "\n")
        time.sleep(self.delay)
        return data


class Slow(AgeLog, MiddleRoutine):
    pass


class Aged(AgeLog, DestinationRoutine):
    pass


def test_latency_of_a_paced_pipeline_with_a_slow_middle_routine(make_pipe, tmp_path):
    middle_path, sink_path = str(tmp_path / "middle.jsonl"), str(tmp_path / "sink.jsonl")
    pipe = make_pipe()
    source, middle, sink = Stamped(name="stamped"), Slow(middle_path, "slow", delay=0.02), Aged(sink_path, "aged")
    pipe.create_flow("front", True, source, middle)  # source -> middle through a local channel
    pipe.create_flow("back", False, sink)  # middle -> sink through shared memory
    pipe.link(Wire(source=middle, destinations=(sink,)))
    pipe.build()
    pipe.notify_event("start").wait(5)
    wait_for(lambda: len(read_lines(sink_path)) >= 40, timeout=20)
    time.sleep(0.6)  # one more report, so that status() has seen what the files hold
    routines = pipe.status()["routines"]
    pipe.join(to_kill=True)
    assert routines["stamped"]["latency"] is None, "a source receives nothing"
    for name, path in (("slow", middle_path), ("aged", sink_path)):
        truth = statistics.median(r["age"] for r in read_lines(path))
        measured = routines[name]["latency"]["p50"]
        assert abs(measured - truth) < 0.003, (name, measured, truth)
        assert routines[name]["latency"]["p99"] >= measured
    assert routines["aged"]["latency"]["p50"] >= 0.020, "the sink's messages waited 20 ms in the middle routine"
    assert routines["aged"]["latency"]["p50"] > routines["slow"]["latency"]["p50"] + 0.015
