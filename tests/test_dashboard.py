"""The web dashboard and `pipert top`, for real: `pipert run tests/dashboard_target.py:make_pipe --api`
in a subprocess, driven by headless Chromium (tests/browser.py) and by `pipert top` in a pty.

The daemons come from test_control's fixture, which kills them and checks for leftover processes
and shared memory at teardown.
"""
import fcntl
import logging
import os
import pty
import select
import struct
import subprocess
import termios
import time
from urllib.parse import urlsplit

import requests

from browser import chromium_page
from helpers import clean_env, free_port, pipert_command, wait_for
from pipert import PIPE_INFRASTRUCTURE, FrameFilter
from pipert.dashboard import LogBook
from pipert.frames import frame_log_message
from pipert.top import render
from test_control import daemons  # noqa: F401 (the fixture)

TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_target.py") + ":make_pipe"
ROUTINES = {"camera", "invert", "sink"}
WIRES = {"camera->invert", "invert->sink"}


def open_dashboard(page, daemon):
    """Load the dashboard of ``daemon``; every request the page makes is recorded in ``page.seen``."""
    page.set_default_timeout(15000)
    page.seen = []
    page.on("request", lambda request: page.seen.append(request.url))
    page.goto(daemon.http + "/")


def attribute_values(page, selector, attribute):
    return set(page.eval_on_selector_all(selector, f"nodes => nodes.map(n => n.getAttribute('{attribute}'))"))


def showing(page, selector, text):
    """Wait until the element at ``selector`` shows ``text`` (polled from here: the page's
    Content-Security-Policy forbids the eval that playwright's wait_for_function needs)."""
    wait_for(lambda: text in (page.text_content(selector) or ""), timeout=15)


def cell(page, routine, column):
    return page.text_content(f"#routines tr[data-routine={routine}] td.{column}")


def test_graph_counters_and_log_lines_are_live(daemons):  # noqa: F811
    daemon = daemons("--start", target=TARGET, rpc=False)
    with chromium_page() as page:
        open_dashboard(page, daemon)
        page.wait_for_selector("svg .routine")
        assert attribute_values(page, "svg .routine", "data-routine") == ROUTINES
        assert attribute_values(page, "svg .wire", "data-wire") == WIRES
        assert attribute_values(page, "svg .flow", "data-flow") == {"capture", "work", "out"}
        showing(page, "svg .wire[data-wire='invert->sink']", "queued")
        assert "block, depth 4" in page.text_content("svg .wire[data-wire='invert->sink']")
        showing(page, "svg .flow[data-flow=work]", "pid ")
        before = int(cell(page, "invert", "out"))
        wait_for(lambda: int(cell(page, "invert", "out")) > before + 10)
        assert cell(page, "invert", "state") == "running"
        showing(page, "#log", "processed 50 frames")
        page.select_option("#log-level", "30")  # WARNING+ hides the INFO line
        assert "processed 50 frames" not in page.text_content("#log")
        page.select_option("#log-level", "20")
        page.select_option("#log-routine", "camera")  # the line is invert's
        assert "processed 50 frames" not in page.text_content("#log")
        page.select_option("#log-routine", "invert")
        assert "processed 50 frames" in page.text_content("#log")
        origin = daemon.http.rstrip("/")
        assert all(url.startswith((origin + "/", "data:")) for url in page.seen), page.seen  # works offline


def test_pause_events_params_errors_and_frames(daemons):  # noqa: F811
    daemon = daemons("--start", target=TARGET, rpc=False)
    with chromium_page() as page:
        open_dashboard(page, daemon)
        page.wait_for_selector("svg .routine")
        page.click("#pause-button")
        wait_for(lambda: {r["state"] for r in daemon.status()["routines"].values()} == {"stopped"})
        showing(page, "#routines tr[data-routine=camera] td.state", "stopped")
        page.click("#start-button")
        wait_for(lambda: {r["state"] for r in daemon.status()["routines"].values()} == {"running"})

        page.click("svg .routine[data-routine=camera]")
        page.fill("#event-SAY-text", "hello dashboard")
        page.check("#event-SAY-loud")
        page.click("#event-SAY button[type=submit]")
        showing(page, "#message", "SAY to camera: done by camera")
        assert {"event": "SAY", "text": "hello dashboard", "loud": True} in daemon.events()
        showing(page, "#log", "said: hello dashboard!")
        page.click("#event-FAIL button[type=submit]")
        showing(page, "#message", "asked to fail")
        assert "error" in page.get_attribute("#message", "class")

        page.click("#routines tr[data-routine=invert]")
        assert page.input_value("#params-form-every") == "50"
        page.fill("#params-form-every", "7")
        page.click("#params-form button[type=submit]")
        wait_for(lambda: daemon.status()["routines"]["invert"]["params"]["every"] == 7)

        page.click("#frames-button")
        for direction in ("input", "output"):
            wait_for(lambda: (page.get_attribute(f"#frame-{direction}", "src") or "").startswith(
                "data:image/jpeg;base64,"), timeout=15)
        assert daemon.status()["routines"]["invert"]["log_data"]
        assert "image_base64" not in page.text_content("#log")
        page.click("#frames-button")  # the last viewer leaves: the daemon turns the routine's frames off
        wait_for(lambda: not daemon.status()["routines"]["invert"]["log_data"])


