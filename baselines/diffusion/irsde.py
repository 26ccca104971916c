"""The mean-reverting IR-SDE (Luo et al., ICML 2023) as EDiffSR uses it: an LR-anchored chain in pixel space.

Forward SDE dx = theta_t (mu - x) dt + sigma_t dw with sigma_t^2 = 2 sigma_max^2 theta_t, so x_t given x0 is
Gaussian with mean mu + (x0 - mu) exp(-Theta_t dt) and variance sigma_max^2 (1 - exp(-2 Theta_t dt)), where
Theta_t = theta_1 + ... + theta_t. mu is the bicubic-upsampled LR: the chain ends (t = T) at mu plus noise of
std ~sigma_max, so sampling starts from mu + sigma_max eps, not from pure noise, and runs at HR resolution.

Schedule (the official "cosine" option, timesteps 0..T): theta_t = 1 - abar(t + 1), abar(u) = f(u) / f(0),
f(u) = cos^2(((u / (T + 2)) + s) / (1 + s) * pi / 2), s = 0.008; dt = -ln(eps) / Theta_T, so that
exp(-Theta_T dt) = eps (the share of x0 left at t = T). EDiffSR: sigma_max 50/255, T 100, eps 0.005.

Two reverse samplers, both drawing their noise from per-image generators (`baselines.seeding`):
- `sde` (EDiffSR's): Euler-Maruyama on the reverse SDE over every t = T..1, noise at every step,
  x_{t-1} = x_t - (theta_t (mu - x_t) - sigma_t^2 score) dt - sigma_t sqrt(dt) z, score = -eps / sigma_bar_t.
- `posterior` (IR-SDE's later `reverse_posterior`, here on any sub-grid): x0 estimated from the predicted
  noise, then a draw from the exact Gaussian q(x_s | x_t, x0) of this SDE; with s = t - 1 its mean is the
  official training target, and it is the only one of the two that stays exact when steps are skipped.
The training target of both is `optimum_step` (the posterior mean one step back).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from cmsrd.errors import InputError, unknown_name

from ..seeding import Generators, randn

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t: N timesteps) -> predicted noise
SCHEDULES = ("cosine", "linear", "constant")
IRSDE_SAMPLERS = ("sde", "posterior")


def theta_schedule(name: str, T: int, s: float = 0.008) -> torch.Tensor:
    """theta_0..theta_T (float64) of the official IR-SDE schedules."""
    if name == "cosine":
        u = torch.arange(T + 3, dtype=torch.float64, device="cpu")  # CPU even under a meta-device build
        f = torch.cos(((u / (T + 2)) + s) / (1 + s) * math.pi / 2) ** 2
        return 1 - (f / f[0])[1:-1]
    if name == "linear":  # DDPM's betas, rescaled to T + 1 steps
        scale = 1000 / (T + 1)
        return torch.linspace(scale * 1e-4, scale * 0.02, T + 1, dtype=torch.float64, device="cpu")
    if name == "constant":
        return torch.ones(T + 1, dtype=torch.float64, device="cpu")
    raise unknown_name(f"sde.schedule {name!r}", "is not an IR-SDE schedule", name, SCHEDULES)


class IRSDE:
    """Schedule tables and the closed-form pieces of the chain. Timesteps are integers 1..T (0 is the clean
    image); every per-sample function takes `t` as an int or an N-vector and broadcasts over N x C x H x W."""

    def __init__(self, max_sigma: float = 50, T: int = 100, schedule: str = "cosine", eps: float = 0.005):
        if not isinstance(T, int) or T < 1:
            raise InputError(f"sde.T = {T!r}", "must be a positive integer", "EDiffSR uses T: 100")
        if not 0 < float(max_sigma) <= 255:
            raise InputError(
                f"sde.max_sigma = {max_sigma!r}", "must be in (0, 255]", "give it in 8-bit units (50) or in [0, 1]"
            )
        if not 0 < float(eps) < 1:
            raise InputError(f"sde.eps = {eps!r}", "must be in (0, 1)", "EDiffSR uses eps: 0.005")
        # the official rule: values >= 1 are 8-bit levels
        self.max_sigma = float(max_sigma) / 255 if float(max_sigma) >= 1 else float(max_sigma)
        self.T, self.schedule, self.eps = T, schedule, float(eps)
        self.thetas = theta_schedule(schedule, T)
        self.thetas_cumsum = torch.cumsum(self.thetas, 0) - self.thetas[0]  # Theta_0 = 0
        self.dt = -math.log(self.eps) / float(self.thetas_cumsum[-1])
        self.sigmas = torch.sqrt(2 * self.max_sigma**2 * self.thetas)
        self.decay = torch.exp(-self.thetas_cumsum * self.dt)  # exp(-Theta_t dt): share of (x0 - mu) left at t
        self.sigma_bars = self.max_sigma * torch.sqrt(1 - self.decay**2)

    # ---- tables at t, shaped for a batch ------------------------------------------------------------
    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(t).reshape(-1).long().cpu()
        return table[idx].to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def timesteps_tensor(self, t: int, n: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((n,), t, dtype=torch.long, device=device)

    # ---- forward process ------------------------------------------------------------------------------
    def mean(self, x0: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """E[x_t | x0] = mu + (x0 - mu) exp(-Theta_t dt)."""
        return mu + (x0 - mu) * self._at(self.decay, t, x0)

    def std(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """sigma_bar_t = sigma_max sqrt(1 - exp(-2 Theta_t dt))."""
        return self._at(self.sigma_bars, t, like)

    def noisy_state(self, x0: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor):
        """x_t = E[x_t | x0] + sigma_bar_t noise (training states)."""
        return self.mean(x0, mu, t) + self.std(t, x0) * noise

    def start_state(self, mu: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's x_T: mu + sigma_max noise (EDiffSR's `noise_state`; the exact marginal at T differs
        only by eps (x0 - mu), which is unknown at inference)."""
        return mu + self.max_sigma * noise

    def true_noise(self, xt: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int):
        """The noise a perfect predictor returns: (x_t - E[x_t | x0]) / sigma_bar_t."""
        return (xt - self.mean(x0, mu, t)) / self.std(t, xt)

    def x0_from_noise(self, xt: torch.Tensor, noise: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int):
        return mu + (xt - mu - self.std(t, xt) * noise) / self._at(self.decay, t, xt)

    # ---- reverse process ------------------------------------------------------------------------------
    def reverse_mean(self, xt: torch.Tensor, noise: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int):
        """Mean of one Euler-Maruyama reverse-SDE step t -> t-1 with score -noise / sigma_bar_t (what the
        official loss compares with `optimum_step`)."""
        score = -noise / self.std(t, xt)
        drift = self._at(self.thetas, t, xt) * (mu - xt) - self._at(self.sigmas, t, xt) ** 2 * score
        return xt - drift * self.dt

    def reverse_step(self, xt, noise_pred, mu, t, z: torch.Tensor) -> torch.Tensor:
        """One official reverse-SDE step with fresh standard-normal `z`."""
        return self.reverse_mean(xt, noise_pred, mu, t) - self._at(self.sigmas, t, xt) * math.sqrt(self.dt) * z

    def posterior(self, xt: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t: int, s: int):
        """Mean and std of q(x_s | x_t, x0) for 0 <= s < t (exact for this SDE)."""
        a = math.exp(-(float(self.thetas_cumsum[t]) - float(self.thetas_cumsum[s])) * self.dt)
        b, c = float(self.decay[t]), float(self.decay[s])
        mean = mu + a * (1 - c * c) / (1 - b * b) * (xt - mu) + c * (1 - a * a) / (1 - b * b) * (x0 - mu)
        return mean, self.max_sigma * math.sqrt(max((1 - a * a) * (1 - c * c) / (1 - b * b), 0.0))

    def optimum_step(self, xt: torch.Tensor, x0: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int):
        """E[x_{t-1} | x_t, x0] per sample (the official training target `reverse_optimum_step`)."""
        a = self._at(torch.exp(-self.thetas * self.dt), t, xt)
        b = self._at(self.decay, t, xt)
        c = self._at(self.decay, torch.as_tensor(t).reshape(-1) - 1, xt)
        return mu + a * (1 - c**2) / (1 - b**2) * (xt - mu) + c * (1 - a**2) / (1 - b**2) * (x0 - mu)

    def grid(self, steps: int | None) -> list[int]:
        """Timesteps the posterior sampler evaluates for `steps` (None: all T); each step goes to the next
        entry, the last one to 0."""
        steps = self.T if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise InputError(
                f"steps={steps}", f"must be an integer in 1..{self.T} (the chain's T)", f"e.g. steps={self.T}"
            )
        return [round(self.T * (1 - k / steps)) for k in range(steps)]


