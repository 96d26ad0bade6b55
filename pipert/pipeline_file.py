"""Pipelines from files: a YAML or JSON file builds the same ``Pipe`` as code would.

::

    pipe: {wire_policy: latest, wire_depth: 1}        # Pipe(...) keywords
    params: {fps: 30}                                 # cascading: every routine declaring fps
    flows:
      capture: {routines: [{name: cam, type: video-source, params: {path: 0}}]}
      detection:
        restart: on-failure                           # every create_flow keyword; auto_wire too
        routines: [{name: det, type: mog2-detector, params: {min_area: 400}}]
      output: {routines: [{name: rec, type: video-writer, params: {path: out/run.mp4}}]}
    wires:
      - {source: cam, destinations: [det]}
      - {source: det, destinations: [rec], policy: block, depth: 8}

A routine's ``type`` is a registered name (``pipert plugins``) or
``package.module:Class``; its ``params`` are the class's ``Param`` declarations
(converted to their types) or, for a class with its own ``__init__``, that
constructor's arguments; modules are found on the Python path, in the current
directory and in the file's own directory. Checking reports every problem at once, each as
``FILE:LINE: what is wrong and how to fix it``; line numbers come from the
YAML node tree (JSON is read by the json module and located the same way).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import yaml

from .errors import BuildError
from .params import Param, declared_params, resolve_params
from .pipe import Pipe
from .registry import RegistryError, lookup
from .routine import Routine
from .wire import Wire

SUFFIXES = (".yaml", ".yml", ".json")
_TOP_KEYS = ("pipe", "params", "flows", "wires")
_ROUTINE_KEYS = ("name", "type", "params")
_WIRE_KEYS = ("source", "destinations", "policy", "depth")
_Where = Tuple[Any, ...]


class PipelineFileError(BuildError):
    """A pipeline file cannot build a pipe; ``problems`` holds every ``FILE:LINE: message``."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def is_pipeline_file(target: str) -> bool:
    """Whether ``target`` names a pipeline file (by its suffix) rather than a Python factory."""
    return target.lower().endswith(SUFFIXES)


def _positions(node: yaml.Node, where: _Where, lines: Dict[_Where, int], twice: List[Tuple[_Where, int]]) -> None:
    """Record the 1-based line of every key and item under ``node``, and the keys given twice."""
    lines.setdefault(where, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark)
            if name in seen:  # the last one counts, as when loading: forget the lines of the first
                twice.append((where + (name,), key.start_mark.line + 1))
                for known in [k for k in lines if k[:len(where) + 1] == where + (name,)]:
                    del lines[known]
            seen.add(name)
            lines[where + (name,)] = key.start_mark.line + 1
            _positions(value, where + (name,), lines, twice)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _positions(item, where + (index,), lines, twice)