def test_token_kill_and_reconnection(daemons):  # noqa: F811
    port = free_port()
    daemon = daemons("--start", "--token", "s3cret", "--api", f"127.0.0.1:{port}", target=TARGET, rpc=False,
                     api=False)
    assert requests.get(f"{daemon.http}/dashboard/stream", timeout=5).status_code == 401
    assert requests.get(f"{daemon.http}/status", headers={"Authorization": "Bearer nope"}, timeout=5).status_code \
        == 401
    assert requests.get(f"{daemon.http}/", timeout=5).status_code == 200  # the page itself holds no data
    with chromium_page() as page:
        open_dashboard(page, daemon)
        page.wait_for_selector("#token-form:not([hidden])")
        assert page.is_hidden("#main") and page.is_hidden("#controls")
        page.fill("#token-input", "wrong")
        page.click("#token-form button")
        showing(page, "#token-error", "wrong token")
        assert page.is_hidden("#main") and not page.query_selector_all("svg .routine")
        page.fill("#token-input", "s3cret")
        page.click("#token-form button")
        page.wait_for_selector("svg .routine")
        assert attribute_values(page, "svg .routine", "data-routine") == ROUTINES
        first = page.text_content("#pipe-id")

        page.click("#kill-button")
        page.click("#kill-dialog button[value=cancel]")
        time.sleep(0.5)
        assert daemon.proc.poll() is None
        page.click("#kill-button")
        page.click("#kill-confirm")
        assert daemon.exit_code() == 0
        wait_for(lambda: page.text_content("#connection") != "live", timeout=15)

        again = daemons("--start", "--token", "s3cret", "--api", f"127.0.0.1:{port}", target=TARGET, rpc=False,
                        api=False)
        showing(page, "#pipe-id", f"pipe {again.pipe_id}")
        assert page.text_content("#pipe-id") != first
        showing(page, "#connection", "live")


def test_pipert_top_shows_routines_and_quits_on_q(daemons):  # noqa: F811
    daemon = daemons("--start", target=TARGET, rpc=False)
    address = urlsplit(daemon.http).netloc
    pid, fd = pty.fork()
    if pid == 0:  # the child: pipert top in a 40x120 terminal
        os.execvpe(pipert_command()[0], pipert_command() + ["top", address], clean_env(TERM="xterm"))
    done = 0
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        screen = b""
        deadline = time.monotonic() + 20
        while not all(name.encode() in screen for name in (*ROUTINES, "invert -> sink")):
            assert time.monotonic() < deadline, screen
            if select.select([fd], [], [], 0.2)[0]:
                screen += os.read(fd, 65536)
        assert b"running" in screen and b"block/4" in screen
        os.write(fd, b"q")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    os.read(fd, 65536)
                except OSError:
                    pass
        assert done and os.waitstatus_to_exitcode(status) == 0
    finally:
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    once = subprocess.run(pipert_command() + ["top", address, "--once"], capture_output=True, text=True, timeout=30,
                          env=clean_env())
    assert once.returncode == 0 and "invert -> sink" in once.stdout and "block/4" in once.stdout


def test_log_book_keeps_recent_records_and_latest_frames():
    book = LogBook("pipe", capacity=3)

    def record(name, message, level=logging.INFO):
        return logging.makeLogRecord({"name": name, "msg": message, "levelno": level,
                                      "levelname": logging.getLevelName(level)})

    for n in range(5):
        book.handle(record("pipe.f1.cam", f"line {n}"))
    book.handle(record("pipe.f1.cam", "fps: 24.5", PIPE_INFRASTRUCTURE))
    book.handle(record("pipe", "flow 'f1' restarted", logging.WARNING))
    frame = frame_log_message("output", "QUJD")
    book.handle(record("pipe.f1.cam", frame))
    records, skipped = book.since(0)
    assert [(r["routine"], r["message"]) for r in records] == [("cam", "line 3"), ("cam", "line 4"),
                                                               (None, "flow 'f1' restarted")]
    assert skipped == 3  # lines 0-2 are gone; the fps record and the frame were never log lines
    assert book.since(records[-1]["id"]) == ([], 0)
    assert book.frame("cam", "output")[1] == "QUJD" and book.frame("cam", "input") is None
    assert not FrameFilter().filter(record("pipe.f1.cam", frame))
    assert FrameFilter().filter(record("pipe.f1.cam", "output: a line that is not a frame"))


def test_top_tables_show_latency_and_nodes_when_status_has_them():
    structure = {"Wires": [{"source": "a", "destination": "b", "policy": "latest", "depth": 1}]}
    status = {"routines": {"a": {"flow": "f", "state": "running", "fps": 9.5, "capacity": None, "messages_in": 0,
                                 "messages_out": 12, "error": None},
                           "b": {"flow": "g", "state": "crashed", "fps": 0.0, "capacity": 40.0, "messages_in": 12,
                                 "messages_out": 0, "error": "main_logic: boom",
                                 "latency": {"p50": 0.002, "p99": 0.0105}}},
              "wires": [{"source": "a", "destination": "b", "depth": 1, "dropped": 3}],
              "flows": {"f": {"pid": 11, "alive": True, "restarts": 0, "node": {"id": "abc", "host": "gpu-1"}},
                        "g": {"pid": 12, "alive": False, "restarts": 2}}}
    text = "\n".join(render(structure, status))
    assert "2.0/10.5" in text and "main_logic: boom" in text and "latest/1" in text
    assert [line.split() for line in text.splitlines() if line.startswith(("f ", "g "))] == \
        [["f", "11", "alive", "0", "gpu-1"], ["g", "12", "ended", "2"]]
