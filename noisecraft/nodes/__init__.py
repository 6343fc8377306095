"""Built-in nodes, under ComfyUI's class names, inputs, defaults and ranges.

Nothing registers itself: call :func:`register_builtin_nodes` on the registry you pass to the
engine (model nodes are registered the same way by the code that owns models).
"""

from __future__ import annotations

from noisecraft.graph.registry import NodeRegistry
from noisecraft.nodes.files import FILE_NODES
from noisecraft.nodes.image import IMAGE_NODES
from noisecraft.nodes.latent import LATENT_NODES
from noisecraft.nodes.sampling import SAMPLING_NODES

MODEL_FREE_NODES = (*LATENT_NODES, *IMAGE_NODES, *FILE_NODES, *SAMPLING_NODES)


def register_builtin_nodes(registry: NodeRegistry) -> NodeRegistry:
    """Add the nodes that need no loaded model; returns the registry."""
    registry.register_all(MODEL_FREE_NODES)
    return registry


def builtin_registry() -> NodeRegistry:
    """A new registry holding the built-in nodes."""
    return register_builtin_nodes(NodeRegistry())
