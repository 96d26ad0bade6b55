"""How messages move from a routine's output to the routines it is wired to.

Inside one flow a message passes by reference through a ``LocalChannel``.
Between flows it is pickled (protocol 5) once per wire; buffers of at least
``OOB_MIN`` bytes (numpy arrays) go out-of-band into the wire's shared-memory
``Pool`` and only small records travel through one ``ShmRing`` per remote
destination. The receiver gets read-only numpy arrays that view the pool slot:
no copy on receive. A slot is reused only when every receiver released its
current use (its arrays are gone); each side writes only its own fields, so no
cross-process atomics are needed.

Every message carries its source time: the wall-clock time (``time.time()``)
its source routine produced it, which a middle routine's outputs inherit from
the input they came from. It travels in the record header between flows and
next to the object in a local channel; readers return ``(stamp, object)``.

Every consumer waits on one ``Doorbell`` (a posix semaphore) that producers and
events ring; it polls its inputs before waiting, so no wake-up is ever lost and
an idle routine burns no CPU.
"""
from __future__ import annotations

import collections
import ctypes
import io
import mmap
import os
import pickle
import struct
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import posix_ipc

from . import shm
from .errors import TransportError
from .wire import BLOCK

OOB_MIN = 64 * 1024
"""Buffers of at least this many bytes travel through the pool, not the ring."""

EMPTY = object()
"""Returned by ``poll`` when an input has nothing waiting."""

Meta = Optional[Tuple[int, int]]
"""A message's order stamp: (stream, sequence number) given where it entered a replicated
stage, carried through the replica's routines to an ordered merge; None elsewhere."""

_WAIT_SLICE = 0.2  # seconds between checks of ``should_stop`` while a producer waits


class Closed(Exception):
    """Raised inside a waiting producer when its routine is being killed."""


Doorbell = posix_ipc.Semaphore


def _wait(sem: posix_ipc.Semaphore, should_stop: Callable[[], bool]) -> None:
    try:
        sem.acquire(_WAIT_SLICE)
    except posix_ipc.BusyError:
        if should_stop():
            raise Closed() from None


class LocalChannel:
    """A bounded queue between two routines of the same flow; data passes by reference,
    with the order stamp (see ``Meta``) of the message it came from."""

    def __init__(self, depth: int, policy: str, bell: Doorbell) -> None:
        self._queue: collections.deque = collections.deque()
        self._depth = depth
        self._bell = bell
        self._space = threading.Semaphore(depth) if policy == BLOCK else None
        self.dropped = 0
        self.meta: Meta = None

    def put(self, obj: object, stamp: float, should_stop: Callable[[], bool], meta: Meta = None) -> None:
        if self._space is not None:
            while not self._space.acquire(timeout=_WAIT_SLICE):
                if should_stop():
                    raise Closed()
        elif len(self._queue) >= self._depth:
            try:
                self._queue.popleft()
                self.dropped += 1
            except IndexError:
                pass
        self._queue.append(((stamp, obj), meta))
        self._bell.release()

    def poll(self) -> object:
        """The oldest ``(stamp, object)``, or EMPTY."""
        try:
            message, self.meta = self._queue.popleft()
        except IndexError:
            return EMPTY
        if self._space is not None:
            self._space.release()
        return message

    def depth(self) -> int:
        return len(self._queue)


# Ring headers: 8-byte fields, each written by one side only (the producer's and
# the consumer's on separate cache lines). Aligned 8-byte loads and stores through
# ctypes are atomic, and x86 (the platform we run on) keeps one core's stores in
# order and its loads in order, which is all a single-writer field needs. A claim
# on the latest ring also needs a store to be seen before a later load, which only
# a locked instruction gives: ``_fence``.
_RING_HDR_SIZE = 192
_GONE = 128  # u8: 1 while the consumer's flow is dead (set by the daemon)
_LEN = struct.Struct("=I")
_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: an uncontended lock is a locked read-modify-write."""
    _fence_lock.acquire()
    _fence_lock.release()


class _ByteRing:
    """Records laid end to end in a shared segment, wrapping at its end; the
    positions are running byte counts (``pos % capacity`` is the place)."""

    def __init__(self, mm: mmap.mmap, data_offset: int) -> None:
        self._mm = mm
        self._base = data_offset
        self._cap = len(mm) - data_offset
        self._gone = ctypes.c_uint8.from_buffer(mm, _GONE)

    @property
    def capacity(self) -> int:
        """The largest record the ring can ever hold, in bytes."""
        return self._cap

    def _check_size(self, need: int) -> None:
        if need > self._cap:
            raise TransportError(
                f"a message of {need} bytes is larger than the wire's ring ({self._cap} bytes): send large "
                "data as contiguous numpy arrays (they go through the pool) or raise Pipe(ring_capacity=...)")

    def _write(self, pos: int, data: bytes) -> None:
        start = pos % self._cap
        end = start + len(data)
        base = self._base
        if end <= self._cap:
            self._mm[base + start:base + end] = data
            return
        view, first = memoryview(data), self._cap - start
        self._mm[base + start:base + self._cap] = view[:first]
        self._mm[base:base + len(data) - first] = view[first:]

    def _read(self, pos: int, size: int) -> bytes:
        start = pos % self._cap
        base = self._base
        if start + size <= self._cap:
            return self._mm[base + start:base + start + size]
        first = self._cap - start
        return self._mm[base + start:base + self._cap] + self._mm[base:base + size - first]

    @property
    def gone(self) -> bool:
        """Whether the consumer's flow is dead (a replica that is down gets no new messages)."""
        return bool(self._gone.value)

    def consumer_back(self) -> None:
        """The consumer's flow runs (again): a ``block`` producer waits for room again."""
        self._gone.value = 0

    def close(self) -> None:
        """Unmap the ring and close its semaphores in this process (the daemon, at the end)."""
        self._final_stats = self.stats()
        self._unbind()
        self._mm.close()

    def _unbind(self) -> None:
        del self._gone

    def stats(self) -> Tuple[int, int]:
        raise NotImplementedError


