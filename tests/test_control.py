"""The daemon and its control plane, for real: `pipert run` in a subprocess on free 127.0.0.1 ports,
driven by `pipert zerorpc`, a Python zerorpc client and HTTP requests.

The target pipe is tests/control_target.py (ticker -> relay in flow f1, sink in flow f2); its
handlers log what they receive to a file. Every daemon, its zygote and its flows are killed and
checked at teardown, as is its shared memory.
"""
import ast
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import gevent
import pytest
import requests
import zerorpc

from helpers import clean_env, descendants, free_port, living, pipert_command, read_lines, wait_for
from pipert import shm
from pipert.rpc import SendToken

TESTS = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(TESTS, "control_target.py")
ALL_PING = ["relay", "ticker"]


class Daemon:
    """One `pipert run` process and what it printed."""

    def __init__(self, args, cwd, env, log):
        self.log = log
        self.err_path = os.path.join(cwd, f"daemon-{time.monotonic_ns()}.err")
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines = queue.Queue()
        self.output = []
        self.pipe_id = self.rpc = self.http = None
        self.pids = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read_until(self, text, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"daemon never printed {text!r}; stdout {self.output}, stderr {self.stderr()}")
            self.output.append(line)
            if line.startswith("pipert: pipe ") and " built: " in line:
                self.pipe_id = line.split()[2]
            elif line.startswith("pipert: rpc listening on "):
                self.rpc = line.rsplit(" ", 1)[1]
            elif line.startswith("pipert: http listening on "):
                self.http = line.rsplit(" ", 1)[1]
            if text in line:
                return line

    def wait_ready(self):
        self.read_until("pipert: ready")
        self.pids = [self.proc.pid] + descendants(self.proc.pid)
        return self

    def exit_code(self, timeout=20.0):
        """Wait for the daemon to exit; collect the rest of its output."""
        code = self.proc.wait(timeout)
        try:
            self.read_until("end of output")
        except AssertionError:
            pass
        return code

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def events(self):
        return read_lines(self.log)

    def status(self):
        return requests.get(f"{self.http}/status", timeout=5).json()


@pytest.fixture
def daemons(tmp_path):
    """Start `pipert run` daemons; at teardown every one is killed if needed and checked for leftovers."""
    started = []

    def start(*flags, target="make_pipe", rpc=True, api=True, cwd=None, wait=True):
        flags = list(flags)
        if rpc:
            flags += ["--rpc", f"tcp://127.0.0.1:{free_port()}"]
        if api:
            flags += ["--api", f"127.0.0.1:{free_port()}"]
        log = str(tmp_path / f"events{len(started)}.jsonl")
        spec = target if ":" in target else f"{TARGET}:{target}"  # another file's factory: path/to/file.py:name
        daemon = Daemon(pipert_command() + ["run", spec, *flags], str(cwd or tmp_path),
                        clean_env(CONTROL_TARGET_LOG=log), log)
        started.append(daemon)
        return daemon.wait_ready() if wait else daemon

    yield start
    problems = []
    for daemon in started:
        if daemon.proc.poll() is None:  # the test failed before it ended the daemon
            daemon.pids += descendants(daemon.proc.pid)
            daemon.proc.kill()
        daemon.proc.wait(10)
        daemon.proc.stdout.close()
    for daemon in started:
        try:
            wait_for(lambda: not living(daemon.pids), timeout=10)
        except AssertionError:
            for pid in living(daemon.pids):
                os.kill(pid, signal.SIGKILL)
            problems.append(f"processes {daemon.pids} outlived daemon {daemon.proc.pid}")
        if daemon.pipe_id:
            left = [e for e in shm.leftovers() if f"_{daemon.pipe_id}_" in e]
            if left:
                problems.append(f"shared memory left behind: {left}")
    assert not problems, problems


