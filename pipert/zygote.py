"""The zygote: a single-threaded process that forks flow processes on request.

The daemon forks the zygote at ``build()``, before it starts any thread, so
every flow (also one restarted while the daemon runs RPC servers and logging
threads) is forked from a process that has no threads and holds no locks, and
still has the user's routines in memory: routines defined in a script work.
The zygote reaps its children through pidfds and reports their exit codes. If
the daemon dies, the zygote waits for the flows (they notice on their own),
kills stragglers, and unlinks the pipe's shared memory.

A stop signal (SIGTERM, SIGINT, SIGHUP) does not end the zygote: only its
daemon does, by closing the socket. The zygote reports the signal, and the
daemon decides whether it was part of a stop of the whole group or meant for the
zygote alone (then its flows are stopped as failed and restart by policy).
"""
from __future__ import annotations

import os
import pickle
import selectors
import signal
import socket
import sys
import time
from typing import Callable, Dict, Tuple

from . import shm
from .signals import close_pipe, received, signal_pipe

_ORPHAN_GRACE = 3.0  # seconds flows get to exit on their own once the daemon is gone


class Zygote:
    """The daemon's handle on the zygote process."""

    def __init__(self, pipe_id: str, run_flow: Callable[[str, int], None], detach: bool = False) -> None:
        """``detach`` (in a Ray node agent): the zygote is a grandchild, so that when Ray kills the
        agent and its children or its process group (the driver died), the zygote lives on to end the flows and free the
        node's shared memory."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            code = 0
            try:
                if detach:
                    if os.fork():
                        os._exit(0)
                    os.setsid()  # out of the agent's process group too, which Ray may kill as a whole
                _serve(theirs, pipe_id, run_flow)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.sock = ours
        if detach:
            os.waitpid(self.pid, 0)

    def spawn(self, flow: str, fd: int) -> None:
        """Ask for a new process for ``flow`` that talks to the daemon over ``fd``."""
        socket.send_fds(self.sock, [pickle.dumps(("spawn", flow))], [fd])

    def receive(self) -> Tuple:
        """One report: ("spawned", flow, pid), ("exited", flow, pid, exit code) or ("signalled", signum);
        () at EOF."""
        data = self.sock.recv(65536)
        return pickle.loads(data) if data else ()

    def stop(self) -> None:
        """Let the zygote exit and reap it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(sock: socket.socket, pipe_id: str, run_flow: Callable[[str, int], None]) -> None:
    signals = signal_pipe()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(signals[0], selectors.EVENT_READ)
    children: Dict[int, Tuple[int, str]] = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is signals[0]:
                for signum in received(signals[0]):
                    try:
                        sock.send(pickle.dumps(("signalled", signum)))
                    except OSError:
                        pass
            elif key.fileobj is sock:
                data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
                if not data:
                    _orphaned(children, pipe_id)
                    return
                _, flow = pickle.loads(data)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    sock.close()
                    close_pipe(signals)
                    for pidfd in children:
                        os.close(pidfd)
                    run_flow(flow, fds[0])
                os.close(fds[0])
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, flow)
                selector.register(pidfd, selectors.EVENT_READ)
                sock.send(pickle.dumps(("spawned", flow, pid)))
            else:
                pid, flow = children.pop(key.fd)
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                try:
                    sock.send(pickle.dumps(("exited", flow, pid, os.waitstatus_to_exitcode(status))))
                except OSError:
                    pass


def _orphaned(children: Dict[int, Tuple[int, str]], pipe_id: str) -> None:
    """The daemon is gone: give flows a moment to exit, kill the rest, free the shared memory."""
    deadline = time.monotonic() + _ORPHAN_GRACE
    pending = {pid for pid, _ in children.values()}
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            if os.waitpid(pid, os.WNOHANG)[0]:
                pending.discard(pid)
        time.sleep(0.05)
    for pid in pending:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    shm.unlink_owned(pipe_id)
    sys.stderr.flush()
