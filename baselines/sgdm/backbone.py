"""Stable Diffusion 2.1-base pieces for SGDM through diffusers, with their geometry written as data.

Sources, in the order `load_backbone` tries them:
- `None`: random init at the named geometry (parameter counting, throughput benchmarks, tests);
- a local diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`);
- a single-file original-layout checkpoint (`v2-1_512-ema-pruned.ckpt`, or the authors' SGDM Lightning
  checkpoints, which also hold `first_stage_model.*` and `cond_stage_model.*`), converted with diffusers'
  ldm converters; the tokenizer then comes from a `tokenizer` folder;
- a hub id (only where network or a filled HF cache exists; otherwise a MissingWeightsError naming what to
  put where).

Text conditioning: SD2.1 uses OpenCLIP ViT-H/14's *penultimate* layer followed by ln_final. The diffusers
SD2.1 text encoder is that model cut to 23 layers, so its `last_hidden_state` is exactly that tensor.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmsrd.errors import InputError, MissingWeightsError

from .convert import load_strict, load_torch_state

log = logging.getLogger(__name__)

LATENT_SCALE = 0.18215
SD21_HUB_ID = "stabilityai/stable-diffusion-2-1-base"

SD21_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
SD21_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": LATENT_SCALE,
}
SD21_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# A tiny geometry with the same structure (4 levels, cross-attention at levels 0-2, factor-8 VAE) for
# tests and CPU demos. Adapter widths follow `block_out_channels[:3]`.
TINY_UNET: dict[str, Any] = {
    **SD21_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4, 4, 4],
}
TINY_VAE: dict[str, Any] = {
    **SD21_VAE,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_TEXT: dict[str, Any] = {
    **SD21_TEXT,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}

# A small geometry for short GPU comparisons (e.g. sgdm vs sgdm-nomap at a fixed time budget): ~1/5 of
# SD2.1's widths, one resnet per level, a 4-layer text encoder.
SMALL_UNET: dict[str, Any] = {
    **SD21_UNET,
    "block_out_channels": [64, 128, 256, 256],
    "layers_per_block": 1,
    "cross_attention_dim": 256,
    "attention_head_dim": [2, 4, 8, 8],
}
SMALL_VAE: dict[str, Any] = {**SD21_VAE, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1}
SMALL_TEXT: dict[str, Any] = {
    **SD21_TEXT,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "projection_dim": 256,
}

GEOMETRIES = {
    "sd21-base": (SD21_UNET, SD21_VAE, SD21_TEXT),
    "small": (SMALL_UNET, SMALL_VAE, SMALL_TEXT),
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT),
}

# The only UNet parameters SGDM trains (`"attn" in name` in the ldm UNet == these in diffusers).
TRAINABLE_UNET = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.")


@dataclass
class Backbone:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    source: str


def geometry(name: str, overrides: dict[str, dict] | None = None) -> tuple[dict, dict, dict]:
    """(unet, vae, text) configs of a named geometry, with optional per-part overrides."""
    if name not in GEOMETRIES:
        raise InputError(f"backbone geometry {name!r}", f"unknown; choose from {sorted(GEOMETRIES)}")
    parts = [copy.deepcopy(c) for c in GEOMETRIES[name]]
    for part, key in zip(parts, ("unet", "vae", "text")):
        part.update((overrides or {}).get(key, {}))
    return parts[0], parts[1], parts[2]


def set_trainable(unet: nn.Module) -> int:
    """Freeze the UNet except attention q/k/v/out projections; returns the trainable count."""
    n = 0
    for name, p in unet.named_parameters():
        p.requires_grad_(bool(TRAINABLE_UNET.search("." + name)))
        n += p.numel() if p.requires_grad else 0
    return n


def _build_modules(unet_cfg: dict, vae_cfg: dict, text_cfg: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return unet, vae, text


def char_tokenizer(max_length: int = 77):
    """A character-level CLIP BPE tokenizer (no merges) for the tiny test geometry.

    The SD2.1 tokenizer is a 49,408-entry BPE vocabulary that cannot be downloaded here; a tiny text model
    only needs consistent ids, so we write a vocabulary of single characters in CLIP's file format."""
    from transformers import CLIPTokenizer

    d = Path(tempfile.gettempdir()) / f"cmsrd-char-tokenizer-{os.getuid()}"
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!pad": 1}
    for ch in chars:
        for tok in (ch, ch + "</w>"):
            vocab.setdefault(tok, len(vocab) + 1)
    d.mkdir(parents=True, exist_ok=True)
    from cmsrd.io import atomic_write_text

    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    text = json.dumps(vocab)
    if not vocab_path.exists() or vocab_path.read_text() != text:
        atomic_write_text(vocab_path, text)
        atomic_write_text(merges_path, "#version: 0.2\n")
    return CLIPTokenizer(str(vocab_path), str(merges_path), pad_token="<|endoftext|>", model_max_length=max_length)