@pytest.fixture
def rpc_clients():
    """zerorpc clients with private contexts, closed (and their zmq threads ended) at teardown."""
    made = []

    def connect(endpoint, token=None, timeout=15):
        context = zerorpc.Context()
        if token is not None:
            context.register_middleware(SendToken(token))
        client = zerorpc.Client(context=context, timeout=timeout)
        client.connect(endpoint)
        made.append((client, context))
        return client

    yield connect
    for client, context in made:
        client.close()
        context.destroy(linger=0)


def zcli(*args, cwd=None, env=None, expect=0):
    """`pipert zerorpc ARGS...`: its stdout (the exit code must be ``expect``)."""
    result = subprocess.run(pipert_command() + ["zerorpc", *args], capture_output=True, text=True, timeout=30,
                            cwd=cwd, env=env or clean_env())
    assert result.returncode == expect, (result.stdout, result.stderr)
    return result.stdout if expect == 0 else result.stderr


def ack(output):
    return ast.literal_eval(output)


def test_zerorpc_cli_starts_sends_events_and_joins(daemons):
    daemon = daemons(api=False)
    listing = zcli(daemon.rpc)
    assert all(name in listing for name in ("execute", "start", "pause", "kill", "join", "structure", "status"))
    started = ack(zcli(daemon.rpc, "execute", "start"))
    assert started == {"event": "start", "handled_by": ["relay", "sink", "ticker"], "errors": {}, "pending": []}
    pinged = ack(zcli(daemon.rpc, "execute", "PING", '{"value": 7, "routines": ["relay"]}'))
    assert pinged["handled_by"] == ["relay"] and not pinged["errors"]
    pinged = ack(zcli("-j", daemon.rpc, "execute", '"PING"', '{"value": "as a dict"}'))
    assert pinged["handled_by"] == ALL_PING
    assert sorted(((e["routine"], e["value"]) for e in daemon.events()), key=repr) == \
        sorted([("relay", 7), ("relay", "as a dict"), ("ticker", "as a dict")], key=repr)
    status = json.loads(zcli("-pj", daemon.rpc, "status"))
    assert {r["state"] for r in status["routines"].values()} == {"running"}
    joined = ack(zcli(daemon.rpc, "execute", "join", '{"to_kill": true}'))
    assert not any(flow["alive"] for flow in joined["flows"].values())
    assert daemon.exit_code() == 0
    assert "pipert: pipe %s stopped" % daemon.pipe_id in daemon.output


def test_python_client_targets_events_and_reads_status(daemons, rpc_clients):
    daemon = daemons(api=False)
    client = rpc_clients(daemon.rpc)
    assert client.start()["handled_by"] == ["relay", "sink", "ticker"]
    forms = [
        ({"value": 1}, ALL_PING),
        ('{"flows": ["f1"], "value": 2}', ALL_PING),
        ({"flows": "f1", "value": 3}, ALL_PING),
        ({"routines": ["ticker"], "value": 4}, ["ticker"]),
        ({"routines": {"f1": ["relay"]}, "value": 5}, ["relay"]),
        ({"routines": {"f1": []}, "value": 6}, ALL_PING),
        ({"flows": ["f2"], "routines": ["relay"], "value": 7}, ["relay"]),
        (None, ALL_PING),
        ("", ALL_PING),
    ]
    for arguments, routines in forms:
        result = client.execute("PING", arguments)
        assert result == {"event": "PING", "handled_by": routines, "errors": {}, "pending": []}, arguments
    assert client.execute("RESET", {"flows": ["f2"]})["handled_by"] == ["sink"]
    failed = client.execute("FAIL")
    assert failed["handled_by"] == [] and "asked to fail" in failed["errors"]["ticker"]
    received = [(e["routine"], e["value"]) for e in daemon.events() if e["event"] == "PING"]
    expected = [(routine, value) for (_, routines), value in zip(forms, [1, 2, 3, 4, 5, 6, 7, None, None])
                for routine in routines]
    assert sorted(received, key=repr) == sorted(expected, key=repr)

    wait_for(lambda: client.status()["routines"]["sink"]["fps"] > 0)
    status = client.status()
    assert set(status["routines"]) == {"ticker", "relay", "sink"}
    for name, routine in status["routines"].items():
        assert routine["state"] == "running" and routine["fps"] >= 0, name
    assert status["routines"]["ticker"]["messages_out"] > 0 and status["routines"]["sink"]["messages_in"] > 0
    assert {(w["source"], w["destination"]) for w in status["wires"]} == {("ticker", "relay"), ("relay", "sink")}
    assert all(isinstance(w["depth"], int) and isinstance(w["dropped"], int) for w in status["wires"])
    assert all(f["alive"] and f["pid"] in daemon.pids for f in status["flows"].values())
    assert {"flow_name": "f1", "routine_name": "ticker", "events": ["FAIL", "PING", "SLOW"], "params": {},
            "event_params": {"FAIL": [], "PING": [{"name": "value", "required": False, "default": None}],
                             "SLOW": [{"name": "seconds", "required": True}]}} in client.structure()["Routines"]

    assert client.pause()["event"] == "stop"
    wait_for(lambda: {r["state"] for r in client.status()["routines"].values()} == {"stopped"})
    assert client.start()["event"] == "start"
    wait_for(lambda: {r["state"] for r in client.status()["routines"].values()} == {"running"})
    assert client.kill() == {"event": "kill", "flows": ["f1", "f2"]}
    assert daemon.exit_code() == 0


