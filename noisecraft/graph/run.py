"""``run_workflow``: a workflow file or dict in either format, run to its outputs.

(The ``noisecraft run`` CLI command is not written yet; it will be a thin layer over this.)
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from noisecraft.graph.context import EventCallback, ExecutionContext, ExecutionInterrupted
from noisecraft.graph.executor import Executor, NodeExecutionError, RunResult
from noisecraft.graph.registry import NodeRegistry
from noisecraft.graph.ui_format import is_api_format, is_ui_format, ui_to_api
from noisecraft.graph.ui_graph import WorkflowFormatError


def load_workflow(
    workflow: dict[str, Any] | str | os.PathLike, registry: NodeRegistry
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(API-format prompt, the UI-format workflow or None) from a dict or a JSON file.

    Also accepts ComfyUI's ``{"prompt": {...}}`` request body and a PNG's ``prompt`` text."""
    if not isinstance(workflow, dict):
        path = Path(workflow)
        try:
            workflow = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise WorkflowFormatError(f"cannot read workflow {path}: {e}") from None
    if isinstance(workflow, dict) and isinstance(workflow.get("prompt"), dict):
        workflow = workflow["prompt"]
    if is_ui_format(workflow):
        return ui_to_api(workflow, registry), workflow
    if is_api_format(workflow):
        return copy.deepcopy({str(k): v for k, v in workflow.items()}), None
    raise WorkflowFormatError(
        "not a ComfyUI workflow: expected the API format "
        '{"3": {"class_type": "KSampler", "inputs": {...}}, ...} or the editor\'s format '
        '{"nodes": [...], "links": [...]}'
    )


def apply_overrides(prompt: dict[str, dict[str, Any]], overrides: Mapping[str, Any]) -> None:
    """Set inputs by ``"<node id>.<input name>"`` keys, e.g. ``{"3.seed": 42}`` (in place)."""
    for key, value in overrides.items():
        node_id, dot, name = str(key).rpartition(".")
        if not dot or not node_id or not name:
            raise ValueError(
                f"override key {key!r} must look like '<node id>.<input>', e.g. '3.seed'"
            )
        if node_id not in prompt:
            raise KeyError(
                f"override {key!r}: the workflow has no node {node_id!r} "
                f"(its nodes: {', '.join(sorted(prompt))})"
            )
        prompt[node_id].setdefault("inputs", {})[name] = value


def run_workflow(
    workflow: dict[str, Any] | str | os.PathLike,
    *,
    registry: NodeRegistry,
    context: ExecutionContext,
    overrides: Mapping[str, Any] | None = None,
    executor: Executor | None = None,
    on_event: EventCallback | None = None,
) -> dict[str, dict[str, Any]]:
    """Run a workflow; returns the UI outputs of its output nodes, e.g.
    ``{"9": {"images": [{"filename": ..., "subfolder": ..., "type": "output"}]}}``.

    Raises :class:`~noisecraft.graph.validate.PromptValidationError` (nothing ran; ``.result``
    holds ComfyUI's error body), :class:`NodeExecutionError` or :class:`ExecutionInterrupted`.
    Pass one ``executor`` to several calls to reuse its cache."""
    return run_workflow_result(
        workflow, registry=registry, context=context, overrides=overrides,
        executor=executor, on_event=on_event,
    ).outputs


def run_workflow_result(
    workflow: dict[str, Any] | str | os.PathLike,
    *,
    registry: NodeRegistry,
    context: ExecutionContext,
    overrides: Mapping[str, Any] | None = None,
    executor: Executor | None = None,
    on_event: EventCallback | None = None,
) -> RunResult:
    """Like :func:`run_workflow` but returns the whole :class:`RunResult` (values, ids run)."""
    prompt, ui = load_workflow(workflow, registry)
    apply_overrides(prompt, overrides or {})
    executor = executor or Executor(registry)
    extra = {"workflow": ui} if ui is not None else None
    result = executor.execute(prompt, context, on_event=on_event, extra_pnginfo=extra)
    if result.status == "interrupted":
        raise ExecutionInterrupted(result.error["node_id"] if result.error else None)
    if result.status == "error":
        raise NodeExecutionError(result.error)
    return result