def random_backbone(geometry_name: str = "tiny", overrides: dict | None = None, device: Any = None) -> Backbone:
    """Random-init backbone. `device="meta"` allocates nothing (parameter counting at SD2.1 size)."""
    u, v, t = geometry(geometry_name, overrides)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        unet, vae, text = _build_modules(u, v, t)
    # random text weights make any consistent ids fine; the character tokenizer needs no download
    tok = char_tokenizer()
    if text.config.vocab_size < len(tok):
        raise InputError("text encoder vocab_size", f"{text.config.vocab_size} < tokenizer size {len(tok)}")
    return Backbone(unet, vae, text, tok, f"random:{geometry_name}")


def backbone_from_original_state(
    state: dict[str, torch.Tensor],
    geometry_name: str = "sd21-base",
    tokenizer: Any = None,
    source: str = "state",
    overrides: dict | None = None,
) -> Backbone:
    """Build diffusers modules from an original-layout SD state dict (`model.diffusion_model.*`,
    `first_stage_model.*`, `cond_stage_model.model.*`) using diffusers' own ldm converters."""
    u, v, t = geometry(geometry_name, overrides)
    unet, vae, text = _build_modules(u, v, t)
    load_original_parts(unet, vae, text, state, source)
    return Backbone(unet, vae, text, tokenizer, source)


