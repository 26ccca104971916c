"""`python -m baselines.sgdm.throughput`: fp32 means IEEE fp32 (no TF32 in matmuls or cuDNN convolutions),
and every JSON line records both flags. A stand-in method keeps this off the diffusers import path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from baselines.sgdm import throughput


class _Method:
    spec = SimpleNamespace(name="sgdm")
    backbone_source = "random:stand-in"
    device = torch.device("cpu")
    flags_seen: list[tuple[bool, bool]] = []

    def eval(self):
        return self

    def nfe(self, cond):
        return cond.steps

    def super_resolve(self, batch, cond, generator=None):
        self.flags_seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return batch["sr"]


def test_fp32_disables_tf32_and_lines_record_it(capsys, monkeypatch):
    monkeypatch.setattr(throughput, "build", lambda *a, **k: _Method())
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # the torch defaults
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        throughput.main(["--device", "cpu", "--batch", "2", "--precision", "fp32", "--size", "8", "--steps", "3"])
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1 and lines[0]["precision"] == "fp32" and lines[0]["nfe"] == 3
    assert lines[0]["tf32_matmul"] is False and lines[0]["tf32_cudnn"] is False
    assert _Method.flags_seen and set(_Method.flags_seen) == {(False, False)}  # off while measuring
