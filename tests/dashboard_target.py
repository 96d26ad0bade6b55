"""The pipe of tests/test_dashboard.py, run as ``pipert run tests/dashboard_target.py:make_pipe``.

``camera`` (flow capture) makes small colour frames, ``invert`` (flow work) inverts them and
logs a line every 50 frames, ``sink`` (flow out) takes them. camera's handlers append one JSON
line per call to the file named by ``$CONTROL_TARGET_LOG`` and log what they got.
"""
import json
import os
import time

import numpy as np

from pipert import DestinationRoutine, MiddleRoutine, Param, Pipe, SourceRoutine, Wire, events


class Camera(SourceRoutine):
    def setup(self):
        self.n = 0

    def main_logic(self):
        time.sleep(0.02)
        self.n += 1
        frame = np.zeros((90, 120, 3), np.uint8)
        frame[:, (self.n * 3) % 120:(self.n * 3) % 120 + 20] = (0, 160, 255)
        return {"frame": frame, "n": self.n}

    @events("SAY")
    def say(self, text: str, loud: bool = False):
        with open(os.environ["CONTROL_TARGET_LOG"], "a") as log:
            log.write(json.dumps({"event": "SAY", "text": text, "loud": loud}) + "\n")
        self.logger.warning("said: %s%s", text, "!" if loud else "")

    @events("FAIL")
    def fail(self):
        raise RuntimeError("asked to fail")


class Invert(MiddleRoutine):
    every = Param(int, default=50, min=1, help="log a line every this many frames")

    def setup(self):
        self.count = 0

    def main_logic(self, data):
        self.count += 1
        if self.count % self.every == 0:
            self.logger.info("processed %d frames", self.count)
        return {"frame": 255 - data["frame"], "n": data["n"]}


class Sink(DestinationRoutine):
    def main_logic(self, data):
        pass


def make_pipe():
    camera, invert, sink = Camera(name="camera"), Invert(name="invert"), Sink(name="sink")
    pipe = Pipe()
    pipe.create_flow("capture", False, camera)
    pipe.create_flow("work", False, invert)
    pipe.create_flow("out", False, sink)
    pipe.link(Wire(source=camera, destinations=(invert,)),
              Wire(source=invert, destinations=(sink,), policy="block", depth=4))
    return pipe
