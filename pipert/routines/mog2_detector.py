"""Moving-object detection by MOG2 background subtraction."""
from __future__ import annotations

from typing import Any, Dict

import cv2

from ..events import events
from ..params import Param
from ..registry import register
from ..routine import MiddleRoutine
from ._stream import is_end


@register("mog2-detector")
class Mog2Detector(MiddleRoutine):
    """Finds moving objects: MOG2 background subtraction on the frame shrunk to about
    ``detection_width`` pixels wide, an opening (drops noise) and a closing (fills holes), then
    the outer contours of at least ``min_area`` full-frame pixels. Adds ``boxes`` ([x, y, w, h],
    full-frame pixels) to the message. For a fixed camera: the model learns the background.

    The event ``SET_MIN_AREA`` (``{"min_area": 800}``) changes ``min_area`` as ``set_params`` does.
    """

    min_area = Param(int, default=300, min=0, help="smallest object, in full-frame pixels")
    history = Param(int, default=500, min=1,
                    help="frames the background model remembers; it learns at the fixed rate 1/history, so "
                         "objects in view at the start are not taken for background")
    var_threshold = Param(float, default=25.0, min=0,
                          help="squared distance from the model above which a pixel is foreground")
    detection_width = Param(int, default=640, min=0, help="detect on frames shrunk to about this width (0: full size)")
    kernel = Param(int, default=5, min=1, help="size of the morphology kernel, in detection pixels")

    def setup(self) -> None:
        self.subtractor = cv2.createBackgroundSubtractorMOG2(history=self.history, varThreshold=self.var_threshold,
                                                             detectShadows=False)
        self.element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (self.kernel, self.kernel))
        self.model_started = False

    def params_changed(self, changed: Dict[str, Any]) -> None:
        if {"history", "var_threshold", "kernel"} & set(changed):
            self.setup()  # a new model: it learns the background again

    def main_logic(self, data: Dict[str, Any]) -> Dict[str, Any]:
        if is_end(data):
            return data
        frame = data["frame"]
        scale = max(1, round(frame.shape[1] / self.detection_width)) if self.detection_width else 1
        small = frame if scale == 1 else cv2.resize(frame, (frame.shape[1] // scale, frame.shape[0] // scale),
                                                    interpolation=cv2.INTER_AREA)
        mask = self.subtractor.apply(small, learningRate=1.0 / self.history)
        if not self.model_started:  # MOG2 marks all of its first frame as foreground: it only starts the model
            self.model_started = True
            return dict(data, boxes=[])
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self.element)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, self.element)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = [[v * scale for v in cv2.boundingRect(c)] for c in contours
                 if cv2.contourArea(c) * scale * scale >= self.min_area]
        return dict(data, boxes=boxes)

    @events("SET_MIN_AREA")
    def set_min_area(self, min_area: int) -> None:
        """Ignore objects smaller than ``min_area`` pixels from now on."""
        old = self.min_area
        self.min_area = min_area  # converted and checked by the parameter: a bad value is refused
        self.logger.info("min_area %d -> %d", old, self.min_area)
