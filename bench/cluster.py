"""`make bench` (second part): pipert across Ray nodes, and replicated routines.

1. Cross-node wires, on a local Ray cluster (``ray.cluster_utils``: a head and
   nodes "a" and "b" on this host, so the "network" is loopback): small dicts
   and 1080x1920x3 uint8 frames from a source flow on node a to a destination
   flow on node b (``block`` wire, lossless; every message checked), against
   a plain Ray baseline: an actor on node a calling an actor on node b with the
   message as argument, up to 8 calls in flight. Target: pipert >= 2x Ray's
   frames/s.
2. Replication scaling, no cluster: source -> middle routine that burns 20 ms
   of CPU per message -> sink, with the middle flow's replicas 1 and 2.
   Target: >= 1.8x on 2 free cores (other work on the machine lowers it).

Prints a table and one ``BENCH_RESULT`` JSON line. ``--quick`` runs fewer messages.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# The local cluster stays on loopback: Ray takes 127.0.0.1 as the node address (read at import).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(HERE))

from pipert import DestinationRoutine, MiddleRoutine, Pipe, SourceRoutine, Wire  # noqa: E402

SHAPE = (1080, 1920, 3)
STORE = 200 << 20


class Source(SourceRoutine):
    """Sends ``count`` messages as fast as the wire takes them: frames (stamped) or small dicts."""

    def __init__(self, count, frames, name=None):
        super().__init__(name)
        self.count, self.frames, self.n = count, frames, 0

    def main_logic(self):
        if self.n >= self.count:
            time.sleep(0.05)
            return None
        self.n += 1
        if not self.frames:
            return {"n": self.n, "tag": "bench"}
        frame = self.shared_array(SHAPE)
        frame[0, 0] = (self.n % 251, self.n // 251 % 251, 7)
        return {"n": self.n, "frame": frame}


class Burn(MiddleRoutine):
    """Burns ``ms`` milliseconds of CPU per message."""

    def __init__(self, ms, name=None):
        super().__init__(name)
        self.ms = ms

    def main_logic(self, data):
        end = time.thread_time() + self.ms / 1000
        while time.thread_time() < end:
            pass
        return data


class Sink(DestinationRoutine):
    """Checks every message arrives, in order and intact; writes the rate once ``count`` arrived."""

    def __init__(self, count, warmup, path, ordered=True, name=None):
        super().__init__(name)
        self.count, self.warmup, self.path, self.ordered = count, warmup, path, ordered

    def setup(self):
        self.seen, self.last, self.bad, self.started = 0, 0, 0, None

    def main_logic(self, data):
        n = data["n"]
        self.seen += 1
        if self.ordered and n != self.last + 1:
            self.bad += 1
        self.last = n
        frame = data.get("frame")
        if frame is not None and (tuple(frame[0, 0]) != (n % 251, n // 251 % 251, 7) or frame.flags.writeable):
            self.bad += 1
        if self.seen == self.warmup:
            self.started = time.perf_counter()
        if self.seen == self.count:
            rate = (self.count - self.warmup) / (time.perf_counter() - self.started)
            with open(self.path, "w") as f:
                json.dump({"rate": rate, "bad": self.bad, "seen": self.seen}, f)


def _wait_result(path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            with open(path) as f:
                return json.load(f)
        time.sleep(0.05)
    raise RuntimeError(f"no result in {path} within {timeout} s")


def run_pipe(count, frames, cluster=None, burn_ms=0.0, replicas=1, warmup=None):
    """Messages per second through one pipe; cross-node when ``cluster`` is given."""
    warmup = warmup if warmup is not None else max(count // 10, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        pipe = Pipe(cluster=cluster, wire_policy="block", wire_depth=8)
        source, sink = Source(count, frames), Sink(count, warmup, path, ordered=replicas == 1)
        pipe.create_flow("source", False, source, resources={"a": 1} if cluster else None)
        pipe.create_flow("sink", False, sink, resources={"b": 1} if cluster else None)
        if burn_ms:
            burn = Burn(burn_ms)
            pipe.create_flow("burn", False, burn, replicas=replicas)
            pipe.link(Wire(source=source, destinations=(burn,)), Wire(source=burn, destinations=(sink,)))
        else:
            pipe.link(Wire(source=source, destinations=(sink,)))
        pipe.build()
        try:
            pipe.notify_event("start")
            return _wait_result(path, 300)
        finally:
            pipe.join(to_kill=True)


def ray_baseline(ray, count, frames):
    """Messages per second from an actor on node a to an actor on node b, as call arguments."""

    @ray.remote(num_cpus=0, resources={"b": 1})
    class Consumer:
        def __init__(self):
            self.seen = 0

        def consume(self, message):
            self.seen += 1
            return self.seen

    @ray.remote(num_cpus=0, resources={"a": 1})
    class Producer:
        def run(self, consumer, count, frames, window=8):
            frame = np.zeros(SHAPE, np.uint8) if frames else None
            pending, started = [], None
            for n in range(count):
                if n == count // 10:
                    ray.get(pending)
                    pending, started = [], time.perf_counter()
                message = {"n": n, "frame": frame} if frames else {"n": n, "tag": "bench"}
                pending.append(consumer.consume.remote(message))
                if len(pending) >= window:
                    ray.wait(pending, num_returns=1)
                    pending = pending[1:]
            ray.get(pending)
            return (count - count // 10) / (time.perf_counter() - started)

    consumer, producer = Consumer.remote(), Producer.remote()
    try:
        return ray.get(producer.run.remote(consumer, count, frames))
    finally:
        ray.kill(producer)
        ray.kill(consumer)


def cross_node(quick):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE})
    try:
        cluster.add_node(num_cpus=1, resources={"a": 1}, object_store_memory=STORE)
        cluster.add_node(num_cpus=1, resources={"b": 1}, object_store_memory=STORE)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        small, frames = (3000, 150) if quick else (20000, 600)
        results = {
            "cross_node_small_pipert": run_pipe(small, False, cluster.address),
            "cross_node_frame_pipert": run_pipe(frames, True, cluster.address),
            "cross_node_small_ray": {"rate": ray_baseline(ray, small // 4, False)},
            "cross_node_frame_ray": {"rate": ray_baseline(ray, frames // 2, True)},
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    results = cross_node(args.quick)
    burned = 40 if args.quick else 150
    results["replicas_1"] = run_pipe(burned, False, burn_ms=20, replicas=1, warmup=10)
    results["replicas_2"] = run_pipe(burned, False, burn_ms=20, replicas=2, warmup=10)
    frame_ratio = results["cross_node_frame_pipert"]["rate"] / results["cross_node_frame_ray"]["rate"]
    small_ratio = results["cross_node_small_pipert"]["rate"] / results["cross_node_small_ray"]["rate"]
    scaling = results["replicas_2"]["rate"] / results["replicas_1"]["rate"]
    print(f"{'scenario':34} {'pipert':>10} {'ray':>10} {'ratio':>7}  target")
    print(f"{'cross-node small msgs/s':34} {results['cross_node_small_pipert']['rate']:10.0f} "
          f"{results['cross_node_small_ray']['rate']:10.0f} {small_ratio:7.2f}")
    print(f"{'cross-node 1080p frames/s':34} {results['cross_node_frame_pipert']['rate']:10.0f} "
          f"{results['cross_node_frame_ray']['rate']:10.0f} {frame_ratio:7.2f}  >= 2.0 "
          f"{'met' if frame_ratio >= 2 else 'MISSED'}")
    print(f"{'20 ms CPU stage, replicas 1 -> 2':34} {results['replicas_1']['rate']:10.1f} "
          f"{results['replicas_2']['rate']:10.1f} {scaling:7.2f}  >= 1.8 {'met' if scaling >= 1.8 else 'MISSED'}"
          "  (msgs/s with 1 | 2 replicas)")
    print(f"load average at the start: {load:.1f} on {os.cpu_count()} cores (replication needs free cores to scale)")
    bad = sum(r.get("bad", 0) for r in results.values())
    print("BENCH_RESULT " + json.dumps(dict(results, frame_ratio=frame_ratio, small_ratio=small_ratio,
                                            replica_scaling=scaling, integrity_errors=bad, load_average=load)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
