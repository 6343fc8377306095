"""Reading the editor's (LiteGraph) workflow JSON and flattening its subgraphs.

The UI format stores ``nodes`` (each with ``inputs`` slots that name a ``link`` id,
``widgets_values``, ``mode``), ``links`` (``[id, origin_id, origin_slot, target_id,
target_slot, type]`` lists, or objects with those keys inside subgraphs) and, since subgraphs
arrived, ``definitions.subgraphs``: graphs whose ``id`` (a UUID) is used as a node ``type``.
Inside a definition, links from node ``-10`` come from the subgraph's inputs and links to node
``-20`` feed its outputs.

:func:`flatten` turns all of it into one list of :class:`FlatNode` whose input slots point
directly at ``(node id, output slot)``; nodes inside a subgraph instance get the id
``"<instance id>:<inner id>"`` (nested: ``"a:b:c"``), as the ComfyUI editor numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUBGRAPH_INPUT_NODE = -10
SUBGRAPH_OUTPUT_NODE = -20
MUTED, BYPASSED = 2, 4  # LiteGraph modes NEVER and BYPASS
MISSING: Any = object()

Source = tuple[str, int] | None


@dataclass
class FlatInput:
    name: str
    type: str
    widget: str | None  # the widget this input slot stands for, if any
    source: Source  # (node id, output slot) after subgraph wiring
    value: Any = MISSING  # a value promoted from a subgraph instance's widget


@dataclass
class FlatNode:
    id: str
    type: str
    mode: int
    title: str | None
    widgets_values: Any
    inputs: list[FlatInput] = field(default_factory=list)
    output_types: list[str] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)


class WorkflowFormatError(ValueError):
    """The workflow JSON is not in a shape the editor writes."""


def _links(raw: Any) -> dict[int, tuple[int, int, int, int, str]]:
    out = {}
    for link in raw or []:
        if link is None:
            continue
        if isinstance(link, dict):
            keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
            if any(k not in link for k in keys[:5]):
                raise WorkflowFormatError(f"link object {link!r} lacks one of {keys}")
            out[int(link["id"])] = tuple(link.get(k) for k in keys[1:])
        elif isinstance(link, list | tuple) and len(link) >= 5:
            out[int(link[0])] = (*link[1:5], link[5] if len(link) > 5 else "*")
        else:
            raise WorkflowFormatError(
                f"link {link!r} must be [id, origin_id, origin_slot, target_id, target_slot, type]"
            )
    return out


def _definitions(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    pending = [workflow]
    while pending:
        graph = pending.pop()
        for sub in (graph.get("definitions") or {}).get("subgraphs") or []:
            if sub.get("id") not in found:
                found[sub["id"]] = sub
                pending.append(sub)
    return found


class _Flattener:
    def __init__(self, workflow: dict[str, Any]) -> None:
        self.defs = _definitions(workflow)
        self.nodes: dict[str, FlatNode] = {}
        self.alias: dict[str, dict[int, Source]] = {}  # instance id -> its output slot sources

    def graph(self, graph: dict[str, Any], prefix: str, bindings: dict[int, tuple[Source, Any]],
              depth: int = 0) -> dict[int, Source]:
        if depth > 32:
            raise WorkflowFormatError(
                "subgraphs nest more than 32 deep (does a subgraph contain itself?)"
            )
        links = _links(graph.get("links"))
        input_node = (graph.get("inputNode") or {}).get("id", SUBGRAPH_INPUT_NODE)
        output_node = (graph.get("outputNode") or {}).get("id", SUBGRAPH_OUTPUT_NODE)

        def source_of(link_id: Any) -> tuple[Source, Any]:
            if link_id is None or link_id not in links:
                return None, MISSING
            origin, slot = links[link_id][0], links[link_id][1]
            if origin == input_node:
                return bindings.get(slot, (None, MISSING))
            return (f"{prefix}{origin}", int(slot)), MISSING

        for node in graph.get("nodes") or []:
            if "id" not in node or "type" not in node:
                raise WorkflowFormatError(f"a node lacks 'id' or 'type': {str(node)[:120]}")
            node_id = f"{prefix}{node['id']}"
            mode = int(node.get("mode") or 0)
            sub = self.defs.get(node["type"])
            if sub is not None and mode not in (MUTED, BYPASSED):
                slots = range(len(node.get("inputs") or []))
                inner = {k: self._binding(node, k, source_of) for k in slots}
                self.alias[node_id] = self.graph(sub, f"{node_id}:", inner, depth + 1)
                continue
            flat = FlatNode(
                id=node_id, type=node["type"], mode=mode, title=node.get("title"),
                widgets_values=node.get("widgets_values"),
                output_types=[o.get("type", "*") for o in node.get("outputs") or []],
                properties=node.get("properties") or {},
            )
            for slot in node.get("inputs") or []:
                src, value = source_of(slot.get("link"))
                widget = (slot.get("widget") or {}).get("name")
                flat.inputs.append(FlatInput(slot.get("name", ""), slot.get("type", "*"), widget,
                                             src, value))
            self.nodes[node_id] = flat
        return {
            int(t_slot): (f"{prefix}{origin}", int(o_slot))
            for origin, o_slot, target, t_slot, _ in links.values() if target == output_node
        }

    @staticmethod
    def _binding(instance: dict[str, Any], k: int, source_of) -> tuple[Source, Any]:
        """What subgraph input ``k`` carries: the instance's link, else its promoted widget."""
        slot = instance["inputs"][k]
        src, value = source_of(slot.get("link"))
        if src is not None or value is not MISSING:
            return src, value
        widget = (slot.get("widget") or {}).get("name")
        values = instance.get("widgets_values")
        if widget is None or values is None:
            return None, MISSING
        if isinstance(values, dict):
            return None, values.get(widget, MISSING)
        position = [i for i, s in enumerate(instance["inputs"]) if s.get("widget")].index(k)
        return None, values[position] if position < len(values) else MISSING

    def resolve(self, source: Source) -> Source:
        seen = set()
        while source is not None and source[0] in self.alias:
            if source in seen:
                raise WorkflowFormatError(f"subgraph outputs loop back on {source}")
            seen.add(source)
            source = self.alias[source[0]].get(source[1])
        return source


def flatten(workflow: dict[str, Any]) -> dict[str, FlatNode]:
    """All nodes of a UI-format workflow, subgraphs expanded, input sources resolved."""
    if not isinstance(workflow.get("nodes"), list):
        raise WorkflowFormatError("a UI-format workflow needs a 'nodes' list")
    flattener = _Flattener(workflow)
    flattener.graph(workflow, "", {})
    for node in flattener.nodes.values():
        for slot in node.inputs:
            slot.source = flattener.resolve(slot.source)
    return flattener.nodes
