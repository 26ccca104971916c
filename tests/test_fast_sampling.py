"""The shared fast sampling path (baselines/diffusion/fast.py): each switch gives the eager fp32 images within
its stated tolerance on the tiny geometry, per-image seeding stays batch-independent, and what cannot run on
this device is refused, not dropped.

Tolerances (images in [0, 1], max abs difference over all pixels of 2 images, 4 DDPM steps, random weights):
- layout/attention/compile/decode chunking change only summation order: <= 1e-4;
- bf16 autocast (denoiser in bf16, latent and scheduler in fp32): <= 0.08 max, <= 0.01 mean, which is what
  bf16's 8-bit mantissa gives through 4 ancestral steps and the VAE with random weights.
"""

from __future__ import annotations

import pytest
import torch

from baselines.conditions import Conditions
from baselines.diffusion import fast
from baselines.inference import super_resolve_batch
from baselines.registry import build
from baselines.seeding import seeded_generators
from cmsrd.errors import InputError

TINY = {"network": {"backbone": {"pretrained": None, "geometry": "tiny"}}, "sampler": {"steps": 4}}
TINY_SGDM = {**TINY, "network": {**TINY["network"], "cond_channels": 64}}  # + SGDM's condition encoder width
EXACT = 1e-4


def _batch(n: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {k: torch.rand(n, 3, size, size, generator=g) for k in ("sr", "map")}
    return {**out, "lr": torch.rand(n, 3, size // 32, size // 32, generator=g)}


def _run(opts: fast.FastOptions | None, precision: str = "fp32", batch=None, indices=(0, 1), method="ldm"):
    torch.manual_seed(0)
    m = build(method, 32, TINY_SGDM if method.startswith("sgdm") else TINY).eval()
    if opts is not None:
        fast.apply(m, opts)
    batch = batch or _batch(len(indices))
    return super_resolve_batch(m, batch, Conditions(), "cpu", precision, seeded_generators(7, indices))


@pytest.fixture(scope="module")
def eager():
    return _run(None)


@pytest.mark.parametrize(
    "opts",
    [
        fast.FastOptions(channels_last=True),
        fast.FastOptions(sdpa=False),
        fast.FastOptions(decode_batch=1),
        fast.defaults("cpu"),
    ],
    ids=["channels_last", "unfused-attention", "decode_batch", "cpu-default"],
)
def test_each_switch_matches_eager_fp32(eager, opts):
    out = _run(opts)
    assert out.shape == eager.shape and (out - eager).abs().max() <= EXACT


def test_compiled_denoiser_and_decoder_match_eager(eager):
    # aot_eager traces and runs the same graphs torch.compile hands to inductor, without a C++ toolchain
    out = _run(fast.FastOptions(compile="denoiser+vae", compile_backend="aot_eager"))
    assert (out - eager).abs().max() <= EXACT


def test_bf16_autocast_within_bf16_tolerance_and_scheduler_in_fp32(eager, monkeypatch):
    from baselines.diffusion import sampling

    seen = []
    real_step = sampling.make_scheduler

    def spy(*a, **k):
        sched = real_step(*a, **k)
        step = sched.step

        def checked(eps, t, z, **kw):
            seen.append((eps.dtype, z.dtype, torch.is_autocast_enabled("cpu")))
            return step(eps, t, z, **kw)

        sched.step = checked
        return sched

    monkeypatch.setattr(sampling, "make_scheduler", spy)
    out = _run(fast.FastOptions(channels_last=True), precision="bf16")
    diff = (out - eager).abs()
    assert diff.max() <= 0.08 and diff.mean() <= 0.01 and diff.max() > 0  # bf16 really ran
    assert seen and all(s == (torch.float32, torch.float32, False) for s in seen)


def test_per_image_seeding_is_batch_independent_on_the_fast_path():
    opts = fast.FastOptions(channels_last=True, decode_batch=1)
    batch = _batch(3)
    whole = _run(opts, batch=batch, indices=(0, 1, 2))
    alone = _run(opts, batch={k: v[2:] for k, v in batch.items()}, indices=(2,))
    assert (whole[2:] - alone).abs().max() <= EXACT


def test_resshift_chain_takes_the_same_path():
    from perf.throughput import random_init

    cfg = random_init("resshift", "tiny")
    batch = {"lr": torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))}

    def run(opts):
        torch.manual_seed(0)
        m = build("resshift", 16, cfg).eval()
        if opts is not None:
            fast.apply(m, opts)
        return super_resolve_batch(m, batch, Conditions(), "cpu", "fp32", seeded_generators(7, (0, 1)))

    ref = run(None)
    assert (run(fast.FastOptions(channels_last=True, decode_batch=1)) - ref).abs().max() <= EXACT


def test_sgdm_takes_the_same_path(monkeypatch):
    calls = []
    monkeypatch.setattr(fast, "active", lambda real=fast.active: calls.append(real()) or real())
    a = _run(None, method="sgdm")
    b = _run(fast.FastOptions(channels_last=True, decode_batch=1), method="sgdm")
    assert (a - b).abs().max() <= EXACT and calls[-1] == fast.FastOptions(channels_last=True, decode_batch=1)


def test_options_parse_record_and_refuse():
    cpu = fast.parse("auto", "cpu")
    assert cpu == fast.defaults("cpu") and not cpu.cuda_graph and cpu.compile == "off"
    assert fast.parse("eager,channels_last,decode_batch=4", "cpu").as_record() == {
        "channels_last": True,
        "sdpa": True,
        "compile": "off",
        "compile_backend": "inductor",
        "cuda_graph": False,
        "decode_batch": 4,
    }
    assert fast.parse({"compile": "denoiser"}, "cpu").compile == "denoiser"
    assert fast.defaults("cuda") == fast.FastOptions(channels_last=True, cuda_graph=True, decode_batch=32)
    with pytest.raises(InputError, match="needs a CUDA device"):
        fast.parse("cuda_graph=on", "cpu")
    with pytest.raises(InputError, match="unknown"):
        fast.parse("turbo", "cpu")
    with pytest.raises(InputError, match="choose from"):
        fast.parse("compile=everything", "cpu")
    with pytest.raises(InputError, match="not on/off"):
        fast.parse("sdpa=maybe", "cpu")
    m = build("ldm", 32, TINY)
    fast.apply(m, cpu)
    fast.apply(m, cpu)  # idempotent
    with pytest.raises(InputError, match="already applied"):
        fast.apply(m, fast.FastOptions(channels_last=True))


def test_runner_records_the_switches_in_run_json_and_refuses_impossible_ones(tiny_dataset, tmp_path):
    import json

    from benchmark.runner import RunConfig, run_benchmark

    def cfg(out, switches):
        return RunConfig(tiny_dataset, out, methods="bicubic", metrics=["psnr_y"], device="cpu", fast=switches)

    run_benchmark(cfg(tmp_path / "run", "eager,decode_batch=2"))
    rec = json.loads((tmp_path / "run" / "run.json").read_text())["fast_sampling"]
    assert rec == {"requested": "eager,decode_batch=2", **fast.FastOptions(decode_batch=2).as_record()}
    with pytest.raises(InputError, match="needs a CUDA device"):
        run_benchmark(cfg(tmp_path / "run2", "auto,cuda_graph=on"))
    assert not (tmp_path / "run2" / "leaderboard.csv").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_and_channels_last_match_eager_on_gpu():
    """The CUDA-only switches (what the GPU default uses), same tolerance as the CPU switches."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = build("ldm", 32, TINY, device="cuda").eval()
    batch, gens = _batch(2), lambda: seeded_generators(7, (0, 1), dev)
    ref = super_resolve_batch(m, batch, Conditions(), dev, "fp32", gens())
    fast.apply(m, fast.FastOptions(channels_last=True, cuda_graph=True))
    out = super_resolve_batch(m, batch, Conditions(), dev, "fp32", gens())
    assert (out - ref).abs().max() <= 1e-3  # TF32/cuDNN algorithm choice may differ between layouts
