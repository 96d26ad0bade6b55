"""Routines: the user's units of work, run as one thread each inside a flow process."""
from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from typing import Any, ClassVar, Dict, Optional, Tuple

import numpy as np

from .params import resolve_params

_counters: Dict[str, itertools.count] = defaultdict(itertools.count)


class Routine:
    """Base of every routine.

    Override ``setup`` (runs at the first ``start``, again at a later ``start`` if
    it failed), ``main_logic`` and ``cleanup`` (runs at ``kill`` after a
    successful setup). Inside a routine, ``self.name`` is its name,
    ``self.logger`` its logger and ``self.notify_event(...)`` sends an event.

    Declare parameters as class attributes (``min_area = Param(int, default=400, min=0)``,
    see ``pipert.Param``) and set them by keyword: ``Detector(name="det", min_area=800)``;
    ``self.min_area`` is the value in force. ``Pipe.build`` refuses missing, unknown or
    invalid ones; ``Pipe.set_params`` changes them while the pipe runs.

    Set ``writable_input = True`` on a routine class to receive private,
    writable copies of its input; otherwise numpy arrays from other flows are
    read-only views of shared memory and data from the same flow is shared with
    its sender and other receivers, so copy before changing it.
    """

    writable_input: ClassVar[bool] = False

    def __init__(self, name: Optional[str] = None, **params: Any) -> None:
        cls = type(self).__name__
        self.name = name if name is not None else f"{cls}-{next(_counters[cls])}"
        given = self.__dict__.setdefault("_given", {})
        given.update(params)
        # Values that fit are in force at once; every problem (and the pipe's cascading params) is
        # settled by Pipe.build, which refuses to start with a missing, unknown or invalid parameter.
        self._params: Dict[str, Any] = resolve_params(self.name, type(self), given)[0]
        self.flow_name: Optional[str] = None
        self.logger = logging.getLogger(f"pipert.{self.name}")
        self._runtime: Any = None
        self._const_fps: Optional[float] = None
        self._condition: Optional[str] = None

    @property
    def params(self) -> Dict[str, Any]:
        """The values of this routine's parameters now in force, by name."""
        return dict(self._params)

    def params_changed(self, changed: Dict[str, Any]) -> None:
        """Called in the routine's thread, between two ``main_logic`` calls, after ``pipe.set_params``
        changed ``changed`` (new values by name; already in force). Override it to rebuild what
        depends on them; if it raises, the old values are restored and the caller gets the error."""

    def set_condition(self, condition: Optional[str]) -> None:
        """Say what keeps this routine from working normally right now (``"reconnecting to ..."``),
        or None once it works again; ``status()`` shows it as the routine's ``condition``."""
        self._condition = condition

    def set_const_fps(self, fps: Optional[float]) -> None:
        """Cap this routine at ``fps`` calls of ``main_logic`` per second (None or 0: no cap).

        Call it in ``__init__``, ``setup`` or an event handler.
        """
        if fps is not None and fps < 0:
            raise ValueError(f"routine '{self.name}': const FPS must be positive or None, not {fps}")
        self._const_fps = fps or None

    def setup(self) -> None:
        """Prepare resources (open a camera, load a model). Runs in the routine's thread."""

    def cleanup(self) -> None:
        """Release what ``setup`` acquired. Runs in the routine's thread at kill."""

    def shared_array(self, shape: Tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """A writable array to fill and send (a frame, say).

        When this routine sends to another flow, the array lives in that wire's
        shared memory and crosses with no copy at all; otherwise it is a plain
        array. Do not change it after returning it.
        """
        if self._runtime is not None:
            array = self._runtime.allocate(self.name, tuple(shape), dtype)
            if array is not None:
                return array
        return np.empty(shape, dtype)

    def notify_event(self, event_name: str, specific_flow_routines: Optional[dict] = None,
                     **params: Any) -> None:
        """Send an event to the pipe's routines (all, ``{flow: []}`` or ``{flow: [routine]}``).

        It is validated here (unknown names raise EventError) and delivered
        asynchronously, so a routine may send an event to itself.
        """
        if self._runtime is None:
            raise RuntimeError(
                f"routine '{self.name}' can only notify events while its pipe runs: use Pipe.notify_event before")
        self._runtime.notify_event(event_name, specific_flow_routines, params)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class SourceRoutine(Routine):
    """Produces data: ``main_logic()`` takes nothing and returns a message (None sends nothing)."""

    def main_logic(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define main_logic(self)")


class MiddleRoutine(Routine):
    """Transforms data: ``main_logic(data)`` returns the message to send on (None sends nothing)."""

    def main_logic(self, data: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define main_logic(self, data)")


class DestinationRoutine(Routine):
    """Consumes data: ``main_logic(data)``; what it returns is ignored."""

    def main_logic(self, data: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define main_logic(self, data)")


def kind_of(cls: type) -> str:
    """``source``, ``middle`` or ``destination``: what a routine class does with data."""
    for base, kind in ((SourceRoutine, "source"), (MiddleRoutine, "middle"), (DestinationRoutine, "destination")):
        if issubclass(cls, base):
            return kind
    raise TypeError(f"{cls!r} is not a SourceRoutine, MiddleRoutine or DestinationRoutine subclass")
