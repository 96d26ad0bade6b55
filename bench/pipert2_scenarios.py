"""Benchmark scenarios for PipeRT 2.4.0 (``pipert2``), run in bench/.venv-pipert2.

One scenario per invocation (``--scenario small|frame|fanout``); the result is
printed as one ``BENCH_RESULT {json}`` line. run.py starts this script with
the PipeRT 2 venv's interpreter.

How PipeRT 2 is used here, and the quirks that shape it:
- routines subclass ``FPSRoutine``; a source's ``main_logic(self, data)`` gets
  ``None`` and is called in a tight loop (no delay unless an FPS is set);
  default names are ``<Class>-0`` for every instance, so names are explicit;
- each flow is a forked process; routines are threads in it; the pipe's
  default logger prints at INFO to stdout, so a quiet logger is passed;
- ``QueueNetwork`` defaults (used here, its fastest setting on our machine):
  queues of 1 and a non-blocking put that drops when full; even paced runs
  lose a few messages. Each put also sleeps 1 µs (~60 µs in practice), which
  caps a source near 10,000 messages/s, and every get deep-copies the message;
- the destination's queue worker thread force-pushes into a thread queue of
  the same size, so no setting makes it lossless;
- the source fills one of its own buffers with each frame (common.FrameMaker);
- frames go through ``SharedMemoryTransmitter``, which only handles values
  inside ``dict`` fields of a ``Data`` dataclass, so the frame and its
  metadata travel in ``Data.additional_data``. Integers in that dict would be
  turned into ``bytes(n)`` (n zero bytes) by the transmitter, so the counter and
  checksum travel as floats (exact below 2**53).
"""
import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from pipert2 import (  # noqa: E402
    BasicTransmitter, Data, FPSRoutine, Pipe, QueueNetwork, SharedMemoryTransmitter, Wire,
)
import pipert2  # noqa: E402


class Source(FPSRoutine):
    """Sends counter + timestamp (+ a stamped 1080p frame) as fast as allowed."""

    def __init__(self, state):
        super().__init__(state.name)
        self.state = state

    def setup(self):
        self.state.start()

    def main_logic(self, data=None):
        tag, counter, frame, checksum = self.state.next()
        if frame is None:
            return {"counter": counter, "ts": time.perf_counter(), "tag": tag}
        out = Data()
        out.additional_data = {"frame": frame, "counter": float(counter),
                               "checksum": float(checksum), "tag": tag,
                               "ts": time.perf_counter()}
        return out


class Sink(FPSRoutine):
    """Checks every message and records rate and latency per phase."""

    def __init__(self, state):
        super().__init__(state.name)
        self.state = state

    def setup(self):
        self.state.start()

    def main_logic(self, data):
        received = time.perf_counter()
        if isinstance(data, dict):
            self.state.receive(received, data["tag"], data["counter"], data["ts"])
            return None
        fields = data.additional_data
        self.state.receive(received, fields["tag"], int(fields["counter"]), fields["ts"], fields["frame"],
                           int(fields["checksum"]))
        return None

    def cleanup(self):
        self.state.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--queue-size", type=int, default=1,
                        help="QueueNetwork max_queue_sizes (PipeRT default: 1)")
    parser.add_argument("--put-block", action="store_true",
                        help="QueueNetwork put_block=True (PipeRT default: False, drop)")
    args = parser.parse_args()
    warmup, run, runs = common.durations(args)
    phases = common.build_phases(args.scenario, warmup, run, runs)
    n_dest = 3 if args.scenario == "fanout" else 1
    out_dir = tempfile.mkdtemp(prefix="bench-pipert2-")

    logger = logging.getLogger("bench-pipert2")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)

    network = QueueNetwork(max_queue_sizes=args.queue_size, put_block=args.put_block)
    pipe = Pipe(network=network, logger=logger, data_transmitter=BasicTransmitter())
    source = Source(common.SourceState("source", args.scenario, phases, out_dir, args.fill == "full"))
    sinks = [Sink(common.SinkState("sink-%d" % i, out_dir)) for i in range(n_dest)]
    pipe.create_flow("source_flow", False, source)
    for i, sink in enumerate(sinks):
        pipe.create_flow("sink_flow_%d" % i, False, sink)
    transmitter = SharedMemoryTransmitter() if args.scenario != "small" else None
    pipe.link(Wire(source=source, destinations=tuple(sinks), data_transmitter=transmitter))

    names = [source.name] + [sink.name for sink in sinks]
    info = common.drive(pipe, out_dir, names, common.planned_seconds(phases), args.timeout)
    result = {
        "impl": "pipert2",
        "version": pipert2.__version__,
        "scenario": args.scenario,
        "config": {"queue_size": args.queue_size, "put_block": args.put_block,
                   "transmitter": type(transmitter).__name__ if transmitter else "BasicTransmitter",
                   "warmup_s": warmup, "run_s": run, "runs": runs},
        "driver": info,
    }
    result.update(common.collect(out_dir, source.name, [sink.name for sink in sinks]))
    common.emit(result)
    shutil.rmtree(out_dir, ignore_errors=True)
    if info["shutdown"] == "hung":
        os._exit(0)


if __name__ == "__main__":
    main()
