"""Built-in nodes, under ComfyUI's class names, inputs, defaults and ranges.

Nothing registers itself: call :func:`register_builtin_nodes` on the registry you pass to the
engine (model nodes are registered the same way by the code that owns models).
"""

from __future__ import annotations

from noisecraft.graph.registry import NodeRegistry
from noisecraft.nodes.custom_samplers import CUSTOM_SAMPLER_NODES
from noisecraft.nodes.files import FILE_NODES
from noisecraft.nodes.image import IMAGE_NODES
from noisecraft.nodes.image_ops import IMAGE_OP_NODES
from noisecraft.nodes.latent import LATENT_NODES
from noisecraft.nodes.latent_files import LATENT_FILE_NODES
from noisecraft.nodes.latent_ops import LATENT_OP_NODES
from noisecraft.nodes.mask_ops import MASK_OP_NODES
from noisecraft.nodes.sampling import SAMPLING_NODES

MODEL_FREE_NODES = (*LATENT_NODES, *LATENT_OP_NODES, *IMAGE_NODES, *IMAGE_OP_NODES,
                    *MASK_OP_NODES, *FILE_NODES, *LATENT_FILE_NODES, *SAMPLING_NODES,
                    *CUSTOM_SAMPLER_NODES)


def model_nodes() -> tuple:
    """The nodes that run models (loaders, conditioning, samplers, VAE, teaching) and those
    that edit their values (CONDITIONING, MODEL patches); the former find the engine in
    ``ExecutionContext.resources["engine"]``."""
    from noisecraft.nodes.conditioning import CONDITIONING_NODES
    from noisecraft.nodes.conditioning_ops import CONDITIONING_OP_NODES
    from noisecraft.nodes.control import CONTROL_NODES
    from noisecraft.nodes.loaders import LOADER_NODES
    from noisecraft.nodes.model_patches import MODEL_PATCH_NODES
    from noisecraft.nodes.samplers import SAMPLER_NODES
    from noisecraft.nodes.teaching import TEACHING_NODES
    from noisecraft.nodes.ultimate_sd_upscale import ULTIMATE_SD_UPSCALE_NODES
    from noisecraft.nodes.upscale import UPSCALE_NODES
    from noisecraft.nodes.vae import VAE_NODES

    return (*LOADER_NODES, *MODEL_PATCH_NODES, *CONDITIONING_NODES, *CONDITIONING_OP_NODES,
            *SAMPLER_NODES, *VAE_NODES, *TEACHING_NODES, *CONTROL_NODES, *UPSCALE_NODES,
            *ULTIMATE_SD_UPSCALE_NODES)


def register_builtin_nodes(registry: NodeRegistry, *, models: bool = True) -> NodeRegistry:
    """Add the built-in nodes (with ``models``: the model nodes too); returns the registry."""
    registry.register_all(MODEL_FREE_NODES)
    if models:
        registry.register_all(model_nodes())
    return registry


def builtin_registry(*, models: bool = True) -> NodeRegistry:
    """A new registry holding all the built-in nodes (``models=False``: only the model-free
    ones, which need no engine)."""
    return register_builtin_nodes(NodeRegistry(), models=models)
