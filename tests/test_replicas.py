"""Replicated flows on one host: sharing messages out, keyed routing, ordered merge, events, faults."""
import os
import signal
import time

import numpy as np
import pytest

from helpers import Counter, Recorder, read_lines, wait_for
from pipert import BuildError, MiddleRoutine, SourceRoutine, Wire, events


class Tag(MiddleRoutine):
    """Marks each message with the replica that handled it; replica 0 can be made slower."""

    def __init__(self, slow_replica_delay=0.0, name=None):
        super().__init__(name)
        self.slow_replica_delay = slow_replica_delay
        self.pings = 0

    def main_logic(self, data):
        if self.replica == 0 and self.slow_replica_delay:
            time.sleep(self.slow_replica_delay)
        out = dict(data, replica=self.replica, pid=os.getpid())
        if "frame" in data:
            out["frame"] = data["frame"] + 1
        return out

    @events("PING")
    def ping(self):
        self.pings += 1


class Cameras(SourceRoutine):
    """Messages from three cameras in turn, numbered per source."""

    def setup(self):
        self.n = 0

    def main_logic(self):
        if self.n >= 60:
            time.sleep(0.01)
            return None
        self.n += 1
        return {"n": self.n, "camera_id": "abc"[self.n % 3]}


def numbers(path):
    return [r["n"] for r in read_lines(path) if "n" in r]


def staged(make_pipe, source, middle, sink, replicas=2, into=(), out=(), restart_backoff=0.5, **pipe_args):
    """A built pipe: flow src -> flow detect (``middle`` with ``replicas``) -> flow out; ``into``/``out``
    are extra Wire arguments of the two wires."""
    pipe = make_pipe(**pipe_args)
    pipe.create_flow("src", False, source)
    pipe.create_flow("detect", False, middle, replicas=replicas, restart_backoff=restart_backoff)
    pipe.create_flow("out", False, sink)
    pipe.link(Wire(source=source, destinations=(middle,), **dict(into)),
              Wire(source=middle, destinations=(sink,), **dict(out)))
    pipe.build()
    return pipe


