"""Recording a running pipe's wires into one MCAP file without slowing the pipe.

Three parts (the file format is in ``pipert.recording``):

- ``FlowTap``, in every flow process with a recorded routine: right after the
  routine's thread has sent a message, it appends a reference to it to a short
  queue (``queue`` messages; when full the message is dropped from the
  recording and counted), and returns. An encoder thread turns each message
  into bytes (JSON or pickle) and, where it holds an image, a JPEG, then lets go
  of it, so a frame in a wire's shared-memory pool is held only briefly; the
  bytes wait in a second queue bounded by ``buffer`` bytes (drops counted) for a
  sender thread that writes them to the writer over a Unix socket.
- the writer, a process of its own (``writer_main``): it owns the
  file, writes chunks through ``mcap.Writer``, finishes a chunk at least every
  ``flush_interval`` seconds, and reports its counters to the daemon on stdout.
  A slow disk fills the sockets, then the flows' queues: the routines never wait.
- ``Recording``, in the daemon: opens the file (so a bad path fails at once),
  starts the writer, tells the flows what to tap, keeps the counters that
  ``Pipe.status()`` shows, and stops it all.
"""
from __future__ import annotations

import collections
import importlib.metadata
import itertools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Dict, List, Optional, Sequence

from . import recording
from .errors import RecordError
from .frames import encode_jpeg, find_frame

COMPRESSIONS = ("none", "lz4", "zstd")
_REPORT_INTERVAL = 0.5  # seconds between the writer's counter reports, and a tap's drop reports
_STOP_GRACE = 0.3  # seconds the writer waits at stop for flows still connecting
_STOP_WAIT = 5.0  # seconds the writer waits at stop for flows to send what they hold
_READY_TIMEOUT = 30.0
_NICE = 10  # the recorder's threads and process run at this nice level: the pipe comes first
_WRITER_QUEUE = 32  # messages between the writer's socket readers and its file
_WRITER_COMMAND = "import sys; from pipert.recorder import writer_main; sys.exit(writer_main())"
_log = logging.getLogger(__name__)
_numbers = itertools.count(1)


# ----- in a flow process -----

