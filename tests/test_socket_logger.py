"""The cockpit logger against a real socket.io server that can crash, hang and come back.

The stand-in cockpit is python-socketio's Server on gevent's WSGI server (with
simple-websocket, so both polling and websocket work), in a child process: a
test can kill it (a crash: connections reset) or SIGSTOP it (a hung cockpit:
connections stay open, nothing is read) and start it again on the same port.
It appends every event it receives to a JSON-lines file the test reads.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pipert import socket_logger
from pipert.log import PIPE_INFRASTRUCTURE  # also registers Logger.plog
from pipert.socket_logger import CockpitHandler, find_cockpit_handler, get_socket_logger

from cockpit import Cockpit

pytestmark = pytest.mark.timeout(60)

TIME_FORMAT = re.compile(r"^\d\d-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$")
STRUCTURE = {
    "Routines": [
        {"flow_name": "flow", "routine_name": "Source-0", "events": ["start", "stop", "kill"]},
        {"flow_name": "flow", "routine_name": "it's \"quoted\"", "events": ["say 'hi'", "back\\slash"]},
    ],
    "Events": ["start", "stop", "kill"],
    "flags": [True, False, None],
}


def unused_url() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def wait_for(condition: Callable[[], object], timeout: float = 10.0,
             poke: Callable[[], None] | None = None) -> None:
    """Wait until ``condition()``, calling ``poke()`` (e.g. to log again) while waiting."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the cockpit"
        if poke is not None:
            poke()
        time.sleep(0.02)


def timed(emit: Callable[[int], None], count: int) -> str:
    """Call ``emit(i)`` ``count`` times and check it never held the caller up.

    The cost is the emitting thread's CPU time, which a busy machine does not
    inflate; blocking (on a connection, a backoff) would show as one slow call.
    """
    slowest = 0.0
    wall, cpu = time.perf_counter(), time.thread_time()
    for index in range(count):
        before = time.perf_counter()
        emit(index)
        slowest = max(slowest, time.perf_counter() - before)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert cpu < 1.0 and slowest < 0.25 and wall < 5.0, (wall, cpu, slowest)
    return f"{wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU, slowest call {slowest * 1000:.1f} ms"


@pytest.fixture
def cockpit(tmp_path: Path) -> Iterator[Cockpit]:
    server = Cockpit(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def loggers() -> Iterator[list[logging.Logger]]:
    """Loggers a test configures; their handlers are closed and removed afterwards."""
    created: list[logging.Logger] = []
    yield created
    for logger in created:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


@pytest.fixture
def no_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOCKET_LOGGER_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket_logger, "_warned_no_url", False)


def cockpit_logger(loggers: list[logging.Logger], name: str, url: str,
                   **options: object) -> tuple[logging.Logger, CockpitHandler]:
    """A logger with only a CockpitHandler (``options`` go to it), closed after the test."""
    logger = logging.getLogger(name)
    logger.setLevel(PIPE_INFRASTRUCTURE)
    logger.propagate = False
    handler = CockpitHandler(url, source=name, **options)
    logger.addHandler(handler)
    loggers.append(logger)
    return logger, handler


# --- the record format ---------------------------------------------------------------------


def test_log_payload_is_a_json_string_with_the_cockpit_fields(cockpit: Cockpit, loggers: list) -> None:
    logger = get_socket_logger("pipe.flow.Source-0", url=cockpit.url)
    loggers.append(logger)
    logger.info("hello %s", "world")
    wait_for(lambda: cockpit.events("log"))
    payload = cockpit.events("log")[0]
    assert isinstance(payload, str)
    record = json.loads(payload)
    assert list(record) == ["time", "source", "level", "message"]
    assert TIME_FORMAT.match(record["time"]), record["time"]
    sent_at = datetime.strptime(record["time"], "%d-%m-%y %H:%M:%S.%f")
    assert abs((datetime.now() - sent_at).total_seconds()) < 10
    assert record["source"] == "pipe.flow.Source-0"
    assert record["level"] == "INFO"
    assert record["message"] == "hello world"


