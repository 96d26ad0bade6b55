"""FPS reporting, frames for the cockpit and pacing, through the pipe's logger."""
import base64
import re
import time

import cv2
import numpy as np

from helpers import wait_for
from pipert import PIPE_INFRASTRUCTURE, DestinationRoutine, MiddleRoutine, SourceRoutine, Wire


class Camera(SourceRoutine):
    def __init__(self, fps=None, name=None):
        super().__init__(name)
        self.set_const_fps(fps)

    def setup(self):
        self.n = 0

    def main_logic(self):
        self.n += 1
        return {"n": self.n, "image": np.full((120, 160, 3), self.n % 256, np.uint8), "sent": time.time()}


class Invert(MiddleRoutine):
    def main_logic(self, data):
        return {"n": data["n"], "image": 255 - data["image"]}


class Slow(DestinationRoutine):
    def main_logic(self, data):
        time.sleep(0.02)


class Sink(DestinationRoutine):
    def main_logic(self, data):
        pass


def frames(pipe, routine, direction):
    pattern = re.compile(rf"^{direction}: , 'data': {{'image_base64': '([A-Za-z0-9+/=]+)'}}$")
    found = []
    for record in pipe.captured.records:
        match = pattern.match(record.getMessage())
        if match and record.name.endswith("." + routine):
            found.append((record.created, match.group(1)))
    return found


def test_fps_is_logged_and_reported(make_pipe):
    pipe = make_pipe(fps_log_interval=0.5)
    pipe.create_flow("f", True, Camera(fps=50, name="cam"), Sink(name="sink"))
    pipe.build()
    pipe.notify_event("start")
    wait_for(lambda: [r for r in pipe.captured.records
                      if r.levelno == PIPE_INFRASTRUCTURE and r.name.endswith(".sink")
                      and re.fullmatch(r"fps: \d+\.\d\d", r.getMessage()) and float(r.getMessage()[5:]) > 30])
    status = wait_for(lambda: (lambda s: s if s["cam"]["fps"] > 30 and s["sink"]["capacity"] else None)(
        pipe.status()["routines"]))
    assert status["cam"]["capacity"] > status["cam"]["fps"]
    pipe.join(to_kill=True)


def test_log_data_toggles_sampled_input_and_output_frames(make_pipe):
    pipe = make_pipe(frames_per_second=4)
    pipe.create_flow("cam", False, Camera(fps=100, name="camera"))
    camera = pipe.flows["cam"].routines[0]
    pipe.create_flow("proc", True, Invert(name="invert"), Sink(name="sink"))

    pipe.link(Wire(source=camera, destinations=(pipe.flows["proc"].routines[0],)))
    pipe.build()
    pipe.notify_event("start")
    time.sleep(0.3)
    assert not frames(pipe, "invert", "input")
    result = pipe.send_event("log_data", {"proc": ["invert"]}).wait(5)
    assert result["handled_by"] == ["invert"]
    time.sleep(2.0)
    pipe.send_event("log_data", {"proc": ["invert"]}).wait(5)
    time.sleep(0.5)
    inputs, outputs = frames(pipe, "invert", "input"), frames(pipe, "invert", "output")
    assert 4 <= len(inputs) <= 4 * 2.6 and 4 <= len(outputs) <= 4 * 2.6
    image = cv2.imdecode(np.frombuffer(base64.b64decode(outputs[0][1]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (120, 160, 3)
    stopped = len(frames(pipe, "invert", "input"))
    time.sleep(0.6)
    assert len(frames(pipe, "invert", "input")) == stopped
    assert not frames(pipe, "camera", "output")
    pipe.join(to_kill=True)


def _settled_fps(pipe, routine, seconds=3.0):
    first = pipe.status()["routines"][routine]["messages_out"]
    time.sleep(seconds)
    return (pipe.status()["routines"][routine]["messages_out"] - first) / seconds


def test_const_fps_caps_a_source(make_pipe):
    pipe = make_pipe()
    pipe.create_flow("f", True, Camera(fps=40, name="cam"), Sink())
    pipe.build()
    pipe.notify_event("start")
    time.sleep(1.0)
    assert abs(_settled_fps(pipe, "cam") - 40) <= 4
    pipe.join(to_kill=True)


def test_auto_pacing_slows_a_source_to_its_bottleneck(make_pipe):
    pipe = make_pipe(auto_pacing_mechanism=True, pacing_multiplier=1.2)
    camera, slow = Camera(name="cam"), Slow(name="slow")
    pipe.create_flow("src", False, camera)
    pipe.create_flow("dst", False, slow)

    pipe.link(Wire(source=camera, destinations=(slow,)))
    pipe.build()
    pipe.notify_event("start")
    capacity = wait_for(lambda: pipe.status()["routines"]["slow"]["capacity"])
    wait_for(lambda: pipe.status()["routines"]["cam"]["paced_fps"])
    time.sleep(1.0)
    rate = _settled_fps(pipe, "cam")
    assert abs(rate - capacity * 1.2) <= 0.15 * capacity * 1.2, (rate, capacity)
    pipe.join(to_kill=True)
