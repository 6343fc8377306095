"""Declarative node schemas: typed inputs (defaults, ranges, choices) and typed outputs.

A node is a class with a ``schema`` (a :class:`NodeSchema`) and a stateless classmethod
``execute(**inputs)``; no instance is ever created and nothing is stored on the class.
The shapes follow ComfyUI (its V3 ``io.ComfyNode`` schema and its ``/object_info`` JSON), so a
workflow written for ComfyUI names the same inputs, and a ComfyUI front end can draw our nodes::

    class ImageInvert(Node):
        schema = NodeSchema(
            name="ImageInvert", display_name="Invert Image", category="image",
            inputs=[Input("image", IMAGE)],
            outputs=[Output(IMAGE)],
        )

        @classmethod
        def execute(cls, image):
            return (1.0 - image,)

``execute`` returns a tuple (one value per output) or a :class:`NodeOutput` carrying UI data
(e.g. saved images).  A node whose schema sets ``needs_context=True`` also receives
``context=`` (a :class:`~noisecraft.graph.context.NodeContext`: folders, cancel token, progress).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Value types: the wire names ComfyUI uses, so links type-check against its workflows.
MODEL, CLIP, VAE, CONDITIONING = "MODEL", "CLIP", "VAE", "CONDITIONING"
LATENT, IMAGE, MASK = "LATENT", "IMAGE", "MASK"
SIGMAS, NOISE, SAMPLER, GUIDER = "SIGMAS", "NOISE", "SAMPLER", "GUIDER"
INT, FLOAT, STRING, BOOLEAN, COMBO = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"
ANY = "*"
WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
PIXEL_POSITION = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}
"""Widget range of a pixel coordinate (ComfyUI's x / y inputs of image and mask nodes)."""
PIXEL_SIZE = {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}
"""Widget range of a pixel width / height (ComfyUI's EmptyImage, SolidMask, crops)."""
MAX_SEED = 0xFFFFFFFFFFFFFFFF

Choices = Sequence[str] | Callable[[Any], Sequence[str]]


@dataclass(frozen=True)
class Input:
    """One input.  Widget types (INT/FLOAT/STRING/BOOLEAN/COMBO) carry a value in the workflow;
    the others must be fed by a link.  ``choices`` (COMBO) may be a callable of the execution
    context, evaluated at validation time (e.g. the files in the input folder)."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: Choices | None = None
    optional: bool = False
    tooltip: str | None = None
    multiline: bool = False
    round: float | bool | None = None
    control_after_generate: bool | None = None  # None: ComfyUI's rule (INT named seed/noise_seed)
    image_upload: bool = False  # LoadImage: the editor adds an "upload" widget after this one
    check_choices: bool = True  # False: the node's validate_inputs checks the value instead
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type == COMBO and self.choices is None:
            raise ValueError(f"COMBO input {self.name!r} needs choices (a list or a callable)")

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    @property
    def has_control_widget(self) -> bool:
        """Whether the editor adds a hidden ``control_after_generate`` widget after this one."""
        if self.control_after_generate is not None:
            return self.control_after_generate
        return self.type == INT and self.name in ("seed", "noise_seed")

    def choice_list(self, context: Any = None) -> list[str]:
        if self.choices is None:
            return []
        values = self.choices(context) if callable(self.choices) else self.choices
        return list(values)

    def object_info(self, context: Any = None) -> list[Any]:
        """``[type, {options}]`` or ``[[choices], {options}]`` as in ComfyUI's /object_info."""
        opts: dict[str, Any] = {}
        for key in ("default", "min", "max", "step", "round", "tooltip"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.multiline:
            opts["multiline"] = True
        if self.control_after_generate:
            opts["control_after_generate"] = True
        if self.image_upload:
            opts["image_upload"] = True
        opts.update(self.extra)
        head: Any = self.choice_list(context) if self.type == COMBO else self.type
        return [head, opts] if opts else [head]


@dataclass(frozen=True)
class Output:
    type: str
    name: str | None = None
    is_list: bool = False
    tooltip: str | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.type


@dataclass(frozen=True)
class NodeSchema:
    name: str
    inputs: Sequence[Input] = ()
    outputs: Sequence[Output] = ()
    display_name: str | None = None
    category: str = "sd"
    description: str = ""
    output_node: bool = False
    needs_context: bool = False
    python_module: str = "noisecraft.nodes"

    def __post_init__(self) -> None:
        names = [i.name for i in self.inputs]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"node {self.name!r} declares input(s) twice: {sorted(dupes)}")

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def required(self) -> list[Input]:
        return [i for i in self.inputs if not i.optional]

    @property
    def widgets(self) -> list[Input]:
        """Widget inputs in the editor's order: required first, then optional."""
        return [i for i in self.required if i.is_widget] + [
            i for i in self.inputs if i.optional and i.is_widget
        ]

    def object_info(self, context: Any = None) -> dict[str, Any]:
        """This node's entry in ComfyUI's ``/object_info`` JSON."""
        required = {i.name: i.object_info(context) for i in self.inputs if not i.optional}
        optional = {i.name: i.object_info(context) for i in self.inputs if i.optional}
        inputs: dict[str, Any] = {"required": required}
        order: dict[str, list[str]] = {"required": list(required)}
        if optional:
            inputs["optional"] = optional
            order["optional"] = list(optional)
        info = {
            "input": inputs,
            "input_order": order,
            "output": [o.type for o in self.outputs],
            "output_is_list": [o.is_list for o in self.outputs],
            "output_name": [o.display_name for o in self.outputs],
            "name": self.name,
            "display_name": self.display_name or self.name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if any(o.tooltip for o in self.outputs):
            info["output_tooltips"] = [o.tooltip for o in self.outputs]
        return info


@dataclass(frozen=True)
class NodeOutput:
    """What ``execute`` may return instead of a plain tuple: values plus UI data."""

    values: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


class Node:
    """Base class of nodes: a ``schema`` and a stateless classmethod ``execute``.

    ``fingerprint`` (optional) returns something that changes when the node's result would
    change although its inputs did not (ComfyUI's IS_CHANGED), e.g. a file's hash.
    """

    schema: ClassVar[NodeSchema]

    @classmethod
    def execute(cls, **inputs: Any) -> tuple[Any, ...] | NodeOutput:
        raise NotImplementedError(f"node {cls.__name__} does not implement execute()")

    @classmethod
    def fingerprint(cls, context: Any = None, **inputs: Any) -> Any:
        return None

    @classmethod
    def validate_inputs(cls, context: Any = None, **inputs: Any) -> dict[str, str]:
        """Extra checks of constant inputs (ComfyUI's VALIDATE_INPUTS): {input name: problem}."""
        return {}
