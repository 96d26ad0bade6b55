"""Benchmark scenarios for dora-rs 1.1 (Python nodes), run in .bench-venvs/dora.

One scenario per invocation (``--scenario small|frame|fanout``); the result is
printed as one ``BENCH_RESULT {json}`` line, like pipert_scenarios.py. Same
timeline, messages and checks (bench/common.py); how dora is used:
- this script writes a dataflow YAML (a source node and 1 or 3 sink nodes, each
  this same script with ``--role``) and runs it with ``dora run``;
- lossless: every sink input has ``queue_policy: backpressure`` with a queue of
  256 (small) or 4 (frames), like pipert's block wires; the source's
  ``shared_memory_pool_size`` holds 16 frames, so frames are never throttled by it;
- small messages are pickled and sent as bytes; frames are stamped straight into
  a ``send_output_raw`` buffer (metadata first, common.META_BYTES) and received
  as a numpy view of the Arrow array: no copy on either side.
"""
import argparse
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

DEPTH = {"small": 256, "frame": 4, "fanout": 4}
POOL_FRAMES = 16


def source(args, out_dir, phases, sinks):
    from dora import Node
    node = Node()
    results = [os.path.join(out_dir, s + ".json") for s in sinks]
    size = common.buffer_bytes(args.scenario)
    loans = {}

    def make_buffer():
        sample = node.send_output_raw("data", size)
        view = sample.as_memoryview()
        loans[id(view)] = sample
        return view

    def send(meta, buffer):
        if buffer is None:
            node.send_output("data", pickle.dumps(meta, protocol=5))
            return
        common.pack_meta(buffer, meta)
        sample = loans.pop(id(buffer))
        buffer.release()
        sample.send()

    state = common.SourceState("source", args.scenario, phases, out_dir, args.fill == "full")
    common.run_peer_source(state, send, lambda: all(os.path.exists(p) for p in results),
                           make_buffer if args.scenario != "small" else None)


def sink(args, out_dir, name):
    from dora import Node
    node = Node()
    state = common.SinkState(name, out_dir)
    state.start()
    small = args.scenario == "small"
    while not state.recorder.written:
        event = node.next()
        if event is None or event["type"] == "STOP":
            break
        if event["type"] != "INPUT":
            continue
        received = time.perf_counter()
        buffer = event["value"].to_numpy(zero_copy_only=True)
        if small:
            meta, frame = pickle.loads(buffer), None
        else:
            meta, frame = common.unpack_meta(buffer), common.frame_in(buffer)
        state.receive(received, meta["tag"], meta["counter"], meta["ts"], frame, meta["checksum"])
        del event, buffer, frame  # gives the sample back to the sender before waiting for the next
    state.stop()


def dataflow(args, out_dir, sinks):
    """The dataflow YAML: nodes are this script with a role."""
    common_args = "--scenario %s --fill %s --out %s" % (args.scenario, args.fill, out_dir)
    for option in ("warmup", "run", "runs"):
        if getattr(args, option) is not None:
            common_args += " --%s %s" % (option, getattr(args, option))
    if args.quick:
        common_args += " --quick"
    pool_mb = POOL_FRAMES * common.buffer_bytes("frame") // (1 << 20) + 1
    lines = ["nodes:",
             "  - id: source",
             "    path: %s" % os.path.abspath(__file__),
             "    args: --role source %s" % common_args,
             "    shared_memory_pool_size: %dMB" % pool_mb,
             "    outputs: [data]"]
    for name in sinks:
        lines += ["  - id: %s" % name,
                  "    path: %s" % os.path.abspath(__file__),
                  "    args: --role %s %s" % (name, common_args),
                  "    inputs:",
                  "      data:",
                  "        source: source/data",
                  "        queue_size: %d" % DEPTH[args.scenario],
                  "        queue_policy: backpressure"]
    path = os.path.join(out_dir, "dataflow.yml")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warmup, run, runs = common.durations(args)
    phases = common.build_phases(args.scenario, warmup, run, runs)
    n_dest = 3 if args.scenario == "fanout" else 1
    sinks = ["sink-%d" % i for i in range(n_dest)]
    if args.role == "source":
        return source(args, args.out, phases, sinks)
    if args.role:
        return sink(args, args.out, args.role)

    out_dir = tempfile.mkdtemp(prefix="bench-dora-")
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    dora = subprocess.Popen([os.path.join(bin_dir, "dora"), "run", dataflow(args, out_dir, sinks),
                             "--log-level", os.environ.get("BENCH_DORA_LOG", "error")], cwd=out_dir, env=env, start_new_session=True)
    paths = [os.path.join(out_dir, n + ".json") for n in ["source"] + sinks]
    ok = common.wait_for_files(paths, started + common.planned_seconds(phases) + args.timeout)
    wall = time.perf_counter() - started
    try:
        shutdown = "clean"
        dora.wait(15)
    except subprocess.TimeoutExpired:
        dora.send_signal(signal.SIGINT)
        try:
            dora.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(dora.pid, signal.SIGKILL)
            dora.wait()
            shutdown = "forced"
    result = {"impl": "dora", "version": "1.1", "scenario": args.scenario,
              "config": {"depth": DEPTH[args.scenario], "fill": args.fill, "warmup_s": warmup, "run_s": run,
                         "runs": runs},
              "driver": {"results_ok": ok, "wall_s": wall, "shutdown": shutdown}}
    result.update(common.collect(out_dir, "source", sinks))
    common.emit(result)
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
