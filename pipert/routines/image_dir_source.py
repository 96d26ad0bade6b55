"""Frames from the images of a folder, in name order."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import cv2

from ..params import Param
from ..registry import register
from ._stream import END, FrameSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@register("image-dir-source")
class ImageDirSource(FrameSource):
    """Plays the images of ``path`` (``.png``, ``.jpg``, ... in name order) as frames, once or in
    a loop. The folder is listed at start. Messages carry ``image`` (the file's name)."""

    path = Param(str, help="the folder of images")
    loop = Param(bool, default=False, help="start again with the first image after the last")
    fps = Param(float, default=None, min=0, help="images a second (none or 0: as fast as they decode)")

    def setup(self) -> None:
        super().setup()
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"image-dir-source '{self.name}': there is no folder "
                                    f"{os.path.abspath(self.path)}: check the path")
        self.images: List[str] = sorted(name for name in os.listdir(self.path)
                                        if name.lower().endswith(IMAGE_SUFFIXES))
        if not self.images:
            self.logger.warning("folder %s holds no images (%s): the stream ends at once", self.path,
                                ", ".join(IMAGE_SUFFIXES))
        self.index = 0
        self.set_const_fps(self.fps)

    def params_changed(self, changed: Dict[str, Any]) -> None:
        if "path" in changed:
            raise ValueError("path is fixed once the folder is listed: set it before start")
        self.set_const_fps(self.fps)

    def produce(self) -> Any:
        for _ in self.images:  # at most one round: a folder whose images all fail to read ends the stream
            if self.index == len(self.images):
                if not self.loop:
                    return END
                self.index = 0
            name = self.images[self.index]
            self.index += 1
            frame = cv2.imread(os.path.join(self.path, name), cv2.IMREAD_UNCHANGED)
            if frame is not None:
                return {"frame": frame, "image": name}
            self.logger.warning("cannot read image %s: skipping it", os.path.join(self.path, name))
        return END
