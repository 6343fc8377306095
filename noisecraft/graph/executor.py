"""Running a validated prompt: needed nodes only, in topological order, cached, interruptible.

Events flow out through one callback ``on_event(name, data)`` with ComfyUI's names and data:

* ``execution_start`` ``{"prompt_id"}``
* ``execution_cached`` ``{"nodes": [ids served from the cache], "prompt_id"}``
* ``executing`` ``{"node": id, "prompt_id"}``; ``{"node": None, ...}`` when the run is over
* ``progress`` ``{"value", "max", "node", "prompt_id"[, "preview"]}`` (sent by nodes)
* ``executed`` ``{"node", "output": ui data, "prompt_id"}`` (nodes that return UI data)
* ``execution_success`` ``{"prompt_id"}``
* ``execution_interrupted`` ``{"prompt_id", "node_id", "node_type", "executed"}``
* ``execution_error`` ``{"prompt_id", "node_id", "node_type", "executed",
  "exception_message", "exception_type", "traceback", "current_inputs"}``

Interruption flows in through ``context.cancel`` (a :class:`~noisecraft.request.CancelToken`):
checked before every node, and by nodes themselves via ``NodeContext.check_interrupted()``.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from noisecraft.graph import dag
from noisecraft.graph.cache import CachedResult, OutputCache, signatures
from noisecraft.graph.context import (
    EventCallback,
    ExecutionContext,
    ExecutionInterrupted,
    NodeContext,
)
from noisecraft.graph.registry import NodeRegistry
from noisecraft.graph.schema import NodeOutput
from noisecraft.graph.validate import PromptValidationError, ValidationResult, validate_prompt
from noisecraft.request import Interrupted


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # output node -> UI data
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # node -> output values
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None


class NodeExecutionError(RuntimeError):
    """A node raised while running; ``details`` is ComfyUI's execution_error payload."""

    def __init__(self, details: dict[str, Any]):
        super().__init__(
            f"node {details['node_id']} ({details['node_type']}) failed: "
            f"{details['exception_type']}: {details['exception_message']}"
        )
        self.details = details


def _format(value: Any) -> Any:
    return value if isinstance(value, int | float | bool | str | type(None)) else str(value)


def _ignore(name: str, data: dict[str, Any]) -> None:
    pass


class Executor:
    """Runs prompts against a registry; owns the output cache (so keep one per session)."""

    def __init__(self, registry: NodeRegistry, *, cache: OutputCache | None = None) -> None:
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()

    def validate(self, prompt: dict, context: ExecutionContext | None = None) -> ValidationResult:
        return validate_prompt(prompt, self.registry, context)

    def execute(
        self,
        prompt: dict,
        context: ExecutionContext,
        *,
        prompt_id: str | None = None,
        on_event: EventCallback | None = None,
        extra_pnginfo: Mapping[str, Any] | None = None,
    ) -> RunResult:
        """Validate (raising :class:`PromptValidationError` with ComfyUI's error body, before
        anything runs), then run the nodes the output nodes need."""
        checked = self.validate(prompt, context)
        if not checked.ok:
            raise PromptValidationError(checked)
        emit = on_event or _ignore
        run = RunResult(prompt_id=prompt_id or str(uuid.uuid4()), status="success")
        work = checked.prompt
        order = dag.topological_order(work, dag.needed_nodes(work, checked.outputs))
        emit("execution_start", {"prompt_id": run.prompt_id})
        fingerprints = {n: self._fingerprint(work, n, context) for n in order}
        sigs = signatures(work, order, fingerprints)
        run.cached = [n for n in order if sigs[n] in self.cache]
        emit("execution_cached", {"nodes": list(run.cached), "prompt_id": run.prompt_id})
        for node_id in order:
            hit = self.cache.get(sigs[node_id])
            if hit is None:
                if context.cancel.cancelled:
                    return self._interrupted(run, work, node_id, emit)
                emit("executing", {"node": node_id, "prompt_id": run.prompt_id})
                try:
                    hit = self._run_node(work, node_id, run, context, emit, extra_pnginfo)
                except (ExecutionInterrupted, Interrupted):
                    return self._interrupted(run, work, node_id, emit)
                except Exception as ex:  # reported as ComfyUI does, not raised
                    return self._failed(run, work, node_id, ex, emit)
                self.cache.put(sigs[node_id], hit)
                run.executed.append(node_id)
            run.values[node_id] = hit.values
            if hit.ui is not None:
                run.outputs[node_id] = hit.ui
                emit("executed", {"node": node_id, "output": hit.ui, "prompt_id": run.prompt_id})
        emit("executing", {"node": None, "prompt_id": run.prompt_id})
        emit("execution_success", {"prompt_id": run.prompt_id})
        return run

    def _fingerprint(self, prompt, node_id: str, context: ExecutionContext) -> Any:
        cls = self.registry[prompt[node_id]["class_type"]]
        constants = {k: v for k, v in prompt[node_id]["inputs"].items() if not dag.is_link(v)}
        try:
            return cls.fingerprint(context, **constants)
        except Exception as ex:  # an unreadable file etc.: never serve a stale cached result
            return f"unfingerprintable:{uuid.uuid4()}:{type(ex).__name__}"

    def _run_node(self, prompt, node_id, run, context, emit, extra_pnginfo) -> CachedResult:
        node = prompt[node_id]
        cls = self.registry[node["class_type"]]
        kwargs = {}
        for name, value in node["inputs"].items():
            if cls.schema.input(name) is None:
                continue  # ComfyUI ignores inputs the schema does not declare
            if dag.is_link(value):
                kwargs[name] = run.values[str(value[0])][value[1]]
            else:
                kwargs[name] = value
        if cls.schema.needs_context:
            kwargs["context"] = NodeContext(
                node_id=node_id, prompt_id=run.prompt_id, execution=context, emit=emit,
                prompt=prompt, extra_pnginfo=extra_pnginfo,
            )
        result = cls.execute(**kwargs)
        if isinstance(result, NodeOutput):
            values, ui = tuple(result.values), result.ui
        else:
            values, ui = tuple(result if result is not None else ()), None
        expected = len(cls.schema.outputs)
        if len(values) != expected:
            raise TypeError(
                f"{cls.schema.name}.execute returned {len(values)} value(s) but its schema "
                f"declares {expected} output(s)"
            )
        return CachedResult(values=values, ui=ui)

    def _interrupted(self, run: RunResult, prompt, node_id: str, emit) -> RunResult:
        run.status = "interrupted"
        run.error = {
            "prompt_id": run.prompt_id, "node_id": node_id,
            "node_type": prompt[node_id]["class_type"], "executed": list(run.executed),
        }
        emit("execution_interrupted", dict(run.error))
        return run

    def _failed(self, run: RunResult, prompt, node_id: str, ex: Exception, emit) -> RunResult:
        run.status = "error"
        kind = type(ex)
        inputs = prompt[node_id]["inputs"]
        run.error = {
            "prompt_id": run.prompt_id, "node_id": node_id,
            "node_type": prompt[node_id]["class_type"], "executed": list(run.executed),
            "exception_message": str(ex),
            "exception_type": kind.__qualname__ if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}",
            "traceback": traceback.format_tb(ex.__traceback__),
            "current_inputs": {k: _format(v) for k, v in inputs.items()},
        }
        emit("execution_error", dict(run.error))
        return run
