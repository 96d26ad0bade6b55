"""The lock-free 'latest' ring: overruns, drop counts, pool slots of overwritten records, dead flows."""
import json
import os
import signal

import numpy as np
import pytest

from helpers import wait_for
from pipert import DestinationRoutine, SourceRoutine, Wire, shm
from pipert.transport import LatestRing, Pool, RemoteTarget, RingReader, WireSender, EMPTY

NEVER = lambda: False  # noqa: E731
SHAPE = (256, 256, 3)


@pytest.fixture
def wire():
    """A latest ring of depth 1 (or ``depth``) with a pool of ``slots``, its sender and reader."""
    made = []

    def make(depth=1, slots=4, capacity=1 << 16):
        tag = f"{len(made)}"
        pipe_id = "1a7e5700"
        ring = LatestRing.create(pipe_id, tag, capacity, depth)
        pool = Pool(pipe_id, tag, slots, 1)
        bell = shm.create_semaphore(shm.name(pipe_id, os.getpid(), f"bell{tag}"), 0)
        sender = WireSender("src", False, [], [RemoteTarget(ring, bell, 0, pool)], pool)
        made.append(bell)
        return ring, pool, sender, RingReader(ring, pool, 0)

    yield make
    for bell in made:
        bell.close()
    shm.unlink_owned("1a7e5700")


def drain(reader):
    got = []
    while (message := reader.poll()) is not EMPTY:
        got.append(message[1])
    return got


def test_a_slow_consumer_gets_the_newest_and_every_overwritten_message_is_counted(wire):
    ring, _, sender, reader = wire(depth=1)
    for n in range(5):
        sender.send({"n": n}, 0.0, NEVER)
    assert ring.stats() == (1, 4)
    assert drain(reader) == [{"n": 4}]
    assert ring.stats() == (0, 4)
    sender.send({"n": 5}, 0.0, NEVER)
    assert drain(reader) == [{"n": 5}] and ring.stats() == (0, 4)


def test_depth_keeps_the_newest_in_order(wire):
    ring, _, sender, reader = wire(depth=3)
    for n in range(10):
        sender.send({"n": n}, 0.0, NEVER)
    assert [m["n"] for m in drain(reader)] == [7, 8, 9]
    assert ring.stats() == (0, 7)


def test_records_overwritten_in_the_byte_ring_are_skipped_never_torn(wire):
    ring, _, sender, reader = wire(depth=4, capacity=4096)
    for n in range(6):
        sender.send({"n": n, "blob": bytes([n]) * 1500}, 0.0, NEVER)  # only 2 fit in 4 KiB
    got = drain(reader)
    assert [m["n"] for m in got] == [4, 5]
    assert all(m["blob"] == bytes([m["n"]]) * 1500 for m in got)
    assert ring.stats() == (0, 4)


def test_slots_of_overwritten_frames_are_reclaimed_so_the_pool_never_runs_dry(wire):
    ring, pool, sender, reader = wire(depth=1, slots=3)
    for n in range(50):
        frame = sender.allocate(SHAPE, np.uint8, NEVER)
        assert frame is not None, f"the pool ran dry at frame {n}"
        frame[...] = n
        sender.send({"n": n, "frame": frame}, 0.0, NEVER)
        del frame
    (message,) = drain(reader)
    assert message["n"] == 49 and (message["frame"] == 49).all() and not message["frame"].flags.writeable
    assert ring.stats() == (0, 49)
    del message
    reader.poll()  # the consumer releases what it no longer holds at its next poll
    assert all(pool._released_by_all(slot) for slot in range(3))


def test_a_claim_that_loses_to_the_producer_is_dropped_and_its_slot_still_freed(wire):
    ring, pool, sender, reader = wire(depth=1, slots=3)
    sender.send({"frame": np.ones(SHAPE, np.uint8)}, 0.0, NEVER)
    ring._reclaim.value = 1  # the producer moved the window on while the consumer was reading
    assert reader.poll() is EMPTY and ring.stats() == (0, 1)
    ring._reclaim.value = 0
    sender.send({"frame": np.full(SHAPE, 2, np.uint8)}, 0.0, NEVER)  # resolves record 0: claimed, lost
    assert (drain(reader)[0]["frame"] == 2).all()
    reader.poll()
    assert all(pool._released_by_all(slot) for slot in range(3)), "no slot may stay held"


def test_a_dead_consumers_slots_are_released_but_the_waiting_frame_is_kept(wire):
    ring, pool, sender, reader = wire(depth=1, slots=4)
    sender.send({"frame": np.full(SHAPE, 1, np.uint8)}, 0.0, NEVER)
    held = drain(reader)  # the consumer holds frame 1, then dies
    sender.send({"frame": np.full(SHAPE, 2, np.uint8)}, 0.0, NEVER)
    kept = ring.recover(True)
    pool.release_all(0, kept)
    assert len(kept) == 1
    busy = [slot for slot in range(4) if not pool._released_by_all(slot)]
    assert len(busy) == 1, "only the waiting frame's slot stays held, for the restarted consumer"
    ring.consumer_back()
    assert (drain(RingReader(ring, pool, 0))[0]["frame"] == 2).all()
    del held


class Frames(SourceRoutine):
    def setup(self):
        self.n = 0

    def main_logic(self):
        self.n += 1
        frame = self.shared_array((120, 160, 3))
        frame[...] = self.n % 256
        return {"n": self.n, "frame": frame, "pid": os.getpid()}


class Check(DestinationRoutine):
    def __init__(self, path):
        super().__init__("check")
        self.path = path

    def setup(self):
        self.seen, self.bad, self.pids = 0, 0, set()

    def main_logic(self, data):
        self.seen += 1
        self.bad += int(not (data["frame"] == data["n"] % 256).all())
        self.pids.add(data["pid"])
        with open(self.path + ".tmp", "w") as handle:
            json.dump({"seen": self.seen, "bad": self.bad, "pids": sorted(self.pids), "me": os.getpid()}, handle)
        os.replace(self.path + ".tmp", self.path)


def _report(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {"seen": 0, "bad": 0, "pids": [], "me": None}


@pytest.mark.parametrize("victim", ["producer", "consumer"])
def test_latest_wire_recovers_when_either_flow_is_killed(make_pipe, tmp_path, victim):
    path = str(tmp_path / "check.json")
    pipe = make_pipe(kill_grace=2.0)
    source, sink = Frames(), Check(path)
    pipe.create_flow("producer", False, source, restart_backoff=0.1)
    pipe.create_flow("consumer", False, sink, restart_backoff=0.1)
    pipe.link(Wire(source=source, destinations=(sink,)))  # the default: latest, depth 1
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: _report(path)["seen"] > 20)
    os.kill(pipe.status()["flows"][victim]["pid"], signal.SIGKILL)
    wait_for(lambda: pipe.status()["flows"][victim]["restarts"] == 1)
    if victim == "producer":
        wait_for(lambda: len(_report(path)["pids"]) == 2)
    else:
        wait_for(lambda: _report(path)["me"] == pipe.status()["flows"]["consumer"]["pid"])
    seen = _report(path)["seen"]
    wait_for(lambda: _report(path)["seen"] > seen + 50)
    assert _report(path)["bad"] == 0
    assert pipe.status()["wires"][0]["dropped"] > 0  # a fast producer on a latest wire overwrites
    pipe.join(to_kill=True)