class _Checker:
    """Reads one file and turns it into a pipe, collecting every problem with its line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: List[Tuple[int, str]] = []
        self.lines: Dict[_Where, int] = {}
        self.named: Set[str] = set()  # every routine name the file gives, also of routines with problems
        self.declared: Set[str] = set()  # every parameter name the routines' classes declare
        self.all_types_known = True

    def problem(self, where: _Where, message: str) -> None:
        while where and where not in self.lines:
            where = where[:-1]
        self.problems.append((self.lines.get(where, 1), message))

    # ----- reading -----

    def read(self) -> Any:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append((1, f"cannot read the pipeline file: {exc}"))
            return None
        json_file = self.path.lower().endswith(".json")
        twice: List[Tuple[_Where, int]] = []
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            if node is not None:
                _positions(node, (), self.lines, twice)
            document = None if json_file else yaml.safe_load(text)
        except yaml.YAMLError as exc:
            if not json_file:  # JSON is judged by the json module below; YAML lines are only a guide for it
                mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
                problem = getattr(exc, "problem", None) or exc
                self.problems.append((mark.line + 1 if mark else 1, f"not valid YAML: {problem}: fix it there "
                                      "(indentation, a missing ':' or closing bracket, a tag safe YAML refuses)"))
                return None
        for where, line in twice:
            self.problems.append((line, f"key '{where[-1]}' is given twice here: keep one"))
        if json_file:
            try:
                document = json.loads(text)
            except json.JSONDecodeError as exc:
                self.problems.append((exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})"))
                return None
        return document

    # ----- checking pieces -----

    def mapping(self, value: Any, where: _Where, what: str, keys: Optional[Iterable[str]] = None) -> Dict[str, Any]:
        """``value`` as a dict with string keys (else a problem and {}); keys outside ``keys`` are problems."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(where, f"{what} must be a mapping (key: value), not {type(value).__name__} {value!r}")
            return {}
        for key in value:
            if not isinstance(key, str):
                self.problem(where + (str(key),), f"{what} has the key {key!r}: keys must be names")
            elif keys is not None and key not in keys:
                self.problem(where + (key,), f"{what} has no key '{key}': use {', '.join(keys)}")
        return {k: v for k, v in value.items() if isinstance(k, str) and (keys is None or k in keys)}

    def options(self, given: Dict[str, Any], where: _Where, what: str, function: Callable,
                skip: Tuple[str, ...]) -> Dict[str, Any]:
        """``given`` as keyword arguments of ``function``, each converted to the type of its default."""
        accepted = {name: p for name, p in inspect.signature(function).parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in skip}
        converted = {}
        for key, value in given.items():
            if key not in accepted:
                self.problem(where + (key,), f"{what} has no option '{key}': use {', '.join(accepted)}")
                continue
            default = accepted[key].default
            if isinstance(default, (bool, int, float, str)):
                try:
                    value = Param(type(default)).convert(value)
                except ValueError:
                    self.problem(where + (key,), f"{what} option '{key}' expects {type(default).__name__} "
                                                 f"(default {default!r}), got {value!r}")
                    continue
            converted[key] = value
        return converted

    # ----- the parts of a pipeline -----

    def pipe(self, document: Dict[str, Any]) -> Pipe:
        """The pipe with the file's options; with default options if they do not fit (the rest is checked)."""
        options = self.options(self.mapping(document.get("pipe"), ("pipe",), "'pipe'"), ("pipe",), "'pipe'",
                               Pipe.__init__, ("self", "logger", "params"))
        params = self.mapping(document.get("params"), ("params",), "'params'")
        try:
            return Pipe(params=params, **options)
        except (TypeError, ValueError) as exc:
            self.problem(("pipe",), f"'pipe' options do not fit: {exc}")
            return Pipe(params=params)

    def routine(self, spec: Any, where: _Where, cascaded: Dict[str, Any]) -> Optional[Routine]:
        spec = self.mapping(spec, where, "a routine", _ROUTINE_KEYS)
        name, kind = spec.get("name"), spec.get("type")
        if not isinstance(name, str) or not name:
            self.problem(where + ("name",), f"this routine needs a name (name: my-routine), not {name!r}")
            return None
        self.named.add(name)
        if not isinstance(kind, str) or not kind:
            self.problem(where + ("type",), f"routine '{name}' needs a type: a registered name (see `pipert "
                                            "plugins`) or package.module:Class")
            return None
        try:
            cls = lookup(kind)
        except RegistryError as exc:
            self.problem(where + ("type",), f"routine '{name}': {exc}")
            self.all_types_known = False
            return None
        params = self.mapping(spec.get("params"), where + ("params",), f"the params of routine '{name}'")
        self.declared.update(declared_params(cls))
        found = resolve_params(name, cls, params, cascaded, self._constructor_arguments(cls))[1]
        for problem in found:
            place = {"given": where + ("params", problem.param), "pipe": ("params", problem.param)}
            self.problem(place.get(problem.origin, where), problem.message)
        if found:
            return None
        try:
            return cls(name=name, **params)
        except Exception as exc:
            self.problem(where, f"routine '{name}' ({cls.__name__}) could not be created: {type(exc).__name__}: "
                                f"{exc}: check its params")
            return None

    @staticmethod
    def _constructor_arguments(cls: type) -> List[str]:
        """The arguments of a routine class's own ``__init__`` (beyond name and declared parameters)."""
        if cls.__init__ is Routine.__init__:
            return []
        return [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name not in ("self", "name") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def flows(self, pipe: Pipe, document: Dict[str, Any]) -> Dict[str, Routine]:
        routines: Dict[str, Routine] = {}
        flows = self.mapping(document.get("flows"), ("flows",), "'flows'")
        if not flows:
            self.problem(("flows",), "the pipeline has no flows: add `flows: {NAME: {routines: [...]}}`")
        skip = ("self", "flow_name", "auto_wire", "routines")
        for flow_name, spec in flows.items():
            where = ("flows", flow_name)
            spec = self.mapping(spec, where, f"flow '{flow_name}'")
            listed = spec.pop("routines", None)
            auto_wire = spec.pop("auto_wire", False)
            if not isinstance(auto_wire, bool):
                self.problem(where + ("auto_wire",), f"flow '{flow_name}': auto_wire is true or false (link each "
                                                     f"routine to the next), not {auto_wire!r}")
            options = self.options(spec, where, f"flow '{flow_name}'", Pipe.create_flow, skip)
            if not isinstance(listed, list) or not listed:
                self.problem(where + ("routines",), f"flow '{flow_name}' needs a non-empty list `routines: [{{name: "
                                                    "..., type: ...}]`")
                continue
            made = []
            for index, item in enumerate(listed):
                routine = self.routine(item, where + ("routines", index), pipe.params)
                if routine is None:
                    continue
                if routine.name in routines:
                    self.problem(where + ("routines", index, "name"), f"routine name '{routine.name}' is used "
                                                                      "twice: give each routine its own name")
                    continue
                routines[routine.name] = routine
                made.append(routine)
            try:  # also with routines missing: the flow's own options are checked all the same
                pipe.create_flow(flow_name, auto_wire is True, *made, **options)
            except (TypeError, ValueError) as exc:
                key = next((k for k in options if re.search(rf"\b{k}\b", str(exc))), None)
                self.problem(where + ((key,) if key else ()), str(exc))
        for name, value in pipe.params.items():
            if self.all_types_known and name not in self.declared:
                self.problem(("params", name), f"pipe parameter '{name}' (given {value!r}) is declared by no routine: "
                                               f"remove it or check its spelling; routines declare "
                                               f"{sorted(self.declared) or 'none'}")
        return routines

    def wires(self, pipe: Pipe, document: Dict[str, Any], routines: Dict[str, Routine]) -> None:
        wires = document.get("wires") or []
        if not isinstance(wires, list):
            self.problem(("wires",), "'wires' must be a list of {source: NAME, destinations: [NAME, ...]}")
            return
        for index, spec in enumerate(wires):
            where = ("wires", index)
            spec = self.mapping(spec, where, "a wire", _WIRE_KEYS)
            ends = []
            destinations = spec.get("destinations")
            destinations = [destinations] if isinstance(destinations, str) else destinations
            if not isinstance(destinations, list) or not destinations:
                self.problem(where + ("destinations",), "a wire needs `destinations: [NAME, ...]`")
                destinations = []
            for key, name in [("source", spec.get("source"))] + [("destinations", d) for d in destinations]:
                if name not in routines and name not in self.named:  # a named one's problem is reported already
                    role = "source" if key == "source" else "destination"
                    self.problem(where + (key,), f"the wire's {role} {name!r} is not a routine of this pipeline; "
                                                 f"routines are {sorted(self.named)}")
                ends.append(routines.get(name))
            fits = True
            for key in ("policy", "depth"):  # each checked by Wire itself, so that both are reported
                try:
                    Wire(source=None, **{key: spec.get(key)})
                except ValueError as exc:
                    self.problem(where + (key,), str(exc))
                    fits = False
            if fits and all(ends):
                pipe.link(Wire(source=ends[0], destinations=tuple(ends[1:]), policy=spec.get("policy"),
                               depth=spec.get("depth")))

    def graph(self, pipe: Pipe, routines: Dict[str, Routine]) -> None:
        """The checks of ``Pipe.build`` (the graph's shape), once the pieces themselves are right."""
        try:
            pipe.validate()
        except BuildError as exc:
            named = re.search(r"routine '([^']+)'", str(exc))
            where: _Where = ("wires",)
            if named and named.group(1) in routines:
                flow = pipe.flows[routines[named.group(1)].flow_name]
                where = ("flows", flow.name, "routines", flow.routines.index(routines[named.group(1)]))
            self.problem(where, str(exc))

    def load(self) -> Optional[Pipe]:
        problems = len(self.problems)
        document = self.read()
        if document is None:
            if len(self.problems) == problems:
                self.problem((), "the pipeline file is empty: it needs at least `flows:`")
            return None
        document = self.mapping(document, (), "the pipeline file", _TOP_KEYS)
        pipe = self.pipe(document)
        routines = self.flows(pipe, document)
        self.wires(pipe, document, routines)
        if not self.problems:
            self.graph(pipe, routines)
        return None if self.problems else pipe


def check_pipeline(path: str) -> Tuple[Optional[Pipe], List[str]]:
    """Read and check the pipeline file ``path`` without running anything: the unbuilt pipe (None if
    there are problems) and every problem found, as ``FILE:LINE: message``."""
    for folder in (os.getcwd(), os.path.dirname(os.path.abspath(path))):  # for types given as module:Class
        if folder not in sys.path:
            sys.path.insert(0, folder)
    checker = _Checker(path)
    pipe = checker.load()
    return pipe, [f"{path}:{line}: {message}" for line, message in sorted(checker.problems, key=lambda p: p[0])]


def load_pipeline(path: str) -> Pipe:
    """The unbuilt pipe described by the pipeline file ``path``; PipelineFileError lists every problem."""
    pipe, problems = check_pipeline(path)
    if problems or pipe is None:
        raise PipelineFileError(problems)
    return pipe
