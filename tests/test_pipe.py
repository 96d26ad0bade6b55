"""End-to-end tests of the pipe engine with real flow processes."""
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import AddOne, Counter, EventLog, Recorder, living, read_lines, wait_for
from pipert import (BuildError, DestinationRoutine, EventError, MiddleRoutine, PIPE_INFRASTRUCTURE, SourceRoutine,
                    Wire, events, shm)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(path, routine=None):
    return [r["n"] for r in read_lines(path) if "n" in r and (routine is None or r["routine"] == routine)]


def test_routine_names_default_to_class_and_counter():
    class Probe(SourceRoutine):
        pass

    first, second, named = Probe(), Probe(), Probe(name="custom")
    assert (first.name, second.name, named.name) == ("Probe-0", "Probe-1", "custom")


def test_in_flow_chain_passes_dicts_by_reference(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    pipe = make_pipe(wire_policy="block", wire_depth=4)
    recorder = Recorder(str(out))
    pipe.create_flow("only", True, Counter(limit=50), AddOne(), recorder)
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: len(numbers(out)) == 50)
    assert numbers(out) == list(range(2, 52))
    pipe.join(to_kill=True)
    assert read_lines(out)[-1] == {"routine": recorder.name, "cleanup": True}


@dataclasses.dataclass
class Reading:
    sensor: str
    value: float


class SendObjects(SourceRoutine):
    def setup(self):
        self.sent = False

    def main_logic(self):
        if self.sent:
            time.sleep(0.01)
            return None
        self.sent = True
        return {"n": 1, "frame": np.arange(480 * 640 * 3, dtype=np.uint8).reshape(480, 640, 3),
                "small": np.arange(10), "reading": Reading("t1", 21.5)}


class CheckObjects(DestinationRoutine):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def main_logic(self, data):
        frame = data["frame"]
        ok = (frame.shape == (480, 640, 3) and int(frame[1, 2, 0]) == (640 * 3 + 6) % 256
              and not frame.flags.writeable and data["small"].tolist() == list(range(10))
              and data["reading"] == Reading("t1", 21.5))
        with open(self.path, "w") as f:
            f.write("ok" if ok else f"bad {frame.shape} {frame.flags.writeable} {data['reading']}")


def test_numpy_and_dataclasses_cross_flows(make_pipe, tmp_path):
    out = tmp_path / "result"
    pipe = make_pipe()
    source, sink = SendObjects(), CheckObjects(str(out))
    pipe.create_flow("producer", False, source)
    pipe.create_flow("consumer", False, sink)
    pipe.link(Wire(source=source, destinations=(sink,)))
    pipe.build()
    pipe.notify_event("start")
    assert wait_for(lambda: out.exists() and out.read_text()) == "ok"
    pipe.join(to_kill=True)


def test_fan_out_and_fan_in_inside_and_across_flows(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    pipe = make_pipe(wire_policy="block", wire_depth=8)
    a, b = Counter(limit=30, name="a"), Counter(limit=30, name="b")
    near, far1, far2 = Recorder(str(out), "near"), Recorder(str(out), "far1"), Recorder(str(out), "far2")
    pipe.create_flow("sources", False, a, b, near)
    pipe.create_flow("sinks1", False, far1)
    pipe.create_flow("sinks2", False, far2)
    pipe.link(Wire(source=a, destinations=(near, far1, far2)),   # fan-out, local and remote
              Wire(source=b, destinations=(near, far1)))         # fan-in of a and b in near and far1
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: len(numbers(out)) == 30 * 5)
    for routine, sources in (("near", {"a", "b"}), ("far1", {"a", "b"}), ("far2", {"a"})):
        rows = [r for r in read_lines(out) if r["routine"] == routine and "n" in r]
        assert {r["source"] for r in rows} == sources
        for source in sources:
            assert [r["n"] for r in rows if r["source"] == source] == list(range(1, 31))
    pipe.join(to_kill=True)


def _pipe_with_two_flows(make_pipe, tmp_path):
    log = str(tmp_path / "events.jsonl")
    pipe = make_pipe()
    first, second, third = EventLog(log, "first"), EventLog(log, "second"), EventLog(log, "third")
    sink1, sink2 = Recorder(str(tmp_path / "sink1"), "sink1"), Recorder(str(tmp_path / "sink2"), "sink2")
    pipe.create_flow("f1", False, first, second, sink1)
    pipe.create_flow("f2", False, third, sink2)
    pipe.link(Wire(source=first, destinations=(sink1,)), Wire(source=second, destinations=(sink1,)),
              Wire(source=third, destinations=(sink2,)))
    pipe.build()
    return pipe, log


