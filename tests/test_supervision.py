"""Fault injection with real processes: dead flows, stuck routines, a dead daemon, leaks."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import Counter, Recorder, living, read_lines, wait_for
from pipert import DestinationRoutine, SourceRoutine, Wire, shm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count(path):
    return len([r for r in read_lines(path) if "n" in r])


def chain(make_pipe, tmp_path, sink_restart="on-failure", policy="latest", source=None, sink=None):
    out = str(tmp_path / "out.jsonl")
    pipe = make_pipe(kill_grace=2.0)
    source = source or Counter(period=0.002)
    sink = sink or Recorder(out)
    pipe.create_flow("producer", False, source)
    pipe.create_flow("consumer", False, sink, restart=sink_restart, restart_backoff=0.1)
    pipe.link(Wire(source=source, destinations=(sink,), policy=policy, depth=2))
    pipe.build()
    pipe.notify_event("start")
    return pipe, out


@pytest.mark.parametrize("policy", ["on-failure", "always"])
def test_killed_flow_is_restarted_and_runs_again(make_pipe, tmp_path, policy):
    pipe, out = chain(make_pipe, tmp_path, policy)
    wait_for(lambda: count(out) > 10)
    old_pid = pipe.status()["flows"]["consumer"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: pipe.status()["flows"]["consumer"]["last_exit"] is not None, timeout=1.0)
    assert "signal 9" in pipe.status()["flows"]["consumer"]["last_exit"]["how"]
    wait_for(lambda: pipe.status()["flows"]["consumer"]["restarts"] == 1)
    flow = pipe.status()["flows"]["consumer"]
    assert flow["alive"] and flow["pid"] != old_pid
    before = count(out)
    wait_for(lambda: count(out) > before + 10)
    assert pipe.status()["flows"]["producer"]["restarts"] == 0
    assert any("consumer" in m and "signal 9" in m for m in pipe.captured.messages())
    pipe.join(to_kill=True)


def test_never_policy_leaves_the_flow_dead_and_the_producer_running(make_pipe, tmp_path):
    pipe, out = chain(make_pipe, tmp_path, "never", policy="block")
    wait_for(lambda: count(out) > 10)
    os.kill(pipe.status()["flows"]["consumer"]["pid"], signal.SIGKILL)
    wait_for(lambda: not pipe.status()["flows"]["consumer"]["alive"])
    time.sleep(0.5)
    assert pipe.status()["flows"]["consumer"]["restarts"] == 0
    producer = pipe.flows["producer"].routines[0].name
    produced = pipe.status()["routines"][producer]["messages_out"]
    wait_for(lambda: pipe.status()["wires"][0]["dropped"] > 20)  # block fails over to dropping
    wait_for(lambda: pipe.status()["routines"][producer]["messages_out"] > produced + 20)
    pipe.join(to_kill=True)


class Exiter(DestinationRoutine):
    """Ends its own process with ``code`` on the 5th message of its first life."""

    def __init__(self, path, code):
        super().__init__()
        self.path = path
        self.code = code

    def setup(self):
        self.n = 0

    def main_logic(self, data):
        self.n += 1
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        if self.n == 5 and len(set(open(self.path).read().split())) == 1:
            os._exit(self.code)


def lives(path):
    return len(set(open(path).read().split())) if os.path.exists(path) else 0


@pytest.mark.parametrize("restart, code, restarted", [("on-failure", 3, True), ("on-failure", 0, False),
                                                      ("always", 0, True), ("never", 3, False)])
def test_os_exit_inside_a_routine_follows_the_policy(make_pipe, tmp_path, restart, code, restarted):
    path = str(tmp_path / "pids")
    pipe, _ = chain(make_pipe, tmp_path, restart, sink=Exiter(path, code))
    wait_for(lambda: pipe.status()["flows"]["consumer"]["exit_code"] == code)
    assert pipe.status()["flows"]["consumer"]["last_exit"]["how"] == f"exit code {code}"
    if restarted:
        wait_for(lambda: lives(path) == 2)
        assert pipe.status()["flows"]["consumer"]["restarts"] == 1
    else:
        time.sleep(0.5)
        assert lives(path) == 1 and not pipe.status()["flows"]["consumer"]["alive"]
    pipe.join(to_kill=True)


def test_restart_budget_is_bounded(make_pipe, tmp_path):
    pipe, out = chain(make_pipe, tmp_path)
    pipe.flows["consumer"].max_restarts = 2
    for expected in (1, 2):
        wait_for(lambda: pipe.status()["flows"]["consumer"]["alive"])
        os.kill(pipe.status()["flows"]["consumer"]["pid"], signal.SIGKILL)
        wait_for(lambda: pipe.status()["flows"]["consumer"]["restarts"] == expected)
    wait_for(lambda: pipe.status()["flows"]["consumer"]["alive"])
    os.kill(pipe.status()["flows"]["consumer"]["pid"], signal.SIGKILL)
    wait_for(lambda: any("not restarting it again" in m for m in pipe.captured.messages()))
    assert not pipe.status()["flows"]["consumer"]["alive"]
    pipe.join(to_kill=True)


class Stuck(SourceRoutine):
    def main_logic(self):
        while True:
            time.sleep(1)


def test_a_stuck_routine_does_not_stop_kill(make_pipe, tmp_path):
    pipe, _ = chain(make_pipe, tmp_path, source=Stuck())
    time.sleep(0.2)
    started = time.monotonic()
    pipe.join(to_kill=True)
    assert time.monotonic() - started < 2.0 + 2.0
    assert pipe.status()["flows"]["producer"]["exit_code"] == -signal.SIGKILL
    assert any("did not finish" in m for m in pipe.captured.messages())


class Frames(SourceRoutine):
    def setup(self):
        self.n = 0

    def main_logic(self):
        self.n += 1
        return {"n": self.n, "frame": np.full((240, 320, 3), self.n % 256, np.uint8)}


class Hoarder(DestinationRoutine):
    def setup(self):
        self.kept = []

    def main_logic(self, data):
        self.kept.append(data["frame"])


def test_consumer_killed_while_holding_frames_leaks_no_slot(make_pipe, tmp_path):
    pipe, _ = chain(make_pipe, tmp_path, "never", policy="block", source=Frames(), sink=Hoarder())
    producer = pipe.flows["producer"].routines[0].name
    wait_for(lambda: pipe.status()["routines"][producer]["messages_out"] >= 6)
    time.sleep(0.3)
    stalled = pipe.status()["routines"][producer]["messages_out"]
    assert stalled < 2 * 2 + 4 + 2 + 1  # the hoarder holds every slot: the block producer waits
    os.kill(pipe.status()["flows"]["consumer"]["pid"], signal.SIGKILL)
    wait_for(lambda: pipe.status()["routines"][producer]["messages_out"] > stalled + 100)
    pipe.join(to_kill=True)


DAEMON = """
import time
from pipert import Pipe, SourceRoutine, DestinationRoutine, Wire
import numpy as np
class Gen(SourceRoutine):
    def main_logic(self):
        time.sleep(0.005)
        return {"frame": np.zeros((240, 320, 3), np.uint8)}
