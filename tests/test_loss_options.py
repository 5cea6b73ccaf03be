"""Loss options (ns, hinge, wgan-gp) against hand-computed values on fixed logits, and their regularizers."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from training.loss import StyleGAN2Loss
from stubs import QuadraticD

# Fixed logits: D below returns the pixel value, G outputs z itself, so these are D(x) and D(G(z)).
REAL = [-2.0, -0.5, 0.3, 1.5]
FAKE = [-1.2, 0.4, 0.9, 2.5]


# D(img) = a * sum(img) + b, with a = 1 and b = 0 at first: on 1-pixel images the logits are the given values.
class StubD(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def forward(self, img, c, update_emas=False):
        return self.a * img.sum(dim=[1, 2, 3]).unsqueeze(1) + self.b


# G(z) = s * z reshaped to `shape` (one w, no mixing randomness); s = 1 is trainable.
class StubG(nn.Module):
    def __init__(self, shape=(1, 1, 1)):
        super().__init__()
        self.shape, self.num_ws = shape, 1
        self.s = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        outer = self

        class Mapping(nn.Module):
            def forward(self, z, c, update_emas=False):
                return (z * outer.s).unsqueeze(1)

        class Synthesis(nn.Module):
            def forward(self, ws):
                return ws[:, 0].reshape(ws.shape[0], *outer.shape)

        self.mapping, self.synthesis = Mapping(), Synthesis()


def run(loss_type, phase, gain=1.0, **kw):
    G, D = StubG(), StubD()
    loss = StyleGAN2Loss(G, D, r1_gamma=0, style_mixing_prob=0, loss_type=loss_type, **kw)
    x = torch.tensor(REAL, dtype=torch.float64).reshape(4, 1, 1, 1)
    z = torch.tensor(FAKE, dtype=torch.float64).reshape(4, 1)
    stats = loss.accumulate_gradients(phase, x, torch.zeros(4, 0), z, torch.zeros(4, 0), gain=gain)
    return stats, G, D


def test_hinge_loss_hand_computed():
    stats, _, D = run("hinge", "Dmain")
    # relu(1 - x): 3, 1.5, 0.7, 0 -> 1.3; relu(1 + D(G(z))): 0, 1.4, 1.9, 3.5 -> 1.7.
    assert math.isclose(stats["Loss/D/loss_real"], 1.3, rel_tol=1e-12)
    assert math.isclose(stats["Loss/D/loss_fake"], 1.7, rel_tol=1e-12)
    # d/da: mean(-x [x < 1]) + mean(z [z > -1]) = (2 + 0.5 - 0.3) / 4 + (0.4 + 0.9 + 2.5) / 4 = 1.5;
    # d/db: -3/4 + 3/4 = 0 (the active hinges balance).
    assert math.isclose(D.a.grad.item(), 1.5, rel_tol=1e-12)
    assert abs(D.b.grad.item()) < 1e-15
    stats, G, D = run("hinge", "Gmain", gain=2.0)
    # -D(G(z)): -(-1.2 + 0.4 + 0.9 + 2.5) / 4 = -0.65; d/ds of gain * -mean(s z) = -2 * 0.65.
    assert math.isclose(stats["Loss/G/loss"], -0.65, rel_tol=1e-12)
    assert math.isclose(G.s.grad.item(), -1.3, rel_tol=1e-12)


def test_wgan_losses_and_drift_hand_computed():
    stats, _, D = run("wgan-gp", "Dmain", wgan_drift=0.001)
    # Critic: mean D(G(z)) = 0.65, -mean D(x) = 0.175, drift term mean D(x)^2 = (4 + 0.25 + 0.09 + 2.25) / 4.
    assert math.isclose(stats["Loss/D/loss_fake"], 0.65, rel_tol=1e-12)
    assert math.isclose(stats["Loss/D/loss_real"], 0.175, rel_tol=1e-12)
    assert math.isclose(stats["Loss/drift"], 1.6475, rel_tol=1e-12)
    # d/da: mean(z) - mean(x) + 0.001 * mean(2 x^2) = 0.65 + 0.175 + 0.003295; d/db: 1 - 1 + 0.002 * mean(x).
    assert math.isclose(D.a.grad.item(), 0.828295, rel_tol=1e-12)
    assert math.isclose(D.b.grad.item(), 0.002 * -0.175, rel_tol=1e-9)
    stats, G, _ = run("wgan-gp", "Gmain")
    assert math.isclose(stats["Loss/G/loss"], -0.65, rel_tol=1e-12)
    assert math.isclose(G.s.grad.item(), -0.65, rel_tol=1e-12)


def test_nonsaturating_default_hand_computed():
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731  softplus
    stats, _, _ = run("ns", "Dmain")
    assert math.isclose(stats["Loss/D/loss_real"], np.mean([sp(-x) for x in REAL]), rel_tol=1e-12)
    assert math.isclose(stats["Loss/D/loss_fake"], np.mean([sp(z) for z in FAKE]), rel_tol=1e-12)
    assert "Loss/drift" not in stats
    stats, _, _ = run("ns", "Gmain")
    assert math.isclose(stats["Loss/G/loss"], np.mean([sp(-z) for z in FAKE]), rel_tol=1e-12)


# WGAN-GP penalty lambda * (||grad D(x_hat)|| - 1)^2 at x_hat = eps x + (1 - eps) G(z), eps ~ U[0, 1] per sample,
# in place of R1 (the Dreg phase; r1_gamma is not used), with its gradient; eps is the loss's first random draw.
def test_gradient_penalty_hand_computed():
    torch.manual_seed(0)
    shape = (1, 2, 2)
    G, D = StubG(shape), QuadraticD(shape)
    lam, gain = 10.0, 4.0
    loss = StyleGAN2Loss(G, D, r1_gamma=5.0, style_mixing_prob=0, loss_type="wgan-gp", wgan_lambda=lam)
    assert loss.has_d_reg
    x = torch.randn(5, *shape, dtype=torch.float64)
    z = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(7)
    stats = loss.accumulate_gradients("Dreg", x, torch.zeros(5, 0), z, torch.zeros(5, 0), gain=gain)
    torch.manual_seed(7)
    eps = torch.rand(5, 1, 1, 1, dtype=torch.float64).numpy()
    a, xn, fn = D.a.detach().numpy(), x.numpy(), z.numpy().reshape(5, *shape)
    x_hat = eps * xn + (1 - eps) * fn
    norm = np.sqrt(((2 * a * x_hat) ** 2).sum(axis=(1, 2, 3)))            # ||2 a x_hat||
    assert set(stats) == {"Loss/gp_penalty"}                              # No R1 with wgan-gp.
    assert math.isclose(stats["Loss/gp_penalty"], ((norm - 1) ** 2).mean(), rel_tol=1e-10)
    # d/da of gain * lam * mean((norm - 1)^2) = gain * lam * mean(2 (norm - 1) * 4 a x_hat^2 / norm).
    expected = gain * lam * (2 * (norm - 1)[:, None, None, None] * 4 * a * x_hat ** 2
                             / norm[:, None, None, None]).mean(axis=0)
    assert np.allclose(D.a.grad.numpy(), expected, rtol=1e-10)
    assert D.b.grad is None or abs(D.b.grad.item()) < 1e-15
    assert G.s.grad is None  # Fakes are generated without gradient.


# R1 keeps working with hinge (Dboth: loss and penalty together); path length is the same for every loss; the
# regularizer phases exist according to the loss (R1 gamma for ns/hinge, lambda for wgan-gp).
def test_regularizers_with_loss_options():
    torch.manual_seed(1)
    shape = (1, 2, 2)
    G, D = StubG(shape), QuadraticD(shape)
    loss = StyleGAN2Loss(G, D, r1_gamma=3.0, style_mixing_prob=0, loss_type="hinge")
    x = torch.randn(4, *shape, dtype=torch.float64)
    stats = loss.accumulate_gradients("Dboth", x, torch.zeros(4, 0), torch.randn(4, 4, dtype=torch.float64),
                                      torch.zeros(4, 0), gain=1)
    r1 = (4 * D.a.detach().square() * x.square()).sum(dim=[1, 2, 3])
    assert math.isclose(stats["Loss/r1_penalty"], r1.mean().item(), rel_tol=1e-10)
    real = D(x, None).detach()
    assert math.isclose(stats["Loss/D/loss_real"], torch.relu(1 - real).mean().item(), rel_tol=1e-10)
    loss = StyleGAN2Loss(G, D, pl_weight=2.0, style_mixing_prob=0, loss_type="wgan-gp")
    stats = loss.accumulate_gradients("Greg", None, torch.zeros(4, 0), torch.randn(4, 4, dtype=torch.float64),
                                      torch.zeros(4, 0), gain=1)
    assert stats["Loss/pl_penalty"] >= 0 and stats["Loss/pl_mean"] > 0
    assert StyleGAN2Loss(G, D, r1_gamma=0, loss_type="hinge").has_d_reg is False
    assert StyleGAN2Loss(G, D, r1_gamma=0, loss_type="wgan-gp").has_d_reg is True
    assert StyleGAN2Loss(G, D, r1_gamma=1, loss_type="wgan-gp", wgan_lambda=0).has_d_reg is False
    with pytest.raises(ValueError, match="train.loss"):
        StyleGAN2Loss(G, D, loss_type="lsgan")
