"""Shared-memory transport between flows: integrity, zero copy, policies, errors and clean-up."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import Counter, Recorder, read_lines, wait_for
from pipert import DestinationRoutine, SourceRoutine, Wire, shm
from pipert.transport import OOB_MIN

SHAPE = (270, 480, 3)


def stamp(n):
    """A frame whose every pixel depends on n, and its checksum."""
    frame = np.empty(SHAPE, np.uint8)
    frame[...] = (np.arange(SHAPE[1], dtype=np.uint32)[None, :, None] * 7 + n) % 256
    return frame


class Stamped(SourceRoutine):
    def __init__(self, limit, period=0.0, name=None, shared=False):
        super().__init__(name)
        self.limit = limit
        self.period = period
        self.shared = shared

    def setup(self):
        self.n = 0

    def main_logic(self):
        if self.n >= self.limit:
            time.sleep(0.01)
            return None
        if self.period:
            time.sleep(self.period)
        self.n += 1
        frame = stamp(self.n)
        if self.shared:
            frame, private = self.shared_array(SHAPE), frame
            frame[...] = private
        return {"n": self.n, "frame": frame, "sum": int(frame.sum(dtype=np.uint64))}


class Verifier(DestinationRoutine):
    """Checks every frame, holds the last ``hold`` ones and re-checks them on every message."""

    def __init__(self, path, hold=0, delay=0.0, name=None):
        super().__init__(name)
        self.path = path
        self.hold = hold
        self.delay = delay

    def setup(self):
        self.held = []
        self.seen = []
        self.bad = 0
        self.readonly = True

    def main_logic(self, data):
        frame = data["frame"]
        self.readonly &= not frame.flags.writeable
        self.bad += int(frame.sum(dtype=np.uint64)) != data["sum"] or not np.array_equal(frame[0, :4, 0],
                                                                                        stamp(data["n"])[0, :4, 0])
        if self.hold:
            self.held.append((data["sum"], frame))
            self.held = self.held[-self.hold:]
            self.bad += sum(int(f.sum(dtype=np.uint64)) != s for s, f in self.held)
        self.seen.append(data["n"])
        if self.delay:
            time.sleep(self.delay)
        self._dump()

    def _dump(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump({"seen": self.seen, "bad": self.bad, "readonly": self.readonly}, f)
        os.replace(self.path + ".tmp", self.path)


def result(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"seen": [], "bad": 0}


def two_flows(make_pipe, source, sinks, **wire):
    pipe = make_pipe()
    pipe.create_flow("producer", False, source)
    for i, sink in enumerate(sinks):
        pipe.create_flow(f"consumer{i}", False, sink)
    pipe.link(Wire(source=source, destinations=tuple(sinks), **wire))
    pipe.build()
    return pipe


@pytest.mark.parametrize("shared", [False, True], ids=["copied-in", "shared_array"])
def test_thousands_of_frames_arrive_intact_and_read_only_even_when_held(make_pipe, tmp_path, shared):
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    sinks = [Verifier(paths[0], hold=5), Verifier(paths[1], hold=0)]
    pipe = two_flows(make_pipe, Stamped(2000, shared=shared), sinks, policy="block", depth=4)
    pipe.notify_event("start")
    for path in paths:
        wait_for(lambda: len(result(path)["seen"]) == 2000, timeout=60)
        outcome = result(path)
        assert outcome["seen"] == list(range(1, 2001)) and outcome["bad"] == 0 and outcome["readonly"]
    pipe.join(to_kill=True)


def test_latest_policy_drops_oldest_and_counts(make_pipe, tmp_path):
    path = str(tmp_path / "slow")
    pipe = two_flows(make_pipe, Stamped(300, period=0.001), [Verifier(path, hold=2, delay=0.02)],
                     policy="latest", depth=1)
    pipe.notify_event("start")
    wait_for(lambda: pipe.status()["wires"][0]["dropped"] > 50, timeout=30)
    wait_for(lambda: result(path)["seen"][-1:] == [300], timeout=30)
    outcome = result(path)
    assert outcome["bad"] == 0
    seen = outcome["seen"]
    assert seen == sorted(seen) and len(seen) < 300 and seen[-1] == 300
    assert pipe.status()["wires"][0]["dropped"] == 300 - len(seen)
    pipe.join(to_kill=True)


def test_block_policy_loses_nothing_with_a_slow_consumer(make_pipe, tmp_path):
    path = str(tmp_path / "slow")
    pipe = two_flows(make_pipe, Stamped(150), [Verifier(path, delay=0.005)], policy="block", depth=2)
    pipe.notify_event("start")
    wait_for(lambda: len(result(path)["seen"]) == 150, timeout=30)
    assert result(path)["seen"] == list(range(1, 151))
    assert pipe.status()["wires"][0]["dropped"] == 0
    pipe.join(to_kill=True)


class Scribble(DestinationRoutine):
    """Asks for writable input and overwrites it."""

    writable_input = True

    def main_logic(self, data):
        data["frame"][...] = 0
        data["n"] = -1


def test_fan_out_is_isolated_between_receivers(make_pipe, tmp_path):
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    source = Stamped(200)
    near_scribbler, far_scribbler = Scribble(name="near-scribbler"), Scribble(name="far-scribbler")
    near, far = Verifier(paths[0], name="near"), Verifier(paths[1], name="far")
    pipe = make_pipe()
    pipe.create_flow("producer", False, source, near_scribbler, near)
    pipe.create_flow("consumer", False, far_scribbler, far)
    pipe.link(Wire(source=source, destinations=(near_scribbler, near, far_scribbler, far), policy="block", depth=2))
    pipe.build()
    pipe.notify_event("start")
    for path in paths:
        wait_for(lambda: len(result(path)["seen"]) == 200, timeout=30)
        assert result(path)["bad"] == 0 and result(path)["seen"] == list(range(1, 201))
    pipe.join(to_kill=True)


class Hoarder(DestinationRoutine):
    """Keeps every frame it gets, so the pool runs out."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def setup(self):
        self.frames = []

    def main_logic(self, data):
        self.frames.append(data["frame"])
        with open(self.path, "a") as f:
            f.write(f"{data['n']}\n")