class Sink(DestinationRoutine):
    def main_logic(self, data):
        pass
pipe = Pipe()
gen, sink = Gen(), Sink()
pipe.create_flow("a", False, gen)
pipe.create_flow("b", False, sink)
pipe.link(Wire(source=gen, destinations=(sink,)))
pipe.build()
pipe.notify_event("start")
print(pipe.id, pipe._zygote.pid, *[s.pid for s in pipe._states.values()], flush=True)
time.sleep(60)
"""


def test_flows_exit_and_memory_is_freed_when_the_daemon_is_sigkilled(tmp_path):
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        words = proc.stdout.readline().split()
        pipe_id, pids = words[0], [int(p) for p in words[1:]]
        time.sleep(0.5)
        assert [e for e in shm.leftovers() if f"_{pipe_id}_" in e]
        proc.kill()
        proc.wait()
        wait_for(lambda: not living(pids), timeout=8)
        wait_for(lambda: not [e for e in shm.leftovers() if f"_{pipe_id}_" in e], timeout=3)
    finally:
        proc.kill()
        proc.wait()


def test_twenty_pipes_in_a_row_leave_nothing_behind(make_pipe, tmp_path):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    def children():
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return f.read().split()

    baseline_fds, baseline_children = fds(), children()
    for i in range(20):
        pipe = make_pipe()
        source, sink = Frames(), Hoarder()
        pipe.create_flow("a", False, source)
        pipe.create_flow("b", False, sink)
        pipe.link(Wire(source=source, destinations=(sink,)))
        pipe.build()
        pipe.notify_event("start")
        time.sleep(0.05)
        pipe.join(to_kill=True)
        assert not [e for e in shm.leftovers() if f"_{pipe.id}_" in e]
    assert children() == baseline_children
    assert fds() <= baseline_fds + 2
