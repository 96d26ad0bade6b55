"""A real video-analytics pipeline: capture -> motion detection -> tracking -> video file and JSON log.

Run it as a daemon, controlled over zerorpc and HTTP::

    pipert run examples/video_analytics.py:create_pipe --rpc --api --start

or on its own, without control servers: ``python examples/video_analytics.py``.

Four flows (OS processes)::

    capture    source        a video file, a camera or (default) a synthetic scene with ground truth
    detection  detector      MOG2 background subtraction + morphology + contours; event SET_MIN_AREA
    tracking   tracker       centroid tracker with stable ids; draws boxes, ids and FPS on a copy
    output     video_writer  annotated video, out/annotated.mp4 (mp4v)
               json_logger   one JSON line per frame, out/detections.jsonl

Wires: capture -> detection -> tracking are ``latest`` (depth 1): a slow stage gets the
newest frame and the older one is dropped and counted, so the live path never lags.
tracking -> output is ``block`` (depth 4): every frame the tracker annotates is written to
the video and to the log (when the video ends; a kill stops each sink where it is), and a
slow writer slows the tracker, so frames are dropped, and counted, upstream instead.

Settings are environment variables, read by ``create_pipe`` (so they pass through
``pipert run``); ``create_pipe``'s keyword arguments override them:

    PIPERT_DEMO_SECONDS  seconds of video the source plays (default 20; 0 = until killed or end of file)
    PIPERT_DEMO_VIDEO    a video file or a camera index (default: the synthetic scene)
    PIPERT_DEMO_SIZE     WIDTHxHEIGHT of the synthetic scene (default 1280x720)
    PIPERT_DEMO_FPS      frames per second of the source (default 30)
    PIPERT_DEMO_OUT      output folder (default out/)

At the end of the video the source sends an end-of-stream message down the wires; each
sink closes its file, logs its frame count and its source-to-sink latency (mean, p99)
and sends ``SINK_DONE``; once both have, the source sends ``kill`` and the daemon exits.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from pipert import (PIPE_INFRASTRUCTURE, DestinationRoutine, FrameFilter, MiddleRoutine, Pipe, SourceRoutine, Wire,
                    events, get_socket_logger)

Box = List[int]  # [x, y, w, h] in full-frame pixels
VIDEO_NAME = "annotated.mp4"
VIDEO_FOURCC = "mp4v"  # the headless OpenCV wheel writes it and reads it back (MJPG works too, 5x larger)
LOG_NAME = "detections.jsonl"
DETECTION_WIDTH = 640  # the detector works on frames shrunk to about this width
BACKGROUND_FRAMES = 500  # the background model's memory; a fixed rate, not OpenCV's default 1/n at
                         # start, which would learn objects in view in the first frames as background
WHITE = (255, 255, 255)
SINK_TIMEOUT = 10.0  # seconds the source waits for the sinks to finish before it kills the pipe anyway


def _centre(box: Sequence[int]) -> Tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two [x, y, w, h] boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


# ----- the synthetic scene -----

@dataclass
class _Shape:
    circle: bool
    width: int
    height: int
    x: float
    y: float
    vx: float
    vy: float
    top: float  # the vertical band the shape bounces in
    bottom: float
    colour: Tuple[int, int, int]
    entered: bool = False  # shapes drive in from a side, then bounce off the edges


class SyntheticScene:
    """Shapes that drive in from the sides and bounce over a textured, noisy background, one per
    horizontal band (so they never overlap and each is a separate object to find). The scene
    starts empty, as a fixed camera would, so the background model learns the background alone.
    Sizes and speeds scale with the frame."""

    COLOURS = ((40, 40, 230), (40, 200, 40), (230, 120, 30), (30, 220, 230), (200, 40, 200))
    NOISE_FRAMES = 8  # background noise cycles through this many precomputed frames

    def __init__(self, width: int, height: int, seed: int = 7) -> None:
        self.width, self.height = width, height
        rng = np.random.default_rng(seed)
        band = height / len(self.COLOURS)
        self.shapes = []
        for i, colour in enumerate(self.COLOURS):
            size = band * rng.uniform(0.35, 0.6)
            circle = i % 2 == 1
            w = int(size) if circle else int(size * rng.uniform(1.0, 1.5))
            h = int(size)
            vx = width * rng.uniform(0.004, 0.012) * rng.choice((-1, 1))
            start = -w - vx if vx > 0 else width - vx  # out of view in the first frame
            self.shapes.append(_Shape(circle, w, h, start, i * band + (band - h) / 2, vx,
                                      band * rng.uniform(0.01, 0.04), i * band, (i + 1) * band, colour))
        self.backgrounds = self._backgrounds(rng)
        self.n = 0

    def _backgrounds(self, rng: np.random.Generator) -> List[np.ndarray]:
        """A vertical grey gradient with a few fixed blocks, plus Gaussian noise (sigma 4)."""
        ramp = np.linspace(60, 140, self.height, dtype=np.float32)[:, None, None]
        base = np.repeat(np.repeat(ramp, self.width, axis=1), 3, axis=2)
        for _ in range(6):
            x, y = int(rng.uniform(0, self.width * 0.9)), int(rng.uniform(0, self.height * 0.9))
            grey = float(rng.uniform(30, 200))
            cv2.rectangle(base, (x, y), (x + self.width // 10, y + self.height // 12), (grey, grey, grey), -1)
        noise = np.empty(base.shape, np.float32)
        frames = []
        for _ in range(self.NOISE_FRAMES):
            cv2.randn(noise, 0.0, 4.0)
            frames.append(np.clip(base + noise, 0, 255).astype(np.uint8))
        return frames

    def render(self, frame: np.ndarray) -> List[Box]:
        """Draw the next frame into ``frame`` (height x width x 3, uint8); the boxes of the shapes
        at least half in view, clipped to the frame."""
        np.copyto(frame, self.backgrounds[self.n % self.NOISE_FRAMES])
        self.n += 1
        truth = []
        for s in self.shapes:
            s.x += s.vx
            s.y += s.vy
            s.entered = s.entered or 0 <= s.x <= self.width - s.width
            if s.entered and not 0 <= s.x <= self.width - s.width:
                s.vx = -s.vx
                s.x = min(max(s.x, 0), self.width - s.width)
            if not s.top <= s.y <= s.bottom - s.height:
                s.vy = -s.vy
                s.y = min(max(s.y, s.top), s.bottom - s.height)
            x, y = int(s.x), int(s.y)
            if s.circle:
                radius = s.width // 2
                cv2.circle(frame, (x + radius, y + radius), radius, s.colour, -1)
            else:
                cv2.rectangle(frame, (x, y), (x + s.width - 1, y + s.height - 1), s.colour, -1)
            left, right = max(x, 0), min(x + s.width, self.width)
            if 2 * (right - left) >= s.width:
                truth.append([left, y, right - left, s.height])
        return truth


# ----- the routines -----

class Capture(SourceRoutine):
    """Plays ``frames`` frames (0: no limit) at ``fps`` from ``video`` (a file path or camera index)
    or from a ``size`` synthetic scene, then sends an end-of-stream message and, once the sinks
    named in ``sinks`` have reported ``SINK_DONE``, the ``kill`` event.

    Messages: ``frame_number`` (1, 2, ...), ``timestamp`` (time.time() at capture), ``frame``
    (in the wire's shared memory) and, for the synthetic scene, ``truth`` (the shapes' boxes).
    """

    def __init__(self, video: Optional[str | int], size: Tuple[int, int], fps: float, frames: int,
                 sinks: Sequence[str], name: str = "source") -> None:
        super().__init__(name)
        self.video, self.size, self.frames, self.sinks = video, size, frames, sinks
        self.set_const_fps(fps)

    def setup(self) -> None:
        self.n = 0
        self.ended = False
        self.kill_sent = False
        self.waiting = set(self.sinks)
        self.capture = self.scene = None
        if self.video is None:
            self.scene = SyntheticScene(*self.size)
            return
        self.capture = cv2.VideoCapture(self.video)
        if not self.capture.isOpened():
            raise RuntimeError(f"cannot open video {self.video!r}: check the path or camera index")
        self.size = (int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))

    def main_logic(self) -> Optional[Dict[str, Any]]:
        if self.ended:
            self._kill_when_sinks_done()
            return None
        if self.frames and self.n >= self.frames:
            return self._end()
        width, height = self.size
        frame = self.shared_array((height, width, 3))
        message: Dict[str, Any] = {"frame_number": self.n + 1, "timestamp": time.time()}
        if self.scene is not None:
            message["truth"] = self.scene.render(frame)
        else:
            ok, frame = self.capture.read(frame)  # decodes into the shared array when the size matches
            if not ok:
                return self._end()
        self.n += 1
        message["frame"] = frame
        return message

    def _end(self) -> Dict[str, Any]:
        self.ended = True
        self.deadline = time.monotonic() + SINK_TIMEOUT
        self.logger.info("end of the video after %d frames: waiting for %s to finish", self.n, sorted(self.waiting))
        return {"end": True, "frames": self.n}

    def _kill_when_sinks_done(self) -> None:
        if self.kill_sent:
            return
        if self.waiting and time.monotonic() < self.deadline:
            return
        if self.waiting:
            self.logger.warning("%s did not finish within %.0f s; killing the pipe anyway", sorted(self.waiting),
                                SINK_TIMEOUT)
        self.kill_sent = True
        self.notify_event("kill")

    @events("SINK_DONE")
    def sink_done(self, sink: str) -> None:
        """A sink has written everything up to the end-of-stream message."""
        self.waiting.discard(sink)

    def cleanup(self) -> None:
        if self.capture is not None:
            self.capture.release()


class Detector(MiddleRoutine):
    """Finds moving objects: MOG2 background subtraction on a frame shrunk to about 640 px wide,
    an opening (drops noise) and a closing (fills holes), then the outer contours whose area is
    at least ``min_area`` full-frame pixels. Adds ``boxes`` ([x, y, w, h]) to the message."""

    def __init__(self, min_area: int = 300, name: str = "detector") -> None:
        super().__init__(name)
        self.min_area = min_area

    def setup(self) -> None:
        self.subtractor = cv2.createBackgroundSubtractorMOG2(history=BACKGROUND_FRAMES, varThreshold=25,
                                                             detectShadows=False)
        self.kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        self.model_started = False

    def main_logic(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if data.get("end"):
            return data
        frame = data["frame"]
        scale = max(1, round(frame.shape[1] / DETECTION_WIDTH))
        small = cv2.resize(frame, (frame.shape[1] // scale, frame.shape[0] // scale), interpolation=cv2.INTER_AREA)
        mask = self.subtractor.apply(small, learningRate=1.0 / BACKGROUND_FRAMES)
        if not self.model_started:  # MOG2 marks all of its first frame as foreground: it only starts the model
            self.model_started = True
            return dict(data, boxes=[])
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self.kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, self.kernel)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = [[v * scale for v in cv2.boundingRect(c)] for c in contours
                 if cv2.contourArea(c) * scale * scale >= self.min_area]
        return dict(data, boxes=boxes)

    @events("SET_MIN_AREA")
    def set_min_area(self, min_area: int) -> None:
        """Ignore objects smaller than ``min_area`` pixels from now on."""
        if not isinstance(min_area, int) or isinstance(min_area, bool) or min_area < 0:
            raise ValueError(f"min_area must be a whole number of pixels >= 0, not {min_area!r}")
        self.logger.info("min_area %d -> %d", self.min_area, min_area)
        self.min_area = min_area


class Tracker(MiddleRoutine):
    """Gives detections stable ids and draws them. Each track takes the nearest free detection
    whose centre is within the track's size; a track lives ``max_missed`` frames without one.
    Boxes, ids and an FPS line are drawn on a copy of the frame (received frames are read-only
    shared memory). Sends ``objects`` ([{"id", "box"}]) and that copy."""

    def __init__(self, max_missed: int = 10, name: str = "tracker") -> None:
        super().__init__(name)
        self.max_missed = max_missed

    def setup(self) -> None:
        self.tracks: Dict[int, Dict[str, Any]] = {}  # id -> {"box", "missed"}
        self.next_id = 1
        self.last: Optional[float] = None
        self.interval: Optional[float] = None  # moving average of the time between frames

    def _match(self, boxes: List[Box]) -> List[Dict[str, Any]]:
        pairs = sorted((math.dist(_centre(box), _centre(track["box"])), track_id, index)
                       for track_id, track in self.tracks.items() for index, box in enumerate(boxes))
        ids: Dict[int, int] = {}  # box index -> track id
        taken = set()
        for distance, track_id, index in pairs:
            if distance <= max(self.tracks[track_id]["box"][2:]) and index not in ids and track_id not in taken:
                ids[index] = track_id
                taken.add(track_id)
        for index in range(len(boxes)):
            if index not in ids:
                ids[index] = self.next_id
                self.next_id += 1
        for track_id, track in list(self.tracks.items()):
            track["missed"] += 1
            if track["missed"] > self.max_missed:
                del self.tracks[track_id]
        for index, track_id in ids.items():
            self.tracks[track_id] = {"box": boxes[index], "missed": 0}
        return [{"id": ids[index], "box": box} for index, box in enumerate(boxes)]

    def main_logic(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if data.get("end"):
            return data
        now = time.perf_counter()
        if self.last is not None:
            self.interval = now - self.last if self.interval is None else 0.9 * self.interval + 0.1 * (now - self.last)
        self.last = now
        objects = self._match(data["boxes"])
        frame = self.shared_array(data["frame"].shape)
        np.copyto(frame, data["frame"])
        for found in objects:
            x, y, w, h = found["box"]
            cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), WHITE, 2)
            cv2.putText(frame, str(found["id"]), (x, max(y - 6, 14)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, WHITE, 2)
        fps = 1.0 / self.interval if self.interval else 0.0
        cv2.putText(frame, f"frame {data['frame_number']}  {fps:.1f} fps  {len(objects)} objects", (10, 28),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.8, WHITE, 2)
        message = {"frame_number": data["frame_number"], "timestamp": data["timestamp"], "frame": frame,
                   "objects": objects}
        if "truth" in data:
            message["truth"] = data["truth"]
        return message


class _Sink(DestinationRoutine):
    """A destination that measures source-to-sink latency on receipt and, at the end-of-stream
    message (or at kill), closes its output, logs a summary and tells the source ``SINK_DONE``."""

    def setup(self) -> None:
        self.latencies: List[float] = []
        self.finished = False

    def main_logic(self, data: Dict[str, Any]) -> None:
        if data.get("end"):
            self._finish(data["frames"])
            self.notify_event("SINK_DONE", sink=self.name)
            return
        self.latencies.append(time.time() - data["timestamp"])
        self.write(data)

    def _finish(self, sent: Optional[int]) -> None:
        if self.finished:
            return
        self.finished = True
        self.close()
        received = len(self.latencies)
        counts = f"{received} frames" if sent is None else f"{received} of {sent} frames ({sent - received} dropped)"
        ms = sorted(1e3 * s for s in self.latencies) or [0.0]
        self.logger.info("%s to %s; latency source->sink mean %.1f ms, p99 %.1f ms", counts, self.path,
                         sum(ms) / len(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))])

    def cleanup(self) -> None:
        self._finish(None)

    def write(self, data: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class VideoWriter(_Sink):
    """Writes the annotated frames to ``path`` (mp4v), at ``fps``."""

    def __init__(self, path: str, fps: float, name: str = "video_writer") -> None:
        super().__init__(name)
        self.path, self.fps = path, fps

    def setup(self) -> None:
        super().setup()
        self.writer = None

    def write(self, data: Dict[str, Any]) -> None:
        frame = data["frame"]
        if self.writer is None:  # the frame size is known at the first frame
            self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*VIDEO_FOURCC), self.fps,
                                          (frame.shape[1], frame.shape[0]))
            if not self.writer.isOpened():
                raise RuntimeError(f"OpenCV cannot write {VIDEO_FOURCC} video to {self.path}")
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


class DetectionLog(_Sink):
    """Appends one JSON line per frame to ``path``: frame number, capture timestamp, latency,
    the tracked objects (id and box) and the ground truth boxes if the source knows them."""

    def __init__(self, path: str, name: str = "json_logger") -> None:
        super().__init__(name)
        self.path = path

    def setup(self) -> None:
        super().setup()
        self.file = open(self.path, "w", buffering=1)

    def write(self, data: Dict[str, Any]) -> None:
        record = {"frame": data["frame_number"], "timestamp": data["timestamp"],
                  "latency_ms": round(1e3 * self.latencies[-1], 2), "objects": data["objects"]}
        if "truth" in data:
            record["truth"] = data["truth"]
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


# ----- the pipe -----

def _setting(value: Any, variable: str, default: str) -> str:
    return str(value) if value is not None else os.environ.get(variable) or default


def create_pipe(seconds: Optional[float] = None, video: Optional[str] = None, size: Optional[str] = None,
                fps: Optional[float] = None, out: Optional[str] = None) -> Pipe:
    """The unbuilt demo pipe; each argument left out comes from its PIPERT_DEMO_* variable (see the
    module docstring). Bad settings raise ValueError at once, before any process starts."""
    seconds_ = float(_setting(seconds, "PIPERT_DEMO_SECONDS", "20"))
    fps_ = float(_setting(fps, "PIPERT_DEMO_FPS", "30"))
    video_text = _setting(video, "PIPERT_DEMO_VIDEO", "")
    size_text = _setting(size, "PIPERT_DEMO_SIZE", "1280x720")
    out_ = _setting(out, "PIPERT_DEMO_OUT", "out")
    try:
        width, height = (int(v) for v in size_text.lower().split("x"))
    except ValueError:
        raise ValueError(f"PIPERT_DEMO_SIZE {size_text!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if width < 160 or height < 120 or seconds_ < 0 or fps_ <= 0:
        raise ValueError(f"the demo needs a size of at least 160x120 (got {size_text}), seconds >= 0 "
                         f"(got {seconds_}) and fps > 0 (got {fps_})")
    source_video: Optional[str | int] = None
    if video_text.isdigit():
        source_video = int(video_text)
    elif video_text:
        if not os.path.isfile(video_text):
            raise ValueError(f"PIPERT_DEMO_VIDEO {video_text!r} is neither a file nor a camera index")
        source_video = video_text
    os.makedirs(out_, exist_ok=True)

    writer = VideoWriter(os.path.join(out_, VIDEO_NAME), fps_)
    log = DetectionLog(os.path.join(out_, LOG_NAME))
    source = Capture(source_video, (width, height), fps_, round(seconds_ * fps_), sinks=(writer.name, log.name))
    detector, tracker = Detector(), Tracker()
    pipe = Pipe(logger=demo_logger())
    pipe.create_flow("capture", False, source)
    pipe.create_flow("detection", False, detector)
    pipe.create_flow("tracking", False, tracker)
    pipe.create_flow("output", False, writer, log)
    pipe.link(Wire(source=source, destinations=(detector,), policy="latest", depth=1),
              Wire(source=detector, destinations=(tracker,), policy="latest", depth=1),
              Wire(source=tracker, destinations=(writer, log), policy="block", depth=4))
    return pipe


def demo_logger() -> logging.Logger:
    """The terminal at INFO and, when SOCKET_LOGGER_URL is set (environment or .env), the PipeRT
    cockpit with everything it shows: routines, FPS (PIPE_INFRASTRUCTURE records) and frames."""
    logger = get_socket_logger("pipe", PIPE_INFRASTRUCTURE)
    console = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    if not console:
        console = [logging.StreamHandler()]
        logger.addHandler(console[0])
    for handler in console:
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(FrameFilter())  # frames go to the cockpit and the dashboard, not the terminal
    return logger


def main() -> None:
    """Run the demo without control servers until the source ends it; print what every routine did."""
    pipe = create_pipe()
    pipe.build()
    started = time.monotonic()
    pipe.notify_event("start")
    pipe.join()
    status = pipe.status()
    print(f"\nRan for {time.monotonic() - started:.1f} s (counts include the end-of-stream message):")
    for name, routine in status["routines"].items():
        print(f"  {name:13} flow {routine['flow']:10} in {routine['messages_in']:6} out {routine['messages_out']:6}")
    for wire in status["wires"]:
        print(f"  wire {wire['source']} -> {wire['destination']}: dropped {wire['dropped']}")


if __name__ == "__main__":
    main()
