"""Typed routine parameters: declared on the class, set by keywords, files, the pipe and at runtime.

A routine class declares its parameters as class attributes::

    class Detector(MiddleRoutine):
        min_area = Param(int, default=400, min=0, help="smallest blob, in pixels")
        mode = Param(str, default="fast", choices=("fast", "exact"))
        path = Param(str, help="where to write")            # no default: required

On an instance, ``self.min_area`` is the value now in force. Values given as
text (from the command line, a pipeline file or HTTP) are converted to the
declared type; a value that cannot be converted, or lies outside the bounds or
choices, is refused with a message naming the routine, the parameter, what it
expects and what it got.
"""
from __future__ import annotations

import builtins
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import BuildError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a parameter that has none: it must be set."""

_RESERVED = ("name", "flow_name", "logger", "params")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class ParamError(BuildError):
    """One or more parameters of a routine are missing, unknown or invalid."""


class Param:
    """A typed parameter of a routine class.

    ``type`` is ``bool``, ``int``, ``float``, ``str``, ``list``, ``dict`` or any
    class whose constructor takes the value's text. Without ``default`` the
    parameter is required; ``default=None`` makes it optional with no value.
    ``min``/``max`` bound numbers (and the length of strings and lists);
    ``choices`` lists the allowed values; ``help`` says what it does.
    """

    def __init__(self, type: type, default: Any = REQUIRED, min: Optional[float] = None,
                 max: Optional[float] = None, choices: Optional[Iterable[Any]] = None, help: str = "") -> None:
        if not isinstance(type, builtins.type):
            raise TypeError(f"Param's type must be a class such as int or str, not {type!r}")
        self.type = type
        self.min = min
        self.max = max
        self.help = help
        self.name = "?"
        self.owner = "?"
        self.default = default
        self.choices: Optional[Tuple[Any, ...]] = None
        try:
            if choices is not None:
                self.choices = tuple(self._as_type(choice) for choice in choices)
            if default is not REQUIRED and default is not None:
                self.default = self.convert(default)
        except ValueError as exc:
            raise TypeError(f"Param({type.__name__}): the default or choices do not fit: {exc}") from None

    # ----- declaration -----

    def __set_name__(self, owner: type, name: str) -> None:
        if name in _RESERVED or any(name in vars(base) and not isinstance(vars(base)[name], Param)
                                    for base in owner.__mro__[1:] if base.__module__.startswith("pipert.")):
            raise TypeError(f"{owner.__name__}.{name}: '{name}' is a routine attribute of pipert's own: give the "
                            "parameter another name")
        self.name = name
        self.owner = owner.__name__

    def __get__(self, routine: Any, owner: type) -> Any:
        if routine is None:
            return self
        try:
            return routine._params[self.name]
        except (AttributeError, KeyError):
            raise AttributeError(f"parameter '{self.name}' of {self.owner} has no value: it is required and was "
                                 "not set (set it by keyword, in the pipeline file or on the pipe)") from None

    def __set__(self, routine: Any, value: Any) -> None:
        """Set by the routine's own code: converted and checked now, kept as if given by keyword."""
        try:
            converted = self.convert(value)
        except ValueError as exc:
            raise ParamError(f"routine '{getattr(routine, 'name', '?')}': {exc}") from None
        routine.__dict__.setdefault("_params", {})[self.name] = converted
        routine.__dict__.setdefault("_given", {})[self.name] = converted

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    # ----- checking values -----

    def expected(self) -> str:
        """What this parameter accepts, in words (for error messages and listings)."""
        text = self.type.__name__
        if self.choices is not None:
            text += " in " + ", ".join(repr(c) for c in self.choices)
        if self.min is not None:
            text += f" >= {self.min}"
        if self.max is not None:
            text += f" <= {self.max}"
        return text

    def _refuse(self, value: Any, why: str = "") -> ValueError:
        given = f"{value!r} ({type(value).__name__})"
        return ValueError(f"parameter '{self.name}' expects {self.expected()}, got {given}{why}")

    def convert(self, value: Any) -> Any:
        """``value`` as the declared type within the bounds and choices; ValueError naming expected and given."""
        if value is None:
            if self.default is None:
                return None
            raise self._refuse(value)
        converted = self._as_type(value)
        if self.choices is not None and converted not in self.choices:
            raise self._refuse(value)
        size = len(converted) if isinstance(converted, (str, list, tuple, dict)) else converted
        if self.min is not None and size < self.min or self.max is not None and size > self.max:
            raise self._refuse(value, ": out of bounds")
        return converted

    def _as_type(self, value: Any) -> Any:
        kind = self.type
        text = value.strip() if isinstance(value, str) else None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            if number and value in (0, 1):
                return bool(value)
        elif kind is int:
            if number and float(value).is_integer():
                return int(value)
            if text is not None:
                try:
                    return int(text, 0)
                except ValueError:
                    pass
        elif kind is float:
            if number:
                return float(value)
            if text is not None:
                try:
                    return float(text)
                except ValueError:
                    pass
        elif kind is str:
            if isinstance(value, str):
                return value
            if number:  # a file's `path: 0` is text to a str parameter
                return str(value)
        elif kind in (list, dict):
            if isinstance(value, kind) or kind is list and isinstance(value, tuple):
                return kind(value)
            if text is not None:
                return self._parse(text, value)
        elif isinstance(value, kind):
            return value
        elif text is not None:
            try:
                return kind(text)
            except (TypeError, ValueError):
                pass
        raise self._refuse(value)

    def _parse(self, text: str, value: Any) -> Any:
        """A list or dict from text: JSON, or for a list also comma-separated items."""
        if text.startswith(("[", "{")):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise self._refuse(value, ": not valid JSON") from None
            if isinstance(parsed, self.type):
                return parsed
        elif self.type is list:
            return [item.strip() for item in text.split(",")] if text else []
        raise self._refuse(value)

    def describe(self) -> Dict[str, Any]:
        """This parameter as plain JSON: type, default (absent if required), bounds, choices, help."""
        described: Dict[str, Any] = {"type": self.type.__name__, "required": self.required, "help": self.help}
        if not self.required:
            described["default"] = plain(self.default)
        for key in ("min", "max", "choices"):
            if getattr(self, key) is not None:
                described[key] = plain(list(self.choices) if key == "choices" else getattr(self, key))
        return described

    def __repr__(self) -> str:
        return f"Param({self.expected()}, default={self.default!r})"


