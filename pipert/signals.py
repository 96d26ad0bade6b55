"""Stop signals: SIGTERM, SIGINT and SIGHUP, as every process of a pipe handles them.

Service managers, ``timeout`` and terminals send a stop signal to every process
of a group at the same moment: the daemon, the zygote and each flow. Each of
them handles it (see README, "Running as a service"): the daemon stops the pipe,
a flow stops its routines and runs their cleanups, the zygote reports it to the
daemon. A handler here never does that work itself: it writes the signal's
number into a socket that the process's main loop waits on, so no work runs in
the middle of whatever the interrupted thread was doing (holding a lock,
reading a message).
"""
from __future__ import annotations

import signal
import socket
from typing import List, Tuple

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def heeded() -> List[int]:
    """The stop signals this process does not ignore. A signal ignored when the daemon starts stays
    ignored in it and every process it forks (``nohup`` ignores SIGHUP; a shell ignores SIGINT in its
    background jobs), as Unix programs do."""
    return [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]


def signal_pipe() -> Tuple[socket.socket, socket.socket]:
    """From the main thread: route the heeded stop signals to a socket pair; returns it (read end first).

    Each signal writes its number into the second socket (``signal.set_wakeup_fd``);
    a loop that waits on the first wakes up and reads them with ``received``.
    Keep both ends open as long as the signals are routed.
    """
    reader, writer = socket.socketpair()
    for end in (reader, writer):
        end.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    for signum in heeded():
        signal.signal(signum, _wake_only)
    return reader, writer


def received(reader: socket.socket) -> List[int]:
    """The signals written into ``reader`` since the last call (empty if none)."""
    try:
        return list(reader.recv(64))
    except BlockingIOError:
        return []


def close_pipe(pair: Tuple[socket.socket, socket.socket]) -> None:
    """Stop routing signals to ``pair`` (e.g. in a freshly forked child) and close it."""
    signal.set_wakeup_fd(-1)
    for end in pair:
        end.close()


def _wake_only(signum: int, frame: object) -> None:
    """The Python-level handler: nothing to do, the C-level handler already wrote to the wakeup socket."""
