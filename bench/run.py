"""`make bench`: pipert against PipeRT 2.4.0, dora-rs 1.1 and iceoryx2 0.10, same scenarios, one table.

Each peer lives in its own venv under .bench-venvs/ (git-ignored), created here
when missing and reused by later runs: PipeRT 2.4.0 (PyPI ``PipeRT``, imported
as ``pipert2``), dora-rs 1.1 (``dora-rs`` and ``dora-rs-cli``: Python nodes, a
dataflow YAML, ``dora run``) and iceoryx2 0.10 (publish-subscribe with an event
listener). Each scenario runs as its own subprocess, bench/<impl>_scenarios.py
with that implementation's interpreter; each prints one ``BENCH_RESULT`` JSON
line. Scenarios:
  small   a dict {counter, ts, tag} from a source process to a destination process
  frame   a 1080x1920x3 uint8 frame, stamped (the counter at three places; with
          --fill full also a checksum of a sample) in the transport's own shared memory where it has one
          (pipert: Routine.shared_array; iceoryx2/dora: a loaned buffer), in a
          plain array otherwise (PipeRT 2)
  fanout  the same frame to 3 destination processes
  copyto  numpy.copyto of one frame (the memory-bandwidth bound), measured here
  idle    CPU of a paced 30 fps pipeline of 4 flows (pipert), measured here
Each scenario: warm-up, 3 throughput runs of 5 s at full speed, then (small
and frame) 3 latency runs of 5 s paced at 1000 msg/s or 30 frames/s, so that
latency is transit time through an idle pipeline. Figures are medians of the
3 runs. ``--quick`` shortens everything for a smoke run.

Exit status: 0 when everything ran and arrived intact, even if targets are
missed (it is a report); 1 on a crash, a missing result, or an integrity
failure on our side (counter not increasing, frame stamp or checksum wrong,
or a message lost on a lossless "block" wire). The peers' own integrity
errors are printed as warnings: they are the baseline, not the product.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402

VENVS = os.path.join(ROOT, ".bench-venvs")
# implementation -> (column title, requirements of its venv, import check); pipert runs in this interpreter
PEERS = {
    "pipert2": ("PipeRT 2.4.0", ["PipeRT[shared_memory]==2.4.0", "numpy"],
                "import pipert2, posix_ipc, numpy; assert pipert2.__version__ == '2.4.0', pipert2.__version__"),
    "dora": ("dora-rs 1.1", ["dora-rs==1.1.*", "dora-rs-cli==1.1.*", "numpy", "pyarrow"],
             "import dora, numpy, pyarrow, shutil, sys, os; "
             "assert os.path.exists(os.path.join(os.path.dirname(sys.executable), 'dora'))"),
    "iceoryx2": ("iceoryx2 0.10", ["iceoryx2==0.10.*", "numpy"], "import iceoryx2, numpy"),
}
IMPLS = ["pipert"] + list(PEERS)
LOG_DIR = os.path.join(HERE, "out")

# (label, implementation, scenario, extra arguments)
RUNS = [(label, impl, label, []) for impl in IMPLS for label in ("small", "frame", "fanout")] + [
    ("small-latest", "pipert", "small", ["--policy", "latest", "--depth", "1"]),
    ("frame-filled", "pipert2", "frame", ["--fill", "full"]),
    ("frame-filled", "pipert", "frame", ["--fill", "full"]),
    ("fanout-filled", "pipert2", "fanout", ["--fill", "full"]),
    ("fanout-filled", "pipert", "fanout", ["--fill", "full"]),
    ("frame-own", "pipert", "frame", ["--frame-buffer", "own"]),
    ("frame-latest", "pipert", "frame", ["--policy", "latest", "--depth", "1"]),
]
INFO_TITLES = {
    "frame-filled": "frames the source fills with a full image first (one copyto per frame on both):",
    "fanout-filled": "the same, fanned out to 3 destinations (frames/s per destination):",
    "frame-own": "pipert, a frame returned as a plain array (one copy on send, none on receipt):",
    "frame-latest": "pipert, frames on a 'latest' wire of depth 1:",
}


def python_of(impl):
    """The interpreter that runs ``impl``'s scenarios."""
    return sys.executable if impl == "pipert" else os.path.join(VENVS, impl, "bin", "python")


