"""How messages move from a routine's output to the routines it is wired to.

Inside one flow a message passes by reference through a ``LocalChannel``.
Between flows it is pickled (protocol 5) once per wire; buffers of at least
``OOB_MIN`` bytes (numpy arrays) go out-of-band into the wire's shared-memory
``Pool`` and only small records travel through one ``ShmRing`` per remote
destination. The receiver gets read-only numpy arrays that view the pool slot:
no copy on receive. A slot is reused only when every receiver's flag says it
released the slot (its arrays were garbage collected); only the owner counts,
so no cross-process atomics are needed.

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
import mmap
import os
import pickle
import struct
import threading
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import posix_ipc

from . import shm
from .errors import TransportError
from .wire import BLOCK

OOB_MIN = 64 * 1024
"""Buffers of at least this many bytes travel through the pool, not the ring."""

EMPTY = object()
"""Returned by ``poll`` when an input has nothing waiting."""

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
    """A bounded queue between two routines of the same flow; data passes by reference."""

    def __init__(self, depth: int, policy: str, bell: Doorbell) -> None:
        self._queue: collections.deque = collections.deque()
        self._depth = depth
        self._bell = bell
        self._space = threading.Semaphore(depth) if policy == BLOCK else None
        self.dropped = 0

    def put(self, obj: object, stamp: float, should_stop: Callable[[], bool]) -> None:
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
        self._queue.append((stamp, obj))
        self._bell.release()

    def poll(self) -> object:
        """The oldest ``(stamp, object)``, or EMPTY."""
        try:
            message = self._queue.popleft()
        except IndexError:
            return EMPTY
        if self._space is not None:
            self._space.release()
        return message

    def depth(self) -> int:
        return len(self._queue)


# Ring header: one 8-byte field per counter, each written by one side only (the
# producer's and the consumer's on separate cache lines); aligned 8-byte loads
# and stores through ctypes are atomic on the platforms we run on.
_HEAD, _WRITTEN, _DROPPED = 0, 8, 16  # bytes written, records written, records dropped (producer)
_TAIL, _READ = 64, 72  # bytes read, records read (consumer; the producer under the lock or when gone)
_GONE = 128  # 1 while the consumer's flow is dead (set by the daemon)
_RING_HDR_SIZE = 192
_RECOVERY_WAIT = 0.5  # seconds the daemon waits for a ring lock before taking it from a dead holder
_LEN = struct.Struct("=I")


class ShmRing:
    """A bounded queue of length-prefixed records from one producer to one consumer process.

    Under ``block`` it is lock-free: the producer alone moves the head, the
    consumer alone the tail. A producer that finds it full sleeps on ``space``
    until the consumer has emptied half of it, so a fast producer and a slower
    consumer do not wake each other for every message. Under ``latest`` the
    producer drops the oldest records itself, which moves the tail too, so both
    sides take ``lock`` (a semaphore used as a mutex).
    """

    def __init__(self, mm: mmap.mmap, lock: posix_ipc.Semaphore, space: posix_ipc.Semaphore,
                 depth: int, policy: str) -> None:
        self._mm = mm
        self._cap = len(mm) - _RING_HDR_SIZE
        self._lock = lock
        self._space = space
        self._depth = depth
        self._wake_at = depth // 2
        self._block = policy == BLOCK
        self._head, self._written, self._dropped, self._tail, self._read_count = (
            ctypes.c_uint64.from_buffer(mm, offset) for offset in (_HEAD, _WRITTEN, _DROPPED, _TAIL, _READ))
        self._gone = ctypes.c_uint8.from_buffer(mm, _GONE)

    @classmethod
    def create(cls, pipe_id: str, tag: str, capacity: int, depth: int, policy: str) -> "ShmRing":
        pid = os.getpid()
        return cls(shm.create_segment(shm.name(pipe_id, pid, f"ring{tag}"), _RING_HDR_SIZE + capacity),
                   shm.create_semaphore(shm.name(pipe_id, pid, f"lock{tag}"), 1),
                   shm.create_semaphore(shm.name(pipe_id, pid, f"space{tag}"), 0), depth, policy)

    @property
    def capacity(self) -> int:
        """The largest record the ring can ever hold, in bytes."""
        return self._cap

    def _write(self, pos: int, data: bytes) -> None:
        start = pos % self._cap
        end = start + len(data)
        if end <= self._cap:
            self._mm[_RING_HDR_SIZE + start:_RING_HDR_SIZE + end] = data
            return
        view, first = memoryview(data), self._cap - start
        self._mm[_RING_HDR_SIZE + start:_RING_HDR_SIZE + self._cap] = view[:first]
        self._mm[_RING_HDR_SIZE:_RING_HDR_SIZE + len(data) - first] = view[first:]

    def _read(self, pos: int, size: int) -> bytes:
        start = pos % self._cap
        if start + size <= self._cap:
            return self._mm[_RING_HDR_SIZE + start:_RING_HDR_SIZE + start + size]
        first = self._cap - start
        return self._mm[_RING_HDR_SIZE + start:_RING_HDR_SIZE + self._cap] + \
            self._mm[_RING_HDR_SIZE:_RING_HDR_SIZE + size - first]

    def _pop_oldest(self) -> bytes:
        """Take the oldest record off the ring (the consumer, or the producer while it may)."""
        tail = self._tail.value
        record = self._read(tail, _LEN.unpack(self._read(tail, _LEN.size))[0])
        self._tail.value = tail + len(record)
        self._read_count.value += 1
        return record

    def _full(self, need: int) -> bool:
        return (self._written.value - self._read_count.value >= self._depth
                or self._cap - (self._head.value - self._tail.value) < need)

    def _append(self, record: bytes) -> None:
        head = self._head.value
        self._write(head, record)
        self._head.value = head + len(record)
        self._written.value += 1

    def put(self, record: bytes, on_drop: Callable[[bytes], None], should_stop: Callable[[], bool]) -> None:
        """Append ``record`` (it starts with its own length); under ``latest``, or while the
        consumer's flow is dead, drop the oldest records to make room."""
        need = len(record)
        if need > self._cap:
            raise TransportError(
                f"a message of {need} bytes is larger than the wire's ring ({self._cap} bytes): send large "
                "data as contiguous numpy arrays (they go through the pool) or raise Pipe(ring_capacity=...)")
        if not self._block:
            with self._lock:
                self._drop_until_room(need, on_drop)
                self._append(record)
            return
        while self._full(need):
            if self._gone.value:
                self._drop_until_room(need, on_drop)
                break
            while True:  # forget stale wake-ups, look again, then sleep until the consumer makes room
                try:
                    self._space.acquire(0)
                except posix_ipc.BusyError:
                    break
            if self._full(need) and not self._gone.value:
                _wait(self._space, should_stop)
        self._append(record)

    def _drop_until_room(self, need: int, on_drop: Callable[[bytes], None]) -> None:
        while self._full(need):
            on_drop(self._pop_oldest())
            self._dropped.value += 1

    def get(self, everything: bool = False) -> List[bytes]:
        """Pop the oldest record, or with ``everything`` all waiting ones (copied out in one
        go), oldest first; each keeps its length prefix."""
        if not everything:
            with self._lock:
                return [self._pop_oldest()] if self._written.value != self._read_count.value else []
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

    def recover(self, drop: bool, on_drop: Callable[[bytes], None], consumer_gone: bool) -> List[bytes]:
        """Daemon side, after a flow died: mark whether the consumer is gone (a ``block``
        producer then drops instead of waiting forever), wake the producer, and return
        the records still waiting. With ``drop`` (the producer died) a ``latest`` ring
        is emptied under its lock, taken even from a dead holder; a ``block`` ring has
        no lock and its live consumer skips records whose slots are gone."""
        self._gone.value = consumer_gone
        kept = self.records()
        if drop and not self._block:
            try:
                self._lock.acquire(_RECOVERY_WAIT)
            except posix_ipc.BusyError:
                pass  # the dead process held it; the lock is ours now
            try:
                while self._written.value != self._read_count.value:
                    on_drop(self._pop_oldest())
                    self._dropped.value += 1
                kept = []
            finally:
                self._lock.release()
        self._space.release()
        return kept

    def consumer_back(self) -> None:
        """The consumer's flow runs (again): a ``block`` producer waits for room again."""
        self._gone.value = 0

    def close(self) -> None:
        """Unmap the ring and close its semaphores in this process (the daemon, at the end)."""
        self._final_stats = self.stats()
        del self._head, self._written, self._dropped, self._tail, self._read_count, self._gone
        self._mm.close()
        self._lock.close()
        self._space.close()

    def count_drop(self) -> None:
        """Count a message that never entered the ring (pool exhausted under ``latest``)."""
        self._dropped.value += 1

    def stats(self) -> Tuple[int, int]:
        """(messages waiting, messages dropped so far); the last figures once closed."""
        if self._mm.closed:
            return self._final_stats
        return self._written.value - self._read_count.value, self._dropped.value


