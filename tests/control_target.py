"""Pipes for tests/test_control.py, run as ``pipert run tests/control_target.py:make_pipe``.

Flow ``f1`` holds ``ticker`` (a source) and ``relay``; flow ``f2`` holds ``sink``;
``relay`` feeds ``sink`` across the two processes. Handlers append one JSON
line per call to the file named by ``$CONTROL_TARGET_LOG``, so a test sees
which routine got which parameters.
"""
import json
import os
import time

from pipert import DestinationRoutine, MiddleRoutine, Pipe, SourceRoutine, Wire, events


def _record(routine, event, **params):
    with open(os.environ["CONTROL_TARGET_LOG"], "a") as log:
        log.write(json.dumps({"routine": routine.name, "event": event, **params}) + "\n")


class Ticker(SourceRoutine):
    def setup(self):
        self.n = 0

    def main_logic(self):
        time.sleep(0.01)
        self.n += 1
        return {"n": self.n}

    @events("PING")
    def ping(self, value=None):
        _record(self, "PING", value=value)

    @events("SLOW")
    def slow(self, seconds):
        time.sleep(seconds)
        _record(self, "SLOW", seconds=seconds)

    @events("FAIL")
    def fail(self):
        raise RuntimeError("asked to fail")


class Relay(MiddleRoutine):
    def main_logic(self, data):
        return data

    @events("PING")
    def ping(self, value=None):
        _record(self, "PING", value=value)


class Sink(DestinationRoutine):
    def main_logic(self, data):
        pass

    @events("RESET")
    def reset(self):
        _record(self, "RESET")


def make_pipe():
    """The unbuilt pipe: ticker -> relay in f1, relay -> sink across to f2."""
    pipe = Pipe()
    ticker, relay, sink = Ticker(name="ticker"), Relay(name="relay"), Sink(name="sink")
    pipe.create_flow("f1", True, ticker, relay)
    pipe.create_flow("f2", False, sink)
    pipe.link(Wire(source=relay, destinations=(sink,)))
    return pipe


def make_built_pipe():
    """The same pipe, built by the factory itself."""
    pipe = make_pipe()
    pipe.build()
    return pipe
