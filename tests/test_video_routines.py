"""The ready-made video routines (pipert/routines), each run from a pipeline file in a real pipe.

Inputs are made here: a lossless FFV1 video written with cv2.VideoWriter (so frames compare bit
for bit), a folder of PNG images, and an MJPEG stream served over HTTP on 127.0.0.1 by a server
the test stops and starts again, to see video-source reconnect.
"""
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from helpers import free_port, living, read_lines, wait_for
from pipert import DestinationRoutine, Param, shm
from pipert.pipeline_file import load_pipeline
from pipert.routines._stream import END
from pipert.routines.video_source import VideoSource

SIZE = (144, 192)  # height, width: 82 KB frames, large enough to cross in the wires' shared-memory pools


class SaveFrames(DestinationRoutine):
    """Saves each frame as FOLDER/<frame_number>.npy and every message's other fields as a JSON line."""

    folder = Param(str, help="where to save")

    def setup(self):
        os.makedirs(self.folder, exist_ok=True)
        self.log = open(os.path.join(self.folder, "messages.jsonl"), "a", buffering=1)

    def main_logic(self, data):
        if "frame" in data:
            np.save(os.path.join(self.folder, f"{data['frame_number']}.npy"), data["frame"])
        self.log.write(json.dumps({k: v for k, v in data.items() if k != "frame"}) + "\n")

    def cleanup(self):
        self.log.close()


def saved(folder):
    """The messages SaveFrames kept, each with its frame (if it had one)."""
    messages = read_lines(os.path.join(folder, "messages.jsonl"))
    for message in messages:
        if "frame_number" in message:
            message["frame"] = np.load(os.path.join(folder, f"{message['frame_number']}.npy"))
    return messages


def test_frames(count, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, SIZE + (3,), dtype=np.uint8) for _ in range(count)]


test_frames.__test__ = False  # a helper, not a test


@pytest.fixture
def run_file(tmp_path):
    """Write a pipeline file, build its pipe with a capturing logger and start it; every pipe is shut
    down and checked for leaks at the end, also when the test fails."""
    pipes = []

    def run(text, start=True):
        path = tmp_path / f"pipeline-{len(pipes)}.yaml"
        path.write_text(text)
        pipe = load_pipeline(str(path))
        pipe.logger = logging.getLogger(f"videotest{uuid.uuid4().hex[:6]}")
        pipe.logger.setLevel(logging.DEBUG)
        pipe.logger.propagate = False
        pipe.records = []
        handler = logging.Handler()
        handler.emit = lambda record: pipe.records.append(record.getMessage())
        pipe.logger.addHandler(handler)
        pipes.append(pipe)
        pipe.build()
        if start:
            ack = pipe.send_event("start").wait(10)
            assert not ack["errors"], ack
        return pipe

    yield run
    for pipe in pipes:
        pipe._shutdown()
    for pipe in pipes:
        assert not living([s.pid for s in pipe._states.values() if s.pid]), "flow processes outlived the pipe"
        assert not [e for e in shm.leftovers() if f"_{pipe.id}_" in e], "shared memory left behind"


