"""Method-level behaviour of the feed-forward baselines outside the trainer: ESRGAN's two stages
(resume without the PSNR-stage file, how `--stage` is answered) and SwinIR's window geometry, which
follows the training LR patch (`network.img_size`) as in the official code."""

from __future__ import annotations

import pytest
import torch

from baselines import esrgan, registry
from cmsrd.errors import InputError

ESR_NET = {"network": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}}


def test_esrgan_gan_stage_resume_does_not_need_the_psnr_file(tmp_path, monkeypatch):
    monkeypatch.setattr(esrgan, "PerceptualLoss", lambda *a, **k: torch.nn.Identity())  # no VGG19 (weights, 7 s to build)
    cfg = {"stage": "gan", "pretrain_network_g": str(tmp_path / "moved" / "model.safetensors"), "network_d": {"num_feat": 8}, "hr_px": 64}
    with pytest.raises(InputError, match="file not found"):  # a fresh GAN run does start from it
        registry.build("esrgan", 16, ESR_NET).configure_optimizers(cfg)
    method = registry.build("esrgan", 16, ESR_NET)
    optimizers = method.configure_optimizers({**cfg, "resuming": True})  # the checkpoint restores G (and D)
    assert set(optimizers) == {"g", "d"} and method.stage == "gan"
    with pytest.raises(InputError, match="pretrain_network_g"):  # the config must still name the PSNR generator
        registry.build("esrgan", 16, ESR_NET).configure_optimizers({**cfg, "pretrain_network_g": None, "resuming": True})


def test_esrgan_stage_2_says_how_to_run_the_gan_stage(tmp_path):
    method = registry.build("esrgan", 16, ESR_NET)
    with pytest.raises(InputError) as e:
        method.run_stage(2, tmp_path, {}, tmp_path)
    msg = str(e.value)
    assert "--config baselines/configs/esrgan_gan.yaml" in msg and "train.pretrain_network_g=RUN/model.safetensors" in msg
    assert "only one training stage" not in msg
