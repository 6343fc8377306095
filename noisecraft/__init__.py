"""noisecraft: diffusion-model image generation you can see into."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that ``import noisecraft`` (and the CLI's start) does not load torch.
    if name in ("generate_image", "sd_upscale_image"):
        from noisecraft import api

        return getattr(api, name)
    raise AttributeError(f"module 'noisecraft' has no attribute {name!r}")


__all__ = ["generate_image", "sd_upscale_image", "__version__"]