BODIES = [
    ("no body", {}),
    ("empty json body", {"data": b"", "headers": {"Content-Type": "application/json"}}),
    ("extra_args", {"json": {"extra_args": {}}}),
]


def variants(path):
    for method in ("GET", "POST"):
        for url in (path, path + "/"):
            for label, body in BODIES:
                yield f"{method} {url} ({label})", method, url, body


def test_http_routes_answer_get_and_post_with_and_without_slash_and_body(daemons):
    daemon = daemons(rpc=False)
    session = requests.Session()

    def call(method, url, expect=200, **body):
        response = session.request(method, daemon.http + url, timeout=10, **body)
        assert response.status_code == expect, (method, url, body, response.text)
        assert response.headers["Content-Type"] == "application/json"
        assert "Access-Control-Allow-Origin" not in response.headers  # no browser page asked: no CORS
        return response.json()

    for label, method, url, body in variants("/pipe/structure"):
        assert len(call(method, url, **body)["Routines"]) == 3, label
    for label, method, url, body in variants("/status"):
        assert set(call(method, url, **body)["routines"]) == {"ticker", "relay", "sink"}, label
    for route, event in (("/start", "start"), ("/pause", "stop")):
        for label, method, url, body in variants(route):
            result = call(method, url, **body)
            assert result["event"] == event and result["handled_by"] == ["relay", "sink", "ticker"], label
    for label, method, url, body in variants("/routines/ticker/events/PING/execute"):
        assert call(method, url, **body)["handled_by"] == ["ticker"], label
    for label, method, url, body in variants("/routines/events/PING/execute"):
        assert call(method, url, **body)["handled_by"] == ALL_PING, label
    assert call("POST", "/routines/relay/events/PING/execute/", json={"extra_args": {"value": "cockpit"}}) == \
        {"event": "PING", "handled_by": ["relay"], "errors": {}, "pending": []}
    assert call("POST", "/routines/events/PING/execute", json={"extra_args": {"value": 9}})["handled_by"] == ALL_PING
    assert call("GET", "/routines/sink/events/RESET/execute", json={"extra_args": None})["handled_by"] == ["sink"]
    pings = [e for e in daemon.events() if e["event"] == "PING"]
    assert len(pings) == 12 + 12 * 2 + 1 + 2
    assert sorted(((e["routine"], e["value"]) for e in pings if e["value"] is not None), key=repr) == \
        sorted([("relay", "cockpit"), ("relay", 9), ("ticker", 9)], key=repr)

    assert "no route /nope" in call("GET", "/nope", expect=404)["error"]
    assert "no route /start/now" in call("POST", "/start/now", expect=404)["error"]
    assert "answers GET and POST" in call("PUT", "/status", expect=405)["error"]
    preflight = session.options(daemon.http + "/routines/ticker/events/PING/execute/", timeout=5,
                                headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204 and "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]

    assert call("POST", "/kill/") == {"event": "kill", "flows": ["f1", "f2"]}
    assert daemon.exit_code() == 0


RPC_REFUSALS = [
    (("NOPE",), "no routine handles event 'NOPE'"),
    (("PING", {"routines": ["ghost"]}), "there is no routine 'ghost'"),
    (("PING", {"flows": ["nope"]}), "there is no flow 'nope'"),
    (("PING", {"routines": {"f1": ["ghost"]}}), "flow 'f1' has no routine 'ghost'"),
    (("RESET", {"routines": ["ticker"]}), "routine 'ticker' does not handle event 'RESET'"),
    (("PING", '{"value": '), "are not valid JSON"),
    (("PING", "[1, 2]"), "must be a JSON object"),
    (("PING", {"colour": "red"}), "do not fit"),
    (("SLOW", "{}"), "do not fit slow(seconds)"),
    (("PING", {"flows": []}), '"flows" is empty'),
    (("PING", {"routines": [3]}), '"routines" must be a name or a list of names'),
    (("start", {"fast": True}), "takes no parameters"),
    (("",), "must be a non-empty string"),
    (("join", '{"to_kill": "yes"}'), "join takes only"),
]

HTTP_REFUSALS = [
    ("/routines/ghost/events/PING/execute", None, 404, "there is no routine 'ghost'"),
    ("/routines/events/NOPE/execute/", None, 400, "no routine handles event 'NOPE'"),
    ("/routines/sink/events/PING/execute", None, 400, "does not handle event 'PING'"),
    ("/routines/ticker/events/PING/execute", b"{not json", 400, "not valid JSON"),
    ("/routines/ticker/events/PING/execute", b'{"extra_args": [1]}', 400, '"extra_args" must be a JSON object'),
    ("/routines/ticker/events/PING/execute", b'{"extra": {}}', 400, 'must be a JSON object {"extra_args"'),
    ("/routines/ticker/events/PING/execute", b'{"extra_args": {"colour": "red"}}', 400, "do not fit"),
    ("/routines/events/SLOW/execute", b'{"extra_args": {}}', 400, "do not fit slow(seconds)"),
    ("/status", b'{"extra_args": {"a": 1}}', 400, "/status takes no extra_args"),
    ("/kill", b'{"extra_args": {"now": true}}', 400, "/kill takes no extra_args"),
]


def test_bad_input_is_refused_clearly_and_changes_nothing(daemons, rpc_clients):
    daemon = daemons("--start")
    client = rpc_clients(daemon.rpc)
    wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > 0)
    for call, message in RPC_REFUSALS:
        with pytest.raises(zerorpc.RemoteError) as refused:
            client.execute(*call)
        assert refused.value.name == "ControlError" and message in refused.value.msg, (call, refused.value.msg)
    with pytest.raises(zerorpc.RemoteError, match="join takes only"):
        client.join({"to_kill": 1})
    assert "are not valid JSON" in zcli(daemon.rpc, "execute", "PING", "{oops", expect=1)
    for path, body, status, message in HTTP_REFUSALS:
        response = requests.post(daemon.http + path, data=body, timeout=5,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == status and message in response.json()["error"], (path, response.text)

    assert daemon.events() == [], "a refused event reached a handler"
    before = daemon.status()
    assert {r["state"] for r in before["routines"].values()} == {"running"}
    assert all(f["alive"] and f["restarts"] == 0 for f in before["flows"].values())
    wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > before["routines"]["sink"]["messages_in"])
    assert client.execute("PING", {"value": "still serving"})["handled_by"] == ALL_PING
    assert "Traceback" not in daemon.stderr()
    client.join({"to_kill": True})
    assert daemon.exit_code() == 0


