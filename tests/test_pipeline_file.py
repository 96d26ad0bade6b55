"""Pipelines from files, `pipert check/plugins/graph`, and parameters set at runtime over RPC and HTTP.

The end-to-end test installs a throw-away plugin package (written here, with entry points in the group
`pipert.routines`) into a temporary venv that sees this venv's packages, lists it with `pipert plugins`
and runs a pipeline file of its routines with `pipert run`, changing a parameter over RPC and HTTP.
"""
import json
import os
import queue
import subprocess
import sys
import sysconfig
import threading
import time

import pytest
import requests
import zerorpc

from helpers import clean_env, descendants, free_port, living, read_lines, wait_for
from pipert import Pipe, Wire, shm
from pipert.graph import mermaid
from pipert.pipeline_file import PipelineFileError, check_pipeline, load_pipeline

ROUTINES = '''
import json
import time

import pipert
from pipert import DestinationRoutine, MiddleRoutine, Param, SourceRoutine, events


@pipert.register("{prefix}counter")
class Counter(SourceRoutine):
    step = Param(int, default=1, min=1, help="added at each tick")
    fps = Param(float, default=50.0, min=0.1, help="ticks a second")

    def setup(self):
        self.n = 0

    def main_logic(self):
        time.sleep(1.0 / self.fps)
        self.n += self.step
        return {{"n": self.n}}

    @events("RESET")
    def reset(self):
        self.n = 0


@pipert.register("{prefix}scaler")
class Scaler(MiddleRoutine):
    factor = Param(float, default=1.0, help="multiplies n")

    def main_logic(self, data):
        return dict(data, scaled=data["n"] * self.factor, factor=self.factor)


class FileSink(DestinationRoutine):
    path = Param(str, help="JSON-lines output file")

    def setup(self):
        self.file = open(self.path, "a", buffering=1)

    def main_logic(self, data):
        self.file.write(json.dumps(data) + "\\n")

    def cleanup(self):
        self.file.close()
'''


@pytest.fixture
def routines_module(tmp_path, monkeypatch):
    """A module `fileroutines` of routines in a directory on sys.path (registered as file-counter etc.)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "fileroutines.py").write_text(ROUTINES.format(prefix="file-"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("fileroutines", None)


GOOD = """\
pipe: {wire_policy: block, wire_depth: 8}
params: {fps: 100}
flows:
  produce:
    routines: [{name: count, type: "fileroutines:Counter", params: {step: "2"}}]
  work:
    restart: never
    max_restarts: 2
    routines: [{name: scale, type: "fileroutines:Scaler", params: {factor: 3}}]
  store: {routines: [{name: sink, type: "fileroutines:FileSink", params: {path: OUT}}]}
wires:
  - {source: count, destinations: [scale]}
  - {source: scale, destinations: sink, policy: latest, depth: 2}
