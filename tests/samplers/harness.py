"""Shared test tooling for samplers: the analytic Gaussian mixture, diffusers parity, statistics.

Everything here runs in float64 on the CPU on ``tests.analytic.GaussianMixture.default()`` (3
components in 2-D), whose optimal denoiser ``E[x0 | x]`` is exact.  Four tools:

(a) :func:`run_sampler` - a noisecraft sampler (registry name or function) on the GMM
    denoiser, recording the state after every step as a :class:`Trajectory`.
(b) :func:`run_diffusers` - a configured diffusers scheduler on the SAME model: an eps (or v)
    predictor derived from the GMM, fed through the scheduler's own input convention, with its
    ``randn_tensor`` calls intercepted so the injected noise is known.  :func:`run_pair` runs
    diffusers first, then the noisecraft sampler on the very sigmas diffusers visited with the
    very noise diffusers drew (replayed in order by :class:`ListNoise`), and returns both
    trajectories in the VE convention ``x = x0 + sigma * eps``, float64.
(c) :func:`mixture_stats` / :func:`assert_matches_mixture` - per-component mass, mean and
    std of samples, compared with the mixture within ``z`` Monte-Carlo standard errors
    (plus an optional stated allowance for discretisation bias).
(d) :func:`convergence_order` - RMS error at sigma_min against an independent high-accuracy
    solution of the probability-flow ODE (scipy DOP853, rtol 1e-11) at several step counts,
    and the fitted log-log slope.

How the diffusers side works (read this before writing a parity test)
---------------------------------------------------------------------
* Build the scheduler yourself with the config you want to test (``use_karras_sigmas``,
  ``timestep_spacing``, ``clip_sample=False`` for DDPM/DDIM, ...), and pass it un-set; the
  harness calls ``set_timesteps(steps)`` (extra kwargs via ``set_timesteps_kwargs``).
* ``upcast=True`` (default) converts the scheduler's float32 tables (``sigmas``,
  ``alphas_cumprod``, ``sigmas_interpol``, ...; never ``timesteps``) to float64 after
  ``set_timesteps``: both sides then do float64 arithmetic on identical (float32-rounded)
  values.  Some schedulers still cast the sample to float32 inside ``step`` (Euler, Euler
  ancestral): their parity is limited to ~1e-6 by that, not by the algorithm.
* Convention: schedulers with ``init_noise_sigma != 1`` (Euler, Heun, KDPM2, LMS) keep the
  sample in VE form and divide by ``sqrt(1 + sigma^2)`` in ``scale_model_input``; the others
  (DDPM, DDIM, LCM, DPM-Solver, UniPC) keep the VP sample ``x / sqrt(1 + sigma^2)``.
  Trajectories are converted to VE with the sigma each state lives at.
* Which sigma the analytic model uses: the one the scheduler itself uses to turn the output
  back into x0 (k-diffusion convention), NOT the timestep argument (which diffusers may have
  rounded, e.g. KDPM2 with Karras sigmas).  VE: read from ``x_in / sample`` and snapped to
  the scheduler's own sigma tables.  VP: ``scheduler.sigmas[step_index]`` if the scheduler
  has a ``sigmas`` table, else ``sqrt((1 - a_t) / a_t)`` from ``alphas_cumprod[t]``.  Pass
  ``sigma_of(scheduler, t) -> float`` to override the VP rule.
* Noise: every ``randn_tensor`` call in the scheduler's module is replaced by a draw from a
  ``torch.Generator`` seeded with ``seed`` (float64, like diffusers' own CPU draw with that
  generator), or by the next tensor of an explicit ``noise`` list.  The draws are returned in
  ``Trajectory.noise``; noisecraft then replays them.  A sampler that draws more often than
  diffusers fails loudly (:class:`ListNoise`); fewer draws (diffusers draws one unused tensor
  at a final sigma of 0, e.g. Euler ancestral) show up as ``ours.noise_used < len(ref.noise)``.
* Multi-stage schedulers (Heun, KDPM2) call ``step`` twice per step; a state is recorded
  only when ``state_in_first_order`` is true again, i.e. once per full step.
* The final state lives at ``final_sigma``: default the scheduler's last sigma for VE
  schedulers, 0 for VP ones.  DDIM with ``set_alpha_to_one=False`` ends at
  ``sqrt((1 - a_0) / a_0)``: pass it.

Example::

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, use_karras_sigmas=True)
    ours, ref = run_pair("euler", sched, steps=10)
    assert_trajectories_close(ours, ref, atol=1e-5)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from noisecraft.diffusion import training_target
from noisecraft.schedules import DiscreteSchedule, karras_sigmas
from tests.analytic import GaussianMixture

F64 = torch.float64
GMM = GaussianMixture.default()
SD_SCHEDULE = DiscreteSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
SIGMA_MIN, SIGMA_MAX = SD_SCHEDULE.sigma_min, SD_SCHEDULE.sigma_max  # 0.0292, 14.6146
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
"""diffusers scheduler kwargs for Stable Diffusion's training schedule (= SD_SCHEDULE)."""


