"""One denoising loop for every latent-diffusion method: pure-noise start or `start=lr@t`.

`start=lr@t` (seeds/000, "an efficient sampling strategy that starts with LR images and progressively adds
noise"): the upsampled LR is encoded to a latent, noised to the first sampler timestep <= t with the
training schedule, and denoised from there, so only the sampler steps at or below t are run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from cmsrd.errors import InputError

from ..seeding import Generators, randn
from .schedules import make_scheduler

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> predicted noise


def lr_start_timesteps(timesteps: torch.Tensor, start_t: int) -> torch.Tensor:
    """The sampler timesteps that remain when starting from the LR latent noised to `start_t`."""
    if not 0 <= start_t <= 999:
        raise InputError(f"start=lr@{start_t}", "timestep must be in 0..999", "e.g. start=lr@400")
    kept = timesteps[timesteps <= start_t]
    if kept.numel() == 0:
        raise InputError(f"start=lr@{start_t}", "is below every sampler timestep", "use a larger t or more steps")
    return kept


@torch.no_grad()
def sample_latents(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    start_latent: torch.Tensor | None = None,
    start_t: int | None = None,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    schedule: dict[str, Any] | None = None,
    eta: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Run the reverse process; returns (z_0, number of eps evaluations).

    With `start_t` set, `start_latent` (the clean latent of the upsampled LR) is noised to the first kept
    timestep and only the remaining steps run. `schedule` replaces SD's betas (`schedules.train_schedule`);
    `eta` is DDIM's noise level (ddim only; its noise comes from `generator` too).
    """
    if eta and not sampler.startswith("ddim"):
        raise InputError(f"sampler {sampler!r} with eta {eta}", "eta applies to ddim only", "set eta: 0")
    sched = make_scheduler(sampler, steps, schedule)
    extra = {"eta": float(eta)} if eta else {}
    timesteps = sched.timesteps
    noise = randn(shape, generator, device, dtype)  # a list of generators: one stream per sample
    if start_t is None:
        z = noise * sched.init_noise_sigma
    else:
        if start_latent is None:
            raise InputError("start=lr@t", "needs the LR latent", "pass start_latent (VAE latent of the upsampled LR)")
        kept = lr_start_timesteps(timesteps, start_t)
        begin = len(timesteps) - len(kept)
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