def test_round_robin_shares_messages_out_and_status_sums(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    source, tag, sink = Counter(limit=40, frame_shape=(300, 400, 3)), Tag(), Recorder(str(out))
    pipe = staged(make_pipe, source, tag, sink, wire_policy="block", wire_depth=4)
    assert set(pipe.status()["flows"]) == {"src", "detect/0", "detect/1", "out"}
    pipe.notify_event("start")
    wait_for(lambda: len(numbers(out)) == 40)
    lines = read_lines(out)
    assert sorted(numbers(out)) == list(range(1, 41))  # each message exactly once
    assert {r["replica"] for r in lines} == {0, 1}
    assert len({r["pid"] for r in lines}) == 2
    assert all(r["frame"]["sum"] == 300 * 400 * 3 * (r["n"] % 251 + 1) for r in lines)
    wait_for(lambda: pipe.status()["routines"][tag.name]["messages_in"] == 40)
    status = pipe.status()["routines"][tag.name]
    assert status["state"] == "running" and status["replicas"] == {"detect/0": "running", "detect/1": "running"}
    pipe.join(to_kill=True)


def test_key_sends_equal_keys_to_one_replica(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    source, tag, sink = Cameras(), Tag(), Recorder(str(out))
    pipe = staged(make_pipe, source, tag, sink, replicas=3, into={"key": "camera_id"}, wire_policy="block",
                  wire_depth=4)
    pipe.notify_event("start")
    wait_for(lambda: len(numbers(out)) == 60)
    replicas_of = {}
    for line in read_lines(out):
        replicas_of.setdefault(line["camera_id"], set()).add(line["replica"])
    assert set(replicas_of) == {"a", "b", "c"}
    assert all(len(replicas) == 1 for replicas in replicas_of.values()), replicas_of
    pipe.join(to_kill=True)


def test_key_missing_from_a_message_is_reported(make_pipe, tmp_path):
    source, tag, sink = Counter(limit=3), Tag(), Recorder(str(tmp_path / "out.jsonl"))
    pipe = staged(make_pipe, source, tag, sink, into={"key": "camera_id"})
    pipe.notify_event("start")
    wait_for(lambda: "camera_id" in (pipe.status()["routines"][source.name]["error"] or ""))
    pipe.join(to_kill=True)


def test_ordered_merge_restores_entry_order(make_pipe, tmp_path):
    ordered, unordered = tmp_path / "ordered.jsonl", tmp_path / "unordered.jsonl"
    pipe = make_pipe(wire_policy="block", wire_depth=8)
    source, tag = Counter(limit=60), Tag(slow_replica_delay=0.02)
    in_order, any_order = Recorder(str(ordered)), Recorder(str(unordered))
    pipe.create_flow("src", False, source)
    pipe.create_flow("detect", False, tag, replicas=2)
    pipe.create_flow("out", False, in_order, any_order)
    pipe.link(Wire(source=source, destinations=(tag,)),
              Wire(source=tag, destinations=(in_order,), ordered=True),
              Wire(source=tag, destinations=(any_order,)))
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: len(numbers(ordered)) == 60 and len(numbers(unordered)) == 60)
    assert numbers(ordered) == list(range(1, 61))
    assert numbers(unordered) != list(range(1, 61))  # replica 0 is slower: the plain merge reorders
    assert sorted(numbers(unordered)) == list(range(1, 61))
    assert {r["replica"] for r in read_lines(ordered)} == {0, 1}
    pipe.join(to_kill=True)


def test_events_reach_every_replica_and_are_acked_once_each(make_pipe, tmp_path):
    source, tag, sink = Counter(period=0.01), Tag(name="det"), Recorder(str(tmp_path / "out.jsonl"))
    pipe = staged(make_pipe, source, tag, sink)
    assert pipe.notify_event("start").wait(10)["pending"] == []
    result = pipe.send_event("PING", {"detect": ["det"]}).wait(10)
    assert result["handled_by"] == ["det/0", "det/1"] and not result["errors"] and not result["pending"]
    everywhere = pipe.notify_event("stop").wait(10)
    assert {"det/0", "det/1", source.name, sink.name} == set(everywhere["handled_by"])
    pipe.join(to_kill=True)


class Slow(MiddleRoutine):
    def main_logic(self, data):
        time.sleep(0.05)
        return dict(data, replica=self.replica)


def test_dead_replica_is_restarted_its_lost_messages_skipped_and_counted(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    source, slow, sink = Counter(limit=60, period=0.01), Slow(), Recorder(str(out))
    pipe = staged(make_pipe, source, slow, sink, out={"ordered": True}, restart_backoff=0.1, wire_policy="block",
                  wire_depth=4)
    pipe.notify_event("start")
    wait_for(lambda: len(numbers(out)) >= 10)
    os.kill(pipe.status()["flows"]["detect/1"]["pid"], signal.SIGKILL)
    wait_for(lambda: pipe.status()["flows"]["detect/1"]["restarts"] == 1)
    wait_for(lambda: 60 in numbers(out), timeout=20)
    got = numbers(out)
    assert got == sorted(got) and len(got) < 60  # in order; what died with the replica is skipped
    merge = lambda: [w for w in pipe.status()["wires"] if w.get("ordered")][0]  # noqa: E731
    wait_for(lambda: merge()["dropped"] == 60 - len(got))
    assert merge()["destination"] == sink.name
    pipe.join(to_kill=True)


def test_replica_names_and_counts_are_checked(make_pipe):
    pipe = make_pipe()
    with pytest.raises(ValueError, match="replicas"):
        pipe.create_flow("detect", False, Tag(), replicas=0)
    pipe.create_flow("a/b", True, Counter(), Tag(), Recorder("/dev/null"))
    with pytest.raises(BuildError, match="'/'"):
        pipe.build()


def test_frames_in_replicas_are_read_only(make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"

    class Check(MiddleRoutine):
        def main_logic(self, data):
            return {"n": data["n"], "writeable": bool(data["frame"].flags.writeable),
                    "ok": bool(np.all(data["frame"] == data["n"] % 251))}

    source, check, sink = Counter(limit=10, frame_shape=(200, 200, 3)), Check(), Recorder(str(out))
    pipe = staged(make_pipe, source, check, sink, wire_policy="block")
    pipe.notify_event("start")
    wait_for(lambda: len(numbers(out)) == 10)
    assert all(r["ok"] and not r["writeable"] for r in read_lines(out))
    pipe.join(to_kill=True)
