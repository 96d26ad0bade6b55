"""The routine registry: routine classes known by name, from pipert itself and from installed plugins.

``@pipert.register("mog2-detector")`` on a routine class makes it known by that
name. The ready-made routines are the modules of the package ``pipert.routines``;
installed packages add theirs through the entry-point group ``pipert.routines``,
whose value is a module (imported to run its ``register`` decorators) or
``module:Class`` (registered under the entry point's name unless it registered
itself). Both are loaded once, at the first lookup or listing. A plugin that
fails to load is reported by name with its error and the others still load.
A name registered twice is an error naming both origins.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import pkgutil
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, TypeVar

from .errors import PipeError
from .routine import Routine

ENTRY_POINT_GROUP = "pipert.routines"
BUILTIN_PACKAGE = "pipert.routines"
_T = TypeVar("_T", bound=type)
_log = logging.getLogger(__name__)


class RegistryError(PipeError, ValueError):
    """A routine name or type cannot be registered or found."""


@functools.lru_cache(maxsize=1)
def _distributions() -> Dict[str, List[str]]:
    return importlib.metadata.packages_distributions()


@dataclass(frozen=True)
class Registered:
    """A registered routine class and where it came from."""

    name: str
    cls: type
    distribution: Optional[str] = None  # the plugin's distribution, when an entry point registered it

    @property
    def package(self) -> str:
        """The installed distribution that provides the class, else its top-level module."""
        if self.distribution:
            return self.distribution
        top = self.cls.__module__.split(".")[0]
        return _distributions().get(top, [top])[0]

    @property
    def origin(self) -> str:
        return f"{self.cls.__module__}:{self.cls.__qualname__} (package {self.package})"


_routines: Dict[str, Registered] = {}
_failures: Dict[str, str] = {}
_loading: List[str] = []  # the distribution whose plugin is being imported, innermost last
_loaded = False
_lock = threading.RLock()


def _add(name: str, cls: type) -> None:
    if not isinstance(cls, type) or not issubclass(cls, Routine):
        raise RegistryError(f"register('{name}') decorates {cls!r}, which is not a routine class: put it on a "
                            "SourceRoutine, MiddleRoutine or DestinationRoutine subclass")
    with _lock:
        entry = Registered(name, cls, _loading[-1] if _loading else None)
        known = _routines.get(name)
        if known is not None and (known.cls.__module__, known.cls.__qualname__) != (cls.__module__,
                                                                                     cls.__qualname__):
            raise RegistryError(f"routine name '{name}' is registered twice: by {known.origin} and by "
                                f"{entry.origin}: rename one of them")
        if known is None:
            _routines[name] = entry


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator: make a routine class known by ``name`` (for pipeline files and ``pipert plugins``)."""
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"register needs a non-empty name such as 'mog2-detector', not {name!r}")

    def decorate(cls: _T) -> _T:
        _add(name, cls)
        return cls

    return decorate


def _load_builtin() -> None:
    package = importlib.import_module(BUILTIN_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__, BUILTIN_PACKAGE + "."):
        try:
            importlib.import_module(module.name)
        except Exception as exc:
            _failures[module.name] = f"{type(exc).__name__}: {exc}"
            _log.warning("ready-made routine module %s failed to load: %s", module.name, exc)


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> None:
    distribution = entry_point.dist.name if entry_point.dist is not None else entry_point.module
    _loading.append(distribution)
    try:
        loaded = entry_point.load()
        if isinstance(loaded, type) and not any(r.cls is loaded for r in _routines.values()):
            _add(entry_point.name, loaded)
    finally:
        _loading.pop()


def load_plugins() -> None:
    """Import the ready-made routines and every installed plugin, once; failures are kept, not raised."""
    global _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        _load_builtin()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            label = f"{entry_point.name} = {entry_point.value}"
            try:
                _load_entry_point(entry_point)
            except Exception as exc:
                distribution = entry_point.dist.name if entry_point.dist is not None else "?"
                _failures[f"{label} (package {distribution})"] = f"{type(exc).__name__}: {exc}"
                _log.warning("routine plugin %s (package %s) failed to load: %s", label, distribution, exc)


def routines() -> Dict[str, Registered]:
    """Every registered routine, by name (plugins loaded)."""
    load_plugins()
    with _lock:
        return dict(sorted(_routines.items()))


def failures() -> Dict[str, str]:
    """The plugins (and ready-made modules) that failed to load, with their errors."""
    load_plugins()
    with _lock:
        return dict(_failures)


def lookup(spec: str) -> type:
    """The routine class named ``spec``: a registered name or ``package.module:Class``."""
    if not isinstance(spec, str) or not spec.strip():
        raise RegistryError(f"a routine type must be a registered name or package.module:Class, not {spec!r}")
    if ":" in spec:
        return _import_class(spec)
    known = routines()
    if spec in known:
        return known[spec].cls
    hint = f"; plugins that failed to load: {', '.join(failures())}" if failures() else ""
    raise RegistryError(f"there is no routine type '{spec}': use a registered name ({', '.join(known) or 'none'}) "
                        f"or package.module:Class (see `pipert plugins`){hint}")


def _import_class(spec: str) -> type:
    module_name, _, attribute = spec.partition(":")
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"routine type '{spec}': cannot import module '{module_name}' ({exc}): check the "
                            "name, and that its package is installed or on PYTHONPATH") from None
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise RegistryError(f"routine type '{spec}': module '{module_name}' has no '{attribute}'")
    if not isinstance(found, type) or not issubclass(found, Routine):
        raise RegistryError(f"routine type '{spec}' is {found!r}, not a routine class (a SourceRoutine, "
                            "MiddleRoutine or DestinationRoutine subclass)")
    return found


def name_of(cls: type) -> Optional[str]:
    """The name ``cls`` is registered under, if any."""
    with _lock:
        return next((r.name for r in _routines.values() if r.cls is cls), None)