# Block ring header fields (byte offsets).
_HEAD, _WRITTEN, _DROPPED = 0, 8, 16  # bytes written, records written, records dropped (producer)
_TAIL, _READ = 64, 72  # bytes read, records read (consumer; the producer only while the consumer is gone)


class ShmRing(_ByteRing):
    """The ``block`` wire: a lossless, bounded, lock-free queue of length-prefixed records
    from one producer to one consumer process.

    The producer alone moves the head, the consumer alone the tail. A producer that
    finds it full sleeps on ``space`` until the consumer has emptied half of it, so a
    fast producer and a slower consumer do not wake each other for every message.
    """

    def __init__(self, mm: mmap.mmap, space: posix_ipc.Semaphore, depth: int) -> None:
        super().__init__(mm, _RING_HDR_SIZE)
        self._space = space
        self._depth = depth
        self._wake_at = depth // 2
        self._head, self._written, self._dropped, self._tail, self._read_count = (
            ctypes.c_uint64.from_buffer(mm, offset) for offset in (_HEAD, _WRITTEN, _DROPPED, _TAIL, _READ))

    @classmethod
    def create(cls, pipe_id: str, tag: str, capacity: int, depth: int) -> "ShmRing":
        pid = os.getpid()
        return cls(shm.create_segment(shm.name(pipe_id, pid, f"ring{tag}"), _RING_HDR_SIZE + capacity),
                   shm.create_semaphore(shm.name(pipe_id, pid, f"space{tag}"), 0), depth)

    def _pop_oldest(self) -> bytes:
        """Take the oldest record off the ring (the producer, while the consumer is gone)."""
        tail = self._tail.value
        record = self._read(tail, _LEN.unpack(self._read(tail, _LEN.size))[0])
        self._tail.value = tail + len(record)
        self._read_count.value += 1
        return record

    def _full(self, need: int) -> bool:
        return (self._written.value - self._read_count.value >= self._depth
                or self._cap - (self._head.value - self._tail.value) < need)

    def put(self, record: bytes, on_drop: Callable[[bytes], None], should_stop: Callable[[], bool]) -> None:
        """Append ``record`` (it starts with its own length), waiting for room; while the
        consumer's flow is dead, drop the oldest records instead."""
        need = len(record)
        self._check_size(need)
        while self._full(need):
            if self._gone.value:
                while self._full(need):
                    on_drop(self._pop_oldest())
                    self._dropped.value += 1
                break
            while True:  # forget stale wake-ups, look again, then sleep until the consumer makes room
                try:
                    self._space.acquire(0)
                except posix_ipc.BusyError:
                    break
            if self._full(need) and not self._gone.value:
                _wait(self._space, should_stop)
        head = self._head.value
        self._write(head, record)
        self._head.value = head + need
        self._written.value += 1

    def get(self, release: Callable[[bytes], None]) -> List[bytes]:
        """Every waiting record, copied out in one go, oldest first; each keeps its length prefix."""
        head, tail = self._head.value, self._tail.value
        if head == tail:
            return []
        waiting = self._written.value - self._read_count.value
        block = memoryview(self._read(tail, head - tail))
        records, offset = [], 0
        while offset < len(block):
            size = _LEN.unpack_from(block, offset)[0]
            records.append(block[offset:offset + size])
            offset += size
        self._tail.value = head
        self._read_count.value += len(records)
        if waiting > self._wake_at or head - tail > self._cap // 2:
            self._space.release()
        return records

    def records(self) -> List[bytes]:
        """The waiting records, oldest first, without taking them."""
        found, pos = [], self._tail.value
        for _ in range(self._written.value - self._read_count.value):
            record = self._read(pos, _LEN.unpack(self._read(pos, _LEN.size))[0])
            found.append(record)
            pos += len(record)
        return found

    def recover(self, consumer_gone: bool) -> List[bytes]:
        """Daemon side, after a flow died: mark whether the consumer is gone (the producer
        then drops instead of waiting forever), wake the producer, and return the records
        still waiting (a dead producer's are skipped by the consumer if their slots are gone)."""
        self._gone.value = consumer_gone
        kept = self.records()
        self._space.release()
        return kept

    def close(self) -> None:
        super().close()
        self._space.close()

    def _unbind(self) -> None:
        super()._unbind()
        del self._head, self._written, self._dropped, self._tail, self._read_count

    def count_drop(self) -> None:
        """Count a message that never entered the ring."""
        self._dropped.value += 1

    def stats(self) -> Tuple[int, int]:
        """(messages waiting, messages dropped so far); the last figures once closed."""
        if self._mm.closed:
            return self._final_stats
        return self._written.value - self._read_count.value, self._dropped.value


