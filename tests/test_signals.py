"""Stop signals the way service managers send them: to every process of the group at once (systemd's
KillMode=control-group, `timeout`, `kill -- -PGID`, Ctrl-C), to the flows alone, to the zygote alone,
twice; SIGKILL of the group; and systemd's notification socket.

The daemon is `pipert run tests/signal_target.py:...` in a session of its own, so its process group
holds exactly the daemon, the zygote and the three flows. Every test checks that nothing outlives it
(processes, /dev/shm), also when it fails.
"""
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from helpers import (clean_env, descendants, free_port, kill_survivors, living, pipert_command, read_lines,
                     wait_for)
from pipert import sd_notify, shm

TESTS = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(TESTS, "signal_target.py")
ROUTINES = {"gen", "mid", "slow"}


def as_a_service(ignored=()):
    """For a child: stop signals at their defaults, as a service manager starts a service (a test run
    as a background job would otherwise pass an ignored SIGINT on), but for ``ignored``."""
    def reset():
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    return reset


class Group:
    """One `pipert run` daemon leading its own process group, and what it printed."""

    def __init__(self, tmp_path, factory, start, env, ignored=()):
        self.log = str(tmp_path / f"cleanups-{uuid.uuid4().hex[:6]}.jsonl")
        self.err_path = self.log + ".err"
        self.api = f"http://127.0.0.1:{free_port()}"
        args = pipert_command() + ["run", f"{TARGET}:{factory}", "--api", self.api[len("http://"):]]
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(args + (["--start"] if start else []), cwd=str(tmp_path),
                                         env=clean_env(SIGNAL_TARGET_LOG=self.log, **env), stdout=subprocess.PIPE,
                                         stderr=err, start_new_session=True, preexec_fn=as_a_service(ignored))
        self.output = []
        self.reader = None
        self.pids = []
        self.pipe_id = None

    def read_lines(self):
        """Collect stdout on a thread (the notify test reads it itself until then)."""
        def read():
            for line in self.proc.stdout:
                self.seen(line.decode().rstrip("\n"))
        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        return self

    def read_until(self, text, timeout=30.0):
        try:
            wait_for(lambda: any(text in line for line in self.output), timeout)
        except AssertionError:
            raise AssertionError(f"daemon never printed {text!r}; stdout {self.output}, stderr {self.stderr()}")

    def seen(self, line):
        self.output.append(line)
        if line.startswith("pipert: pipe ") and " built: " in line:
            self.pipe_id = line.split()[2]

    def ready(self):
        self.read_until("pipert: ready")
        self.pids = [self.proc.pid] + descendants(self.proc.pid)
        return self

    def status(self):
        return requests.get(f"{self.api}/status", timeout=5).json()

    def flow_pids(self):
        return [flow["pid"] for flow in self.status()["flows"].values()]

    def signal(self, signum):
        os.killpg(self.proc.pid, signum)

    def finish(self, timeout):
        """Wait for the daemon's exit (``timeout`` only guards against a hang); its exit code."""
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def cleanups(self):
        return [r["cleanup"] for r in read_lines(self.log)]

    def leftovers(self):
        return [e for e in shm.leftovers() if self.pipe_id and f"_{self.pipe_id}_" in e]


@pytest.fixture
def groups(tmp_path):
    """Start daemons in their own groups; at teardown every process is gone and /dev/shm is clean."""
    started = []

    def start(factory="make_pipe", start=True, env=None, read=True, ignored=()):
        group = Group(tmp_path, factory, start, env or {}, ignored)
        started.append(group)
        return group.read_lines().ready() if read else group

    yield start
    problems = []
    for group in started:
        if group.proc.poll() is None:
            group.pids += descendants(group.proc.pid)
            os.killpg(group.proc.pid, signal.SIGKILL)
        group.proc.wait(10)
        group.proc.stdout.close()
        if kill_survivors(group.pids):
            problems.append(f"processes {group.pids} outlived daemon {group.proc.pid}")
        left = group.leftovers()
        if left:
            shm.unlink_owned(group.pipe_id)
            problems.append(f"shared memory left behind: {left}")
    assert not problems, problems


def messages_waiting(group):
    """Both block wires hold messages: the slow destination makes them wait."""
    return all(wire["depth"] > 0 for wire in group.status()["wires"])


def assert_stopped_cleanly(group, signum):
    assert group.finish(timeout=5.0 + 2 + 10) == 0, (group.output, group.stderr())
    assert f"pipert: stopping on {signal.Signals(signum).name}" in group.output
    assert group.output[-1] == f"pipert: pipe {group.pipe_id} stopped"
    wait_for(lambda: not living(group.pids), timeout=5)
    assert not group.leftovers()
    assert "did not finish" not in group.stderr()  # every flow ended on its own, none was SIGKILLed


@pytest.mark.parametrize("signum, start", [(signal.SIGTERM, True), (signal.SIGTERM, False),
                                           (signal.SIGINT, True), (signal.SIGHUP, True)])
