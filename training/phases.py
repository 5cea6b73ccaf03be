"""The G and D phases of a minibatch (lazy regularization, Freeze-D), the optimizer step they end with, and G's EMA."""
from dataclasses import dataclass
from typing import Optional

import torch

from training import dist


@dataclass
class Phase:
    """One G or D optimization phase (StyleGAN2-ADA): its loss terms, network, optimizer and interval.

    `name` is the loss's phase ('Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth'); `network` is 'G' or 'D';
    the phase runs every `interval` minibatches (lazy regularization, StyleGAN2 sec. 3.1). A network's main and
    regularization phases share one optimizer: `owns_opt` marks the phase that saves and loads its state.
    `lr_ratio` is the Adam lr multiplier of the lazy-regularization compensation, k / (k + 1). `params` are the
    parameters the phase trains, those in its optimizer (default: all of the module's; D's without its frozen
    layers under Freeze-D): the loop turns requires_grad on for them only (set_trainable).
    """
    name: str
    network: str
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    interval: int
    owns_opt: bool
    lr_ratio: float = 1.0
    params: Optional[list] = None

    def __post_init__(self):
        if self.params is None:
            self.params = list(self.module.parameters())

    def set_trainable(self, flag: bool) -> None:
        """requires_grad on (before the phase's backward passes) or off (after) for the phase's own parameters;
        frozen ones keep requires_grad False, so they get no gradient, while gradients with respect to the inputs
        (R1) still pass through them."""
        for p in self.params:
            p.requires_grad_(flag)


def make_phases(G, D, train, use_pl: bool, use_r1: bool, freeze_d: Optional[int] = None, prepare=None) -> list:
    """The phases for G and D under `train` (a TrainConfig): with lazy regularization every k minibatches, Adam's
    lr and betas are compensated by k/(k+1) so that the combined updates match an unregularized schedule.

    `freeze_d` (default: train.freeze_d; see training.resume.resolve_freeze_d): D's first this many layers
    (Freeze-D, Discriminator.freezable_layers) are left out of D's optimizer and of the phases' `params`, and get
    requires_grad False. `prepare` wraps each optimizer as it is made (Accelerate's, for mixed-precision loss
    scaling); default: the plain torch optimizer.
    """
    prepare = prepare or (lambda opt: opt)
    if freeze_d is None:
        freeze_d = train.freeze_d or 0
    frozen = {id(p) for p in D.frozen_parameters(freeze_d).values()} if freeze_d else set()
    for p in D.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    phases = []
    for network, module, lr, interval, active in (("G", G, train.glr, train.pl_interval, use_pl),
                                                  ("D", D, train.dlr, train.r1_interval, use_r1)):
        params = [p for p in module.parameters() if id(p) not in frozen]
        if not active or interval in (None, 0, 1):
            opt = prepare(torch.optim.Adam(params, lr=lr, betas=(train.beta1, train.beta2), eps=train.eps))
            phases.append(Phase(network + ("both" if active else "main"), network, module, opt, 1, True,
                                params=params))
        else:
            ratio = interval / (interval + 1)
            opt = prepare(torch.optim.Adam(params, lr=lr * ratio, betas=(train.beta1 ** ratio, train.beta2 ** ratio),
                                           eps=train.eps))
            phases.append(Phase(network + "main", network, module, opt, 1, True, ratio, params=params))
            phases.append(Phase(network + "reg", network, module, opt, interval, False, ratio, params=params))
    return phases


def freeze_summary(D, freeze_d: int) -> str:
    """One line for the log: which of D's layers Freeze-D keeps frozen and how many parameters still train."""
    layers = D.freezable_layers()
    frozen = D.frozen_parameters(freeze_d)
    n_frozen, n_all = sum(p.numel() for p in frozen.values()), sum(p.numel() for p in D.parameters())
    names = [name for name, _ in layers[:freeze_d]]
    span = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]} ... {names[-1]}"
    more = (f" (freeze_d={freeze_d}: all blocks; the epilogue and the label mapping train)"
            if freeze_d > len(layers) else "")
    return (f"Freeze-D: D's first {min(freeze_d, len(layers))} of {len(layers)} layers stay frozen ({span}){more}; "
            f"{n_all - n_frozen:,} of {n_all:,} D parameters train")


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