def _pings(log, value):
    return sorted(r["routine"] for r in read_lines(log) if r["value"] == value)


def test_event_targeting_forms_and_parameters(make_pipe, tmp_path):
    pipe, log = _pipe_with_two_flows(make_pipe, tmp_path)
    pipe.notify_event("start")
    everyone = pipe.notify_event("PING", value="all").wait(5)
    assert everyone["handled_by"] == ["first", "second", "third"] and not everyone["errors"]
    assert _pings(log, "all") == ["first", "second", "third"]
    pipe.notify_event("PING", {"f1": []}, value="flow").wait(5)
    assert _pings(log, "flow") == ["first", "second"]
    pipe.notify_event("PING", {"f1": ["second"], "f2": ["third"]}, value="chosen").wait(5)
    assert _pings(log, "chosen") == ["second", "third"]
    pipe.join(to_kill=True)


def test_event_from_inside_a_routine(make_pipe, tmp_path):
    pipe, log = _pipe_with_two_flows(make_pipe, tmp_path)
    pipe.notify_event("start")
    pipe.notify_event("FORWARD", {"f1": ["first"]}, target_flow="f2", target_routine="third")
    wait_for(lambda: _pings(log, "from first") == ["third"])
    pipe.join(to_kill=True)


def test_bad_events_raise_clear_errors(make_pipe, tmp_path):
    pipe, _ = _pipe_with_two_flows(make_pipe, tmp_path)
    with pytest.raises(EventError, match="no flow 'nope'"):
        pipe.notify_event("PING", {"nope": []})
    with pytest.raises(EventError, match="has no routine 'ghost'"):
        pipe.notify_event("PING", {"f1": ["ghost"]})
    with pytest.raises(TypeError, match="PING.*first"):
        pipe.notify_event("PING", {"f1": ["first"]}, colour="red")
    with pytest.raises(EventError, match="no routine handles event 'UNKNOWN'"):
        pipe.send_event("UNKNOWN")
    with pytest.raises(EventError, match="does not handle event 'FORWARD'"):
        pipe.send_event("FORWARD", {"f1": [pipe.flows["f1"].routines[2].name]})
    assert pipe.notify_event("UNKNOWN").wait(1)["handled_by"] == []
    pipe.join(to_kill=True)


