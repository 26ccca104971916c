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
