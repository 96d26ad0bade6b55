"""Drawing what the pipeline found onto the frame."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import cv2
import numpy as np

from ..params import Param
from ..registry import register
from ..routine import MiddleRoutine
from ._stream import is_end


@register("annotate")
class Annotate(MiddleRoutine):
    """Draws the message's ``objects`` (box and id; else its ``boxes``) and a line with the frame
    number, the frame rate at this routine and the object count on a copy of ``frame`` (received
    frames are read-only), in shared memory so that it crosses to another flow with no copy."""

    colour = Param(list, default=[255, 255, 255], min=3, max=3, help="BGR colour of boxes and text")
    thickness = Param(int, default=2, min=1, help="line width, in pixels")
    font_scale = Param(float, default=0.6, min=0.1, help="size of the ids; the status line is a third larger")
    status_line = Param(bool, default=True, help="draw 'frame N  F fps  K objects' at the top left")

    def setup(self) -> None:
        self.last: Optional[float] = None
        self.interval: Optional[float] = None  # moving average of the time between frames

    def _fps(self) -> float:
        now = time.perf_counter()
        if self.last is not None:
            between = now - self.last
            self.interval = between if self.interval is None else 0.9 * self.interval + 0.1 * between
        self.last = now
        return 1.0 / self.interval if self.interval else 0.0

    def main_logic(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if is_end(data):
            return data
        fps = self._fps()
        objects: List[Dict[str, Any]] = data.get("objects") or [{"box": box} for box in data.get("boxes", [])]
        frame = self.shared_array(data["frame"].shape, data["frame"].dtype)
        np.copyto(frame, data["frame"])
        colour = tuple(int(c) for c in self.colour)
        font = cv2.FONT_HERSHEY_SIMPLEX
        for found in objects:
            x, y, w, h = (int(v) for v in found["box"])
            cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), colour, self.thickness)
            if "id" in found:
                cv2.putText(frame, str(found["id"]), (x, max(y - 6, 14)), font, self.font_scale, colour,
                            self.thickness)
        if self.status_line:
            text = f"frame {data.get('frame_number', '?')}  {fps:.1f} fps  {len(objects)} objects"
            cv2.putText(frame, text, (10, 28), font, self.font_scale * 4 / 3, colour, self.thickness)
        return dict(data, frame=frame)
