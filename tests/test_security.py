"""The control plane against the browser and against bad or heavy clients (issue 10).

Daemons run `pipert run` on 127.0.0.1 (fixture `daemons` of test_control); requests carry the
headers a browser sends. A headless Chromium page served from another local port tries to
pause and kill the pipeline the ways a page can without a CORS preflight.
"""
import http.server
import logging
import select
import socket
import threading

import pytest
import requests

from browser import chromium_page
from helpers import Counter, Recorder, free_port, wait_for
from pipert import APIWrapper, RPCPipeWrapper, security
from pipert.security import AccessPolicy, InsecureBindingError, Limits
from test_control import ALL_PING, daemons, run_pipert  # noqa: F401 (daemons is a fixture)

EVIL = "http://evil.example"
COCKPIT = "http://localhost:3000"
CHROME = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120 Safari/537",
          "Accept": "*/*", "Accept-Language": "en-US,en;q=0.9", "Accept-Encoding": "gzip, deflate"}
CONTENT = [("application/x-www-form-urlencoded", b""), ("application/x-www-form-urlencoded", b"a=1"),
           ("multipart/form-data; boundary=xyz",
            b"--xyz\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--xyz--\r\n"),
           ("text/plain;charset=UTF-8", b'{"extra_args": {}}'), ("application/json", b'{"extra_args": {}}')]
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
ROUTES = ["/pause", "/kill", "/start", "/routines/events/PING/execute", "/routines/ticker/events/PING/execute/",
          "/status", "/pipe/structure", "/nope"]


def page(origin, mode="no-cors", site="cross-site", **headers):
    """The headers Chrome sends for a request made by a page at ``origin``."""
    return {**CHROME, "Origin": origin, "Referer": origin + "/index.html", "Sec-Fetch-Mode": mode,
            "Sec-Fetch-Site": site, "Sec-Fetch-Dest": "empty", **headers}


def states(daemon):
    status = daemon.status()
    return {r["state"] for r in status["routines"].values()}, all(f["alive"] for f in status["flows"].values())


