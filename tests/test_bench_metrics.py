"""Metric definitions: PSNR/SSIM against hand-worked values and skimage, Y-channel conversion values,
registry directions; LPIPS/DISTS/MUSIQ/FID/KID code paths with random stand-in weights in a temporary
TORCH_HOME (wiring tests: the values are not quality numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from benchmark import metrics as M
from benchmark.metrics.psnr_ssim import C1, psnr, rgb_to_y, ssim, to_uint8
from cmsrd.errors import InputError, MissingWeightsError


def _img(v, size=16):
    return np.full((size, size, 3), v, np.uint8)


def test_bt601_y_values():
    assert rgb_to_y(_img(0))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(_img(255))[0, 0] == pytest.approx(235.0)  # 16 + 65.481 + 128.553 + 24.966
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    green = np.zeros((1, 1, 3), np.uint8)
    green[..., 1] = 255
    blue = np.zeros((1, 1, 3), np.uint8)
    blue[..., 2] = 255
    assert rgb_to_y(red)[0, 0] == pytest.approx(81.481)
    assert rgb_to_y(green)[0, 0] == pytest.approx(144.553)
    assert rgb_to_y(blue)[0, 0] == pytest.approx(40.966)
    # not YIQ luma (pyiqa's default): 0.299*255 would be 76.245 for red
    assert abs(rgb_to_y(red)[0, 0] - 0.299 * 255) > 5


def test_psnr_hand_values():
    # RGB: every value off by 10 -> MSE 100 -> 10 log10(255^2/100)
    assert psnr(_img(10), _img(0), y_channel=False) == pytest.approx(10 * math.log10(255**2 / 100))
    # Y: grey 10 -> Y = 16 + 219*10/255; black -> 16
    d = 219 * 10 / 255
    assert psnr(_img(10), _img(0)) == pytest.approx(10 * math.log10(255**2 / d**2))
    assert psnr(_img(7), _img(7)) == math.inf
    # one wrong pixel in the border: counted with crop 0, removed with crop 2
    a, b = _img(50), _img(50)
    a[0, 0] = 80
    assert psnr(a, b, crop_border=0, y_channel=False) == pytest.approx(10 * math.log10(255**2 / (900 / (16 * 16))))
    assert psnr(a, b, crop_border=2) == math.inf


def test_float_inputs_rounded_like_pngs():
    f = np.full((3, 16, 16), 100.4 / 255, np.float32)  # CHW float
    assert to_uint8(f).shape == (16, 16, 3) and to_uint8(f)[0, 0, 0] == 100
    assert psnr(f, _img(100)) == math.inf
    assert to_uint8(np.full((2, 2, 3), 1.7))[0, 0, 0] == 255  # clipped


def test_ssim_hand_value_constant_images():
    # constant images: sigma = 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) on Y
    ya, yb = 16 + 219 * 100 / 255, 16 + 219 * 120 / 255
    want = (2 * ya * yb + C1) / (ya**2 + yb**2 + C1)
    assert ssim(_img(100), _img(120)) == pytest.approx(want, rel=1e-9)
    assert ssim(_img(100), _img(100)) == pytest.approx(1.0)


@pytest.mark.parametrize("crop", [0, 3])
def test_psnr_ssim_match_skimage(crop):
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.normal(0, 12, hr.shape).round().astype(int), 0, 255).astype(np.uint8)
    c = slice(crop, -crop if crop else None)
    ys, yh = rgb_to_y(sr)[c, c], rgb_to_y(hr)[c, c]
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert ssim(sr, hr, crop_border=crop) == pytest.approx(structural_similarity(ys, yh, **kw), abs=1e-9)
    assert ssim(sr, hr, crop_border=crop, y_channel=False) == pytest.approx(
        structural_similarity(sr[c, c].astype(float), hr[c, c].astype(float), channel_axis=2, **kw), abs=1e-9
    )
    assert psnr(sr, hr, crop_border=crop) == pytest.approx(peak_signal_noise_ratio(yh, ys, data_range=255), abs=1e-9)
    assert psnr(sr, hr, crop_border=crop, y_channel=False) == pytest.approx(
        peak_signal_noise_ratio(hr[c, c], sr[c, c], data_range=255), abs=1e-9
    )


def test_bad_inputs_are_clear():
    with pytest.raises(InputError, match="does not match HR shape"):
        psnr(_img(0, 16), _img(0, 8))
    with pytest.raises(InputError, match="crop_border=8"):
        psnr(_img(0, 16), _img(0, 16), crop_border=8)
    with pytest.raises(InputError, match="SSIM window"):
        ssim(_img(0, 16), _img(0, 16), crop_border=3)
    with pytest.raises(InputError, match="unknown"):
        M.parse_names("psnr_y,nope")


def test_registry_directions_and_definitions():
    assert M.get("psnr_y").direction == "higher" and M.get("lpips").direction == "lower"
    assert M.get("fid").level == "set" and M.get("musiq").reference is False
    assert "crop_border=16" in M.get("ssim_y").describe(16)
    assert "2048" in M.get("fid").describe() and "299" in M.get("fid").describe()
    assert "PolyForm-Noncommercial" in M.get("clipiqa").describe()
    assert set(M.DEFAULT_METRICS) <= set(M.METRICS)
    f = M.build_image_metric("psnr_y", crop_border=1)
    assert f([_img(3)], [_img(3)]) == [math.inf]


def test_missing_weights_errors_name_file_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError) as e:
        M.build_image_metric("clipiqa")
    assert "RN50.pt" in str(e.value) and str(tmp_path / "empty" / "hub" / "clip" / "RN50.pt") in str(e.value)
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
        M.compute_set_metrics(["fid"], [_img(1)] * 2, [_img(2)] * 2)


@pytest.fixture()
def stand_in_weights(tmp_path, monkeypatch):
    """Factory: write random stand-ins for the given manifest keys into a temp TORCH_HOME."""
    from benchmark.testing import write_fake_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def make(*keys: str):
        manifest = write_fake_weights(keys, tmp_path / "w.yaml")
        monkeypatch.setenv("CMSRD_WEIGHTS_MANIFEST", str(manifest))
        return manifest

    return make


def _patches(images, size):
    """Oracle: non-overlapping size x size crops of every image (partial edge strips dropped)."""
    return [
        img[y : y + size, x : x + size]
        for img in images
        for y in range(0, img.shape[0] - size + 1, size)
        for x in range(0, img.shape[1] - size + 1, size)
    ]


def _pairs(n=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    hr = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    sr = [np.clip(h.astype(int) + rng.integers(-40, 40, h.shape), 0, 255).astype(np.uint8) for h in hr]
    return sr, hr


def test_perceptual_and_nr_wiring(stand_in_weights):
    from baselines import weights as w

    stand_in_weights("tv_alexnet", "tv_vgg16", "dists", "musiq_koniq")
    assert all(w.status(k) == "present" for k in ("tv_alexnet", "tv_vgg16", "dists", "musiq_koniq"))
    sr, hr = _pairs()
    lp = M.build_image_metric("lpips")
    vals = lp(sr, hr)
    assert len(vals) == 3 and all(np.isfinite(vals)) and all(v > 0 for v in vals)
    assert lp(hr, hr) == pytest.approx([0.0] * 3, abs=1e-6)  # LPIPS(x, x) = 0 whatever the weights
    ds = M.build_image_metric("dists")
    dv = ds(sr, hr)
    assert len(dv) == 3 and all(np.isfinite(dv))
    assert ds(hr[:1], hr[:1])[0] == pytest.approx(0.0, abs=1e-4)
    mq = M.build_image_metric("musiq")
    mv = mq(sr[:2])
    assert len(mv) == 2 and all(np.isfinite(mv))


def test_fid_kid_wiring(stand_in_weights, tmp_path):
    from cmsrd.io import write_png

    stand_in_weights("fidelity_inception")
    # four small images per set keep the CPU Inception passes short; the SR set is given as PNG paths
    # (read lazily); KID's subsets shrink to 2 of 4 images, so they differ and the std is not a fake 0
    sr, hr = _pairs(n=4, size=32)
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    for path, img in zip(paths, sr):
        write_png(path, img)
    res = M.compute_set_metrics(["fid", "kid"], paths, hr)
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and np.isfinite(res["kid"])
    assert res["kid_subset_size"] == 2 and res["kid_std"] > 0
    assert res["feature_layer"] == "2048" and "bilinear" in res["resize"]
    ps = _patches(sr, 16)
    assert len(ps) == 4 * 4 and ps[0].shape == (16, 16, 3)


def test_kid_subset_size_gives_differing_subsets_on_small_sets():
    from benchmark.metrics.distribution import kid_subset_size

    # no step at N = 1000: 1001 images get subsets of 500 (not 1000 of 1001, nearly the same set every draw)
    assert [kid_subset_size(n) for n in (2, 3, 4, 100, 1000, 1001, 1999, 2000, 5000)] == [
        2,
        2,
        2,
        50,
        500,
        500,
        999,
        1000,
        1000,
    ]
    assert "100 subsets of 2 images" in M.get("kid").describe(n_images=4)
    assert "no spread" in M.get("kid").describe(n_images=2)
    assert "max(2, N // 2)" in M.get("kid").describe()
    assert "subsets of 500 images." in M.get("kid").describe(n_images=1001)
    from benchmark.metrics.distribution import FID_SEED, KID_MAX_SUBSET, KID_SUBSETS

    # run.json must say which subsets were drawn: count, size and the seed torch-fidelity draws them with
    assert f"{KID_SUBSETS} random subsets of min({KID_MAX_SUBSET}," in M.get("kid").definition
    assert f"rng seed {FID_SEED})" in M.get("kid").definition


def test_fid_kid_passes_subset_size_and_omits_a_meaningless_std(monkeypatch):
    from benchmark.metrics import distribution as D

    seen = []

    def fake(sr, hr, device, kid, batch_size, seed=D.FID_SEED, subset=None):
        assert seed == D.FID_SEED
        seen.append(subset)
        return {
            "frechet_inception_distance": 1.0,
            "kernel_inception_distance_mean": 0.1,
            "kernel_inception_distance_std": 0.0,
        }

    monkeypatch.setattr(D, "_run_fidelity", fake)
    assert D.fid_kid([_img(1)] * 2, [_img(2)] * 2)["kid_std"] is None  # subsets of 2 out of 2: all the same set
    assert D.fid_kid([_img(1)] * 6, [_img(2)] * 6)["kid_std"] == 0.0 and seen == [2, 3]
    assert D.fid_kid([_img(1)] * 6, [_img(2)] * 6, subset_size=4)["kid_subset_size"] == 4
    with pytest.raises(InputError, match="KID subset size 7"):
        D.fid_kid([_img(1)] * 6, [_img(2)] * 6, subset_size=7)
    assert [D.kid_has_spread(n) for n in (2, 3, 4)] == [False, True, True] and not D.kid_has_spread(6, 6)
    seen.clear()
    assert D.patch_fid([_img(1, 32)] * 2, [_img(2, 32)] * 2, patch_size=16)["n_patches"] == 8
    assert seen == [None]  # FID only: no KID subset is passed


def test_set_metric_images_are_read_lazily_once_per_image(tmp_path):
    import io

    from tqdm import tqdm

    from benchmark.metrics.distribution import _UInt8Images
    from cmsrd.io import write_png

    sr, _ = _pairs(n=3, size=40)
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, img in zip(paths, sr):
        write_png(path, img)
    with tqdm(total=3, file=io.StringIO()) as bar:
        ds = _UInt8Images(paths, patch=16, bar=bar)
        assert len(ds) == 3 * 4 and bar.n == 0  # the patch grid comes from PNG headers, nothing decoded yet
        got = [ds[i] for i in range(len(ds))]
        assert bar.n == 3  # each image decoded once for its four patches
    want = _patches(sr, 16)
    assert all(np.array_equal(g.permute(1, 2, 0).numpy(), w) for g, w in zip(got, want))
    whole = _UInt8Images(paths)
    assert (
        len(whole) == 3 and whole[1].shape == (3, 40, 40) and np.array_equal(whole[1].permute(1, 2, 0).numpy(), sr[1])
    )


def test_set_sizes_checked_up_front():
    from benchmark.metrics.distribution import check_set_size

    check_set_size(["fid", "kid"], 2, (64, 64))
    check_set_size(["patch_fid"], 1, (64, 64))  # 16 patches of 16 px
    with pytest.raises(InputError, match="FID/KID need at least 2 images.*has 1"):
        check_set_size(["psnr_y", "kid"], 1, (64, 64))
    with pytest.raises(InputError, match="patch-FID needs at least 2 patches"):
        check_set_size(["patch_fid"], 1, (16, 16))


def _clip_import_problem() -> str | None:
    """Why pyiqa's CLIP tokenizer (the `openai-clip` package) cannot be imported, or None."""
    try:
        import pyiqa.archs.clip_imports  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture()
