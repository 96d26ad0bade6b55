"""Frames for the cockpit: finding them in routine data, JPEG round trips, the message, sampling."""
from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest

from pipert.frames import FrameSampler, encode_frame, find_frame, frame_log_message


def decode(b64: str) -> np.ndarray:
    """What the cockpit's browser does with the text: base64, then JPEG."""
    image = cv2.imdecode(np.frombuffer(base64.b64decode(b64, validate=True), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "not a JPEG"
    return image


def test_encode_round_trips_a_colour_frame() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, :320] = (255, 0, 0)  # blue left half (BGR)
    frame[:, 320:] = (0, 0, 255)  # red right half
    b64 = encode_frame(frame)
    assert not b64.startswith("data:")
    decoded = decode(b64)
    assert decoded.shape == (480, 640, 3)
    assert np.abs(decoded[240, 100].astype(int) - (255, 0, 0)).max() < 16
    assert np.abs(decoded[240, 540].astype(int) - (0, 0, 255)).max() < 16


def test_wide_frames_shrink_to_max_width_keeping_the_aspect() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), np.uint8)
    assert decode(encode_frame(frame)).shape == (360, 640, 3)
    assert decode(encode_frame(frame, max_width=100)).shape == (56, 100, 3)
    assert decode(encode_frame(frame, max_width=None)).shape == (720, 1280, 3)
    small = frame[:100, :200]
    assert decode(encode_frame(small)).shape == (100, 200, 3)


def test_quality_changes_the_size() -> None:
    frame = np.random.default_rng(1).integers(0, 256, (240, 320, 3), np.uint8)
    assert len(encode_frame(frame, quality=20)) < len(encode_frame(frame, quality=95))


@pytest.mark.parametrize(
    ("frame", "shape"),
    [
        (np.full((60, 80), 128, np.uint8), (60, 80)),
        (np.full((60, 80, 1), 128, np.uint8), (60, 80)),
        (np.full((60, 80, 4), 128, np.uint8), (60, 80, 3)),
        (np.full((60, 80, 3), 0.5, np.float32), (60, 80, 3)),
        (np.full((60, 80), 32896, np.uint16), (60, 80)),
        (np.ones((60, 80), bool), (60, 80)),
        (np.full((60, 80, 3), 300, np.int64), (60, 80, 3)),
    ],
    ids=["gray", "gray-1-channel", "bgra", "float-0-1", "uint16", "bool", "int-over-255"],
)
def test_other_layouts_and_dtypes_are_converted(frame: np.ndarray, shape: tuple) -> None:
    decoded = decode(encode_frame(frame))
    assert decoded.shape == shape
    expected = {"bool": 255, "int64": 255}.get(frame.dtype.name, 128)
    assert abs(int(decoded.mean()) - expected) <= 2


def test_read_only_shared_memory_views_are_encoded_untouched() -> None:
    frame = np.full((100, 1000, 3), 7, np.uint8)
    frame.setflags(write=False)  # what a receiving routine gets from the transport
    assert decode(encode_frame(frame)).shape == (64, 640, 3)
    assert (frame == 7).all()


@pytest.mark.parametrize(
    "bad", [np.zeros(10, np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8),
            np.array([["a"]]), np.zeros((4, 4), complex), "not an array", None],
    ids=["1-d", "2-channels", "empty", "strings", "complex", "str", "none"])
def test_encode_rejects_what_is_not_an_image(bad: object) -> None:
    with pytest.raises(ValueError, match="encode_frame needs"):
        encode_frame(bad)  # type: ignore[arg-type]


def test_encode_rejects_bad_settings() -> None:
    frame = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="quality"):
        encode_frame(frame, quality=101)
    with pytest.raises(ValueError, match="max_width"):
        encode_frame(frame, max_width=0)


class Message:
    def __init__(self, frame: object) -> None:
        self.frame = frame

    def get_frame(self) -> object:
        return self.frame


def test_find_frame_in_the_places_routines_put_it() -> None:
    image = np.zeros((4, 6, 3), np.uint8)
    other = np.ones((2, 2), np.uint8)
    assert find_frame(image) is image
    assert find_frame({"value": 3, "frame": image, "second": other}) is image
    assert find_frame({"meta": {"id": 1}, "data": {"boxes": [1, 2], "image": image}}) is image
    assert find_frame(Message(image)) is image
    assert find_frame({"message": Message(image)}) is image
    assert find_frame({"vector": np.zeros(128), "frame": image}) is image


@pytest.mark.parametrize(
    "data",
    [None, "text", 42, {}, {"value": "example"}, [np.zeros((4, 4))], np.zeros(128),
     np.zeros((4, 4, 7)), {"a": {"b": {"c": np.zeros((4, 4))}}}, Message(None), Message("x")],
    ids=["none", "str", "int", "empty-dict", "no-frame", "list", "vector", "7-channels",
         "too-deep", "get_frame-none", "get_frame-str"])
def test_find_frame_returns_none_without_an_image(data: object) -> None:
    assert find_frame(data) is None


def test_frame_log_message_is_what_the_cockpit_parses() -> None:
    b64 = encode_frame(np.zeros((8, 8, 3), np.uint8))
    message = frame_log_message("input", b64)
    assert message == f"input: , 'data': {{'image_base64': '{b64}'}}"
    assert frame_log_message("output", "QUJD") == "output: , 'data': {'image_base64': 'QUJD'}"
    # The cockpit: routes on the text before ':', then parses what follows "'data':" with ' -> ".
    assert message.split(":")[0] == "input"
    assert json.loads(message.split("'data':")[1].replace("'", '"'))["image_base64"] == b64


def test_frame_log_message_rejects_unknown_directions() -> None:
    with pytest.raises(ValueError, match="'input' or 'output'"):
        frame_log_message("extra", "QUJD")


def test_sampler_lets_through_at_most_n_per_second() -> None:
    now = [100.0]
    sampler = FrameSampler(5, clock=lambda: now[0])
    due_at = []
    for tick in range(3000):  # 3 s of calls, one every millisecond
        now[0] = 100.0 + tick / 1000
        if sampler.due():
            due_at.append(now[0])
    assert len(due_at) == 15
    assert min(b - a for a, b in zip(due_at, due_at[1:])) >= 0.2 - 1e-9


def test_sampler_answers_at_once_after_a_pause_and_with_the_real_clock() -> None:
    now = [0.0]
    sampler = FrameSampler(2, clock=lambda: now[0])
    assert sampler.due() and not sampler.due()
    now[0] = 60.0
    assert sampler.due() and not sampler.due()
    assert FrameSampler(1000).due()


def test_sampler_rejects_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="max_per_second"):
        FrameSampler(0)