def _hoarded(path):
    return [int(x) for x in open(path).read().split()] if os.path.exists(path) else []


def test_exhausted_pool_drops_under_latest(make_pipe, tmp_path):
    path = str(tmp_path / "hoard")
    pipe = two_flows(make_pipe, Stamped(100, period=0.002), [Hoarder(path)], policy="latest", depth=1)
    pipe.notify_event("start")
    wait_for(lambda: pipe.status()["wires"][0]["dropped"] > 10, timeout=20)
    assert len(_hoarded(path)) <= 2 * 1 + 4
    pipe.join(to_kill=True)


def test_exhausted_pool_waits_under_block(make_pipe, tmp_path):
    path = str(tmp_path / "hoard")
    pipe = two_flows(make_pipe, Stamped(100), [Hoarder(path)], policy="block", depth=1)
    pipe.notify_event("start")
    wait_for(lambda: len(_hoarded(path)) == 6, timeout=20)
    time.sleep(0.5)
    assert len(_hoarded(path)) == 6 and pipe.status()["wires"][0]["dropped"] == 0
    assert pipe.status()["routines"][pipe.flows["producer"].routines[0].name]["state"] == "running"
    pipe.join(to_kill=True)


class Oversized(SourceRoutine):
    def main_logic(self):
        time.sleep(0.01)
        return {"blob": "x" * (2 << 20)}


class Unpicklable(SourceRoutine):
    def main_logic(self):
        time.sleep(0.01)
        return {"lock": __import__("threading").Lock()}


@pytest.mark.parametrize("source, expected", [
    (Oversized(name="oversized"), "larger than the wire's ring"),
    (Unpicklable(name="unpicklable"), "routine 'unpicklable' returned a dict that cannot be sent"),
])
def test_transport_errors_are_clear_and_do_not_hang(make_pipe, tmp_path, source, expected):
    pipe = make_pipe(ring_capacity=1 << 20)
    sink = Recorder(str(tmp_path / "sink"))
    pipe.create_flow("a", False, source)
    pipe.create_flow("b", False, sink)
    pipe.link(Wire(source=source, destinations=(sink,)))
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: expected in (pipe.status()["routines"][source.name]["error"] or ""))
    assert any(expected in r.getMessage() for r in pipe.captured.records)
    pipe.join(to_kill=True)


def test_small_messages_inline_and_large_arrays_through_the_pool():
    from pipert.transport import Pool, decode, encode
    pool = Pool("feedbeef", "t", slots=2, receivers=1)
    held = []
    try:
        small = encode({"a": np.zeros(10)}, 1234.5, pool, True, lambda: False, "r")
        stamp, message = decode(small, pool, 0, held)
        assert stamp == 1234.5 and message["a"].flags.writeable and not held
        big = encode({"a": np.ones(OOB_MIN, np.uint8)}, 1234.75, pool, True, lambda: False, "r")
        assert len(big) < 1024
        stamp, message = decode(big, pool, 0, held)
        assert stamp == 1234.75
        array = message["a"]
        del message
        assert not array.flags.writeable and array.sum() == OOB_MIN
        with pytest.raises(ValueError):
            array[0] = 5
        view = array[10:20]
        del array
        pool.sweep(held, 0)
        assert pool._find_free() == 1 and not pool._released_by_all(0), "released while viewed"
        del view
        pool.sweep(held, 0)
        assert pool._released_by_all(0) and pool._released_by_all(1) and not held
    finally:
        shm.unlink_owned("feedbeef")


