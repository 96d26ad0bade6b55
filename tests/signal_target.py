"""Pipes for tests/test_signals.py, run as ``pipert run tests/signal_target.py:FACTORY``.

Three flows in a row, ``gen`` (a) -> ``mid`` (b) -> ``slow`` (c), linked by ``block`` wires
whose destination is slow, so messages wait in them. Every routine appends a line to
``$SIGNAL_TARGET_LOG`` when its cleanup runs (with ``$SIGNAL_TARGET_CLEANUP`` seconds of
work first), so a test sees whose cleanup ran.
"""
import json
import os
import time

from pipert import DestinationRoutine, MiddleRoutine, Pipe, SourceRoutine, Wire


class _Logged:
    def cleanup(self):
        time.sleep(float(os.environ.get("SIGNAL_TARGET_CLEANUP", "0")))
        with open(os.environ["SIGNAL_TARGET_LOG"], "a") as log:
            log.write(json.dumps({"cleanup": self.name, "pid": os.getpid()}) + "\n")


class Gen(_Logged, SourceRoutine):
    def setup(self):
        self.n = 0

    def main_logic(self):
        self.n += 1
        return {"n": self.n}


class Mid(_Logged, MiddleRoutine):
    def main_logic(self, data):
        return data


class Slow(_Logged, DestinationRoutine):
    def main_logic(self, data):
        time.sleep(0.02)


def _pipe(kill_grace, slow_restart="on-failure"):
    pipe = Pipe(wire_policy="block", wire_depth=16, kill_grace=kill_grace)
    gen, mid, slow = Gen(name="gen"), Mid(name="mid"), Slow(name="slow")
    pipe.create_flow("a", False, gen, restart_backoff=0.1)
    pipe.create_flow("b", False, mid, restart_backoff=0.1)
    pipe.create_flow("c", False, slow, restart=slow_restart, restart_backoff=0.1)
    pipe.link(Wire(source=gen, destinations=(mid,)), Wire(source=mid, destinations=(slow,)))
    return pipe


def make_pipe():
    """The chain, with the default 5 s for cleanups at kill."""
    return _pipe(5.0)


def make_patient_pipe():
    """The chain with 60 s for cleanups: only a second signal ends slow cleanups quickly."""
    return _pipe(60.0)


def make_pipe_c_never():
    """The chain whose flow c is never restarted."""
    return _pipe(5.0, slow_restart="never")
