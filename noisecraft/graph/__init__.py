"""The node-graph engine: schemas, registry, workflow formats, validation, execution, cache.

It never imports the node list: callers build a :class:`NodeRegistry` and pass it in
(``noisecraft.nodes.register_builtin_nodes`` adds the built-in nodes).
"""

from noisecraft.graph.cache import OutputCache
from noisecraft.graph.context import (
    ExecutionContext,
    ExecutionInterrupted,
    NodeContext,
    UnsafePathError,
    safe_join,
)
from noisecraft.graph.executor import Executor, NodeExecutionError, RunResult
from noisecraft.graph.registry import NodeRegistry
from noisecraft.graph.run import apply_overrides, load_workflow, run_workflow, run_workflow_result
from noisecraft.graph.schema import Input, Node, NodeOutput, NodeSchema, Output
from noisecraft.graph.ui_format import ui_to_api
from noisecraft.graph.ui_graph import WorkflowFormatError
from noisecraft.graph.validate import PromptValidationError, ValidationResult, validate_prompt

__all__ = [
    "ExecutionContext", "ExecutionInterrupted", "Executor", "Input", "Node", "NodeContext",
    "NodeExecutionError", "NodeOutput", "NodeRegistry", "NodeSchema", "Output", "OutputCache",
    "PromptValidationError", "RunResult", "UnsafePathError", "ValidationResult",
    "WorkflowFormatError", "apply_overrides", "load_workflow", "run_workflow",
    "run_workflow_result", "safe_join", "ui_to_api", "validate_prompt",
]
