"""Benchmark scenarios for iceoryx2 0.10 (Python bindings), run in .bench-venvs/iceoryx2.

One scenario per invocation (``--scenario small|frame|fanout``); the result is
printed as one ``BENCH_RESULT {json}`` line, like pipert_scenarios.py. Same
timeline, messages and checks (bench/common.py); how iceoryx2 is used:
- one process per node (forked before any iceoryx2 object exists), a
  publish-subscribe service of ``Slice[c_uint8]`` and an event service whose
  listener the subscriber waits on (the publisher notifies after each send);
- lossless: ``BackpressureStrategy.RetryUntilDelivered``, subscriber buffers of
  256 (small) or 4 (frames), like pipert's block wires;
- small messages are pickled into a loaned slice of their length (a Python user
  sending objects must serialise them); frames are stamped straight into a loaned
  slice (metadata first, common.META_BYTES), viewed as numpy on both sides: no copy;
- a subscriber attaches to the publishers that exist at its ``has_samples()``: each
  sink waits for the publisher, calls it, then says it is ready, and the source
  starts only when every sink is ready.
"""
import argparse
import ctypes
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import iceoryx2 as iox  # noqa: E402

import common  # noqa: E402

DEPTH = {"small": 256, "frame": 4, "fanout": 4}


def _services(name, scenario, n_dest):
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    data = (node.service_builder(iox.ServiceName.new(name)).publish_subscribe(iox.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(DEPTH[scenario]).max_subscribers(max(n_dest, 2))
            .history_size(0).enable_safe_overflow(False).open_or_create())
    wake = node.service_builder(iox.ServiceName.new(name + "-wake")).event().max_listeners(max(n_dest, 2)) \
        .open_or_create()
    return node, data, wake


def _view(address, size):
    return (ctypes.c_uint8 * size).from_address(address)


def source(args, name, out_dir, phases, sinks):
    _, data, wake = _services(name, args.scenario, len(sinks))
    size = common.buffer_bytes(args.scenario)
    publisher = (data.publisher_builder().initial_max_slice_len(size if args.scenario != "small" else 256)
                 .allocation_strategy(iox.AllocationStrategy.PowerOfTwo)
                 .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered)
                 .max_loaned_samples(2).create())
    notifier = wake.notifier_builder().create()
    ready = [os.path.join(out_dir, s + ".ready") for s in sinks]
    results = [os.path.join(out_dir, s + ".json") for s in sinks]
    while not all(os.path.exists(p) for p in ready):
        publisher.update_connections()
        time.sleep(0.01)
    publisher.update_connections()
    loans = {}

    def make_buffer():
        sample = publisher.loan_slice_uninit(size)
        view = _view(sample.payload().as_ptr(), size)
        loans[id(view)] = sample
        return view

    def send(meta, buffer):
        if buffer is None:
            body = pickle.dumps(meta, protocol=5)
            sample = publisher.loan_slice_uninit(len(body))
            ctypes.memmove(sample.payload().as_ptr(), body, len(body))
        else:
            common.pack_meta(memoryview(buffer).cast("B"), meta)
            sample = loans.pop(id(buffer))
        sample.assume_init().send()
        notifier.notify()

    state = common.SourceState("source", args.scenario, phases, out_dir, args.fill == "full")
    common.run_peer_source(state, send, lambda: all(os.path.exists(p) for p in results),
                           make_buffer if args.scenario != "small" else None)


def sink(args, name, out_dir, sink_name, n_dest):
    _, data, wake = _services(name, args.scenario, n_dest)
    subscriber = data.subscriber_builder().buffer_size(DEPTH[args.scenario]).create()
    listener = wake.listener_builder().create()
    while data.dynamic_config.number_of_publishers < 1:
        time.sleep(0.01)
    subscriber.has_samples()  # attaches the subscriber to the publisher that now exists
    state = common.SinkState(sink_name, out_dir)
    state.start()
    with open(os.path.join(out_dir, sink_name + ".ready"), "w"):
        pass
    small = args.scenario == "small"
    timeout = iox.Duration.from_millis(200)
    while not state.recorder.written:
        sample = subscriber.receive()
        if sample is None:
            listener.timed_wait(timeout)
            continue
        received = time.perf_counter()
        payload = sample.payload()
        buffer = memoryview(_view(payload.as_ptr(), payload.len())).cast("B")
        if small:
            meta, frame = pickle.loads(buffer), None
        else:
            meta, frame = common.unpack_meta(buffer), common.frame_in(buffer)
        state.receive(received, meta["tag"], meta["counter"], meta["ts"], frame, meta["checksum"])
        del frame, buffer, payload
        sample.delete()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    args = parser.parse_args()
    warmup, run, runs = common.durations(args)
    phases = common.build_phases(args.scenario, warmup, run, runs)
    n_dest = 3 if args.scenario == "fanout" else 1
    out_dir = tempfile.mkdtemp(prefix="bench-iceoryx2-")
    name = "pipert-bench-%d" % os.getpid()
    sinks = ["sink-%d" % i for i in range(n_dest)]
    iox.set_log_level_from_env_or(iox.LogLevel.Error)

    started = time.perf_counter()
    children = []
    for role in sinks + ["source"]:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if role == "source":
                    source(args, name, out_dir, phases, sinks)
                else:
                    sink(args, name, out_dir, role, n_dest)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children.append(pid)
    paths = [os.path.join(out_dir, n + ".json") for n in ["source"] + sinks]
    ok = common.wait_for_files(paths, started + common.planned_seconds(phases) + args.timeout)
    wall = time.perf_counter() - started
    deadline = time.monotonic() + 10
    while children and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            children.remove(pid)
        else:
            time.sleep(0.05)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    result = {"impl": "iceoryx2", "version": "0.10", "scenario": args.scenario,
              "config": {"depth": DEPTH[args.scenario], "fill": args.fill, "warmup_s": warmup, "run_s": run,
                         "runs": runs},
              "driver": {"results_ok": ok, "wall_s": wall, "shutdown": "clean" if not children else "forced"}}
    result.update(common.collect(out_dir, "source", sinks))
    common.emit(result)
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