# Latest ring header fields (byte offsets): the producer's, then the consumer's.
_RESERVED, _PUBLISHED, _RECLAIM, _POOL_DROPS = 0, 8, 16, 24
_CURSOR, _SKIPPED = 64, 72
_ENTRY = struct.Struct("=QQQQ")  # per record: sequence, byte position, length (producer); claimed (consumer)
_SPARE_ENTRIES = 8
_INVALID = (1 << 64) - 1


class LatestRing(_ByteRing):
    """The ``latest`` wire: the producer never waits and never takes a lock; it overwrites.

    Record ``n`` goes to the byte ring at position ``pos`` and its (sequence, pos, length)
    to index entry ``n % entries``; ``published`` counts the records written. The consumer
    keeps its own ``cursor`` and reads the oldest of the newest ``depth`` records. It
    detects an overrun by sequence numbers: an entry whose sequence changed, or bytes the
    producer has ``reserved`` since (it moves that mark before it overwrites), are skipped
    and counted as dropped.

    Pool slots of records the consumer never decodes are reclaimed by the producer: once a
    record has left the window (``reclaim`` = first record still in it), the producer looks
    at the record's ``claimed`` field. The consumer claims a record that holds pool slots
    by writing that field, then reads ``reclaim``; the producer writes ``reclaim``, then
    reads ``claimed``; each with a fence in between, so at least one of them sees the
    other: the consumer drops a claim that raced (releasing versioned flags, harmless if
    the producer reclaimed too), or the producer leaves the slots to the consumer.
    """

    def __init__(self, mm: mmap.mmap, depth: int) -> None:
        self._entries = depth + _SPARE_ENTRIES
        super().__init__(mm, _RING_HDR_SIZE + self._entries * _ENTRY.size)
        self._depth = depth
        self._reserved, self._published, self._reclaim, self._pool_drops, self._cursor, self._skipped = (
            ctypes.c_uint64.from_buffer(mm, offset)
            for offset in (_RESERVED, _PUBLISHED, _RECLAIM, _POOL_DROPS, _CURSOR, _SKIPPED))
        self._seq, self._pos, self._len, self._claimed = (
            [ctypes.c_uint64.from_buffer(mm, _RING_HDR_SIZE + i * _ENTRY.size + field) for i in range(self._entries)]
            for field in (0, 8, 16, 24))
        for seq in self._seq:
            seq.value = _INVALID
        self._pending: collections.deque = collections.deque()  # producer: (record number, record) with slots

    @classmethod
    def create(cls, pipe_id: str, tag: str, capacity: int, depth: int) -> "LatestRing":
        size = _RING_HDR_SIZE + (depth + _SPARE_ENTRIES) * _ENTRY.size + capacity
        return cls(shm.create_segment(shm.name(pipe_id, os.getpid(), f"ring{tag}"), size), depth)

    def put(self, record: bytes, on_drop: Callable[[bytes], None], should_stop: Callable[[], bool]) -> None:
        """Publish ``record``, overwriting the oldest ones if the consumer is behind; reclaim
        (``on_drop``) the slots of records that left the window unclaimed."""
        need = len(record)
        self._check_size(need)
        pos = self._reserved.value
        self._reserved.value = pos + need
        self._write(pos, record)
        n = self._published.value
        entry = n % self._entries
        seq = self._seq[entry]
        seq.value = _INVALID
        self._pos[entry].value = pos
        self._len[entry].value = need
        seq.value = n
        self._published.value = n + 1
        pending = self._pending
        if _MSG.unpack_from(record)[2]:
            pending.append((n, record))
        if pending:
            first_kept = n + 1 - self._depth
            self._reclaim.value = first_kept
            if pending[0][0] < first_kept:
                _fence()
                claimed, entries = self._claimed, self._entries
                while pending and pending[0][0] < first_kept:
                    old, old_record = pending.popleft()
                    if claimed[old % entries].value != old + 1:
                        on_drop(old_record)

    def _entry(self, n: int) -> Optional[Tuple[int, int]]:
        """(pos, length) of record ``n`` if its index entry still describes it."""
        entry = n % self._entries
        seq = self._seq[entry]
        if seq.value != n:
            return None
        pos, size = self._pos[entry].value, self._len[entry].value
        if seq.value != n or size > self._cap:
            return None
        return pos, size

    def _intact(self, pos: int) -> bool:
        """True if the producer has not reserved the bytes at ``pos`` for a newer record."""
        return self._reserved.value <= pos + self._cap

    def get(self, release: Callable[[bytes], None]) -> List[bytes]:
        """The oldest of the newest ``depth`` records (skipping and counting the older and the
        overwritten ones), or nothing; ``release`` gives back the slots of a claim that lost."""
        cursor = self._cursor
        while True:
            published, n = self._published.value, cursor.value
            if n >= published:
                return []
            if published - n > self._depth:
                self._skipped.value += published - self._depth - n
                n = cursor.value = published - self._depth
            found = self._entry(n)
            record = self._read(*found) if found is not None else None
            if record is None or not self._intact(found[0]):
                self._skipped.value += 1
                cursor.value = n + 1
                continue
            if _MSG.unpack_from(record)[2]:
                self._claimed[n % self._entries].value = n + 1
                _fence()
                if n < self._reclaim.value:
                    release(record)
                    self._skipped.value += 1
                    cursor.value = n + 1
                    continue
            cursor.value = n + 1
            return [record]

    def records(self) -> List[bytes]:
        """The records the consumer would still read, oldest first, without taking them."""
        published = self._published.value
        found = []
        for n in range(max(self._cursor.value, published - self._depth), published):
            where = self._entry(n)
            if where is not None:
                record = self._read(*where)
                if self._intact(where[0]):
                    found.append(record)
        return found

    def recover(self, consumer_gone: bool) -> List[bytes]:
        """Daemon side, after a flow died: return the records a (restarted) consumer would
        still read. The producer never waits, so nothing else needs unwedging."""
        self._gone.value = consumer_gone
        return self.records()

    def _unbind(self) -> None:
        super()._unbind()
        del self._reserved, self._published, self._reclaim, self._pool_drops, self._cursor, self._skipped
        del self._seq, self._pos, self._len, self._claimed

    def count_drop(self) -> None:
        """Count a message that never entered the ring (pool exhausted)."""
        self._pool_drops.value += 1

    def stats(self) -> Tuple[int, int]:
        """(messages waiting, messages dropped so far); the last figures once closed."""
        if self._mm.closed:
            return self._final_stats
        behind = self._published.value - self._cursor.value
        return min(behind, self._depth), self._skipped.value + self._pool_drops.value + max(0, behind - self._depth)


