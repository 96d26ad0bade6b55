"""Pipes across the nodes of a real local Ray cluster (ray.cluster_utils: a head and nodes on this host).

One cluster serves the whole module: a head (the driver's node), a "camera" node and a
"gpu_host" node, small object stores, fast node-death detection. It is always shut down.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import Counter, Recorder, descendants, living, read_line, read_lines, wait_for, within
from pipert import BuildError, ClusterError, MiddleRoutine, Pipe, SourceRoutine, Wire, events, shm

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.timeout(120)
_FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                "health_check_timeout_ms": 500, "health_check_initial_delay_ms": 0}
_STORE = 80 << 20


def _ray_processes():
    """Pids of the raylet and gcs_server processes on this machine."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() in ("raylet", "gcs_server"):
                    found.add(int(entry))
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError, ValueError):
            continue
    return found


@pytest.fixture(scope="module")
def cluster():
    """A head and two nodes; shut down at the end, also on failure, with no raylet or gcs_server left."""
    before = _ray_processes()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": _STORE,
                                                          "_system_config": _FAST_HEALTH})
    try:
        nodes.camera = nodes.add_node(num_cpus=1, resources={"camera": 1}, object_store_memory=_STORE)
        nodes.gpu = nodes.add_node(num_cpus=1, resources={"gpu_host": 3}, object_store_memory=_STORE)
        ray.init(address=nodes.address, logging_level="WARNING", log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        wait_for(lambda: not living(_ray_processes() - before), timeout=20)


def node_with(resource):
    """The id of a live node with ``resource`` (``ray.nodes()`` once hung for good in a full run)."""
    nodes = within(ray.nodes, 20, "ray.nodes()")
    return [n["NodeID"] for n in nodes if n["Alive"] and n["Resources"].get(resource)][0]


class Where(MiddleRoutine):
    """Tags each message with the node it ran on, and checks the frame it got."""

    def main_logic(self, data):
        frame = data["frame"]
        ok = not frame.flags.writeable and bool(frame[0, 0, 0] == data["n"] % 251) and frame.shape == (480, 640, 3)
        return {"n": data["n"], "node": self.node["node_id"], "replica": self.replica, "ok": ok,
                "frame": frame[:2]}

    @events("PING")
    def ping(self, value=None):
        self.logger.info("ping %s on %s", value, self.node["host"])


class Relay(MiddleRoutine):
    def main_logic(self, data):
        return dict(data, relay_node=self.node["node_id"])


class Pinger(SourceRoutine):
    """A slow source that, on FORWARD, sends PING to another routine (an event from a routine)."""

    def main_logic(self):
        time.sleep(0.02)
        return None

    @events("FORWARD")
    def forward(self, flow, routine):
        self.notify_event("PING", {flow: [routine]}, value=f"from {self.node['node_id']}")


def test_a_lost_node_is_reported_and_its_flows_restart_when_one_is_back(cluster, make_pipe, tmp_path):
    # First in the module: adding a node to the cluster after earlier pipes had run flows forked
    # from this (driver) process failed to reach the GCS here (Ray 2.60, cluster_utils).
    out = tmp_path / "out.jsonl"
    spare = cluster.add_node(num_cpus=1, resources={"spare": 1}, object_store_memory=_STORE)
    pipe = make_pipe(cluster=cluster.address)
    camera, relay, sink = Counter(period=0.02), Relay(), Recorder(str(out))
    pipe.create_flow("capture", False, camera, resources={"camera": 1})
    pipe.create_flow("work", False, relay, resources={"spare": 1})
    pipe.create_flow("output", False, sink)
    pipe.link(Wire(source=camera, destinations=(relay,)), Wire(source=relay, destinations=(sink,)))
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: len(read_lines(out)) > 5, timeout=20)
    old = pipe.status()["flows"]["work"]
    cluster.remove_node(spare, allow_graceful=False)
    lost_at = time.monotonic()
    wait_for(lambda: not pipe.status()["flows"]["work"]["alive"], timeout=10)
    assert "lost" in pipe.status()["flows"]["work"]["last_exit"]["how"]
    assert time.monotonic() - lost_at < 10
    assert any("is lost" in m for m in pipe.captured.messages())
    cluster.add_node(num_cpus=1, resources={"spare": 1}, object_store_memory=_STORE)
    wait_for(lambda: pipe.status()["flows"]["work"]["alive"], timeout=30)
    new = pipe.status()["flows"]["work"]
    assert new["restarts"] == 1 and new["node"]["node_id"] != old["node"]["node_id"]
    seen = len(read_lines(out))
    wait_for(lambda: len(read_lines(out)) > seen + 5, timeout=20)  # the wires reconnected
    assert not living([old["pid"]])
    pipe.join(to_kill=True)


