"""Method-level behaviour of the feed-forward baselines outside the trainer: ESRGAN's two stages
(resume without the PSNR-stage file, how `--stage` is answered) and SwinIR's window geometry, which
follows the training LR patch (`network.img_size`) as in the official code."""

from __future__ import annotations

import pytest
import torch

from baselines import esrgan, registry
from baselines.method_config import train_config
from cmsrd.errors import InputError

ESR_NET = {"network": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}}


def configure(method, **kw):
    """`configure_optimizers` as the trainer calls it (`kw`: train keys, hr_px, resuming)."""
    return method.configure_optimizers(train_config(method.settings.train, **kw))


def test_esrgan_gan_stage_resume_does_not_need_the_psnr_file(tmp_path, monkeypatch):
    monkeypatch.setattr(
        esrgan, "PerceptualLoss", lambda *a, **k: torch.nn.Identity()
    )  # no VGG19 (weights, 7 s to build)
    cfg = {
        "stage": "gan",
        "pretrain_network_g": str(tmp_path / "moved" / "model.safetensors"),
        "network_d": {"num_feat": 8},
        "hr_px": 64,
    }
    with pytest.raises(InputError, match="file not found"):  # a fresh GAN run does start from it
        configure(registry.build("esrgan", 16, ESR_NET), **cfg)
    method = registry.build("esrgan", 16, ESR_NET)
    optimizers = configure(method, **cfg, resuming=True)  # the checkpoint restores G (and D)
    assert set(optimizers) == {"g", "d"} and method.stage == "gan"
    with pytest.raises(InputError, match="pretrain_network_g"):  # the config must still name the PSNR generator
        configure(registry.build("esrgan", 16, ESR_NET), **{**cfg, "pretrain_network_g": None}, resuming=True)


def test_esrgan_stage_2_says_how_to_run_the_gan_stage(tmp_path):
    method = registry.build("esrgan", 16, ESR_NET)
    with pytest.raises(InputError) as e:
        method.run_stage(2, tmp_path, {}, tmp_path)
    msg = str(e.value)
    assert (
        "--config baselines/configs/esrgan_gan.yaml" in msg and "train.pretrain_network_g=RUN/model.safetensors" in msg
    )
    assert "only one training stage" not in msg


