"""Resizing frames."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import cv2

from ..params import Param
from ..registry import register
from ..routine import MiddleRoutine
from ._stream import is_end

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}


@register("resize")
class Resize(MiddleRoutine):
    """Resizes ``frame`` to ``width`` x ``height``; with only one of them set, the other follows the
    frame's aspect ratio. The result is drawn into shared memory, so it crosses to another flow
    with no copy. Boxes in the message are not rescaled: resize before detecting."""

    width = Param(int, default=0, min=0, help="width in pixels (0: from height and the aspect ratio)")
    height = Param(int, default=0, min=0, help="height in pixels (0: from width and the aspect ratio)")
    interpolation = Param(str, default="area", choices=tuple(INTERPOLATIONS),
                          help="area (best to shrink), linear, cubic (best to enlarge) or nearest")

    def setup(self) -> None:
        if not self.width and not self.height:
            raise ValueError(f"resize '{self.name}': set width, height or both")

    def params_changed(self, changed: Dict[str, Any]) -> None:
        self.setup()

    def size(self, shape: Tuple[int, ...]) -> Tuple[int, int]:
        """The (width, height) a frame of ``shape`` becomes."""
        height, width = shape[:2]
        return (self.width or max(1, round(width * self.height / height)),
                self.height or max(1, round(height * self.width / width)))

    def main_logic(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if is_end(data):
            return data
        frame = data["frame"]
        width, height = self.size(frame.shape)
        resized = self.shared_array((height, width) + frame.shape[2:], frame.dtype)
        cv2.resize(frame, (width, height), dst=resized, interpolation=INTERPOLATIONS[self.interpolation])
        return dict(data, frame=resized)
