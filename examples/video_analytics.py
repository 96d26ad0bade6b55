"""The video-analytics demo in Python: capture -> motion detection -> tracking -> video file and JSON log.

The same pipeline as examples/video_analytics.yaml, built in code from the same
ready-made routines (``pipert plugins``), with its settings taken from the environment.
Run it as a daemon, controlled over zerorpc and HTTP::

    pipert run examples/video_analytics.py:create_pipe --rpc --api --start

or on its own, without control servers: ``python examples/video_analytics.py``.

Four flows (OS processes)::

    capture    source        a video file, a camera or (default) the synthetic scene with ground truth
    detection  detector      mog2-detector: background subtraction, morphology, contours; event SET_MIN_AREA
    tracking   tracker       stable ids
               annotate      boxes, ids and FPS drawn on a copy of the frame
    output     video_writer  annotated video, out/annotated.mp4 (mp4v)
               json_logger   one JSON line per frame, out/detections.jsonl

Wires: capture -> detection -> tracking are ``latest`` (depth 1): a slow stage gets the
newest frame and the older one is dropped and counted, so the live path never lags.
From the tracker on they are ``block`` (depth 4): every frame the tracker sees is
annotated, written to the video and to the log (when the video ends; a kill stops each
sink where it is), and a slow writer slows the tracker, so frames are dropped, and
counted, upstream instead.

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

import logging
import os
import time
from typing import Any, Optional

from pipert import PIPE_INFRASTRUCTURE, FrameFilter, Pipe, Wire, get_socket_logger
from pipert.routines.annotate import Annotate
from pipert.routines.jsonl_writer import JsonlWriter
from pipert.routines.mog2_detector import Mog2Detector
from pipert.routines.synthetic_scene import SyntheticSceneSource
from pipert.routines.tracker import Tracker
from pipert.routines.video_source import VideoSource
from pipert.routines.video_writer import VideoWriter

VIDEO_NAME = "annotated.mp4"
LOG_NAME = "detections.jsonl"


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
    if video_text and not video_text.isdigit() and not os.path.isfile(video_text):
        raise ValueError(f"PIPERT_DEMO_VIDEO {video_text!r} is neither a file nor a camera index")

    writer = VideoWriter(name="video_writer", path=os.path.join(out_, VIDEO_NAME), fps=fps_)
    log = JsonlWriter(name="json_logger", path=os.path.join(out_, LOG_NAME))
    ending = {"frames": round(seconds_ * fps_), "at_end": "kill", "wait_for": [writer.name, log.name]}
    if video_text:
        source = VideoSource(name="source", path=video_text, fps=fps_, **ending)
    else:
        source = SyntheticSceneSource(name="source", width=width, height=height, fps=fps_, **ending)
    detector, tracker, annotate = Mog2Detector(name="detector"), Tracker(name="tracker"), Annotate(name="annotate")
    pipe = Pipe(logger=demo_logger())
    pipe.create_flow("capture", False, source)
    pipe.create_flow("detection", False, detector)
    pipe.create_flow("tracking", False, tracker, annotate)
    pipe.create_flow("output", False, writer, log)
    pipe.link(Wire(source=source, destinations=(detector,), policy="latest", depth=1),
              Wire(source=detector, destinations=(tracker,), policy="latest", depth=1),
              Wire(source=tracker, destinations=(annotate,), policy="block", depth=4),
              Wire(source=annotate, destinations=(writer, log), policy="block", depth=4))
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
