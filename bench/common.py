"""Helpers shared by the scenario scripts of both implementations.

Both ``pipert_scenarios.py`` (our engine) and ``pipert2_scenarios.py`` (PipeRT
2.4.0, in its own venv) import this module, so it needs only the standard
library and numpy. It holds the source's timeline, the frame stamping and
checks, and the destination's recorder, so both sides measure the same way.

Timing: every stamp is ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux),
taken by the source and compared at the destination in another process.
"""
import json
import os
import pickle
import struct
import sys
import time

import numpy as np

FRAME_SHAPE = (1080, 1920, 3)
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1] * FRAME_SHAPE[2]
# Byte offsets where the source writes the counter (uint64): first pixels,
# middle, last pixels. A torn or stale frame shows a mismatch at one of them.
STAMP_OFFSETS = (0, (FRAME_BYTES // 2) & ~7, FRAME_BYTES - 8)
SAMPLE_STRIDE = 997          # prime stride: the checksum sample, ~6,200 bytes
NO_CHECKSUM = -1             # the checksum of a frame that was only stamped (not computed)
# The source stamps each frame before sending it: the counter at three places.
# By default it does not redraw all 6 MB (--fill stamp): the benchmark measures
# moving frames between flows, not drawing them, and every implementation does
# the same work per frame; the three stamps show a torn or stale frame. With
# --fill full the source first copies one of IMAGES prepared images into the
# buffer, as a camera or decoder writing a new frame would, and adds a checksum
# over a strided sample, which the destination checks too (the content changes
# per frame, so this shows a frame seen half-filled); 1/t (one numpy.copyto)
# then bounds the rate. The checksum is left out of stamped frames: its ~6,200
# scattered reads cost 10-25 µs per side, more than moving the frame, which
# would make the stamped rows measure memory latency instead of the transport. The buffer: PipeRT 2 uses one of
# FRAME_RING plain arrays (prepared once, copied by its transmitter); pipert
# uses an array from Routine.shared_array, sent in place. A FRAME_RING buffer
# is reused only FRAME_RING frames after it was returned, long after the
# transport copied it on send.
IMAGES = 2
FRAME_RING = 8
END_TAG = "end"

# Durations (seconds) of the full run and of the --quick smoke run.
FULL = {"warmup": 2.0, "run": 5.0, "runs": 3}
QUICK = {"warmup": 0.5, "run": 1.0, "runs": 3}
# Paced rates (messages/s) for the latency runs.
LATENCY_RATE = {"small": 1000.0, "frame": 30.0}


def add_common_args(parser):
    """Add the options both scenario scripts take."""
    parser.add_argument("--scenario", required=True, choices=("small", "frame", "fanout"))
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--fill", choices=("stamp", "full"), default="stamp",
                        help="frames: only stamp the buffer (default) or copy a full image into it first")
    parser.add_argument("--warmup", type=float, help="warm-up seconds")
    parser.add_argument("--run", type=float, help="seconds per measured run")
    parser.add_argument("--runs", type=int, help="number of measured runs")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for results beyond the planned duration")


def durations(args):
    """Return (warmup, run, runs) from the parsed arguments."""
    base = QUICK if args.quick else FULL
    warmup = args.warmup if args.warmup is not None else base["warmup"]
    run = args.run if args.run is not None else base["run"]
    runs = args.runs if args.runs is not None else base["runs"]
    return warmup, run, runs


def build_phases(scenario, warmup, run, runs):
    """The source's timeline: list of (tag, seconds, period); period 0 = full speed.

    Throughput runs ``tp0..`` go at full speed. Latency runs ``lat0..`` are paced
    (an idle pipeline, one message at a time) so that latency is transit time,
    not time spent waiting in a full queue. Fan-out measures throughput only.
    """
    phases = [("warmup", warmup, 0.0)]
    phases += [("tp%d" % i, run, 0.0) for i in range(runs)]
    if scenario in LATENCY_RATE:
        period = 1.0 / LATENCY_RATE[scenario]
        phases.append(("lwarm", min(0.5, warmup), period))
        phases += [("lat%d" % i, run, period) for i in range(runs)]
    return phases


def planned_seconds(phases):
    """Total planned duration of a timeline."""
    return sum(seconds for _, seconds, _ in phases)


class Schedule:
    """Source-side clock: which phase the next message belongs to, with pacing.

    After the last phase it returns END_TAG at 20 messages/s until killed, so a
    lossy transport still delivers an end marker.
    """

    def __init__(self, phases, end_period=0.05):
        self.phases = list(phases) + [(END_TAG, float("inf"), end_period)]
        self.index = 0
        self.phase_end = None
        self.next_tick = None
        self.sent = {}

    def next_tag(self):
        """Sleep if the current phase is paced, then return its tag."""
        now = time.perf_counter()
        if self.phase_end is None:
            self.phase_end = now + self.phases[0][1]
        while now >= self.phase_end:
            self.index += 1
            self.phase_end += self.phases[self.index][1]
        tag, _, period = self.phases[self.index]
        if period:
            if self.next_tick is None or self.next_tick < now - period:
                self.next_tick = now
            delay = self.next_tick - now
            if delay > 0:
                time.sleep(delay)
            self.next_tick += period
        else:
            self.next_tick = None
        self.sent[tag] = self.sent.get(tag, 0) + 1
        return tag


def make_frames(count, seed=1234):
    """Random 1080p frames."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=FRAME_SHAPE, dtype=np.uint8) for _ in range(count)]


class FrameMaker:
    """Source side: stamp the counter into a buffer, after filling it with the next image if ``fill``."""

    def __init__(self, fill):
        self.images = make_frames(IMAGES)
        self.fill = fill
        self.ring = None

    def produce(self, counter, buffer=None):
        """Return (frame, checksum); ``buffer`` None means one of our own ring."""
        if buffer is None:
            if self.ring is None:
                self.ring = [self.images[i % IMAGES].copy() for i in range(FRAME_RING)]
            buffer = self.ring[counter % FRAME_RING]
        if not self.fill:
            stamp_frame(buffer, counter)
            return buffer, NO_CHECKSUM
        np.copyto(buffer, self.images[counter % IMAGES])
        stamp_frame(buffer, counter)
        return buffer, frame_checksum(buffer)


class SourceState:
    """What both implementations' sources do per message: follow the phase schedule,
    count, report what was sent once the run ends, and stamp frames."""

    def __init__(self, name, scenario, phases, out_dir, fill):
        self.name, self.scenario, self.phases, self.out_dir, self.fill = name, scenario, phases, out_dir, fill
        self.schedule = self.maker = None
        self.counter = 0
        self.reported = False

    def start(self):
        """Reset for a run (in the routine's setup, inside the flow process)."""
        self.schedule = Schedule(self.phases)
        self.counter = 0
        self.reported = False
        if self.scenario != "small":
            self.maker = FrameMaker(self.fill)

    def next(self, buffer=None):
        """(tag, counter, frame, checksum) of the next message; frame and checksum are None
        for small messages. ``buffer`` is where to put the frame (None: the maker's own)."""
        tag = self.schedule.next_tag()
        if tag == END_TAG and not self.reported:
            self.reported = True
            write_json(os.path.join(self.out_dir, self.name + ".json"),
                       {"name": self.name, "sent": dict(self.schedule.sent)})
        counter = self.counter
        self.counter += 1
        if self.scenario == "small":
            return tag, counter, None, None
        frame, checksum = self.maker.produce(counter, buffer)
        return tag, counter, frame, checksum


class SinkState:
    """What both implementations' sinks do per message: check it and record it."""

    def __init__(self, name, out_dir):
        self.name, self.out_dir = name, out_dir
        self.recorder = None

    def start(self):
        """Start recording (in the routine's setup, inside the flow process)."""
        self.recorder = Recorder(self.name, self.out_dir)

    def receive(self, received, tag, counter, ts, frame=None, checksum=None):
        """Record one message received at ``received``; frames are verified."""
        problem = None if frame is None else verify_frame(frame, counter, checksum)
        self.recorder.add(received, tag, counter, ts, problem)

    def stop(self):
        """Write what was recorded if the run ended early (in the routine's cleanup)."""
        if self.recorder is not None and not self.recorder.written:
            self.recorder.write(complete=False)


# Peers without a message format of their own (iceoryx2, dora-rs) carry one message as a
# byte buffer: a u32 length, the pickled metadata, then (frames) the 1080p frame at
# META_BYTES, so the frame is a view of the transport's shared memory on both sides.
META_BYTES = 256
_META_LEN = struct.Struct("=I")


def buffer_bytes(scenario):
    """Bytes of one message buffer for a peer: metadata room, plus a frame."""
    return META_BYTES + (0 if scenario == "small" else FRAME_BYTES)


def frame_in(buffer):
    """The 1080p frame inside a peer's message buffer (a view, no copy)."""
    return np.frombuffer(buffer, np.uint8, FRAME_BYTES, META_BYTES).reshape(FRAME_SHAPE)


def pack_meta(buffer, meta):
    """Write ``meta`` (pickled) at the start of a peer's message buffer; return its length."""
    body = pickle.dumps(meta, protocol=5)
    _META_LEN.pack_into(buffer, 0, len(body))
    buffer[_META_LEN.size:_META_LEN.size + len(body)] = body
    return _META_LEN.size + len(body)


def unpack_meta(buffer):
    """The metadata a peer's message buffer starts with."""
    size = _META_LEN.unpack_from(buffer, 0)[0]
    return pickle.loads(buffer[_META_LEN.size:_META_LEN.size + size])


def run_peer_source(state, send, all_done, make_buffer=None):
    """The source loop shared by the peers: one message per schedule tick until every
    destination reported (``all_done()``). Small messages: ``send(meta, None)``. Frames:
    ``make_buffer()`` gives a message buffer in the transport's own memory, the frame is
    stamped into it in place (no copy) and ``send(meta, buffer)`` sends it."""
    state.start()
    while not (state.reported and all_done()):
        buffer = make_buffer() if make_buffer is not None else None
        tag, counter, frame, checksum = state.next(None if buffer is None else frame_in(buffer))
        del frame  # a transport may refuse to send while a view of its buffer is alive
        send({"counter": counter, "tag": tag, "checksum": checksum, "ts": time.perf_counter()}, buffer)


def frame_checksum(frame):
    """Cheap checksum: sum of a strided sample of the frame's bytes."""
    return int(frame.reshape(-1)[::SAMPLE_STRIDE].sum(dtype=np.uint64))


def stamp_frame(frame, counter):
    """Write the counter into the frame at STAMP_OFFSETS."""
    flat = frame.reshape(-1)
    for offset in STAMP_OFFSETS:
        flat[offset:offset + 8].view(np.uint64)[0] = counter


def verify_frame(frame, counter, checksum):
    """Return None if the frame is intact for this counter, else what is wrong."""
    if not isinstance(frame, np.ndarray):
        return "frame is %s, not a numpy array" % type(frame).__name__
    if frame.shape != FRAME_SHAPE or frame.dtype != np.uint8:
        return "frame has shape %s dtype %s" % (frame.shape, frame.dtype)
    flat = frame.reshape(-1)
    for offset in STAMP_OFFSETS:
        stamped = int(flat[offset:offset + 8].view(np.uint64)[0])
        if stamped != counter:
            return "counter %d but frame stamped %d at byte %d" % (counter, stamped, offset)
    if checksum == NO_CHECKSUM:
        return None
    actual = frame_checksum(frame)
    if actual != checksum:
        return "counter %d: checksum %d, expected %d" % (counter, actual, checksum)
    return None


class Recorder:
    """Destination-side statistics per phase tag, and the integrity checks.

    ``add`` is called once per received message. When the first END_TAG
    message arrives the summary is written to ``<out_dir>/<name>.json``.
    """

    def __init__(self, name, out_dir):
        self.name = name
        self.out_dir = out_dir
        self.tags = {}
        self.last_counter = -1
        self.received = 0
        self.lost = 0
        self.errors = 0
        self.first_errors = []
        self.written = False

    def error(self, text):
        """Count an integrity error; keep the first few for the report."""
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(text)

    def add(self, now, tag, counter, ts, problem=None):
        """Record one message received at ``now`` (perf_counter)."""
        self.received += 1
        if problem is not None:
            self.error(problem)
        if counter <= self.last_counter:
            self.error("counter %d after %d" % (counter, self.last_counter))
        else:
            self.lost += counter - self.last_counter - 1
            self.last_counter = counter
        if tag == END_TAG:
            if not self.written:
                self.write(complete=True)
            return
        stats = self.tags.get(tag)
        if stats is None:
            stats = self.tags[tag] = {"count": 0, "first": now, "last": now, "lat": []}
        stats["count"] += 1
        stats["last"] = now
        stats["lat"].append(now - ts)

    def summary(self, complete):
        """JSON-able summary: rate and latency per tag, loss and errors."""
        tags = {}
        for tag, stats in self.tags.items():
            lat = np.asarray(stats["lat"], dtype=np.float64)
            span = stats["last"] - stats["first"]
            tags[tag] = {
                "count": stats["count"],
                "span_s": span,
                "rate": (stats["count"] - 1) / span if span > 0 else 0.0,
                "lat_p50_us": float(np.percentile(lat, 50) * 1e6) if len(lat) else None,
                "lat_p99_us": float(np.percentile(lat, 99) * 1e6) if len(lat) else None,
                "lat_min_us": float(lat.min() * 1e6) if len(lat) else None,
                "lat_negative": int((lat < 0).sum()),
            }
            if tags[tag]["lat_negative"]:  # clocks not comparable: a broken measurement
                self.error("%d negative latencies in %s" % (tags[tag]["lat_negative"], tag))
        return {
            "name": self.name,
            "complete": complete,
            "received": self.received,
            "last_counter": self.last_counter,
            "lost": self.lost,
            "errors": self.errors,
            "first_errors": self.first_errors,
            "tags": tags,
        }

    def write(self, complete):
        """Write the summary atomically; ``complete`` is False from cleanup()."""
        self.written = True
        write_json(os.path.join(self.out_dir, self.name + ".json"), self.summary(complete))


def write_json(path, obj):
    """Write JSON atomically (tmp file + rename), so a reader never sees half."""
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(obj, handle)
    os.replace(tmp, path)


def wait_for_files(paths, deadline, poll=0.1):
    """Wait until every path exists or the deadline (perf_counter) passes."""
    while time.perf_counter() < deadline:
        if all(os.path.exists(path) for path in paths):
            return True
        time.sleep(poll)
    return all(os.path.exists(path) for path in paths)


def collect(out_dir, source_name, destination_names):
    """Read the result files of one scenario run; missing ones become None."""
    def load(name):
        path = os.path.join(out_dir, name + ".json")
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)

    return {
        "source": load(source_name),
        "destinations": {name: load(name) for name in destination_names},
    }


def emit(result):
    """Print one machine-readable result line for run.py to parse."""
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def measure_copyto(repeat=200):
    """Median seconds of numpy.copyto of one 1080p frame: (warm: the same two buffers every
    time, cached as far as 6 MB can be; cycling: FRAME_RING sources into 12 destinations,
    as a pipeline copies frames it has not touched for a while into pool slots)."""
    src = make_frames(1)[0]
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    sources = [src.copy() for _ in range(FRAME_RING)]
    targets = [np.empty_like(src) for _ in range(12)]
    for target in targets:
        np.copyto(target, src)
    cycling = []
    for n in range(repeat // 2):
        start = time.perf_counter()
        np.copyto(targets[n % len(targets)], sources[n % len(sources)])
        cycling.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.median(cycling))


def child_pids():
    """PIDs of this process's direct children, read from /proc."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == me:
            pids.append(int(entry))
    return pids


def kill_children():
    """SIGKILL the direct children of this process (the flows it started)."""
    import signal
    killed = []
    for pid in child_pids():
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    return killed


def drive(pipe, out_dir, names, planned, timeout, shutdown_timeout=30.0):
    """Build and start ``pipe``, wait for the result files of ``names``, kill it.

    Works for both implementations: they share build(), notify_event("start")
    and join(to_kill=True). Returns a dict with the timings of start-up and
    shutdown, ``results_ok`` and how the shutdown went ("clean", or "forced"
    when join() did not return and the flow processes had to be killed).
    """
    import threading

    info = {}
    t0 = time.perf_counter()
    pipe.build()
    info["build_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    pipe.notify_event("start")
    paths = [os.path.join(out_dir, name + ".json") for name in names]
    info["results_ok"] = wait_for_files(paths, t1 + planned + timeout)
    info["wall_s"] = time.perf_counter() - t1

    done = threading.Event()
    forced = []

    def watchdog():
        if not done.wait(shutdown_timeout):
            forced.extend(kill_children())

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    t2 = time.perf_counter()
    joiner = threading.Thread(target=pipe.join, kwargs={"to_kill": True}, daemon=True)
    joiner.start()
    joiner.join(shutdown_timeout + 10.0)
    done.set()
    info["join_s"] = time.perf_counter() - t2
    if joiner.is_alive():
        info["shutdown"] = "hung"
    elif forced:
        info["shutdown"] = "forced"
    else:
        info["shutdown"] = "clean"
    info["killed_pids"] = forced
    return info