def create_ring(pipe_id: str, tag: str, capacity: int, depth: int, policy: str) -> "ShmRing | LatestRing":
    """The ring of one (wire, remote destination), made by the daemon before flows fork."""
    if policy == BLOCK:
        return ShmRing.create(pipe_id, tag, capacity, depth)
    return LatestRing.create(pipe_id, tag, capacity, depth)


_POOL_HDR_SIZE = 8  # u32 "owner waits for a release", padding
_U32 = struct.Struct("=I")
_MSG = struct.Struct("=IIHdQQ")  # record length, producer pid, pool references, source time, order stamp
_REF = struct.Struct("=HIIQQ")  # slot, generation, stamp, offset, bytes


class Pool:
    """Shared-memory slots for one wire's large buffers.

    The header is made by the daemon: per slot a u32 *stamp* (written by the owner, one
    more at every use) and per receiver a u32 (written by that receiver: the stamp it
    released). A slot is free when every receiver released its current stamp, or when
    the owner itself reclaimed it for that receiver (a record the receiver never got).
    Stamps make a late or repeated release harmless: it names a use that is over.
    The slots' segments are made by the producer flow, sized to the largest buffer
    seen, and named with its pid so a dead flow's are found. A producer can also
    ``allocate`` an array inside a slot and fill it: sending it then copies nothing.

    Who still uses a slot is known without finalizers: every array handed out (the
    producer's from ``allocate``, a receiver's from ``decode``) is a view of a uint8
    *base* array over that place, and numpy views keep that array as their ``base``,
    so the reference counts of the array and its base say whether anything of it is
    alive. Both arrays are made once per place, shape and dtype and handed out again
    at the next use (a slot is reused only once its last use is over): building numpy
    arrays is the costliest step of a message that arrives at an idle pipeline, when
    the CPU's caches have gone cold.
    """

    def __init__(self, pipe_id: str, tag: str, slots: int, receivers: int) -> None:
        pid = os.getpid()
        self._pipe_id = pipe_id
        self._tag = tag
        self._slots = slots
        self._receivers = receivers
        self._row = _U32.size * (receivers + 1)
        self._hdr = shm.create_segment(shm.name(pipe_id, pid, f"pool{tag}"), _POOL_HDR_SIZE + slots * self._row)
        self._released = shm.create_semaphore(shm.name(pipe_id, pid, f"released{tag}"), 0)
        self._reclaimed: Dict[Tuple[int, int], int] = {}  # owner: (slot, receiver) -> stamp it reclaimed
        self._segments: Dict[int, Tuple[int, int, mmap.mmap, memoryview]] = {}  # slot -> gen, capacity, map, view
        self._owned: Dict[int, Tuple[np.ndarray, np.ndarray, tuple]] = {}  # slot -> base, array, its layout
        self._owned_ids: Dict[int, int] = {}  # id of such a base -> slot
        self._layouts: Dict[Tuple[Tuple[int, ...], Any], Tuple[np.dtype, int]] = {}  # (shape, dtype) -> dtype, bytes
        self._next = 0
        self._views: Dict[Tuple[int, int], Tuple[int, mmap.mmap, memoryview]] = {}  # receiver's mappings
        self._arrays: Dict[tuple, Tuple[np.ndarray, np.ndarray]] = {}  # receiver: place and layout -> base, array

    def _segment_name(self, pid: int, slot: int, gen: int) -> str:
        return shm.name(self._pipe_id, pid, f"w{self._tag}s{slot}g{gen}")

    def _offset(self, slot: int) -> int:
        return _POOL_HDR_SIZE + slot * self._row

    def _released_by_all(self, slot: int) -> bool:
        off = self._offset(slot)
        row = self._hdr[off:off + self._row]
        stamp = row[:4]
        if row == stamp * (self._receivers + 1):
            return True
        if not self._reclaimed:
            return False
        current = _U32.unpack(stamp)[0]
        return all(row[4 + 4 * i:8 + 4 * i] == stamp or self._reclaimed.get((slot, i)) == current
                   for i in range(self._receivers))

    def _producer_uses(self, slot: int) -> bool:
        """True while an array from ``allocate`` in ``slot``, or a view of it, is alive."""
        owned = self._owned.get(slot)
        return owned is not None and _in_use(owned)

    def _forget(self, slot: int) -> None:
        """Drop the producer's arrays of ``slot`` (its segment is about to be replaced)."""
        owned = self._owned.pop(slot, None)
        if owned is not None:
            del self._owned_ids[id(owned[0])]

    def _find_free(self) -> Optional[int]:
        for k in range(self._slots):
            slot = (self._next + k) % self._slots
            if not self._producer_uses(slot) and self._released_by_all(slot):
                return slot
        return None

    def _take(self, size: int, block: bool, should_stop: Callable[[], bool]) -> Optional[int]:
        """A free slot of at least ``size`` bytes, waiting under ``block``; None if full otherwise."""
        slot = self._find_free()
        while slot is None:
            if not block:
                return None
            self._hdr[0:4] = b"\x01\x00\x00\x00"
            slot = self._find_free()
            if slot is None:
                _wait(self._released, should_stop)
                slot = self._find_free()
        self._hdr[0:4] = b"\x00\x00\x00\x00"
        gen, capacity, mm, view = self._segments.get(slot, (0, 0, None, None))
        if capacity < size:
            if mm is not None:
                self._forget(slot)
                view.release()
                mm.close()
                posix_ipc.unlink_shared_memory(self._segment_name(os.getpid(), slot, gen))
            gen += 1
            capacity = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            mm = shm.create_segment(self._segment_name(os.getpid(), slot, gen), capacity)
            self._segments[slot] = (gen, capacity, mm, memoryview(mm))
        self._next = slot + 1
        return slot

    def _hold(self, slot: int, offset: int, size: int) -> bytes:
        """Start a new use of ``slot``: every receiver holds it until it releases this stamp."""
        off = self._offset(slot)
        stamp = (_U32.unpack_from(self._hdr, off)[0] + 1) & 0xFFFFFFFF
        _U32.pack_into(self._hdr, off, stamp)
        return _REF.pack(slot, self._segments[slot][0], stamp, offset, size)

    def allocate(self, shape: Tuple[int, ...], dtype: Any, block: bool,
                 should_stop: Callable[[], bool]) -> Optional[np.ndarray]:
        """A writable array over a slot, kept from reuse while it or any view of it lives; None
        if it is smaller than ``OOB_MIN`` (it would travel inline) or the pool is full under
        ``latest``. A slot gives the same array object again at its next use."""
        layout = self._layouts.get((shape, dtype))
        if layout is None:
            if len(self._layouts) >= 64:
                self._layouts.clear()
            described = np.dtype(dtype)
            size = described.itemsize
            for n in shape:
                size *= n
            layout = self._layouts[(shape, dtype)] = (described, size)
        described, size = layout
        if size < OOB_MIN:
            return None
        slot = self._take(size, block, should_stop)
        if slot is None:
            return None
        key = (self._segments[slot][0], shape, described)
        owned = self._owned.get(slot)
        if owned is None or owned[2] != key:
            self._forget(slot)
            base = np.frombuffer(self._segments[slot][3], np.uint8, size)
            owned = self._owned[slot] = (base, base.view(described).reshape(shape), key)
            self._owned_ids[id(base)] = slot
        return owned[1]

    def store(self, array: np.ndarray, block: bool, should_stop: Callable[[], bool]) -> Optional[bytes]:
        """Reference ``array`` in the pool, held by every receiver: in place if it lies in an
        array from ``allocate`` that no receiver holds, else copied into a free slot (one
        copy, whatever its layout). None if the pool is full under ``latest``."""
        size = array.nbytes
        slot = self._owned_ids.get(id(array.base))
        if slot is not None and self._released_by_all(slot):
            base, whole, _ = self._owned[slot]
            if array is whole:
                return self._hold(slot, 0, size)
            if array.flags.c_contiguous:
                return self._hold(slot, array.__array_interface__["data"][0] - base.__array_interface__["data"][0],
                                  size)
        slot = self._take(size, block, should_stop)
        if slot is None:
            return None
        np.copyto(np.frombuffer(self._segments[slot][3], array.dtype, array.size).reshape(array.shape), array)
        return self._hold(slot, 0, size)

    def release(self, slot: int, receiver: int, stamp: int) -> None:
        """Receiver side: ``receiver`` is done with use ``stamp`` of ``slot``; wake a waiting owner."""
        _U32.pack_into(self._hdr, self._offset(slot) + _U32.size * (1 + receiver), stamp)
        if self._hdr[0]:
            self._released.release()

    def release_record(self, record: bytes, receiver: int) -> None:
        """Receiver side: release the slots of a record ``receiver`` will not decode."""
        for slot, _, stamp, _, _ in _refs(record):
            self.release(slot, receiver, stamp)

    def reclaim(self, record: bytes, receiver: int) -> None:
        """Owner side: ``receiver`` will never see ``record`` (dropped): its slots are free for it."""
        for slot, _, stamp, _, _ in _refs(record):
            self._reclaimed[(slot, receiver)] = stamp

    def release_all(self, receiver: int, keep: Sequence[bytes] = ()) -> None:
        """Daemon side, after a flow died: release every slot ``receiver`` holds but those of the
        records in ``keep`` (a dead consumer's; or, for a dead producer, all: its successor
        makes new segments, so arrays still viewing the old ones are safe)."""
        kept = {ref[0] for record in keep for ref in _refs(record)}
        for slot in range(self._slots):
            if slot not in kept:
                self.release(slot, receiver, _U32.unpack_from(self._hdr, self._offset(slot))[0])

    def close(self) -> None:
        """Unmap the header and close the semaphore in this process (the daemon, at the end)."""
        self._hdr.close()
        self._released.close()

    def unstore(self, ref: bytes) -> None:
        """Give back a slot that a store filled but no receiver will see."""
        slot, _, stamp, _, _ = _REF.unpack(ref)
        for receiver in range(self._receivers):
            self._reclaimed[(slot, receiver)] = stamp

    def view(self, pid: int, slot: int, gen: int, offset: int, size: int) -> np.ndarray:
        """A read-only uint8 array of ``size`` bytes of a producer's slot."""
        cached = self._views.get((pid, slot))
        if cached is None or cached[0] != gen:
            if len(self._views) >= 4 * self._slots:
                self._views.clear()  # mappings of a dead producer; arrays still using them keep them
            mm = shm.open_segment(self._segment_name(pid, slot, gen))
            cached = (gen, mm, memoryview(mm).toreadonly())
            self._views[(pid, slot)] = cached
        return np.frombuffer(cached[2], np.uint8, size, offset)

    def array(self, pid: int, ref: Tuple[int, int, int, int, int], dtype: Any, shape: Tuple[int, ...],
              held: List[Tuple[Tuple[np.ndarray, np.ndarray], int, int]]) -> np.ndarray:
        """Receiver side: the read-only array a reference ``ref`` (slot, generation, use stamp,
        offset, bytes) of producer ``pid`` stands for; its use is added to ``held``."""
        slot, gen, stamp, offset, size = ref
        key = (pid, slot, gen, offset, size, dtype, shape)
        arrays = self._arrays.get(key)
        if arrays is None:
            if len(self._arrays) >= 4 * self._slots:
                self._arrays.clear()  # a dead producer's, or layouts gone out of use; held uses keep theirs
            base = self.view(pid, slot, gen, offset, size)
            arrays = self._arrays[key] = (base, base.view(dtype).reshape(shape))
        held.append((arrays, slot, stamp))
        return arrays[1]

    def sweep(self, held: List[Tuple[Tuple[np.ndarray, np.ndarray], int, int]], receiver: int) -> None:
        """Release the slots of ``held`` uses ((base, array), slot, stamp) whose arrays are all gone."""
        alive = []
        for use in held:
            if _in_use(use[0]):
                alive.append(use)
            else:
                self.release(use[1], receiver, use[2])
        held[:] = alive


