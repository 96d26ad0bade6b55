"""Writing what the pipeline found as JSON lines."""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np

from ..params import Param
from ..registry import register
from ._stream import FrameSink


def _plain(value: Any) -> Any:
    """A numpy number as a Python one (JSON knows no numpy types); anything else as its text."""
    return value.item() if isinstance(value, np.generic) else str(value)


@register("jsonl-writer")
class JsonlWriter(FrameSink):
    """Writes one JSON line per message to ``path`` (creating the folder): its ``fields`` (default:
    every field but arrays such as the frame, e.g. ``frame_number``, ``timestamp``, ``source``,
    ``boxes``, ``objects``) and ``latency_ms``, the message's age on arrival. Each line is
    flushed as it is written, so the file can be followed while the pipe runs."""

    path = Param(str, help="the JSON-lines file to write, e.g. out/detections.jsonl")
    fields = Param(list, default=[], help="the message fields to write (empty: every field that is not an array)")
    append = Param(bool, default=False, help="add to the file instead of replacing it")

    def setup(self) -> None:
        super().setup()
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.file = open(self.path, "a" if self.append else "w", buffering=1)

    def params_changed(self, changed: Dict[str, Any]) -> None:
        if {"path", "append"} & set(changed):
            raise ValueError("path and append are fixed once the file is open: set them before start")

    def write(self, data: Dict[str, Any]) -> None:
        keys = self.fields or [key for key, value in data.items() if not isinstance(value, np.ndarray)]
        record = {key: data[key] for key in keys if key in data}
        if self.latencies and "timestamp" in data:
            record["latency_ms"] = round(1e3 * self.latencies[-1], 2)
        self.file.write(json.dumps(record, default=_plain) + "\n")

    def close(self) -> None:
        self.file.close()
