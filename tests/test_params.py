"""Typed routine parameters: conversion, bounds, errors, cascading, and build refusing bad values."""
import json
import os
import signal
import time

import pytest

from helpers import Recorder, read_lines, wait_for
from pipert import (BuildError, DestinationRoutine, EventError, MiddleRoutine, Param, ParamError, SourceRoutine,
                    Wire)
from pipert.params import REQUIRED


class Source(SourceRoutine):
    fps = Param(float, default=10.0, min=0.1, help="frames a second")
    path = Param(str, help="input file")

    def main_logic(self):
        return {"n": 1}


class Detector(MiddleRoutine):
    min_area = Param(int, default=400, min=0, help="smallest blob in pixels")
    mode = Param(str, default="fast", choices=("fast", "exact"))
    enabled = Param(bool, default=True)
    labels = Param(list, default=["car"])
    fps = Param(float, default=5.0)

    def main_logic(self, data):
        return data


class Sink(DestinationRoutine):
    def main_logic(self, data):
        pass


@pytest.mark.parametrize("kind, given, expected", [
    (int, "800", 800), (int, 12.0, 12), (int, " 0x10 ", 16), (float, "2.5", 2.5), (float, 3, 3.0),
    (bool, "yes", True), (bool, "Off", False), (bool, 1, True), (bool, False, False),
    (str, 0, "0"), (str, "rtsp://cam", "rtsp://cam"),
    (list, "a, b,c", ["a", "b", "c"]), (list, "[1, 2]", [1, 2]), (list, ("x",), ["x"]), (list, "", []),
    (dict, '{"a": 1}', {"a": 1}), (dict, {"b": 2}, {"b": 2}),
])
def test_values_are_converted_to_the_declared_type(kind, given, expected):
    converted = Param(kind).convert(given)
    assert converted == expected and type(converted) is type(expected)


@pytest.mark.parametrize("param, given, words", [
    (Param(int), "eight", "expects int, got 'eight' (str)"),
    (Param(int), 2.5, "expects int, got 2.5 (float)"),
    (Param(int), True, "expects int, got True (bool)"),
    (Param(bool), "maybe", "expects bool"),
    (Param(str), [1], "expects str, got [1] (list)"),
    (Param(int, min=0, max=10), 11, "expects int >= 0 <= 10, got 11 (int): out of bounds"),
    (Param(str, choices=("a", "b")), "c", "expects str in 'a', 'b', got 'c'"),
    (Param(list), "[1,", "not valid JSON"),
    (Param(dict), "[1]", "expects dict"),
    (Param(int, default=3), None, "got None"),
])
def test_bad_values_name_expected_and_given(param, given, words):
    with pytest.raises(ValueError) as caught:
        param.convert(given)
    assert words in str(caught.value)


def test_declaration_checks_its_default_and_describes_itself():
    with pytest.raises(TypeError, match="default or choices do not fit"):
        Param(int, default="many")
    with pytest.raises(TypeError, match="must be a class"):
        Param("int")
    assert Param(int).default is REQUIRED
    assert Param(str, default=None).convert(None) is None
    assert Detector.min_area.describe() == {"type": "int", "required": False, "default": 400, "min": 0,
                                            "help": "smallest blob in pixels"}
    assert Source.path.describe() == {"type": "str", "required": True, "help": "input file"}
    assert Detector.mode.describe()["choices"] == ["fast", "exact"]


def test_constructor_keywords_set_values_read_as_attributes():
    detector = Detector(name="det", min_area="800", labels="car,bus")
    assert (detector.min_area, detector.labels, detector.mode) == (800, ["car", "bus"], "fast")
    assert detector.params == {"min_area": 800, "mode": "fast", "enabled": True, "labels": ["car", "bus"],
                               "fps": 5.0}
    detector.min_area = "5"
    assert detector.min_area == 5
    with pytest.raises(ParamError, match="routine 'det': parameter 'min_area' expects int >= 0, got -1"):
        detector.min_area = -1


def test_a_parameter_cannot_take_a_name_pipert_uses():
    for reserved in ("name", "logger", "setup", "main_logic", "shared_array"):
        with pytest.raises((TypeError, RuntimeError)) as caught:
            type("Bad", (MiddleRoutine,), {reserved: Param(int, default=1)})
        assert f"'{reserved}' is a routine attribute of pipert's own" in str(caught.value) + \
            str(caught.value.__cause__)


def test_routines_with_their_own_init_keep_working():
    recorder = Recorder("/tmp/x.jsonl", name="rec")
    assert recorder.name == "rec" and recorder.params == {}


def test_a_required_parameter_without_value_says_so_when_read():
    source = Source()
    with pytest.raises(AttributeError, match="parameter 'path' of Source has no value"):
        source.path


def build_error(pipe):
    with pytest.raises(ParamError) as caught:
        pipe.build()
    assert isinstance(caught.value, BuildError)
    assert not pipe._states, "a flow started despite bad parameters"
    return str(caught.value)


def test_build_lists_every_bad_parameter_before_any_process_starts(make_pipe):
    pipe = make_pipe()
    pipe.create_flow("f", True, Source(name="cam"), Detector(name="det", min_area=-5, mode="slow", colour="red"),
                     Sink(name="out"))
    message = build_error(pipe)
    assert "4 parameter problems" in message
    assert "routine 'cam' (Source): parameter 'path' is required (str) and was not set" in message
    assert "routine 'det' (Detector): parameter 'min_area' expects int >= 0, got -5 (int): out of bounds" in message
    assert "routine 'det' (Detector): parameter 'mode' expects str in 'fast', 'exact', got 'slow' (str)" in message
    assert "routine 'det' (Detector): unknown parameter 'colour' (given 'red'); its parameters are: enabled, fps, " \
           "labels, min_area, mode" in message


