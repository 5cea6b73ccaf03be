"""Loss terms against hand-derived values on tiny analytic networks; lazy-regularization and EMA formulas."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.config import TrainConfig
from training.phases import make_phases, update_ema
from training.loss import StyleGAN2Loss
from stubs import QuadraticD


# G whose synthesis is linear: img = einsum(ws, A); mapping repeats z as ws (no learned mapping).
class LinearG(nn.Module):
    def __init__(self, num_ws=3, w_dim=4, shape=(1, 2, 2)):
        super().__init__()
        self.z_dim, self.c_dim, self.num_ws = w_dim, 0, num_ws
        self.A = nn.Parameter(torch.randn(num_ws, w_dim, *shape, dtype=torch.float64))
        outer = self

        class Mapping(nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = nn.Parameter(torch.ones([], dtype=torch.float64))  # Identity, but trainable.

            def forward(self, z, c, update_emas=False):
                return (z * self.scale).unsqueeze(1).repeat(1, outer.num_ws, 1)

        class Synthesis(nn.Module):
            def forward(self, ws):
                return torch.einsum("niw,iwchx->nchx", ws, outer.A)

        self.mapping, self.synthesis = Mapping(), Synthesis()


def test_r1_penalty_matches_analytic_value_and_gradient():
    torch.manual_seed(0)
    shape = (1, 2, 2)
    G, D = LinearG(shape=shape), QuadraticD(shape)
    gamma, gain = 3.0, 16
    loss = StyleGAN2Loss(G, D, r1_gamma=gamma, style_mixing_prob=0)
    x = torch.randn(5, *shape, dtype=torch.float64)
    stats = loss.accumulate_gradients("Dreg", x, torch.zeros(5, 0), torch.randn(5, 4, dtype=torch.float64),
                                      torch.zeros(5, 0), gain=gain)
    a = D.a.detach()
    r1 = (4 * a.square() * x.square()).sum(dim=[1, 2, 3])
    assert math.isclose(stats["Loss/r1_penalty"], r1.mean().item(), rel_tol=1e-9)
    # d/da of gain * mean(gamma/2 * sum 4 a^2 x^2) = gain * gamma/2 * mean(8 a x^2).
    expected = gain * gamma / 2 * (8 * a * x.square()).mean(0)
    assert torch.allclose(D.a.grad, expected, rtol=1e-9)
    assert D.b.grad is None or D.b.grad.abs().item() < 1e-12  # R1 does not depend on the bias.


def test_nonsaturating_losses_match_softplus():
    torch.manual_seed(1)
    shape = (1, 2, 2)
    G, D = LinearG(shape=shape), QuadraticD(shape)
    loss = StyleGAN2Loss(G, D, r1_gamma=0, style_mixing_prob=0)
    z = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(4, *shape, dtype=torch.float64)
    stats = loss.accumulate_gradients("Dmain", x, torch.zeros(4, 0), z, torch.zeros(4, 0), gain=1)
    fake_logits = D(G.synthesis(G.mapping(z, None)), None)
    real_logits = D(x, None)
    assert math.isclose(stats["Loss/D/loss_fake"], F.softplus(fake_logits).mean().item(), rel_tol=1e-9)
    assert math.isclose(stats["Loss/D/loss_real"], F.softplus(-real_logits).mean().item(), rel_tol=1e-9)
    assert G.A.grad is None  # D's phase does not touch G.
    stats = loss.accumulate_gradients("Gmain", x, torch.zeros(4, 0), z, torch.zeros(4, 0), gain=1)
    assert math.isclose(stats["Loss/G/loss"], F.softplus(-fake_logits).mean().item(), rel_tol=1e-9)


def test_path_length_penalty_matches_analytic_value():
    torch.manual_seed(2)
    shape = (2, 3, 3)
    G, D = LinearG(num_ws=3, w_dim=4, shape=shape), QuadraticD(shape)
    decay, weight = 0.01, 2.0
    loss = StyleGAN2Loss(G, D, pl_weight=weight, pl_batch_shrink=2, pl_decay=decay, style_mixing_prob=0)
    z = torch.randn(6, 4, dtype=torch.float64)
    torch.manual_seed(123)
    stats = loss.accumulate_gradients("Greg", None, torch.zeros(6, 0), z, torch.zeros(6, 0), gain=4)
    # Same noise draw: y ~ N(0, I) / sqrt(H W) on the shrunk batch of 3.
    torch.manual_seed(123)
    y = torch.randn(3, *shape, dtype=torch.float64) / math.sqrt(shape[1] * shape[2])
    jty = torch.einsum("iwchx,nchx->niw", G.A.detach(), y)  # J^T y for img = sum_i A_i w_i.
    lengths = jty.square().sum(2).mean(1).sqrt()
    pl_mean = decay * lengths.mean()  # lerp from 0.
    assert math.isclose(stats["Loss/pl_mean"], pl_mean.item(), rel_tol=1e-6)  # pl_mean is kept in float32.
    assert math.isclose(stats["Loss/pl_penalty"], (lengths - pl_mean).square().mean().item(), rel_tol=1e-6)
    assert math.isclose(loss.pl_mean.item(), pl_mean.item(), rel_tol=1e-6)


def test_style_mixing_draws_a_second_latent():
    torch.manual_seed(3)
    G, D = LinearG(num_ws=6), QuadraticD((1, 2, 2))
    loss = StyleGAN2Loss(G, D, style_mixing_prob=1.0)
    z = torch.randn(8, 4, dtype=torch.float64)
    _, ws = loss.run_G(z, torch.zeros(8, 0))
    first = ws[:, 0]
    assert torch.allclose(ws[:, 0], z)
    mixed = ~torch.isclose(ws, first.unsqueeze(1).expand_as(ws)).all(dim=2)  # [N, num_ws]
    cut = mixed.float().argmax(dim=1)
    assert mixed.any() and int(cut.min()) >= 1  # Cutoff in [1, num_ws): the first w is never replaced.


def test_lazy_regularization_compensation():
    G, D = nn.Linear(2, 2), nn.Linear(2, 2)
    t = TrainConfig(glr=0.002, dlr=0.003, beta1=0.5, beta2=0.99, eps=1e-8, pl_interval=4, r1_interval=16)
    phases = {p.name: p for p in make_phases(G, D, t, use_pl=True, use_r1=True)}
    assert set(phases) == {"Gmain", "Greg", "Dmain", "Dreg"}
    assert [(p.network, p.owns_opt) for p in phases.values()] == [("G", True), ("G", False), ("D", True), ("D", False)]
    assert phases["Gmain"].opt is phases["Greg"].opt and phases["Dmain"].opt is phases["Dreg"].opt
    assert phases["Greg"].interval == 4 and phases["Dreg"].interval == 16
    g = phases["Gmain"].opt.param_groups[0]
    d = phases["Dmain"].opt.param_groups[0]
    assert math.isclose(g["lr"], 0.002 * 4 / 5) and math.isclose(d["lr"], 0.003 * 16 / 17)
    assert np.allclose(d["betas"], [0.5 ** (16 / 17), 0.99 ** (16 / 17)])
    phases = {p.name: p for p in make_phases(G, D, t, use_pl=False, use_r1=True)}
    assert "Gmain" in phases and "Greg" not in phases
    assert math.isclose(phases["Gmain"].opt.param_groups[0]["lr"], 0.002)


def test_ema_half_life():
    G, G_ema = nn.Linear(3, 3), nn.Linear(3, 3)
    with torch.no_grad():
        for p in G.parameters():
            p.fill_(1.0)
        for p in G_ema.parameters():
            p.fill_(0.0)
    # After one step of batch 32 with a 0.032 kimg half-life, G_ema moves halfway to G.
    update_ema(G_ema, G, cur_nimg=10 ** 6, batch_size=32, ema_kimg=0.032, ema_rampup=None)
    assert torch.allclose(G_ema.weight, torch.full((3, 3), 0.5))
    # Ramp-up caps the half-life at cur_nimg * ema_rampup images.
    with torch.no_grad():
        for p in G_ema.parameters():
            p.fill_(0.0)
    update_ema(G_ema, G, cur_nimg=320, batch_size=32, ema_kimg=10, ema_rampup=0.1)  # half-life 32 images.
    assert torch.allclose(G_ema.weight, torch.full((3, 3), 0.5))
