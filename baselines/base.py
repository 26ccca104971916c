"""The one interface every SR method implements.

Inputs are the dataset's batch dicts (`cmsrd.data`): `lr` N x 3 x l x l, `sr` (LR bicubic-upsampled)
N x 3 x H x W, `map` N x 3 x H x W, optional `style` N x 3 x H x W, all float in [0, 1], and `hr` when
training. Outputs are N x 3 x H x W float in [0, 1]. Batching, device, dtype and autocast are handled
once by `baselines.inference` and the trainer (`benchmark.train`), not per method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conditions import Conditions
from .registry import MethodSpec
from .seeding import Generators

Batch = dict[str, Any]


class TrainContext:
    """What the trainer hands to `SRMethod.training_step`.

    `backward(loss, optimizer_name)` applies the loss scaler and gradient accumulation and steps the
    named optimizer at accumulation boundaries; methods with several optimizers (GANs) call it once
    per optimizer, in their own order. `step` is the global optimisation step.
    """

    def __init__(self, step: int, backward: Callable[[torch.Tensor, str], None], autocast: Callable[[], Any]):
        self.step = step
        self.backward = backward
        self.autocast = autocast


class SRMethod(nn.Module):
    """Base class. Subclasses build their networks in `__init__(spec, scale, config, device)`."""

    # `train.*` keys the method reads beyond the trainer's own (`benchmark.train.DEFAULTS`); the trainer
    # refuses any other key, so a misspelt one is an error instead of a silent default. Empty by default:
    # a method that forgets to declare its keys gets them refused, not silently unchecked.
    train_keys: frozenset[str] = frozenset()

    def __init__(self, spec: MethodSpec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__()
        self.spec = spec
        self.scale = scale
        self.config = config
        # the checkpoint whose weights the method holds, set only once a load has succeeded
        # (`registry.build` skips `checkpoint:` when the method already loaded it while building)
        self.loaded_from: Path | None = None

    # ---- inference ------------------------------------------------------------------------------
    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        """Batch (on the method's device) -> SR N x 3 x H x W in [0, 1]. Stochastic methods draw every random
        tensor with `baselines.seeding.randn(shape, generator, ...)` (one generator per image from the
        runner), so an image's output does not depend on the batch it was in."""
        raise NotImplementedError

    def nfe(self, cond: Conditions) -> int:
        """Network evaluations per image under `cond` (diffusion methods override for steps/start)."""
        return self.spec.nfe

    # ---- weights --------------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path) -> None:
        """Load weights from our safetensors or the original authors' format (method-specific)."""
        raise NotImplementedError

    def export_metadata(self) -> dict[str, Any]:
        """Metadata of exported weights (`model.safetensors`): what `load_checkpoint` checks and the network
        built. Methods whose built network differs from `config["network"]` (SwinIR's img_size) override."""
        return {"method": self.spec.name, "scale": self.scale, "network": self.config.get("network", {})}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the trainer saves (frozen pretrained parts are not repeated in every checkpoint)."""
        return {k: v for k, v in self.state_dict().items()}

    def parameter_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: dict[str, Any]) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        """One optimisation step; calls `ctx.backward(loss, name)` per optimizer; returns logged scalars."""
        raise NotImplementedError

    def run_stage(self, stage: int, data_root: Path, train_cfg: dict[str, Any], out_dir: Path) -> None:
        """Training stages other than the shared gradient loop (stage 1), e.g. SGDM's style flows (stage 2).

        `cmsrd-bench train --stage N` calls this for N > 1."""
        from cmsrd.errors import InputError

        raise InputError(f"--stage {stage}", f"method {self.spec.name!r} has only one training stage", "drop --stage")
