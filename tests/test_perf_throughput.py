"""perf/throughput.py's bookkeeping: which dense bf16 peak a device gets, and that the batch probe only
probes where memory is the limit (CUDA)."""

from __future__ import annotations

import pytest
import torch

from perf import throughput


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_dense_bf16_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert throughput.peak_tflops(torch.device("cuda")) == (peak, name)


def test_cpu_has_no_bound_and_keeps_its_batch():
    assert throughput.peak_tflops(torch.device("cpu"))[0] is None
    assert throughput.probe_batch(object(), 8, 256, 64, torch.device("cpu"), "bf16") == 8


def test_random_init_configs_need_no_weights():
    assert throughput.random_init("sgdm", "tiny") == {"network": {"backbone": {"pretrained": None, "geometry": "tiny"}}}
    assert throughput.random_init("resshift", "sd21-base") == {"autoencoder": {"weights": None}}
    tiny = throughput.random_init("resshift", "tiny")
    assert tiny["autoencoder"]["weights"] is None and tiny["chain"]["steps"] == 4


@pytest.mark.slow
def test_the_flop_figures_quoted_in_perf_results_are_what_the_counter_gives():
    """perf/results/README.md's bound: SGDM's SD2.1-base UNet at 32x32 latents and the VAE decode to 256 px,
    counted on the meta device (no weights, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    from baselines.registry import build

    m = build("sgdm", 32, throughput.random_init("sgdm", "sd21-base"), device="meta")
    z = torch.zeros(1, 4, 32, 32, device="meta")
    with FlopCounterMode(display=False) as unet:
        m.unet(z, torch.tensor([999], device="meta"), encoder_hidden_states=torch.zeros(1, 77, 1024, device="meta"))
    with FlopCounterMode(display=False) as vae:
        m.vae.decode(z)
    assert round(unet.get_total_flops() / 1e9, 1) == 181.1 and round(vae.get_total_flops() / 1e9, 1) == 622.2