@pytest.fixture
def single_thread():
    """Run a test with one torch thread (restored after).  These tensors are tiny; on a loaded
    2-core machine torch's intra-op thread pool makes them ~20x slower.  Use it with
    ``from tests.samplers.harness import single_thread  # noqa: F401`` and
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Trajectories and noise
# ---------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """States of one run in the VE convention: ``xs[i]`` [N, D] lives at ``sigmas[i]``.

    sigmas: [S + 1] float64, descending; xs: [S + 1, N, D] float64 (xs[0] is the start);
    noise: the noise tensors drawn (diffusers) or supplied (noisecraft), in order;
    noise_used: how many of them the run consumed.
    """

    sigmas: torch.Tensor
    xs: torch.Tensor
    noise: list[torch.Tensor] = field(default_factory=list)
    noise_used: int = 0

    @property
    def final(self) -> torch.Tensor:
        return self.xs[-1]


class ListNoise:
    """A NoiseSource that replays a fixed list of tensors in order; counts what it hands out."""

    def __init__(self, draws: Sequence[torch.Tensor]):
        self.draws = list(draws)
        self.used = 0

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        if self.used >= len(self.draws):
            raise AssertionError(
                f"sampler asked for noise draw #{self.used + 1} (sigma {float(sigma):.5g} -> "
                f"{float(sigma_next):.5g}) but the reference drew only {len(self.draws)}"
            )
        self.used += 1
        return self.draws[self.used - 1]


def seeded_noise(like: torch.Tensor, seed: int) -> ListNoise | Callable:
    """N(0, I) draws shaped like ``like`` in its dtype from ``torch.Generator().manual_seed(seed)``
    (identical to diffusers' ``randn_tensor`` on the CPU with that generator)."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(like.shape, generator=g, dtype=like.dtype)


def start_state(n: int = 64, sigma: float = SIGMA_MAX, seed: int = 0, gmm=GMM) -> torch.Tensor:
    """x [n, 2] drawn exactly from the GMM's noisy marginal at ``sigma`` (float64)."""
    return gmm.noisy_sample(n, sigma, torch.Generator().manual_seed(seed))


def gmm_denoiser(gmm: GaussianMixture = GMM):
    """The sampler-facing denoiser ``(x [N, D], sigma [N]) -> E[x0 | x]`` of the mixture."""
    return lambda x, sigma: gmm.denoise(x, sigma)


# ---------------------------------------------------------------------------------------------
# (a) noisecraft side
# ---------------------------------------------------------------------------------------------


def run_sampler(
    sampler: str | Callable,
    sigmas: torch.Tensor,
    x: torch.Tensor | None = None,
    *,
    denoiser=None,
    noise=None,
    seed: int = 0,
    **options,
) -> Trajectory:
    """Run a noisecraft sampler on the GMM from x (default: :func:`start_state` at sigmas[0]).

    sampler: a registry name or a ``sample_X`` function.  noise: a NoiseSource, a list of
    tensors (replayed with :class:`ListNoise`), or None (:func:`seeded_noise` with ``seed``).
    options go to the sampler.  Returns the per-step states as a :class:`Trajectory`.
    """
    from noisecraft.samplers import get_sampler

    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    sigmas = torch.as_tensor(sigmas, dtype=F64)
    if x is None:
        x = start_state(sigma=float(sigmas[0]), seed=seed)
    if noise is None:
        noise = seeded_noise(x, seed + 1)
    if isinstance(noise, list | tuple):
        noise = ListNoise(noise)
    xs = [x]
    fn(denoiser or gmm_denoiser(), x, sigmas, callback=lambda s: xs.append(s.x), noise=noise,
       **options)
    draws = noise.draws if isinstance(noise, ListNoise) else []
    used = noise.used if isinstance(noise, ListNoise) else 0
    return Trajectory(sigmas, torch.stack(xs), draws, used)


# ---------------------------------------------------------------------------------------------
# (b) diffusers side
# ---------------------------------------------------------------------------------------------


def _upcast(scheduler) -> None:
    for name, value in list(vars(scheduler).items()):
        if name != "timesteps" and torch.is_tensor(value) and value.dtype == torch.float32:
            setattr(scheduler, name, value.to(F64))


def _is_ve(scheduler) -> bool:
    return not math.isclose(float(scheduler.init_noise_sigma), 1.0)


def _snap_sigma(scheduler, sigma: float) -> float:
    """The entry of the scheduler's own sigma tables closest to sigma (exact value)."""
    tables = [v.flatten() for k, v in vars(scheduler).items()
              if k.startswith("sigmas") and torch.is_tensor(v) and v.is_floating_point()]
    if not tables:
        return sigma
    cand = torch.cat(tables).to(F64)
    best = cand[(cand - sigma).abs().argmin()]
    return float(best) if abs(float(best) - sigma) <= 1e-9 * max(sigma, 1e-3) else sigma


def vp_sigma(scheduler, t) -> float:
    """Default VP rule: ``sigmas[step_index]`` if the scheduler keeps sigmas, else from a_t."""
    if hasattr(scheduler, "sigmas") and hasattr(scheduler, "index_for_timestep"):
        idx = scheduler.step_index
        if idx is None:
            idx = scheduler.index_for_timestep(t)
        return float(scheduler.sigmas[idx])
    a = float(scheduler.alphas_cumprod[int(t)])
    return math.sqrt((1 - a) / a)


def model_output(x_ve: torch.Tensor, sigma: float, prediction: str, gmm=GMM) -> torch.Tensor:
    """What a perfect network of this diffusers prediction type outputs at (x_ve, sigma)."""
    s = torch.full((x_ve.shape[0],), sigma, dtype=F64)
    x0 = gmm.denoise(x_ve, s)
    eps = (x_ve - x0) / sigma
    kind = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction]
    return training_target(kind, x0, eps, s)


