"""Typed routine parameters: conversion, bounds, errors, cascading, and build refusing bad values."""
import pytest

from helpers import Recorder
from pipert import BuildError, DestinationRoutine, MiddleRoutine, Param, ParamError, SourceRoutine
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