def test_video_source_plays_a_file_frame_exact_loops_and_ends(tmp_path, run_file):
    frames = test_frames(10)
    video = str(tmp_path / "in.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"FFV1"), 25, (SIZE[1], SIZE[0]))
    for frame in frames:
        writer.write(frame)
    writer.release()
    out = str(tmp_path / "frames")
    pipe = run_file(f"""
flows:
  capture:
    routines:
      - {{name: cam, type: video-source, params: {{path: {video}, fps: 0, loop: true, frames: 25, source_id: door}}}}
      - {{name: paced, type: video-source, params: {{path: {video}}}}}  # at the file's own 25 fps
  store:
    routines:
      - {{name: keep, type: "test_video_routines:SaveFrames", params: {{folder: {out}}}}}
      - {{name: keep_paced, type: "test_video_routines:SaveFrames", params: {{folder: {out}-paced}}}}
wires:
  - {{source: cam, destinations: [keep], policy: block, depth: 4}}
  - {{source: paced, destinations: [keep_paced], policy: block, depth: 4}}
""")
    messages = wait_for(lambda: (lambda m: m if m and m[-1].get("end") else None)(saved(out)), timeout=30)
    assert messages[-1] == {"end": True, "frames": 25, "source": "cam", "flow": "capture"}
    played = messages[:-1]
    assert [m["frame_number"] for m in played] == list(range(1, 26))
    for message in played:  # three rounds of the file, every frame bit for bit
        assert np.array_equal(message["frame"], frames[(message["frame_number"] - 1) % 10])
        assert message["source"] == "door"
    assert [round(m["position"] * 25) for m in played[:10]] == list(range(10))  # the time of each frame
    assert all(a["timestamp"] <= b["timestamp"] for a, b in zip(played, played[1:]))
    status = pipe.status()["routines"]["cam"]
    assert status["condition"] is None and status["params"]["loop"] is True
    assert any("end of the stream after 25 frames" in r for r in pipe.records)
    paced = wait_for(lambda: (lambda m: m if m and m[-1].get("end") else None)(saved(out + "-paced")), timeout=30)
    assert [m.get("frame_number") for m in paced] == list(range(1, 11)) + [None]
    assert paced[9]["timestamp"] - paced[0]["timestamp"] >= 9 / 25 * 0.9  # not faster than the file's rate


class Runtime:
    """Stands in for a flow process: hands out an array of its own as the wire's shared memory."""

    def __init__(self):
        self.given = []

    def allocate(self, routine, shape, dtype):
        self.given.append(np.empty(shape, dtype))
        return self.given[-1]


def test_video_source_decodes_into_shared_memory_and_names_bad_paths(tmp_path):
    """In this process, driving the routine by hand: the frames it returns are the arrays its wire
    handed out (so they cross with no copy), and a path that is no file says so."""
    video = str(tmp_path / "in.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"FFV1"), 25, (SIZE[1], SIZE[0]))
    for frame in test_frames(3):
        writer.write(frame)
    writer.release()
    source = VideoSource(name="cam", path=video, fps=0)
    source._runtime = Runtime()
    source.setup()
    first, second, third = (source.produce()["frame"] for _ in range(3))
    assert source.produce() is END
    source.cleanup()
    assert second is source._runtime.given[0] and third is source._runtime.given[1]  # the first sets the shape
    assert np.array_equal(second, test_frames(3)[1])

    with pytest.raises(FileNotFoundError, match=r"video-source 'cam': there is no video file .*nothing\.mp4"):
        VideoSource(name="cam", path="nothing.mp4").setup()
    camera = VideoSource(name="cam", path="63", reconnect_delay=5)  # no such camera: it waits for it to appear
    camera.setup()
    assert camera.produce() is None
    assert camera._condition.startswith("reconnecting to camera 63: 0 failed attempts, next in 5.0 s")


class MjpegServer:
    """An MJPEG camera on 127.0.0.1:``port`` (multipart/x-mixed-replace, 50 frames a second) that can be
    stopped, dropping its clients, and started again on the same port."""

    def __init__(self, port):
        self.port = port
        self.server = None

    def start(self):
        stopping = self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                n = 0
                while not stopping.is_set():
                    jpeg = cv2.imencode(".jpg", np.full(SIZE + (3,), n % 250, np.uint8))[1].tobytes()
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpeg) + jpeg + b"\r\n")
                    except OSError:
                        return
                    n += 1
                    time.sleep(0.02)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        if self.server is not None:
            self.stopping.set()
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def mjpeg_server():
    """A stopped MjpegServer. Start it after the pipe is built: flow processes forked before would
    inherit its listening socket and keep the port taken after it stops."""
    server = MjpegServer(free_port())
    yield server
    server.stop()


def test_video_source_reconnects_to_a_stream_that_comes_back(tmp_path, run_file, mjpeg_server):
    log = str(tmp_path / "out" / "frames.jsonl")
    pipe = run_file(f"""
flows:
  capture: {{routines: [{{name: cam, type: video-source,
              params: {{path: "http://127.0.0.1:{mjpeg_server.port}/", reconnect_delay: 0.2,
                        reconnect_max_delay: 0.4, timeout: 2}}}}]}}
  store: {{routines: [{{name: log, type: jsonl-writer, params: {{path: {log}}}}}]}}
wires: [{{source: cam, destinations: [log]}}]
""")
    cam = lambda: pipe.status()["routines"]["cam"]  # noqa: E731
    assert wait_for(lambda: cam()["condition"], timeout=20).startswith("reconnecting")  # no stream yet
    mjpeg_server.start()
    wait_for(lambda: len(read_lines(log)) >= 10, timeout=20)
    wait_for(lambda: cam()["condition"] is None, timeout=5)  # status comes every 0.5 s

    mjpeg_server.stop()
    condition = wait_for(lambda: cam()["condition"], timeout=20)
    assert condition.startswith(f"reconnecting to stream http://127.0.0.1:{mjpeg_server.port}/")
    wait_for(lambda: any("attempt 2 failed" in r for r in pipe.records), timeout=20)  # it keeps trying, logged
    assert cam()["state"] == "running" and cam()["error"] is None
    before = len(read_lines(log))

    mjpeg_server.start()
    wait_for(lambda: cam()["condition"] is None, timeout=20)
    wait_for(lambda: len(read_lines(log)) >= before + 10, timeout=20)  # frames flow again
    messages = [r for r in pipe.records if "cam" in r or "stream" in r]
    assert any(r.startswith(f"lost stream http://127.0.0.1:{mjpeg_server.port}/ (no frame): reconnecting")
               for r in messages), messages
    assert any("reconnected to stream" in r for r in messages), messages
    numbers = [r["frame_number"] for r in read_lines(log)]
    assert numbers == list(range(1, len(numbers) + 1))  # one numbering across the outage