class FlowTap:
    """Takes the messages that a flow's recorded routines send and ships them to the writer."""

    def __init__(self, settings: Dict[str, Any]) -> None:
        self.routines: List[str] = list(settings["routines"])
        self._depth = settings["queue"]
        self._budget = settings["buffer"]
        self._images = settings["images"]
        self._quality = settings["jpeg_quality"]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(settings["address"])
        except OSError:
            sock.close()
            raise
        self._conn = Connection(sock.detach())
        self._pending: collections.deque = collections.deque()
        self._encoded: collections.deque = collections.deque()
        self._bytes_in = self._bytes_out = 0  # each written by one thread only
        self._full: collections.Counter = collections.Counter()  # routine threads: the queue was full
        self._over: collections.Counter = collections.Counter()  # encoder thread: over budget or not encodable
        self._wake_encoder = threading.Event()
        self._wake_sender = threading.Event()
        self._closing = False
        self._encoder = threading.Thread(target=self._encode_loop, name="pipert-record-encode", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="pipert-record-send", daemon=True)
        self._encoder.start()
        self._sender.start()

    def offer(self, routine: str, data: Any, source_time: float) -> None:
        """Called by ``routine``'s thread after it sent ``data``: queue it or count a drop, never wait."""
        if len(self._pending) >= self._depth or self._closing:
            self._full[routine] += 1
            return
        self._pending.append((routine, source_time, time.time(), data))
        self._wake_encoder.set()

    def dropped(self) -> Dict[str, int]:
        """Messages of each routine left out of the recording so far."""
        return {r: self._full[r] + self._over[r] for r in self.routines}

    def close(self) -> None:
        """Stop taking messages; the threads send what they hold, then close the connection."""
        self._closing = True
        self._wake_encoder.set()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for everything taken to be sent (at the end of the flow)."""
        self.close()
        deadline = time.monotonic() + timeout
        for thread in (self._encoder, self._sender):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _encode(self, routine: str, source_time: float, sent_time: float, data: Any) -> tuple:
        encoding, payload = recording.encode(data)
        log_time = int(source_time * 1e9)
        image = None
        if self._images and encoding == recording.PICKLE_ENCODING:
            frame = find_frame(data)
            if frame is not None:
                image = _compressed_image(frame, routine, log_time, self._quality)
        return (routine, encoding, log_time, int(sent_time * 1e9)), payload, image

    def _encode_loop(self) -> None:
        _yield_cpu()
        if self._images:
            _compressed_image_class()  # import now, not while the first messages wait
        try:
            while not (self._closing and not self._pending):
                self._wake_encoder.wait()
                self._wake_encoder.clear()
                while self._pending:
                    routine, source_time, sent_time, data = self._pending.popleft()
                    try:
                        item = self._encode(routine, source_time, sent_time, data)
                    except Exception as exc:
                        _log.warning("routine '%s' sent a message that cannot be recorded (%r); it is counted "
                                     "as dropped", routine, exc)
                        self._over[routine] += 1
                        continue
                    finally:
                        del data
                    size = len(item[1]) + len(item[2] or b"")
                    if self._bytes_in - self._bytes_out + size > self._budget:
                        self._over[routine] += 1
                        continue
                    self._bytes_in += size
                    self._encoded.append(item)
                    self._wake_sender.set()
        finally:
            self._wake_sender.set()

    def _send_loop(self) -> None:
        _yield_cpu()
        reported: Dict[str, int] = {}
        last_report = 0.0
        try:
            while True:
                self._wake_sender.wait(_REPORT_INTERVAL)
                self._wake_sender.clear()
                while self._encoded:
                    header, payload, image = self._encoded.popleft()
                    self._conn.send(("message", *header, image is not None))
                    self._conn.send_bytes(payload)
                    if image is not None:
                        self._conn.send_bytes(image)
                    self._bytes_out += len(payload) + len(image or b"")
                done = not self._encoder.is_alive() and not self._encoded
                if done or time.monotonic() - last_report >= _REPORT_INTERVAL:
                    dropped = self.dropped()
                    if dropped != reported:
                        self._conn.send(("dropped", dropped))
                        reported = dropped
                    last_report = time.monotonic()
                if done:
                    return
        except OSError as exc:
            _log.warning("recording of %s stopped: the recorder is gone (%s)", self.routines, exc)
            self._closing = True
            self._pending.clear()
            self._encoded.clear()
        finally:
            self._conn.close()


def _yield_cpu() -> None:
    """Lower the calling thread's CPU priority (Linux nice is per thread): on a busy machine the
    routines get the CPU first and the recording drops, rather than the other way round."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
    except OSError:
        pass


def _compressed_image_class() -> type:
    from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
    return CompressedImage


def _compressed_image(frame: Any, topic: str, log_time: int, quality: int) -> bytes:
    """``frame`` as a serialized foxglove.CompressedImage (JPEG)."""
    image = _compressed_image_class()(frame_id=topic, format="jpeg", data=encode_jpeg(frame, quality, None))
    image.timestamp.FromNanoseconds(log_time)
    return image.SerializeToString()


def switch_tap(tap: Optional[FlowTap], settings: Optional[Dict[str, Any]], runners: Dict[str, Any]
               ) -> Optional[FlowTap]:
    """In a flow: end ``tap`` (if any) and, with ``settings``, start tapping their routines; the new tap."""
    for runner in runners.values():
        runner.tap = None
    if tap is not None:
        tap.close()
    if not settings:
        return None
    try:
        tap = FlowTap(settings)
    except OSError as exc:
        _log.error("cannot record %s: the recorder does not answer (%s)", settings["routines"], exc)
        return None
    for name in tap.routines:
        runners[name].tap = tap
    return tap


# ----- the writer process -----

