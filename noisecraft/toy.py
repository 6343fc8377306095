"""A diffusion model you can train in seconds: an MLP denoiser on 2-D (or 1-D) toy data.

It uses the same pieces as the image models - a :class:`~noisecraft.schedules.DiscreteSchedule`,
the VP forward process :func:`~noisecraft.diffusion.q_sample`, eps-prediction (Ho et al. 2020,
Alg. 1), the :class:`~noisecraft.diffusion.Denoiser` contract and the sampler registry - so what
you see here is what happens inside Stable Diffusion, in a space small enough to plot.

Data sets (all deterministic by seed):

* ``spiral``: a two-turn spiral, 2-D.
* ``moons``: two interleaved half circles, 2-D.
* ``eight``: the 1-D data set in which every point is 8.  The optimal denoiser is the constant 8,
  so a trained model's samples must pile up there.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from noisecraft.diffusion import Denoiser, append_dims, q_sample
from noisecraft.samplers import Step, get_sampler, sample
from noisecraft.schedules import DiscreteSchedule, spacing_sigmas

DATASETS = ("spiral", "moons", "eight")


def make_data(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """n points [n, D] of the named data set (D = 2, or 1 for ``eight``), roughly unit scale."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if name == "spiral":
        u = torch.rand(n, generator=generator).sqrt()  # denser where the arm is longer
        angle = 4 * math.pi * u
        radius = 0.2 + 1.8 * u
        pts = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
        return pts + 0.05 * torch.randn(n, 2, generator=generator)
    if name == "moons":
        upper = torch.rand(n, generator=generator) < 0.5
        angle = math.pi * torch.rand(n, generator=generator)
        x = torch.where(upper, angle.cos(), 1 - angle.cos())
        y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
        pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
        return pts + 0.05 * torch.randn(n, 2, generator=generator)
    if name == "eight":
        return torch.full((n, 1), 8.0)
    raise ValueError(f"unknown toy data set {name!r}; choose one of: {', '.join(DATASETS)}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (continuous) timesteps t [B] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _block(hidden: int) -> nn.Module:
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class ToyMLP(nn.Module):
    """eps-prediction network ``(x_t [B, D], t [B]) -> eps [B, D]``: residual SiLU MLP, with the
    timestep embedding added to the input of every block."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, t_dim: int = 32):
        super().__init__()
        self.t_dim = t_dim
        self.inp = nn.Linear(dim, hidden)
        self.t_proj = nn.ModuleList(nn.Linear(t_dim, hidden) for _ in range(depth))
        self.blocks = nn.ModuleList(_block(hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.t_dim)
        h = self.inp(x)
        for proj, block in zip(self.t_proj, self.blocks, strict=True):
            h = h + block(h + proj(emb))
        return self.out(h)


@dataclass(frozen=True)
class ToyConfig:
    """How a toy model is built and trained (DDPM's linear betas 1e-4 -> 0.02 over 1000 steps)."""

    hidden: int = 128
    depth: int = 3
    batch_size: int = 512
    lr: float = 3e-3
    num_data: int = 4096
    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_threads: int | None = 1  # small matmuls run fastest on one thread; None keeps torch's

    def build_schedule(self) -> DiscreteSchedule:
        return DiscreteSchedule.from_betas(
            self.schedule, self.num_timesteps, self.beta_start, self.beta_end
        )


@dataclass(frozen=True, eq=False)
class ToyModel:
    """A trained toy network with its schedule and training data; ``denoiser`` is the contract."""

    data_name: str
    net: ToyMLP
    schedule: DiscreteSchedule
    data: torch.Tensor  # [N, D], what it was trained on
    losses: list[float] = field(default_factory=list)

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, prediction="eps")


def train_toy(
    data: str = "moons", steps: int = 2000, seed: int = 0, config: ToyConfig = ToyConfig()
) -> ToyModel:
    """Train an eps-prediction MLP on the named data set for ``steps`` Adam steps.

    Loss: ||eps - net(q_sample(x0, eps, t), t)||^2 with t uniform over the schedule (Ho et al.
    2020, Alg. 1).  Deterministic by seed: weights, data and batches come from seeded generators
    (the global RNG is forked and restored around weight initialisation).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"training steps must be a whole number >= 1, got {steps!r}")
    gen = torch.Generator().manual_seed(seed)
    x0_all = make_data(data, config.num_data, gen)
    schedule = config.build_schedule()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyMLP(x0_all.shape[1], config.hidden, config.depth)
    losses: list[float] = []
    with _torch_threads(config.num_threads):
        _fit(net, x0_all, schedule, steps, config, gen, losses)
    net.eval()
    return ToyModel(data, net, schedule, x0_all, losses)


@contextmanager
def _torch_threads(n: int | None):
    """Run the block with torch's intra-op thread count set to n, then restore it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(net, x0_all, schedule, steps, config, gen, losses) -> None:
    ac = schedule.alphas_cumprod.float()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=config.lr / 20)
    for _ in range(steps):
        idx = torch.randint(len(x0_all), (config.batch_size,), generator=gen)
        x0 = x0_all[idx]
        t = torch.randint(schedule.num_timesteps, (config.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = (net(q_sample(x0, eps, t, ac), t.float()) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())


@dataclass(frozen=True, eq=False)
class ToySamples:
    """Samples [n, D] and their reverse trajectories.

    ``path`` [steps + 1, n, D] holds the state after each step in the network's variance-
    preserving scale ``x / sqrt(1 + sigma^2)`` (so the start is ~N(0, I) and the end is the
    sample), ``sigmas`` [steps + 1] the noise level of each row.
    """

    x: torch.Tensor
    path: torch.Tensor
    sigmas: torch.Tensor


@torch.no_grad()
def sample_toy(
    model: ToyModel,
    n: int = 1000,
    sampler: str = "euler",
    steps: int = 50,
    seed: int = 0,
    spacing: str = "normal",
    num_threads: int | None = 1,
) -> ToySamples:
    """Draw n samples by running a registered sampler over the model's Denoiser.

    Deterministic by seed (initial noise and any sampler noise come from one seeded generator).
    """
    get_sampler(sampler)  # a clear error before any work
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sigmas = spacing_sigmas(spacing, model.schedule, steps).float()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.data.shape[1], generator=gen) * sigmas[0]
    vp = [x / (1 + sigmas[0] ** 2).sqrt()]

    def record(step: Step) -> None:
        c_in = 1 / (1 + torch.tensor(step.sigma_next) ** 2).sqrt()
        vp.append(step.x * append_dims(c_in.expand(n), step.x.ndim))

    with _torch_threads(num_threads):
        out = sample(sampler, model.denoiser.bind(), x, sigmas, callback=record, generator=gen)
    return ToySamples(out, torch.stack(vp), sigmas)


def mean_nn_distance(points: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over points [n, D] of the Euclidean distance to the nearest point of reference."""
    return float(torch.cdist(points.float(), reference.float()).min(dim=1).values.mean())