"""


def test_a_file_builds_the_same_pipe_as_code(routines_module, make_pipe):
    import fileroutines
    path = routines_module / "good.yaml"
    path.write_text(GOOD.replace("OUT", str(routines_module / "out.jsonl")))
    from_file = load_pipeline(str(path))

    code = Pipe(wire_policy="block", wire_depth=8, params={"fps": 100})
    count, scale = fileroutines.Counter(name="count", step=2), fileroutines.Scaler(name="scale", factor=3)
    sink = fileroutines.FileSink(name="sink", path=str(routines_module / "out.jsonl"))
    code.create_flow("produce", False, count)
    code.create_flow("work", False, scale, restart="never", max_restarts=2)
    code.create_flow("store", False, sink)
    code.link(Wire(source=count, destinations=(scale,)), Wire(source=scale, destinations=(sink,), policy="latest",
                                                                 depth=2))
    code.validate()
    assert from_file.structure() == code.structure()
    assert mermaid(from_file) == mermaid(code)
    assert [(f.name, f.restart, f.max_restarts) for f in from_file.flows.values()] == \
        [(f.name, f.restart, f.max_restarts) for f in code.flows.values()]
    assert [(w.source.name, [d.name for d in w.destinations], w.policy, w.depth) for w in from_file.wires] == \
        [(w.source.name, [d.name for d in w.destinations], w.policy, w.depth) for w in code.wires]
    assert {r.name: r.params for f in from_file.flows.values() for r in f.routines} == \
        {"count": {"step": 2, "fps": 100.0}, "scale": {"factor": 3.0}, "sink": {"path": str(routines_module / "out.jsonl")}}

    as_json = routines_module / "good.json"
    import yaml
    as_json.write_text(json.dumps(yaml.safe_load(path.read_text()), indent=2))
    assert load_pipeline(str(as_json)).structure() == code.structure()
    assert mermaid(code).splitlines()[2] == '    r1(["count<br/><small>file-counter</small>"])'


BAD = """\
pipe: {wire_policy: fastest, colour: red}
params: {fps: fast, speed: 3}   # speed: not judged while a routine type is unknown
flows:
  produce:
    routines:
      - {name: count, type: "fileroutines:Counter", params: {step: 0, stride: 2}}
  work:
    restart: sometimes
    routines:
      - {name: scale, type: no-such-routine}
      - {type: "fileroutines:Scaler"}
  store: {routines: [{name: sink, type: "fileroutines:FileSink"}]}
wires:
  - {source: count, destinations: [scale, ghost]}
  - {source: scale, destinations: sink, policy: maybe, depth: 0}
"""


def test_check_reports_every_problem_with_its_line(routines_module):
    path = routines_module / "bad.yaml"
    path.write_text(BAD)
    pipe, problems = check_pipeline(str(path))
    assert pipe is None
    expected = [
        (1, "'pipe' has no option 'colour': use wire_policy, wire_depth"),
        (1, "'pipe' options do not fit: wire_policy 'fastest' is unknown: use 'latest' or 'block'"),
        (2, "routine 'count' (Counter): parameter 'fps' expects float >= 0.1, got 'fast' (str) (from the pipe's "
            "params)"),
        (6, "routine 'count' (Counter): parameter 'step' expects int >= 1, got 0 (int): out of bounds"),
        (6, "routine 'count' (Counter): unknown parameter 'stride' (given 2); its parameters are: fps, step"),
        (8, "flow 'work': restart policy 'sometimes' is unknown: use one of"),
        (10, "routine 'scale': there is no routine type 'no-such-routine': use a registered name"),
        (11, "this routine needs a name (name: my-routine), not None"),
        (12, "routine 'sink' (FileSink): parameter 'path' is required (str) and was not set: set it"),
        (14, "the wire's destination 'ghost' is not a routine of this pipeline; routines are ['count', 'scale', "
             "'sink']"),
        (15, "Wire policy 'maybe' is unknown: use 'latest' or 'block'"),
        (15, "Wire depth 0 must be a whole number >= 1"),
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, (line, text) in zip(problems, sorted(expected, key=lambda e: e[0])):
        assert problem.startswith(f"{path}:{line}: ") and text in problem, (problem, line, text)
    with pytest.raises(PipelineFileError) as caught:
        load_pipeline(str(path))
    assert caught.value.problems == problems


@pytest.mark.parametrize("name, text, expected", [
    ("syntax.yaml", "flows:\n  a: {routines: [\n  b: 2\n", ["syntax.yaml:4: not valid YAML: expected ',' or ']'"]),
    ("syntax.json", '{"flows": {"a": 1},\n}', ["syntax.json:2: not valid JSON: Expecting property name"]),
    ("empty.yaml", "", ["empty.yaml:1: the pipeline file is empty: it needs at least `flows:`"]),
    ("list.yaml", "- a\n- b\n", ["list.yaml:1: the pipeline file must be a mapping",
                                 "list.yaml:1: the pipeline has no flows"]),
    ("twice.yaml", "flows:\n  a: {routines: [{name: x, type: 'fileroutines:Counter'}]}\n  a: {}\n"
                   "wirez: []\n",
     ["twice.yaml:3: key 'a' is given twice here: keep one", "twice.yaml:3: flow 'a' needs a non-empty list",
      "twice.yaml:4: the pipeline file has no key 'wirez': use pipe, params, flows, wires"]),
    ("unused.yaml", "params: {fps: 10, speed: 3}\nflows:\n  a: {routines: [{name: x, type: 'fileroutines:Counter'}]}\n",
     ["unused.yaml:1: pipe parameter 'speed' (given 3) is declared by no routine: remove it or check its spelling; "
      "routines declare ['fps', 'step']"]),
    ("unlinked.yaml", "flows:\n  a: {routines: [{name: x, type: 'fileroutines:Counter'}]}\n",
     ["unlinked.yaml:2: routine 'x' is linked to nothing"]),
    ("graph.json", '{"flows": {"a": {"routines": [\n  {"name": "x", "type": "fileroutines:Counter"},\n'
                   '  {"name": "y", "type": "fileroutines:Scaler"}]}},\n "wires": [{"source": "x", '
                   '"destinations": ["y"]}]}',
     ["graph.json:3: routine 'y' has no outputs: wire it to a destination"]),
])
def test_check_names_the_line_of_syntax_and_shape_problems(routines_module, monkeypatch, name, text, expected):
    monkeypatch.chdir(routines_module)
    (routines_module / name).write_text(text)
    problems = check_pipeline(name)[1]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), (problem, start)


# ----- the plugin package, installed into a venv of its own, end to end -----

PLUGIN_PROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "pipert-testplug"
version = "0.1"

[project.entry-points."pipert.routines"]
testplug = "testplug.routines"
testplug-sink = "testplug.routines:FileSink"
testplug-broken = "testplug.broken"
"""