def test_signal_to_the_whole_group_stops_everything_cleanly(groups, signum, start):
    group = groups(start=start)
    assert len(living(group.pids)) == 5  # daemon, zygote, three flows
    if start:
        wait_for(lambda: messages_waiting(group))
    group.signal(signum)
    assert_stopped_cleanly(group, signum)
    assert sorted(group.cleanups()) == (sorted(ROUTINES) if start else [])  # cleanup only after setup
    summary = [line for line in group.output if line.startswith("pipert: routine ")]
    assert len(summary) == 3 and all(": killed," in line for line in summary), summary


def test_timeout_command_stops_the_daemon_cleanly(tmp_path):
    """`timeout` signals the process group it makes for the command, as in the issue's report."""
    log = str(tmp_path / "cleanups.jsonl")
    command = ["timeout", "--preserve-status", "8"] + pipert_command() + ["run", f"{TARGET}:make_pipe", "--start"]
    proc = subprocess.Popen(command, cwd=str(tmp_path), env=clean_env(SIGNAL_TARGET_LOG=log), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_a_service())
    try:
        out, err = proc.communicate(timeout=8 + 5.0 + 2 + 20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # timeout leads the group of the command
            proc.communicate()
    assert proc.returncode == 0, (out, err)  # the daemon's own exit code
    assert "pipert: stopping on SIGTERM" in out
    pipe_id = out.split()[2]
    assert out.splitlines()[-1] == f"pipert: pipe {pipe_id} stopped"
    assert sorted(r["cleanup"] for r in read_lines(log)) == sorted(ROUTINES)
    assert not kill_survivors([r["pid"] for r in read_lines(log)], timeout=5)
    assert not [e for e in shm.leftovers() if f"_{pipe_id}_" in e]


def test_a_signal_ignored_at_start_stays_ignored_in_every_process(groups):
    """`nohup pipert run ...`: a hang-up of the terminal must not stop the daemon nor any flow."""
    group = groups(ignored=(signal.SIGHUP,))
    wait_for(lambda: messages_waiting(group))
    group.signal(signal.SIGHUP)
    time.sleep(1.5)  # long enough for a stop to begin, or for a flow's fault to be judged
    assert all(f["alive"] and not f["restarts"] for f in group.status()["flows"].values())
    assert living(group.pids) == group.pids and group.cleanups() == []
    group.signal(signal.SIGTERM)
    assert_stopped_cleanly(group, signal.SIGTERM)


@pytest.mark.parametrize("factory, restarted", [("make_pipe", {"a", "b", "c"}), ("make_pipe_c_never", {"a", "b"})])
def test_signal_to_the_flows_alone_is_their_fault_and_they_restart_by_policy(groups, factory, restarted):
    group = groups(factory)
    wait_for(lambda: messages_waiting(group))
    old = group.status()["flows"]
    for flow in old.values():
        os.kill(flow["pid"], signal.SIGTERM)
    wait_for(lambda: {n for n, f in group.status()["flows"].items() if f["restarts"] == 1 and f["alive"]}
             == restarted, timeout=15)
    flows = group.status()["flows"]
    assert all(flows[n]["last_exit"]["how"] == "killed by signal 15" for n in old)
    assert not living([f["pid"] for f in old.values()])
    assert sorted(group.cleanups()) == sorted(ROUTINES)  # the signalled flows ran their cleanups
    assert not [e for e in group.leftovers() if any(f"_{f['pid']}_" in e for f in old.values())]
    assert group.proc.poll() is None and living(group.pids[:2]) == group.pids[:2]  # daemon and zygote run on
    group.pids += group.flow_pids()
    group.signal(signal.SIGTERM)
    code = group.finish(timeout=5.0 + 2 + 10)
    assert code == (0 if restarted == {"a", "b", "c"} else 1)  # exit 1: flow c died on its own
    wait_for(lambda: not living(group.pids), timeout=5)
    assert not group.leftovers()


def test_signal_to_the_zygote_alone_restarts_its_flows_and_keeps_it(groups):
    group = groups()
    wait_for(lambda: messages_waiting(group))
    flows = group.flow_pids()
    zygote = [pid for pid in group.pids[1:] if pid not in flows]
    assert len(zygote) == 1
    os.kill(zygote[0], signal.SIGTERM)
    wait_for(lambda: all(f["restarts"] == 1 and f["alive"] for f in group.status()["flows"].values()), timeout=15)
    assert living(zygote) == zygote and not living(flows)
    assert sorted(group.cleanups()) == sorted(ROUTINES)
    assert "the zygote" in group.stderr() and "got SIGTERM" in group.stderr()
    group.pids += group.flow_pids()
    group.signal(signal.SIGTERM)
    assert_stopped_cleanly(group, signal.SIGTERM)


def test_second_signal_stops_at_once_without_waiting_for_cleanups(groups):
    group = groups("make_patient_pipe", env={"SIGNAL_TARGET_CLEANUP": "60"})  # kill grace 60 s
    wait_for(lambda: messages_waiting(group))
    group.signal(signal.SIGTERM)
    group.read_until("pipert: stopping on SIGTERM")
    wait_for(lambda: group.stderr().count("stopping on SIGTERM") == 3)  # every flow is in its cleanup
    group.signal(signal.SIGINT)
    assert group.finish(timeout=15) == 0, (group.output, group.stderr())  # well before the 60 s grace
    assert "pipert: SIGINT again: stopping now, without waiting for cleanups" in group.output
    assert group.output[-1] == f"pipert: pipe {group.pipe_id} stopped"
    assert group.cleanups() == []
    wait_for(lambda: not living(group.pids), timeout=5)
    assert not group.leftovers()


def test_sigkill_of_the_zygote_alone_ends_the_daemon_as_a_failure(groups):
    group = groups()
    flows = group.flow_pids()
    zygote = [pid for pid in group.pids[1:] if pid not in flows]
    os.kill(zygote[0], signal.SIGKILL)
    assert group.finish(timeout=20) == 1  # its flows died with it and cannot be forked again
    assert "the zygote" in group.stderr() and "cannot be restarted" in group.stderr()
    assert "flows that died on their own: ['a', 'b', 'c']" in group.output[-1]
    wait_for(lambda: not living(group.pids), timeout=5)
    assert not group.leftovers()


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from signal_target import make_patient_pipe
pipe = make_patient_pipe()
pipe.build()
pipe.notify_event("start").wait(10)
print(pipe.id, flush=True)
pipe.join()
"""


def test_script_stops_on_sighup_and_a_second_signal_hurries_it(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    log = str(tmp_path / "cleanups.jsonl")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env=clean_env(SIGNAL_TARGET_LOG=log, SIGNAL_TARGET_CLEANUP="60"),
                            preexec_fn=as_a_service())
    pids, pipe_id = [], None
    try:
        pipe_id = proc.stdout.readline().strip()
        pids = [proc.pid] + descendants(proc.pid)
        assert len(living(pids)) == 5
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None  # kill grace 60 s: the cleanups hold the stop
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)  # well before the 60 s grace
        wait_for(lambda: not living(pids), timeout=5)
        assert not [e for e in shm.leftovers() if f"_{pipe_id}_" in e]
        assert read_lines(log) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        kill_survivors(pids, timeout=0)
        if pipe_id:
            shm.unlink_owned(pipe_id)


def test_sigkill_of_the_group_leaves_segments_the_next_daemon_sweeps(groups):
    group = groups()
    wait_for(lambda: messages_waiting(group))
    group.signal(signal.SIGKILL)
    group.proc.wait(10)
    wait_for(lambda: not living(group.pids), timeout=5)
    left = group.leftovers()
    assert left  # nobody was left to clean up
    following = groups()  # its build() sweeps them (as would any pipert daemon starting on this machine)
    assert not [e for e in shm.leftovers() if e in left]
    group.pipe_id = None  # swept: nothing of it is left to check
    following.signal(signal.SIGTERM)
    assert_stopped_cleanly(following, signal.SIGTERM)


def test_notify_socket_gets_ready_after_the_ready_line_and_stopping_at_stop(groups, tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        group = groups(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, read=False)
        out = group.proc.stdout.fileno()
        printed, states = b"", []
        deadline = time.monotonic() + 30
        while "STOPPING=1" not in states and time.monotonic() < deadline:
            readable = select.select([out, sock], [], [], 1.0)[0]
            if out in readable:
                printed += os.read(out, 65536)
            if sock in readable:
                if select.select([out], [], [], 0)[0]:  # what the daemon printed before it sent is in the pipe
                    printed += os.read(out, 65536)
                datagram = sock.recv(4096).decode().split("\n")
                if "READY=1" in datagram:
                    assert b"pipert: ready\n" in printed, printed
                    group.pids = [group.proc.pid] + descendants(group.proc.pid)
                states += datagram
            if states.count("WATCHDOG=1") == 2 and "STOPPING=1" not in states:
                group.signal(signal.SIGTERM)
                states.append("(signalled)")
        for line in printed.decode().splitlines():
            group.seen(line)
        assert states[0] == "READY=1" and states[1].startswith("STATUS=pipe "), states
        assert states.index("WATCHDOG=1") < states.index("(signalled)") < states.index("STOPPING=1"), states
        group.read_lines()
        assert_stopped_cleanly(group, signal.SIGTERM)


def test_sd_notify_speaks_to_abstract_sockets_and_honours_watchdog_pid(monkeypatch):
    name = f"pipert-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify("READY=1", "STATUS=up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sd_notify.Watchdog().interval == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sd_notify.Watchdog().interval is None
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify.notify("READY=1")
