"""Tracking: stable ids for the boxes a detector finds, frame after frame."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

from ..params import Param
from ..registry import register
from ..routine import MiddleRoutine
from ._stream import is_end


def _centre(box: Sequence[float]) -> Tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


@register("tracker")
class Tracker(MiddleRoutine):
    """Gives the message's ``boxes`` stable ids: each track takes the nearest free box whose centre
    is within ``reach`` times the track's larger side; a track lives ``max_missed`` frames without
    a box. Adds ``objects`` ([{"id", "box"}]) to the message."""

    max_missed = Param(int, default=10, min=0, help="frames a track survives without a matching box")
    reach = Param(float, default=1.0, min=0,
                  help="how far a box's centre may be from its track's, in the track's larger side")

    def setup(self) -> None:
        self.tracks: Dict[int, Dict[str, Any]] = {}  # id -> {"box", "missed"}
        self.next_id = 1

    def track(self, boxes: List[List[int]]) -> List[Dict[str, Any]]:
        """The ``boxes`` of one frame with their track ids, and the tracks updated."""
        pairs = sorted((math.dist(_centre(box), _centre(track["box"])), track_id, index)
                       for track_id, track in self.tracks.items() for index, box in enumerate(boxes))
        ids: Dict[int, int] = {}  # box index -> track id
        taken = set()
        for distance, track_id, index in pairs:
            if distance <= self.reach * max(self.tracks[track_id]["box"][2:]) and index not in ids \
                    and track_id not in taken:
                ids[index] = track_id
                taken.add(track_id)
        for index in range(len(boxes)):
            if index not in ids:
                ids[index] = self.next_id
                self.next_id += 1
        for track_id, track in list(self.tracks.items()):
            track["missed"] += 1
            if track["missed"] > self.max_missed:
                del self.tracks[track_id]
        for index, track_id in ids.items():
            self.tracks[track_id] = {"box": boxes[index], "missed": 0}
        return [{"id": ids[index], "box": box} for index, box in enumerate(boxes)]

    def main_logic(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if is_end(data):
            return data
        return dict(data, objects=self.track(data.get("boxes", [])))
