"""Logging conventions: the PIPE_INFRASTRUCTURE level and logger names.

Routine loggers are named ``<base>.<flow>.<routine>`` so that the cockpit, which
keeps the last dot-separated part of a record's source, sees the routine name.
"""
import logging

PIPE_INFRASTRUCTURE = 5
"""Level of pipert's own bookkeeping records (FPS, lifecycle), below DEBUG."""

logging.addLevelName(PIPE_INFRASTRUCTURE, "PIPE_INFRASTRUCTURE")


def _plog(self: logging.Logger, msg: object, *args: object, **kwargs: object) -> None:
    if self.isEnabledFor(PIPE_INFRASTRUCTURE):
        self._log(PIPE_INFRASTRUCTURE, msg, args, **kwargs)


logging.Logger.plog = _plog  # type: ignore[attr-defined]


def routine_logger_name(base: str, flow: str, routine: str) -> str:
    """Name of a routine's logger: ``<base>.<flow>.<routine>``."""
    return f"{base}.{flow}.{routine}"