def test_token_from_dotenv_is_required_by_rpc_and_http(daemons, rpc_clients, tmp_path):
    rpc, http = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / ".env").write_text(f"PIPERT_TOKEN=s3cret\nPIPERT_RPC_ENDPOINT={rpc}\nPIPERT_API_ADDRESS={http}\n")
    daemon = daemons(rpc=False, api=False, cwd=here)
    assert (daemon.rpc, daemon.http) == (rpc, f"http://{http}")

    for token, reason in ((None, "carries no token"), ("guess", "carries a wrong token")):
        with pytest.raises(zerorpc.RemoteError, match=f"requires a token and the request {reason}"):
            rpc_clients(rpc, token=token).status()
    assert rpc_clients(rpc, token="s3cret").start()["handled_by"] == ["relay", "sink", "ticker"]
    assert "requires a token" in zcli(rpc, "execute", "start", cwd=str(elsewhere), expect=1)
    assert ack(zcli(rpc, "--token", "s3cret", "execute", "PING", '{"value": 1}', cwd=str(elsewhere)))["handled_by"] \
        == ALL_PING
    assert ack(zcli(rpc, "execute", "PING", cwd=str(here)))["handled_by"] == ALL_PING  # token from .env
    assert ack(zcli(rpc, "status", cwd=str(elsewhere), env=clean_env(PIPERT_TOKEN="s3cret")))["pipe"] == \
        daemon.pipe_id

    url = daemon.http
    for headers in ({}, {"Authorization": "Bearer guess"}, {"X-Pipert-Token": "guess"}, {"Authorization": "s3cret"}):
        response = requests.post(f"{url}/start", headers=headers, timeout=5)
        assert response.status_code == 401 and "requires a token" in response.json()["error"], headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.get(f"{url}/nope", timeout=5).status_code == 401
    assert requests.options(f"{url}/start", timeout=5).status_code == 204
    assert requests.get(f"{url}/status", headers={"Authorization": "Bearer s3cret"}, timeout=5).status_code == 200
    assert requests.get(f"{url}/status", headers={"X-Pipert-Token": "s3cret"}, timeout=5).status_code == 200
    assert len([e for e in daemon.events() if e["event"] == "PING"]) == 4
    assert requests.get(f"{url}/kill", headers={"X-Pipert-Token": "s3cret"}, timeout=5).status_code == 200
    assert daemon.exit_code() == 0