def raw(port, data, half_close=True, timeout=10.0):
    """Send ``data`` on a fresh connection (then, with ``half_close``, end the sending side: nothing
    more comes); the server's whole answer (until it closes, or its Content-Length, or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer and b"Connection: close" not in answer.split(b"\r\n\r\n")[0]:
                    head, _, body = answer.partition(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(body) >= length[0]:
                        break
        except ConnectionResetError:
            pass
        return answer


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None


def test_pages_of_other_origins_change_nothing(daemons):
    daemon = daemons("--start", rpc=False)
    wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > 0)
    session = requests.Session()
    for route in ROUTES:
        for method in ("POST", "GET", "PUT", "DELETE", "PATCH"):
            for content_type, body in CONTENT:
                response = session.request(method, daemon.http + route, data=body, timeout=10,
                                           headers=page(EVIL, **{"Content-Type": content_type}))
                assert response.status_code == 403, (method, route, content_type, response.text)
                assert "Access-Control-Allow-Origin" not in response.headers
                assert "--allow-origin http://evil.example" in response.json()["error"]
        preflight = session.options(daemon.http + route, timeout=10, headers=page(EVIL, mode="cors", **PREFLIGHT))
        assert preflight.status_code == 403 and "Access-Control-Allow-Origin" not in preflight.headers
    # a sandboxed page (Origin: null); a cross-site <img src=/kill> or navigation (no Origin); a page
    # that only gives its Referer; a page of the same site on another port (cockpit-like, but not allowed)
    refused = [page("null"), {**CHROME, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
               {**CHROME, "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
               {**CHROME, "Referer": EVIL + "/attack.html"}, page("http://127.0.0.1:9", site="same-site"),
               page("https://localhost:3000", site="same-site")]
    for headers in refused:
        for route in ("/kill", "/pause"):
            for method in ("GET", "POST"):
                response = session.request(method, daemon.http + route, headers=headers, timeout=10)
                assert response.status_code == 403, (headers, route, response.text)

    assert states(daemon) == ({"running"}, True)
    assert daemon.events() == [], "a refused request reached a handler"
    before = daemon.status()["routines"]["sink"]["messages_in"]
    wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > before)

    # what must keep working: the cockpit's page, the daemon's own pages, typed URLs, programs
    cockpit = session.options(daemon.http + "/routines/ticker/events/PING/execute/", timeout=10,
                              headers=page(COCKPIT, mode="cors", site="same-site", **PREFLIGHT))
    assert cockpit.status_code == 204 and cockpit.headers["Access-Control-Allow-Origin"] == COCKPIT
    assert "POST" in cockpit.headers["Access-Control-Allow-Methods"]
    assert "content-type" in cockpit.headers["Access-Control-Allow-Headers"].lower()
    assert "Origin" in cockpit.headers["Vary"]
    pinged = session.post(daemon.http + "/routines/ticker/events/PING/execute/", json={"extra_args": {"value": 1}},
                          headers=page(COCKPIT, mode="cors", site="same-site"), timeout=10)
    assert pinged.json()["handled_by"] == ["ticker"] and pinged.headers["Access-Control-Allow-Origin"] == COCKPIT
    structure = session.get(daemon.http + "/pipe/structure", headers=page(COCKPIT, mode="cors", site="same-site"),
                            timeout=10)
    assert structure.status_code == 200 and structure.headers["Access-Control-Allow-Origin"] == COCKPIT
    assert "Origin" in structure.headers["Vary"]
    own = page(daemon.http, mode="cors", site="same-origin")
    assert session.post(daemon.http + "/routines/events/PING/execute", headers=own, timeout=10).json()["handled_by"] \
        == ALL_PING
    for headers in ({**CHROME, "Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"},
                    {**CHROME, "Sec-Fetch-Site": "same-origin", "Referer": daemon.http + "/"}, {}):
        response = session.get(daemon.http + "/status", headers=headers, timeout=10)
        assert response.status_code == 200 and "Access-Control-Allow-Origin" not in response.headers, headers
    assert [e["routine"] for e in daemon.events()] == ["ticker", "relay", "ticker"]
    killed = session.post(daemon.http + "/kill", headers=page(COCKPIT, mode="cors", site="same-site"), timeout=10)
    assert killed.json() == {"event": "kill", "flows": ["f1", "f2"]}
    assert daemon.exit_code() == 0


def test_host_must_name_this_daemon(daemons):
    daemon = daemons("--allow-host", "pipert.lan", rpc=False)
    port = daemon.http.rsplit(":", 1)[1]
    session = requests.Session()
    for host in (f"attacker.example:{port}", "attacker.example", f"10.1.2.3:{port}", f"localhost.evil:{port}",
                 f"pipert.lan.evil:{port}", "a b", f"[::1:{port}"):
        for method, route, headers in (("GET", "/status", {}), ("POST", "/pause", {}),
                                       ("POST", "/kill", page(f"http://{host}", mode="cors", site="same-origin"))):
            response = session.request(method, daemon.http + route, headers={**headers, "Host": host}, timeout=10)
            assert response.status_code == 403, (host, route, response.text)
            assert "Access-Control-Allow-Origin" not in response.headers
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}", f"127.0.0.2:{port}",
                 f"pipert.lan:{port}", "PIPERT.LAN"):
        assert session.get(daemon.http + "/status", headers={"Host": host}, timeout=10).status_code == 200, host
    # a page the operator opened at http://pipert.lan:PORT (its own origin) may drive it
    own = page(f"http://pipert.lan:{port}", mode="cors", site="same-origin", Host=f"pipert.lan:{port}")
    assert session.post(daemon.http + "/start", headers=own, timeout=10).json()["event"] == "start"
    assert session.post(daemon.http + "/kill", timeout=10).status_code == 200
    assert daemon.exit_code() == 0


def test_allowed_origins_and_hosts_come_from_flags_environment_and_dotenv(daemons, tmp_path):
    def allows(daemon, origin):
        response = requests.get(daemon.http + "/status", headers=page(origin, mode="cors"), timeout=10)
        assert response.status_code in (200, 403), response.text
        return response.status_code == 200 and response.headers["Access-Control-Allow-Origin"] == origin

    cockpit_dir, listed_dir = tmp_path / "cockpit", tmp_path / "listed"
    cockpit_dir.mkdir()
    listed_dir.mkdir()
    (cockpit_dir / ".env").write_text("SOCKET_LOGGER_URL=http://cockpit.lan:5000/socket.io\n")
    (listed_dir / ".env").write_text("PIPERT_ALLOWED_ORIGINS=http://a.example:8080, https://B.example:443\n"
                                     "PIPERT_ALLOWED_HOSTS=pipert.lan,10.0.0.5\n")
    by_default = daemons(rpc=False, cwd=cockpit_dir)
    listed = daemons(rpc=False, cwd=listed_dir)
    flagged = daemons("--allow-origin", "http://c.example", "--allow-origin", "http://[::1]:8000/", rpc=False,
                      cwd=listed_dir)
    assert "pipert: http answers browser pages from its own origin and http://cockpit.lan:5000, " \
           "http://localhost:3000" in by_default.output
    for daemon, allowed in ((by_default, ["http://cockpit.lan:5000", COCKPIT]),
                            (listed, ["http://a.example:8080", "https://b.example"]),
                            (flagged, ["http://c.example", "http://[::1]:8000"])):
        for origin in ("http://cockpit.lan:5000", COCKPIT, "http://a.example:8080", "https://b.example",
                       "http://c.example", "http://[::1]:8000", "http://cockpit.lan", EVIL):
            assert allows(daemon, origin) == (origin in allowed), (daemon.output, origin)
    port = listed.http.rsplit(":", 1)[1]
    for host, status in ((f"pipert.lan:{port}", 200), (f"10.0.0.5:{port}", 200), (f"other.lan:{port}", 403)):
        assert requests.get(listed.http + "/status", headers={"Host": host}, timeout=10).status_code == status
    for daemon in (by_default, listed, flagged):
        requests.post(daemon.http + "/kill", timeout=10)
        assert daemon.exit_code() == 0

    for flag, value, message in (("--allow-origin", "localhost:3000", "is not scheme://host[:port]"),
                                 ("--allow-origin", "*", "no '*'"),
                                 ("--allow-host", "http://pipert.lan", "is not a host name")):
        result = run_pipert("run", "control_target.py:make_pipe", "--api", str(free_port()), flag, value)
        assert result.returncode == 2 and message in result.stderr and "built" not in result.stdout, result.stderr


@pytest.mark.parametrize("flags, server", [
    (["--api", "0.0.0.0:{port}"], "HTTP on 0.0.0.0:"),
    (["--api", "[::]:{port}"], "HTTP on :::"),
    (["--rpc", "tcp://0.0.0.0:{port}", "--api", "127.0.0.1:{port}"], "RPC on tcp://0.0.0.0:"),
    (["--rpc", "tcp://*:{port}"], "RPC on tcp://*:"),
])
def test_servers_off_loopback_without_a_token_are_refused_at_start(flags, server):
    result = run_pipert("run", "control_target.py:make_pipe", *(f.format(port=free_port()) for f in flags))
    assert result.returncode == 2 and "built" not in result.stdout, (result.stdout, result.stderr)
    assert f"refusing to serve {server}" in result.stderr
    for fix in ("--token TOKEN", "PIPERT_TOKEN=TOKEN in the environment or in .env", "--insecure"):
        assert fix in result.stderr, result.stderr


@pytest.fixture
def built_pipe(make_pipe, tmp_path):
    pipe = make_pipe()
    pipe.create_flow("f", True, Counter(period=0.01, name="counter"), Recorder(str(tmp_path / "out"), name="out"))
    pipe.build()
    return pipe


def test_wrappers_refuse_network_addresses_without_a_token_and_warn_when_insecure(built_pipe, caplog):
    pipe = built_pipe
    with pytest.raises(InsecureBindingError, match="refusing to serve HTTP on 0.0.0.0:[0-9]+ without a token.*token="):
        APIWrapper("0.0.0.0", free_port(), pipe).run()
    rpc = RPCPipeWrapper(pipe)
    try:
        with pytest.raises(InsecureBindingError, match=r"refusing to serve RPC on tcp://192\.0\.2\.1:4242 without"):
            rpc.bind("tcp://192.0.2.1:4242")
        rpc.bind(f"tcp://127.0.0.1:{free_port()}")  # loopback, ipc and inproc need no token
        rpc.bind("inproc://pipert-test")
    finally:
        rpc.close()
    # what `--insecure` on 0.0.0.0 does (tests bind to 127.0.0.1 only): the check passes, warns and is recorded
    with caplog.at_level(logging.WARNING, logger="pipert.security"):
        security.check_exposure(pipe, "RPC on tcp://0.0.0.0:4242", "0.0.0.0", None, insecure=True)
    assert "INSECURE: RPC on tcp://0.0.0.0:4242 serves WITHOUT A TOKEN" in caplog.text
    api = APIWrapper("127.0.0.1", free_port(), pipe)
    api.run()
    status = requests.get(f"http://127.0.0.1:{api.port}/status", timeout=10).json()
    assert status["insecure"] is True
    assert "RPC on tcp://0.0.0.0:4242 serves without a token" in status["security_warning"]
    assert set(status["routines"]) == {"counter", "out"}
    pipe.kill()
    assert api.join(10)


def test_access_policy_for_wildcard_and_named_bindings():
    def refused(policy, **environ):
        return policy.refusal({"REQUEST_METHOD": "GET", **environ}) is not None

    with_token, without = AccessPolicy("0.0.0.0", "s3cret"), AccessPolicy("0.0.0.0", None)
    assert not refused(with_token, HTTP_HOST="anything.example:4000")
    assert refused(without, HTTP_HOST="anything.example:4000")
    assert not refused(without, HTTP_HOST="192.168.7.7:4000", **{security.LOCAL_ADDRESS: "192.168.7.7"})
    assert refused(without, HTTP_HOST="192.168.7.8:4000", **{security.LOCAL_ADDRESS: "192.168.7.7"})
    named = AccessPolicy("pipert.lan", "s3cret", origins=[], hosts=["fe80::1"])
    assert not refused(named, HTTP_HOST="PIPERT.lan:4000") and not refused(named, HTTP_HOST="[fe80::1]:4000")
    assert refused(named, HTTP_HOST="other.lan:4000")
    assert refused(named, HTTP_HOST="pipert.lan:4000", HTTP_ORIGIN=COCKPIT)  # origins=[]: no cockpit
    assert not refused(named, HTTP_HOST="pipert.lan:4000", HTTP_ORIGIN="http://pipert.lan:4000")
    assert security.needs_token("::ffff:192.0.2.1", None) and not security.needs_token("::ffff:127.0.0.1", None)
    assert not security.needs_token("0.0.0.0", "s3cret") and not security.needs_token(None, None)


def test_limits_hold_under_bad_input_and_load(daemons):
    daemon = daemons("--start", rpc=False)
    port = int(daemon.http.rsplit(":", 1)[1])
    wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > 0)
    head = f"POST /pause HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    answers = {
        "declared body over the limit": raw(port, (head + "Content-Length: 2000000\r\n\r\n").encode() + b"x" * 1000),
        "chunked body over the limit": raw(port, (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
                                           + b"".join(b"10000\r\n" + b"x" * 0x10000 + b"\r\n" for _ in range(16))
                                           + b"1\r\nx\r\n0\r\n\r\n"),
        "long URL": raw(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"),
        "long header": raw(port, (head + "X-Big: " + "a" * 70000 + "\r\n\r\n").encode()),
        "many headers": raw(port, (head + "".join(f"X-{i}: {i}\r\n" for i in range(150)) + "\r\n").encode()),
        "not HTTP": raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        "bad length": raw(port, (head + "Content-Length: -5\r\n\r\n").encode()),
        "bad chunks": raw(port, (head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n").encode()),
        "head cut short": raw(port, head.encode()),  # http.client alone would run it: a truncated /pause
        "unknown method": raw(port, f"BREW /status HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode()),
    }
    expected = {"declared body over the limit": 413, "chunked body over the limit": 413, "long URL": 414,
                "long header": 431, "many headers": 431, "not HTTP": 400, "bad length": 400, "bad chunks": 400,
                "head cut short": 400, "unknown method": 405}
    assert {name: status_of(answer) for name, answer in answers.items()} == expected, answers
    ended_early = raw(port, (head + "Content-Length: 100\r\n\r\n{\"extra").encode())  # then the client left
    assert status_of(ended_early) == 400 and b"cannot be read" in ended_early

    # 200 half-open connections: silent, or stopped in the middle of a request's head or body
    held = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall([b"", head.encode(), (head + "Content-Length: 100\r\n\r\n{").encode(), b"G"][i % 4])
            held.append(sock)
        for _ in range(10):
            assert requests.get(daemon.http + "/status", timeout=10).status_code == 200
    finally:
        for sock in held:
            sock.close()

    # 2,000 requests from 20 threads, good and bad mixed
    mix = [("GET", "/status", {}, None, 200), ("POST", "/pause", page(EVIL), b"", 403),
           ("POST", "/kill", page(EVIL, **{"Content-Type": "text/plain"}), b"{}", 403),
           ("GET", "/status", {"Host": "attacker.example"}, None, 403), ("GET", "/nope", {}, None, 404),
           ("DELETE", "/status", {}, None, 405), ("POST", "/routines/events/PING/execute", {}, b"{not json", 400),
           ("POST", "/status", {"Content-Type": "application/json"}, b'{"extra_args": {"a": 1}}', 400),
           ("GET", "/pipe/structure", {"Origin": COCKPIT}, None, 200), ("GET", "/" + "x" * 9000, {}, None, 414)]
    outcomes, errors = [], []

    def client(n):
        session = requests.Session()
        try:
            for i in range(100):
                method, route, headers, body, status = mix[(n + i) % len(mix)]
                response = session.request(method, daemon.http + route, headers=headers, data=body, timeout=30)
                outcomes.append((route[:20], response.status_code, status))
        except Exception as exc:  # reported below, with what the other threads saw
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(outcomes) == 2000, (errors, len(outcomes))
    assert [o for o in outcomes if o[1] != o[2]] == []

    assert states(daemon) == ({"running"}, True)
    assert daemon.events() == []
    assert requests.post(daemon.http + "/routines/events/PING/execute", timeout=10).json()["handled_by"] == ALL_PING
    assert "Traceback" not in daemon.stderr()
    requests.post(daemon.http + "/kill", timeout=10)
    assert daemon.exit_code() == 0


def test_slow_and_idle_clients_are_cut_off(built_pipe):
    api = APIWrapper("127.0.0.1", free_port(), built_pipe, limits=Limits(timeout=0.5, max_connections=8))
    api.run()
    port = api.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]  # more than the pool
    try:
        assert requests.get(f"http://127.0.0.1:{port}/status", timeout=10).status_code == 200
        assert [sock.recv(1) for sock in idle] == [b""] * 20  # each closed by the server
    finally:
        for sock in idle:
            sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slowloris:
        slowloris.sendall(b"GET /status HTTP/1.1\r\n")
        for byte in b"X-Slow: " + b"a" * 100:  # one byte every 0.1 s: each read is quick, the head is not
            if select.select([slowloris], [], [], 0.1)[0]:
                break
            slowloris.sendall(bytes([byte]))
        answer = slowloris.recv(4096)
        assert status_of(answer) == 408 and b"head did not arrive within 0.5 s" in answer, answer
    slow_body = raw(port, f"POST /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100\r\n\r\n{{".encode(),
                    half_close=False)
    assert status_of(slow_body) == 408 and b"body did not arrive" in slow_body
    keep_alive = raw(port, f"GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert status_of(keep_alive) == 200
    built_pipe.kill()
    assert api.join(10)


ATTACK = """<!doctype html><html><body>
<form id="form" method="POST" action="{api}/kill" target="sink"><input name="a" value="1"></form>
<iframe name="sink" id="sink"></iframe>
<script>
window.attack = async () => {{
  const results = {{}};
  for (const route of ["/pause", "/kill"]) {{
    for (const type of ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]) {{
      const r = await fetch("{api}" + route, {{mode: "no-cors", method: "POST", headers: {{"Content-Type": type}},
                                               body: "{{}}"}});
      results["no-cors " + route + " " + type] = r.type;
    }}
  }}
  await new Promise(done => {{ const i = new Image(); i.onload = i.onerror = done; i.src = "{api}/kill"; }});
  try {{ const r = await fetch("{api}/status"); results.read = await r.text(); }}
  catch (e) {{ results.read = "blocked: " + e; }}
  await new Promise(done => {{
    document.getElementById("sink").onload = done;
    document.getElementById("form").submit();
  }});
  return results;
}};
window.cockpit = async () => {{
  const r = await fetch("{api}/routines/events/PING/execute/", {{method: "POST",
      headers: {{"Content-Type": "application/json"}}, body: JSON.stringify({{extra_args: {{value: "page"}}}})}});
  const status = await (await fetch("{api}/status")).json();
  return {{ping: (await r.json()).handled_by, routines: Object.keys(status.routines).sort()}};
}};
</script></body></html>"""


class _Page(http.server.BaseHTTPRequestHandler):
    """Answers every GET with its server's ``html``."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        html = self.server.html.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(html)))
        self.end_headers()
        self.wfile.write(html)

    def log_message(self, *args):
        pass