def no_network(monkeypatch):
    """Any socket connection fails the test: pyiqa's CLIP loader downloads RN50.pt when its own hash
    check fails, and that must never happen."""
    import socket

    def refuse(self, address, *a, **k):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_clip_rn50_stand_in_is_compact_torchscript(stand_in_weights):
    import torch

    from baselines import weights as w
    from benchmark.testing import CLIP_RN50_CONFIG

    stand_in_weights("clip_rn50")
    path = w.resolve("clip_rn50")
    assert path.name == "RN50.pt" and path.parent.name == "clip" and path.stat().st_size < 4e6
    sd = torch.jit.load(str(path), map_location="cpu").state_dict()  # the published file is TorchScript too
    assert len(sd) == 489 + 3 and int(sd["input_resolution"]) == 224 and int(sd["vocab_size"]) == 49408
    assert sd["token_embedding.weight"].shape == (49408, 512) and sd["text_projection"].shape == (512, 1024)
    assert sd["visual.attnpool.positional_embedding"].shape == (50, 2048)
    assert not torch.equal(sd["token_embedding.weight"][0], sd["token_embedding.weight"][1])  # tokens differ
    assert CLIP_RN50_CONFIG["vision_layers"] == (3, 4, 6, 3)


def test_clipiqa_wiring(stand_in_weights, no_network):
    why = _clip_import_problem()
    assert not why, f"CLIP-IQA needs openai-clip (pinned in requirements/lock.txt): {why}"
    stand_in_weights("clip_rn50")
    f = M.build_image_metric("clipiqa")
    net = f.metric.net.clip_model[0]  # rebuilt by pyiqa's build_model from the stand-in's shapes
    assert net.visual.input_resolution == 224 and net.context_length == 77 and net.vocab_size == 49408
    assert [len(getattr(net.visual, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)] + [_img(128, 64)]
    vals = f(imgs)
    assert len(vals) == 4 and all(np.isfinite(vals)) and all(0.0 <= v <= 1.0 for v in vals)
    assert len(set(vals)) > 1  # the image reaches the score (features are not constant)
    assert f(imgs[:1]) == pytest.approx(vals[:1], abs=1e-5)  # batching does not change a score


def test_clipiqa_missing_corrupt_weights_and_package_are_clear(stand_in_weights, no_network, monkeypatch):
    import sys

    from baselines import weights as w

    stand_in_weights("clip_rn50")
    path = w.resolve("clip_rn50")
    # no openai-clip: one InputError naming the package, not a ModuleNotFoundError from inside pyiqa
    monkeypatch.setitem(sys.modules, "pyiqa.archs.clip_imports", None)
    with pytest.raises(InputError, match="openai-clip"):
        M.build_image_metric("clipiqa")
    monkeypatch.delitem(sys.modules, "pyiqa.archs.clip_imports")
    # corrupt (truncated) file: caught by the manifest hash before pyiqa sees it (pyiqa would re-download)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError) as e:
        M.build_image_metric("clipiqa")
    assert not isinstance(e.value, MissingWeightsError)
    assert "RN50.pt" in str(e.value) and "does not match" in str(e.value) and "weights fetch clip_rn50" in str(e.value)
    # missing file: MissingWeightsError with the file name, the expected path and the URL
    path.unlink()
    with pytest.raises(MissingWeightsError) as e:
        M.build_image_metric("clipiqa")
    assert str(path) in str(e.value) and "openaipublic" in str(e.value)
