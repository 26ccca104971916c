"""Schedules and samplers shared by every latent-diffusion method in the registry.

`schedules` builds diffusers schedulers (the official SGDM 50-step respaced DDPM, DDIM, DPM-Solver) on
the SD scaled-linear 1000-step schedule; `sampling` runs a denoising loop from pure noise or from the
noised upsampled LR (`start=lr@t`, the LR-start strategy of seeds/000).
"""

from .sampling import (
    LR_START_MODES,
    check_lr_start,
    lr_start_nfe,
    lr_start_timesteps,
    respaced_lr_timesteps,
    sample_latents,
)
from .schedules import SAMPLERS, TRAIN_SCHEDULE, add_noise, make_scheduler, training_scheduler

__all__ = [
    "SAMPLERS",
    "TRAIN_SCHEDULE",
    "add_noise",
    "make_scheduler",
    "training_scheduler",
    "sample_latents",
    "lr_start_timesteps",
    "LR_START_MODES",
    "check_lr_start",
    "lr_start_nfe",
    "respaced_lr_timesteps",
]
