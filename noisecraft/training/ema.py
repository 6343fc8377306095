"""Exponential moving average of a model's weights (Polyak averaging).

``shadow = decay_t * shadow + (1 - decay_t) * weights`` after every optimiser step, with the
warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` of Tensorflow's ``ExponentialMovingAverage``
(``num_updates``), which the LDM code base uses too: early on the average follows the weights
closely, later it averages over ~1 / (1 - decay) steps.

The decay is a pure function of the update count, and the shadow tensors are plain float32
tensors keyed like the model's ``state_dict``, so the whole state is ``(shadow, num_updates)``
and saves and restores exactly.  Buffers (none in the U-Net, VAE or CLIP) are copied, not
averaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def ema_decay(decay: float, num_updates: int) -> float:
    """The decay used for update number ``num_updates`` (0-based), with warm-up."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """The running average of the trainable parameters of ``model``.

    ``update(model)`` after each optimiser step; ``copy_to(model)`` or ``swapped(model)`` to use
    the averaged weights (e.g. for sampling); ``state_dict()`` / ``load_state_dict()`` to save.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), e.g. 0.999; got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay(self.decay, self.num_updates)
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            avg.lerp_(params[name].detach().float(), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the averages."""
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            params[name].copy_(avg.to(params[name].dtype))

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run a block with the averaged weights in ``model``; the trained ones come back after."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged values in place of the trainable weights."""
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        for name, avg in self.shadow.items():
            sd[name] = avg.to(sd[name].dtype)
        return sd

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(
                f"EMA state does not match the model: {len(missing)} parameter names differ, "
                f"e.g. {sorted(missing)[:3]}; was it saved for another architecture?"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