_POOL_HDR_SIZE = 8  # u32 "owner waits for a release", padding
_MSG = struct.Struct("=IIHd")  # record length, producer pid, number of pool references, source time
_REF = struct.Struct("=HIQQ")  # slot, generation, offset, bytes


class Pool:
    """Shared-memory slots for one wire's large buffers.

    The header (flags, one byte per slot and receiver: 1 = released) is made by
    the daemon; the slots' segments are made by the producer flow, sized to the
    largest buffer seen, and named with its pid so a dead flow's are found.
    A producer can also ``allocate`` an array inside a slot and fill it: sending
    that array then copies nothing at all.
    """

    def __init__(self, pipe_id: str, tag: str, slots: int, receivers: int) -> None:
        pid = os.getpid()
        self._pipe_id = pipe_id
        self._tag = tag
        self._slots = slots
        self._receivers = receivers
        self._hdr = shm.create_segment(shm.name(pipe_id, pid, f"pool{tag}"), _POOL_HDR_SIZE + slots * receivers)
        self._hdr[_POOL_HDR_SIZE:] = b"\x01" * (slots * receivers)
        self._released = shm.create_semaphore(shm.name(pipe_id, pid, f"released{tag}"), 0)
        self._free = b"\x01" * receivers
        self._held = b"\x00" * receivers
        self._segments: Dict[int, Tuple[int, int, mmap.mmap, int]] = {}  # slot -> gen, capacity, map, address
        self._owned: set = set()  # slots the producer's own arrays (from ``allocate``) still use
        self._next = 0
        self._views: Dict[Tuple[int, int], Tuple[int, mmap.mmap]] = {}

    def _segment_name(self, pid: int, slot: int, gen: int) -> str:
        return shm.name(self._pipe_id, pid, f"w{self._tag}s{slot}g{gen}")

    def _released_by_all(self, slot: int) -> bool:
        off = _POOL_HDR_SIZE + slot * self._receivers
        return self._hdr[off:off + self._receivers] == self._free

    def _find_free(self) -> Optional[int]:
        for k in range(self._slots):
            slot = (self._next + k) % self._slots
            if slot not in self._owned and self._released_by_all(slot):
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
        gen, capacity, mm, _ = self._segments.get(slot, (0, 0, None, 0))
        if capacity < size:
            if mm is not None:
                mm.close()
                posix_ipc.unlink_shared_memory(self._segment_name(os.getpid(), slot, gen))
            gen += 1
            capacity = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            mm = shm.create_segment(self._segment_name(os.getpid(), slot, gen), capacity)
            self._segments[slot] = (gen, capacity, mm, ctypes.addressof(ctypes.c_char.from_buffer(mm)))
        self._next = slot + 1
        return slot

    def _hold(self, slot: int, offset: int, size: int) -> bytes:
        off = _POOL_HDR_SIZE + slot * self._receivers
        self._hdr[off:off + self._receivers] = self._held
        return _REF.pack(slot, self._segments[slot][0], offset, size)

    def _owned_slot(self, raw: memoryview) -> Optional[Tuple[int, int]]:
        """(slot, offset) if ``raw`` lies in a slot the producer allocated and no receiver holds."""
        if not self._owned:
            return None
        address = np.frombuffer(raw, dtype=np.uint8).ctypes.data
        for slot in tuple(self._owned):
            _, capacity, _, base = self._segments[slot]
            if base <= address and address + raw.nbytes <= base + capacity and self._released_by_all(slot):
                return slot, address - base
        return None

    def allocate(self, size: int, block: bool, should_stop: Callable[[], bool]) -> Optional[memoryview]:
        """A writable buffer inside a slot, kept from reuse until the producer drops it."""
        slot = self._take(size, block, should_stop)
        if slot is None:
            return None
        self._owned.add(slot)
        holder = (ctypes.c_char * size).from_buffer(self._segments[slot][2])
        weakref.finalize(holder, self._owned.discard, slot)
        return memoryview(holder)

    def store(self, raw: memoryview, block: bool, should_stop: Callable[[], bool]) -> Optional[bytes]:
        """Reference ``raw`` in the pool, held by every receiver: in place if it was allocated
        here, else copied into a free slot. None if the pool is full under ``latest``."""
        size = raw.nbytes
        owned = self._owned_slot(raw)
        if owned is not None:
            return self._hold(owned[0], owned[1], size)
        slot = self._take(size, block, should_stop)
        if slot is None:
            return None
        self._segments[slot][2][0:size] = raw
        return self._hold(slot, 0, size)

    def release(self, slot: int, receiver: int) -> None:
        """Mark ``slot`` released by ``receiver`` and wake an owner waiting for room."""
        self._hdr[_POOL_HDR_SIZE + slot * self._receivers + receiver] = 1
        if self._hdr[0]:
            self._released.release()

    def release_record(self, record: bytes, receiver: int) -> None:
        """Release the slots of a record ``receiver`` will never decode (dropped, or its slots are gone)."""
        for ref in _refs(record):
            self.release(ref[0], receiver)

    def release_all(self, receiver: int, keep: Sequence[bytes] = ()) -> None:
        """Release every slot ``receiver`` holds but those of the records in ``keep`` (its flow died)."""
        kept = {ref[0] for record in keep for ref in _refs(record)}
        for slot in range(self._slots):
            if slot not in kept:
                self.release(slot, receiver)

    def close(self) -> None:
        """Unmap the header and close the semaphore in this process (the daemon, at the end)."""
        self._hdr.close()
        self._released.close()

    def unstore(self, ref: bytes) -> None:
        """Give back a slot that ``store`` filled but no receiver will see."""
        slot = _REF.unpack(ref)[0]
        for receiver in range(self._receivers):
            self.release(slot, receiver)

    def view(self, pid: int, slot: int, gen: int, offset: int, size: int, receiver: int) -> memoryview:
        """A read-only view into a slot that releases it when the last array using it is gone."""
        cached = self._views.get((pid, slot))
        if cached is None or cached[0] != gen:
            if len(self._views) >= 4 * self._slots:
                self._views.clear()  # mappings of a dead producer; arrays still using them keep them
            cached = (gen, shm.open_segment(self._segment_name(pid, slot, gen)))
            self._views[(pid, slot)] = cached
        # numpy keeps the object under a memoryview alive, not the memoryview
        # itself, so the finalizer goes on a ctypes array of our own over the slot.
        holder = (ctypes.c_char * size).from_buffer(cached[1], offset)
        weakref.finalize(holder, self.release, slot, receiver)
        return memoryview(holder).toreadonly()


