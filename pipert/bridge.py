"""Bridges: a wire between flows on two nodes, carried by one TCP stream between their hosts.

The producer writes into a ring exactly as it would for a flow on its own node.
On its host a ``_BridgeOut`` thread reads that ring and sends the records as
they are (the pickled body is never unpickled on the way): small records are
batched into one send, large buffers are sent straight from the producer's
pool slots. On the consumer's host a ``_BridgeIn`` thread receives each large
buffer directly into a slot of a pool of its own and writes the record into the
consumer's ring, so the consumer gets read-only numpy arrays as locally.

Semantics: under ``block`` a full consumer ring stops the receiver, TCP's flow
control stops the sender, and the sender stops reading the producer's ring, so
the producer waits: lossless, with per-wire order. Under ``latest`` both rings
drop their oldest record when full, so depth and drops hold as locally.

Each host has one ``Hub``: a listener (authenticated with the pipe's secret)
that takes bridge streams, and the agents' control connections on the driver.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import posix_ipc

from .transport import Doorbell, Pool, assemble, split
from .wire import BLOCK

_log = logging.getLogger(__name__)
_ENTRY = struct.Struct("!IdQQH")  # body bytes, source time, order stream, order seq, number of large buffers
_SIZE = struct.Struct("!Q")
_BATCH = 64  # records sent in one batch at most
_RETRY = 0.2  # seconds between connection attempts while the other host is not reachable


def _tune(sock: socket.socket) -> None:
    """No Nagle delay (batches are already large) and keep-alives that notice a dead peer."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _handshake(sock: socket.socket, authkey: bytes, hello: Optional[tuple]) -> Optional[tuple]:
    """multiprocessing's HMAC challenge both ways on ``sock``, then the client's ``hello``
    (a small tuple, pickled between two authenticated pipert processes)."""
    conn = Connection(os.dup(sock.fileno()))
    try:
        if hello is None:
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
            return conn.recv()
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        conn.send(hello)
        return None
    finally:
        conn.close()


def connect(address: Tuple[str, int], authkey: bytes, hello: tuple) -> socket.socket:
    """An authenticated connection to a host's hub that introduces itself with ``hello``."""
    sock = socket.create_connection(address, timeout=10.0)
    try:
        sock.settimeout(None)
        _tune(sock)
        _handshake(sock, authkey, hello)
    except BaseException:
        sock.close()
        raise
    return sock


