"""A whole pipe logging to a real socket.io cockpit: structure, routine logs, FPS, frames, outages."""
import base64
import json
import logging
import time
import uuid

import cv2
import numpy as np
import pytest

from cockpit import Cockpit
from helpers import wait_for
from pipert import DestinationRoutine, MiddleRoutine, SourceRoutine, Wire
from pipert.socket_logger import get_socket_logger

NASTY = 'quote " apostrophe \' newline\n tab\t backslash \\ unicode \u00e9\u4e2d\U0001F600 {"json": [1]}'


class Camera(SourceRoutine):
    def __init__(self, fps=200, name=None):
        super().__init__(name)
        self.set_const_fps(fps)

    def setup(self):
        self.n = 0
        self.logger.info(NASTY)
        try:
            raise ValueError("boom \"quoted\"")
        except ValueError:
            self.logger.exception("with traceback")
        self.logger.critical("critical becomes error")

    def main_logic(self):
        self.n += 1
        return {"n": self.n, "image": np.full((90, 160, 3), self.n % 256, np.uint8)}


class Invert(MiddleRoutine):
    def main_logic(self, data):
        return {"n": data["n"], "image": 255 - data["image"]}


class Chatty(DestinationRoutine):
    """Logs every message: the cockpit link is on the hot path."""

    def main_logic(self, data):
        self.logger.info("got %d", data["n"])


@pytest.fixture
def cockpit(tmp_path):
    server = Cockpit(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def socket_logger(cockpit):
    name = f"cockpit{uuid.uuid4().hex[:6]}"
    logger = get_socket_logger(name, 5, url=cockpit.url)
    logger.propagate = False
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def routines_pipe(make_pipe, logger, fps=200):
    pipe = make_pipe(logger=logger, fps_log_interval=0.5, frames_per_second=5)
    camera, invert, chatty = Camera(fps, name="camera"), Invert(name="invert"), Chatty(name="chatty")
    pipe.create_flow("capture", False, camera)
    pipe.create_flow("process", False, invert)
    pipe.create_flow("output", False, chatty)
    pipe.link(Wire(source=camera, destinations=(invert,)), Wire(source=invert, destinations=(chatty,)))
    pipe.build()
    return pipe


def test_the_cockpit_sees_the_pipe_its_routines_fps_and_frames(make_pipe, socket_logger, cockpit):
    pipe = routines_pipe(make_pipe, socket_logger)
    pipe.notify_event("start")
    wait_for(lambda: cockpit.events("pipe_creation"))
    creation = json.loads(cockpit.events("pipe_creation")[0])
    structure = json.loads(creation["message"].replace("'", '"'))
    assert structure == pipe.structure() and creation["source"] == socket_logger.name
    wait_for(lambda: {"camera", "chatty"} <= {r["source"].split(".")[-1] for r in cockpit.records()})
    records = cockpit.records()
    sources = {r["source"] for r in records}
    assert f"{socket_logger.name}.capture.camera" in sources and f"{socket_logger.name}.output.chatty" in sources
    assert NASTY in [r["message"] for r in records]
    tracebacks = [r for r in records if r["level"] == "EXCEPTION"]
    assert tracebacks and 'ValueError: boom "quoted"' in tracebacks[0]["message"]
    assert {"level": "ERROR", "message": "critical becomes error"}.items() <= \
        next(r for r in records if r["message"] == "critical becomes error").items()
    wait_for(lambda: [r for r in cockpit.records() if r["level"] == "PIPE_INFRASTRUCTURE"
                      and r["message"].startswith("fps: ") and r["source"].endswith(".invert")])
    result = pipe.send_event("log_data", {"process": ["invert"]}).wait(5)
    assert result["handled_by"] == ["invert"]

    def frames(direction):
        prefix = f"{direction}: , 'data': {{'image_base64': '"
        return [r["message"][len(prefix):-2] for r in cockpit.records()
                if r["message"].startswith(prefix) and r["source"].endswith(".invert")]

    wait_for(lambda: len(frames("input")) >= 2 and len(frames("output")) >= 2)
    for b64 in frames("input")[:1] + frames("output")[:1]:
        image = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (90, 160, 3)
    pipe.join(to_kill=True)


def _rate(pipe, seconds=2.0):
    first = pipe.status()["routines"]["chatty"]["messages_in"]
    time.sleep(seconds)
    return (pipe.status()["routines"]["chatty"]["messages_in"] - first) / seconds


def test_a_dead_or_returning_cockpit_does_not_slow_the_pipeline(make_pipe, socket_logger, cockpit):
    pipe = routines_pipe(make_pipe, socket_logger, fps=None)
    pipe.notify_event("start")
    wait_for(lambda: cockpit.records())
    time.sleep(0.5)
    alive = _rate(pipe)
    cockpit.kill()
    dead = _rate(pipe)
    cockpit.start()
    wait_for(lambda: cockpit.events("pipe_creation"), timeout=20)
    back = _rate(pipe)
    handler = socket_logger.handlers[0]
    logging.getLogger("pipert.tests").warning("cockpit alive %.0f msg/s, dead %.0f (%.2f), back %.0f (%.2f); "
                                              "dropped %d", alive, dead, dead / alive, back, back / alive,
                                              handler.dropped)
    print(f"\nthroughput with the cockpit alive {alive:.0f}/s, dead {dead:.0f}/s (ratio {dead / alive:.2f}), "
          f"back {back:.0f}/s (ratio {back / alive:.2f}); records dropped {handler.dropped}")
    assert dead >= 0.7 * alive and back >= 0.7 * alive
    assert handler.dropped > 0
    wait_for(lambda: any(r["message"].startswith("got ") for r in cockpit.records()))
    pipe.join(to_kill=True)