def _in_use(arrays: Tuple[np.ndarray, ...]) -> bool:
    """Whether anything but ``arrays`` (a base and the array made over it) holds either one: the
    base is held by the tuple, the array's ``base`` and the argument; the array by the tuple and
    the argument; numpy views of either add to the base."""
    return sys.getrefcount(arrays[0]) > 3 or sys.getrefcount(arrays[1]) > 2


def _refs(record: bytes) -> List[Tuple[int, int, int, int, int]]:
    count = _MSG.unpack_from(record, 0)[2]
    return [_REF.unpack_from(record, _MSG.size + i * _REF.size) for i in range(count)]


class _PoolFull(Exception):
    """The pool had no free slot under ``latest``: the message is dropped."""


_decoding = threading.local()  # .pool, .pid, .refs, .held: the message being unpickled in this thread


def _slot_array(index: int, dtype: Any, shape: Tuple[int, ...]) -> np.ndarray:
    """Stands for an array in the pool inside a pickle: the message's ``index``-th reference."""
    decoding = _decoding
    return decoding.pool.array(decoding.pid, decoding.refs[index], dtype, shape, decoding.held)


class _Encoder(pickle.Pickler):
    """Pickles one message per ``encode``: numpy arrays of at least ``OOB_MIN`` bytes go to
    the pool (in place if they were allocated there) and travel as a small reference.
    Other objects, large ``bytes`` too, travel inline (up to the ring's capacity)."""

    def __init__(self, pool: Pool) -> None:
        self._file = io.BytesIO()
        super().__init__(self._file, protocol=5)
        self._pool = pool
        self._refs: List[bytes] = []
        self._block = True
        self._should_stop: Callable[[], bool] = bool

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not np.ndarray or obj.nbytes < OOB_MIN or obj.dtype.hasobject:
            return NotImplemented
        ref = self._pool.store(obj, self._block, self._should_stop)
        if ref is None:
            raise _PoolFull()
        self._refs.append(ref)
        dtype = obj.dtype.str if obj.dtype.names is None and obj.dtype.subdtype is None else obj.dtype
        return _slot_array, (len(self._refs) - 1, dtype, obj.shape)

    def encode(self, obj: object, block: bool, should_stop: Callable[[], bool]) -> Tuple[bytes, List[bytes]]:
        """(pickled body, pool references) of ``obj``."""
        self._block, self._should_stop = block, should_stop
        self._refs = refs = []
        file = self._file
        file.seek(0)
        file.truncate()
        try:
            self.dump(obj)
        except BaseException:
            for ref in refs:
                self._pool.unstore(ref)
            raise
        finally:
            self.clear_memo()  # the memo would keep the message (and its arrays' slots) alive
        return file.getvalue(), refs


