"""Random stand-in weights for the metric libraries, written into a temporary torch hub cache.

They exercise the real loading and scoring code paths offline (tests, CI) with files shaped exactly
like the published ones; the numbers they produce are wiring checks, not quality figures. Large tensors
are stored as stride-0 expansions of one random value so a 500 MB VGG16 becomes a few kilobytes on disk
while loading through the same `torch.load` + `load_state_dict` paths. A matching weights manifest (with
the stand-ins' real SHA-256) is written too, so `status`/`verify` report them as present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable
from unittest import mock

import torch
import yaml

from baselines import weights as wcache

_BIG = 1 << 16


def compact_state_dict(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random state dict of `module`'s shapes; tensors above 64k elements are stride-0 expansions."""
    g = torch.Generator().manual_seed(seed)
    norms = {n for n, m in module.named_modules() if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm))}
    out = {}
    for k, v in module.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in norms and leaf in ("weight", "bias"):  # identity affine keeps the signal alive
            out[k] = torch.ones_like(v) if leaf == "weight" else torch.zeros_like(v)
        elif not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.ones_like(v)
        elif k.endswith("running_mean"):
            out[k] = torch.zeros_like(v)
        elif v.numel() > _BIG:  # positive 1/fan_in: the layer averages its inputs, activations stay alive
            fan_in = max(1, v.numel() // v.shape[0])
            out[k] = torch.full((), (1.0 + 0.5 * float(torch.rand((), generator=g))) / fan_in).expand(v.shape)
        else:
            out[k] = torch.randn(v.shape, generator=g) * scale
    return out


def _alexnet() -> dict[str, torch.Tensor]:
    import torchvision

    return compact_state_dict(torchvision.models.alexnet(), seed=1)


def _vgg16() -> dict[str, torch.Tensor]:
    import torchvision

    return compact_state_dict(torchvision.models.vgg16(), seed=2)


def _dists() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"alpha": torch.rand(1, 1475, 1, 1, generator=g) * 0.2, "beta": torch.rand(1, 1475, 1, 1, generator=g) * 0.2}


def _fidelity_inception() -> dict[str, torch.Tensor]:
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(fe.torch, "load", lambda *a, **k: {}):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    return compact_state_dict(net, seed=4)


def _musiq() -> dict[str, torch.Tensor]:
    from pyiqa.archs.musiq_arch import MUSIQ

    return compact_state_dict(MUSIQ(pretrained=False), seed=5)


MAKERS = {
    "tv_alexnet": _alexnet,
    "tv_vgg16": _vgg16,
    "dists": _dists,
    "fidelity_inception": _fidelity_inception,
    "musiq_koniq": _musiq,
}


def write_fake_weights(keys: Iterable[str], manifest_out: str | Path) -> Path:
    """Write stand-ins for `keys` under the current torch hub dir and a manifest whose hashes match them.

    Point `CMSRD_WEIGHTS_MANIFEST` at the returned path to use it.
    """
    base = wcache.load_manifest(wcache.MANIFEST_PATH)
    data = yaml.safe_load(wcache.MANIFEST_PATH.read_text())
    for key in keys:
        if key not in MAKERS:
            raise KeyError(f"no stand-in maker for {key!r}; known: {sorted(MAKERS)}")
        path = base[key].expected_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(MAKERS[key](), path)
        entry = data["weights"][key]
        entry.pop("sha256_prefix", None)
        entry["sha256"] = wcache.file_sha256(path)
        entry["note"] = "random stand-in for tests (wiring only, not quality numbers)"
    manifest_out = Path(manifest_out)
    manifest_out.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifest_out
