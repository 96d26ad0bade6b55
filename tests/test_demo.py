"""The video-analytics demo as a user runs it: `pipert run examples/video_analytics.yaml` (what `make demo`
runs) in a subprocess on free 127.0.0.1 ports, on a small synthetic scene, driven by the README's
second-terminal commands, then its outputs checked against the scene's ground truth; and the same
demo built in Python (examples/video_analytics.py) ended by a kill.

Every process a test starts (daemon, zygote, flows, control clients) is killed at teardown,
even when the test fails, and the daemon's shared memory must be gone once it exits.
"""
import ast
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time

import cv2
import requests

from helpers import clean_env, descendants, free_port, living, pipert_command
from pipert import shm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "video_analytics.yaml")
DEMO_PY = os.path.join(ROOT, "examples", "video_analytics.py") + ":create_pipe"
ROUTINES = ["annotate", "detector", "json_logger", "source", "tracker", "video_writer"]
SUMMARY_ROUTINE = re.compile(r"^pipert: routine (\S+) \(flow (\S+)\): (\w+), in (\d+), out (\d+)$")
SUMMARY_WIRE = re.compile(r"^pipert: wire (\S+) -> (\S+): dropped (\d+)$")


class Daemon:
    """One `pipert run TARGET --rpc --api --start ARGS...` subprocess, on free ports, in ``cwd``.

    Use it in a ``with`` block: at its end the daemon and all of its processes are killed,
    whatever happened inside."""

    def __init__(self, target: str, cwd: str, env: dict, args: tuple = ()) -> None:
        self.rpc = f"tcp://127.0.0.1:{free_port()}"
        self.http = f"http://127.0.0.1:{free_port()}"
        self.err_path = os.path.join(cwd, f"daemon-{time.monotonic_ns()}.err")
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [*pipert_command(), "run", target, "--rpc", self.rpc, "--api", self.http.split("//")[1], "--start",
             *args],
                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        self.pids = [self.proc.pid]
        self.output: list = []
        self.pipe_id = None
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def read_until(self, text: str, timeout: float = 30.0) -> str:
        """Collect stdout lines until one contains ``text``; fail with the output so far if none does."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"the daemon never printed {text!r}; stdout {self.output}, "
                                     f"stderr {self.stderr()[-3000:]}")
            self.output.append(line)
            if line.startswith("pipert: pipe ") and " built: " in line:
                self.pipe_id = line.split()[2]
            if text in line:
                return line

    def wait_ready(self) -> "Daemon":
        self.read_until("pipert: ready")
        self.pids += descendants(self.proc.pid)
        return self

    def wait_exit(self, timeout: float) -> int:
        """The daemon's exit code, once it has exited on its own; all of its stdout is read by then."""
        code = self.proc.wait(timeout)
        try:
            self.read_until("no such line", timeout=5.0)
        except AssertionError:
            pass
        return code

    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def status(self) -> dict:
        response = requests.get(f"{self.http}/status", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def zerorpc(self, *args: str) -> dict:
        """Run `pipert zerorpc RPC ARGS...` as the README shows; its printed reply as a dict."""
        result = subprocess.run([*pipert_command(), "zerorpc", self.rpc, *args], env=clean_env(),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return ast.literal_eval(result.stdout[result.stdout.index("{"):])

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def kill(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and SIGKILL whatever of its processes is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in living(self.pids):
            os.kill(pid, signal.SIGKILL)


def demo_env(out: str, seconds: float) -> dict:
    """A clean environment for the demo: a small synthetic scene, ``seconds`` long, writing to ``out``."""
    return clean_env(PIPERT_DEMO_SECONDS=str(seconds), PIPERT_DEMO_SIZE="640x360", PIPERT_DEMO_FPS="30",
                     PIPERT_DEMO_OUT=out)


def demo_params(frames: int) -> tuple:
    """`pipert run` flags for the demo's pipeline file: a small synthetic scene, ``frames`` long."""
    settings = {"source.frames": frames, "source.width": 640, "source.height": 360}
    return tuple(arg for name, value in settings.items() for arg in ("--param", f"{name}={value}"))


def iou(a, b) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return 0.0 if w <= 0 or h <= 0 else w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def video_frames(path: str) -> int:
    capture = cv2.VideoCapture(path)
    assert capture.isOpened(), f"OpenCV cannot open {path}"
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def test_demo_runs_is_controlled_and_finds_the_objects(tmp_path):
    out = str(tmp_path / "out")  # the pipeline file writes to out/ in the daemon's working directory
    with Daemon(DEMO, str(tmp_path), clean_env(), demo_params(frames=120)) as daemon:
        daemon.wait_ready()

        def source_out() -> int:
            return daemon.status()["routines"]["source"]["messages_out"]

        deadline = time.monotonic() + 10
        while source_out() < 20:
            assert time.monotonic() < deadline, "the source sent no frames"
            time.sleep(0.1)

        # Second-terminal commands from the README: pause, change the detector, resume.
        assert daemon.zerorpc("execute", "stop")["handled_by"] == ROUTINES
        paused = daemon.status()
        assert {r["state"] for r in paused["routines"].values()} == {"stopped"}
        time.sleep(0.6)
        assert source_out() == paused["routines"]["source"]["messages_out"]
        reply = daemon.zerorpc("execute", "SET_MIN_AREA", '{"min_area": 250}')
        assert (reply["handled_by"], reply["errors"]) == (["detector"], {})
        url = f"{daemon.http}/routines/events/SET_MIN_AREA/execute"
        reply = requests.post(url, data=json.dumps({"extra_args": {"min_area": 300}}), timeout=10).json()
        assert (reply["handled_by"], reply["errors"]) == (["detector"], {})
        reply = requests.post(url, json={"extra_args": {"min_area": "big"}}, timeout=10).json()
        assert "parameter 'min_area' expects int >= 0, got 'big'" in reply["errors"]["detector"]
        assert daemon.zerorpc("set_params", "tracker", '{"max_missed": "12"}')["params"]["max_missed"] == 12
        assert daemon.zerorpc("execute", "start")["handled_by"] == ROUTINES
        status = daemon.status()
        assert sorted(status["routines"]) == ROUTINES and len(status["wires"]) == 5
        assert status["routines"]["detector"]["params"]["min_area"] == 300

        # The source ends the video, the sinks finish, the source kills the pipe: the daemon exits 0.
        assert daemon.wait_exit(30) == 0, daemon.stderr()[-3000:]
    stderr = daemon.stderr()
    assert "min_area 300 -> 250" in stderr and "min_area 250 -> 300" in stderr
    assert len(re.findall(r"latency source->sink mean [\d.]+ ms, p99 [\d.]+ ms", stderr)) == 2
    assert not living(daemon.pids), "processes outlived the daemon"
    assert not [e for e in shm.leftovers() if f"_{daemon.pipe_id}_" in e], "shared memory left behind"

    # Frames: every frame the source sent is in the video and the log, or counted as dropped.
    routines = {m[1]: (int(m[4]), int(m[5])) for m in map(SUMMARY_ROUTINE.match, daemon.output) if m}
    drops = {(m[1], m[2]): int(m[3]) for m in map(SUMMARY_WIRE.match, daemon.output) if m}
    assert sorted(routines) == ROUTINES, daemon.output
    sent = routines["source"][1] - 1  # the last message is the end of the stream
    assert sent == 120
    assert drops[("tracker", "annotate")] == drops[("annotate", "video_writer")] == 0  # block wires
    assert drops[("annotate", "json_logger")] == 0
    records = [json.loads(line) for line in open(os.path.join(out, "detections.jsonl"))]
    numbers = [r["frame_number"] for r in records]
    assert numbers == sorted(set(numbers)) and numbers[-1] <= sent
    assert len(records) == sent - drops[("source", "detector")] - drops[("detector", "tracker")]
    assert video_frames(os.path.join(out, "annotated.mp4")) == len(records)

    # Detections: once the shapes are in view, nearly every one is found where the scene drew it.
    truths = [(box, r["objects"]) for r in records if r["frame_number"] > 10 for box in r["truth"]]
    found = sum(any(iou(box, o["box"]) > 0.3 for o in objects) for box, objects in truths)
    assert len(truths) > 200 and found / len(truths) > 0.9, f"{found} of {len(truths)} truth boxes found"
    ids = {o["id"] for r in records if r["frame_number"] > 30 for o in r["objects"]}
    assert len(ids) <= 10, f"the tracker lost its objects: ids {sorted(ids)}"


def test_endless_demo_stops_on_kill_with_complete_outputs(tmp_path):
    """The Python demo with PIPERT_DEMO_SECONDS=0 plays until killed (here over HTTP): the sinks still
    close their files."""
    out = str(tmp_path / "out")
    with Daemon(DEMO_PY, str(tmp_path), demo_env(out, seconds=0)) as daemon:
        daemon.wait_ready()
        deadline = time.monotonic() + 10
        while daemon.status()["routines"]["json_logger"]["messages_in"] < 30:
            assert time.monotonic() < deadline, "no frames reached the sinks"
            time.sleep(0.1)
        assert requests.post(f"{daemon.http}/kill", timeout=10).status_code == 200
        assert daemon.wait_exit(30) == 0, daemon.stderr()[-3000:]
    assert len(re.findall(r"\d+ frames to \S+; latency source->sink", daemon.stderr())) == 2
    records = open(os.path.join(out, "detections.jsonl")).read().splitlines()
    frames = video_frames(os.path.join(out, "annotated.mp4"))
    assert len(records) >= 30 and abs(frames - len(records)) <= 5  # each sink stops where the kill finds it
    assert not living(daemon.pids), "processes outlived the daemon"
    assert not [e for e in shm.leftovers() if f"_{daemon.pipe_id}_" in e], "shared memory left behind"