PIPELINE = """\
pipe: {wire_policy: block, wire_depth: 16}
params: {fps: 100}
flows:
  produce: {routines: [{name: count, type: counter, params: {step: 1}}]}
  work:
    restart: never
    routines: [{name: scale, type: scaler, params: {factor: "2"}}]
  store: {routines: [{name: sink, type: testplug-sink, params: {path: OUT}}]}
wires:
  - {source: count, destinations: [scale]}
  - {source: scale, destinations: [sink]}
"""


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory):
    """A venv (on top of this one's packages, nothing downloaded) with the plugin package installed."""
    root = tmp_path_factory.mktemp("plugin")
    package = root / "project" / "testplug"
    package.mkdir(parents=True)
    (root / "project" / "pyproject.toml").write_text(PLUGIN_PROJECT)
    (package / "__init__.py").write_text("")
    (package / "routines.py").write_text(ROUTINES.format(prefix="").replace(
        "class FileSink", "# registered through its entry point (module:Class)\nclass FileSink"))
    (package / "broken.py").write_text("import a_camera_driver_that_is_not_installed\n")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "_pipert_test_base.pth"), "w") as f:  # this venv's packages (pipert, pip)
        f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    str(root / "project")], check=True, env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    return python, root


def pipert_in(venv_python, *args, cwd, timeout=60):
    return subprocess.run([venv_python, "-m", "pipert", *args], capture_output=True, text=True, cwd=cwd,
                          env=clean_env(), timeout=timeout)


