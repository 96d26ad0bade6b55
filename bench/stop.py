"""How long `pipert run` takes to stop, the way service managers stop it.

Runs `pipert run tests/signal_target.py:make_pipe --start` (three flows, `block`
wires holding messages, kill_grace 5 s) in a session of its own, --runs times per
case, and measures from the signal to the moment the last process of the group
is gone; checks the exit code and that /dev/shm holds nothing of the pipe.

    python bench/stop.py [--runs 5]

Cases: SIGTERM to the whole group (systemctl stop, timeout, kill -- -PGID),
SIGTERM to the daemon alone (docker stop without an init), and a second SIGTERM
to the group 0.2 s after the first while every cleanup would take 60 s.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipert import shm  # noqa: E402

TARGET = os.path.join(ROOT, "tests", "signal_target.py")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def one_stop(case: str, log: str) -> float:
    """Start the daemon, stop it as ``case`` says; seconds from the first signal to the group's end."""
    factory, cleanup = ("make_patient_pipe", "60") if case == "double" else ("make_pipe", "0")
    env = dict(os.environ, SIGNAL_TARGET_LOG=log, SIGNAL_TARGET_CLEANUP=cleanup)
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipert", "run", f"{TARGET}:{factory}", "--start"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        pipe_id = None
        for line in proc.stdout:
            pipe_id = pipe_id or (line.split()[2] if " built: " in line else None)
            if line.startswith("pipert: ready"):
                break
        time.sleep(1.0)  # messages wait in the block wires by now
        began = time.monotonic()
        if case == "daemon":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        if case == "double":
            time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGTERM)
        while proc.poll() is None or group_alive(proc.pid):  # reap the daemon first: a zombie keeps its group
            time.sleep(0.005)
        took = time.monotonic() - began
        proc.stdout.read()
        if proc.returncode != 0:
            raise SystemExit(f"{case}: the daemon exited {proc.returncode}")
        left = [e for e in shm.leftovers() if f"_{pipe_id}_" in e]
        if left:
            raise SystemExit(f"{case}: left in /dev/shm: {left}")
        return took
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    log = os.path.join("/tmp", f"pipert-stop-{os.getpid()}.jsonl")
    print(f"{'case':<38} {'median s':>9} {'max s':>7}  (kill_grace 5 s; {args.runs} runs)")
    for case, label in (("group", "SIGTERM to the whole group"), ("daemon", "SIGTERM to the daemon alone"),
                        ("double", "two SIGTERMs, cleanups of 60 s")):
        times = [one_stop(case, log) for _ in range(args.runs)]
        print(f"{label:<38} {statistics.median(times):9.2f} {max(times):7.2f}")
    if os.path.exists(log):
        os.unlink(log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
