"""Named posix shared memory and semaphores, and their clean-up.

Every name is ``/pipert_<pipe id>_<owner pid>_<what>``: the daemon can unlink all
of a pipe's objects by prefix, unlink a dead flow's by its pid, and a new daemon
can sweep whatever a dead owner left behind (its pid is no longer alive).
"""
from __future__ import annotations

import logging
import mmap
import os
import re
from typing import Optional

import posix_ipc

_SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^(?:sem\.)?pipert_([0-9a-f]+)_(\d+)_")
_log = logging.getLogger(__name__)


def name(pipe_id: str, owner_pid: int, what: str) -> str:
    """The posix name of one object owned by ``owner_pid`` in pipe ``pipe_id``."""
    return f"/pipert_{pipe_id}_{owner_pid}_{what}"


def create_segment(seg_name: str, size: int) -> mmap.mmap:
    """Create a zero-filled shared-memory segment and map it."""
    seg = posix_ipc.SharedMemory(seg_name, posix_ipc.O_CREX, size=size)
    try:
        return mmap.mmap(seg.fd, size)
    finally:
        seg.close_fd()


def open_segment(seg_name: str) -> mmap.mmap:
    """Map an existing shared-memory segment."""
    seg = posix_ipc.SharedMemory(seg_name)
    try:
        return mmap.mmap(seg.fd, seg.size)
    finally:
        seg.close_fd()


def create_semaphore(sem_name: str, value: int = 0) -> posix_ipc.Semaphore:
    """Create a named semaphore with an initial ``value``."""
    return posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, initial_value=value)


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_entry(entry: str) -> bool:
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[4:])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
    except posix_ipc.ExistentialError:
        return False
    return True


def _entries() -> list:
    try:
        return [e for e in os.listdir(_SHM_DIR) if _NAME_RE.match(e)]
    except FileNotFoundError:
        return []


def unlink_owned(pipe_id: str, owner_pid: Optional[int] = None) -> int:
    """Unlink the pipe's objects (only ``owner_pid``'s if given); return how many."""
    count = 0
    for entry in _entries():
        found = _NAME_RE.match(entry)
        if found.group(1) == pipe_id and (owner_pid is None or int(found.group(2)) == owner_pid):
            count += _unlink_entry(entry)
    return count


def sweep_stale() -> int:
    """Unlink objects whose owner process is gone (left by a killed daemon or flow)."""
    count = sum(_unlink_entry(e) for e in _entries() if not _owner_alive(int(_NAME_RE.match(e).group(2))))
    if count:
        _log.info("swept %d shared-memory objects left by dead pipert processes", count)
    return count


def leftovers() -> list:
    """Names of every pipert object currently in /dev/shm (for tests and diagnostics)."""
    return sorted(_entries())
