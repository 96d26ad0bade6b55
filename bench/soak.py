"""Soak run: 4 flows move 1080p frames at full speed while one flow is SIGKILLed every N seconds.

Checks that resident memory stays flat after warm-up, that no file descriptors or
/dev/shm segments leak, and that every flow keeps processing. Prints a table of
samples and a verdict; exits 1 when a check fails.

    python bench/soak.py                    # 10 minutes, a kill every 30 s (make soak)
    python bench/soak.py --seconds 30 --kill-every 6 --warmup 8
"""
import argparse
import json
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipert import DestinationRoutine, MiddleRoutine, Pipe, SourceRoutine, Wire, shm  # noqa: E402

SHAPE = (1080, 1920, 3)
FLOWS = ("capture", "process", "record", "display")


class Camera(SourceRoutine):
    """Stamps a counter into a fresh shared-memory frame, as fast as the wires allow."""

    def setup(self) -> None:
        self.n = 0

    def main_logic(self) -> dict:
        self.n += 1
        frame = self.shared_array(SHAPE)
        frame[0, :8, 0] = np.frombuffer(self.n.to_bytes(8, "little"), np.uint8)
        return {"n": self.n, "frame": frame}


class Process(MiddleRoutine):
    """Reads the frame (a read-only view of shared memory) and passes it on."""

    def main_logic(self, data: dict) -> dict:
        stamp = int.from_bytes(data["frame"][0, :8, 0].tobytes(), "little")
        if stamp != data["n"]:
            raise ValueError(f"frame {data['n']} carries stamp {stamp}")
        return data


class Sink(DestinationRoutine):
    """Checks the stamp and keeps the last frame (a held zero-copy reference)."""

    def setup(self) -> None:
        self.last = None

    def main_logic(self, data: dict) -> None:
        if int.from_bytes(data["frame"][0, :8, 0].tobytes(), "little") != data["n"]:
            raise ValueError(f"frame {data['n']} is torn")
        self.last = data["frame"]


def build() -> Pipe:
    pipe = Pipe(kill_grace=3.0)
    camera, process, record, display = Camera(name="camera"), Process(name="process"), Sink(name="record"), \
        Sink(name="display")
    for flow, routine in zip(FLOWS, (camera, process, record, display)):
        pipe.create_flow(flow, False, routine, max_restarts=1000, restart_backoff=0.2)
    pipe.link(Wire(source=camera, destinations=(process, display)), Wire(source=process, destinations=(record,)))
    pipe.build()
    return pipe


def _kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def sample(pipe: Pipe, started: float) -> dict:
    """One measurement of the whole daemon: memory, fds, segments, counters."""
    status = pipe.status()
    pids = [os.getpid()] + [f["pid"] for f in status["flows"].values() if f["alive"] and f["pid"]]
    return {
        "t": round(time.monotonic() - started, 1),
        "rss_mib": round(sum(_kib(p, "VmRSS") for p in pids) / 1024, 1),
        "anon_mib": round(sum(_kib(p, "RssAnon") for p in pids) / 1024, 1),
        "fds": sum(_fds(p) for p in pids),
        "segments": len([e for e in shm.leftovers() if f"_{pipe.id}_" in e]),
        "out": {name: r["messages_out"] for name, r in status["routines"].items()},
        "in": {name: r["messages_in"] for name, r in status["routines"].items()},
        "restarts": sum(f["restarts"] for f in status["flows"].values()),
        "alive": sum(f["alive"] for f in status["flows"].values()),
    }


def soak(seconds: float, kill_every: float, warmup: float, interval: float = 5.0) -> dict:
    """Run the soak and return the samples and the checks."""
    pipe = build()
    samples, kills = [], 0
    try:
        pipe.notify_event("start")
        started = time.monotonic()
        next_kill, next_sample = started + kill_every, started
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(sample(pipe, started))
                next_sample += interval
            if now >= next_kill:
                flow = FLOWS[kills % len(FLOWS)]
                pid = pipe.status()["flows"][flow]["pid"]
                if pipe.status()["flows"][flow]["alive"]:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                next_kill += kill_every
            time.sleep(0.1)
        time.sleep(1.0)
        samples.append(sample(pipe, started))
    finally:
        pipe.join(to_kill=True)
    return {"samples": samples, "kills": kills, "checks": checks(samples, warmup, interval, pipe.id)}


def checks(samples: list, warmup: float, interval: float, pipe_id: str) -> dict:
    """RSS growth after warm-up, fd and segment counts, progress of every routine."""
    settled = [s for s in samples if s["t"] >= warmup]
    first, last = settled[0], settled[-1]
    growth = (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    stalled = []
    for earlier, later in zip(settled, settled[1:]):
        for name, count in later["in"].items():
            if name != "camera" and count == earlier["in"][name] and later["t"] - earlier["t"] >= interval:
                stalled.append((later["t"], name))
    return {
        "rss_growth_pct": round(100 * growth, 2),
        "rss_ok": growth < 0.05,
        "fds_ok": last["fds"] <= first["fds"] + 2,
        "segments_ok": last["segments"] <= first["segments"],
        "segments_after_join": len([e for e in shm.leftovers() if f"_{pipe_id}_" in e]),
        "stalled": stalled,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--kill-every", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--json", help="also write the samples and checks to this file")
    args = parser.parse_args()
    result = soak(args.seconds, args.kill_every, args.warmup)
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'anon MiB':>9} {'fds':>5} {'segs':>5} {'alive':>5} {'restarts':>8}  "
          "frames in (process, record, display)")
    for s in result["samples"]:
        print(f"{s['t']:>7} {s['rss_mib']:>8} {s['anon_mib']:>9} {s['fds']:>5} {s['segments']:>5} {s['alive']:>5} "
              f"{s['restarts']:>8}  {s['in']['process']}, {s['in']['record']}, {s['in']['display']}")
    c = result["checks"]
    print(f"\nflows killed: {result['kills']}; RSS growth after warm-up: {c['rss_growth_pct']} % "
          f"({'ok' if c['rss_ok'] else 'TOO MUCH'}); fds {'flat' if c['fds_ok'] else 'LEAKING'}; "
          f"segments {'flat' if c['segments_ok'] else 'LEAKING'}, {c['segments_after_join']} after join; "
          f"stalled routines: {c['stalled'] or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ok = c["rss_ok"] and c["fds_ok"] and c["segments_ok"] and not c["segments_after_join"] and not c["stalled"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