def encode(obj: object, stamp: float, pool: Optional[Pool], block: bool, should_stop: Callable[[], bool],
           routine: str, encoder: Optional[_Encoder] = None, meta: Meta = None) -> Optional[bytes]:
    """One record (``obj``, its source time ``stamp`` and order stamp ``meta``) for every remote
    receiver of a wire, or None if the pool is full (``latest``). ``encoder`` (one per sender,
    reused) saves making a pickler per message."""
    try:
        if pool is None:
            body, refs = pickle.dumps(obj, protocol=5), []
        else:
            body, refs = (encoder or _Encoder(pool)).encode(obj, block, should_stop)
    except _PoolFull:
        return None
    except (Closed, TransportError):
        raise
    except Exception as exc:
        raise TransportError(
            f"routine '{routine}' returned a {type(obj).__name__} that cannot be sent to another flow "
            f"({exc}); return picklable data (dicts, numpy arrays, dataclasses)") from None
    return assemble(body, refs, stamp, meta)


def assemble(body: bytes, refs: Sequence[bytes], stamp: float, meta: Meta) -> bytes:
    """A record from a pickled ``body``, the pool references of its large arrays, its source time
    and its order stamp."""
    stream, seq = meta or (0, 0)
    if not refs:
        return _MSG.pack(_MSG.size + len(body), _pid[0], 0, stamp, stream, seq) + body
    size = _MSG.size + len(refs) * _REF.size + len(body)
    return b"".join((_MSG.pack(size, _pid[0], len(refs), stamp, stream, seq), *refs, body))