@pytest.mark.parametrize("signum, target", [(signal.SIGTERM, "make_pipe"), (signal.SIGINT, "make_built_pipe")])
def test_signal_shuts_the_daemon_down_cleanly(daemons, signum, target):
    daemon = daemons("--start", target=target)
    wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > 0)
    assert len(living(daemon.pids)) == 4  # daemon, zygote, two flows
    assert [e for e in shm.leftovers() if f"_{daemon.pipe_id}_" in e]
    daemon.proc.send_signal(signum)
    assert daemon.exit_code() == 0, daemon.stderr()
    assert f"pipert: stopping on {signal.Signals(signum).name}" in daemon.output
    wait_for(lambda: not living(daemon.pids), timeout=5)
    assert not [e for e in shm.leftovers() if f"_{daemon.pipe_id}_" in e]


def test_slow_handler_delays_neither_other_calls_nor_heartbeats(daemons, rpc_clients):
    daemon = daemons("--start", "--ack-timeout", "1.5")
    slow_client, client = rpc_clients(daemon.rpc), rpc_clients(daemon.rpc)
    began = time.monotonic()
    slow = slow_client("execute", "SLOW", '{"seconds": 2}', **{"async": True})
    gevent.sleep(0.3)
    latencies = []
    for call in (client.status, daemon.status, lambda: client.execute("PING", {"routines": ["relay"]})):
        t0 = time.monotonic()
        call()
        latencies.append(time.monotonic() - t0)
    assert max(latencies) < 0.5, latencies
    timed_out = slow.get(timeout=10)
    assert timed_out == {"event": "SLOW", "handled_by": [], "errors": {}, "pending": ["ticker"]}
    assert 1.4 < time.monotonic() - began < 2.0
    wait_for(lambda: [e for e in daemon.events() if e["event"] == "SLOW"], timeout=5)
    began = time.monotonic()
    assert slow_client.execute("SLOW", {"seconds": 0.5})["handled_by"] == ["ticker"]
    assert time.monotonic() - began >= 0.5
    assert client.execute("kill") == {"event": "kill", "flows": ["f1", "f2"]}  # as kill(), as in PipeRT 2
    assert daemon.exit_code() == 0


