"""The one interface every SR method implements.

Inputs are the dataset's batch dicts (`cmsrd.data`): `lr` N x 3 x l x l, `sr` (LR bicubic-upsampled)
N x 3 x H x W, `map` N x 3 x H x W, optional `style` N x 3 x H x W, all float in [0, 1], and `hr` when
training. Outputs are N x 3 x H x W float in [0, 1]. Batching, device, dtype and autocast are handled
once by `baselines.inference` and the trainer (`benchmark.train`), not per method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .conditions import Conditions
from .method_config import method_train_keys, parse_config
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

    # The method's config dataclass (`baselines.method_config.MethodConfig` subclass): `config` is parsed into
    # it when the method is built (`self.settings`), so an unknown key at any level is refused.
    config_type: ClassVar[type | None] = None
    # `train.*` keys the method reads beyond the trainer's own: derived from `config_type`'s train block.
    # A method without a `config_type` (not yet typed) lists them by hand; the trainer refuses any other key,
    # and a method that forgets to declare them gets them refused, not silently unchecked.
    train_keys: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.config_type is not None:
            if "train_keys" in vars(cls):
                raise TypeError(
                    f"{cls.__name__}: train_keys are derived from config_type ({cls.config_type.__name__}); "
                    "declare the method's train.* keys as fields of its train block instead"
                )
            cls.train_keys = method_train_keys(cls.config_type)

    def __init__(self, spec: MethodSpec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__()
        self.spec = spec
        self.scale = scale
        self.config = config  # the merged mapping, as written (recorded in config.yaml and run fingerprints)
        self.settings = parse_config(self.config_type, config, spec.name) if self.config_type else None
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

    def check_saved_by(
        self, path: Path, meta: dict[str, Any], what: str = "", check_scale: bool = True, fix: str = ""
    ) -> None:
        """Refuse our export of another method (or, with `check_scale`, of another scale) before its tensors are
        read: they might load by name into a network they were never trained for."""
        from cmsrd.errors import InputError

        what = what or f"checkpoint {path}"
        if meta.get("method") not in (None, self.spec.name):
            raise InputError(
                what,
                f"was saved by method {meta['method']!r}, not {self.spec.name!r}",
                fix or f"load it with --method {meta['method']}",
            )
        if check_scale and meta.get("scale") not in (None, self.scale):
            raise InputError(
                what,
                f"was trained for x{meta['scale']} but the method was built for x{self.scale}",
                f"use --scale {meta['scale']} or a x{self.scale} checkpoint",
            )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the trainer saves (frozen pretrained parts are not repeated in every checkpoint)."""
        return {k: v for k, v in self.state_dict().items()}

    def parameter_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: Any) -> dict[str, torch.optim.Optimizer]:
        """`train_cfg`: the typed train block (`self.settings.train` with the trainer's `hr_px`/`resuming`
        filled in); a method without `config_type` gets the mapping instead."""
        raise NotImplementedError

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        """One optimisation step; calls `ctx.backward(loss, name)` per optimizer; returns logged scalars."""
        raise NotImplementedError

    def run_stage(self, stage: int, data_root: Path, train_cfg: dict[str, Any], out_dir: Path) -> None:
        """Training stages other than the shared gradient loop (stage 1), e.g. SGDM's style flows (stage 2).

        `cmsrd-bench train --stage N` calls this for N > 1."""
        from cmsrd.errors import InputError

        raise InputError(f"--stage {stage}", f"method {self.spec.name!r} has only one training stage", "drop --stage")
