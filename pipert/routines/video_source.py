"""Frames from a video file, a camera or a network stream, through OpenCV.

A camera or stream that is lost (unplugged, a server that went away, a network
cut) is reopened with backoff; meanwhile the routine's condition in ``status()``
says ``reconnecting ...`` and every attempt is logged. Frames are decoded straight
into ``shared_array`` memory, so a frame crosses to another flow with no copy.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Tuple

import cv2

from ..params import Param
from ..registry import register
from ._stream import END, FrameSource

_POLL = 0.1  # seconds main_logic sleeps at most while it waits to reconnect, so that events get through


@register("video-source")
class VideoSource(FrameSource):
    """Reads ``path``: a video file, a camera index (``0``, ``1``, ...) or an ``rtsp://`` or
    ``http(s)://`` URL. A file ends the stream at its end (or plays again with ``loop``);
    a camera or stream that fails is reconnected with backoff.

    Messages: ``frame``, ``frame_number``, ``timestamp``, ``source`` and, for a file,
    ``position`` (seconds into the video).
    """

    path = Param(str, help="a video file, a camera index (0, 1, ...) or an rtsp:// or http(s):// URL")
    loop = Param(bool, default=False, help="play a file again from its start when it ends")
    fps = Param(float, default=None, min=0,
                help="a file plays at this rate (none: the file's own rate; 0: as fast as it decodes); "
                     "cameras and streams deliver at their own rate")
    timeout = Param(float, default=5.0, min=0.1,
                    help="seconds a stream may take to open or to deliver a frame before it counts as lost")
    reconnect_delay = Param(float, default=0.5, min=0.01,
                            help="seconds before the first attempt to reopen a lost camera or stream; doubled "
                                 "after each failed attempt")
    reconnect_max_delay = Param(float, default=10.0, min=0.01, help="the longest wait between two attempts")

    @property
    def kind(self) -> str:
        """``camera``, ``stream`` or ``file``: how ``path`` is opened and what a failure means."""
        if self.path.strip().isdigit():
            return "camera"
        return "stream" if "://" in self.path else "file"

    def setup(self) -> None:
        super().setup()
        self.capture: Optional[cv2.VideoCapture] = None
        self.shape: Optional[Tuple[int, ...]] = None  # of the last frame: the next one is decoded into one like it
        self.attempts = 0  # failed attempts to reopen since the source was lost
        self.lost_at = 0.0
        self.retry_at = 0.0
        if self.kind == "file" and not os.path.isfile(self.path):
            raise FileNotFoundError(f"video-source '{self.name}': there is no video file {os.path.abspath(self.path)}"
                                    ": check the path, or give a camera index or an rtsp:// or http:// URL")
        if not self._open():
            if self.kind == "file":
                raise RuntimeError(f"video-source '{self.name}': OpenCV cannot read the video file {self.path}: "
                                   "is it a video in a format FFmpeg knows?")
            self._lost("cannot open it")
        self.own_fps = self.capture.get(cv2.CAP_PROP_FPS) if self.kind == "file" else None
        self._pace()

    def params_changed(self, changed: Dict[str, Any]) -> None:
        if "path" in changed:
            raise ValueError("path is fixed once the source is open: set it before start")
        self._pace()

    def _pace(self) -> None:
        """Play a file at ``fps`` (or its own rate); never hold back a live source."""
        rate = None
        if self.kind == "file":
            rate = self.fps if self.fps is not None else self.own_fps
        self.set_const_fps(rate if rate and rate > 0 else None)  # a file without a frame rate: as fast as it decodes

    def _open(self) -> bool:
        """Open ``path``; whether it opened."""
        if self.kind == "camera":
            capture = cv2.VideoCapture(int(self.path))
        elif self.kind == "stream":
            timeout = int(self.timeout * 1000)
            capture = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout,
                                                                   cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout])
        else:
            capture = cv2.VideoCapture(self.path)
        if not capture.isOpened():
            capture.release()
            return False
        self.capture = capture
        return True

    def _close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None

    def _lost(self, why: str) -> None:
        """The camera or stream failed: close it and plan the next attempt."""
        self._close()
        delay = min(self.reconnect_delay * 2 ** self.attempts, self.reconnect_max_delay)
        if self.attempts == 0:
            self.lost_at = time.monotonic()
            self.logger.warning("lost %s %s (%s): reconnecting, first attempt in %.1f s", self.kind, self.path,
                                why, delay)
        else:
            self.logger.warning("reconnecting to %s %s: attempt %d failed (%s); next in %.1f s", self.kind,
                                self.path, self.attempts, why, delay)
        self.set_condition(f"reconnecting to {self.kind} {self.path}: {self.attempts} failed attempts, "
                           f"next in {delay:.1f} s")
        self.retry_at = time.monotonic() + delay

    def _reconnect(self) -> bool:
        """One attempt, once its time has come (sleeping a little at most); whether the source is back."""
        remaining = self.retry_at - time.monotonic()
        if remaining > 0:
            time.sleep(min(remaining, _POLL))
            return False
        self.attempts += 1
        if self._open():
            return True
        self._lost("cannot open it")
        return False

    def _read(self) -> Optional[Any]:
        """The next frame, decoded into a shared array shaped like the last frame; None if there is none."""
        buffer = None if self.shape is None else self.shared_array(self.shape)
        ok, frame = self.capture.read(buffer)
        if not ok or frame is None:
            return None
        self.shape = frame.shape  # a frame of another size came in its own array: the next one fits again
        return frame

    def produce(self) -> Any:
        if self.capture is None and not self._reconnect():
            return None
        frame = self._read()
        if frame is None and self.kind == "file":
            if not self.loop:
                return END
            self._close()
            frame = self._read() if self._open() else None
            if frame is None:  # it cannot be played again (it changed, or has no frames)
                self.logger.warning("video file %s gives no frames from its start: ending the stream", self.path)
                return END
        if frame is None:
            self._lost("no frame")
            return None
        if self.attempts:
            self.logger.info("reconnected to %s %s after %d attempts (%.1f s)", self.kind, self.path,
                             self.attempts, time.monotonic() - self.lost_at)
            self.attempts = 0
            self.set_condition(None)
        message = {"frame": frame}
        if self.kind == "file":
            message["position"] = self.capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        return message

    def cleanup(self) -> None:
        self._close()