def test_an_installed_plugin_is_listed_and_its_broken_part_reported(plugin_venv):
    python, root = plugin_venv
    listed = pipert_in(python, "plugins", cwd=root)
    assert listed.returncode == 1, listed
    assert "counter  (source; package pipert-testplug; testplug.routines:Counter)" in listed.stdout
    assert "    step (int, >= 1, default 1): added at each tick" in listed.stdout
    assert "    events: RESET" in listed.stdout
    assert "scaler  (middle; package pipert-testplug; testplug.routines:Scaler)" in listed.stdout
    assert "testplug-sink  (destination; package pipert-testplug; testplug.routines:FileSink)" in listed.stdout
    assert "    path (str, required): JSON-lines output file" in listed.stdout
    assert "plugin testplug-broken = testplug.broken (package pipert-testplug) failed to load: " \
           "ModuleNotFoundError: No module named 'a_camera_driver_that_is_not_installed'" in listed.stderr
    as_json = json.loads(pipert_in(python, "plugins", "--json", cwd=root).stdout)
    counter = next(r for r in as_json["routines"] if r["name"] == "counter")
    assert counter["params"]["fps"] == {"type": "float", "required": False, "default": 50.0, "min": 0.1,
                                        "help": "ticks a second"}
    assert pipert_in(python, "plugins", cwd=root.parent).returncode == 1  # found wherever it runs from
    outside = subprocess.run([sys.executable, "-m", "pipert", "plugins"], capture_output=True, text=True,
                             env=clean_env(), cwd=root)
    assert "testplug" not in outside.stdout + outside.stderr  # installed in the temporary venv only