def _receive(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOFError if the peer closed."""
    got, size = 0, view.nbytes
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("the bridge's peer closed the connection")
        got += n


class _BridgeOut(threading.Thread):
    """Reads one ring on the producer's host and streams its records to the consumer's host."""

    def __init__(self, hub: "Hub", key: str, consumer: str, ring: Any, pool: Pool, receiver: int,
                 bell: Doorbell) -> None:
        super().__init__(name=f"pipert-bridge-out-{key}", daemon=True)
        self._hub = hub
        self.key = key
        self.consumer = consumer  # the flow process at the other end
        self.ring = ring
        self._pool = pool
        self._receiver = receiver
        self._bell = bell
        self._conn: Optional[socket.socket] = None

    def _connection(self) -> Optional[socket.socket]:
        if self._conn is None:
            address = self._hub.addresses.get(self.consumer)
            if address is None:
                return None
            try:
                self._conn = connect(address, self._hub.authkey, ("bridge", self.key))
            except OSError:
                return None
        return self._conn

    def run(self) -> None:
        while not self._hub.closed:
            conn = self._connection()
            if conn is None:  # the consumer's host is not (yet, or no longer) there: hold on
                self._hub.closed_event.wait(_RETRY)
                continue
            records = self.ring.get(self._release)
            if not records:
                try:
                    self._bell.acquire(_RETRY)
                except posix_ipc.BusyError:
                    pass
                continue
            try:
                self._send(conn, records[:_BATCH])
                for start in range(_BATCH, len(records), _BATCH):
                    self._send(conn, records[start:start + _BATCH])
            except OSError:
                _log.warning("bridge %s lost its connection; reconnecting", self.key)
                conn.close()
                self._conn = None

    def _send(self, conn: socket.socket, records: List[bytes]) -> None:
        """One batch: its size, every record's header and body, then each large buffer."""
        head, buffers, uses = [], [], []
        for record in records:
            pid, refs, body, stamp, meta = split(record)
            try:
                views = [self._pool.view(pid, slot, gen, offset, size) for slot, gen, _, offset, size in refs]
            except posix_ipc.ExistentialError:  # its producer died and its slots are gone
                self._release(record)
                continue
            stream, seq = meta or (0, 0)
            head.append(_ENTRY.pack(len(body), stamp, stream, seq, len(views)))
            head.extend(_SIZE.pack(view.nbytes) for view in views)
            head.append(body)
            buffers.extend(views)
            uses.append(record)
        if head:
            batch = b"".join(head)
            conn.sendall(_SIZE.pack(len(batch)) + batch)
            for view in buffers:
                conn.sendall(view)
        del buffers
        for record in uses:  # sent: the slots are free for this receiver
            self._release(record)

    def _release(self, record: bytes) -> None:
        self._pool.release_record(record, self._receiver)

    def close(self) -> None:
        """Wake the thread from a blocking send (at the end of the pipe)."""
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _BridgeIn(threading.Thread):
    """Receives one bridge stream into the consumer's ring and a pool of this host's own."""

    def __init__(self, hub: "Hub", key: str, conn: socket.socket, ring: Any, pool: Pool, bell: Doorbell,
                 policy: str) -> None:
        super().__init__(name=f"pipert-bridge-in-{key}", daemon=True)
        self._hub = hub
        self.key = key
        self._conn = conn
        self._ring = ring
        self._pool = pool
        self._bell = bell
        self._block = policy == BLOCK
        self._scratch = bytearray()
        self._size = bytearray(_SIZE.size)

    def _stop(self) -> bool:
        return self._hub.closed

    def run(self) -> None:
        try:
            while not self._hub.closed:
                _receive(self._conn, memoryview(self._size))
                batch = memoryview(bytearray(_SIZE.unpack(self._size)[0]))
                _receive(self._conn, batch)
                offset = 0
                while offset < len(batch):
                    size, stamp, stream, seq, count = _ENTRY.unpack_from(batch, offset)
                    offset += _ENTRY.size
                    sizes = [_SIZE.unpack_from(batch, offset + 8 * i)[0] for i in range(count)]
                    offset += 8 * count
                    body = batch[offset:offset + size]
                    offset += size
                    self._deliver(body, sizes, stamp, (stream, seq) if stream else None)
        except (EOFError, OSError):
            pass
        finally:
            self._conn.close()

    def interrupt(self) -> None:
        """Wake the thread from a blocking receive (at the end of the pipe)."""
        try:
            self._conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _deliver(self, body: memoryview, sizes: List[int], stamp: float, meta: Optional[Tuple[int, int]]) -> None:
        slots, refs = [], []
        for size in sizes:
            slot = self._pool.allocate((size,), np.uint8, self._block, self._stop)
            if slot is None:  # the pool is full under latest: read the buffer off the stream and drop it
                if len(self._scratch) < size:
                    self._scratch = bytearray(size)
                _receive(self._conn, memoryview(self._scratch)[:size])
            else:
                _receive(self._conn, memoryview(slot))
            slots.append(slot)
        if any(slot is None for slot in slots):
            self._ring.count_drop()
            return
        for slot in slots:  # the allocated array is stored in place, with no copy
            refs.append(self._pool.store(slot, self._block, self._stop))
        self._ring.put(assemble(body, refs, stamp, meta), self._on_drop, self._stop)
        self._bell.release()

    def _on_drop(self, record: bytes) -> None:
        self._pool.reclaim(record, 0)


class Hub:
    """A host's end of the network: the listener for bridges (and, on the driver, agents),
    the bridges out of this host, and where the host of every flow process listens."""

    def __init__(self, host_ip: str, authkey: bytes,
                 on_agent: Optional[Callable[[str, Connection], None]] = None) -> None:
        self.authkey = authkey
        self.addresses: Dict[str, Tuple[str, int]] = {}
        self.closed = False
        self.closed_event = threading.Event()
        self._on_agent = on_agent
        self._listener = socket.create_server((host_ip, 0))
        self.address: Tuple[str, int] = self._listener.getsockname()[:2]
        self._incoming: Dict[str, Tuple[Any, Pool, Doorbell, str]] = {}
        self._outgoing: List[_BridgeOut] = []
        self._inbound: List[_BridgeIn] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="pipert-hub", daemon=True)
        self._thread.start()

    def expect(self, key: str, ring: Any, pool: Pool, bell: Doorbell, policy: str) -> None:
        """Deliver the bridge stream ``key`` (when it connects, again after a reconnect) into ``ring``."""
        self._incoming[key] = (ring, pool, bell, policy)

    def send(self, key: str, consumer: str, ring: Any, pool: Pool, receiver: int, bell: Doorbell) -> None:
        """Stream ``ring`` (read as ``receiver`` of ``pool``) to the host of flow process ``consumer``."""
        self._outgoing.append(_BridgeOut(self, key, consumer, ring, pool, receiver, bell))

    def start(self, addresses: Dict[str, Optional[Tuple[str, int]]]) -> None:
        """Learn where the host of each flow process listens and start the bridges out that wait.

        None means the process's node is lost: a ``block`` producer then drops instead of
        waiting for it, until it runs again somewhere."""
        for consumer, address in addresses.items():
            if address is None:
                self.addresses.pop(consumer, None)
            else:
                self.addresses[consumer] = tuple(address)
            for bridge in self._outgoing:
                if bridge.consumer == consumer and address is None:
                    bridge.ring.recover(True)
                elif bridge.consumer == consumer:
                    bridge.ring.consumer_back()
        for bridge in self._outgoing:
            if not bridge.ident:
                bridge.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            try:
                _tune(sock)
                kind, name = _handshake(sock, self.authkey, None)
            except Exception:
                _log.warning("a connection to the pipe's hub failed its handshake; closed it")
                sock.close()
                continue
            if kind == "bridge" and name in self._incoming:
                bridge = _BridgeIn(self, name, sock, *self._incoming[name])
                with self._lock:
                    self._inbound = [b for b in self._inbound if b.is_alive()] + [bridge]
                bridge.start()
            elif kind == "agent" and self._on_agent is not None:
                self._on_agent(name, Connection(sock.detach()))
            else:
                sock.close()

    def close(self) -> None:
        """Stop every bridge thread and the listener."""
        self.closed = True
        self.closed_event.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(2.0)
        for bridge in self._outgoing:
            bridge.close()
        with self._lock:
            inbound = list(self._inbound)
        for bridge in inbound:
            bridge.interrupt()
        deadline = time.monotonic() + 2.0
        for bridge in self._outgoing + inbound:
            if bridge.is_alive():
                bridge.join(max(deadline - time.monotonic(), 0.0))
