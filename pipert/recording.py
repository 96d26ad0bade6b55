"""Recordings: MCAP files of a pipe's wires, and how to read them back.

A recording has one topic per recorded wire, named after the wire's source
routine. Each message's log time is the wall-clock time its source produced
it (nanoseconds since the epoch) and its publish time when the routine sent
it. A message is stored as JSON (encoding ``json``, no schema) when it holds
only plain JSON data (dicts with string keys, lists, strings, ints, finite
floats, booleans, None), so any MCAP tool can show it; otherwise as a
Python pickle, protocol 5, buffers in-band (encoding ``python-pickle-5``),
which keeps numpy arrays bit-exact. A topic has one channel per encoding it
used. Where a message holds an image, the topic ``<wire>/image`` carries it
as a JPEG in Foxglove's ``foxglove.CompressedImage`` (protobuf), for viewing.
The topic ``pipert/recorder`` carries the recorder's counters once a second
(messages and drops per wire), and a finished file ends with the metadata
``pipert.recording`` holding the final counts.

Files are chunked and the writer finishes a chunk at least once a second, so a
recording cut short (crash, SIGKILL, full disk) is readable up to its last
complete chunk: :func:`read_messages` reads the records in order and stops at
the first incomplete one instead of needing the summary at the end.
"""
from __future__ import annotations

import heapq
import json
import math
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

from mcap.exceptions import McapError
from mcap.records import Channel, Chunk, Footer, Message, Metadata, Schema
from mcap.stream_reader import StreamReader, breakup_chunk

PICKLE_ENCODING = "python-pickle-5"
JSON_ENCODING = "json"
IMAGE_SUFFIX = "/image"
STATS_TOPIC = "pipert/recorder"
METADATA_NAME = "pipert.recording"

_PLAIN_SCALARS = (str, int, bool, type(None))


def is_plain(value: Any) -> bool:
    """Whether ``value`` survives a JSON round trip exactly (same types, same values)."""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(is_plain(item) for item in value)
    if kind is dict:
        return all(type(key) is str and is_plain(item) for key, item in value.items())
    return False


def encode(value: Any) -> tuple:
    """(encoding, bytes) of one message: JSON for plain data, else an in-band pickle."""
    if is_plain(value):
        return JSON_ENCODING, json.dumps(value, separators=(",", ":")).encode("utf-8")
    return PICKLE_ENCODING, pickle.dumps(value, protocol=5)


def decode(encoding: str, data: bytes) -> Any:
    """The message that :func:`encode` stored."""
    if encoding == JSON_ENCODING:
        return json.loads(data)
    if encoding == PICKLE_ENCODING:
        return pickle.loads(data)
    raise ValueError(f"messages in encoding {encoding!r} are not pipert's: read them with a tool for that encoding")


@dataclass
class RecordedMessage:
    """One message as stored: its topic, encoding, times (ns since the epoch) and raw bytes."""

    topic: str
    encoding: str
    log_time: int
    publish_time: int
    sequence: int
    data: bytes
    schema: Optional[str] = None

    def value(self) -> Any:
        """The message as the routine sent it."""
        return decode(self.encoding, self.data)


@dataclass
class _Scan:
    complete: bool = False
    error: Optional[str] = None
    metadata: Dict[str, Dict[str, str]] = field(default_factory=dict)