@contextmanager
def _intercept_noise(scheduler, draws: list, seed: int, noise: Sequence | None):
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:  # a deterministic scheduler: nothing to intercept
        yield
        return
    gen = torch.Generator().manual_seed(seed)
    supplied = list(noise) if noise is not None else None

    def fake_randn(shape, generator=None, device=None, dtype=None, **_):
        if supplied is not None:
            if len(draws) >= len(supplied):
                raise AssertionError(f"diffusers asked for more than {len(supplied)} noise draws")
            z = supplied[len(draws)].to(dtype or F64)
        else:
            z = torch.randn(tuple(shape), generator=gen, dtype=dtype or F64)
        draws.append(z)
        return z

    module.randn_tensor = fake_randn
    try:
        yield
    finally:
        module.randn_tensor = original


def run_diffusers(
    scheduler,
    steps: int,
    x: torch.Tensor | None = None,
    *,
    gmm: GaussianMixture = GMM,
    seed: int = 0,
    noise: Sequence[torch.Tensor] | None = None,
    final_sigma: float | None = None,
    upcast: bool = True,
    sigma_of: Callable | None = None,
    step_kwargs: dict | None = None,
    set_timesteps_kwargs: dict | None = None,
) -> Trajectory:
    """Run a diffusers scheduler's denoising loop on the GMM model; states in VE form.

    x: the start state in VE form at the scheduler's first sigma (default: an exact draw from
    the noisy marginal there, :func:`start_state` with ``seed``).  noise: explicit draws for
    its ``randn_tensor`` calls (else a generator seeded ``seed + 1``).  step_kwargs go to
    every ``step`` call (e.g. ``eta`` for DDIM).  See the module docstring for conventions.
    """
    scheduler.set_timesteps(steps, **(set_timesteps_kwargs or {}))
    if upcast:
        _upcast(scheduler)
    ve = _is_ve(scheduler)
    prediction = scheduler.config.prediction_type
    sigma_of = sigma_of or vp_sigma
    timesteps = scheduler.timesteps
    first_sigma = float(scheduler.sigmas[0]) if ve else sigma_of(scheduler, timesteps[0])
    if x is None:
        x = start_state(sigma=first_sigma, seed=seed, gmm=gmm)
    sample = x if ve else x / math.sqrt(1 + first_sigma**2)
    sigmas, states, draws = [first_sigma], [x], []

    def in_first_order() -> bool:
        return bool(getattr(scheduler, "state_in_first_order", True))

    def place_last_state(sigma: float) -> None:
        # the state after a full step lives at the next step's (or the final) sigma
        if len(states) > len(sigmas):
            if not ve:
                states[-1] = states[-1] * math.sqrt(1 + sigma**2)
            sigmas.append(sigma)

    with _intercept_noise(scheduler, draws, seed + 1, noise):
        for t in timesteps:
            starts_step = in_first_order()
            x_in = scheduler.scale_model_input(sample, t)
            if ve:
                c_in = float((x_in / sample).flatten()[0])
                sigma = _snap_sigma(scheduler, math.sqrt(max(1 / c_in**2 - 1, 0.0)))
                x_ve = sample
            else:
                sigma = sigma_of(scheduler, t)
                x_ve = x_in * math.sqrt(1 + sigma**2)
            if starts_step:
                place_last_state(sigma)
            out = model_output(x_ve, sigma, prediction, gmm)
            sample = scheduler.step(out, t, sample, **(step_kwargs or {})).prev_sample
            if in_first_order():
                states.append(sample.to(F64))
    if final_sigma is None:
        final_sigma = float(scheduler.sigmas[-1]) if ve else 0.0
    place_last_state(final_sigma)
    return Trajectory(torch.tensor(sigmas, dtype=F64), torch.stack(states), draws, len(draws))