def log(text):
    """Progress line on stderr (the table goes to stdout)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def ensure_venv(impl):
    """Create .bench-venvs/<impl> with the peer's release if it is missing; True if usable."""
    _, requirements, check = PEERS[impl]
    venv, python = os.path.join(VENVS, impl), python_of(impl)
    checked = [python, "-c", check]
    if os.path.exists(python) and subprocess.run(checked, capture_output=True).returncode == 0:
        return True
    log("creating %s with %s ..." % (os.path.relpath(venv, ROOT), " ".join(requirements)))
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", "--clear", venv],
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"] + requirements,
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            log("failed: %s\n%s" % (" ".join(step), done.stderr[-2000:]))
            return False
    return subprocess.run(checked, capture_output=True).returncode == 0


def run_scenario(impl, label, scenario, extra, args):
    """Run one scenario script; return (result dict or None, error text or None)."""
    python = python_of(impl)
    script = os.path.join(HERE, "%s_scenarios.py" % impl)
    command = [python, script, "--scenario", scenario] + extra
    if args.quick:
        command.append("--quick")
    for option in ("warmup", "run", "runs"):
        value = getattr(args, option)
        if value is not None:
            command += ["--" + option, str(value)]
    warmup, run, runs = common.durations(args)
    planned = common.planned_seconds(common.build_phases(scenario, warmup, run, runs))
    os.makedirs(LOG_DIR, exist_ok=True)
    log_path = os.path.join(LOG_DIR, "%s-%s.log" % (impl, label))
    env = dict(os.environ)
    if impl != "pipert":
        env.pop("PYTHONPATH", None)
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=planned + 240)
    except subprocess.TimeoutExpired as exc:
        _write_log(log_path, command, exc.stdout, exc.stderr)
        return None, "timed out after %.0f s (log: %s)" % (planned + 240, os.path.relpath(log_path, ROOT))
    _write_log(log_path, command, done.stdout, done.stderr)
    result = None
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
    if done.returncode != 0 or result is None:
        tail = "\n".join((done.stderr or "").strip().splitlines()[-15:])
        return result, "exit %d, no result (log: %s)\n%s" % (done.returncode, os.path.relpath(log_path, ROOT), tail)
    return result, None


def _write_log(path, command, stdout, stderr):
    """Keep each scenario's full output in bench/out/ for a post-mortem."""
    def text(value):
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        return value or ""

    with open(path, "w") as handle:
        handle.write("$ %s\n--- stdout\n%s\n--- stderr\n%s\n" % (" ".join(command), text(stdout), text(stderr)))


def _cpu_busy_s():
    """Busy CPU seconds of the whole machine so far (from /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s():
    """CPU seconds used so far by finished children (the scenario runs)."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ----- figures from the results -----

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _dest_rate(dest):
    """Median delivered rate of the throughput runs tp0.. of one destination."""
    return _median([t["rate"] for tag, t in dest["tags"].items() if tag.startswith("tp")])


def _dest_lat(dest, prefix, key):
    """Median over runs ``prefix0..`` of a latency percentile, in µs."""
    return _median([t[key] for tag, t in dest["tags"].items() if tag.startswith(prefix)])


def figures(result):
    """The numbers the table shows for one scenario result."""
    if not result or not result.get("destinations"):
        return {}
    dests = [d for d in result["destinations"].values() if d]
    if not dests or len(dests) != len(result["destinations"]):
        return {}
    rates = [_dest_rate(d) for d in dests]
    sent = sum(v for k, v in (result.get("source") or {}).get("sent", {}).items() if k.startswith("tp"))
    got = [sum(t["count"] for tag, t in d["tags"].items() if tag.startswith("tp")) for d in dests]
    return {
        "rate": min(r for r in rates if r is not None) if any(r is not None for r in rates) else None,
        "lat_p50": _median([_dest_lat(d, "lat", "lat_p50_us") for d in dests]),
        "lat_p99": _median([_dest_lat(d, "lat", "lat_p99_us") for d in dests]),
        "load_p50": _median([_dest_lat(d, "tp", "lat_p50_us") for d in dests]),
        "load_p99": _median([_dest_lat(d, "tp", "lat_p99_us") for d in dests]),
        "loss_pct": 100.0 * (1 - min(got) / sent) if sent else None,
    }


def integrity(result, impl):
    """List of integrity problems in one result."""
    problems = []
    if not result:
        return ["no result"]
    if not result.get("source"):
        problems.append("source wrote no report")
    lossless = impl == "pipert" and result.get("config", {}).get("policy") == "block"
    for name, dest in (result.get("destinations") or {}).items():
        if not dest:
            problems.append("%s wrote no report" % name)
            continue
        if not dest.get("complete"):
            problems.append("%s never got the end marker" % name)
        if dest["errors"]:
            problems.append("%s: %d integrity errors, e.g. %s" % (name, dest["errors"], dest["first_errors"][:2]))
        if lossless and dest["lost"]:
            problems.append("%s: %d messages lost on a block wire" % (name, dest["lost"]))
    return problems