SWIN_NET = {"network": {"embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4}}


def _geometry(method) -> list[tuple[int, int]]:
    return [(b.window, b.shift) for layer in method.net_g.layers for b in layer.residual_group.blocks]


@pytest.mark.parametrize("scale,img_size,geometry", [(16, 16, [(8, 0), (8, 4)]), (32, 8, [(8, 0), (8, 0)])])
def test_swinir_default_img_size_is_the_lr_patch_of_256_px_tiles(scale, img_size, geometry):
    net = {"network": {"embed_dim": 12, "depths": [2], "num_heads": [2]}}  # default window 8, img_size null
    method = registry.build("swinir", scale, net)
    assert method.net_g.img_size == img_size and _geometry(method) == geometry
    assert method.export_metadata()["network"]["img_size"] == img_size
    assert registry.get("swinir").default_config()["network"]["img_size"] is None


def test_swinir_img_size_follows_training_data_and_checkpoints(tmp_path):
    from baselines.archs.swinir import official_state_dict
    from baselines.checkpoint import save_weights

    method = registry.build("swinir", 16, SWIN_NET)  # 256 px tiles assumed: 16 px patches, shifted blocks
    assert _geometry(method) == [(4, 0), (4, 2)]
    before = {k: v.clone() for k, v in method.net_g.state_dict().items()}
    configure(method, hr_px=64)  # the dataset's LR is 4 px: one window, no shift
    assert method.net_g.img_size == 4 and _geometry(method) == [(4, 0), (4, 0)]
    assert all(torch.equal(before[k], v) for k, v in method.net_g.state_dict().items())  # same weights
    path = save_weights(tmp_path / "m.safetensors", method.trainable_state_dict(), method.export_metadata())

    reader = registry.build("swinir", 16, SWIN_NET)
    reader.load_checkpoint(path)  # takes the checkpoint's geometry (metadata)
    assert _geometry(reader) == [(4, 0), (4, 0)]
    official = tmp_path / "official.pth"
    torch.save({"params": official_state_dict(method.net_g)}, official)
    reader = registry.build("swinir", 16, SWIN_NET)
    reader.load_checkpoint(official)  # ... or the official buffers (no attn_mask: single window)
    assert _geometry(reader) == [(4, 0), (4, 0)]
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(reader.net_g.eval()(x), method.net_g.eval()(x))

    explicit = {"network": {**SWIN_NET["network"], "img_size": 16}}
    with pytest.raises(
        InputError, match=r"network\.img_size = 16: gives other attention windows than checkpoint .* \(4 px\)"
    ):
        registry.build("swinir", 16, explicit).load_checkpoint(path)
    with pytest.raises(
        InputError, match=r"network\.img_size = 16: gives other attention windows than the training LR patches \(4 px\)"
    ):
        configure(registry.build("swinir", 16, explicit), hr_px=64)
    # an explicit value with the same windows is no conflict (img_size 64 and 16 both shift at window 4)
    configure(registry.build("swinir", 16, {"network": {**SWIN_NET["network"], "img_size": 64}}), hr_px=256)


def test_swinir_loaded_weights_are_never_silently_replaced(tmp_path):
    from baselines.checkpoint import save_weights

    net = {"network": {"embed_dim": 12, "depths": [2], "num_heads": [2]}}  # window 8
    src = registry.build("swinir", 16, net)
    path = save_weights(tmp_path / "m.safetensors", src.trainable_state_dict(), src.export_metadata())
    method = registry.build("swinir", 16, net)
    method.load_checkpoint(path)
    # 4 px training patches would shrink the window to 4 (other relative-position tables):
    # the loaded weights cannot follow
    with pytest.raises(InputError, match="needs other relative-position tables than checkpoint"):
        configure(method, hr_px=64)


def test_swinir_trained_geometry_reaches_the_exported_weights(tiny_dataset, tmp_path):
    """The tiny dataset's LR is 4 px: the exported model records img_size 4, and loading it anywhere
    (the benchmark builds from that metadata) gives the unshifted single-window blocks it was trained with."""
    from baselines.checkpoint import read_metadata
    from benchmark.train import train

    config = {
        **SWIN_NET,
        "train": {
            "batch_size": 2,
            "num_workers": 0,
            "total_steps": 1,
            "log_every": 1,
            "val_every": 1,
            "save_every": 1,
            "val_max_images": 1,
            "lpips": "off",
        },
    }
    res = train("swinir", tiny_dataset, tmp_path / "run", config=config, progress=False)
    assert read_metadata(res["weights"])["network"]["img_size"] == 4
    # config.yaml records the config as written (null: follows the data), so a resume compares equal
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["network"]["img_size"] is None
    method = registry.build("swinir", 16, SWIN_NET)
    method.load_checkpoint(res["weights"])
    assert _geometry(method) == [(4, 0), (4, 0)]


def test_failed_swinir_load_keeps_the_network_and_reports_no_load(tmp_path):
    """match_checkpoint rebuilds net_g for the file's geometry before the strict load; when that load fails
    the method keeps its own network and weights, and `loaded_from` names only a checkpoint that loaded."""
    from baselines.checkpoint import save_weights

    wider = registry.build("swinir", 16, {"network": {**SWIN_NET["network"], "embed_dim": 16}})
    configure(wider, hr_px=64)  # img_size 4 in its metadata: loading it rebuilds the reader's net_g
    bad = save_weights(tmp_path / "wider.safetensors", wider.trainable_state_dict(), wider.export_metadata())
    method = registry.build("swinir", 16, SWIN_NET)
    net, weights = method.net_g, {k: v.clone() for k, v in method.net_g.state_dict().items()}
    with pytest.raises(InputError, match="shape mismatch"):
        method.load_checkpoint(bad)
    assert method.net_g is net and method.net_g.img_size == 16 and method.loaded_from is None
    assert all(torch.equal(weights[k], v) for k, v in method.net_g.state_dict().items())
    assert method.config["network"].get("img_size") is None

    good = save_weights(tmp_path / "good.safetensors", method.trainable_state_dict(), method.export_metadata())
    method.load_checkpoint(good)
    assert method.loaded_from == good


def test_swinir_geometry_follows_without_rewriting_the_config():
    """`config` keeps the user's null img_size (config.yaml records what was written); the geometry built is
    reported by export_metadata, which the trainer's model.safetensors carries."""
    method = registry.build("swinir", 16, SWIN_NET)
    configure(method, hr_px=64)
    assert method.config["network"].get("img_size") is None
    assert method.export_metadata()["network"]["img_size"] == 4 == method.net_g.img_size


def test_swinir_resume_across_the_single_window_rule_does_not_loop():
    """A run recorded with img_size 64 (the old default) on 4 px LR patches cannot continue; the error says
    so instead of suggesting an img_size change that the resume check refuses."""
    method = registry.build("swinir", 16, {"network": {**SWIN_NET["network"], "img_size": 64}})
    with pytest.raises(InputError, match="set network.img_size to 4"):
        configure(method, hr_px=64)
    with pytest.raises(InputError, match="cannot continue .* new --out") as e:
        configure(method, hr_px=64, resuming=True)
    assert "set network.img_size" not in str(e.value)
    assert "Otherwise resume on the run's own dataset" in e.value.fix  # the same error on another dataset's LR px