def test_levels_are_mapped_to_the_ones_the_cockpit_knows(cockpit: Cockpit, loggers: list) -> None:
    logger, _ = cockpit_logger(loggers, "pipe.levels", cockpit.url)
    logger.debug("debug")
    logger.info("info")
    logger.warning("warning")
    logger.error("error")
    logger.critical("critical")
    logger.plog("plog")
    logger.log(25, "between info and warning")
    logger.log(7, "just above plog")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    wait_for(lambda: len(cockpit.events("log")) == 9)
    levels = {record["message"].splitlines()[0]: record["level"] for record in cockpit.records()}
    assert levels == {
        "debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR",
        "critical": "ERROR", "plog": "PIPE_INFRASTRUCTURE", "between info and warning": "WARNING",
        "just above plog": "PIPE_INFRASTRUCTURE", "failed": "EXCEPTION",
    }


def test_custom_levels_go_to_the_nearest_known_level() -> None:
    nearest = socket_logger._level_name
    assert [nearest(n) for n in (0, 5, 9, 10, 15, 24, 35, 45, 50, 60)] == [
        "PIPE_INFRASTRUCTURE", "PIPE_INFRASTRUCTURE", "DEBUG", "DEBUG", "INFO",
        "INFO", "ERROR", "ERROR", "ERROR", "ERROR"]


NASTY = [
    'double "quotes" and \'single\' ones',
    "a\nmultiline\r\nmessage\twith tabs",
    "backslashes \\ \\n \\\" \\u0041 C:\\path\\",
    "unicode: héllo ✓ 日本語 🎥",
    "control \x00 \x1b[31m \x7f",
    "lone surrogate \udcff from a bad decode",
    '"}, {"level": "ERROR", "message": "injected',
    "input: not a frame, 'data': {broken",
    "",
]


def test_nasty_messages_arrive_as_valid_json_and_intact(cockpit: Cockpit, loggers: list) -> None:
    logger, _ = cockpit_logger(loggers, "pipe.nasty", cockpit.url)
    for message in NASTY:
        logger.info(message)
    try:
        raise ValueError('bad "value" \'x\'\nsecond line ✓')
    except ValueError:
        logger.exception("with a traceback: %r", {"key": "it's"})
    wait_for(lambda: len(cockpit.events("log")) == len(NASTY) + 1)
    payloads = cockpit.events("log")
    assert all("\n" not in payload for payload in payloads)
    records = [json.loads(payload) for payload in payloads]
    assert [record["message"] for record in records[:-1]] == NASTY
    traceback_record = records[-1]
    assert traceback_record["level"] == "EXCEPTION"
    assert traceback_record["message"].startswith("with a traceback: {'key': \"it's\"}\nTraceback")
    assert traceback_record["message"].endswith("ValueError: bad \"value\" 'x'\nsecond line ✓")


def test_pipe_creation_message_is_json_after_swapping_quotes(cockpit: Cockpit, loggers: list) -> None:
    logger = get_socket_logger("pipe", url=cockpit.url)
    loggers.append(logger)
    find_cockpit_handler(logger.getChild("flow.Source-0")).send_pipe_creation(STRUCTURE)
    wait_for(lambda: cockpit.events("pipe_creation"))
    payload = cockpit.events("pipe_creation")[0]
    record = json.loads(payload)
    assert list(record) == ["time", "source", "level", "message"]
    assert TIME_FORMAT.match(record["time"]) and record["source"] == "pipe"
    assert "true" in record["message"] and "True" not in record["message"]
    # What the cockpit does: JSON.parse(JSON.parse(msg)["message"].replaceAll("'", '"'))
    assert json.loads(record["message"].replace("'", '"')) == STRUCTURE


def test_transport_and_own_records_are_never_forwarded() -> None:
    handler = CockpitHandler(unused_url())
    for name in ("pipert.socket_logger", "pipert.socket_logger.transport", "engineio.client",
                 "socketio.client", "urllib3.connectionpool", "websocket"):
        handler.handle(logging.makeLogRecord({"name": name, "msg": "chatter", "levelno": logging.ERROR}))
    assert handler._thread is None and not handler._records  # nothing queued, no thread
    handler.close()


def test_a_broken_format_string_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)  # the stdlib's report goes nowhere
    handler = CockpitHandler(unused_url())
    handler.handle(logging.makeLogRecord({"name": "pipe", "msg": "%d", "args": ("not a number",)}))
    assert not handler._records
    handler.close()


# --- configuration ---------------------------------------------------------------------------


