"""SGDM's style normalizing flows (SFlow, official `model/Flows/*`) on normflows.

Two independent flows model the 32-d style mean and std vectors produced by the style encoder on HR
training images in [-1, 1]. Configuration as in the official training script (the paper's 8 layers /
16-32-32-64 do not match the code; we follow the code): dim 32, 16 x [affine coupling (MLP [16, 64, 64, 32],
zero-init last layer, sigmoid scale), fixed random shuffle permutation], trainable diagonal Gaussian base;
Adam lr 4e-4, weight decay 1e-5, StepLR(20,000 iterations, 0.5), loss = forward KL (NLL), non-finite
steps skipped. Module names equal normflows', so the authors' `flow_mean.pt`/`flow_std.pt` load directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import normflows as nf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..seeding import Generators, randn

STYLE_DIM = 32


def create_flow(
    dim: int = STYLE_DIM, num_layers: int = 16, hidden: tuple[int, ...] = (16, 64, 64, 32)
) -> nf.NormalizingFlow:
    """The official flow architecture (117,312 parameters at the default size)."""
    if hidden[0] != dim // 2 or hidden[-1] != dim:
        raise ValueError(f"coupling MLP {hidden} must map dim/2={dim // 2} -> dim={dim}")
    flows: list[nf.flows.Flow] = []
    for _ in range(num_layers):
        flows.append(nf.flows.AffineCouplingBlock(nf.nets.MLP(list(hidden), init_zeros=True), scale_map="sigmoid"))
        flows.append(nf.flows.Permute(dim, mode="shuffle"))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=True), flows)


class StyleFlows(torch.nn.Module):
    """The pair of flows (`mean`, `std`); `sample` draws B style vectors from a torch.Generator."""

    def __init__(self, dim: int = STYLE_DIM, num_layers: int = 16, hidden: tuple[int, ...] = (16, 64, 64, 32)):
        super().__init__()
        self.mean = create_flow(dim, num_layers, hidden)
        self.std = create_flow(dim, num_layers, hidden)
        self.dim = dim
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _sample(flow: nf.NormalizingFlow, n: int, generator: Generators) -> torch.Tensor:
        base = flow.q0
        eps = randn((n, base.d), generator, base.loc.device, base.loc.dtype)
        z = base.loc + torch.exp(base.log_scale) * eps
        for f in flow.flows:
            z, _ = f(z)
        return z

    @torch.no_grad()
    def sample(self, n: int, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each n x 32. As in the official code the std samples are not forced positive."""
        return self._sample(self.mean, n, generator), self._sample(self.std, n, generator)


@dataclass
class FlowTrainConfig:
    epochs: int = 1000
    batch_size: int = 1000
    lr: float = 4e-4
    weight_decay: float = 1e-5
    step_size: int = 20000
    gamma: float = 0.5
    seed: int = 0


def train_flow(
    flow: nf.NormalizingFlow, data: np.ndarray | torch.Tensor, cfg: FlowTrainConfig, desc: str = "flow"
) -> list[float]:
    """Fit one flow by maximum likelihood (forward KL); returns the mean loss per epoch."""
    x = torch.as_tensor(np.asarray(data), dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != flow.q0.d:
        raise ValueError(f"flow data must be N x {flow.q0.d}, got {tuple(x.shape)}")
    device = flow.q0.loc.device
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    g = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    flow.train()
    for _ in tqdm(range(cfg.epochs), desc=desc, leave=False):
        perm = torch.randperm(len(x), generator=g)
        losses = []
        for i in range(0, len(x), cfg.batch_size):
            batch = x[perm[i : i + cfg.batch_size]].to(device)
            loss = flow.forward_kld(batch)
            if not torch.isfinite(loss):
                continue  # the official script skips NaN/Inf steps
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)) if losses else float("nan"))
    flow.eval()
    return history


def train_style_flows(
    flows: StyleFlows, means: np.ndarray, stds: np.ndarray, cfg: FlowTrainConfig
) -> dict[str, list[float]]:
    """Train both flows on the collected N x 32 style statistics."""
    hist = {
        "mean": train_flow(flows.mean, means, cfg, "flow(mean)"),
        "std": train_flow(flows.std, stds, cfg, "flow(std)"),
    }
    flows.trained.fill_(True)
    return hist
