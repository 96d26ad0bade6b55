"""Shared fixtures: pipes that are always torn down, and checks that nothing leaks."""
import logging
import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Ray's local test clusters on loopback only: with this, Ray takes 127.0.0.1 as the node
# address (read when ray is imported) instead of the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from helpers import living  # noqa: E402
from pipert import Pipe, shm  # noqa: E402


class ListHandler(logging.Handler):
    """Keeps every record it sees, for assertions."""

    def __init__(self):
        super().__init__(level=1)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=None):
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]


@pytest.fixture
def make_pipe():
    """Build pipes with a capturing logger; every one is shut down and checked for leaks after the test."""
    pipes = []

    def factory(**kwargs):
        logger = logging.getLogger(f"test{uuid.uuid4().hex[:6]}")
        logger.setLevel(1)
        logger.propagate = False
        handler = ListHandler()
        logger.addHandler(handler)
        pipe = Pipe(logger=kwargs.pop("logger", logger), **kwargs)
        pipe.captured = handler
        pipes.append(pipe)
        return pipe

    yield factory
    for pipe in pipes:
        pipe._shutdown()
    for pipe in pipes:
        pids = [s.pid for s in pipe._states.values() if s.pid]
        assert not living(pids), "flow processes outlived the pipe"
        assert not [e for e in shm.leftovers() if f"_{pipe.id}_" in e], "shared memory left behind"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end tests")
