"""Instructions per small message through the real runner loops, counted by callgrind.

Wall-clock figures on a shared machine vary too much to see a few per cent, so
this counts instructions instead: a source's and a sink's ``_Runner._run``
loops run one after the other in one thread (the source fills a deep ``block``
ring with N small dicts, then the sink takes them), under valgrind's callgrind
with a fixed hash seed. The per-message figure is the slope between two N, so
start-up cancels out. ``--rev REV`` also measures the pipert package of a git
revision (extracted to a temporary directory) for a before/after ratio:

    .venv/bin/python bench/runner_instructions.py --rev main

Needs valgrind; takes a few minutes per tree.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMALL, LARGE = 2000, 22000


def loops(count: int) -> None:
    """Run the two runner loops over ``count`` messages (in the process under callgrind)."""
    from pipert import DestinationRoutine, Pipe, SourceRoutine, Wire, shm
    from pipert.flow import Event, _Runner

    runners = {}

    class Source(SourceRoutine):
        sent = 0

        def main_logic(self):
            self.sent += 1
            if self.sent == count:
                runners["source"].events.append(Event(2, "kill"))
            return {"counter": self.sent, "ts": 0.5, "tag": "tp0"}

    class Sink(DestinationRoutine):
        got = 0

        def main_logic(self, data):
            self.got += 1
            if self.got == count:
                runners["sink"].events.append(Event(2, "kill"))

    class Flow:
        class pipe:
            _frames_per_second = 2.0
        failed = False
        frames = None

        def ack(self, *args):
            pass

    pipe = Pipe(wire_policy="block", wire_depth=count + 10, ring_capacity=64 << 20)
    source, sink = Source(name="source"), Sink(name="sink")
    pipe.create_flow("a", False, source)
    pipe.create_flow("b", False, sink)
    pipe.link(Wire(source=source, destinations=(sink,)))
    pipe._plan(pipe._validate())
    try:
        for name, routine in (("source", source), ("sink", sink)):
            runner = runners[name] = _Runner(routine, pipe._plans[routine.name], Flow())
            runner.events.append(Event(1, "start"))
            runner._run()
    finally:
        shm.unlink_owned(pipe.id)


def instructions(tree: str, count: int) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
               os.path.abspath(__file__), "--loops", str(count), "--tree", tree]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise SystemExit(f"callgrind failed for {tree}:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_message(tree: str) -> float:
    started = time.monotonic()
    figure = (instructions(tree, LARGE) - instructions(tree, SMALL)) / (LARGE - SMALL)
    sys.stderr.write(f"{tree}: {figure:,.0f} instructions/message ({time.monotonic() - started:.0f} s)\n")
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="also measure the pipert package of this git revision")
    parser.add_argument("--loops", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loops:
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, args.tree)
        loops(args.loops)
        return
    current = per_message(ROOT)
    if args.rev:
        with tempfile.TemporaryDirectory(prefix="pipert-rev-") as tree:
            archive = subprocess.run(["git", "archive", args.rev, "pipert"], cwd=ROOT, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            before = per_message(tree)
        print(f"{args.rev}: {before:,.0f}  this tree: {current:,.0f} instructions/message "
              f"({100 * (current / before - 1):+.1f} %)")
    else:
        print(f"this tree: {current:,.0f} instructions/message")


if __name__ == "__main__":
    main()