def test_shared_array_is_sent_in_place_and_reused_only_when_released():
    from pipert.transport import Pool, WireSender, decode, encode
    pool = Pool("feedbee2", "t", slots=3, receivers=1)
    held = []
    try:
        sender = WireSender("r", False, [], [], pool)
        frame = sender.allocate((512, 512), np.uint8, lambda: False)
        frame[...] = 7
        record = encode({"f": frame, "part": frame[100:300]}, 0.0, pool, False, lambda: False, "r")
        assert pool._producer_uses(0)
        assert len(pool._segments) == 2, "the frame is sent in place; only its slice (a second use) is copied"
        received = decode(record, pool, 0, held)[1]
        assert received["f"].sum() == 7 * 512 * 512 and not received["f"].flags.writeable
        assert received["part"].shape == (200, 512) and received["part"].sum() == 7 * 200 * 512
        del frame
        assert not pool._producer_uses(0) and not pool._released_by_all(0), "the receiver still holds slot 0"
        del received
        pool.sweep(held, 0)
        assert pool._released_by_all(0) and pool._released_by_all(1)
    finally:
        shm.unlink_owned("feedbee2")


def test_idle_pipeline_of_four_flows_uses_almost_no_cpu(make_pipe, tmp_path):
    pipe = make_pipe()
    sources = [Counter(limit=0, name=f"s{i}") for i in range(2)]
    sinks = [Recorder(str(tmp_path / f"r{i}"), name=f"r{i}") for i in range(2)]
    for i in range(2):
        pipe.create_flow(f"src{i}", False, sources[i])
        pipe.create_flow(f"dst{i}", False, sinks[i])
        pipe.link(Wire(source=sources[i], destinations=(sinks[i],)))
    pipe.build()
    pipids = [s.pid for s in pipe._states.values()]

    def cpu_ticks():
        total = 0
        for pid in pipids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().split(")")[-1].split()
            total += int(fields[11]) + int(fields[12])
        return total

    before, started = cpu_ticks(), time.monotonic()
    time.sleep(2.0)
    used = (cpu_ticks() - before) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - started)
    assert used < 0.01, f"idle flows used {used:.1%} of a core"
    pipe.join(to_kill=True)


def test_a_new_daemon_sweeps_what_a_dead_one_left(make_pipe, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    name = shm.name("0badcafe", pid, "ring0_0")
    shm.create_segment(name, 4096).close()
    shm.create_semaphore(shm.name("0badcafe", pid, "bell0"), 0).close()
    assert len([e for e in shm.leftovers() if "0badcafe" in e]) == 2
    pipe = make_pipe()
    pipe.create_flow("f", True, Counter(limit=0), Recorder(str(tmp_path / "x")))
    pipe.build()
    assert not [e for e in shm.leftovers() if "0badcafe" in e]
    pipe.join(to_kill=True)


def test_shared_memory_of_a_dead_flow_is_reclaimed(make_pipe, tmp_path):
    path = str(tmp_path / "v")
    pipe = two_flows(make_pipe, Stamped(100000, period=0.005), [Verifier(path)], policy="latest")
    pipe.notify_event("start")
    wait_for(lambda: len(result(path)["seen"]) > 3)
    producer = pipe._states["producer"].pid
    assert [e for e in shm.leftovers() if f"_{pipe.id}_{producer}_" in e]
    os.kill(producer, 9)
    wait_for(lambda: not pipe.status()["flows"]["producer"]["alive"])
    assert not [e for e in shm.leftovers() if f"_{pipe.id}_{producer}_" in e]
    pipe.join(to_kill=True)


def _refuse_to_load():
    raise RuntimeError("cannot be rebuilt here")


class Unloadable:
    """Pickles fine, fails to unpickle: the receiving routine must skip it and go on."""

    def __reduce__(self):
        return _refuse_to_load, ()


class SometimesUnloadable(SourceRoutine):
    def setup(self):
        self.n = 0

    def main_logic(self):
        time.sleep(0.005)
        self.n += 1
        return {"n": self.n, "odd": Unloadable() if self.n % 2 else None}


def test_a_message_that_cannot_be_read_is_logged_and_skipped(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    source, sink = SometimesUnloadable(), Recorder(str(out))
    pipe = make_pipe()
    pipe.create_flow("a", False, source)
    pipe.create_flow("b", False, sink)
    pipe.link(Wire(source=source, destinations=(sink,), policy="block", depth=4))
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: len([r for r in read_lines(str(out)) if "n" in r]) >= 5)
    assert all(r["n"] % 2 == 0 for r in read_lines(str(out)) if "n" in r)
    wait_for(lambda: any("could not read a message" in r.getMessage() and "cannot be rebuilt here" in (r.exc_text or "")
                         for r in pipe.captured.records))
    assert pipe.status()["routines"][sink.name]["state"] == "running"
    pipe.join(to_kill=True)
