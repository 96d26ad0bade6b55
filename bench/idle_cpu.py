"""CPU used by a mostly idle pipeline: 4 flows moving 1080p frames at 30 fps.

capture (30 fps, frames drawn into shared_array) -> process -> record, and
capture -> display, each in its own flow (the soak's layout), default wires;
process sends a small result on. After a warm-up, the flows' CPU time
(user + system, all threads, from /proc) is sampled over ``--seconds`` and
printed as a share of one core: ``IDLE_CPU <percent>``. The routines do almost
nothing, so this is what the transport and the runner loop cost while they
mostly wait: a busy-wait anywhere would show here.

    python bench/idle_cpu.py [--seconds 10]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipert import DestinationRoutine, MiddleRoutine, Pipe, SourceRoutine, Wire  # noqa: E402

SHAPE = (1080, 1920, 3)


class Capture(SourceRoutine):
    def __init__(self):
        super().__init__("capture")
        self.set_const_fps(30)
        self.n = 0

    def main_logic(self):
        frame = self.shared_array(SHAPE, np.uint8)
        self.n += 1
        frame[0, 0, 0] = self.n % 256
        return {"frame": frame, "n": self.n}


class Process(MiddleRoutine):
    def main_logic(self, data):
        return {"n": data["n"], "mean": int(data["frame"][0, :16, 0].mean())}


class Sink(DestinationRoutine):
    def main_logic(self, data):
        return None


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    pipe = Pipe()
    capture, process, record, display = Capture(), Process("process"), Sink("record"), Sink("display")
    for routine in (capture, process, record, display):
        pipe.create_flow(routine.name, False, routine)
    pipe.link(Wire(source=capture, destinations=(process, display)))
    pipe.link(Wire(source=process, destinations=(record,)))
    pipe.build()
    try:
        pipe.notify_event("start")
        time.sleep(2.0)
        pids = [state.pid for state in pipe._states.values()]
        before, started = cpu_seconds(pids), time.monotonic()
        time.sleep(args.seconds)
        used = (cpu_seconds(pids) - before) / (time.monotonic() - started)
        sink_in = pipe.status()["routines"]["record"]["messages_in"]
    finally:
        pipe.join(to_kill=True)
    print("4 flows, 30 fps of 1080p frames: %.2f %% of one core (record got %d results)" % (100 * used, sink_in))
    print("IDLE_CPU %.3f" % (100 * used))


if __name__ == "__main__":
    main()
