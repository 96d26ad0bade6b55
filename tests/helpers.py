"""Routines, waits and process helpers shared by the tests; results cross processes through files."""
import json
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np

from pipert import DestinationRoutine, MiddleRoutine, SourceRoutine, events


def wait_for(predicate, timeout=10.0, interval=0.02):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def within(call, timeout, what):
    """``call()``'s result, run in a thread, so that a call that blocks in C code for good (a read
    from a child that neither writes nor exits, a Ray GCS query) fails the test after ``timeout``
    s: with Ray's threads in the test process, pytest-timeout's SIGALRM may not interrupt it."""
    results = queue.Queue()
    threading.Thread(target=lambda: results.put(call()), daemon=True).start()
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"{what} did not answer within {timeout} s") from None


def read_line(stream, timeout=60.0):
    """The next line of a child's ``stream``, failing the test after ``timeout`` s."""
    return within(stream.readline, timeout, "the child's output")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra):
    """The environment without the machine's pipert settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPERT_") and k != "SOCKET_LOGGER_URL"}
    env.update(extra)
    return env


def pipert_command():
    """The console script next to this Python, else ``python -m pipert``."""
    script = shutil.which("pipert", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "pipert"]


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def descendants(root):
    """Pids of every live process below ``root``."""
    children = {}
    for entry in os.listdir("/proc"):
        fields = _state(entry) if entry.isdigit() else None
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def living(pids):
    """The pids of ``pids`` that are alive (zombies count as gone)."""
    return [pid for pid in pids if (_state(pid) or ["Z"])[0] != "Z"]


def kill_survivors(pids, timeout=10.0):
    """Wait up to ``timeout`` s for ``pids`` to end; SIGKILL those still alive and return them."""
    try:
        wait_for(lambda: not living(pids), timeout=timeout)
        return []
    except AssertionError:
        survivors = living(pids)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        return survivors


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


class Counter(SourceRoutine):
    """Emits {"n": 1, 2, ...}, optionally with a numpy frame, at most ``limit`` times."""

    def __init__(self, limit=None, frame_shape=None, period=0.0, name=None):
        super().__init__(name)
        self.limit = limit
        self.frame_shape = frame_shape
        self.period = period

    def setup(self):
        self.n = 0

    def main_logic(self):
        if self.limit is not None and self.n >= self.limit:
            time.sleep(0.01)
            return None
        if self.period:
            time.sleep(self.period)
        self.n += 1
        message = {"n": self.n, "source": self.name}
        if self.frame_shape is not None:
            frame = np.full(self.frame_shape, self.n % 251, dtype=np.uint8)
            message["frame"] = frame
        return message


class AddOne(MiddleRoutine):
    def main_logic(self, data):
        return dict(data, n=data["n"] + 1, via=self.name)


class Recorder(DestinationRoutine):
    """Appends one JSON line per message (numpy arrays summarised) to ``path``."""

    def __init__(self, path, name=None):
        super().__init__(name)
        self.path = path

    def setup(self):
        self.file = open(self.path, "a", buffering=1)

    def main_logic(self, data):
        record = {"routine": self.name}
        for key, value in data.items():
            if isinstance(value, np.ndarray):
                record[key] = {"shape": list(value.shape), "sum": int(value.sum()),
                               "writeable": bool(value.flags.writeable)}
            else:
                record[key] = value
        self.file.write(json.dumps(record, default=str) + "\n")

    def cleanup(self):
        self.file.write(json.dumps({"routine": self.name, "cleanup": True}) + "\n")
        self.file.close()


class EventLog(SourceRoutine):
    """A slow source whose handlers append what they received to ``path``."""

    def __init__(self, path, name=None):
        super().__init__(name)
        self.path = path

    def main_logic(self):
        time.sleep(0.01)
        return {"n": 0}

    def _write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record, routine=self.name)) + "\n")

    @events("PING")
    def ping(self, value=None):
        self._write(event="PING", value=value)

    @events("FORWARD")
    def forward(self, target_flow, target_routine):
        self.notify_event("PING", {target_flow: [target_routine]}, value=f"from {self.name}")
