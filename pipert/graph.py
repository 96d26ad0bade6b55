"""A pipe drawn as a Mermaid flowchart (``pipert graph``): flows as boxes, routines as nodes, wires as arrows.

Sources are drawn as stadiums, destinations as subroutine boxes; a wire's
arrow is labelled with its policy and depth (the pipe's defaults once validated).
"""
from __future__ import annotations

import itertools
from typing import Dict, List

from .pipe import Pipe
from .registry import name_of
from .routine import DestinationRoutine, SourceRoutine


def _text(value: str) -> str:
    """``value`` safe inside a quoted Mermaid label."""
    return value.replace('"', "#quot;")


def mermaid(pipe: Pipe) -> str:
    """The flowchart of ``pipe`` (built or not) in Mermaid syntax."""
    lines: List[str] = ["flowchart LR"]
    ids: Dict[int, str] = {}
    counter = itertools.count()
    for flow in pipe.flows.values():
        flow_id = f"flow{next(counter)}"
        lines.append(f'  subgraph {flow_id}["{_text(flow.name)}"]')
        for routine in flow.routines:
            node = ids[id(routine)] = f"r{next(counter)}"
            kind = name_of(type(routine)) or type(routine).__name__
            label = f'"{_text(routine.name)}<br/><small>{_text(kind)}</small>"'
            if isinstance(routine, SourceRoutine):
                lines.append(f"    {node}([{label}])")
            elif isinstance(routine, DestinationRoutine):
                lines.append(f"    {node}[[{label}]]")
            else:
                lines.append(f"    {node}[{label}]")
        lines.append("  end")
    for wire in pipe.wires:
        arrow = f'-- "{wire.policy}, depth {wire.depth}" -->' if wire.policy else "-->"
        for destination in wire.destinations:
            if id(wire.source) in ids and id(destination) in ids:
                lines.append(f"  {ids[id(wire.source)]} {arrow} {ids[id(destination)]}")
    return "\n".join(lines) + "\n"