def run_pair(
    sampler: str | Callable,
    scheduler,
    steps: int,
    x: torch.Tensor | None = None,
    *,
    seed: int = 0,
    options: dict | None = None,
    **diffusers_kwargs,
) -> tuple[Trajectory, Trajectory]:
    """(ours, ref): the diffusers run, then the noisecraft sampler on ref's sigmas and noise."""
    ref = run_diffusers(scheduler, steps, x, seed=seed, **diffusers_kwargs)
    ours = run_sampler(sampler, ref.sigmas, ref.xs[0], noise=list(ref.noise),
                       **(options or {}))
    return ours, ref


def assert_trajectories_close(ours: Trajectory, ref: Trajectory, atol: float = 1e-5) -> float:
    """Same sigmas (to 1e-12 relative) and every state within ``atol``; returns the max error."""
    assert ours.xs.shape == ref.xs.shape, f"shapes differ: {ours.xs.shape} vs {ref.xs.shape}"
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-12, atol=0)
    err = (ours.xs - ref.xs).abs().amax(dim=(1, 2))
    worst = int(err.argmax())
    assert float(err.max()) <= atol, (
        f"trajectories differ by {float(err.max()):.3g} > {atol:g} at state {worst} "
        f"(sigma {float(ref.sigmas[worst]):.5g}); per-state max errors {err.tolist()}"
    )
    return float(err.max())


# ---------------------------------------------------------------------------------------------
# (c) distribution statistics
# ---------------------------------------------------------------------------------------------


@dataclass
class MixtureStats:
    """Per component k (samples assigned to the nearest mean): mass [K], mean [K, D], and std
    [K] pooled over the D coordinates (sqrt of the mean per-coordinate variance)."""

    mass: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def mixture_stats(x: torch.Tensor, gmm: GaussianMixture = GMM) -> MixtureStats:
    k = gmm.assign(x)
    K = len(gmm.weights)
    mass = torch.bincount(k, minlength=K).to(F64) / len(x)
    mean = torch.stack([x[k == j].mean(0) for j in range(K)])
    std = torch.stack([x[k == j].var(0).mean().sqrt() for j in range(K)])
    return MixtureStats(mass, mean, std)


def mixture_tolerances(n: int, gmm: GaussianMixture = GMM, z: float = 5.0) -> MixtureStats:
    """z Monte-Carlo standard errors of each statistic for n exact samples.

    mass: sqrt(w (1 - w) / n); mean (per coordinate): s / sqrt(n w); pooled std over D
    coordinates: s / sqrt(2 D n w).  (Nearest-mean assignment mislabels < 1e-4 of the mass.)
    """
    w, s, d = gmm.weights.to(F64), gmm.stds.to(F64), gmm.means.shape[1]
    mass = (w * (1 - w) / n).sqrt()
    mean = (s / (n * w).sqrt())[:, None].expand(-1, d)
    std = s / (2 * d * n * w).sqrt()
    return MixtureStats(z * mass, z * mean, z * std)


