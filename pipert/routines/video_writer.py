"""Writing frames to a video file."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import cv2

from ..params import Param
from ..registry import register
from ._stream import FrameSink


@register("video-writer")
class VideoWriter(FrameSink):
    """Writes each message's ``frame`` to ``path`` (mp4 by default) through OpenCV, creating the
    folder. The file is opened at the first frame, whose size it takes; frames of another size
    are resized to it. At the end of the stream (or at kill) the file is closed."""

    path = Param(str, help="the video file to write, e.g. out/run.mp4")
    fps = Param(float, default=30.0, min=0.1, help="the frame rate written into the file")
    fourcc = Param(str, default="mp4v", min=4, max=4,
                   help="the codec's four letters: mp4v (.mp4), MJPG (.avi), FFV1 (.avi, lossless), ...")

    def setup(self) -> None:
        super().setup()
        self.writer: Optional[cv2.VideoWriter] = None
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)

    def params_changed(self, changed: Dict[str, Any]) -> None:
        if self.writer is not None and set(changed) & {"path", "fps", "fourcc"}:
            raise ValueError("path, fps and fourcc are fixed once the file is open: set them before start")

    def write(self, data: Dict[str, Any]) -> None:
        frame = data["frame"]
        if self.writer is None:
            self.size = (frame.shape[1], frame.shape[0])
            self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*self.fourcc), self.fps, self.size,
                                          frame.ndim == 3)
            if not self.writer.isOpened():
                self.writer = None
                raise RuntimeError(f"video-writer '{self.name}': OpenCV cannot write {self.fourcc} video to "
                                   f"{self.path}: check the folder's permissions and that the codec fits the "
                                   "file's suffix (mp4v for .mp4, MJPG or FFV1 for .avi)")
        if (frame.shape[1], frame.shape[0]) != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
