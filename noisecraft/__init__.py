"""noisecraft: diffusion-model image generation you can see into."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that ``import noisecraft`` (and the CLI's start) does not load torch.
    if name == "generate_image":
        from noisecraft.api import generate_image

        return generate_image
    raise AttributeError(f"module 'noisecraft' has no attribute {name!r}")


__all__ = ["generate_image", "__version__"]