def test_stop_pauses_and_start_resumes(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    pipe = make_pipe()
    pipe.create_flow("f", True, Counter(period=0.005), Recorder(str(out)))
    pipe.build()
    assert all(r["state"] == "idle" for r in pipe.status()["routines"].values())
    pipe.notify_event("start").wait(5)
    wait_for(lambda: len(numbers(out)) > 5)
    pipe.notify_event("stop").wait(5)
    time.sleep(0.1)
    paused = len(numbers(out))
    time.sleep(0.3)
    assert len(numbers(out)) == paused
    wait_for(lambda: all(r["state"] == "stopped" for r in pipe.status()["routines"].values()))
    pipe.notify_event("start").wait(5)
    wait_for(lambda: len(numbers(out)) > paused + 5)
    pipe.join(to_kill=True)
    assert all(r["state"] == "killed" for r in pipe.status()["routines"].values())
    assert not any(s["alive"] for s in pipe.status()["flows"].values())


class Exclusive(SourceRoutine):
    """Records whether an event handler ever ran while main_logic was running."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def setup(self):
        self.inside = False
        self.overlaps = 0
        self.handled = 0

    def main_logic(self):
        self.inside = True
        time.sleep(0.002)
        self.inside = False
        return {"n": 1}

    @events("POKE")
    def poke(self):
        self.overlaps += self.inside
        self.handled += 1

    def cleanup(self):
        with open(self.path, "w") as f:
            f.write(f"{self.handled} {self.overlaps}")


def test_handler_never_runs_during_main_logic(make_pipe, tmp_path):
    out = tmp_path / "result"
    pipe = make_pipe()
    pipe.create_flow("f", True, Exclusive(str(out)), Recorder(str(tmp_path / "sink")))
    pipe.build()
    pipe.notify_event("start")
    for _ in range(200):
        pipe.notify_event("POKE")
    pipe.notify_event("POKE").wait(5)
    pipe.join(to_kill=True)
    assert out.read_text() == "201 0"


class Faulty(MiddleRoutine):
    """Returns None for odd numbers and raises on multiples of 5."""

    def main_logic(self, data):
        if data["n"] % 5 == 0:
            raise ValueError(f"bad number {data['n']}")
        return data if data["n"] % 2 == 0 else None


class FailingSetup(SourceRoutine):
    """Its setup fails until the marker file exists."""

    def __init__(self, marker):
        super().__init__()
        self.marker = marker

    def setup(self):
        if not os.path.exists(self.marker):
            raise RuntimeError("camera not found")

    def main_logic(self):
        time.sleep(0.005)
        return {"n": -1, "source": self.name}


def test_faq_none_exceptions_and_failing_setup(make_pipe, tmp_path):
    out, marker = tmp_path / "out.jsonl", tmp_path / "marker"
    pipe = make_pipe(wire_policy="block", wire_depth=4)
    pipe.create_flow("f", True, Counter(limit=20), Faulty(), Recorder(str(out)))
    failing = FailingSetup(str(marker))
    pipe.create_flow("g", True, failing, Recorder(str(out), "g-sink"))
    pipe.build()
    first = pipe.notify_event("start").wait(5)
    assert "setup" in first["errors"][failing.name] and "camera not found" in first["errors"][failing.name]
    wait_for(lambda: numbers(out, pipe.flows["f"].routines[2].name) ==
             [2, 4, 6, 8, 12, 14, 16, 18])
    status = pipe.status()["routines"]
    assert status[failing.name]["state"] == "crashed" and "camera not found" in status[failing.name]["error"]
    assert not numbers(out, "g-sink")
    def errors():
        return [r for r in pipe.captured.records if r.levelname == "ERROR" and "main_logic" in r.getMessage()]
    wait_for(lambda: len(errors()) == 4)
    assert all("ValueError: bad number" in (r.exc_text or "") for r in errors())
    wait_for(lambda: any("camera not found" in (r.exc_text or "") for r in pipe.captured.records))
    marker.write_text("")
    assert pipe.notify_event("start").wait(5)["errors"] == {}
    wait_for(lambda: numbers(out, "g-sink"))
    pipe.join(to_kill=True)


def test_structure_lists_routines_and_custom_events(make_pipe, tmp_path):
    pipe, _ = _pipe_with_two_flows(make_pipe, tmp_path)
    structure = pipe.structure()
    assert structure["Events"] == ["start", "stop", "kill"]
    assert {"flow_name": "f1", "routine_name": "first", "events": ["FORWARD", "PING"],
            "event_params": {"FORWARD": [{"name": "target_flow", "required": True},
                                         {"name": "target_routine", "required": True}],
                             "PING": [{"name": "value", "required": False, "default": None}]},
            "params": {}} in structure["Routines"]
    assert [(w["source"], w["destination"], w["policy"], w["depth"]) for w in structure["Wires"]] == \
        [("first", "sink1", "latest", 1), ("second", "sink1", "latest", 1), ("third", "sink2", "latest", 1)]
    assert [r["routine_name"] for r in structure["Routines"]] == \
        ["first", "second", pipe.flows["f1"].routines[2].name, "third", pipe.flows["f2"].routines[1].name]
    pipe.join(to_kill=True)


class Chatty(SourceRoutine):
    def main_logic(self):
        self.logger.info("hello from %s", self.name)
        self.logger.plog("infrastructure note")
        time.sleep(0.05)
        return {"n": 1}


def test_routine_logs_reach_the_pipe_logger_with_flow_and_routine_names(make_pipe, tmp_path):
    pipe = make_pipe()
    chatty = Chatty(name="chatty")
    pipe.create_flow("talk", True, chatty, Recorder(str(tmp_path / "sink")))
    pipe.build()
    pipe.notify_event("start")
    base = pipe.logger.name
    wait_for(lambda: any(r.name == f"{base}.talk.chatty" and r.getMessage() == "hello from chatty"
                         for r in pipe.captured.records))
    wait_for(lambda: any(r.levelno == PIPE_INFRASTRUCTURE and r.levelname == "PIPE_INFRASTRUCTURE"
                         for r in pipe.captured.records if r.name.endswith(".chatty")))
    pipe.join(to_kill=True)


@pytest.mark.parametrize("case, message", [
    ("duplicate_routine", "routine name 'same' is used twice"),
    ("duplicate_flow", "flow name 'f' is used twice"),
    ("linked_to_nothing", "routine 'lonely' is linked to nothing"),
    ("not_in_flow", "which is in no flow"),
    ("two_flows", "routine 'shared' is in two flows"),
    ("source_with_input", "source routine 'src2' cannot have inputs"),
    ("destination_with_output", "destination routine 'dst' cannot have outputs"),
    ("cycle", "cycle: m1 -> m2 -> m1"),
])
def test_build_validation(make_pipe, tmp_path, case, message):
    pipe = make_pipe()
    path = str(tmp_path / "x")
    if case == "duplicate_routine":
        pipe.create_flow("f", True, Counter(name="same"), Recorder(path, "same"))
    elif case == "duplicate_flow":
        pipe.create_flow("f", True, Counter(), Recorder(path))
        pipe.create_flow("f", True, Counter(), Recorder(path))
    elif case == "linked_to_nothing":
        pipe.create_flow("f", True, Counter(), Recorder(path))
        pipe.create_flow("g", False, Counter(name="lonely"))
    elif case == "not_in_flow":
        src = Counter()
        pipe.create_flow("f", False, src)
        pipe.link(Wire(source=src, destinations=(Recorder(path),)))
    elif case == "two_flows":
        shared = Recorder(path, "shared")
        pipe.create_flow("f", True, Counter(), shared)
        pipe.create_flow("g", True, Counter(), shared)
    elif case == "source_with_input":
        src1, src2 = Counter(name="src1"), Counter(name="src2")
        pipe.create_flow("f", False, src1, src2)
        pipe.link(Wire(source=src1, destinations=(src2,)))
    elif case == "destination_with_output":
        src, dst, dst2 = Counter(), Recorder(path, "dst"), Recorder(path, "dst2")
        pipe.create_flow("f", False, src, dst, dst2)
        pipe.link(Wire(source=src, destinations=(dst,)), Wire(source=dst, destinations=(dst2,)))
    elif case == "cycle":
        src, m1, m2, dst = Counter(), AddOne(name="m1"), AddOne(name="m2"), Recorder(path)
        pipe.create_flow("f", False, src, m1, m2, dst)
        pipe.link(Wire(source=src, destinations=(m1,)), Wire(source=m1, destinations=(m2,)),
                  Wire(source=m2, destinations=(m1, dst)))
    with pytest.raises(BuildError, match=message.replace("(", r"\(")):
        pipe.build()


def _run_script(code, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(code)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def test_readme_example_runs_as_written():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "readme_example.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


SCRIPT = """
import sys, time
from pipert import Pipe, SourceRoutine, DestinationRoutine
class Gen(SourceRoutine):
    def main_logic(self):
        time.sleep(0.01)
        return {"v": 1}
class Sink(DestinationRoutine):
    def main_logic(self, data):
        pass
pipe = Pipe()
pipe.create_flow("a", False, Gen())
pipe.create_flow("b", False, Sink())
from pipert import Wire
pipe.link(Wire(source=pipe.flows["a"].routines[0], destinations=(pipe.flows["b"].routines[0],)))
pipe.build()
pipe.notify_event("start")
print(pipe.id, pipe._zygote.pid, *[s.pid for s in pipe._states.values()], flush=True)
MODE
"""


@pytest.mark.parametrize("mode, sig", [("pipe.join()", signal.SIGINT), ("pipe.join()", signal.SIGTERM),
                                        ("time.sleep(60)", signal.SIGINT), ("time.sleep(60)", signal.SIGTERM),
                                        ("raise RuntimeError('script bug')", None)])
def test_no_process_or_shared_memory_outlives_the_script(tmp_path, mode, sig):
    proc = _run_script(SCRIPT.replace("MODE", mode), tmp_path)
    try:
        line = proc.stdout.readline().split()
        pipe_id, pids = line[0], [int(p) for p in line[1:]]
        assert len(pids) == 3 and [e for e in shm.leftovers() if f"_{pipe_id}_" in e]
        if sig is not None:
            time.sleep(0.2)
            proc.send_signal(sig)
        proc.wait(timeout=20)
        wait_for(lambda: not living(pids), timeout=5)
        assert not [e for e in shm.leftovers() if f"_{pipe_id}_" in e]
    finally:
        proc.kill()
        proc.wait()


def test_join_returns_when_a_routine_sends_kill(make_pipe, tmp_path):
    class Quitter(SourceRoutine):
        def setup(self):
            self.n = 0

        def main_logic(self):
            self.n += 1
            if self.n == 20:
                self.notify_event("kill")
            return {"n": self.n}

    pipe = make_pipe()
    pipe.create_flow("f", True, Quitter(), Recorder(str(tmp_path / "out")))
    pipe.build()
    pipe.notify_event("start")
    done = threading.Event()
    threading.Thread(target=lambda: (pipe.join(), done.set()), daemon=True).start()
    assert done.wait(10)