def run_pipert(*args):
    """`python -m pipert ARGS...` in tests/ (the daemons above run the console script)."""
    return subprocess.run([sys.executable, "-m", "pipert", *args], capture_output=True, text=True, timeout=60,
                          cwd=TESTS, env=clean_env(CONTROL_TARGET_LOG=os.devnull))


@pytest.mark.parametrize("target, message", [
    ("missing.py:make_pipe", "there is no file"),
    ("control_target.py:nope", "has no attribute 'nope'"),
    ("control_target:Ticker", "gave Ticker, not a Pipe"),
    ("no_such_module:make", "there is no module 'no_such_module'"),
    ("control_target.py", "names no factory"),
])
def test_bad_targets_are_named(target, message):
    result = run_pipert("run", target)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_busy_ports_and_bad_addresses_fail_cleanly(daemons):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag, message in (("--rpc", "cannot serve RPC on tcp://127.0.0.1:"), ("--api", "cannot serve HTTP")):
            daemon = daemons(flag, str(port), rpc=False, api=False, wait=False)
            assert daemon.exit_code() == 1
            assert message in daemon.stderr() and daemon.pipe_id
    result = run_pipert("run", "control_target.py:make_pipe", "--api", "localhost:http")
    assert result.returncode == 2 and "is not HOST:PORT" in result.stderr


def test_rpc_client_example_drives_and_kills_a_daemon(daemons, tmp_path):
    daemon = daemons(api=False)
    example = os.path.join(os.path.dirname(TESTS), "examples", "rpc_client.py")
    result = subprocess.run([sys.executable, example, daemon.rpc, "--kill"], capture_output=True, text=True,
                            timeout=30, cwd=str(tmp_path), env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "stop f1 -> {'event': 'stop', 'handled_by': ['relay', 'ticker']" in result.stdout
    assert "refused: no routine handles event 'NO_SUCH_EVENT'" in result.stdout
    assert daemon.exit_code() == 0
    assert "pipert: routine ticker (flow f1): killed, in 0, out " in "\n".join(daemon.output)


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from control_target import make_pipe
from pipert.api import APIWrapper
from pipert.rpc import RPCPipeWrapper

pipe = make_pipe()
pipe.build()
api = APIWrapper("127.0.0.1", {http}, pipe)
api.run()
print("serving", pipe.id, flush=True)
RPCPipeWrapper(pipe).run_rpc_server({rpc!r})  # returns once the pipeline has ended
pipe.join()
api.join(5)
print("done", flush=True)
"""


def test_wrappers_in_a_pipert2_style_script(tmp_path):
    http, rpc = free_port(), f"tcp://127.0.0.1:{free_port()}"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(tests=TESTS, http=http, rpc=rpc))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path), env=clean_env(CONTROL_TARGET_LOG=str(tmp_path / "log")))
    pids = []
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "serving", proc.stderr.read()
        pids = [proc.pid] + descendants(proc.pid)
        assert requests.post(f"http://127.0.0.1:{http}/start/", timeout=5).json()["handled_by"] == \
            ["relay", "sink", "ticker"]
        assert zcli(rpc, "kill")
        assert proc.wait(20) == 0 and proc.stdout.read() == "done\n"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    wait_for(lambda: not living(pids), timeout=10)
    assert not [e for e in shm.leftovers() if f"_{line[1]}_" in e]
