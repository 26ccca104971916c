"""The fast sampling path shared by every diffusion method: switches applied to a built method, not per method.

A diffusion benchmark is bound by the denoiser's matmuls/convolutions, run NFE times per image, then one VAE
decode. The switches here attack the overheads around that work without changing the images beyond bf16
tolerance (tests/test_fast_sampling.py holds each one to the eager fp32 path):

- `channels_last`: NHWC weights and inputs for the denoiser and VAE (cuDNN's native layout for bf16 convs);
- `sdpa`: diffusers attention through `F.scaled_dot_product_attention` (flash/memory-efficient kernels) -
  `off` forces the unfused reference processor, for the equality test and for measuring the difference;
- `compile`: `torch.compile(dynamic=False)` of the denoiser (`denoiser`) and also the VAE decoder
  (`denoiser+vae`), in place so state-dict keys are unchanged; static shapes, one compile per batch shape;
- `cuda_graph`: the denoiser call of each step captured once per sampling call and replayed (CUDA only: it
  removes the per-kernel launch cost that dominates small batches); requesting it without CUDA is an error;
- `decode_batch`: the VAE decodes the latents in chunks of this many images (0: all at once), so the sampler's
  batch is sized by the denoiser's memory, not by the decoder's much larger activations.

Precision is not a switch here: the runner's `--precision` autocasts the method; the sampler keeps the latent
and all scheduler arithmetic in fp32 whatever the autocast (`sampling.sample_latents`).
`resolve("auto", device)` gives the defaults: on CPU only what the CPU equality tests accept and what helps
there (SDPA); on CUDA channels_last + SDPA + CUDA graphs + decoding 32 images at a time (the decoder's
activations at 256 px are several times the denoiser's), with compile left off until the GPU runbook
(perf/gpu/README.md) has measured it pays for its compile time on the benchmark's image counts.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from cmsrd.errors import InputError

log = logging.getLogger(__name__)
COMPILE = ("off", "denoiser", "denoiser+vae")
GRAPH_FALLBACKS: list[str] = []  # why a capture failed (the step then ran eagerly); perf.throughput reports it
DENOISER_NAMES = ("unet", "net_g", "denoiser")  # sgdm/ldm: unet; resshift: net_g
AUTOENCODER_NAMES = ("vae", "autoencoder")


@dataclass(frozen=True)
class FastOptions:
    """What `apply` switches on; `as_record()` is what run.json stores."""

    channels_last: bool = False
    sdpa: bool = True
    compile: str = "off"
    compile_backend: str = "inductor"
    cuda_graph: bool = False
    decode_batch: int = 0

    def __post_init__(self) -> None:
        if self.compile not in COMPILE:
            raise InputError(f"fast option compile={self.compile!r}", f"unknown; choose from {COMPILE}")
        if not isinstance(self.decode_batch, int) or self.decode_batch < 0:
            raise InputError(f"fast option decode_batch={self.decode_batch!r}", "must be an integer >= 0")

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


EAGER = FastOptions(sdpa=True)  # what a method does when nothing is applied (diffusers' default processor)
_BOOL = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def defaults(device: torch.device | str) -> FastOptions:
    """The `auto` options for a device (see the module docstring for why)."""
    if torch.device(device).type == "cuda":
        return FastOptions(channels_last=True, sdpa=True, cuda_graph=True, decode_batch=32)
    return FastOptions(sdpa=True)


def parse(text: str | dict[str, Any] | FastOptions | None, device: torch.device | str = "cpu") -> FastOptions:
    """`auto`, `eager`, or comma-separated switches over the auto defaults, e.g.
    `auto,compile=denoiser,decode_batch=8`, `eager,channels_last=on`. A dict (from a config) works the same."""
    if isinstance(text, FastOptions):
        return check(text, device)
    if text is None:
        return check(defaults(device), device)
    if isinstance(text, dict):
        return check(replace(defaults(device), **_coerce(text)), device)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    base = defaults(device)
    if parts and parts[0] in ("auto", "eager"):
        base = defaults(device) if parts.pop(0) == "auto" else EAGER
    fields = {}
    for p in parts:
        key, sep, value = p.partition("=")
        fields[key.strip().replace("-", "_")] = value.strip() if sep else "on"
    return check(replace(base, **_coerce(fields)), device)


def _coerce(fields: dict[str, Any]) -> dict[str, Any]:
    known = set(FastOptions.__dataclass_fields__)
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in known:
            raise InputError(f"fast option {key!r}", "unknown", f"use one of {sorted(known)}")
        kind = FastOptions.__dataclass_fields__[key].type
        if kind == "bool" and not isinstance(value, bool):
            if str(value).lower() not in _BOOL:
                raise InputError(f"fast option {key}={value!r}", "is not on/off")
            value = _BOOL[str(value).lower()]
        elif kind == "int" and not isinstance(value, int):
            try:
                value = int(value)
            except ValueError:
                raise InputError(f"fast option {key}={value!r}", "is not an integer") from None
        out[key] = value
    return out


def check(opts: FastOptions, device: torch.device | str) -> FastOptions:
    """Options that cannot work on `device` are an InputError (never silently dropped)."""
    if opts.cuda_graph and torch.device(device).type != "cuda":
        raise InputError("fast option cuda_graph=on", f"needs a CUDA device, not {device}", "use cuda_graph=off")
    return opts


# ---- applying to a built method ------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[FastOptions | None] = contextvars.ContextVar("fast_sampling", default=None)


def active() -> FastOptions | None:
    """The options of the method whose `super_resolve` is running (read by `sample_latents`)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activated(opts: FastOptions | None) -> Iterator[None]:
    token = _ACTIVE.set(opts)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def parts(method: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(denoisers, autoencoders) of a method, found by the attribute names the registry's methods use."""
    den = [getattr(method, n) for n in DENOISER_NAMES if isinstance(getattr(method, n, None), nn.Module)]
    ae = [getattr(method, n) for n in AUTOENCODER_NAMES if isinstance(getattr(method, n, None), nn.Module)]
    return den, ae


def apply(method: nn.Module, opts: FastOptions) -> FastOptions:
    """Switch `opts` on for `method` (once; a second call must ask for the same options).

    Returns the options; `method.fast_sampling` records them. A method with no denoiser (a feed-forward
    network) is left alone apart from that record."""
    done = getattr(method, "fast_sampling", None)
    if done is not None:
        if done != opts:
            raise InputError("fast sampling options", f"already applied as {done}, asked for {opts}")
        return opts
    dev = next((p.device for p in method.parameters()), torch.device("cpu"))
    check(opts, dev)
    denoisers, autoencoders = parts(method)
    for m in denoisers + autoencoders:
        _set_attention(m, opts.sdpa)
        if opts.channels_last:
            m.to(memory_format=torch.channels_last)
    if opts.compile != "off":
        for m in denoisers:
            m.compile(dynamic=False, backend=opts.compile_backend)
        if opts.compile == "denoiser+vae":
            for ae in autoencoders:
                if isinstance(getattr(ae, "decoder", None), nn.Module):
                    ae.decoder.compile(dynamic=False, backend=opts.compile_backend)
    if opts.decode_batch:
        for ae in autoencoders:
            if hasattr(ae, "decode"):
                ae.decode = _chunked(ae.decode, opts.decode_batch)
    if denoisers:
        method.super_resolve = _with_active(method.super_resolve, opts)
    method.fast_sampling = opts
    return opts


def _set_attention(module: nn.Module, sdpa: bool) -> None:
    """diffusers' fused (SDPA) or unfused processor on every attention layer that uses a stock one."""
    if not hasattr(module, "attn_processors"):
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    procs = module.attn_processors
    if not all(isinstance(p, (AttnProcessor, AttnProcessor2_0)) for p in procs.values()):
        return  # a method's own processors are its business
    module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def _chunked(decode: Callable[..., Any], size: int) -> Callable[..., Any]:
    """`decode(z)` in chunks of `size` along the batch; diffusers' DecoderOutput or plain tensors."""

    @functools.wraps(decode)
    def run(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if z.shape[0] <= size:
            return decode(z, *args, **kwargs)
        outs = [decode(c, *args, **kwargs) for c in z.split(size)]
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)
        first = outs[0]
        return type(first)(sample=torch.cat([o.sample for o in outs]))

    return run


def _with_active(fn: Callable[..., Any], opts: FastOptions) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with activated(opts):
            return fn(*args, **kwargs)

    return run


# ---- the step under a CUDA graph -----------------------------------------------------------------------------
class GraphedStep:
    """`eps_fn(z, t)` captured once for fixed shapes and replayed: inputs are copied into static buffers.

    The closure's other tensors (text context, adapter features) are captured as they are, so one instance
    serves one sampling call. One warm-up run on a side stream comes first, as capture requires; its output
    (`first`) is the first step's result, so capturing costs no extra denoiser evaluation."""

    def __init__(self, eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor, t: torch.Tensor):
        self.z, self.t = z.clone(), t.clone()
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        ctx = (lambda: torch.autocast("cuda", dtype=dtype, cache_enabled=False)) if autocast else contextlib.nullcontext
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ctx():
            self.first = eps_fn(self.z, self.t)  # the warm-up is the first step's real evaluation
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), ctx():
            self.out = eps_fn(self.z, self.t)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.z.copy_(z)
        self.t.copy_(t)
        self.graph.replay()
        return self.out
