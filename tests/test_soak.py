"""A short soak: 4 flows move 1080p frames while a flow is SIGKILLed every few seconds.

The full run is ``make soak`` (10 minutes, a kill every 30 s); see bench/soak.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import soak  # noqa: E402


def test_short_soak_keeps_memory_fds_and_segments_flat_and_every_flow_working():
    result = soak.soak(seconds=24.0, kill_every=5.0, warmup=8.0, interval=4.0)
    checks = result["checks"]
    assert result["kills"] >= 4
    assert checks["rss_ok"], checks
    assert checks["fds_ok"] and checks["segments_ok"] and checks["segments_after_join"] == 0, checks
    assert not checks["stalled"], checks
    last = result["samples"][-1]
    assert last["alive"] == 4 and last["restarts"] == result["kills"]