def _records(path: str, scan: _Scan) -> Iterator[Any]:
    """The file's records in order (chunks opened), up to the first incomplete or damaged one."""
    with open(path, "rb") as stream:
        reader = StreamReader(stream, emit_chunks=True, record_size_limit=None)
        try:
            for record in reader.records:
                if isinstance(record, Chunk):
                    yield from breakup_chunk(record, validate_crc=True)
                    continue
                if isinstance(record, Footer):
                    scan.complete = True
                yield record
        except (McapError, struct.error, zlib.error, ValueError, EOFError, MemoryError, RuntimeError) as exc:
            scan.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def read_messages(path: str, topics: Optional[Sequence[str]] = None, scan: Optional[_Scan] = None
                  ) -> Iterator[RecordedMessage]:
    """The messages of ``topics`` (all when None) in file order, which per topic is the order they
    were sent; a file cut short yields what its complete chunks hold. Raises ``ValueError`` for a
    file that is not MCAP."""
    scan = scan if scan is not None else _Scan()
    wanted = set(topics) if topics is not None else None
    schemas: Dict[int, Schema] = {}
    channels: Dict[int, Channel] = {}
    first = True
    for record in _records(path, scan):
        first = False
        if isinstance(record, Schema):
            schemas[record.id] = record
        elif isinstance(record, Channel):
            channels[record.id] = record
        elif isinstance(record, Metadata):
            scan.metadata[record.name] = dict(record.metadata)
        elif isinstance(record, Message):
            channel = channels.get(record.channel_id)
            if channel is None or (wanted is not None and channel.topic not in wanted):
                continue
            schema = schemas.get(channel.schema_id)
            yield RecordedMessage(channel.topic, channel.message_encoding, record.log_time, record.publish_time,
                                  record.sequence, record.data, schema.name if schema else None)
    if first and scan.error:
        raise ValueError(f"{path} is not a readable MCAP file ({scan.error}): record one with pipe.record() "
                         "or pipert run --record")


def in_time_order(messages: Iterator[RecordedMessage], window: int = 32) -> Iterator[RecordedMessage]:
    """``messages`` sorted by log time, looking ``window`` messages ahead: flows write their messages
    to the file as they arrive, so topics interleave a little out of order, never by much."""
    waiting: List[tuple] = []
    for number, message in enumerate(messages):
        heapq.heappush(waiting, (message.log_time, number, message))
        if len(waiting) > window:
            yield heapq.heappop(waiting)[2]
    while waiting:
        yield heapq.heappop(waiting)[2]


def info(path: str) -> Dict[str, Any]:
    """What ``pipert record info`` shows: per topic its encodings, message count, first and last
    log time and rate; the duration; drops; whether the file was finished."""
    scan = _Scan()
    topics: Dict[str, Dict[str, Any]] = {}
    stats: Dict[str, Any] = {}
    for message in read_messages(path, scan=scan):
        if message.topic == STATS_TOPIC:
            stats = json.loads(message.data)
            continue
        entry = topics.setdefault(message.topic, {"encodings": [], "schema": message.schema, "messages": 0,
                                                  "first": message.log_time, "last": message.log_time})
        if message.encoding not in entry["encodings"]:
            entry["encodings"].append(message.encoding)
        entry["messages"] += 1
        entry["first"] = min(entry["first"], message.log_time)
        entry["last"] = max(entry["last"], message.log_time)
    final = scan.metadata.get(METADATA_NAME)
    dropped = {k[len("dropped."):]: int(v) for k, v in final.items() if k.startswith("dropped.")} if final \
        else {k: int(v) for k, v in stats.get("dropped", {}).items()}
    for topic, entry in topics.items():
        span = (entry["last"] - entry["first"]) / 1e9
        entry["rate"] = round((entry["messages"] - 1) / span, 2) if span > 0 else None
        entry["dropped"] = dropped.get(topic, 0)
    start = min((e["first"] for e in topics.values()), default=None)
    end = max((e["last"] for e in topics.values()), default=None)
    return {"path": path, "complete": scan.complete, "error": None if scan.complete else scan.error,
            "start": start, "end": end, "duration": (end - start) / 1e9 if start is not None else 0.0,
            "topics": topics, "dropped": dropped, "recording": final or {}}


def summarize(value: Any, width: int = 200) -> str:
    """A one-line description of a message: arrays by shape and dtype, long text cut."""
    def short(item: Any, depth: int) -> str:
        shape = getattr(item, "shape", None)
        if shape is not None and hasattr(item, "dtype"):
            return f"<{getattr(item, 'dtype')} array {'x'.join(map(str, shape))}>"
        if isinstance(item, dict) and depth < 3:
            return "{" + ", ".join(f"{k!r}: {short(v, depth + 1)}" for k, v in item.items()) + "}"
        if isinstance(item, (list, tuple)) and depth < 3:
            inner = ", ".join(short(v, depth + 1) for v in item[:8]) + (", ..." if len(item) > 8 else "")
            return f"[{inner}]" if isinstance(item, list) else f"({inner})"
        if isinstance(item, (bytes, bytearray)):
            return f"<{len(item)} bytes>"
        return repr(item)

    text = short(value, 0)
    return text if len(text) <= width else text[:width - 3] + "..."

