"""Benchmark scenarios for our pipert, run with the project's .venv.

One scenario per invocation (``--scenario small|frame|fanout``); the result is
printed as one ``BENCH_RESULT {json}`` line. Mirrors pipert2_scenarios.py: same
timeline, same messages, same checks (bench/common.py); only the glue differs:
- routines subclass SourceRoutine / DestinationRoutine; a source's
  ``main_logic(self)`` takes no data;
- each flow is its own process, so destinations report through JSON files;
- the wire policy is chosen per scenario (default "block": lossless, the
  source waits when the destination is behind);
- the source fills each frame (common.FrameMaker) into ``self.shared_array``,
  which lives in the wire's shared memory and is sent without a copy
  (``--frame-buffer own`` fills a plain array instead, which the transport
  copies on send, as PipeRT 2 does); frames arrive as read-only views.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402
from pipert import DestinationRoutine, Pipe, SourceRoutine, Wire  # noqa: E402

DEFAULT_DEPTH = {"small": 256, "frame": 4, "fanout": 4}


class Source(SourceRoutine):
    """Sends counter + timestamp (+ a stamped 1080p frame) as fast as allowed."""

    def __init__(self, state, frame_buffer):
        super().__init__(state.name)
        self.state = state
        self.frame_buffer = frame_buffer

    def setup(self):
        self.state.start()

    def main_logic(self):
        shared = self.state.scenario != "small" and self.frame_buffer == "shared"
        buffer = self.shared_array(common.FRAME_SHAPE, np.uint8) if shared else None
        tag, counter, frame, checksum = self.state.next(buffer)
        if frame is None:
            return {"counter": counter, "ts": time.perf_counter(), "tag": tag}
        return {"frame": frame, "counter": counter, "checksum": checksum, "tag": tag,
                "ts": time.perf_counter()}


class Sink(DestinationRoutine):
    """Checks every message and records rate and latency per phase."""

    def __init__(self, state):
        super().__init__(state.name)
        self.state = state

    def setup(self):
        self.state.start()

    def main_logic(self, data):
        received = time.perf_counter()
        self.state.receive(received, data["tag"], data["counter"], data["ts"], data.get("frame"),
                           data.get("checksum"))

    def cleanup(self):
        self.state.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--policy", choices=("block", "latest"), default="block",
                        help="wire policy (default: block, lossless)")
    parser.add_argument("--depth", type=int, help="wire depth (default: 256 small, 4 frames)")
    parser.add_argument("--frame-buffer", choices=("shared", "own"), default="shared",
                        help="fill frames into self.shared_array (default) or a plain array")
    args = parser.parse_args()
    warmup, run, runs = common.durations(args)
    phases = common.build_phases(args.scenario, warmup, run, runs)
    depth = args.depth if args.depth is not None else DEFAULT_DEPTH[args.scenario]
    n_dest = 3 if args.scenario == "fanout" else 1
    out_dir = tempfile.mkdtemp(prefix="bench-pipert-")

    pipe = Pipe()
    source = Source(common.SourceState("source", args.scenario, phases, out_dir, args.fill == "full"),
                    args.frame_buffer)
    sinks = [Sink(common.SinkState("sink-%d" % i, out_dir)) for i in range(n_dest)]
    pipe.create_flow("source_flow", False, source)
    for i, sink in enumerate(sinks):
        pipe.create_flow("sink_flow_%d" % i, False, sink)
    pipe.link(Wire(source=source, destinations=tuple(sinks), policy=args.policy, depth=depth))

    names = [source.name] + [sink.name for sink in sinks]
    info = common.drive(pipe, out_dir, names, common.planned_seconds(phases), args.timeout)
    result = {
        "impl": "pipert",
        "version": getattr(sys.modules["pipert"], "__version__", "dev"),
        "scenario": args.scenario,
        "config": {"policy": args.policy, "depth": depth, "frame_buffer": args.frame_buffer, "fill": args.fill,
                   "warmup_s": warmup, "run_s": run, "runs": runs},
        "driver": info,
    }
    result.update(common.collect(out_dir, source.name, [sink.name for sink in sinks]))
    wires = _wire_status(pipe)
    if wires is not None:
        result["wires"] = wires
    result["shm_leftovers"] = _shm_leftovers(getattr(pipe, "id", None))
    common.emit(result)
    shutil.rmtree(out_dir, ignore_errors=True)
    if info["shutdown"] == "hung":
        os._exit(0)


def _wire_status(pipe):
    """The wires' drop counters from Pipe.status(), if it answers after join."""
    try:
        return pipe.status().get("wires")
    except Exception:  # the report must not fail on a status() quirk
        return None


def _shm_leftovers(pipe_id, grace=3.0):
    """Names in /dev/shm of this pipe still there ``grace`` s after join()."""
    if not pipe_id:
        return None
    prefix = "pipert_%s_" % pipe_id
    deadline = time.perf_counter() + grace
    while True:
        left = sorted(e for e in os.listdir("/dev/shm") if prefix in e)
        if not left or time.perf_counter() > deadline:
            return left
        time.sleep(0.1)


if __name__ == "__main__":
    main()