def assert_matches_mixture(
    x: torch.Tensor,
    gmm: GaussianMixture = GMM,
    *,
    z: float = 5.0,
    bias: float = 0.0,
    check: Sequence[str] = ("mass", "mean", "std"),
    label: str = "",
) -> MixtureStats:
    """Assert per-component mass, mean and std of samples x [N, D] match the mixture.

    Tolerance per statistic: ``z`` standard errors (:func:`mixture_tolerances`; z = 5 gives a
    false-alarm rate < 1e-6 per statistic) plus ``bias`` (absolute, for a stated
    discretisation allowance).  Returns the measured statistics.
    """
    got = mixture_stats(x, gmm)
    tol = mixture_tolerances(len(x), gmm, z)
    want = MixtureStats(gmm.weights.to(F64), gmm.means.to(F64), gmm.stds.to(F64))
    for name in check:
        g, w, t = getattr(got, name), getattr(want, name), getattr(tol, name) + bias
        bad = (g - w).abs() > t
        assert not bad.any(), (
            f"{label} per-component {name} off: got {g.tolist()}, want {w.tolist()}, "
            f"tolerance {t.tolist()}"
        )
    return got


# ---------------------------------------------------------------------------------------------
# (d) convergence order
# ---------------------------------------------------------------------------------------------


def ode_solution(x: torch.Tensor, sigma_from: float, sigma_to: float, gmm=GMM) -> torch.Tensor:
    """The probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma solved from sigma_from
    to sigma_to > 0 by scipy's DOP853 in u = log sigma (dx/du = x - D), rtol 1e-11."""
    from scipy.integrate import solve_ivp

    shape = x.shape

    def f(u, y):
        xt = torch.from_numpy(y).reshape(shape)
        s = torch.full((shape[0],), math.exp(u), dtype=F64)
        return (xt - gmm.denoise(xt, s)).reshape(-1).numpy()

    sol = solve_ivp(f, (math.log(sigma_from), math.log(sigma_to)), x.reshape(-1).numpy(),
                    method="DOP853", rtol=1e-11, atol=1e-11)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def karras_no_zero(steps: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX) -> torch.Tensor:
    """Karras sigmas [steps + 1] ending at sigma_min (no final jump to 0, whose error does not
    shrink with the step count and would hide the order)."""
    return karras_sigmas(steps + 1, sigma_min, sigma_max)[:-1]


def convergence_order(
    sampler: str | Callable,
    steps: Sequence[int] = (8, 16, 32, 64),
    *,
    spacing: Callable[[int], torch.Tensor] = karras_no_zero,
    n: int = 32,
    seed: int = 0,
    **options,
) -> tuple[float, list[float]]:
    """(order, errors): RMS error of the final state vs :func:`ode_solution`, per step count,
    and minus the least-squares slope of log(error) against log(steps)."""
    first = spacing(steps[0])
    x = start_state(n, float(first[0]), seed)
    ref = ode_solution(x, float(first[0]), float(first[-1]))
    errors = []
    for k in steps:
        sig = spacing(k)
        assert math.isclose(float(sig[0]), float(first[0])) and math.isclose(
            float(sig[-1]), float(first[-1])), "spacing must keep its endpoints fixed"
        out = run_sampler(sampler, sig, x, **options).final
        errors.append(float(((out - ref) ** 2).sum(1).mean().sqrt()))
    slope = np.polyfit(np.log(np.asarray(steps, float)), np.log(errors), 1)[0]
    return float(-slope), errors


def consistency_denoiser(gmm: GaussianMixture = GMM, steps: int = 40, sigma_end: float = 1e-3):
    """A consistency function for the GMM (Song et al. 2023): x at sigma -> the end of its
    probability-flow ODE path, by Heun on Karras sigmas down to ``sigma_end`` and a final
    posterior mean.  Sampling with ``lcm`` is exact only with such a denoiser."""
    from noisecraft.samplers.basic import sample_heun

    def f(x, sigma):
        s = float(sigma.reshape(-1)[0])
        if s <= sigma_end:
            return gmm.denoise(x, sigma)
        sig = karras_sigmas(steps + 1, sigma_end, s)[:-1].to(x.dtype)
        x_end = sample_heun(lambda x_, s_: gmm.denoise(x_, s_), x, sig)
        return gmm.denoise(x_end, torch.full_like(sigma, sigma_end))

    return f