def test_no_url_logs_to_stderr_and_warns_once(no_url: None, loggers: list, caplog: pytest.LogCaptureFixture,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.WARNING, logger="pipert.socket_logger")
    threads = set(threading.enumerate())
    first = get_socket_logger("nourl.pipe", logging.DEBUG)
    again = get_socket_logger("nourl.pipe", logging.DEBUG)
    other = get_socket_logger("nourl.other")
    loggers.extend([first, other])
    assert first is again and first.level == logging.DEBUG
    for logger in (first, other):
        assert len(logger.handlers) == 1
        assert isinstance(logger.handlers[0], logging.StreamHandler)
        assert not find_cockpit_handler(logger)
    warnings = [r for r in caplog.records if r.name == "pipert.socket_logger"]
    assert len(warnings) == 1
    assert "SOCKET_LOGGER_URL" in warnings[0].getMessage() and "cockpit" in warnings[0].getMessage()
    first.info("to stderr")
    assert "to stderr" in capsys.readouterr().err
    assert not set(threading.enumerate()) - threads

    get_socket_logger("nourl.pipe", url=unused_url())  # configured later: the fallback goes
    assert [type(h) for h in first.handlers] == [CockpitHandler]


def test_url_comes_from_argument_then_environment_then_dotenv(tmp_path: Path, no_url: None, loggers: list,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("SOCKET_LOGGER_URL=http://127.0.0.1:5111/some/path\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # .env is found in a parent directory
    logger = get_socket_logger("urls.pipe")
    loggers.append(logger)
    assert [h.url for h in logger.handlers] == ["http://127.0.0.1:5111"]
    assert "SOCKET_LOGGER_URL" not in os.environ  # the environment is left alone

    monkeypatch.setenv("SOCKET_LOGGER_URL", "127.0.0.1:5222")
    get_socket_logger("urls.pipe")
    assert [h.url for h in logger.handlers] == ["http://127.0.0.1:5222"]

    get_socket_logger("urls.pipe", url="ws://localhost:5333")
    handler = logger.handlers[0]
    assert [h.url for h in logger.handlers] == ["http://localhost:5333"]
    get_socket_logger("urls.pipe", url="http://localhost:5333/")
    assert logger.handlers == [handler]


def test_handlers_start_no_thread_until_used(cockpit: Cockpit, loggers: list) -> None:
    before = set(threading.enumerate())
    logger = get_socket_logger("lazy.pipe", url=cockpit.url)
    loggers.append(logger)
    assert get_socket_logger("lazy.pipe", url=cockpit.url).handlers == logger.handlers
    assert not set(threading.enumerate()) - before
    logger.info("first")
    assert "pipert-cockpit-logger" in {t.name for t in threading.enumerate()}
    wait_for(lambda: cockpit.events("log"))


def test_bad_url_names_the_setting_and_the_fix(no_url: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOCKET_LOGGER_URL", "ftp://cockpit:3000")
    with pytest.raises(ValueError, match="SOCKET_LOGGER_URL"):
        get_socket_logger("badurl.pipe")
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        CockpitHandler("http://:99999")


# --- delivery when things go wrong -----------------------------------------------------------


def test_cockpit_crash_and_restart(cockpit: Cockpit, loggers: list) -> None:
    logger, handler = cockpit_logger(loggers, "pipe.crash", cockpit.url, queue_size=100,
                                     backoff_initial=0.1, backoff_max=0.4)
    handler.send_pipe_creation(STRUCTURE)
    logger.info("before the crash")
    wait_for(lambda: "before the crash" in cockpit.messages())
    sent_before = handler.sent

    cockpit.kill()
    timing = timed(lambda index: logger.info("while down %d", index), 10_000)
    wait_for(lambda: handler.sent - sent_before + handler.dropped >= 10_000)
    dropped = handler.dropped
    assert dropped >= 9_000
    print(f"\n10,000 emits as the cockpit dies: {timing}; dropped {dropped}, "
          f"handed to the dying connection {handler.sent - sent_before}")

    time.sleep(0.5)  # the handler is now backing off between failed attempts
    timing = timed(lambda index: logger.info("still down %d", index), 10_000)
    print(f"10,000 emits while reconnecting: {timing}")

    cockpit.start()
    restarted = time.monotonic()
    wait_for(lambda: any(m.startswith("after") for m in cockpit.messages()),
             poke=lambda: logger.info("after the restart"))
    print(f"first record after the restart arrived in {time.monotonic() - restarted:.2f} s")
    assert cockpit.events("connect") and len(cockpit.events("pipe_creation")) == 1
    structure = json.loads(cockpit.events("pipe_creation")[0])["message"]
    assert json.loads(structure.replace("'", '"')) == STRUCTURE
    assert not any(m.startswith(("while down", "still down")) for m in cockpit.messages())


def test_hung_cockpit_never_slows_the_emitter(cockpit: Cockpit, loggers: list) -> None:
    logger, handler = cockpit_logger(loggers, "pipe.hung", cockpit.url, queue_size=50)
    logger.info("ready")
    wait_for(lambda: cockpit.messages() == ["ready"])
    frame_sized = "x" * 100_000  # about a 640-wide JPEG frame in base64

    os.kill(cockpit.process.pid, signal.SIGSTOP)  # connection open, nothing read
    wait_for(lambda: handler.dropped > 0, poke=lambda: logger.info(frame_sized))  # buffers full
    timing = timed(lambda index: logger.info(frame_sized), 2_000)
    print(f"\n2,000 emits of 100 kB with the cockpit hung: {timing}; "
          f"sent {handler.sent}, dropped {handler.dropped}")
    assert handler.sent < 500  # what waits in socket.io and in socket buffers stays bounded

    os.kill(cockpit.process.pid, signal.SIGCONT)
    wait_for(lambda: "back" in cockpit.messages(), poke=lambda: logger.info("back"))


def test_unreachable_cockpit_is_reported_once(loggers: list, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pipert.socket_logger")
    logger, handler = cockpit_logger(loggers, "pipe.unreachable", unused_url(),
                                     backoff_initial=0.05, backoff_max=0.1)
    for _ in range(20):
        logger.info("lost")
        time.sleep(0.05)
    wait_for(lambda: handler.dropped == 20)
    assert handler.sent == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipert.socket_logger"]
    assert len(warnings) == 1 and "cannot reach the cockpit" in warnings[0]


def test_close_flushes_what_is_queued(cockpit: Cockpit, loggers: list) -> None:
    logger, handler = cockpit_logger(loggers, "pipe.close", cockpit.url, flush_timeout=5.0)
    for index in range(300):
        logger.info("record %d", index)
    started = time.monotonic()
    handler.close()
    closing = time.monotonic() - started
    print(f"\nclose() with 300 records queued before the first connection: {closing * 1000:.0f} ms")
    wait_for(lambda: len(cockpit.events("log")) == 300)
    assert cockpit.messages() == [f"record {index}" for index in range(300)]
    assert not handler._thread.is_alive()
    logger.info("after close")
    assert (handler.sent, handler.dropped) == (300, 1)


def test_close_is_quick_when_the_cockpit_is_unreachable(loggers: list) -> None:
    logger, handler = cockpit_logger(loggers, "pipe.close_unreachable", unused_url())
    for index in range(10):
        logger.info("record %d", index)
    started = time.monotonic()
    handler.close()
    closing = time.monotonic() - started
    print(f"\nclose() with the cockpit unreachable: {closing * 1000:.0f} ms")
    assert closing < 1.6
    assert (handler.sent, handler.dropped) == (0, 10)


def _log_in_child(name: str) -> None:
    logger = logging.getLogger(name)
    logger.info("from the child %d", os.getpid())
    find_cockpit_handler(logger).close()


def test_forked_child_gets_its_own_connection(cockpit: Cockpit, loggers: list) -> None:
    logger, handler = cockpit_logger(loggers, "pipe.fork", cockpit.url, flush_timeout=5.0)
    handler.send_pipe_creation(STRUCTURE)
    logger.info("from the parent")
    wait_for(lambda: "from the parent" in cockpit.messages())

    child = multiprocessing.get_context("fork").Process(target=_log_in_child, args=("pipe.fork",))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    wait_for(lambda: f"from the child {child.pid}" in cockpit.messages())
    assert len(cockpit.events("connect")) == 2
    assert len(cockpit.events("pipe_creation")) == 1  # the child does not re-announce the pipe

    logger.info("parent still sending")
    wait_for(lambda: "parent still sending" in cockpit.messages())
