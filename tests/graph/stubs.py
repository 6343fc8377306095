"""Stub nodes for engine tests: arithmetic on numbers, with per-test execution counts."""

from __future__ import annotations

from collections import Counter

from noisecraft.graph import Input, Node, NodeOutput, NodeRegistry, NodeSchema, Output
from noisecraft.graph.schema import COMBO, FLOAT, INT, STRING

NUMBER = "NUMBER"


def stub_registry(calls: Counter, cancel_after: str | None = None) -> NodeRegistry:
    """A fresh registry whose nodes count their executions in ``calls``."""

    class Const(Node):
        schema = NodeSchema(
            name="Const", category="test",
            inputs=[Input("value", INT, default=1, min=0, max=100)],
            outputs=[Output(NUMBER, "number")],
        )

        @classmethod
        def execute(cls, value):
            calls["Const"] += 1
            return (value,)

    class Add(Node):
        schema = NodeSchema(
            name="Add", category="test",
            inputs=[Input("a", NUMBER), Input("b", NUMBER),
                    Input("bias", FLOAT, default=0.0, min=-10.0, max=10.0, optional=True)],
            outputs=[Output(NUMBER)],
        )

        @classmethod
        def execute(cls, a, b, bias=0.0):
            calls["Add"] += 1
            return (a + b + bias,)

    class Scale(Node):
        schema = NodeSchema(
            name="Scale", category="test",
            inputs=[Input("x", NUMBER), Input("mode", COMBO, choices=["double", "triple"])],
            outputs=[Output(NUMBER)], needs_context=True,
        )

        @classmethod
        def execute(cls, x, mode, context):
            calls["Scale"] += 1
            for step in range(3):
                context.progress(step + 1, 3)
                if cancel_after == "Scale":
                    context.execution.cancel.cancel()
                context.check_interrupted()
            return (x * (2 if mode == "double" else 3),)

    class Text(Node):
        schema = NodeSchema(name="Text", inputs=[Input("text", STRING, default="")],
                            outputs=[Output(STRING)])

        @classmethod
        def execute(cls, text):
            calls["Text"] += 1
            return (text,)

    class Show(Node):
        schema = NodeSchema(
            name="Show", category="test", output_node=True,
            inputs=[Input("x", NUMBER)], outputs=[], needs_context=True,
        )

        @classmethod
        def execute(cls, x, context):
            calls["Show"] += 1
            if cancel_after == "Show":
                context.execution.cancel.cancel()
            return NodeOutput((), ui={"value": [x]})

    class Boom(Node):
        schema = NodeSchema(name="Boom", inputs=[Input("x", NUMBER)], outputs=[Output(NUMBER)])

        @classmethod
        def execute(cls, x):
            calls["Boom"] += 1
            raise RuntimeError("boom")

    return NodeRegistry([Const, Add, Scale, Text, Show, Boom])


def chain_prompt() -> dict:
    """1,2 -> Add(3) -> Scale(4) -> Show(5); Const 6 -> Show 7 (a second output); 8 unused."""
    return {
        "1": {"class_type": "Const", "inputs": {"value": 2}},
        "2": {"class_type": "Const", "inputs": {"value": 3}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Scale", "inputs": {"x": ["3", 0], "mode": "double"}},
        "5": {"class_type": "Show", "inputs": {"x": ["4", 0]}},
        "6": {"class_type": "Const", "inputs": {"value": 7}},
        "7": {"class_type": "Show", "inputs": {"x": ["6", 0]}},
        "8": {"class_type": "Const", "inputs": {"value": 50}},
    }