def test_image_dir_source_plays_a_folder_in_name_order(tmp_path, run_file):
    folder = tmp_path / "images"
    folder.mkdir()
    frames = test_frames(3, seed=5)
    for name, frame in zip(("b.png", "a.png", "c.png"), frames):
        cv2.imwrite(str(folder / name), frame)
    (folder / "notes.txt").write_text("not an image")
    out = str(tmp_path / "frames")
    run_file(f"""
flows:
  capture: {{routines: [{{name: images, type: image-dir-source, params: {{path: {folder}}}}}]}}
  store: {{routines: [{{name: keep, type: "test_video_routines:SaveFrames", params: {{folder: {out}}}}}]}}
wires: [{{source: images, destinations: [keep], policy: block, depth: 4}}]
""")
    messages = wait_for(lambda: (lambda m: m if m and m[-1].get("end") else None)(saved(out)), timeout=20)
    assert [m.get("image") for m in messages] == ["a.png", "b.png", "c.png", None]
    for message, expected in zip(messages, (frames[1], frames[0], frames[2])):
        assert np.array_equal(message["frame"], expected)
    assert messages[-1]["frames"] == 3


def test_detection_chain_and_writers_from_a_file_stop_by_themselves(tmp_path, run_file):
    """synthetic-scene -> resize -> mog2-detector -> tracker -> annotate -> video-writer, jsonl-writer;
    the source ends the stream and kills the pipe once both writers have closed their files."""
    out = tmp_path / "out" / "deep"
    kept = str(tmp_path / "annotated")
    pipe = run_file(f"""
pipe: {{wire_policy: block, wire_depth: 4}}
flows:
  capture:
    routines:
      - {{name: scene, type: synthetic-scene, params: {{width: 384, height: 288, fps: 0, frames: 60,
          at_end: kill, wait_for: [video, log]}}}}
  detection:
    auto_wire: true
    routines:
      - {{name: shrink, type: resize, params: {{width: 192}}}}
      - {{name: detector, type: mog2-detector, params: {{min_area: 100, detection_width: 0}}}}
      - {{name: tracker, type: tracker}}
      - {{name: draw, type: annotate, params: {{colour: [0, 0, 255], thickness: 1}}}}
  output:
    routines:
      - {{name: video, type: video-writer, params: {{path: {out}/run.avi, fourcc: MJPG, fps: 10}}}}
      - {{name: log, type: jsonl-writer, params: {{path: {out}/run.jsonl, fields: [frame_number, objects]}}}}
      - {{name: keep, type: "test_video_routines:SaveFrames", params: {{folder: {kept}}}}}
wires:
  - {{source: scene, destinations: [shrink]}}
  - {{source: draw, destinations: [video, log, keep]}}
""")
    wait_for(lambda: not any(f["alive"] for f in pipe.status()["flows"].values()), timeout=60)  # the source's kill
    pipe.join()
    records = read_lines(str(out / "run.jsonl"))
    assert [r["frame_number"] for r in records] == list(range(1, 61))
    assert set(records[0]) == {"frame_number", "objects", "latency_ms"}
    capture = cv2.VideoCapture(str(out / "run.avi"))
    decoded = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame.shape)
    capture.release()
    assert decoded == [(144, 192, 3)] * 60  # every frame, at the resized size
    found = [(r["frame_number"], o) for r in records if r["frame_number"] > 20 for o in r["objects"]]
    assert len(found) >= 40 and len({o["id"] for _, o in found}) <= 10  # the shapes, tracked with few ids
    annotated = {m["frame_number"]: m["frame"] for m in saved(kept) if "frame" in m}
    for number, found_object in found:
        x, y = found_object["box"][:2]
        assert tuple(annotated[number][y, x]) == (0, 0, 255)  # the box's corner is drawn in the colour
    finished = [r for r in pipe.records if "latency source->sink" in r]
    assert any(r.startswith("60 of 60 frames (0 dropped) to ") and "run.avi" in r for r in finished), finished