class Daemon:
    """`pipert run` in the plugin venv, its output read line by line."""

    def __init__(self, python, args, cwd):
        self.proc = subprocess.Popen([python, "-m", "pipert", "run", *args], cwd=cwd, env=clean_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.output = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def read_until(self, text, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            self.output.append(line)
            if text in line:
                return line


def test_a_pipeline_file_of_plugin_routines_runs_and_takes_params_over_rpc_and_http(plugin_venv, tmp_path):
    python, _ = plugin_venv
    out = tmp_path / "out.jsonl"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.replace("OUT", str(out)))
    assert pipert_in(python, "check", str(pipeline), cwd=tmp_path).stdout == \
        f"{pipeline}: ok: 3 flows, 3 routines, 2 wires\n"
    graph = pipert_in(python, "graph", str(pipeline), cwd=tmp_path).stdout
    assert graph.startswith("flowchart LR\n") and '    r3["scale<br/><small>scaler</small>"]' in graph
    assert "  r1 -- \"block, depth 16\" --> r3" in graph

    rpc, http = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    daemon = Daemon(python, [str(pipeline), "--start", "--rpc", rpc, "--api", http, "--param", "count.step=3"],
                    tmp_path)
    pids = []
    context = zerorpc.Context()
    client = zerorpc.Client(context=context, timeout=15)
    try:
        pipe_id = daemon.read_until(" built: ").split()[2]
        daemon.read_until("pipert: ready")
        pids = [daemon.proc.pid] + descendants(daemon.proc.pid)
        wait_for(lambda: len(read_lines(out)) > 3)
        assert {line["n"] % 3 for line in read_lines(out)} == {0} and read_lines(out)[0]["factor"] == 2.0

        client.connect(rpc)
        acked = client.set_params("scale", '{"factor": "4"}')
        assert acked == {"event": "set_params", "handled_by": ["scale"], "errors": {}, "pending": [],
                         "params": {"factor": 4.0}}
        wait_for(lambda: read_lines(out)[-1]["factor"] == 4.0)
        with pytest.raises(zerorpc.RemoteError) as refused:
            client.set_params("scale", '{"factor": "lots"}')
        assert refused.value.name == "ControlError"
        assert "routine 'scale' (Scaler): parameter 'factor' expects float, got 'lots' (str)" in refused.value.msg
        assert client.execute("set_params", {"routines": ["scale"], "factor": 6})["params"] == {"factor": 6.0}
        with pytest.raises(zerorpc.RemoteError, match="goes to exactly one routine"):
            client.execute("set_params", {"factor": 6})

        base = f"http://{http}"
        answer = requests.post(f"{base}/routines/scale/events/set_params/execute",  # as the cockpit sends events
                               json={"extra_args": {"factor": "5"}}, timeout=10)
        assert answer.status_code == 200 and answer.json()["params"] == {"factor": 5.0}
        answer = requests.post(f"{base}/routines/count/params", json={"step": 10}, timeout=10)
        assert answer.status_code == 200 and answer.json()["params"] == {"step": 10, "fps": 100.0}
        wait_for(lambda: read_lines(out)[-1]["n"] - read_lines(out)[-2]["n"] == 10)
        answer = requests.post(f"{base}/routines/count/params", json={"step": 0, "speed": 1}, timeout=10)
        assert answer.status_code == 400
        assert "parameter 'step' expects int >= 1, got 0" in answer.json()["error"]
        assert "unknown parameter 'speed'" in answer.json()["error"]
        assert requests.post(f"{base}/routines/nobody/params", json={"step": 1}, timeout=10).status_code == 404
        answer = requests.post(f"{base}/routines/count/params", data="[1]", timeout=10)
        assert answer.status_code == 400 and "must be a JSON object" in answer.json()["error"]

        structure = requests.get(f"{base}/pipe/structure", timeout=10).json()
        count = next(r for r in structure["Routines"] if r["routine_name"] == "count")
        assert count["params"]["step"] == {"type": "int", "required": False, "default": 1, "min": 1,
                                           "help": "added at each tick"}
        status = requests.get(f"{base}/status", timeout=10).json()["routines"]
        assert status["count"]["params"] == {"step": 10, "fps": 100.0} and status["scale"]["params"] == \
            {"factor": 5.0}
        assert requests.post(f"{base}/kill", timeout=10).status_code == 200
        assert daemon.proc.wait(30) == 0
    finally:
        client.close()
        context.destroy(linger=0)
        if daemon.proc.poll() is None:
            pids += descendants(daemon.proc.pid)
            daemon.proc.kill()
            daemon.proc.wait(10)
        wait_for(lambda: not living(pids), timeout=10)
        daemon.proc.stdout.close()
        daemon.proc.stderr.close()
    assert not [e for e in shm.leftovers() if f"_{pipe_id}_" in e]


def test_bad_params_stop_pipert_run_before_any_process_starts(plugin_venv, tmp_path):
    python, _ = plugin_venv
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.replace("{path: OUT}", "{}").replace("{step: 1}", "{step: one}"))
    result = pipert_in(python, "run", str(pipeline), "--start", cwd=tmp_path)
    assert result.returncode == 1 and " built: " not in result.stdout
    assert f"{pipeline}:4: routine 'count' (Counter): parameter 'step' expects int >= 1, got 'one' (str)" \
           in result.stderr
    assert f"{pipeline}:8: routine 'sink' (FileSink): parameter 'path' is required (str)" in result.stderr
    result = pipert_in(python, "run", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert result.returncode == 1 and "there is no pipeline file" in result.stderr
    pipeline.write_text(PIPELINE.replace("OUT", str(tmp_path / "out.jsonl")))
    result = pipert_in(python, "run", str(pipeline), "--param", "scale.speed=3", cwd=tmp_path)
    assert result.returncode == 1 and "routine 'scale' (Scaler): unknown parameter 'speed'" in result.stderr
    result = pipert_in(python, "run", str(pipeline), "--param", "scaler.factor=3", cwd=tmp_path)
    assert result.returncode == 1 and "--param 'scaler.factor=3': there is no routine 'scaler'" in result.stderr
    result = pipert_in(python, "run", str(pipeline), "--param", "factor", cwd=tmp_path)
    assert result.returncode == 1 and "--param 'factor' is not NAME=VALUE or ROUTINE.NAME=VALUE" in result.stderr


def test_the_example_pipeline_file_checks(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    pipe, problems = check_pipeline(os.path.join(examples, "sensors.yaml"))
    assert problems == []
    assert {r.name: r.params for f in pipe.flows.values() for r in f.routines} == {
        "hall": {"fps": 2.0, "mean": 21.0}, "lab": {"fps": 5.0, "mean": 23.5},
        "alarm": {"limit": 22.0, "report_all": False}, "log": {"prefix": "ALARM"}}