@torch.no_grad()
def sample_irsde(
    eps_fn: EpsFn,
    mu: torch.Tensor,
    sde: IRSDE,
    *,
    sampler: str = "sde",
    steps: int | None = None,
    generator: Generators = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Run the reverse chain from mu + sigma_max eps; returns (x_0, number of eps evaluations).

    `sde` walks every t = T..1 (`steps` must be None or T); `posterior` takes `steps` evaluations on the
    grid `sde.grid(steps)`. All noise is drawn in float32 with `randn(shape, generator)` (one generator per
    image gives the same output at any batch size); the state is kept in float32."""
    if sampler not in IRSDE_SAMPLERS:
        raise unknown_name(f"sampler {sampler!r}", "is not an IR-SDE sampler", sampler, IRSDE_SAMPLERS)
    mu = mu.float()
    n, device = mu.shape[0], mu.device
    x = sde.start_state(mu, randn(mu.shape, generator, device))
    if sampler == "sde":
        if steps not in (None, sde.T):
            raise InputError(
                f"steps={steps} with the `sde` sampler",
                f"Euler-Maruyama on the reverse SDE is defined on all {sde.T} steps of its schedule",
                "use the `posterior` sampler for fewer steps",
            )
        for t in tqdm(range(sde.T, 0, -1), disable=not progress, desc="IR-SDE", leave=False):
            eps = eps_fn(x, sde.timesteps_tensor(t, n, device)).float()
            x = sde.reverse_step(x, eps, mu, t, randn(mu.shape, generator, device))
        return x, sde.T
    ts = sde.grid(steps)
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="IR-SDE posterior", leave=False)):
        s = ts[i + 1] if i + 1 < len(ts) else 0
        eps = eps_fn(x, sde.timesteps_tensor(t, n, device)).float()
        mean, std = sde.posterior(x, sde.x0_from_noise(x, eps, mu, t), mu, t, s)
        x = mean + std * randn(mu.shape, generator, device) if s > 0 else mean
    return x, len(ts)