class _FileWriter:
    """The MCAP file and the counters of what went into it."""

    def __init__(self, stream: Any, config: Dict[str, Any]) -> None:
        from mcap.writer import CompressionType, Writer
        self._stream = stream
        self._config = config
        self._mcap = Writer(stream, chunk_size=config["chunk_size"],
                            compression=CompressionType[config["compression"].upper()])
        self._mcap.start(library=f"pipert {config['version']}")
        self._channels: Dict[tuple, int] = {}
        self._image_schema: Optional[int] = None
        self.messages: collections.Counter = collections.Counter()
        self.dropped_by: Dict[int, Dict[str, int]] = {}  # connection -> its latest counts
        self.started = time.time()
        self._bytes = 0
        stats_schema = self._mcap.register_schema(
            "pipert.RecorderStats", "jsonschema", json.dumps(_STATS_SCHEMA).encode("utf-8"))
        self._stats_channel = self._mcap.register_channel(recording.STATS_TOPIC, recording.JSON_ENCODING,
                                                          stats_schema)

    def _channel(self, topic: str, encoding: str) -> int:
        key = (topic, encoding)
        if key not in self._channels:
            schema = 0
            if topic.endswith(recording.IMAGE_SUFFIX):
                if self._image_schema is None:
                    from mcap_protobuf.schema import register_schema
                    self._image_schema = register_schema(self._mcap, _compressed_image_class())
                schema = self._image_schema
            wire = self._config["wires"].get(topic.removesuffix(recording.IMAGE_SUFFIX), {})
            self._channels[key] = self._mcap.register_channel(topic, encoding, schema, wire)
        return self._channels[key]

    def message(self, topic: str, encoding: str, log_time: int, publish_time: int, payload: bytes,
                image: Optional[bytes]) -> None:
        self.messages[topic] += 1
        sequence = self.messages[topic]
        self._mcap.add_message(self._channel(topic, encoding), log_time, payload, publish_time, sequence)
        if image is not None:
            image_topic = topic + recording.IMAGE_SUFFIX
            self._mcap.add_message(self._channel(image_topic, "protobuf"), log_time, image, publish_time, sequence)

    def dropped(self) -> Dict[str, int]:
        total: collections.Counter = collections.Counter()
        for counts in self.dropped_by.values():
            total.update(counts)
        return {topic: total[topic] for topic in self._config["wires"]}

    def counters(self) -> Dict[str, Any]:
        return {"messages": {t: self.messages[t] for t in self._config["wires"]}, "dropped": self.dropped(),
                "bytes": self._bytes}

    def write_counters(self) -> None:
        """A message on the counters topic, so that a file cut short still tells what was dropped."""
        now = time.time_ns()
        self._mcap.add_message(self._stats_channel, now, json.dumps(self.counters()).encode("utf-8"), now)

    def flush(self) -> None:
        self._mcap.flush()
        self._bytes = self._stream.tell()

    def finish(self) -> None:
        self.write_counters()
        counters = self.counters()
        metadata = {"pipe": self._config["pipe"], "started": repr(self.started), "stopped": repr(time.time()),
                    "wires": ",".join(self._config["wires"])}
        metadata.update({f"messages.{t}": str(n) for t, n in counters["messages"].items()})
        metadata.update({f"dropped.{t}": str(n) for t, n in counters["dropped"].items()})
        self._mcap.add_metadata(recording.METADATA_NAME, metadata)
        self._mcap.finish()
        self._stream.flush()
        self._bytes = self._stream.tell()
        self._stream.close()


_STATS_SCHEMA = {
    "type": "object", "title": "pipert recorder counters",
    "properties": {"messages": {"type": "object", "description": "messages recorded per wire"},
                   "dropped": {"type": "object", "description": "messages per wire left out of the recording"},
                   "bytes": {"type": "integer", "description": "bytes written to the file so far"}}}


def _read_connection(conn: Connection, key: int, inbox: "queue.Queue[tuple]") -> None:
    """One flow's messages, onto the writer's queue (which blocks when the file is behind)."""
    try:
        while True:
            header = conn.recv()
            if header[0] == "dropped":
                inbox.put(("dropped", key, header[1]))
                continue
            _, topic, encoding, log_time, publish_time, has_image = header
            payload = conn.recv_bytes()
            image = conn.recv_bytes() if has_image else None
            inbox.put(("message", topic, encoding, log_time, publish_time, payload, image))
    except (EOFError, OSError):
        pass
    finally:
        conn.close()
        inbox.put(("closed", key))


def _accept(listener: socket.socket, inbox: "queue.Queue[tuple]") -> None:
    for key in itertools.count():
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        inbox.put(("opened", key))
        threading.Thread(target=_read_connection, args=(Connection(sock.detach()), key, inbox), daemon=True).start()


def _read_commands(inbox: "queue.Queue[tuple]") -> None:
    """``stop`` on stdin, or stdin closed (the daemon is gone), ends the recording."""
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    inbox.put(("stop",))


