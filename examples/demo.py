"""A small three-flow pipeline: synthetic 720p frames -> brightness -> report.

Runs for a few seconds (``--seconds``), then prints what every routine did.
"""
import argparse
import time

import numpy as np

from pipert import DestinationRoutine, MiddleRoutine, Pipe, SourceRoutine, Wire


class Camera(SourceRoutine):
    """Draws a moving bright square on a dark 720p frame, 30 times a second."""

    def setup(self) -> None:
        self.n = 0

    def main_logic(self) -> dict:
        time.sleep(1 / 30)
        self.n += 1
        frame = np.zeros((720, 1280, 3), np.uint8)
        x = (self.n * 8) % 1180
        frame[300:400, x:x + 100] = 255
        return {"n": self.n, "frame": frame, "sent": time.perf_counter()}


class Brightness(MiddleRoutine):
    def main_logic(self, data: dict) -> dict:
        return {"n": data["n"], "mean": float(data["frame"].mean()), "sent": data["sent"]}


class Report(DestinationRoutine):
    def setup(self) -> None:
        self.latencies = []

    def main_logic(self, data: dict) -> None:
        self.latencies.append(time.perf_counter() - data["sent"])
        if data["n"] % 30 == 0:
            self.logger.info("frame %d: mean brightness %.2f", data["n"], data["mean"])

    def cleanup(self) -> None:
        if self.latencies:
            ordered = sorted(self.latencies)
            self.logger.info("%d frames, latency p50 %.2f ms, p99 %.2f ms", len(ordered),
                             ordered[len(ordered) // 2] * 1e3, ordered[int(len(ordered) * 0.99)] * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    seconds = parser.parse_args().seconds
    pipe = Pipe()
    camera, brightness, report = Camera(), Brightness(), Report()
    pipe.create_flow("capture", False, camera)
    pipe.create_flow("analysis", False, brightness)
    pipe.create_flow("output", False, report)
    pipe.link(Wire(source=camera, destinations=(brightness,)), Wire(source=brightness, destinations=(report,)))
    pipe.build()
    pipe.notify_event("start")
    time.sleep(seconds)
    status = pipe.status()
    pipe.join(to_kill=True)
    print(f"\nRan for {seconds:.0f} s:")
    for name, routine in status["routines"].items():
        print(f"  {name:14} flow={routine['flow']:9} in={routine['messages_in']:5} out={routine['messages_out']:5} "
              f"fps={routine['fps']}")
    for wire in status["wires"]:
        print(f"  wire {wire['source']} -> {wire['destination']}: dropped {wire['dropped']}")


if __name__ == "__main__":
    main()
