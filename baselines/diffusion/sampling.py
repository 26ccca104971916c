"""One denoising loop for every latent-diffusion method: pure-noise start or `start=lr@t`.

`start=lr@t` (seeds/000, "an efficient sampling strategy that starts with LR images and progressively adds
noise"): the upsampled LR is encoded to a latent, noised to the first sampler timestep <= t with the
training schedule, and denoised from there. Two ways to place the steps below t (`lr_start`):
- `truncate` (SDEdit / img2img `strength`): keep the timesteps <= t of the `steps`-step grid over 0..999, so
  NFE is about steps * t / 1000 (SGDM's convention);
- `respace` (seeds/000 as csdiff reads it): `steps` timesteps spread evenly over t..1, the last step landing
  on the clean sample, so NFE = steps exactly and steps may not exceed t.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from cmsrd.errors import InputError

from ..seeding import Generators, randn
from .schedules import make_scheduler

LR_START_MODES = ("truncate", "respace")
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> predicted noise


def lr_start_timesteps(timesteps: torch.Tensor, start_t: int) -> torch.Tensor:
    """The sampler timesteps that remain when starting from the LR latent noised to `start_t`."""
    if not 0 <= start_t <= 999:
        raise InputError(f"start=lr@{start_t}", "timestep must be in 0..999", "e.g. start=lr@400")
    kept = timesteps[timesteps <= start_t]
    if kept.numel() == 0:
        raise InputError(f"start=lr@{start_t}", "is below every sampler timestep", "use a larger t or more steps")
    return kept


def check_lr_start(steps: int, start_t: int, mode: str = "respace") -> None:
    """One InputError naming the condition and the valid range when `steps=N,start=lr@t` cannot run."""
    if mode not in LR_START_MODES:
        raise InputError(f"lr_start {mode!r}", f"unknown; choose from {LR_START_MODES}")
    low = 1 if mode == "respace" else 0
    if not low <= start_t <= 999:
        raise InputError(
            f"start=lr@{start_t}", f"is beyond the 1000-step schedule; valid: start=lr@{low}..999", "e.g. start=lr@400"
        )
    if mode == "respace" and not 1 <= steps <= start_t:
        raise InputError(
            f"steps={steps} with start=lr@{start_t}",
            f"needs one distinct timestep per step below the start; valid: steps=1..{start_t}",
            f"use steps <= {start_t} or a later start",
        )


def respaced_lr_timesteps(start_t: int, steps: int) -> torch.Tensor:
    """`steps` distinct timesteps from `start_t` down to about start_t/steps (trailing spacing: the step after
    the last one is the clean sample), descending."""
    check_lr_start(steps, start_t, "respace")
    grid = [round(start_t * (steps - i) / steps) for i in range(steps)]
    return torch.tensor(grid, dtype=torch.long)


def lr_start_schedule(
    sampler: str, steps: int, start_t: int, mode: str = "truncate", schedule: dict[str, Any] | None = None
):
    """(scheduler, timesteps to run, index of the first) for `steps=N,start=lr@t` under `mode`."""
    check_lr_start(steps, start_t, mode)
    if mode == "truncate":
        sched = make_scheduler(sampler, steps, schedule)
        kept = lr_start_timesteps(sched.timesteps, start_t)
        return sched, kept, len(sched.timesteps) - len(kept)
    sched = make_scheduler(sampler, 1, schedule)
    grid = respaced_lr_timesteps(start_t, steps)
    if sampler.startswith("ddim"):  # GridDDIMScheduler steps along its own `timesteps`
        sched.timesteps = grid
        sched.num_inference_steps = steps
    else:  # DDPM and DPM-Solver++ take custom timesteps (their step after the last one is the clean sample)
        sched.set_timesteps(timesteps=grid.tolist())
    return sched, sched.timesteps, 0


def lr_start_nfe(sampler: str, steps: int, start_t: int, mode: str = "truncate") -> int:
    """Eps evaluations of `steps=N,start=lr@t` (what `sample_latents` will count)."""
    if mode == "respace":
        check_lr_start(steps, start_t, mode)
        return steps
    return int(lr_start_schedule(sampler, steps, start_t, mode)[1].numel())


@torch.no_grad()
def sample_latents(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    start_latent: torch.Tensor | None = None,
    start_t: int | None = None,
    lr_start: str = "truncate",
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    schedule: dict[str, Any] | None = None,
    eta: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Run the reverse process; returns (z_0, number of eps evaluations).

    With `start_t` set, `start_latent` (the clean latent of the upsampled LR) is noised to the first kept
    timestep and only the remaining steps run (`lr_start`: `truncate` or `respace`, see the module doc).
    `schedule` replaces SD's betas (`schedules.train_schedule`); `eta` is DDIM's noise level (ddim only; its
    noise comes from `generator` too).
    """
    if eta and not sampler.startswith("ddim"):
        raise InputError(f"sampler {sampler!r} with eta {eta}", "eta applies to ddim only", "set eta: 0")
    extra = {"eta": float(eta)} if eta else {}
    noise = randn(shape, generator, device, dtype)  # a list of generators: one stream per sample
    if start_t is None:
        sched = make_scheduler(sampler, steps, schedule)
        timesteps = sched.timesteps
        z = noise * sched.init_noise_sigma
    else:
        if start_latent is None:
            raise InputError("start=lr@t", "needs the LR latent", "pass start_latent (VAE latent of the upsampled LR)")
        sched, kept, begin = lr_start_schedule(sampler, steps, start_t, lr_start, schedule)
        t0 = kept[:1].to(device)
        z = sched.add_noise(start_latent.to(dtype), noise, t0)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        timesteps = kept
    nfe = 0
    for t in tqdm(timesteps, disable=not progress, desc="sampling", leave=False):
        model_in = sched.scale_model_input(z, t)
        eps = eps_fn(model_in, t.to(device).expand(shape[0]))
        nfe += 1
        z = sched.step(eps.to(z.dtype), t, z, generator=generator, return_dict=False, **extra)[0]
    return z, nfe