def _report(document: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def _write(config: Dict[str, Any]) -> int:
    """The writer process: records what the flows send until told to stop; its exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon stops us, after the flows have sent all
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(_NICE)
    listener = socket.socket(fileno=config["listener"])
    inbox: "queue.Queue[tuple]" = queue.Queue(_WRITER_QUEUE)
    try:
        file = _FileWriter(os.fdopen(config["fd"], "wb"), config)
        file.flush()
    except Exception as exc:
        _report({"error": f"cannot write the recording {config['path']}: {exc}"})
        return 1
    threading.Thread(target=_accept, args=(listener, inbox), daemon=True).start()
    threading.Thread(target=_read_commands, args=(inbox,), daemon=True).start()
    _report({"ready": True})
    connections, stop_at = set(), None
    flushed = reported = time.monotonic()
    try:
        while stop_at is None or (connections or time.monotonic() < stop_at + _STOP_GRACE) \
                and time.monotonic() < stop_at + _STOP_WAIT:
            try:
                item = inbox.get(timeout=_REPORT_INTERVAL)
            except queue.Empty:
                item = ("idle",)
            kind = item[0]
            if kind == "message":
                file.message(*item[1:])
            elif kind == "dropped":
                file.dropped_by[item[1]] = item[2]
            elif kind == "opened":
                connections.add(item[1])
            elif kind == "closed":
                connections.discard(item[1])
            elif kind == "stop" and stop_at is None:
                stop_at = time.monotonic()
            now = time.monotonic()
            if now - flushed >= config["flush_interval"]:
                file.write_counters()
                file.flush()
                flushed = now
            if now - reported >= _REPORT_INTERVAL:
                _report(file.counters())
                reported = now
        listener.close()
        file.finish()
    except Exception as exc:
        _report({"error": f"cannot write the recording {config['path']}: {exc}"})
        return 1
    _report(dict(file.counters(), finished=True))
    return 0


# ----- in the daemon -----

class Recording:
    """A recording of some wires of a built pipe into one MCAP file; made by ``Pipe.record``."""

    def __init__(self, pipe: Any, path: str, wires: Optional[Sequence[str]] = None, compression: str = "none",
                 chunk_size: int = 4 << 20, flush_interval: float = 1.0, queue: int = 4, buffer: int = 64 << 20,
                 images: bool = True, jpeg_quality: int = 80, overwrite: bool = True) -> None:
        self._pipe = pipe
        self.wires = _wires(pipe, wires)
        if compression not in COMPRESSIONS:
            raise RecordError(f"compression {compression!r} is unknown: use one of {COMPRESSIONS}")
        for name, value, low in (("chunk_size", chunk_size, 1024), ("queue", queue, 1), ("buffer", buffer, 64 << 10)):
            if not isinstance(value, int) or value < low:
                raise RecordError(f"{name} must be a whole number >= {low}, not {value!r}")
        if not isinstance(images, bool) or not isinstance(flush_interval, (int, float)) \
                or not isinstance(jpeg_quality, int) or not 0 < flush_interval <= 60 or not 0 <= jpeg_quality <= 100:
            raise RecordError(f"flush_interval must be a number of seconds in (0, 60] (got {flush_interval!r}), "
                              f"jpeg_quality a whole number in [0, 100] (got {jpeg_quality!r}) and images true or "
                              f"false (got {images!r})")
        self.path = os.path.abspath(os.fspath(path))
        self.state = "starting"
        self.error: Optional[str] = None
        self.started = time.time()
        self._counters: Dict[str, Any] = {"messages": dict.fromkeys(self.wires, 0),
                                          "dropped": dict.fromkeys(self.wires, 0), "bytes": 0}
        self._lock = threading.Lock()
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise RecordError(f"cannot write the recording {self.path}: {exc.strerror}: choose a writable path"
                              + ("" if overwrite else " that does not exist yet")) from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"\0pipert-record-{pipe.id}-{os.getpid()}-{next(_numbers)}"
        config = {"path": self.path, "fd": fd, "listener": listener.fileno(), "compression": compression,
                  "chunk_size": chunk_size, "flush_interval": flush_interval, "pipe": pipe.id, "version": _version(),
                  "wires": {w: {"routine": w, "flow": pipe.flow_of(w)} for w in self.wires}}
        try:
            listener.bind(address)
            listener.listen(64)
            self._process = subprocess.Popen([sys.executable, "-c", _WRITER_COMMAND, json.dumps(config)],
                                             pass_fds=(fd, listener.fileno()), stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True)
        finally:
            os.close(fd)
            listener.close()
        self.pid = self._process.pid
        self._settings = {"address": address, "queue": queue, "buffer": buffer, "images": images,
                          "jpeg_quality": jpeg_quality}
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_reports, args=(ready,), name="pipert-recording",
                                        daemon=True)
        self._reader.start()
        if not ready.wait(_READY_TIMEOUT) or self.state != "recording":
            self.stop()
            raise RecordError(self.error or f"the recorder for {self.path} did not start within "
                                            f"{_READY_TIMEOUT:.0f} s")
        for flow in sorted({pipe.flow_of(w) for w in self.wires}):
            self.flow_started(flow)
        pipe.logger.info("recording %s to %s", ", ".join(self.wires), self.path)

    @property
    def active(self) -> bool:
        return self.state == "recording"

    def flow_started(self, flow: str) -> None:
        """Tell ``flow`` (just started or restarted) which of its routines to tap."""
        routines = [w for w in self.wires if self._pipe.flow_of(w) == flow]
        if routines and self.active:
            self._pipe._send_to_flow(flow, ("record", dict(self._settings, routines=routines)))

    def _untap(self) -> None:
        for flow in sorted({self._pipe.flow_of(w) for w in self.wires}):
            self._pipe._send_to_flow(flow, ("record", None))

    def _read_reports(self, ready: threading.Event) -> None:
        for line in self._process.stdout:
            report = json.loads(line)
            with self._lock:
                if "error" in report:
                    self.state, self.error = "failed", report["error"]
                elif report.get("ready"):
                    self.state = "recording"
                else:
                    self._counters = {k: report[k] for k in ("messages", "dropped", "bytes")}
            if "error" in report:
                self._pipe.logger.error("recording stopped: %s; the pipe goes on", report["error"])
                self._untap()
            ready.set()
        code = self._process.wait()
        with self._lock:
            if self.state in ("starting", "recording") or (code != 0 and self.error is None):
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                self.state, self.error = "failed", self.error or f"the recorder process ended ({how})"
                self._pipe.logger.error("recording to %s stopped: %s; the pipe goes on", self.path, self.error)
                self._untap()
        ready.set()

    def stop(self, timeout: float = 15.0) -> Dict[str, Any]:
        """Stop tapping, let the writer take what the flows hold and finish the file; the final status."""
        if self.state in ("recording", "starting"):
            self._untap()
            with self._lock:
                if self.state == "recording":
                    self.state = "stopping"
        try:
            self._process.stdin.write("stop\n")
            self._process.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self.error = self.error or f"the recorder did not finish {self.path} within {timeout:.0f} s"
        self._reader.join(5.0)
        with self._lock:
            if self.state == "stopping":
                self.state = "stopped"
        return self.status()

    def status(self) -> Dict[str, Any]:
        """Where, what and how much: the wires, messages and drops per wire, bytes, state and error."""
        with self._lock:
            return {"path": self.path, "state": self.state, "wires": list(self.wires), "pid": self.pid,
                    "started": self.started, "error": self.error, **json.loads(json.dumps(self._counters))}


def _wires(pipe: Any, wires: Optional[Sequence[str]]) -> List[str]:
    """The routines whose output to record: ``wires`` checked, or every routine with an output."""
    senders = [r for r in pipe._plans if pipe._plans[r].senders]
    if wires is None:
        return senders
    if isinstance(wires, str):
        wires = [w for w in wires.split(",") if w]
    wires = list(wires)
    unknown = [w for w in wires if w not in senders]
    if unknown or not wires:
        raise RecordError(f"cannot record wires {unknown or wires}: name the source routines of wires, one of "
                          f"{senders}")
    return list(dict.fromkeys(wires))


def _version() -> str:
    try:
        return importlib.metadata.version("pipert-daemon")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def writer_main() -> int:
    """Entry of the writer process: its configuration is the JSON in ``sys.argv[1]``."""
    return _write(json.loads(sys.argv[1]))