def plain(value: Any) -> Any:
    """``value`` as JSON can carry it (for status, structure and the control surfaces): values of
    other types (a ``Path`` parameter, say) become their text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    return str(value)


def declared_params(cls: type) -> Dict[str, Param]:
    """The parameters a routine class declares (its own and inherited), by name."""
    found: Dict[str, Param] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, Param):
                found[name] = value
    return found


@dataclass(frozen=True)
class ParamProblem:
    """One parameter problem: ``origin`` is ``given`` (the routine's own value, or an unknown name),
    ``pipe`` (a cascaded value) or ``missing`` (a required parameter without value)."""

    param: str
    origin: str
    message: str

    def __str__(self) -> str:
        return self.message


def convert_params(routine: str, cls: type, given: Mapping[str, Any],
                   arguments: Sequence[str] = ()) -> Tuple[Dict[str, Any], List[ParamProblem]]:
    """``given`` values for ``routine`` converted to the types ``cls`` declares, and the problems found
    (unknown names, values that do not fit), all of them. Names in ``arguments`` (those of the class's
    own constructor) are known too, and kept as given."""
    params = declared_params(cls)
    where = f"routine '{routine}' ({cls.__name__})"
    converted: Dict[str, Any] = {}
    problems: List[ParamProblem] = []
    for name, value in given.items():
        if name in params:
            try:
                converted[name] = params[name].convert(value)
            except ValueError as exc:
                problems.append(ParamProblem(name, "given", f"{where}: {exc}"))
        elif name in arguments:
            converted[name] = value
        else:
            known = ", ".join(sorted([*params, *arguments])) or "none"
            problems.append(ParamProblem(name, "given", f"{where}: unknown parameter '{name}' (given {value!r}); "
                                                        f"its parameters are: {known}"))
    return converted, problems


def resolve_params(routine: str, cls: type, given: Mapping[str, Any], cascaded: Optional[Mapping[str, Any]] = None,
                   arguments: Sequence[str] = ()) -> Tuple[Dict[str, Any], List[ParamProblem]]:
    """The values of all of ``cls``'s parameters for ``routine``, and the problems found (all of them).

    ``given`` (the routine's own values) win over ``cascaded`` (the pipe's, applied
    only to parameters the class declares), which win over defaults. ``arguments``
    as for ``convert_params``.
    """
    values, problems = convert_params(routine, cls, given, arguments)
    where = f"routine '{routine}' ({cls.__name__})"
    for name, param in declared_params(cls).items():
        if name in given:
            continue
        if cascaded is not None and name in cascaded:
            try:
                values[name] = param.convert(cascaded[name])
            except ValueError as exc:
                problems.append(ParamProblem(name, "pipe", f"{where}: {exc} (from the pipe's params)"))
        elif param.required:
            problems.append(ParamProblem(name, "missing", f"{where}: parameter '{name}' is required "
                                                          f"({param.expected()}) and was not set: set it, e.g. "
                                                          f"{name}=..."))
        else:
            values[name] = param.default
    return values, problems


def raise_problems(problems: Sequence[object]) -> None:
    """Raise one ParamError listing every problem, if there are any."""
    if problems:
        lines = [str(problem) for problem in problems]
        raise ParamError(lines[0] if len(lines) == 1 else
                         f"{len(lines)} parameter problems:\n  " + "\n  ".join(lines))
