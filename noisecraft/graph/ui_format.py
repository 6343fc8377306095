"""UI-format workflow -> API-format prompt, as the ComfyUI editor converts on "Queue".

* widget values are assigned in the node schema's widget order (required, then optional);
  the hidden ``control_after_generate`` value after a seed/noise_seed INT widget, and the
  ``upload`` value after LoadImage's image, are skipped; a dict ``widgets_values`` is by name;
* an input slot fed by a link becomes ``[node_id, slot]`` (a converted widget included);
* ``Reroute`` nodes are walked through; a ``PrimitiveNode`` gives its value to the widget it
  feeds; ``Note`` / ``MarkdownNote`` and other virtual nodes are dropped;
* muted nodes (mode 2) are dropped, and inputs linked to them removed;
* a bypassed node (mode 4) passes an input through to a consumer: the input at the same
  index as the output, else the first input, whose type equals the consumer's input type;
* subgraph instances are expanded with ids ``"<instance>:<inner>"`` (see ``ui_graph``).

Every node gets ``_meta.title`` as the editor writes it.
"""

from __future__ import annotations

from typing import Any

from noisecraft.graph.registry import NodeRegistry
from noisecraft.graph.ui_graph import (
    BYPASSED,
    MISSING,
    MUTED,
    FlatInput,
    FlatNode,
    WorkflowFormatError,
    flatten,
)

REROUTES = frozenset({"Reroute"})
PRIMITIVES = frozenset({"PrimitiveNode"})
VIRTUAL = REROUTES | PRIMITIVES | {"Note", "MarkdownNote"}


def is_ui_format(workflow: Any) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


def is_api_format(workflow: Any) -> bool:
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(v, dict) and "class_type" in v for v in workflow.values()
    )


def _widget_values(node: FlatNode, registry: NodeRegistry) -> dict[str, Any]:
    cls = registry.get(node.type)
    if cls is None:
        return {}
    values = node.widgets_values
    out: dict[str, Any] = {}
    if isinstance(values, dict):
        for spec in cls.schema.widgets:
            out[spec.name] = values.get(spec.name, spec.default)
        return out
    values = list(values or [])
    index = 0
    for spec in cls.schema.widgets:
        out[spec.name] = values[index] if index < len(values) else spec.default
        index += 1 + int(spec.has_control_widget) + int(spec.image_upload)
    return out


def _upstream(nodes: dict[str, FlatNode], slot: FlatInput) -> tuple[str, Any]:
    """("link", (id, slot)) | ("value", primitive value) | ("none", None) for one input."""
    source = slot.source
    seen: set[tuple[str, int]] = set()
    while source is not None:
        if source in seen:
            raise WorkflowFormatError(f"reroutes or bypassed nodes form a loop at {source}")
        seen.add(source)
        parent = nodes.get(source[0])
        if parent is None:
            return "none", None
        if parent.type in REROUTES:
            source = parent.inputs[0].source if parent.inputs else None
        elif parent.type in PRIMITIVES:
            values = parent.widgets_values or []
            return ("value", values[0]) if values else ("none", None)
        elif parent.mode == BYPASSED:
            source = _bypass(parent, source[1], slot.type)
            if source is MISSING:
                return "none", None
        else:
            return "link", [source[0], source[1]]
    return "none", None


def _bypass(parent: FlatNode, out_slot: int, wanted: str):
    """The source a bypassed node passes through for a consumer wanting type ``wanted``."""
    order = [out_slot] + list(range(len(parent.inputs)))
    for i in order:
        if 0 <= i < len(parent.inputs) and parent.inputs[i].type == wanted:
            return parent.inputs[i].source
    return MISSING


def _title(node: FlatNode, registry: NodeRegistry) -> str:
    if node.title:
        return node.title
    cls = registry.get(node.type)
    return (cls.schema.display_name or cls.schema.name) if cls else node.type


def ui_to_api(workflow: dict[str, Any], registry: NodeRegistry) -> dict[str, dict[str, Any]]:
    """Convert an editor-saved workflow to the API format (see the module docstring)."""
    nodes = flatten(workflow)
    prompt: dict[str, dict[str, Any]] = {}
    for node in nodes.values():
        if node.type in VIRTUAL or node.mode in (MUTED, BYPASSED):
            continue
        inputs = _widget_values(node, registry)
        for slot in node.inputs:
            name = slot.widget or slot.name
            if slot.value is not MISSING:
                inputs[name] = slot.value
            kind, value = _upstream(nodes, slot)
            if kind != "none":
                inputs[name] = value
            elif slot.source is not None:  # linked to a muted node / no bypass match
                inputs.pop(name, None)
        prompt[node.id] = {
            "inputs": inputs, "class_type": node.type,
            "_meta": {"title": _title(node, registry)},
        }
    for entry in prompt.values():  # the editor drops links to nodes it did not emit
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) not in prompt:
                del entry["inputs"][name]
    return prompt
