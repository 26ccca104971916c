"""ResShift's residual-shifting chain (Yue et al., NeurIPS 2023): a Markov chain from the HR latent x0 to the
LR latent y, so sampling starts at the LR instead of pure noise and needs only T steps (15 or 4).

    q(x_t | x0, y) = N(x0 + eta_t (y - x0), kappa^2 eta_t I),  t = 1..T
    start:  x_T = y + kappa sqrt(eta_T) eps
    step:   x_{t-1} = (eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x0_hat + kappa sqrt(eta_{t-1} alpha_t / eta_t) eps,
            alpha_t = eta_t - eta_{t-1}, no noise at the last step (eta_0 = 0, so the result is x0_hat)

The network predicts x0 from x_t / sqrt(kappa^2 eta_t + 1) (the latent's variance is ~1) and the step index.
The eta schedule is the official "exponential" one: sqrt(eta_1) = min(min_noise / kappa, min_noise),
sqrt(eta_T) = etas_end, and in between sqrt(eta_t) = sqrt(eta_1) * b^(((t-1)/(T-1))^power * (T-1)) with
b = (etas_end / sqrt(eta_1))^(1/(T-1)). Indices here run 0..T-1 (index i is the paper's t = i + 1), as the
official code passes them to the network.

Compare with the other LR-start mechanisms in this package: `sampling.sample_latents(start_t=...)` noises the
LR latent with the DDPM schedule and runs the remaining DDPM steps (SDEdit-like, seeds/000's `start=lr@t`);
here the LR is the chain's end point by construction, so every step moves x from y towards x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cmsrd.errors import InputError

from ..seeding import Generators, randn
from .sampling import fast_denoiser

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scaled x_t, step index) -> predicted x0


@dataclass(frozen=True)
class ResShiftSchedule:
    """The chain's parameters (official `diffusion.params`). Defaults: ResShift v1/v2 (15 steps)."""

    steps: int = 15
    kappa: float = 2.0
    power: float = 0.3
    min_noise: float = 0.04
    etas_end: float = 0.99

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> ResShiftSchedule:
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(
                f"config chain.{unknown[0]}",
                "is not a ResShift chain parameter",
                f"use {sorted(cls.__dataclass_fields__)}",
            )
        s = cls(**{k: (int(v) if k == "steps" else float(v)) for k, v in cfg.items()})
        s.validate("chain")
        return s

    def validate(self, where: str) -> None:
        """Called by `cmsrd.typed` when a config's `chain:` block is built, and by `from_config`."""
        if self.steps < 2 or self.kappa <= 0 or self.power <= 0 or not 0 < self.min_noise or not 0 < self.etas_end < 1:
            raise InputError(
                f"{where} {asdict(self)}",
                "needs steps >= 2, kappa > 0, power > 0, min_noise > 0 and 0 < etas_end < 1",
                "e.g. steps: 15, kappa: 2.0, power: 0.3, min_noise: 0.04",
            )

    def sqrt_etas(self) -> torch.Tensor:
        """sqrt(eta_t), t = 1..T, float64."""
        start = min(self.min_noise / self.kappa, self.min_noise)
        if start >= self.etas_end:
            raise InputError(f"chain min_noise {self.min_noise}", f"gives sqrt(eta_1) >= etas_end {self.etas_end}")
        n = self.steps - 1
        base = math.exp(math.log(self.etas_end / start) / n)
        exponent = torch.linspace(0, 1, self.steps, dtype=torch.float64) ** self.power * n
        return start * base**exponent


# official presets (configs/realsr_swinunet_realesrgan256.yaml and *_journal.yaml)
PRESETS = {
    "v1": ResShiftSchedule(15, 2.0, 0.3, 0.04, 0.99),
    "v2": ResShiftSchedule(15, 2.0, 0.3, 0.04, 0.99),
    "v3": ResShiftSchedule(4, 2.0, 0.3, 0.2, 0.99),
}


class ResShiftChain:
    """The chain's coefficients (float64, cast at use) and its forward / reverse steps."""

    def __init__(self, schedule: ResShiftSchedule):
        self.schedule = schedule
        self.kappa = schedule.kappa
        self.sqrt_etas = schedule.sqrt_etas()
        self.etas = self.sqrt_etas**2
        self.etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), self.etas[:-1]])
        alpha = self.etas - self.etas_prev
        self.posterior_var = self.kappa**2 * self.etas_prev / self.etas * alpha
        self.coef_xt = self.etas_prev / self.etas
        self.coef_x0 = alpha / self.etas

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return arr.to(like.device)[t.to(like.device)].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) noise (t: indices 0..T-1)."""
        return x0 + self._at(self.etas, t, x0) * (y - x0) + self._at(self.kappa * self.sqrt_etas, t, x0) * noise

    def prior_sample(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y + kappa sqrt(eta_T) noise."""
        return y + float(self.kappa * self.sqrt_etas[-1]) * noise

    def scale_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network input x_t / sqrt(kappa^2 eta_t + 1) (official `normalize_input` for latents)."""
        return x / self._at(torch.sqrt(self.etas * self.kappa**2 + 1), t, x)

    def step(self, x: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1} given the predicted x0 (no noise at index 0)."""
        mean = self._at(self.coef_xt, t, x) * x + self._at(self.coef_x0, t, x) * x0_hat
        if noise is None:
            return mean
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1))).to(x.device)
        return mean + nonzero * self._at(self.posterior_var.sqrt(), t, x) * noise

    @torch.no_grad()
    def sample(
        self, x0_fn: X0Fn, y: torch.Tensor, generator: Generators = None, noise_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, int]:
        """Run the T reverse steps from y; returns (x0, network evaluations). Every random tensor comes from
        `generator` (one per image: `baselines.seeding`), the prior noise first, then one draw per step."""
        shape, dev, dt = tuple(y.shape), y.device, noise_dtype or y.dtype
        x = self.prior_sample(y, randn(shape, generator, dev, dt))
        x0_fn = fast_denoiser(x0_fn, dev)  # the shared fast path's layout / CUDA graph, when active
        nfe = 0
        for i in reversed(range(self.steps)):
            t = torch.full((shape[0],), i, device=dev, dtype=torch.long)
            x0_hat = x0_fn(self.scale_input(x, t), t).to(x.dtype)
            nfe += 1
            x = self.step(x, x0_hat, t, randn(shape, generator, dev, dt) if i > 0 else None)
        return x, nfe
