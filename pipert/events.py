"""Event names and the ``@events`` decorator that turns routine methods into handlers."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, TypeVar

START_EVENT_NAME = "start"
STOP_EVENT_NAME = "stop"
KILL_EVENT_NAME = "kill"
LOG_DATA_EVENT_NAME = "log_data"
BUILTIN_EVENTS = (START_EVENT_NAME, STOP_EVENT_NAME, KILL_EVENT_NAME)
"""The events every routine handles and the cockpit lists."""
RUNTIME_EVENTS = BUILTIN_EVENTS + (LOG_DATA_EVENT_NAME,)
"""Every event the runtime itself handles; ``log_data`` toggles sending a routine's frames
to the cockpit (optional parameter ``enabled``)."""
PARAMS_EVENT_NAME = "set_params"
"""The event that carries ``Pipe.set_params`` values to a routine; only ``set_params`` sends it."""

_F = TypeVar("_F", bound=Callable)
_ATTR = "_pipert_events"


def events(*names: str) -> Callable[[_F], _F]:
    """Mark a routine method as the handler of the events ``names``.

    The handler's keyword parameters are filled from the event's params. It runs
    in the routine's own thread, between two ``main_logic`` calls, so routine
    state needs no locks.
    """
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError("@events needs one or more non-empty event names, e.g. @events('RESET')")
    if PARAMS_EVENT_NAME in names:
        raise TypeError(f"'{PARAMS_EVENT_NAME}' is pipert's own event: override params_changed(self, changed) "
                        "to react to new parameter values")

    def mark(method: _F) -> _F:
        setattr(method, _ATTR, tuple(getattr(method, _ATTR, ())) + names)
        return method

    return mark


def _handler_names(cls: type) -> Dict[str, List[str]]:
    """The names of the handler methods of routine class ``cls``, by event name."""
    found: Dict[str, List[str]] = {}
    for attr, member in inspect.getmembers(cls, callable):
        for name in getattr(member, _ATTR, ()):
            found.setdefault(name, []).append(attr)
    return found


def handlers_of(obj: object) -> Dict[str, List[Callable]]:
    """The bound handler methods of ``obj``, by event name."""
    return {name: [getattr(obj, attr) for attr in attrs] for name, attrs in _handler_names(type(obj)).items()}


def events_of(cls: type) -> List[str]:
    """The names of the events routine class ``cls`` declares handlers for."""
    return sorted(_handler_names(cls))


def check_params(handler: Callable, event: str, target: str, params: dict) -> None:
    """Raise a TypeError naming the event and handler if ``params`` do not fit it."""
    try:
        inspect.signature(handler).bind(**params)
    except TypeError as exc:
        wanted = ", ".join(inspect.signature(handler).parameters) or "no parameters"
        raise TypeError(
            f"event '{event}' for routine '{target}': parameters {sorted(params)} do not fit "
            f"{handler.__name__}({wanted}): {exc}"
        ) from None


_FORM_TYPES = {kind: kind.__name__ for kind in (bool, int, float, str)}


def describe_handlers(obj: object) -> Dict[str, List[Dict[str, Any]]]:
    """The keyword parameters of ``obj``'s handlers, by event: ``name``, ``required``, ``default`` (when
    there is one; JSON-able, else its repr) and ``type`` (when annotated bool, int, float or str):
    what a form that sends the event needs."""
    described: Dict[str, List[Dict[str, Any]]] = {}
    for event, handlers in handlers_of(obj).items():
        params = described.setdefault(event, [])
        for handler in handlers:
            for parameter in inspect.signature(handler).parameters.values():
                if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or \
                        any(p["name"] == parameter.name for p in params):
                    continue
                entry: Dict[str, Any] = {"name": parameter.name, "required": parameter.default is parameter.empty}
                if not entry["required"]:
                    default = parameter.default
                    entry["default"] = default if isinstance(default, (bool, int, float, str, type(None))) \
                        else repr(default)
                kind = parameter.annotation
                kind = _FORM_TYPES.get(kind, kind if kind in _FORM_TYPES.values() else None)
                if kind is not None:
                    entry["type"] = kind
                params.append(entry)
    return described