def test_placement_same_and_cross_node_wires_lossless_block_and_ordered_replicas(cluster, make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"
    pipe = make_pipe(cluster=cluster.address, wire_policy="block", wire_depth=2)
    camera, where, relay, sink = Counter(limit=150, frame_shape=(480, 640, 3)), Where(), Relay(), Recorder(str(out))
    pipe.create_flow("capture", False, camera, resources={"camera": 1})
    pipe.create_flow("detect", False, where, resources={"gpu_host": 1}, replicas=2)
    pipe.create_flow("post", False, relay, resources={"gpu_host": 1})
    pipe.create_flow("output", False, sink)
    pipe.link(Wire(source=camera, destinations=(where,)), Wire(source=where, destinations=(relay,), ordered=True),
              Wire(source=relay, destinations=(sink,)))
    pipe.build()
    flows = pipe.status()["flows"]
    gpu, head = node_with("gpu_host"), ray.get_runtime_context().get_node_id()
    assert flows["capture"]["node"]["node_id"] == node_with("camera")
    assert flows["detect/0"]["node"]["node_id"] == flows["detect/1"]["node"]["node_id"] == gpu
    assert flows["post"]["node"]["node_id"] == gpu and flows["output"]["node"]["node_id"] == head
    assert all(f["node"]["host"] for f in flows.values())
    detect = pipe.structure()["Flows"]["detect"]
    assert detect["replicas"] == 2 and detect["resources"] == {"gpu_host": 1}
    assert set(detect["nodes"]) == {"detect/0", "detect/1"}
    assert {n["node_id"] for n in detect["nodes"].values()} == {gpu}
    pipe.notify_event("start")
    wait_for(lambda: len(read_lines(out)) == 150, timeout=60)
    lines = read_lines(out)
    assert [r["n"] for r in lines] == list(range(1, 151))  # lossless block across nodes, order restored
    assert all(r["ok"] for r in lines)  # read-only frames with their content, across the bridge
    assert {r["node"] for r in lines} == {gpu} and {r["relay_node"] for r in lines} == {gpu}
    assert {r["replica"] for r in lines} == {0, 1}
    wait_for(lambda: pipe.status()["routines"][where.name]["messages_in"] == 150)
    pipe.join(to_kill=True)
    assert not pipe.status()["flows"]["capture"]["alive"]


def test_events_acks_logs_and_restart_on_the_same_node(cluster, make_pipe, tmp_path):
    pipe = make_pipe(cluster=cluster.address)
    pinger, camera, where, sink = Pinger(), Counter(frame_shape=(480, 640, 3), period=0.02), Where(), \
        Recorder(str(tmp_path / "out.jsonl"))
    pipe.create_flow("control", False, pinger, resources={"camera": 1})
    pipe.create_flow("capture", True, camera, where, sink, resources={"gpu_host": 1}, restart_backoff=0.1)
    pipe.link(Wire(source=pinger, destinations=(where,)))
    pipe.build()
    assert pipe.notify_event("start").wait(15)["pending"] == []
    result = pipe.send_event("PING", {"capture": [where.name]}, {"value": 1}).wait(15)
    assert result["handled_by"] == [where.name] and not result["errors"]
    pipe.send_event("FORWARD", {"control": [pinger.name]}, {"flow": "capture", "routine": where.name}).wait(15)
    messages = lambda: pipe.captured.messages()  # noqa: E731
    wait_for(lambda: any(m.startswith("ping 1 on ") for m in messages()), timeout=15)
    wait_for(lambda: any(f"ping from {node_with('camera')}" in m for m in messages()), timeout=15)
    node = pipe.status()["flows"]["capture"]["node"]
    os.kill(pipe.status()["flows"]["capture"]["pid"], signal.SIGKILL)
    wait_for(lambda: pipe.status()["flows"]["capture"]["restarts"] == 1 and
             pipe.status()["flows"]["capture"]["alive"], timeout=20)
    assert pipe.status()["flows"]["capture"]["node"] == node
    running = pipe.status()["routines"][where.name]["messages_in"]
    wait_for(lambda: pipe.status()["routines"][where.name]["messages_in"] > running + 5, timeout=20)
    pipe.join(to_kill=True)


def test_build_fails_when_no_node_has_the_resources(cluster, make_pipe):
    pipe = make_pipe(cluster=cluster.address)
    pipe.create_flow("train", True, Counter(), Recorder("/dev/null"), resources={"tpu": 1})
    with pytest.raises(BuildError, match="tpu.*no node.*ray start"):
        pipe.build()


def test_cluster_without_ray_fails_at_once_with_the_install_command(tmp_path):
    script = "import sys; sys.modules['ray'] = None\nfrom pipert import Pipe\nPipe(cluster='ray')\n"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "pip install pipert-daemon[ray]" in run.stderr
    with pytest.raises(ClusterError, match="cluster="):
        Pipe(cluster="")


_DRIVER = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers import Counter, Recorder
from pipert import Pipe, Wire
pipe = Pipe(cluster={address!r})
camera, sink = Counter(frame_shape=(480, 640, 3), period=0.01), Recorder("/dev/null")
pipe.create_flow("capture", False, camera, resources={{"camera": 1}})
pipe.create_flow("output", False, sink, resources={{"gpu_host": 1}})
pipe.link(Wire(source=camera, destinations=(sink,)))
pipe.build()
pipe.notify_event("start").wait(10)
print(pipe.id, *[s["pid"] for s in pipe.status()["flows"].values()], flush=True)
time.sleep(60)
"""


def test_daemon_killed_leaves_no_flow_and_no_shared_memory_on_any_node(cluster):
    script = _DRIVER.format(tests=os.path.dirname(__file__), address=cluster.address)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pipe_id, *pids = read_line(driver.stdout).split()
        pids = [int(p) for p in pids]
        assert living(pids) and [e for e in shm.leftovers() if f"_{pipe_id}_" in e]
        driver.kill()
        driver.wait(10)
        wait_for(lambda: not living(pids), timeout=10)
        wait_for(lambda: not [e for e in shm.leftovers() if f"_{pipe_id}_" in e], timeout=10)
    finally:
        driver.kill()
        driver.wait(10)
        for pid in descendants(driver.pid):
            os.kill(pid, signal.SIGKILL)


def test_replicas_spread_by_resources_and_keyed(cluster, make_pipe, tmp_path):
    out = tmp_path / "out.jsonl"

    class Keyed(SourceRoutine):
        def setup(self):
            self.n = 0

        def main_logic(self):
            if self.n >= 30:
                time.sleep(0.01)
                return None
            self.n += 1
            return {"n": self.n, "camera_id": "xyz"[self.n % 3], "frame": np.full((480, 640, 3), self.n % 251,
                                                                                   np.uint8)}

    pipe = make_pipe(cluster=cluster.address, wire_policy="block", wire_depth=4)
    source, where, sink = Keyed(), Where(), Recorder(str(out))
    pipe.create_flow("capture", False, source)
    pipe.create_flow("detect", False, where, resources={"gpu_host": 1}, replicas=3)
    pipe.create_flow("output", False, sink)
    pipe.link(Wire(source=source, destinations=(where,), key="camera_id"), Wire(source=where, destinations=(sink,)))
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: len(read_lines(out)) == 30, timeout=30)
    lines = read_lines(out)
    assert sorted(r["n"] for r in lines) == list(range(1, 31)) and all(r["ok"] for r in lines)
    replicas = {}
    for r in lines:
        replicas.setdefault(r["n"] % 3, set()).add(r["replica"])
    assert all(len(v) == 1 for v in replicas.values())
    pipe.join(to_kill=True)


_APP = """
import sys
sys.path.insert(0, {tests!r})
from helpers import Counter, Recorder
from pipert import Pipe, Wire


def make_pipe():
    pipe = Pipe()
    camera, sink = Counter(period=0.01), Recorder({out!r})
    pipe.create_flow("capture", False, camera, resources={{"camera": 1}})
    pipe.create_flow("output", False, sink)
    pipe.link(Wire(source=camera, destinations=(sink,)))
    return pipe
"""


def test_pipert_run_cluster_serves_http_and_stops_on_sigterm(cluster, tmp_path):
    import json
    import urllib.request
    from helpers import clean_env, free_port, pipert_command

    out, app, port = tmp_path / "out.jsonl", tmp_path / "app.py", free_port()
    camera = node_with("camera")  # asked before a second driver attaches to the cluster
    app.write_text(_APP.format(tests=os.path.dirname(__file__), out=str(out)))
    daemon = subprocess.Popen(pipert_command() + ["run", f"{app}:make_pipe", "--cluster", cluster.address, "--api",
                                                  f"127.0.0.1:{port}", "--start"],
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while "ready" not in (lines[-1] if lines else ""):
            line = read_line(daemon.stdout)
            assert line, "".join(lines)
            lines.append(line.strip())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as reply:
            status = json.load(reply)
        assert status["flows"]["capture"]["node"]["node_id"] == camera
        wait_for(lambda: len(read_lines(out)) > 5, timeout=20)
        pids = [f["pid"] for f in status["flows"].values()]
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert not living(pids)
        assert not [e for e in shm.leftovers() if f"_{status['pipe']}_" in e]
    finally:
        daemon.kill()
        daemon.wait(10)


class SlowSink(Recorder):
    def main_logic(self, data):
        time.sleep(0.05)


def test_auto_pacing_slows_a_source_on_another_node(cluster, make_pipe, tmp_path):
    pipe = make_pipe(cluster=cluster.address, auto_pacing_mechanism=True)
    camera, sink = Counter(), SlowSink(str(tmp_path / "out.jsonl"))
    pipe.create_flow("capture", False, camera, resources={"camera": 1})
    pipe.create_flow("output", False, sink, resources={"gpu_host": 1})
    pipe.link(Wire(source=camera, destinations=(sink,)))
    pipe.build()
    pipe.notify_event("start")
    paced = wait_for(lambda: pipe.status()["routines"][camera.name]["paced_fps"], timeout=20)
    assert 5 < paced < 25  # the sink's capacity (about 20 calls/s) times 1.1
    pipe.join(to_kill=True)
