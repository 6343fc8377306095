"""Validation of an API-format prompt before anything runs, in ComfyUI's error shape.

Every problem is reported, not just the first::

    {"error": {"type": "prompt_outputs_failed_validation", "message": ..., "details": ...,
               "extra_info": {}},
     "node_errors": {"5": {"errors": [{"type": "value_bigger_than_max", "message": ...,
                                       "details": ..., "extra_info": {"input_name": "width",
                                       ...}}],
                           "dependent_outputs": ["9"], "class_type": "EmptyLatentImage"}}}

Error types are ComfyUI's (``missing_node_type``, ``required_input_missing``,
``bad_linked_input``, ``return_type_mismatch``, ``invalid_input_type``,
``value_smaller_than_min``, ``value_bigger_than_max``, ``value_not_in_list``,
``prompt_no_outputs``, ``prompt_outputs_failed_validation``) plus ``dependency_cycle``, which
ComfyUI only discovers while running.  Messages name the node and the input.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from noisecraft.graph import dag
from noisecraft.graph.registry import NodeRegistry
from noisecraft.graph.schema import ANY, BOOLEAN, COMBO, FLOAT, INT, STRING, Input

MAX_LISTED_CHOICES = 20  # ComfyUI does not echo longer choice lists back


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


@dataclass
class ValidationResult:
    prompt: dict[str, dict[str, Any]]  # a copy with values coerced (e.g. "7" -> 7 for INT)
    outputs: list[str]
    error: dict[str, Any] | None = None
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_response(self) -> dict[str, Any]:
        """The body ComfyUI's ``POST /prompt`` answers a bad prompt with."""
        return {"error": self.error, "node_errors": self.node_errors}


class PromptValidationError(ValueError):
    def __init__(self, result: ValidationResult):
        self.result = result
        error = result.error or {}
        super().__init__(f"{error.get('message', 'invalid prompt')}\n{error.get('details', '')}"
                         .strip())


def types_match(produced: Any, accepted: Any) -> bool:
    """ComfyUI's link typing: ``*`` matches anything; ``"A,B"`` means either; a COMBO input
    accepts a COMBO or STRING output (or a list of choices)."""
    if isinstance(accepted, list) or accepted == COMBO:
        return isinstance(produced, list) or produced in (COMBO, STRING, ANY)
    if produced == ANY or accepted == ANY:
        return True
    got = {t.strip() for t in str(produced).split(",")}
    want = {t.strip() for t in str(accepted).split(",")}
    return bool(got & want)


def _coerce(spec: Input, value: Any) -> Any:
    """The value converted to the input's type; raises ValueError/TypeError if it cannot be."""
    if spec.type == INT:
        if isinstance(value, bool):
            raise TypeError("a boolean is not an integer")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return int(value)
        return int(value)
    if spec.type == FLOAT:
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        return float(value)
    if spec.type == STRING:
        if isinstance(value, dict | list):
            raise TypeError(f"{type(value).__name__} is not text")
        return str(value)
    if spec.type == BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise TypeError(f"{value!r} is not true or false")
    return value


def _check_value(node_id: str, spec: Input, value: Any, context: Any):
    """(coerced value, error or None) for a constant input."""
    where = f"node {node_id} input {spec.name!r}"
    info = spec.object_info(context)
    if not spec.is_widget:
        return value, _error(
            "invalid_input_type", f"{where} takes a {spec.type} and must be linked to a node's "
            f"output, got the constant {value!r}", f"{spec.name}, {value!r}",
            input_name=spec.name, input_config=info, received_value=_jsonable(value))
    try:
        value = _coerce(spec, value)
    except (TypeError, ValueError) as e:
        return value, _error(
            "invalid_input_type", f"Failed to convert an input value to a {spec.type} value: "
            f"{where} got {value!r} ({e})", f"{spec.name}, {value!r}, {e}",
            input_name=spec.name, input_config=info, received_value=_jsonable(value),
            exception_message=str(e))
    if spec.min is not None and value < spec.min:
        return value, _error(
            "value_smaller_than_min", f"Value {value} smaller than min of {spec.min} "
            f"({where}; allowed {spec.min}..{spec.max})", spec.name,
            input_name=spec.name, input_config=info, received_value=value)
    if spec.max is not None and value > spec.max:
        return value, _error(
            "value_bigger_than_max", f"Value {value} bigger than max of {spec.max} "
            f"({where}; allowed {spec.min}..{spec.max})", spec.name,
            input_name=spec.name, input_config=info, received_value=value)
    if spec.type == COMBO and spec.check_choices:
        choices = spec.choice_list(context)
        if value not in choices:
            shown = (f"(list of length {len(choices)})" if len(choices) > MAX_LISTED_CHOICES
                     else str(choices))
            return value, _error(
                "value_not_in_list", f"Value not in list: {where} got {value!r}; "
                f"allowed: {shown}", f"{spec.name}: {value!r} not in {shown}",
                input_name=spec.name,
                input_config=info if len(choices) <= MAX_LISTED_CHOICES else None,
                received_value=value)
    return value, None


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool | type(None)) else repr(value)


