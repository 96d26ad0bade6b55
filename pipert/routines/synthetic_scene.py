"""The synthetic demo scene: shapes that drive in and bounce over a noisy background, with ground truth.

It lets the video-analytics demo (and tests) run without a camera: the source
knows where it drew every shape, so detections can be checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

from ..params import Param
from ..registry import register
from ._stream import FrameSource

Box = List[int]  # [x, y, w, h] in full-frame pixels


@dataclass
class _Shape:
    circle: bool
    width: int
    height: int
    x: float
    y: float
    vx: float
    vy: float
    top: float  # the vertical band the shape bounces in
    bottom: float
    colour: Tuple[int, int, int]
    entered: bool = False  # shapes drive in from a side, then bounce off the edges


class SyntheticScene:
    """Shapes that drive in from the sides and bounce over a textured, noisy background, one per
    horizontal band (so they never overlap and each is a separate object to find). The scene
    starts empty, as a fixed camera would, so the background model learns the background alone.
    Sizes and speeds scale with the frame."""

    COLOURS = ((40, 40, 230), (40, 200, 40), (230, 120, 30), (30, 220, 230), (200, 40, 200))
    NOISE_FRAMES = 8  # background noise cycles through this many precomputed frames

    def __init__(self, width: int, height: int, seed: int = 7) -> None:
        self.width, self.height = width, height
        rng = np.random.default_rng(seed)
        band = height / len(self.COLOURS)
        self.shapes = []
        for i, colour in enumerate(self.COLOURS):
            size = band * rng.uniform(0.35, 0.6)
            circle = i % 2 == 1
            w = int(size) if circle else int(size * rng.uniform(1.0, 1.5))
            h = int(size)
            vx = width * rng.uniform(0.004, 0.012) * rng.choice((-1, 1))
            start = -w - vx if vx > 0 else width - vx  # out of view in the first frame
            self.shapes.append(_Shape(circle, w, h, start, i * band + (band - h) / 2, vx,
                                      band * rng.uniform(0.01, 0.04), i * band, (i + 1) * band, colour))
        self.backgrounds = self._backgrounds(rng)
        self.n = 0

    def _backgrounds(self, rng: np.random.Generator) -> List[np.ndarray]:
        """A vertical grey gradient with a few fixed blocks, plus Gaussian noise (sigma 4)."""
        ramp = np.linspace(60, 140, self.height, dtype=np.float32)[:, None, None]
        base = np.repeat(np.repeat(ramp, self.width, axis=1), 3, axis=2)
        for _ in range(6):
            x, y = int(rng.uniform(0, self.width * 0.9)), int(rng.uniform(0, self.height * 0.9))
            grey = float(rng.uniform(30, 200))
            cv2.rectangle(base, (x, y), (x + self.width // 10, y + self.height // 12), (grey, grey, grey), -1)
        noise = np.empty(base.shape, np.float32)
        frames = []
        for _ in range(self.NOISE_FRAMES):
            cv2.randn(noise, 0.0, 4.0)
            frames.append(np.clip(base + noise, 0, 255).astype(np.uint8))
        return frames

    def render(self, frame: np.ndarray) -> List[Box]:
        """Draw the next frame into ``frame`` (height x width x 3, uint8); the boxes of the shapes
        at least half in view, clipped to the frame."""
        np.copyto(frame, self.backgrounds[self.n % self.NOISE_FRAMES])
        self.n += 1
        truth = []
        for s in self.shapes:
            s.x += s.vx
            s.y += s.vy
            s.entered = s.entered or 0 <= s.x <= self.width - s.width
            if s.entered and not 0 <= s.x <= self.width - s.width:
                s.vx = -s.vx
                s.x = min(max(s.x, 0), self.width - s.width)
            if not s.top <= s.y <= s.bottom - s.height:
                s.vy = -s.vy
                s.y = min(max(s.y, s.top), s.bottom - s.height)
            x, y = int(s.x), int(s.y)
            if s.circle:
                radius = s.width // 2
                cv2.circle(frame, (x + radius, y + radius), radius, s.colour, -1)
            else:
                cv2.rectangle(frame, (x, y), (x + s.width - 1, y + s.height - 1), s.colour, -1)
            left, right = max(x, 0), min(x + s.width, self.width)
            if 2 * (right - left) >= s.width:
                truth.append([left, y, right - left, s.height])
        return truth


@register("synthetic-scene")
class SyntheticSceneSource(FrameSource):
    """Plays a synthetic scene (see ``SyntheticScene``) at ``fps``, drawn straight into shared memory.

    Messages carry ``truth``: the boxes of the shapes at least half in view.
    """

    width = Param(int, default=1280, min=160, help="frame width, in pixels")
    height = Param(int, default=720, min=120, help="frame height, in pixels")
    fps = Param(float, default=30.0, min=0, help="frames a second (0: as fast as it can draw)")
    seed = Param(int, default=7, help="the scene's random seed: the same seed draws the same scene")

    def setup(self) -> None:
        super().setup()
        self.scene = SyntheticScene(self.width, self.height, self.seed)
        self.set_const_fps(self.fps)

    def params_changed(self, changed: Dict[str, Any]) -> None:
        if {"width", "height", "seed"} & set(changed):
            raise ValueError("width, height and seed are fixed once the scene is drawn: set them before start")
        self.set_const_fps(self.fps)

    def produce(self) -> Dict[str, Any]:
        frame = self.shared_array((self.height, self.width, 3))
        return {"frame": frame, "truth": self.scene.render(frame)}
