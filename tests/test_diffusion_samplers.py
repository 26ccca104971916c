"""Shared diffusion schedules and samplers (baselines.diffusion): official SGDM timesteps, the DDPM update,
every sampler recovering a known x0 with an exact noise oracle, and the LR-start sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.diffusion import (
    check_lr_start,
    lr_start_nfe,
    lr_start_timesteps,
    make_scheduler,
    respaced_lr_timesteps,
    sample_latents,
    training_scheduler,
)
from cmsrd.errors import InputError


def test_official_50_step_timesteps():
    ts = make_scheduler("ddpm", 50).timesteps.tolist()
    # IDDPM space_timesteps(1000, "50"): round(k * 999 / 49), k = 0..49, run in reverse
    official = sorted({int(round(k * 999 / 49)) for k in range(50)}, reverse=True)
    assert ts == official
    assert ts[:3] == [999, 979, 958] and ts[-2:] == [20, 0] and len(ts) == 50


def test_training_schedule_is_ldm_linear():
    s = training_scheduler()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(s.betas.double(), betas, atol=1e-9)
    assert float(s.alphas_cumprod[999]) == pytest.approx(0.00466, abs=1e-5)


def test_ddpm_step_is_respaced_posterior_with_fixed_small_variance():
    """One step 999 -> 979 equals the IDDPM respaced posterior mean plus fixed-small noise."""
    s = make_scheduler("ddpm", 50)
    ac = training_scheduler().alphas_cumprod.double()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    noise_gen = torch.Generator().manual_seed(7)
    out = s.step(eps.float(), 999, z.float(), generator=noise_gen).prev_sample.double()
    a_t, a_prev = ac[999], ac[979]
    beta = 1 - a_t / a_prev
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * z
    var = beta * (1 - a_prev) / (1 - a_t)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out, mean + var.sqrt() * noise.double(), atol=1e-4)


def _oracle(x0: torch.Tensor):
    """eps(z_t, t) of a model that knows x0 exactly."""
    ac = training_scheduler().alphas_cumprod

    def eps(z, t):
        a = ac[t.long()].view(-1, 1, 1, 1).to(z)
        return (z - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddpm", 7), ("ddim", 13), ("dpm-solver", 20)])
def test_samplers_recover_x0_with_exact_eps(sampler, steps):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    z, nfe = sample_latents(
        _oracle(x0), tuple(x0.shape), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(3)
    )
    assert nfe == steps
    assert torch.allclose(z, x0, atol=2e-3), float((z - x0).abs().max())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
def test_lr_start_runs_fewer_steps_and_starts_from_noised_lr(sampler):
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    lr_latent = x0 + 0.3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    seen: list[int] = []
    first: list[torch.Tensor] = []
    oracle = _oracle(x0)

    def eps(z, t):
        seen.append(int(t[0]))
        if not first:
            first.append(z.clone())
        return oracle(z, t)

    z, nfe = sample_latents(
        eps,
        tuple(x0.shape),
        sampler=sampler,
        steps=50,
        start_latent=lr_latent,
        start_t=400,
        generator=torch.Generator().manual_seed(2),
    )
    full = make_scheduler(sampler, 50).timesteps
    kept = [t for t in full.tolist() if t <= 400]
    assert seen == kept and nfe == len(kept) < 50
    # the first model input is the LR latent noised to the first kept timestep (same seed -> same noise)
    a = training_scheduler().alphas_cumprod[kept[0]]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    expected = a.sqrt() * lr_latent + (1 - a).sqrt() * noise
    assert torch.allclose(first[0], expected, atol=1e-4)
    assert torch.allclose(z, x0, atol=2e-3)


def test_bad_sampler_settings_raise_input_error():
    with pytest.raises(InputError, match="sampler"):
        make_scheduler("euler-ish", 10)
    with pytest.raises(InputError, match="steps"):
        make_scheduler("ddpm", 0)
    with pytest.raises(InputError, match="lr@5"):
        lr_start_timesteps(make_scheduler("ddim", 10).timesteps, 5)  # below every DDIM timestep (>= 99)
    with pytest.raises(InputError, match="start_latent|LR latent"):
        sample_latents(lambda z, t: z, (1, 4, 2, 2), steps=5, start_t=300)


def test_seeded_sampling_is_reproducible():
    f = lambda z, t: 0.1 * z  # noqa: E731
    a, _ = sample_latents(f, (1, 4, 4, 4), steps=5, generator=torch.Generator().manual_seed(9))
    b, _ = sample_latents(f, (1, 4, 4, 4), steps=5, generator=torch.Generator().manual_seed(9))
    c, _ = sample_latents(f, (1, 4, 4, 4), steps=5, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert np.isfinite(a.numpy()).all()


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver"])
def test_per_sample_generators_make_samples_independent_of_the_batch(sampler):
    """With one generator per sample (what the runner passes), sample i of a batch equals sampling it alone:
    initial noise and every ancestral step's noise come from its own stream."""
    from baselines.seeding import seeded_generators

    f = lambda z, t: 0.1 * z  # noqa: E731
    batch, _ = sample_latents(f, (3, 4, 4, 4), sampler=sampler, steps=5, generator=seeded_generators(7, [0, 1, 2]))
    alone = [
        sample_latents(f, (1, 4, 4, 4), sampler=sampler, steps=5, generator=seeded_generators(7, [i]))[0]
        for i in range(3)
    ]
    assert torch.equal(batch, torch.cat(alone))
    assert not torch.allclose(alone[0], alone[1])
    with pytest.raises(ValueError, match="one per sample"):
        sample_latents(f, (3, 4, 4, 4), steps=5, generator=seeded_generators(7, [0, 1]))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
@pytest.mark.parametrize("steps,start_t", [(20, 400), (3, 250), (1, 100)])
def test_respaced_lr_start_runs_exactly_steps_and_returns_the_target(sampler, steps, start_t):
    """`lr_start="respace"`: exactly `steps` evaluations at t, t - t/steps, ... and, with an exact
    denoiser, the chain started from the noised LR ends on the target."""
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    lr = x0 + 0.3 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    seen: list[int] = []
    oracle = _oracle(x0)

    def eps(z, t):
        seen.append(int(t[0]))
        return oracle(z, t)

    z, nfe = sample_latents(
        eps,
        tuple(x0.shape),
        sampler=sampler,
        steps=steps,
        start_latent=lr,
        start_t=start_t,
        lr_start="respace",
        generator=torch.Generator().manual_seed(2),
    )
    assert nfe == steps == len(seen) == lr_start_nfe(sampler, steps, start_t, "respace")
    assert seen == respaced_lr_timesteps(start_t, steps).tolist() and seen[0] == start_t
    assert torch.allclose(z, x0, atol=2e-3), float((z - x0).abs().max())


def test_lr_start_nfe_matches_truncated_grid():
    assert lr_start_nfe("ddpm", 50, 400, "truncate") == len(
        [t for t in make_scheduler("ddpm", 50).timesteps if t <= 400]
    )


def test_lr_start_out_of_range_names_condition_and_range():
    with pytest.raises(InputError, match=r"start=lr@1000.*1\.\.999"):
        check_lr_start(10, 1000, "respace")
    with pytest.raises(InputError, match=r"steps=50 with start=lr@20.*steps=1\.\.20"):
        check_lr_start(50, 20, "respace")
    with pytest.raises(InputError, match="start=lr@0"):
        respaced_lr_timesteps(0, 1)