def _refs(record: bytes) -> List[Tuple[int, int, int, int]]:
    count = _MSG.unpack_from(record, 0)[2]
    return [_REF.unpack_from(record, _MSG.size + i * _REF.size) for i in range(count)]


def encode(obj: object, stamp: float, pool: Optional[Pool], block: bool, should_stop: Callable[[], bool],
           routine: str) -> Optional[bytes]:
    """One record (``obj`` and its source time ``stamp``) for every remote receiver of a wire, or None
    if the pool is full (``latest``)."""
    big: list = []
    try:
        if pool is None:
            body = pickle.dumps(obj, protocol=5)
        else:
            body = pickle.dumps(obj, protocol=5,
                                buffer_callback=lambda b: b.raw().nbytes < OOB_MIN or big.append(b))
    except Exception as exc:
        raise TransportError(
            f"routine '{routine}' returned a {type(obj).__name__} that cannot be sent to another flow "
            f"({exc}); return picklable data (dicts, numpy arrays, dataclasses)") from None
    if not big:
        return _MSG.pack(_MSG.size + len(body), _pid[0], 0, stamp) + body
    refs = []
    for buf in big:
        ref = pool.store(buf.raw(), block, should_stop)
        if ref is None:
            for held in refs:
                pool.unstore(held)
            return None
        refs.append(ref)
    size = _MSG.size + len(refs) * _REF.size + len(body)
    return b"".join((_MSG.pack(size, _pid[0], len(refs), stamp), *refs, body))