def split(record: bytes) -> Tuple[int, List[Tuple[int, int, int, int, int]], memoryview, float, Meta]:
    """A record's producer pid, pool references (slot, generation, use stamp, offset, bytes),
    pickled body, source time and order stamp (``assemble`` reversed)."""
    _, pid, count, stamp, stream, seq = _MSG.unpack_from(record, 0)
    refs = [_REF.unpack_from(record, _MSG.size + i * _REF.size) for i in range(count)]
    return pid, refs, memoryview(record)[_MSG.size + count * _REF.size:], stamp, (stream, seq) if stream else None


def record_meta(record: bytes) -> Meta:
    """The order stamp of ``record``."""
    stream, seq = _MSG.unpack_from(record, 0)[4:]
    return (stream, seq) if stream else None


def decode(record: bytes, pool: Optional[Pool], receiver: int,
           held: List[Tuple[Tuple[np.ndarray, np.ndarray], int, int]]) -> Tuple[float, object]:
    """``(source time, object)`` of ``record``; the object's large arrays are read-only views of the
    pool. Each use of a pool slot is added to ``held`` (``Pool.sweep`` releases it once its arrays
    are gone); if decoding fails, the record's slots are released at once."""
    _, pid, count, source_time, _, _ = _MSG.unpack_from(record, 0)
    if not count:
        return source_time, pickle.loads(memoryview(record)[_MSG.size:])
    decoding = _decoding
    decoding.pool, decoding.pid, decoding.held = pool, pid, held
    decoding.refs = [_REF.unpack_from(record, _MSG.size + i * _REF.size) for i in range(count)]
    try:
        return source_time, pickle.loads(memoryview(record)[_MSG.size + count * _REF.size:])
    except BaseException:
        pool.release_record(record, receiver)
        raise
    finally:
        decoding.refs = decoding.held = None


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class RingReader:
    """The consumer's end of one ring.

    A ``block`` ring hands over every waiting record in one copy (less work per
    message while a fast producer fills it); a ``latest`` ring one at a time, the
    oldest of the newest ``depth``, so a slow consumer always gets recent data.
    Pool slots whose arrays are gone are released at every poll.
    """

    def __init__(self, ring: "ShmRing | LatestRing", pool: Optional[Pool], receiver: int) -> None:
        self._ring = ring
        self._pool = pool
        self._receiver = receiver
        self._taken: collections.deque = collections.deque()
        self._held: List[Tuple[Tuple[np.ndarray, np.ndarray], int, int]] = []
        self.meta: Meta = None

    def _release(self, record: bytes) -> None:
        self._pool.release_record(record, self._receiver)

    def poll(self) -> object:
        """The oldest ``(stamp, object)``, or EMPTY."""
        if self._held:
            self._pool.sweep(self._held, self._receiver)
        if not self._taken:
            self._taken.extend(self._ring.get(self._release))
            if not self._taken:
                return EMPTY
        record = self._taken.popleft()
        self.meta = record_meta(record)
        try:
            return decode(record, self._pool, self._receiver, self._held)
        except posix_ipc.ExistentialError:  # its producer died and its slots are gone
            return EMPTY


