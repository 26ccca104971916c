"""Random stand-in weights for the metric libraries, written into a temporary torch hub cache.

They exercise the real loading and scoring code paths offline (tests, CI) with files shaped exactly
like the published ones; the numbers they produce are wiring checks, not quality figures. Large tensors
are stored as stride-0 expansions of one random value so a 500 MB VGG16 becomes a few kilobytes on disk
while loading through the same `torch.load` + `load_state_dict` paths. CLIP RN50 is written as a TorchScript
archive, the published file's format, with `sliding_random` views instead (see `_clip_rn50`). A matching
weights manifest (with the stand-ins' real SHA-256) is written too, so `status`/`verify` report them as
present.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

import torch
import yaml

from baselines import weights as wcache

_BIG = 1 << 16


def compact_state_dict(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random state dict of `module`'s shapes; tensors above 64k elements are stride-0 expansions."""
    g = torch.Generator().manual_seed(seed)
    norms = {
        n
        for n, m in module.named_modules()
        if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm))
    }
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

    with (
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
        mock.patch.object(fe.torch, "load", lambda *a, **k: {}),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    return compact_state_dict(net, seed=4)


def _musiq() -> dict[str, torch.Tensor]:
    from pyiqa.archs.musiq_arch import MUSIQ

    return compact_state_dict(MUSIQ(pretrained=False), seed=5)


def sliding_random(shape: tuple[int, ...], generator: torch.Generator, std: float) -> torch.Tensor:
    """N(0, std) values of `shape` held in `shape[0] + prod(shape[1:]) - 1` floats: row i is the window
    `base[i : i + prod(shape[1:])]` of one random vector (an overlapping strided view, which `torch.save`
    keeps as is). Unlike a stride-0 constant, rows and columns differ, so an embedding table still tells
    tokens apart and a projection still mixes channels, at a few kilobytes per tensor."""
    rest = 1
    for d in shape[1:]:
        rest *= d
    base = torch.randn(shape[0] + rest - 1, generator=generator) * std
    inner, stride = [], 1
    for d in reversed(shape[1:]):
        inner.insert(0, stride)
        stride *= d
    return base.as_strided(tuple(shape), (1, *inner))


# OpenAI CLIP RN50 hyper-parameters (CLIP(...) argument order). pyiqa's `clip_model.build_model` reads
# them back from the state dict's shapes and key names, so the stand-in must reproduce both exactly.
CLIP_RN50_CONFIG = dict(
    embed_dim=1024,
    image_resolution=224,
    vision_layers=(3, 4, 6, 3),
    vision_width=64,
    vision_patch_size=None,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
)


class _TensorArchive(torch.nn.Module):
    """A module that only holds named tensors, so it can be saved as a TorchScript archive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def script_archive(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript module whose `state_dict()` is `state` (same keys, shapes, strides): float tensors as
    parameters, the rest as buffers, nested along the dotted names. Saved with `torch.jit.save`, it reads
    back through `torch.jit.load(...).state_dict()` as a published TorchScript checkpoint does."""
    root = _TensorArchive()
    for key, value in state.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, _TensorArchive())
            mod = mod._modules[part]
        if value.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        else:
            mod.register_buffer(leaf, value)
    return torch.jit.script(root)


def _clip_rn50_state() -> dict[str, torch.Tensor]:
    """RN50's state dict (keys and shapes from pyiqa's own `CLIP` class, built on the meta device) with
    compact random values; see `_clip_rn50`."""
    from pyiqa.archs.clip_model import CLIP

    with torch.device("meta"):
        net = CLIP(**CLIP_RN50_CONFIG)
    g = torch.Generator().manual_seed(6)
    norms = {
        n for n, m in net.named_modules() if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm))
    }
    out: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        shape = tuple(v.shape)
        if not v.is_floating_point():  # BatchNorm num_batches_tracked
            out[k] = torch.zeros(shape, dtype=v.dtype)
        elif (owner in norms and leaf == "weight") or k.endswith("running_var"):
            out[k] = torch.ones(shape)
        elif (owner in norms and leaf == "bias") or k.endswith("running_mean"):
            out[k] = torch.zeros(shape)
        elif k == "logit_scale":
            out[k] = torch.tensor(math.log(100.0))
        elif v.ndim >= 2:
            fan_in = shape[0] if k == "text_projection" else v.numel() // shape[0]  # text: x @ text_projection
            out[k] = sliding_random(shape, g, fan_in**-0.5)
        else:
            out[k] = torch.randn(shape, generator=g) * 0.01
    c = CLIP_RN50_CONFIG
    out.update(
        input_resolution=torch.tensor(c["image_resolution"]),
        context_length=torch.tensor(c["context_length"]),
        vocab_size=torch.tensor(c["vocab_size"]),
    )
    return out


def _clip_rn50() -> torch.jit.ScriptModule:
    """Stand-in for OpenAI's `RN50.pt`, in the published file's own format: a TorchScript archive.

    How pyiqa 0.1.16 loads it (`pyiqa/archs/clip_model.py::load`, the same code as OpenAI's `clip.load`):
    `load("RN50")` looks for `<torch hub dir>/clip/RN50.pt`, hashes it against the SHA-256 in OpenAI's
    URL and downloads it again on a mismatch, so a stand-in is handed to pyiqa as a file path (which
    `benchmark.metrics.nr_iqa.CLIPIQA` does once `resolve` has checked the file against the manifest).
    It then tries `torch.jit.load` and rebuilds the network with `build_model(model.state_dict())`,
    which infers RN50's geometry from the key names and shapes. Its fallback for a plain `torch.save`
    state dict does not work: `torch.jit.load` has already read the open file to its end, so the
    fallback `torch.load` of the same file object fails with EOFError. Hence a TorchScript archive
    (`script_archive`) holding RN50's 489 tensors plus the three ints the published archive's state
    dict carries (`input_resolution`, `context_length`, `vocab_size`, dropped by `build_model`).

    Values: norm layers identity, biases small, matrices N(0, 1/fan_in) stored as `sliding_random`
    views (token embeddings distinct, image features depend on the image), `logit_scale` = ln 100 (the
    value trained CLIP saturates at); ~2 MB on disk instead of 244 MB. Scores from it are wiring checks only.

    Other files: none from the network. The prompt tokenizer is `clip.tokenize` of the `openai-clip`
    package (pyiqa imports it in `pyiqa/archs/clip_imports.py`), and its BPE vocabulary
    `bpe_simple_vocab_16e6.txt.gz` ships inside that package (not in the pyiqa wheel). openai-clip 1.0.1
    needs `ftfy` and `from pkg_resources import packaging` (setuptools < 81); without them CLIPIQA
    raises an InputError naming the packages.
    """
    return script_archive(_clip_rn50_state())


MAKERS = {
    "tv_alexnet": _alexnet,
    "tv_vgg16": _vgg16,
    "dists": _dists,
    "fidelity_inception": _fidelity_inception,
    "musiq_koniq": _musiq,
    "clip_rn50": _clip_rn50,
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
        made = MAKERS[key]()
        if isinstance(made, torch.jit.ScriptModule):  # published as a TorchScript archive (CLIP)
            torch.jit.save(made, str(path))
        else:
            torch.save(made, path)
        entry = data["weights"][key]
        entry.pop("sha256_prefix", None)
        entry["sha256"] = wcache.file_sha256(path)
        entry["note"] = "random stand-in for tests (wiring only, not quality numbers)"
    manifest_out = Path(manifest_out)
    manifest_out.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifest_out
