"""A Gaussian-mixture data distribution and its closed-form optimal denoiser.

For x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x = x0 + sigma eps, the posterior mean is
E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)) with responsibilities
r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I).  A sampler driven by this exact
denoiser must reproduce the mixture; its error against a many-step run measures only the
discretisation, so convergence orders can be fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    means: torch.Tensor  # [K, D]
    stds: torch.Tensor  # [K]
    weights: torch.Tensor  # [K], sums to 1

    @classmethod
    def default(cls, dtype=torch.float64) -> GaussianMixture:
        means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=dtype)
        stds = torch.tensor([0.3, 0.5, 0.4], dtype=dtype)
        weights = torch.tensor([0.5, 0.3, 0.2], dtype=dtype)
        return cls(means, stds, weights)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * z

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact E[x0 | x] for x [N, D] at sigma (scalar or [N])."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
        var = self.stds.reshape(1, -1, 1) ** 2 + sigma**2  # [N, K, 1]
        diff = x[:, None, :] - self.means[None]  # [N, K, D]
        d = x.shape[1]
        logp = (
            self.weights.log()[None]
            - 0.5 * (diff**2).sum(-1) / var[..., 0]
            - 0.5 * d * var[..., 0].log()
        )
        r = torch.softmax(logp, dim=1)[..., None]  # [N, K, 1]
        post = self.means[None] + (self.stds.reshape(1, -1, 1) ** 2 / var) * diff
        return (r * post).sum(1)

    def noisy_sample(self, n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
        """An exact draw of x at noise level sigma (the true marginal, not just N(0, sigma^2))."""
        x0 = self.sample(n, generator)
        return x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the component that most likely produced each clean sample."""
        return torch.cdist(x, self.means).argmin(dim=1)
