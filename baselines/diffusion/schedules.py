"""Noise schedules and samplers from diffusers, configured as the SD / SGDM code uses them.

The training schedule is ldm's "linear" schedule, i.e. betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2,
which diffusers calls `scaled_linear`. SGDM's official sampler (`model/spaced_sampler.py`) is an
IDDPM-respaced ancestral DDPM over round(k*999/49), k = 0..49, with fixed-small (posterior) variance, no
x0 clipping and no noise at the last step; diffusers' DDPMScheduler with `timestep_spacing="linspace"`
reproduces exactly those timesteps (999, 979, 958, ..., 20, 0) and that update.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from cmsrd.errors import InputError

from ..seeding import randn

TRAIN_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

SAMPLERS = ("ddpm", "ddim", "ddim-ldm", "dpm-solver")
DEFAULT_STEPS = 50


class GridDDIMScheduler(DDIMScheduler):
    """DDIM that steps to the *next timestep of its own grid*; deterministic at eta 0 (the default).

    diffusers' DDIMScheduler takes the previous timestep as t - 1000 // steps, which lands off the grid
    (and short of the clean sample) whenever `steps` does not divide 1000; SGDM's `steps=N` condition
    must work for any N, so only the step rule is replaced here (same alphas, same x0/eps algebra).
    With eta > 0 (LDM-SR samples at eta 1) each step adds sigma_t = eta sqrt((1 - a_prev)/(1 - a_t))
    sqrt(1 - a_t/a_prev) of fresh noise drawn per image from `generator` (`baselines.seeding`)."""

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict: bool = True, **_):
        ts = self.timesteps
        t = int(timestep)
        idx = int((ts == t).nonzero()[0, 0])
        ac = self.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
        a_t = ac[t]
        a_prev = ac[int(ts[idx + 1])] if idx + 1 < len(ts) else self.final_alpha_cumprod.to(sample.device)
        eps = model_output.float()
        x0 = (sample.float() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if eta > 0:
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
            noise = randn(tuple(sample.shape), generator, sample.device)
            prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise
            prev = prev.to(sample.dtype)
        else:
            prev = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(sample.dtype)
        if not return_dict:
            return (prev, x0.to(sample.dtype))
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(sample.dtype))


def train_schedule(schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    """TRAIN_SCHEDULE with a method's own betas over it (LDM-SR: beta_start 0.0015, beta_end 0.0155)."""
    unknown = sorted(set(schedule or {}) - {"beta_start", "beta_end"})
    if unknown:
        raise InputError(f"schedule.{unknown[0]}", "cannot be changed", "set only beta_start and beta_end")
    return {**TRAIN_SCHEDULE, **(schedule or {})}


def training_scheduler(schedule: dict[str, Any] | None = None) -> DDPMScheduler:
    """The 1000-step schedule used for training targets (q(z_t | z_0)) and for `add_noise`."""
    return DDPMScheduler(**train_schedule(schedule), variance_type="fixed_small", timestep_spacing="linspace")


def make_scheduler(name: str = "ddpm", steps: int = DEFAULT_STEPS, schedule: dict[str, Any] | None = None):
    """A scheduler with `set_timesteps(steps)` already applied (`schedule`: betas other than SD's).

    - `ddpm`: the official SGDM respaced ancestral sampler (fixed-small variance, linspace spacing).
    - `ddim`: deterministic DDIM (eta 0), `trailing` spacing so the first step starts at t = 999, and the
      last step lands on the clean sample (`set_alpha_to_one`), not on abar_0.
    - `ddim-ldm`: CompVis' `DDIMSampler` grid (uniform: t = k * (1000 // steps) + 1, so 991, ..., 11, 1 at 100
      steps) whose last step lands on alpha-bar_0, not on the clean sample (LDM-SR's official sampler).
    - `dpm-solver`: DPM-Solver++ (2nd order multistep), `trailing` spacing, final step to sigma 0.
    """
    if not isinstance(steps, int) or steps < 1 or steps > TRAIN_SCHEDULE["num_train_timesteps"]:
        raise InputError(f"steps={steps}", "must be an integer in 1..1000", "e.g. steps=50")
    train = train_schedule(schedule)
    if name == "ddpm":
        sched = DDPMScheduler(**train, variance_type="fixed_small", timestep_spacing="linspace")
    elif name == "ddim":
        sched = GridDDIMScheduler(**train, timestep_spacing="trailing", set_alpha_to_one=True)
    elif name == "ddim-ldm":
        sched = GridDDIMScheduler(**train, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    elif name == "dpm-solver":
        common = {k: v for k, v in train.items() if k != "clip_sample"}
        sched = DPMSolverMultistepScheduler(
            **common,
            thresholding=False,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
            final_sigmas_type="zero",
        )
    else:
        raise InputError(f"sampler {name!r}", f"unknown; choose from {SAMPLERS}")
    sched.set_timesteps(steps)
    return sched


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0) = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise on the training schedule."""
    return _TRAIN.add_noise(z0, noise, t)


_TRAIN = training_scheduler()