def test_pipe_params_cascade_unless_a_routine_sets_its_own(make_pipe):
    pipe = make_pipe(params={"fps": "25", "path": "in.mp4"})
    source, detector = Source(name="cam"), Detector(name="det", fps=2)
    pipe.create_flow("f", True, source, detector, Sink(name="out"))
    pipe.build()
    assert (source.fps, source.path, detector.fps) == (25.0, "in.mp4", 2.0)
    structure = {r["routine_name"]: r for r in pipe.structure()["Routines"]}
    assert structure["det"]["params"]["min_area"] == Detector.min_area.describe()
    assert structure["out"]["params"] == {}
    assert pipe.status()["routines"]["cam"]["params"] == {"fps": 25.0, "path": "in.mp4"}


def test_pipe_params_are_checked_too(make_pipe):
    pipe = make_pipe(params={"fps": "fast", "colour": "red", "path": "x"})
    pipe.create_flow("f", True, Source(name="cam"), Sink(name="out"))
    message = build_error(pipe)
    assert "routine 'cam' (Source): parameter 'fps' expects float >= 0.1, got 'fast' (str) (from the pipe's " \
           "params)" in message
    assert "pipe parameter 'colour' (given 'red') is declared by no routine" in message


class Steady(SourceRoutine):
    """Reads its parameter twice per call, with a pause between: both reads must agree."""
    step = Param(int, default=1, min=1)
    label = Param(str, default="a")

    def setup(self):
        self.n = 0

    def main_logic(self):
        first = self.step
        time.sleep(0.005)
        self.n += 1
        return {"n": self.n, "first": first, "second": self.step, "label": self.label}


class Picky(DestinationRoutine):
    """Refuses a threshold over 100 in params_changed; counts the changes it accepted."""
    threshold = Param(float, default=1.0)
    path = Param(str)

    def setup(self):
        self.changes = 0

    def params_changed(self, changed):
        if self.threshold > 100:
            raise ValueError("threshold over 100 would blind the detector")
        self.changes += 1

    def main_logic(self, data):
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(data, threshold=self.threshold, changes=self.changes)) + "\n")


def test_set_params_applies_between_calls_and_returns_the_values_in_force(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    pipe = make_pipe(wire_policy="block", wire_depth=8)
    source, sink = Steady(name="src"), Picky(name="sink", path=str(out))
    pipe.create_flow("a", False, source)
    pipe.create_flow("b", False, sink, restart_backoff=0.1)
    pipe.link(Wire(source=source, destinations=(sink,)))
    pipe.build()
    pipe.notify_event("start").wait(5)
    wait_for(lambda: len(read_lines(out)) > 5)
    assert pipe.set_params("src", step="7", label="b") == {"step": 7, "label": "b"}
    assert pipe.set_params("sink", threshold="2.5") == {"threshold": 2.5, "path": str(out)}
    assert pipe.status()["routines"]["src"]["params"] == {"step": 7, "label": "b"}
    wait_for(lambda: read_lines(out)[-1]["threshold"] == 2.5 and read_lines(out)[-1]["first"] == 7)
    lines = read_lines(out)
    assert all(line["first"] == line["second"] for line in lines), "a parameter changed during main_logic"
    assert {(line["first"], line["label"]) for line in lines} == {(1, "a"), (7, "b")}
    assert lines[-1]["changes"] == 1

    with pytest.raises(ParamError, match="routine 'sink' did not take parameters .*threshold over 100"):
        pipe.set_params("sink", threshold=500)
    assert pipe.status()["routines"]["sink"]["params"] == {"threshold": 2.5, "path": str(out)}
    with pytest.raises(ParamError, match="parameter 'step' expects int >= 1, got 0"):
        pipe.set_params("src", step=0)
    with pytest.raises(ParamError, match="unknown parameter 'speed'"):
        pipe.set_params("src", speed=3)
    with pytest.raises(EventError, match="there is no routine 'nobody'"):
        pipe.set_params("nobody", step=2)

    os.kill(pipe.status()["flows"]["b"]["pid"], signal.SIGKILL)  # a restarted flow keeps the values set at runtime
    wait_for(lambda: pipe.status()["flows"]["b"]["restarts"] == 1 and pipe.status()["flows"]["b"]["alive"])
    count = len(read_lines(out))
    wait_for(lambda: len(read_lines(out)) > count + 3)
    assert read_lines(out)[-1]["threshold"] == 2.5
    assert pipe.status()["routines"]["sink"]["params"] == {"threshold": 2.5, "path": str(out)}
    pipe.join(to_kill=True)
    with pytest.raises(EventError, match="the pipe is being killed or has ended"):
        pipe.set_params("src", step=2)


def test_set_params_before_build_sets_the_routine(make_pipe):
    pipe = make_pipe()
    source = Source(name="cam", path="a.mp4")
    pipe.create_flow("f", True, source, Sink(name="out"))
    assert pipe.set_params("cam", fps="12") == {"fps": 12.0, "path": "a.mp4"}
    pipe.build()
    assert source.fps == 12.0
    pipe.join(to_kill=True)


def test_values_of_other_types_reach_status_and_structure_as_text(make_pipe):
    import pathlib

    class Writer(DestinationRoutine):
        folder = Param(pathlib.Path, default="/tmp/out")

        def main_logic(self, data):
            pass

    assert Writer(folder="/data").folder == pathlib.Path("/data")
    assert Writer.folder.describe()["default"] == "/tmp/out"
    pipe = make_pipe()
    pipe.create_flow("f", True, Source(name="cam", path="x"), Writer(name="w"))
    assert pipe.status()["routines"]["w"]["params"] == {"folder": "/tmp/out"}
