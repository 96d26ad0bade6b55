"""`python bench/record.py`: what recording costs the pipe, and how faithfully replay keeps time.

  overhead  1280x720 frames from a source flow to a sink flow, over a lossless wire: frames/s
            at full speed without and with recording (runs interleaved, medians), and at a
            camera's 30 frames/s the frames recorded and dropped.
  timing    the synthetic demo scene (640x360, 30 fps) recorded for ``--seconds``, then replayed
            at rate 1.0 while the replay's own output is recorded: per message, the error of
            its spacing to the previous one against the original's, in ms (p50, p99, max), and
            how much longer than the original the replay took (late messages delay the
            following ones, so this adds up); for reference, the live source's own jitter against its
            period, which shows how busy the machine was.
Prints one line per figure and a final ``BENCH_RESULT`` JSON line.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from pipert import DestinationRoutine, Pipe, SourceRoutine, Wire
from pipert.recording import read_messages
from pipert.routines.replay import Replay
from pipert.routines.synthetic_scene import SyntheticSceneSource


class Frames(SourceRoutine):
    """1280x720 frames filled from a prepared image, as a camera writes a new one."""

    def __init__(self, fps=None, name="frames"):
        super().__init__(name)
        self.set_const_fps(fps)

    def setup(self):
        self.image = np.random.default_rng(1).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
        self.n = 0

    def main_logic(self):
        self.n += 1
        frame = self.shared_array(self.image.shape)
        np.copyto(frame, self.image)
        return {"n": self.n, "frame": frame}


class Drop(DestinationRoutine):
    def main_logic(self, data):
        pass


def _quiet_pipe():
    import logging
    logger = logging.getLogger("bench-record")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return Pipe(logger=logger, wire_policy="block", wire_depth=4)


def _frames_run(folder, record, seconds, fps=None):
    pipe = _quiet_pipe()
    source, sink = Frames(fps), Drop(name="sink")
    pipe.create_flow("a", False, source)
    pipe.create_flow("b", False, sink)
    pipe.link(Wire(source=source, destinations=(sink,), policy="block", depth=4))
    pipe.build()
    try:
        if record:
            pipe.record(os.path.join(folder, "overhead.mcap"))
        pipe.notify_event("start")
        time.sleep(1.0)
        before, started = pipe.status()["routines"]["frames"]["messages_out"], time.monotonic()
        time.sleep(seconds)
        sent = pipe.status()["routines"]["frames"]["messages_out"] - before
        rate = sent / (time.monotonic() - started)
        recording = pipe.stop_recording() if record else None
    finally:
        pipe.join(to_kill=True)
    return rate, recording


def overhead(folder, seconds, runs):
    plain, recorded = [], []
    for _ in range(runs):
        plain.append(_frames_run(folder, False, seconds)[0])
        recorded.append(_frames_run(folder, True, seconds)[0])
    _, camera = _frames_run(folder, True, seconds, fps=30)
    result = {"full_speed_fps": round(statistics.median(plain), 1),
              "full_speed_recording_fps": round(statistics.median(recorded), 1),
              "camera_recorded": camera["messages"]["frames"], "camera_dropped": camera["dropped"]["frames"]}
    print(f"overhead: full speed {result['full_speed_fps']} frames/s, while recording "
          f"{result['full_speed_recording_fps']} frames/s (ratio "
          f"{result['full_speed_recording_fps'] / result['full_speed_fps']:.2f}); at 30 frames/s "
          f"{result['camera_recorded']} recorded, {result['camera_dropped']} dropped")
    return result


def _run_until_done(pipe, path, wires, done):
    pipe.build()
    try:
        pipe.record(path, wires=wires, images=False, queue=64)
        pipe.notify_event("start")
        while not done(pipe) and any(f["alive"] for f in pipe.status()["flows"].values()):
            time.sleep(0.1)
        pipe.stop_recording()
    finally:
        pipe.join(to_kill=True)


def timing(folder, seconds):
    original = os.path.join(folder, "scene.mcap")
    frames = int(seconds * 30)
    pipe = _quiet_pipe()
    scene = SyntheticSceneSource(name="source", width=640, height=360, fps=30.0, frames=frames, at_end="kill")
    pipe.create_flow("capture", True, scene, Drop(name="sink"))
    _run_until_done(pipe, original, ["source"],
                    lambda p: p.status()["routines"]["sink"]["messages_in"] >= frames)
    replayed = os.path.join(folder, "replayed.mcap")
    pipe = _quiet_pipe()
    pipe.create_flow("replay", True, Replay(name="source", path=original, channel="source"), Drop(name="sink"))
    _run_until_done(pipe, replayed, ["source"],
                    lambda p: p.status()["routines"]["sink"]["messages_in"] >= frames)
    was = np.array([m.log_time for m in read_messages(original, ["source"])][:frames], dtype=np.int64)
    now = np.array([m.log_time for m in read_messages(replayed, ["source"])][:frames], dtype=np.int64)
    spacing = np.abs(np.diff(now) - np.diff(was)) / 1e6
    drift = ((now[-1] - now[0]) - (was[-1] - was[0])) / 1e6  # late messages delay those after them

    def figures(errors):
        return {"p50": round(float(np.percentile(errors, 50)), 3), "p99": round(float(np.percentile(errors, 99)), 3),
                "max": round(float(errors.max()), 3)}

    live = np.diff(was) / 1e6
    live = np.abs(live - np.median(live))  # the live source against its own period: this machine's noise
    result = {"messages": len(now), "spacing_error_ms": figures(spacing), "drift_ms": round(float(drift), 3),
              "within_2ms": round(float((spacing <= 2.0).mean()), 4), "live_jitter_ms": figures(live),
              "live_within_2ms": round(float((live <= 2.0).mean()), 4)}
    print(f"timing: {len(now)} messages at rate 1.0; spacing error p50 {result['spacing_error_ms']['p50']} ms, "
          f"p99 {result['spacing_error_ms']['p99']} ms, max {result['spacing_error_ms']['max']} ms "
          f"({100 * result['within_2ms']:.1f} % within 2 ms); it ended {result['drift_ms']} ms after the "
          f"original's length; for reference the live "
          f"source's own jitter p50 {result['live_jitter_ms']['p50']} ms, p99 {result['live_jitter_ms']['p99']} ms "
          f"({100 * result['live_within_2ms']:.1f} % within 2 ms)")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="full-speed runs with and without recording")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = {"timing": timing(folder, args.seconds), "overhead": overhead(folder, args.seconds / 2, args.runs)}
    print("BENCH_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
