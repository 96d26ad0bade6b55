"""Where the latency of one message goes when processes sleep between messages.

Paced sends (one every --interval seconds) from a forked producer to a consumer:
1. a bare posix semaphore: the producer stamps the time and posts, the consumer
   wakes and measures (the floor set by the kernel and the machine);
2. pipert's transport (WireSender -> ShmRing -> Inbox): stamp to "send returned"
   on the producer, stamp to "consumer awake", stamp to "message decoded";
3. the same transport sending back to back (warm caches, no sleeping) per message.

    python bench/wakeup.py [--count 2000] [--interval 0.001]
"""
import argparse
import mmap
import os
import struct
import sys
import time

import posix_ipc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipert import shm  # noqa: E402
from pipert.transport import EMPTY, RemoteTarget, RingReader, ShmRing, WireSender  # noqa: E402

PIPE_ID = "00aca7e0"  # hex, like every pipe id, so shm.unlink_owned finds its objects
_STAMP = struct.Struct("d")


def p50(values: list) -> str:
    values = sorted(values)
    return f"p50 {values[len(values) // 2] * 1e6:7.1f} us   p99 {values[int(len(values) * 0.99)] * 1e6:7.1f} us"


def bare_semaphore(count: int, interval: float) -> list:
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, initial_value=0)
    board = mmap.mmap(-1, 4096)
    pid = os.fork()
    if pid == 0:
        for _ in range(count):
            time.sleep(interval)
            _STAMP.pack_into(board, 0, time.perf_counter())
            sem.release()
        os._exit(0)
    latencies = []
    for _ in range(count):
        sem.acquire()
        latencies.append(time.perf_counter() - _STAMP.unpack_from(board, 0)[0])
    os.waitpid(pid, 0)
    sem.unlink()
    return latencies


def transport(count: int, interval: float) -> dict:
    ring = ShmRing.create(PIPE_ID, "w", 1 << 20, 256)
    bell = shm.create_semaphore(shm.name(PIPE_ID, os.getpid(), "bell"), 0)
    sender = WireSender("probe", True, [], [RemoteTarget(ring, bell, 0, None)], None)
    reader = RingReader(ring, None, 0)
    board = mmap.mmap(-1, 4096)
    never = lambda: False  # noqa: E731
    sent, awake, decoded = [], [], []
    try:
        pid = os.fork()
        if pid == 0:
            for n in range(count):
                if interval:
                    time.sleep(interval)
                sender.send({"counter": n, "ts": time.perf_counter(), "tag": "probe"}, time.time(), never)
                _STAMP.pack_into(board, 8 * (n % 500), time.perf_counter())
            os._exit(0)
        woke = time.perf_counter()
        while len(decoded) < count:
            message = reader.poll()
            if message is EMPTY:
                bell.acquire()
                woke = time.perf_counter()
                continue
            message = message[1]
            decoded.append(time.perf_counter() - message["ts"])
            awake.append(woke - message["ts"])
            sent.append(_STAMP.unpack_from(board, 8 * (message["counter"] % 500))[0] - message["ts"])
        os.waitpid(pid, 0)
    finally:
        ring.close()
        bell.close()
        shm.unlink_owned(PIPE_ID)
    return {"stamp -> send returned (producer)": sent, "stamp -> consumer awake": awake,
            "stamp -> message decoded": decoded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=0.001)
    args = parser.parse_args()
    print(f"paced: one message every {args.interval * 1e3:.1f} ms, {args.count} messages")
    print(f"  {'bare semaphore, stamp -> consumer awake':<53}{p50(bare_semaphore(args.count, args.interval))}")
    for name, values in transport(args.count, args.interval).items():
        print(f"  pipert transport, {name:<35}{p50(values)}")
    start = time.perf_counter()
    warm = transport(20 * args.count, 0.0)["stamp -> message decoded"]
    rate = len(warm) / (time.perf_counter() - start)
    print(f"back to back: {rate:,.0f} msg/s through the transport alone")


if __name__ == "__main__":
    main()
