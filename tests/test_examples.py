"""The examples run as users run them, each as a subprocess: exit code 0 and the output they promise."""
import os
import subprocess
import sys

from test_demo import ROOT, Daemon, clean_env, demo_env

EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name: str, cwd: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_readme_example(tmp_path):
    result = run_example("readme_example.py", str(tmp_path), clean_env())
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) <= {"example"}
    assert "event 'CUSTOM' goes nowhere" in result.stderr


def test_custom_events(tmp_path):
    result = run_example("custom_events.py", str(tmp_path), clean_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    everyone = "REPORT to all: {'event': 'REPORT', 'handled_by': ['alarm', 't1', 't2'], 'errors': {}, 'pending': []}"
    assert lines.count(everyone) == 2
    assert "CALIBRATE flow sensors: {'event': 'CALIBRATE', 'handled_by': ['t1', 't2'], 'errors': {}, " \
           "'pending': []}" in lines
    assert "CALIBRATE t2: {'event': 'CALIBRATE', 'handled_by': ['t2'], 'errors': {}, 'pending': []}" in lines
    refused = [line for line in lines if line.startswith("refused: ")]
    assert len(refused) == 2 and "no routine 't9'" in refused[0] and "['degrees']" in refused[1]
    assert lines[-1] == "done"
    logged = [line.split(" INFO ", 1)[-1] for line in result.stderr.splitlines()]
    assert {"pipe.sensors.t1: offset now 1.5", "pipe.sensors.t2: offset now 1.5", "pipe.sensors.t1: offset 1.5",
            "pipe.sensors.t2: offset 0.0"} <= set(logged)
    alarm = logged.index("pipe.alarms.alarm: t2 reads 50 C, over 40.0 C: asking it to recalibrate")
    assert "pipe.sensors.t2: offset now 0.0" in logged[alarm:]  # the alarm's own event reached t2


def test_rpc_client(tmp_path):
    """examples/rpc_client.py against the demo running as a daemon; it finds it by PIPERT_RPC_ENDPOINT."""
    target = os.path.join(EXAMPLES, "video_analytics.py:create_pipe")
    with Daemon(target, str(tmp_path), demo_env(str(tmp_path / "out"), seconds=0)) as daemon:
        daemon.wait_ready()
        result = run_example("rpc_client.py", str(tmp_path), clean_env(PIPERT_RPC_ENDPOINT=daemon.rpc))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