@pytest.fixture
def web_pages():
    """Web servers on new 127.0.0.1 ports (``.url``) serving their ``.html``; stopped at teardown."""
    servers = []

    def serve():
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
        server.html, server.url = "", f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_page_in_chromium_cannot_pause_or_kill_the_pipeline(daemons, web_pages):
    attacker, trusted = web_pages(), web_pages()
    daemon = daemons("--start", "--allow-origin", trusted.url, rpc=False)
    attacker.html = trusted.html = ATTACK.format(api=daemon.http)
    wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > 0)
    with chromium_page() as tab:
        tab.goto(attacker.url + "/attack.html")
        results = tab.evaluate("window.attack()")
        assert results["read"].startswith("blocked"), results
        assert [value for key, value in results.items() if key.startswith("no-cors")] == ["opaque"] * 6, results
        wait_for(lambda: daemon.stderr().count("refused HTTP POST /kill") >= 4)  # three fetches and the form
        assert daemon.stderr().count("refused HTTP POST /pause") == 3, daemon.stderr()
        assert "refused HTTP GET /kill" in daemon.stderr()  # the <img>
        assert states(daemon) == ({"running"}, True)
        before = daemon.status()["routines"]["sink"]["messages_in"]
        wait_for(lambda: daemon.status()["routines"]["sink"]["messages_in"] > before)

        tab.goto(trusted.url + "/cockpit.html")  # an allowed origin, as the cockpit's page is by default
        assert tab.evaluate("window.cockpit()") == {"ping": ALL_PING, "routines": ["relay", "sink", "ticker"]}
    assert [e["value"] for e in daemon.events()] == ["page", "page"]
    assert states(daemon) == ({"running"}, True)
    requests.post(daemon.http + "/kill", timeout=10)
    assert daemon.exit_code() == 0
