"""TTST (Xiao et al., IEEE TIP 2024) at x16/x32: the released network with 2^n pixel-shuffle stages.

L1 training with the official options (Adam 1e-4, batch 4, `configs/ttst.yaml`). Attention geometry
follows the data exactly as SwinIR's does (`network.img_size` null: the training LR patch; x32's 8 px LR
is one unshifted window), so this method reuses SwinIR's geometry handling.

Weights: `checkpoint:` / `--weights` load strictly at the built scale (ours, or the released
`ttst_4x.pth` layout: DataParallel `module.` keys and two geometry buffers, dropped). The authors
released x4 only; `train.pretrain_network_g` starts a run from a checkpoint of another supported scale:
every tensor but the upsampler stages is loaded, the stages start new, and the new and dropped keys are
logged. See `baselines/ttst.md`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmsrd.errors import InputError

from .archs.ttst import convert_official
from .checkpoint import load_strict, read_metadata, read_state_dict
from .feedforward import FeedForwardConfig, FeedForwardTrain
from .method_config import Adam, Optimizer
from .specs import TTST
from .swinir import SwinIRMethod

log = logging.getLogger(__name__)

SPEC = TTST  # the registry's spec (`baselines.specs`): listing methods needs no torch

_UP = re.compile(r"^upsample\.(\d+)\.(weight|bias)$")


def upsampler_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The upsampler's keys in stage order (weight before bias), whatever order the file stores them in."""
    found = {k: m for k in state if (m := _UP.match(k))}
    return sorted(found, key=lambda k: (int(found[k][1]), found[k][2] != "weight"))


@dataclass(frozen=True)
class TTSTTrain(FeedForwardTrain):
    """L1 with the official optimizer (train_4x.py: Adam lr 1e-4, torch's betas) and a start file of another scale."""

    optim_g: Optimizer = field(default_factory=lambda: Adam(lr=1e-4, betas=(0.9, 0.999)))
    pretrain_network_g: str | None = None  # a TTST of another scale (the released x4): all but the upsampler load


@dataclass(frozen=True)
class TTSTConfig(FeedForwardConfig):
    train: TTSTTrain = field(default_factory=TTSTTrain)


class TTSTMethod(SwinIRMethod):
    config_type = TTSTConfig
    key_layouts = "ours, and the released ttst_4x.pth (DataParallel `module.` keys, relative_position_index_SA/_OCA)"
    _reading: Path | None = None  # the file being loaded, for checkpoint_scale's errors

    def convert_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_official(state)

    def upsampler_scale(self, state: dict[str, torch.Tensor], what: str) -> int | None:
        """The scale of a (converted) state dict's upsampler: 2 ** (number of x2 pixel-shuffle convs).
        A stage that is not a x2 pixel shuffle (HAT's x3: 9 x num_feat outputs) or a scale this method does
        not build is one InputError naming the keys."""
        weights = [k for k in upsampler_keys(state) if k.endswith(".weight")]
        if not weights:
            return None
        shapes = {k: tuple(state[k].shape) for k in weights}
        odd = [f"{k} {s}" for k, s in shapes.items() if len(s) != 4 or s[0] != 4 * s[1]]
        if odd:
            raise InputError(
                what,
                f"has an upsampler that is not x2 pixel-shuffle stages ({', '.join(odd)}), i.e. a scale TTST "
                f"here does not build (it builds x{', x'.join(map(str, self.spec.scales))})",
                "use a TTST checkpoint of a power-of-two scale",
            )
        scale = 2 ** len(weights)
        if scale not in self.spec.scales:
            raise InputError(
                what,
                f"has {len(weights)} upsampling stages ({', '.join(weights)}), a x{scale} model, which ttst does "
                "not build",
                f"use a checkpoint of x{', x'.join(map(str, self.spec.scales))}",
            )
        return scale

    def _other_scale(self, path: Path | None, scale: int, detail: str) -> InputError:
        return InputError(
            f"checkpoint {path}",
            f"is a x{scale} TTST ({detail}) but the method was built for x{self.scale}",
            f"to fine-tune from it at x{self.scale} give it as train.pretrain_network_g (the upsampler stages "
            f"start new); to run it as it is use a x{scale} dataset",
        )

    def checkpoint_scale(self, state: dict[str, torch.Tensor]) -> int | None:
        scale = self.upsampler_scale(state, f"checkpoint {self._reading}")
        if scale is not None and scale != self.scale:
            raise self._other_scale(self._reading, scale, f"upsampler {', '.join(upsampler_keys(state))}")
        return scale

    def load_checkpoint(self, path: str | Path, param_key: str | None = None) -> None:
        meta = read_metadata(path)
        if meta.get("method") == self.spec.name and meta.get("scale") not in (None, self.scale):
            raise self._other_scale(Path(path), int(meta["scale"]), "by its metadata")
        self._reading = Path(path)
        try:
            super().load_checkpoint(path, param_key)
        finally:
            self._reading = None

    # ---- fine-tuning from another scale ---------------------------------------------------------
    def load_pretrained(self, path: str | Path) -> dict[str, list[str]]:
        """Start weights for training from a TTST checkpoint of any scale this method builds (the released
        x4 included): every tensor but the upsampler loads strictly into the network as built (its geometry
        already follows the training data); at another scale the upsampler stages stay as initialised.
        Returns {"loaded", "new", "dropped"} key lists; new and dropped keys are logged."""
        path = Path(path)
        what = f"train.pretrain_network_g {path}"
        meta = read_metadata(path)
        self.check_saved_by(
            path, meta, what, check_scale=False, fix="start from a TTST checkpoint (ours or the released ttst_4x.pth)"
        )
        state = self.convert_state(read_state_dict(path, self.settings.path.param_key))
        ck_scale = self.upsampler_scale(state, what)
        own = self.net_g.state_dict()
        if ck_scale is None or ck_scale == self.scale:
            load_strict(self.net_g, state, what, "use a TTST checkpoint of the same network size", self.key_layouts)
            return {"loaded": list(state), "new": [], "dropped": []}
        new, dropped = upsampler_keys(own), upsampler_keys(state)
        body = {k: v for k, v in state.items() if k not in dropped}
        load_strict(
            self.net_g,
            {**body, **{k: own[k] for k in new}},  # the stages keep their initial values
            what,
            "use a TTST checkpoint of the same network size (see `network:` in the config)",
            self.key_layouts,
        )
        log.warning(
            "%s: x%d start from x%d checkpoint %s: %d tensors loaded; upsampler stages new (initialised): %s; "
            "dropped from the checkpoint: %s",
            self.spec.name,
            self.scale,
            ck_scale,
            path,
            len(body),
            ", ".join(new),
            ", ".join(dropped),
        )
        return {"loaded": list(body), "new": new, "dropped": dropped}

    def configure_optimizers(self, train_cfg: TTSTTrain) -> dict[str, torch.optim.Optimizer]:
        pretrained = train_cfg.pretrain_network_g
        if pretrained and self.settings.checkpoint:
            raise InputError(
                "train.pretrain_network_g and checkpoint",
                "are both set, and both name the network's start weights",
                "keep one: checkpoint for weights of this scale, train.pretrain_network_g to start from another scale",
            )
        # the geometry (img_size from the training patches) is settled and the optimizer built first; the start
        # weights are then copied into the same parameters. A resumed run restores its own weights instead.
        optimizers = super().configure_optimizers(train_cfg)
        if pretrained and not train_cfg.resuming:
            self.load_pretrained(pretrained)
        return optimizers