def decode(record: bytes, pool: Optional[Pool], receiver: int) -> Tuple[float, object]:
    """``(source time, object)`` of ``record``; the object's large buffers are read-only views of the pool."""
    _, pid, count, stamp = _MSG.unpack_from(record, 0)
    if not count:
        return stamp, pickle.loads(memoryview(record)[_MSG.size:])
    buffers = [pool.view(pid, *_REF.unpack_from(record, _MSG.size + i * _REF.size), receiver)
               for i in range(count)]
    return stamp, pickle.loads(memoryview(record)[_MSG.size + count * _REF.size:], buffers=buffers)


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class RingReader:
    """The consumer's end of one ShmRing.

    Under ``block`` it takes every waiting record in one copy (less work per
    message while a fast producer fills the ring); under ``latest`` one at a
    time, so that a record waiting in the ring can still be replaced by a newer one.
    """

    def __init__(self, ring: ShmRing, pool: Optional[Pool], receiver: int, policy: str) -> None:
        self._ring = ring
        self._pool = pool
        self._receiver = receiver
        self._everything = policy == BLOCK
        self._taken: collections.deque = collections.deque()

    def poll(self) -> object:
        """The oldest ``(stamp, object)``, or EMPTY."""
        if not self._taken:
            self._taken.extend(self._ring.get(self._everything))
            if not self._taken:
                return EMPTY
        record = self._taken.popleft()
        try:
            return decode(record, self._pool, self._receiver)
        except posix_ipc.ExistentialError:  # its producer died and its slots are gone
            self._pool.release_record(record, self._receiver)
            return EMPTY


