"""noisecraft: diffusion-model image generation you can see into."""

__version__ = "0.1.0"
