"""Errors a user of pipert can cause; each message names the thing and the fix."""


class PipeError(Exception):
    """Base of pipert's own errors."""


class BuildError(PipeError, ValueError):
    """The pipe's flows, routines or wires do not form a valid pipeline."""


class EventError(PipeError, ValueError):
    """An event names something that does not exist or cannot handle it."""


class TransportError(PipeError):
    """A message cannot travel over a wire (too large, unpicklable, wire closed)."""


class RecordError(PipeError):
    """A recording cannot start: a bad path, wire name or option."""
