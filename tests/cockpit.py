"""A stand-in PipeRT cockpit: python-socketio's Server in a child process.

It runs on gevent's WSGI server (with simple-websocket, so both polling and
websocket work) in a child process, so a test can kill it (a crash: connections
reset) or SIGSTOP it (a hung cockpit) and start it again on the same port. It
appends every event it receives to a JSON-lines file the test reads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_SERVER = r"""
import json, sys
from gevent import pywsgi
import socketio

port, events_path = int(sys.argv[1]), sys.argv[2]
sio = socketio.Server(async_mode="gevent", max_http_buffer_size=100_000_000)
events = open(events_path, "a", encoding="utf-8")

def recorder(event):
    def record(sid, data=None, *rest):
        events.write(json.dumps({"event": event, "data": None if event == "connect" else data}) + "\n")
        events.flush()
    sio.on(event, record)

for event in ("connect", "log", "pipe_creation"):
    recorder(event)
server = pywsgi.WSGIServer(("127.0.0.1", port), socketio.WSGIApp(sio), log=None)
server.start()
print(server.server_port, flush=True)
server.serve_forever()
"""

class Cockpit:
    """A stand-in cockpit process; every start records into a new file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.starts = 0
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.events_path = self.directory / f"events-{self.starts}.jsonl"
        self.events_path.touch()
        errors = self.directory / f"cockpit-{self.starts}.log"
        with open(errors, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SERVER, str(self.port), str(self.events_path)],
                stdout=subprocess.PIPE, stderr=stderr, text=True)
        line = self.process.stdout.readline()
        assert line.strip().isdigit(), f"test cockpit did not start: {errors.read_text()}"
        self.port = int(line)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
            self.process = None

    def events(self, name: str) -> list[str]:
        """Payloads of the ``name`` events received since the last start."""
        lines = self.events_path.read_text(encoding="utf-8").split("\n")[:-1]  # complete lines only
        return [entry["data"] for entry in map(json.loads, lines) if entry["event"] == name]

    def records(self) -> list[dict]:
        return [json.loads(payload) for payload in self.events("log")]

    def messages(self) -> list[str]:
        return [record["message"] for record in self.records()]
