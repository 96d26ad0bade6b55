"""Frames for the cockpit's frame view: find an image in routine data, JPEG it, rate-limit it.

The cockpit shows a routine's input and output frames when it receives ``log``
records whose message is ``input: , 'data': {'image_base64': '<b64 jpeg>'}``
(or ``output: ...``). This module builds those messages; the routine runtime
decides when to send them (see :class:`FrameSampler`).

Colour images are taken to be in OpenCV's BGR(A) order, like every frame that
comes from ``cv2``.
"""
from __future__ import annotations

import base64
import logging
import time
from typing import Any, Callable, Tuple

import cv2
import numpy as np

FRAME_DIRECTIONS = ("input", "output")
"""The two frame views of a routine in the cockpit."""


def _is_image(value: Any) -> bool:
    """Whether ``value`` is a non-empty integer, float or bool array shaped (H, W) or
    (H, W, 1|3|4)."""
    if not isinstance(value, np.ndarray) or value.size == 0:
        return False
    kind = value.dtype
    if not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating) or kind == np.bool_):
        return False
    return value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3, 4))


def _find(data: Any, depth: int) -> np.ndarray | None:
    if isinstance(data, np.ndarray):
        return data if _is_image(data) else None
    if isinstance(data, dict):
        if depth == 0:
            return None
        for value in data.values():
            frame = _find(value, depth - 1)
            if frame is not None:
                return frame
        return None
    get_frame = getattr(data, "get_frame", None)
    if callable(get_frame):
        frame = get_frame()
        return frame if _is_image(frame) else None
    return None


def find_frame(data: Any) -> np.ndarray | None:
    """The image carried by a routine's input or output, or ``None`` if it has none.

    Looks at ``data`` itself if it is an array; otherwise at the values of a
    dict, in order, and at the values of dicts nested one level inside it;
    otherwise at what ``data.get_frame()`` returns. An image is a non-empty
    integer, float or bool array shaped (H, W) or (H, W, 1|3|4). Exceptions raised by a
    ``get_frame()`` method propagate to the caller.
    """
    return _find(data, depth=2)


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    """``frame`` as uint8: bools become 0/255, floats in [0, 1] are scaled by 255,
    uint16 is scaled by 1/257 (full range to full range), anything else is clipped
    to [0, 255]."""
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype == np.bool_:
        return frame.astype(np.uint8) * 255
    if frame.dtype == np.uint16:
        return (frame // 257).astype(np.uint8)
    if np.issubdtype(frame.dtype, np.floating):
        finite = np.nan_to_num(frame, nan=0.0, posinf=255.0, neginf=0.0)
        if finite.min() >= 0.0 and finite.max() <= 1.0:
            finite = finite * 255.0
        return np.clip(np.rint(finite), 0, 255).astype(np.uint8)
    return np.clip(frame, 0, 255).astype(np.uint8)


def encode_jpeg(frame: np.ndarray, quality: int = 70, max_width: int | None = 640) -> bytes:
    """``frame`` as JPEG bytes.

    Frames wider than ``max_width`` are shrunk to that width, keeping the aspect
    ratio; ``None`` keeps the size. ``frame`` is never modified (it may be a
    read-only view of shared memory).
    """
    if not _is_image(frame):
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise ValueError(
            f"encode_frame needs an integer, float or bool array shaped (H, W) or (H, W, 1|3|4); "
            f"got shape {shape}, dtype {dtype}. Pass the frame itself, e.g. find_frame(data)."
        )
    if not 0 <= quality <= 100:
        raise ValueError(f"encode_frame quality must be between 0 and 100, got {quality}.")
    if max_width is not None and max_width < 1:
        raise ValueError(f"encode_frame max_width must be a positive width or None, got {max_width}.")
    image = _to_uint8(frame)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    height, width = image.shape[:2]
    if max_width is not None and width > max_width:
        new_height = max(1, round(height * max_width / width))
        image = cv2.resize(image, (max_width, new_height), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode a frame of shape {frame.shape}.")
    return jpeg.tobytes()


def encode_frame(frame: np.ndarray, quality: int = 70, max_width: int | None = 640) -> str:
    """``frame`` as base64 JPEG text (no ``data:`` prefix), what the cockpit displays.

    Frames wider than ``max_width`` are shrunk to that width (see :func:`encode_jpeg`),
    so that sampled frames stay small on the wire.
    """
    return base64.b64encode(encode_jpeg(frame, quality, max_width)).decode("ascii")


def frame_log_message(direction: str, b64: str) -> str:
    """The ``log`` message that shows ``b64`` (from :func:`encode_frame`) in the
    cockpit's ``direction`` ("input" or "output") view of the sending routine."""
    if direction not in FRAME_DIRECTIONS:
        raise ValueError(f"frame direction must be 'input' or 'output', got {direction!r}.")
    return f"{direction}: , 'data': {{'image_base64': '{b64}'}}"


def parse_frame_message(message: str) -> Tuple[str, str] | None:
    """``(direction, b64)`` of a message made by :func:`frame_log_message`, else ``None``:
    how the daemon tells frames from ordinary log records."""
    for direction in FRAME_DIRECTIONS:
        prefix = f"{direction}: , 'data': {{'image_base64': '"
        if message.startswith(prefix) and message.endswith("'}"):
            return direction, message[len(prefix):-2]
    return None


class FrameFilter(logging.Filter):
    """Keeps frame records (tens of kilobytes of base64 each) out of text logs such as a terminal's;
    the cockpit's and the dashboard's handlers still get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) and not record.args else record.getMessage()
        return parse_frame_message(message) is None


class FrameSampler:
    """Lets through at most ``max_per_second`` frames per second.

    Encoding and shipping every frame would cost a video routine more than its
    own work; the runtime asks :meth:`due` before encoding a frame. Consecutive
    ``True`` answers are at least ``1 / max_per_second`` seconds apart.
    """

    def __init__(self, max_per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not max_per_second > 0:
            raise ValueError(f"FrameSampler max_per_second must be positive, got {max_per_second}.")
        self._interval = 1.0 / max_per_second
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        """Whether a frame may be sent now; a ``True`` answer counts as a sent frame."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        return True