class RemoteTarget:
    """The producer's end of one ShmRing: the ring, its consumer's doorbell and index."""

    def __init__(self, ring: ShmRing, bell: Doorbell, receiver: int, pool: Optional[Pool]) -> None:
        self.ring = ring
        self.bell = bell
        self.receiver = receiver
        self.pool = pool

    def on_drop(self, record: bytes) -> None:
        """A record of this receiver's was dropped unread: release its pool slots."""
        self.pool.release_record(record, self.receiver)


class WireSender:
    """Sends one routine's outputs over one wire to all of its destinations."""

    def __init__(self, routine: str, block: bool, local: Sequence[LocalChannel],
                 remote: Sequence[RemoteTarget], pool: Optional[Pool]) -> None:
        self._routine = routine
        self._block = block
        self._local = list(local)
        self._remote = list(remote)
        self._pool = pool

    def allocate(self, shape: Tuple[int, ...], dtype: np.dtype,
                 should_stop: Callable[[], bool]) -> Optional[np.ndarray]:
        """A writable array in this wire's pool (None if the wire has no pool or it is full)."""
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self._pool is None or size < OOB_MIN:
            return None
        buffer = self._pool.allocate(size, self._block, should_stop)
        return None if buffer is None else np.frombuffer(buffer, dtype=dtype).reshape(shape)

    def send(self, obj: object, stamp: float, should_stop: Callable[[], bool]) -> None:
        """Send ``obj``, produced by its source at ``stamp`` (``time.time()``), to every destination."""
        if self._remote:
            record = encode(obj, stamp, self._pool, self._block, should_stop, self._routine)
            for target in self._remote:
                if record is None:
                    target.ring.count_drop()
                    continue
                target.ring.put(record, target.on_drop, should_stop)
                target.bell.release()
        for channel in self._local:
            channel.put(obj, stamp, should_stop)


class Inbox:
    """Everything a routine waits on: its inputs and its doorbell."""

    def __init__(self, bell: Doorbell, readers: Sequence[object] = ()) -> None:
        self.bell = bell
        self.readers: List[object] = list(readers)
        self._turn = 0

    def poll(self) -> object:
        """The next waiting ``(stamp, message)``, taking inputs in turn, or EMPTY."""
        readers = self.readers
        n = len(readers)
        if n == 1:
            return readers[0].poll()
        for k in range(n):
            obj = readers[(self._turn + k) % n].poll()
            if obj is not EMPTY:
                self._turn = (self._turn + k + 1) % n
                return obj
        return EMPTY

    def next(self) -> object:
        """A ``(stamp, message)``, waiting for the doorbell if none is there; EMPTY on a wake-up without one."""
        obj = self.poll()
        if obj is EMPTY:
            self.bell.acquire()
            obj = self.poll()
        return obj