def load_original_parts(
    unet: nn.Module, vae: nn.Module, text: nn.Module, state: dict[str, torch.Tensor], source: str, required: bool = True
) -> list[str]:
    """Load an original-layout state (`model.diffusion_model.*`, `first_stage_model.*`,
    `cond_stage_model.model.*`) into built modules through diffusers' ldm converters; returns the parts
    loaded. The UNet is always loaded; the VAE and text tower only when present unless `required`. A key or
    shape mismatch (wrong `geometry`/`overrides`) is one InputError, as for every other checkpoint."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    load_strict(unet, convert_ldm_unet_checkpoint(state, unet.config), f"checkpoint {source} (UNet)")
    parts = ["UNet"]
    vae_state = {k: v for k, v in state.items() if k.startswith("first_stage_model.")}
    if vae_state:
        load_strict(vae, convert_ldm_vae_checkpoint(vae_state, vae.config), f"checkpoint {source} (VAE)")
        parts.append("VAE")
    elif required:
        raise InputError(
            f"checkpoint {source}", "has no first_stage_model.* (VAE) tensors", "use a full SD/SGDM checkpoint"
        )
    if required or any(k.startswith("cond_stage_model.model.") for k in state):
        load_text_tower(text, state, source)
        parts.append("text encoder")
    return parts


def load_text_tower(text: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """OpenCLIP `cond_stage_model.model.*` -> the 23-layer CLIP text encoder. diffusers' converter skips
    absent tensors, so a partial tower would leave random weights: any missing tensor is an InputError."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    converted = convert_open_clip_checkpoint(text, state)  # keys `text_model.*`
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5 has no such level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, _ = text.load_state_dict(converted, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing:
        raise InputError(
            f"checkpoint {source}",
            f"{len(missing)} text encoder tensors missing, e.g. {missing[:3]}",
            "use a checkpoint with all of cond_stage_model.model.* (OpenCLIP ViT-H/14)",
        )


def load_backbone(
    pretrained: str | None,
    geometry_name: str = "sd21-base",
    tokenizer: str | None = None,
    overrides: dict | None = None,
) -> Backbone:
    """Resolve `pretrained` (None, a diffusers folder, a single-file checkpoint or a hub id)."""
    if pretrained is None:
        log.warning(
            "SD2.1 backbone: random init (%s geometry); real weights come from backbone.pretrained or from "
            "an official SGDM/SRLDM .ckpt given as `checkpoint:`",
            geometry_name,
        )
        return random_backbone(geometry_name, overrides)
    path = Path(os.path.expanduser(str(pretrained)))
    if path.is_file():
        tok = resolve_tokenizer(tokenizer, None, path)
        return backbone_from_original_state(load_torch_state(path), geometry_name, tok, str(path), overrides)
    if path.is_dir():
        return _from_diffusers(str(path), local_only=True)
    if not _looks_like_hub_id(str(pretrained)):
        raise MissingWeightsError("Stable Diffusion 2.1-base", str(path), f"https://huggingface.co/{SD21_HUB_ID}")
    return _from_diffusers(str(pretrained), local_only=os.environ.get("HF_HUB_OFFLINE") == "1")


class MissingTokenizerError(MissingWeightsError):
    """The SD2.1 tokenizer folder was found nowhere; says where it was looked for and which key names it
    (`cmsrd-bench weights fetch` has no tokenizer entry, so the plain MissingWeightsError fix would mislead)."""

    def __init__(self, tried: list[str]):
        InputError.__init__(
            self,
            f"weights 'SD2.1 tokenizer' (the {TOKENIZER_WHAT})",
            f"not found (looked in: {'; '.join(tried)})",
            "set network.backbone.tokenizer to a tokenizer folder (download all files of "
            f"https://huggingface.co/{SD21_HUB_ID}/tree/main/tokenizer), or point backbone.pretrained at an SD2.1 "
            "diffusers folder or a filled HF cache",
        )
        self.expected_path = tried[0]


def resolve_tokenizer(tokenizer: str | None, pretrained: str | None, near: str | Path | None = None):
    """The SD2.1 tokenizer, from the first that has it: `tokenizer` (a folder); `<pretrained>/tokenizer` (a
    diffusers folder) or `<its folder>/tokenizer` (a single-file SD checkpoint); a `tokenizer` folder beside the
    single-file checkpoint `near`; the hub id `pretrained` in the HF cache; last, that hub id downloaded (unless
    HF_HUB_OFFLINE=1). Local folders come first so a build never waits on the network when one is there.

    Only the tokenizer is read from `pretrained` here: the weights then come from the single-file checkpoint."""
    if tokenizer:  # named explicitly: no silent fallback to another vocabulary
        folder = Path(os.path.expanduser(str(tokenizer)))
        if not _has_tokenizer(folder):
            raise MissingTokenizerError([f"network.backbone.tokenizer = {folder}"])
        return _load_tokenizer(folder)
    candidates: list[tuple[str, Any]] = []  # (what, folder or a callable giving one)
    hub = None
    if pretrained:
        path = Path(os.path.expanduser(str(pretrained)))
        if path.is_dir():
            candidates.append((str(path / "tokenizer"), path / "tokenizer"))
        elif path.is_file():
            candidates.append((str(path.parent / "tokenizer"), path.parent / "tokenizer"))
        elif _looks_like_hub_id(str(pretrained)):
            hub = str(pretrained)
    if near is not None:
        candidates.append((str(Path(near).parent / "tokenizer"), Path(near).parent / "tokenizer"))
    if hub is not None:
        candidates.append((f"hub id {hub} (HF cache)", lambda: _hub_tokenizer_folder(hub, local_only=True)))
        if os.environ.get("HF_HUB_OFFLINE") != "1":
            candidates.append((f"hub id {hub} (download)", lambda: _hub_tokenizer_folder(hub, local_only=False)))
    for _, where in candidates:
        folder = where() if callable(where) else where
        if folder is not None and _has_tokenizer(folder):
            return _load_tokenizer(folder)
    raise MissingTokenizerError([what for what, _ in candidates] or ["network.backbone.tokenizer (unset)"])


# A CLIP tokenizer folder: the SD2.1 repo's slow-tokenizer files, or what transformers 5 saves. Without
# tokenizer_config.json transformers gives model_max_length 1e30 (padding then overflows) and, without the
# special tokens of special_tokens_map.json / tokenizer_config.json, pads with <|endoftext|> instead of "!".
TOKENIZER_FILES = (("vocab.json", "merges.txt", "tokenizer_config.json"), ("tokenizer.json", "tokenizer_config.json"))
TOKENIZER_WHAT = (
    "SD2.1 tokenizer/ folder, all of its files: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json"
)
TEXT_MAX_LENGTH = 77  # max_position_embeddings of SD2.1's text tower (and of the tiny test geometry)
SD21_VOCAB_SIZE, SD21_PAD_ID = 49408, 0  # OpenCLIP pads with "!" (id 0); SD2.1 was trained with that padding


def _has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer vocabulary at all (complete or not: `_load_tokenizer` checks that)."""
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def _load_tokenizer(folder: Path):
    """The CLIP tokenizer in `folder`, or an InputError when the folder lacks the files that set its length and
    padding (transformers 5 loads such a folder without complaint and the first prompt then fails)."""
    from transformers import CLIPTokenizer

    if not any(all((folder / f).is_file() for f in names) for names in TOKENIZER_FILES):
        raise InputError(
            f"tokenizer folder {folder}",
            "is incomplete (no tokenizer_config.json next to the vocabulary)",
            f"use the {TOKENIZER_WHAT}",
        )
    tok = CLIPTokenizer.from_pretrained(str(folder))
    wrong = []
    if tok.model_max_length != TEXT_MAX_LENGTH:
        wrong.append(
            f"model_max_length {tok.model_max_length} (expected {TEXT_MAX_LENGTH}, set in tokenizer_config.json)"
        )
    if len(tok) == SD21_VOCAB_SIZE and tok.pad_token_id != SD21_PAD_ID:
        wrong.append(f"pad token {tok.pad_token!r} (expected '!' = id 0, set in special_tokens_map.json)")
    if wrong:
        raise InputError(
            f"tokenizer folder {folder}",
            "is not the SD2.1 tokenizer as configured: " + "; ".join(wrong),
            f"use the {TOKENIZER_WHAT}",
        )
    return tok


def _hub_tokenizer_folder(repo: str, local_only: bool) -> Path | None:
    """The `tokenizer/` folder of hub repo `repo` (all its files) in the HF cache, downloaded first unless
    `local_only`, or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["tokenizer/*"], local_files_only=local_only)) / "tokenizer"
    except (OSError, ValueError) as e:  # not cached / no network / no such repo (hub errors are OSError)
        log.debug("tokenizer of %s not available (local_only=%s): %s", repo, local_only, e)
        return None


def _looks_like_hub_id(name: str) -> bool:
    """`owner/name` with no path-like start or weights suffix (`load_backbone` treats those as local files)."""
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and Path(name).suffix not in (".ckpt", ".safetensors", ".pt")
    )


def _from_diffusers(where: str, local_only: bool) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        kw = {"local_files_only": local_only}
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **kw)
        text = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **kw)
        tok = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **kw)
    except (OSError, ValueError) as e:
        raise MissingWeightsError(
            f"Stable Diffusion 2.1-base ({where}; {type(e).__name__})",
            f"{where}/{{unet,vae,text_encoder,tokenizer}}"
            if Path(where).is_dir()
            else f"a diffusers folder with unet/ vae/ text_encoder/ tokenizer/ (set backbone.pretrained to it), "
            f"a v2-1_512-ema-pruned.ckpt path, or the HF cache for {where}",
            f"https://huggingface.co/{SD21_HUB_ID}",
        ) from e
    return Backbone(unet, vae, text, tok, where)