def machine():
    """CPU model, cores, Python and numpy versions."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable,
            "python": platform.python_version(), "numpy": numpy.__version__,
            "kernel": platform.release()}


# ----- the report -----

def _fmt(value, unit=""):
    if value is None:
        return "—"
    if unit == "us":
        return "%.0f µs" % value if value < 1000 else "%.2f ms" % (value / 1000)
    if unit == "%":
        return "%.1f %%" % value
    if unit == "x":
        return "%.2fx" % value
    if value >= 100:
        return "{:,.0f}".format(value)
    return "%.1f" % value


def _ratio(ours, theirs):
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def report(results, copy_times, idle, args):
    """Print the table and the targets; return the list of PASS/MISS lines."""
    table = {impl: {label: figures(results.get((impl, label))) for label, i, *_ in RUNS if i == impl}
             for impl in IMPLS}
    ours = table["pipert"]
    copy_s, cycling_s = copy_times
    copy_fps, cycling_fps = 1.0 / copy_s, 1.0 / cycling_s

    def get(impl, label, key):
        return table[impl].get(label, {}).get(key)

    def cost(impl, suffix=""):
        single, fan = get(impl, "frame" + suffix, "rate"), get(impl, "fanout" + suffix, "rate")
        return single / fan if single and fan else None

    rows = [
        ("Small messages (dict, pickled), 1 -> 1", None, None, None, None),
        ("  messages/s (delivered)", "small", "rate", "", "higher"),
        ("  latency p50, paced 1000/s", "small", "lat_p50", "us", "lower"),
        ("  latency p99, paced 1000/s", "small", "lat_p99", "us", "lower"),
        ("  latency p50 at full load", "small", "load_p50", "us", "info"),
        ("  latency p99 at full load", "small", "load_p99", "us", "info"),
        ("  lost at full load", "small", "loss_pct", "%", "info"),
        ("1080p frames (stamped in place), 1 -> 1", None, None, None, None),
        ("  frames/s (delivered)", "frame", "rate", "", "higher"),
        ("  latency p50, paced 30/s", "frame", "lat_p50", "us", "lower"),
        ("  latency p99, paced 30/s", "frame", "lat_p99", "us", "lower"),
        ("  latency p50 at full load", "frame", "load_p50", "us", "info"),
        ("  latency p99 at full load", "frame", "load_p99", "us", "info"),
        ("  lost at full load", "frame", "loss_pct", "%", "info"),
        ("1080p frames, 1 -> 3", None, None, None, None),
        ("  frames/s per destination (min)", "fanout", "rate", "", "higher"),
        ("  lost at full load", "fanout", "loss_pct", "%", "info"),
    ]
    width, col = 34, 11
    peers = list(PEERS)
    print()
    print("%-*s %*s" % (width, "", col, "pipert") + "".join(" %*s" % (col, PEERS[p][0]) for p in peers)
          + "   pipert / " + " / ".join(PEERS[p][0].split()[0] for p in peers))
    print("-" * (width + (col + 1) * 4 + 34))
    for title, label, key, unit, better in rows:
        if label is None:
            print(title)
            continue
        mine = get("pipert", label, key)
        line = "%-*s %*s" % (width, title, col, _fmt(mine, unit))
        line += "".join(" %*s" % (col, _fmt(get(p, label, key), unit)) for p in peers)
        if better != "info":
            line += "   " + " ".join("%8s" % _fmt(_ratio(mine, get(p, label, key)), "x") for p in peers)
        print(line)
    print("Ratios are pipert / peer: above 1 is better for rates, below 1 for latencies.")
    print("Rates are medians of %s runs; latencies are medians of the runs' percentiles." % (args.runs or common.FULL["runs"]))
    print("pipert, dora-rs and iceoryx2 are lossless here (block wires / backpressure / RetryUntilDelivered);"
          " PipeRT 2 uses its defaults (queues of 1, drop when full).")
    print()
    print("pipert's default wire ('latest', depth 1), small messages, consumer doing nothing else:")
    latest = table["pipert"].get("small-latest", {})
    print("%-*s %*s" % (width, "  messages/s (delivered)", col, _fmt(latest.get("rate"))))
    print("%-*s %*s" % (width, "  latency p50 / p99, paced 1000/s", col + 10,
                        "%s / %s" % (_fmt(latest.get("lat_p50"), "us"), _fmt(latest.get("lat_p99"), "us"))))
    print("%-*s %*s" % (width, "  latency p50 at full load", col, _fmt(latest.get("load_p50"), "us")))
    print("%-*s %*s" % (width, "  dropped at full load (by design)", col, _fmt(latest.get("loss_pct"), "%")))
    print("Fan-out cost (1->1 frames/s / 1->3)")
    print("%-*s %*s %*s" % (width, "  stamped frames", col, _fmt(cost("pipert"), "x"), col, _fmt(cost("pipert2"), "x"))
          + "".join(" %*s" % (col, _fmt(cost(p), "x")) for p in peers[1:]))
    print("%-*s %*s %*s" % (width, "  filled frames", col, _fmt(cost("pipert", "-filled"), "x"), col,
                            _fmt(cost("pipert2", "-filled"), "x")))
    print("numpy.copyto of one 1080p frame: %.0f µs warm (the same buffers), %.0f µs cycling through 8 sources"
          " and 12 targets  ->  1/t = %s or %s frames/s" % (copy_s * 1e6, cycling_s * 1e6, _fmt(copy_fps),
                                                            _fmt(cycling_fps)))
    for label, title in INFO_TITLES.items():
        extra, theirs = ours.get(label) or {}, table["pipert2"].get(label) or {}
        if not extra:
            continue
        print(title)
        print("%-*s %*s %*s %10s" % (width, "  frames/s (delivered)", col, _fmt(extra.get("rate")), col,
                                      _fmt(theirs.get("rate")) if theirs else "",
                                      _fmt(_ratio(extra.get("rate"), theirs.get("rate")), "x") if theirs else ""))
        if label == "frame-own":
            print("%-*s %*s" % (width, "  as share of 1/t (cycling)", col,
                                _fmt(100 * extra["rate"] / cycling_fps if extra.get("rate") else None, "%")))
            print("%-*s %*s" % (width, "  as share of 1/t (warm)", col,
                                _fmt(100 * extra["rate"] / copy_fps if extra.get("rate") else None, "%")))
        print("%-*s %*s" % (width, "  latency p50 / p99, paced 30/s", col + 10,
                            "%s / %s" % (_fmt(extra.get("lat_p50"), "us"), _fmt(extra.get("lat_p99"), "us"))))
        print("%-*s %*s" % (width, "  lost at full load", col, _fmt(extra.get("loss_pct"), "%")))
    if idle is not None:
        print("Idle CPU, pipert pipeline of 4 flows paced at 30 fps (1080p frames): %.2f %% of one core" % idle)

    frames_gap = _ratio(get("pipert", "frame", "rate"), get("iceoryx2", "frame", "rate"))
    targets = [
        ("default wire >= 100,000 small msg/s", latest.get("rate"), lambda v: v >= 100000, ""),
        ("small msgs/s >= iceoryx2", _ratio(get("pipert", "small", "rate"), get("iceoryx2", "small", "rate")),
         lambda v: v >= 1, "x"),
        ("paced small p50 <= iceoryx2", _ratio(get("pipert", "small", "lat_p50"), get("iceoryx2", "small", "lat_p50")),
         lambda v: v <= 1, "x"),
        ("paced small p99 <= iceoryx2", _ratio(get("pipert", "small", "lat_p99"), get("iceoryx2", "small", "lat_p99")),
         lambda v: v <= 1, "x"),
        ("paced frames p50 <= iceoryx2", _ratio(get("pipert", "frame", "lat_p50"), get("iceoryx2", "frame", "lat_p50")),
         lambda v: v <= 1, "x"),
        ("paced frames p99 <= iceoryx2", _ratio(get("pipert", "frame", "lat_p99"), get("iceoryx2", "frame", "lat_p99")),
         lambda v: v <= 1, "x"),
        ("paced frames p50 <= 200 µs", get("pipert", "frame", "lat_p50"), lambda v: v <= 200, "us"),
        ("paced frames p99 <= 400 µs", get("pipert", "frame", "lat_p99"), lambda v: v <= 400, "us"),
        ("stamped frames >= 50,000/s", get("pipert", "frame", "rate"), lambda v: v >= 50000, ""),
        ("plain-array frames >= 90 % of 1/t (cycling)", 100 * get("pipert", "frame-own", "rate") / cycling_fps
         if get("pipert", "frame-own", "rate") else None, lambda v: v >= 90, "%"),
        ("idle < 1 % (the bar for a spin; none)", idle, lambda v: v < 1, "%"),
    ]
    for label, key, unit, better in (("small", "rate", "", "higher"), ("small", "lat_p50", "us", "lower"),
                                     ("small", "lat_p99", "us", "lower"), ("frame", "rate", "", "higher"),
                                     ("frame", "lat_p50", "us", "lower"), ("frame", "lat_p99", "us", "lower"),
                                     ("fanout", "rate", "", "higher")):
        ratio = _ratio(get("pipert", label, key), get("dora", label, key))
        targets.append(("ahead of dora-rs: %s %s" % (label, key), ratio,
                        (lambda v: v > 1) if better == "higher" else (lambda v: v < 1), "x"))
    print()
    print("Targets")
    lines = []
    for title, value, ok, unit in targets:
        verdict = "—" if value is None else ("PASS" if ok(value) else "MISS")
        line = "  %-4s  %-38s %s" % (verdict, title, _fmt(value, unit))
        lines.append(line)
        print(line)
    print("  frames/s gap to iceoryx2 (pipert / iceoryx2): %s" % _fmt(frames_gap, "x"))
    return lines


def measure_idle_cpu(args):
    """% of one core used by a paced 30 fps pipeline of 4 flows (bench/idle_cpu.py), or None."""
    command = [sys.executable, os.path.join(HERE, "idle_cpu.py")] + (["--seconds", "3"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=180)
    for line in done.stdout.splitlines():
        if line.startswith("IDLE_CPU "):
            return float(line.split()[1])
    log("idle CPU measurement failed:\n%s" % done.stderr[-2000:])
    return None


def main():
    parser = argparse.ArgumentParser(description="pipert vs PipeRT 2.4.0, dora-rs and iceoryx2 benchmark")
    parser.add_argument("--quick", action="store_true", help="short smoke run (~3 min)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per scenario")
    parser.add_argument("--run", type=float, help="seconds per measured run")
    parser.add_argument("--runs", type=int, help="measured runs per scenario")
    parser.add_argument("--only", choices=IMPLS, action="append", help="run these implementations only")
    parser.add_argument("--json", help="also write every raw result to this file")
    args = parser.parse_args()

    info = machine()
    print("Machine: %s, %d cores (%d usable), Python %s, numpy %s, Linux %s"
          % (info["cpu"], info["cores"], info["usable_cores"], info["python"], info["numpy"], info["kernel"]))
    print("Mode: %s" % ("quick smoke run (not for figures)" if args.quick else "full"))
    load_start = os.getloadavg()[0]
    sys.stdout.flush()

    failures, warnings, results = [], [], {}
    wanted = args.only or IMPLS
    usable = {"pipert"} | {impl for impl in PEERS if impl in wanted and ensure_venv(impl)}
    failures += ["%s venv could not be set up" % PEERS[impl][0] for impl in PEERS if impl in wanted and impl not in usable]
    copy_times = common.measure_copyto()
    idle = measure_idle_cpu(args) if "pipert" in wanted else None

    for label, impl, scenario, extra in RUNS:
        if impl not in wanted or impl not in usable:
            continue
        start, busy, ours = time.perf_counter(), _cpu_busy_s(), _children_cpu_s()
        log("running %-8s %-13s ..." % (impl, label))
        result, error = run_scenario(impl, label, scenario, extra, args)
        wall = time.perf_counter() - start
        other = (_cpu_busy_s() - busy) - (_children_cpu_s() - ours)
        log("          %-8s %-13s %.0f s" % (impl, label, wall))
        if other / wall > 0.25:
            warnings.append("%s %s: other processes used %.0f %% of a core meanwhile: figures are noisy"
                            % (impl, label, 100 * other / wall))
        results[(impl, label)] = result
        if error:
            failures.append("%s %s crashed: %s" % (impl, label, error))
            continue
        problems = integrity(result, impl)
        if problems and impl == "pipert":
            failures += ["%s %s integrity: %s" % (impl, label, p) for p in problems]
        elif problems:
            warnings += ["%s %s integrity (baseline): %s" % (impl, label, p) for p in problems]
        shutdown = result["driver"].get("shutdown")
        if shutdown != "clean":
            warnings.append("%s %s: shutdown %s" % (impl, label, shutdown))
        if result.get("shm_leftovers"):
            warnings.append("%s %s: %d /dev/shm objects left after join, e.g. %s"
                            % (impl, label, len(result["shm_leftovers"]), result["shm_leftovers"][:3]))

    report(results, copy_times, idle, args)
    if load_start > 0.5:
        warnings.append("load average was %.2f before the bench started: figures may be noisy" % load_start)
    if warnings:
        print()
        print("Warnings")
        for text in warnings:
            print("  " + text)
    if failures:
        print()
        print("FAILURES")
        for text in failures:
            print("  " + text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "copyto_s": copy_times, "idle_cpu_pct": idle,
                       "results": {"%s/%s" % key: value for key, value in results.items()}}, handle, indent=1)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