class RemoteTarget:
    """The producer's end of one ShmRing: the ring, its consumer's doorbell and index."""

    def __init__(self, ring: "ShmRing | LatestRing", bell: Doorbell, receiver: int, pool: Optional[Pool]) -> None:
        self.ring = ring
        self.bell = bell
        self.receiver = receiver
        self.pool = pool

    def on_drop(self, record: bytes) -> None:
        """A record of this receiver's was dropped unread: its pool slots are free for it."""
        self.pool.reclaim(record, self.receiver)


class WireSender:
    """Sends one routine's outputs over one wire to all of its destinations.

    A destination in a flow with replicas has one target per replica, a group in
    ``replicated``: each message goes to the one ``choose(group, message)`` picks
    (the pool slots it uses are reclaimed at once for the other replicas). Where the
    wire enters a replicated stage, ``entry`` (a number unique in the pipe, < 2**24)
    stamps every message with this sender's stream and a sequence number, which the
    replica's outputs carry on to an ordered merge.
    """

    def __init__(self, routine: str, block: bool, local: Sequence[LocalChannel],
                 remote: Sequence[RemoteTarget], pool: Optional[Pool],
                 replicated: Sequence[Sequence[RemoteTarget]] = (),
                 choose: Optional[Callable[[Sequence[RemoteTarget], object], RemoteTarget]] = None,
                 entry: Optional[int] = None) -> None:
        self._routine = routine
        self._block = block
        self._local = list(local)
        self._remote = list(remote)
        self._pool = pool
        self._encoder = _Encoder(pool) if pool is not None else None
        self._replicated = [list(group) for group in replicated]
        self._choose = choose
        self._entry = entry
        self._seq = 0

    def allocate(self, shape: Tuple[int, ...], dtype: np.dtype,
                 should_stop: Callable[[], bool]) -> Optional[np.ndarray]:
        """A writable array in this wire's pool (None if the wire has no pool, the array is small
        or the pool is full)."""
        if self._pool is None:
            return None
        return self._pool.allocate(shape, dtype, self._block, should_stop)

    def send(self, obj: object, stamp: float, should_stop: Callable[[], bool], meta: Meta = None) -> None:
        """Send ``obj``, produced by its source at ``stamp`` (``time.time()``), to every destination,
        carrying the order stamp ``meta`` of the input it came from (or a new one, into replicas)."""
        if self._entry is not None:
            meta = ((_pid[0] << 24) | self._entry, self._seq)
            self._seq += 1
        remote = self._remote
        if self._replicated:
            chosen = [self._choose(group, obj) for group in self._replicated]
            remote = remote + chosen
        if remote:
            record = encode(obj, stamp, self._pool, self._block, should_stop, self._routine, self._encoder, meta)
            if record is not None and self._replicated and self._pool is not None:
                for group, target in zip(self._replicated, chosen):  # the other replicas never get it
                    for other in group:
                        if other is not target:
                            self._pool.reclaim(record, other.receiver)
            for target in remote:
                if record is None:
                    target.ring.count_drop()
                    continue
                target.ring.put(record, target.on_drop, should_stop)
                target.bell.release()
        for channel in self._local:
            channel.put(obj, stamp, should_stop, meta)


class Inbox:
    """Everything a routine waits on: its inputs and its doorbell.

    ``meta`` is the order stamp of the message ``poll`` returned last. An input
    with a ``wait_hint()`` (an ordered merge holding messages back) bounds the
    doorbell wait, so it can give them up after its timeout.
    """

    def __init__(self, bell: Doorbell, readers: Sequence[object] = ()) -> None:
        self.bell = bell
        self.readers: List[object] = list(readers)
        self._turn = 0
        self.meta: Meta = None

    def poll(self) -> object:
        """The next waiting ``(stamp, message)``, taking inputs in turn, or EMPTY."""
        readers = self.readers
        n = len(readers)
        if n == 1:
            reader = readers[0]
            obj = reader.poll()
            self.meta = reader.meta
            return obj
        for k in range(n):
            reader = readers[(self._turn + k) % n]
            obj = reader.poll()
            if obj is not EMPTY:
                self.meta = reader.meta
                self._turn = (self._turn + k + 1) % n
                return obj
        return EMPTY

    def next(self) -> object:
        """A ``(stamp, message)``, waiting for the doorbell if none is there; EMPTY on a wake-up without one."""
        obj = self.poll()
        if obj is EMPTY:
            hints = [r.wait_hint() for r in self.readers if hasattr(r, "wait_hint")]
            hints = [h for h in hints if h is not None]
            if hints:
                try:
                    self.bell.acquire(max(min(hints), 0.001))
                except posix_ipc.BusyError:
                    pass
            else:
                self.bell.acquire()
            obj = self.poll()
        return obj
