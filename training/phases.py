"""The G and D phases of a minibatch (lazy regularization), the optimizer step they end with, and G's EMA."""
from dataclasses import dataclass

import numpy as np
import torch

from training import dist


@dataclass
class Phase:
    """One G or D optimization phase (StyleGAN2-ADA): its loss terms, network, optimizer and interval.

    `name` is the loss's phase ('Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth'); `network` is 'G' or 'D';
    the phase runs every `interval` minibatches (lazy regularization, StyleGAN2 sec. 3.1). A network's main and
    regularization phases share one optimizer: `owns_opt` marks the phase that saves and loads its state.
    `lr_ratio` is the Adam lr multiplier of the lazy-regularization compensation, k / (k + 1).
    """
    name: str
    network: str
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    interval: int
    owns_opt: bool
    lr_ratio: float = 1.0


def make_phases(G, D, train, use_pl: bool, use_r1: bool) -> list:
    """The phases for G and D under `train` (a TrainConfig): with lazy regularization every k minibatches, Adam's
    lr and betas are compensated by k/(k+1) so that the combined updates match an unregularized schedule."""
    phases = []
    for network, module, lr, interval, active in (("G", G, train.glr, train.pl_interval, use_pl),
                                                  ("D", D, train.dlr, train.r1_interval, use_r1)):
        params = list(module.parameters())
        if not active or interval in (None, 0, 1):
            opt = torch.optim.Adam(params, lr=lr, betas=(train.beta1, train.beta2), eps=train.eps)
            phases.append(Phase(network + ("both" if active else "main"), network, module, opt, 1, True))
        else:
            ratio = interval / (interval + 1)
            opt = torch.optim.Adam(params, lr=lr * ratio, betas=(train.beta1 ** ratio, train.beta2 ** ratio),
                                   eps=train.eps)
            phases.append(Phase(network + "main", network, module, opt, 1, True, ratio))
            phases.append(Phase(network + "reg", network, module, opt, interval, False, ratio))
    return phases


def check_batch(batch_size: int, batch_gpu, world: int, mbstd_group: int) -> tuple:
    """Check batch divisibility at start-up; return (batch_gpu, accumulation rounds). Errors name the keys."""
    if batch_gpu is None:
        if batch_size % world != 0:
            raise ValueError(f"train.batch_size={batch_size} is not divisible by the number of processes ({world})")
        batch_gpu = batch_size // world
    if batch_gpu <= 0 or batch_size % (batch_gpu * world) != 0:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of train.batch_gpu={batch_gpu} times "
                         f"the number of processes ({world})")
    group = min(mbstd_group, batch_gpu)
    if batch_gpu % group != 0:
        raise ValueError(f"train.batch_gpu={batch_gpu} must be divisible by model.mbstd_group={mbstd_group}")
    return batch_gpu, batch_size // (batch_gpu * world)


def optimizer_step(opt, params, scaler):
    """Step one phase's optimizer without a host read; returns a 0-dim bool device tensor (True when the gradient
    held a NaN or an infinity), or None when no parameter had a gradient.

    The gradients are averaged over ranks, unscaled (fp16 loss scaling) and made zero when any value is not
    finite (every rank sees the same averaged gradients, so all agree without a read); then the optimizer steps
    and the grad scaler adapts its scale (GradScaler.step would read its overflow flag: a sync). With Adam
    beta1 = 0, as in every preset, a zero gradient leaves the weights where they were.
    """
    raw = getattr(opt, "optimizer", opt)  # under Accelerate's wrapper, the torch optimizer
    flat = dist.reduce_grads(params)
    if flat is None:
        return None
    if scaler is not None:
        scaler.unscale_(raw)
    bad = ~flat.isfinite().all()
    flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(~bad)
    raw.step()
    if scaler is not None:
        scaler.update()
    return bad


def update_ema(G_ema, G, cur_nimg: int, batch_size: int, ema_kimg: float, ema_rampup) -> None:
    """Move G_ema towards G: half-life ema_kimg, capped at ema_rampup * cur_nimg when set (StyleGAN2-ADA), in one
    multi-tensor lerp; the buffers that training changes (w_avg, spectral-norm vectors) are copied in one call."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    ema_beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    with torch.no_grad():
        torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - ema_beta)
        bufs = dist.changing_buffers(G_ema)
        if bufs:
            torch._foreach_copy_(bufs, dist.changing_buffers(G))


def sample_labels(dataset, n: int, device) -> torch.Tensor:
    """Labels for generated samples, drawn from the dataset's label distribution (zeros [N, 0] when
    unconditional); on CUDA they travel from pinned memory without blocking."""
    if dataset.label_dim == 0:
        return torch.zeros([n, 0], device=device)
    idx = np.random.randint(len(dataset), size=n)
    labels = torch.from_numpy(np.stack([dataset.get_label(i) for i in idx]))
    if device.type == "cuda":
        labels = labels.pin_memory()
    return labels.to(device, non_blocking=True)
