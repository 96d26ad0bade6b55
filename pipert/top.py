"""``pipert top``: the dashboard's routine, wire and flow tables in a terminal, refreshed in place.

It reads the daemon's HTTP API (``/status`` every ``interval`` seconds, ``/pipe/structure`` when
the pipe changes), so it works wherever the dashboard does, with the same token. ``q`` quits.
A daemon that is down or restarting is shown as such and polled again; ``top`` never exits on
its own. Without a terminal (``--once``, or output to a pipe) it prints the tables once.
"""
from __future__ import annotations

import curses
import json
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

_TIMEOUT = 5.0  # seconds one request may take


class TopError(Exception):
    """The daemon cannot be read; the message says why and what to do."""


def read(url: str, path: str, token: Optional[str]) -> Dict[str, Any]:
    """GET ``url + path`` as JSON, with the token if there is one."""
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        hint = ": pass --token or set PIPERT_TOKEN" if exc.code == 401 else ""
        raise TopError(f"{url} answered {exc.code}: {message}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TopError(f"cannot reach the daemon at {url} ({reason}); is `pipert run ... --api` running there?") \
            from None


def _number(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _latency(latency: Optional[Dict[str, float]]) -> str:
    if not latency:
        return "-"
    return f"{latency['p50'] * 1000:.1f}/{latency['p99'] * 1000:.1f}"


def _node(node: Any) -> Optional[str]:
    if node is None:
        return None
    if isinstance(node, dict):
        return str(node.get("host") or node.get("hostname") or node.get("name") or node.get("id") or node)
    return str(node)


def _table(header: Tuple[str, ...], rows: List[Tuple[str, ...]], numeric: Tuple[int, ...] = ()) -> List[str]:
    """Aligned columns; those in ``numeric`` to the right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(cell.rjust(width) if index in numeric else cell.ljust(width)
                      for index, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in [header, *rows]]


def render(structure: Dict[str, Any], status: Dict[str, Any]) -> List[str]:
    """The tables of one snapshot, as lines of text."""
    routines = [(name, r["flow"], r["state"], _number(r.get("fps")), _number(r.get("capacity")),
                 str(r["messages_in"]), str(r["messages_out"]), _latency(r.get("latency")), r.get("error") or "")
                for name, r in status["routines"].items()]
    lines = _table(("ROUTINE", "FLOW", "STATE", "FPS", "CAPACITY", "IN", "OUT", "LATENCY ms p50/p99", "LAST ERROR"),
                   routines, (3, 4, 5, 6, 7))
    policies = {(w["source"], w["destination"]): f"{w['policy']}/{w['depth']}" for w in structure.get("Wires", [])}
    wires = [(f"{w['source']} -> {w['destination']}", policies.get((w["source"], w["destination"]), "?"),
              str(w["depth"]), str(w["dropped"])) for w in status["wires"]]
    lines += [""] + _table(("WIRE", "POLICY/DEPTH", "QUEUED", "DROPPED"), wires, (2, 3))
    flows = [(name, str(f["pid"]), "alive" if f["alive"] else "ended", str(f["restarts"]), _node(f.get("node")) or "")
             for name, f in status["flows"].items()]
    lines += [""] + _table(("FLOW", "PID", "PROCESS", "RESTARTS", "NODE"), flows, (1, 3))
    return lines


class _Watcher:
    """Polls one daemon; remembers the structure of the pipe it last saw."""

    def __init__(self, url: str, token: Optional[str]) -> None:
        self.url = url
        self.token = token
        self._structure: Dict[str, Any] = {}
        self._pipe: Optional[str] = None
        self.reached = False  # whether the last poll read the daemon

    def lines(self) -> List[str]:
        try:
            status = read(self.url, "/status", self.token)
            if status.get("pipe") != self._pipe:
                self._structure = read(self.url, "/pipe/structure", self.token)
                self._pipe = status.get("pipe")
        except TopError as exc:
            self.reached = False
            return [str(exc), "", "retrying; q quits"]
        self.reached = True
        return [f"pipe {self._pipe}"] + render(self._structure, status)


def _loop(screen: Any, watcher: _Watcher, interval: float) -> None:
    curses.curs_set(0)
    screen.timeout(int(interval * 1000))
    while True:
        lines = watcher.lines()
        height, width = screen.getmaxyx()
        screen.erase()
        head = f"pipert top  {watcher.url}  {time.strftime('%H:%M:%S')}  (q quits)"
        for row, line in enumerate([head, ""] + lines):
            if row >= height:
                break
            screen.addnstr(row, 0, line, width - 1, curses.A_BOLD if row == 0 else curses.A_NORMAL)
        screen.refresh()
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return


def run_top(url: str, token: Optional[str], interval: float = 1.0, once: bool = False) -> int:
    """Show the daemon at ``url`` until ``q`` (or print it once); the exit code."""
    watcher = _Watcher(url.rstrip("/"), token)
    if once:
        lines = watcher.lines()
        print("\n".join(lines))
        return 0 if watcher.reached else 1
    try:
        curses.wrapper(_loop, watcher, interval)
    except KeyboardInterrupt:
        pass
    return 0
