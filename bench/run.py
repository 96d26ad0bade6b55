"""`make bench`: our pipert against PipeRT 2.4.0, same scenarios, one table.

PipeRT 2.4.0 (PyPI ``PipeRT``, imported as ``pipert2``) lives in its own venv,
bench/.venv-pipert2, created here when missing. Each scenario runs as its own
subprocess: bench/pipert2_scenarios.py with that venv's interpreter and
bench/pipert_scenarios.py with this one; both print one ``BENCH_RESULT`` JSON
line. Scenarios:
  small   a dict {counter, ts, tag} from a source flow to a destination flow
  frame   a 1080x1920x3 uint8 frame (PipeRT: SharedMemoryTransmitter); the
          source fills each frame (one copy of a prepared image) like a
          camera would, into a plain array (PipeRT) or into
          Routine.shared_array (pipert, sent without a copy)
  fanout  the same frame to 3 destination flows
  copyto  numpy.copyto of one frame (the memory-bandwidth bound), measured here
Each scenario: warm-up, 3 throughput runs of 5 s at full speed, then (small
and frame) 3 latency runs of 5 s paced at 1000 msg/s or 30 frames/s, so that
latency is transit time through an idle pipeline. Figures are medians of the
3 runs. ``--quick`` shortens everything for a smoke run.

Exit status: 0 when everything ran and arrived intact, even if targets are
missed (it is a report); 1 on a crash, a missing result, or an integrity
failure on our side (counter not increasing, frame stamp or checksum wrong,
or a message lost on a lossless "block" wire). PipeRT 2's own integrity
errors are printed as warnings: it is the baseline, not the product.
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

PIPERT2_VENV = os.path.join(HERE, ".venv-pipert2")
PIPERT2_PYTHON = os.path.join(PIPERT2_VENV, "bin", "python")
PIPERT2_REQUIREMENT = "PipeRT[shared_memory]==2.4.0"
LOG_DIR = os.path.join(HERE, "out")

# (label, implementation, scenario, extra arguments, counts for targets)
RUNS = [
    ("small", "pipert2", "small", [], True),
    ("frame", "pipert2", "frame", [], True),
    ("fanout", "pipert2", "fanout", [], True),
    ("small", "pipert", "small", [], True),
    ("frame", "pipert", "frame", [], True),
    ("fanout", "pipert", "fanout", [], True),
    ("frame-filled", "pipert2", "frame", ["--fill", "full"], False),
    ("frame-filled", "pipert", "frame", ["--fill", "full"], False),
    ("fanout-filled", "pipert2", "fanout", ["--fill", "full"], False),
    ("fanout-filled", "pipert", "fanout", ["--fill", "full"], False),
    ("frame-own", "pipert", "frame", ["--fill", "full", "--frame-buffer", "own"], False),
    ("frame-latest", "pipert", "frame", ["--policy", "latest", "--depth", "1"], False),
]
INFO_TITLES = {
    "frame-filled": "frames the source fills with a full image first (one copyto per frame on both):",
    "fanout-filled": "the same, fanned out to 3 destinations (frames/s per destination):",
    "frame-own": "pipert, frames filled into a plain array (copied on send, as PipeRT 2 does):",
    "frame-latest": "pipert, frames on a 'latest' wire of depth 1:",
}


def log(text):
    """Progress line on stderr (the table goes to stdout)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def ensure_pipert2_venv():
    """Create bench/.venv-pipert2 with PipeRT 2.4.0 if it is missing; True if usable."""
    check = [PIPERT2_PYTHON, "-c",
             "import pipert2, posix_ipc, numpy; assert pipert2.__version__ == '2.4.0', pipert2.__version__"]
    if os.path.exists(PIPERT2_PYTHON) and subprocess.run(check, capture_output=True).returncode == 0:
        return True
    log("creating %s with %s ..." % (os.path.relpath(PIPERT2_VENV, ROOT), PIPERT2_REQUIREMENT))
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", PIPERT2_VENV],
        [PIPERT2_PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         PIPERT2_REQUIREMENT, "numpy"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            log("failed: %s\n%s" % (" ".join(step), done.stderr[-2000:]))
            return False
    return subprocess.run(check, capture_output=True).returncode == 0


def run_scenario(impl, label, scenario, extra, args):
    """Run one scenario script; return (result dict or None, error text or None)."""
    python = PIPERT2_PYTHON if impl == "pipert2" else sys.executable
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
    if impl == "pipert2":
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


def report(results, copy_s, args):
    """Print the table and the targets; return the list of PASS/MISS lines."""
    ours = {label: figures(results.get(("pipert", label))) for label, impl, *_ in RUNS if impl == "pipert"}
    base = {label: figures(results.get(("pipert2", label))) for label, impl, *_ in RUNS if impl == "pipert2"}
    copy_fps = 1.0 / copy_s

    def get(table, label, key):
        return table.get(label, {}).get(key)

    def cost(table, suffix=""):
        single, fan = get(table, "frame" + suffix, "rate"), get(table, "fanout" + suffix, "rate")
        return single / fan if single and fan else None

    rows = [
        ("Small messages (dict), 1 -> 1", None, None, None, None),
        ("  messages/s (delivered)", "small", "rate", "", "higher"),
        ("  latency p50, paced 1000/s", "small", "lat_p50", "us", "lower"),
        ("  latency p99, paced 1000/s", "small", "lat_p99", "us", "lower"),
        ("  latency p50 at full load", "small", "load_p50", "us", "info"),
        ("  latency p99 at full load", "small", "load_p99", "us", "info"),
        ("  lost at full load", "small", "loss_pct", "%", "info"),
        ("1080p frames, 1 -> 1", None, None, None, None),
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
    width = 36
    print()
    print("%-*s %14s %14s %10s" % (width, "", "pipert", "PipeRT 2.4.0", "ratio"))
    print("-" * (width + 41))
    for title, label, key, unit, better in rows:
        if label is None:
            print(title)
            continue
        mine, theirs = get(ours, label, key), get(base, label, key)
        ratio = _ratio(mine, theirs) if better != "info" else None
        print("%-*s %14s %14s %10s" % (width, title, _fmt(mine, unit), _fmt(theirs, unit), _fmt(ratio, "x")))
    print("Fan-out cost (1->1 frames/s / 1->3)")
    print("%-*s %14s %14s" % (width, "  stamped frames", _fmt(cost(ours), "x"), _fmt(cost(base), "x")))
    print("%-*s %14s %14s" % (width, "  filled frames", _fmt(cost(ours, "-filled"), "x"),
                              _fmt(cost(base, "-filled"), "x")))
    print("  (stamped frames move so fast that 3 receiving processes saturate the 2 cores: the cost is\n"
          "   then CPU time of the receivers, not the transport; filled frames show the transport's share)")
    print("numpy.copyto of one 1080p frame: %.0f µs  ->  1/t = %s frames/s" % (copy_s * 1e6, _fmt(copy_fps)))
    for title, label in (("  1->1 frames/s as share of 1/t", "frame"), ("  1->3 frames/s as share of 1/t", "fanout")):
        mine, theirs = get(ours, label, "rate"), get(base, label, "rate")
        print("%-*s %14s %14s" % (width, title, _fmt(100 * mine / copy_fps if mine else None, "%"),
                                  _fmt(100 * theirs / copy_fps if theirs else None, "%")))
    for label, title in INFO_TITLES.items():
        extra, theirs = ours.get(label) or {}, base.get(label) or {}
        if not extra:
            continue
        print(title)
        print("%-*s %14s %14s %10s" % (width, "  frames/s (delivered)", _fmt(extra.get("rate")),
                                       _fmt(theirs.get("rate")) if theirs else "",
                                       _fmt(_ratio(extra.get("rate"), theirs.get("rate")), "x") if theirs else ""))
        print("%-*s %14s" % (width, "  latency p50 / p99, paced 30/s",
                             "%s / %s" % (_fmt(extra.get("lat_p50"), "us"), _fmt(extra.get("lat_p99"), "us"))))
        print("%-*s %14s" % (width, "  lost at full load", _fmt(extra.get("loss_pct"), "%")))
    print("Ratios are pipert / PipeRT: above 1 is better for rates, below 1 for latencies.")
    print("Rates are medians of %s runs. PipeRT 2 uses its defaults (queues of 1, drop when full);"
          " pipert uses 'block' wires (lossless)." % (args.runs or common.FULL["runs"]))
    print("Sources stamp every frame (counter and a sampled checksum) without redrawing it; the"
          " 'filled' rows add one full copy per frame, bounded by 1/t.")

    small_ratio = _ratio(get(ours, "small", "rate"), get(base, "small", "rate"))
    frame_ratio = _ratio(get(ours, "frame", "rate"), get(base, "frame", "rate"))
    targets = [
        ("small messages >= 15x PipeRT 2", small_ratio, lambda v: v >= 15, "x"),
        ("small messages >= 100,000 msg/s", get(ours, "small", "rate"), lambda v: v >= 100000, ""),
        ("1080p frames >= 20x PipeRT 2", frame_ratio, lambda v: v >= 20, "x"),
        ("latency p50 small < 50 µs", get(ours, "small", "lat_p50"), lambda v: v < 50, "us"),
        ("latency p50 frames < 0.5 ms", get(ours, "frame", "lat_p50"), lambda v: v < 500, "us"),
        ("fan-out to 3 < 1.5x cost of 1 (filled)", cost(ours, "-filled"), lambda v: v < 1.5, "x"),
    ]
    print()
    print("Targets")
    lines = []
    for title, value, ok, unit in targets:
        verdict = "—" if value is None else ("PASS" if ok(value) else "MISS")
        line = "  %-4s  %-34s %s" % (verdict, title, _fmt(value, unit))
        lines.append(line)
        print(line)
    return lines


def main():
    parser = argparse.ArgumentParser(description="pipert vs PipeRT 2.4.0 benchmark")
    parser.add_argument("--quick", action="store_true", help="short smoke run (~1 min)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per scenario")
    parser.add_argument("--run", type=float, help="seconds per measured run")
    parser.add_argument("--runs", type=int, help="measured runs per scenario")
    parser.add_argument("--only", choices=("pipert", "pipert2"), help="run one implementation")
    parser.add_argument("--json", help="also write every raw result to this file")
    args = parser.parse_args()

    info = machine()
    print("Machine: %s, %d cores (%d usable), Python %s, numpy %s, Linux %s"
          % (info["cpu"], info["cores"], info["usable_cores"], info["python"], info["numpy"], info["kernel"]))
    print("Mode: %s" % ("quick smoke run (not for figures)" if args.quick else "full"))
    load_start = os.getloadavg()[0]
    sys.stdout.flush()

    failures, warnings, results = [], [], {}
    have_pipert2 = args.only == "pipert" or ensure_pipert2_venv()
    if not have_pipert2:
        failures.append("PipeRT 2.4.0 venv could not be set up")
    copy_s = common.measure_copyto()

    for label, impl, scenario, extra, _ in RUNS:
        if args.only and impl != args.only:
            continue
        if impl == "pipert2" and not have_pipert2:
            continue
        start, busy, ours = time.perf_counter(), _cpu_busy_s(), _children_cpu_s()
        log("running %-7s %-12s ..." % (impl, label))
        result, error = run_scenario(impl, label, scenario, extra, args)
        wall = time.perf_counter() - start
        other = (_cpu_busy_s() - busy) - (_children_cpu_s() - ours)
        log("          %-7s %-12s %.0f s" % (impl, label, wall))
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
            warnings.append("%s %s: shutdown %s (join took %.1f s)" % (impl, label, shutdown,
                                                                       result["driver"]["join_s"]))
        if result.get("shm_leftovers"):
            warnings.append("%s %s: %d /dev/shm objects left after join, e.g. %s"
                            % (impl, label, len(result["shm_leftovers"]), result["shm_leftovers"][:3]))

    report(results, copy_s, args)
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
            json.dump({"machine": info, "copyto_s": copy_s,
                       "results": {"%s/%s" % key: value for key, value in results.items()}}, handle, indent=1)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