def _check_link(prompt, registry, node_id: str, spec: Input, value: Any):
    where = f"node {node_id} input {spec.name!r}"
    info = spec.object_info()
    if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
        return _error("bad_linked_input", f"Bad linked input at {where}: a link must be "
                      f"[node_id, output_index], got {list(value)!r}", spec.name,
                      input_name=spec.name, received_value=repr(value))
    source, slot = str(value[0]), value[1]
    if source not in prompt:
        return _error("bad_linked_input", f"Bad linked input at {where}: it links to node "
                      f"{source}, which is not in the workflow", f"{spec.name}, node {source}",
                      input_name=spec.name, linked_node=[source, slot])
    source_cls = registry.get(prompt[source].get("class_type"))
    if source_cls is None:
        return None  # the unknown class is reported on its own node
    outs = source_cls.schema.outputs
    if not 0 <= slot < len(outs):
        return _error("bad_linked_input", f"Bad linked input at {where}: node {source} "
                      f"({source_cls.schema.name}) has {len(outs)} output(s), no output {slot}",
                      f"{spec.name}, output {slot}", input_name=spec.name,
                      linked_node=[source, slot])
    produced = outs[slot].type
    accepted = spec.choice_list() if spec.type == COMBO else spec.type
    if not types_match(produced, accepted if spec.type != COMBO else COMBO):
        return _error("return_type_mismatch", f"Return type mismatch between linked nodes: "
                      f"{where} takes {spec.type}, but node {source} output {slot} is {produced}",
                      f"{spec.name}, {produced} != {spec.type}", input_name=spec.name,
                      input_config=info, received_type=produced, linked_node=[source, slot])
    return None


def validate_node(prompt, registry: NodeRegistry, node_id: str, context: Any = None):
    """Errors of one node's inputs (its class is known); coerces constants in place."""
    node = prompt[node_id]
    schema = registry[node["class_type"]].schema
    inputs = node.setdefault("inputs", {})
    errors = []
    for spec in schema.inputs:
        if spec.name not in inputs:
            if not spec.optional:
                errors.append(_error(
                    "required_input_missing", f"Required input is missing: node {node_id} "
                    f"({schema.name}) needs {spec.name!r} ({spec.type})", spec.name,
                    input_name=spec.name))
            continue
        value = inputs[spec.name]
        if dag.is_link(value):
            err = _check_link(prompt, registry, node_id, spec, value)
        else:
            inputs[spec.name], err = _check_value(node_id, spec, value, context)
        if err:
            errors.append(err)
    if not errors:
        constants = {k: v for k, v in inputs.items() if not dag.is_link(v)}
        problems = registry[node["class_type"]].validate_inputs(context, **constants)
        for name, problem in problems.items():
            errors.append(_error(
                "custom_validation_failed", f"Custom validation failed for node {node_id} "
                f"({schema.name}) input {name!r}: {problem}", f"{name} - {problem}",
                input_name=name, received_value=_jsonable(inputs.get(name))))
    return errors


def validate_prompt(prompt: dict, registry: NodeRegistry, context: Any = None) -> ValidationResult:
    """Check a whole API-format prompt; nothing is executed."""
    work = copy.deepcopy({str(k): v for k, v in prompt.items()}) if isinstance(prompt, dict) else {}
    result = ValidationResult(prompt=work, outputs=[])
    if not isinstance(prompt, dict) or not all(isinstance(v, dict) for v in work.values()):
        result.error = _error("invalid_prompt", "A prompt must be an object of "
                              '{"node_id": {"class_type": ..., "inputs": {...}}}', "")
        return result
    per_node: dict[str, list] = {}
    for node_id, node in work.items():
        cls = registry.get(node.get("class_type"))
        if cls is None:
            per_node[node_id] = [_missing_class(node_id, node, registry)]
        elif cls.schema.output_node:
            result.outputs.append(node_id)
    needed = dag.needed_nodes(work, result.outputs)
    for node_id in needed:
        if node_id not in per_node:
            per_node[node_id] = validate_node(work, registry, node_id, context)
    for group in dag.find_cycles(work, needed):
        for node_id in group:
            per_node.setdefault(node_id, []).append(_error(
                "dependency_cycle", f"Dependency cycle detected: node {node_id} is part of the "
                f"loop {' -> '.join(group)}; a workflow must be acyclic", " -> ".join(group),
                nodes=group))
    _collect(result, work, per_node)
    if result.error is None and not result.outputs:
        result.error = _error("prompt_no_outputs", "Prompt has no outputs: add an output node "
                              "(e.g. SaveImage or PreviewImage)", "")
    return result


def _missing_class(node_id: str, node: dict, registry: NodeRegistry) -> dict[str, Any]:
    class_type = node.get("class_type")
    title = node.get("_meta", {}).get("title", class_type) if isinstance(node.get("_meta"), dict) \
        else class_type
    if class_type is None:
        return _error("missing_node_type", f"Node #{node_id} has no class_type",
                      f"Node ID '#{node_id}'", node_id=node_id, class_type=None, node_title=title)
    return _error("missing_node_type", f"Node '{title}' not found: class {class_type!r} (node "
                  f"#{node_id}) is not registered ({len(registry)} node classes are)",
                  f"Node ID '#{node_id}'", node_id=node_id, class_type=class_type,
                  node_title=title)


def _collect(result: ValidationResult, prompt: dict, per_node: dict[str, list]) -> None:
    for node_id, errors in per_node.items():
        if not errors:
            continue
        dependents = [o for o in result.outputs if node_id in dag.needed_nodes(prompt, [o])]
        result.node_errors[node_id] = {
            "errors": errors, "dependent_outputs": dependents,
            "class_type": prompt[node_id].get("class_type"),
        }
    if not result.node_errors:
        return
    lines = [f"{e['message']}" for n in result.node_errors.values() for e in n["errors"]]
    missing = [e for n in result.node_errors.values() for e in n["errors"]
               if e["type"] == "missing_node_type"]
    if missing:  # ComfyUI answers an unknown class with that error on top
        result.error = dict(missing[0], details="\n".join(lines))
    else:
        result.error = _error("prompt_outputs_failed_validation",
                              "Prompt outputs failed validation", "\n".join(lines))
