"""StyleGAN2 loss (non-saturating, hinge or WGAN-GP), lazy R1 on reals, path-length regularization, style mixing."""
import contextlib
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from training import dist

# The adversarial losses (`train.loss`): non-saturating logistic, hinge, Wasserstein with gradient penalty.
LOSS_TYPES = ("ns", "hinge", "wgan-gp")


def g_loss(loss_type: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """G's adversarial loss per sample from the logits of its fakes: non-saturating softplus(-D(G(z))) (Goodfellow et
    al. 2014, sec. 3); -D(G(z)) for hinge (Lim & Ye 2017, eq. 10; SAGAN eq. 4) and for WGAN (Arjovsky et al. 2017).
    """
    return F.softplus(-fake_logits) if loss_type == "ns" else -fake_logits


def d_loss_fake(loss_type: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's adversarial loss per sample on fakes: softplus(D(G(z))) (ns), relu(1 + D(G(z))) (hinge, SAGAN eq. 4),
    D(G(z)) (WGAN critic, Gulrajani et al. 2017, Algorithm 1)."""
    if loss_type == "ns":
        return F.softplus(fake_logits)
    return F.relu(1 + fake_logits) if loss_type == "hinge" else fake_logits


def d_loss_real(loss_type: str, real_logits: torch.Tensor) -> torch.Tensor:
    """D's adversarial loss per sample on reals: softplus(-D(x)) (ns), relu(1 - D(x)) (hinge), -D(x) (WGAN)."""
    if loss_type == "ns":
        return F.softplus(-real_logits)
    return F.relu(1 - real_logits) if loss_type == "hinge" else -real_logits


class StyleGAN2Loss:
    """The loss of one G/D phase (StyleGAN2-ADA's phase names): 'Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth'.
    `backward` runs the backward pass (Accelerate's, so that mixed-precision loss scaling applies). `grad_scaler`
    (fp16 mixed precision: Accelerate's GradScaler) also scales the gradients taken inside the loss (R1, path
    length, gradient penalty): torch.autograd.grad runs on the outputs times the scaler's current scale, and the
    result is divided by it, so that float16 activation gradients neither underflow (the scale lifts them) nor
    overflow unnoticed (an infinity reaches the final gradients, and the scaler skips that step and lowers its
    scale). `loss_type` picks the adversarial loss; D's regularizer (the Dreg/Dboth phases) is R1 with 'ns' and
    'hinge' and the WGAN-GP gradient penalty with 'wgan-gp' (which replaces R1: r1_gamma is then unused), weighted
    by `wgan_lambda`, plus ProGAN's drift term `wgan_drift` * D(x)^2 in Dmain. Path-length regularization is the
    same for every loss."""
    def __init__(self, G, D, augment_pipe=None, r1_gamma: float = 10.0, style_mixing_prob: float = 0.9,
                 pl_weight: float = 0.0, pl_batch_shrink: int = 2, pl_decay: float = 0.01,
                 autocast: Callable = contextlib.nullcontext, backward: Optional[Callable] = None,
                 on_real_logits: Optional[Callable] = None, loss_type: str = "ns", wgan_lambda: float = 10.0,
                 wgan_drift: float = 0.001, grad_scaler=None):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"train.loss must be one of {LOSS_TYPES}, got {loss_type!r}")
        self.G = G
        self.D = D
        self.augment_pipe = augment_pipe
        self.loss_type = loss_type
        self.wgan_lambda = wgan_lambda
        self.wgan_drift = wgan_drift
        self.r1_gamma = r1_gamma
        self.style_mixing_prob = style_mixing_prob
        self.pl_weight = pl_weight
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.autocast = autocast
        self.backward = backward or (lambda loss: loss.backward())
        self.on_real_logits = on_real_logits  # E.g. ADA's r_t accumulator (sign of D on augmented reals).
        self.grad_scaler = grad_scaler
        self.pl_mean = torch.zeros([], device=next(G.parameters()).device)

    @property
    def has_d_reg(self) -> bool:
        """Whether D has a regularizer phase (Dreg / Dboth): R1 with gamma != 0, or the WGAN-GP penalty with lambda !=
        0."""
        return (self.wgan_lambda if self.loss_type == "wgan-gp" else self.r1_gamma) != 0

    def run_G(self, z, c, update_emas: bool = False):
        """G(z, c) returning the image and the ws it used, with style mixing regularization (StyleGAN, sec. 3.1): with
        probability `style_mixing_prob`, the ws after a random cutoff come from a second latent."""
        with self.autocast():
            ws = self.G.mapping(z, c, update_emas=update_emas)
            if self.style_mixing_prob > 0:
                cutoff = torch.empty([], dtype=torch.int64, device=ws.device).random_(1, ws.shape[1])
                cutoff = torch.where(torch.rand([], device=ws.device) < self.style_mixing_prob, cutoff,
                                     ws.shape[1])
                ws2 = self.G.mapping(torch.randn_like(z), c, update_emas=False)
                mix = torch.arange(ws.shape[1], device=ws.device)[None, :, None] >= cutoff
                ws = torch.where(mix, ws2, ws)
            img = self.G.synthesis(ws)
        return img, ws

    def run_D(self, img, c, update_emas: bool = False):
        """D(augment(img), c)."""
        with self.autocast():
            if self.augment_pipe is not None:
                img = self.augment_pipe(img)
            logits = self.D(img, c, update_emas=update_emas)
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    # d(output.sum())/d(inputs) with a graph for the second derivative; with a grad scaler, taken on the scaled
    # output and unscaled (see the class comment). The scale is the scaler's (a device tensor, nothing read) divided
    # by the batch, so that each sample's backward starts from the magnitude the scaled loss mean gives the main
    # backward pass: the one the scaler keeps below float16's overflow.
    def _grad(self, output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        out = output.sum()
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return torch.autograd.grad(outputs=[out], inputs=[inputs], create_graph=True, only_inputs=True)[0]
        ones = torch.ones([], dtype=torch.float32, device=out.device)
        scale = self.grad_scaler.scale(ones) / output.shape[0]
        grads = torch.autograd.grad(outputs=[out * scale], inputs=[inputs], create_graph=True, only_inputs=True)[0]
        return grads / scale

    def accumulate_gradients(self, phase: str, real_img, real_c, gen_z, gen_c, gain: float) -> dict:
        """Accumulate the gradients of one phase for one round; `gain` is the phase's lazy-regularization interval
        (StyleGAN2 sec. 3.1: a regularizer evaluated every k minibatches is weighted by k). Returns the stats as
        0-dim device tensors (nothing is read back to the host here)."""
        if phase not in ("Gmain", "Greg", "Gboth", "Dmain", "Dreg", "Dboth"):
            raise ValueError(f"unknown loss phase {phase!r}")
        do_Gmain = phase in ("Gmain", "Gboth")
        do_Dmain = phase in ("Dmain", "Dboth")
        do_Gpl = phase in ("Greg", "Gboth") and self.pl_weight != 0
        do_Dreg = phase in ("Dreg", "Dboth") and self.has_d_reg
        do_Dr1 = do_Dreg and self.loss_type != "wgan-gp"
        do_Dgp = do_Dreg and self.loss_type == "wgan-gp"
        stats = {}

        # Gmain: softplus(-D(G(z))) (ns) or -D(G(z)) (hinge, wgan-gp).
        if do_Gmain:
            gen_img, _ = self.run_G(gen_z, gen_c, update_emas=True)
            gen_logits = self.run_D(gen_img, gen_c)
            loss_Gmain = g_loss(self.loss_type, gen_logits)
            stats["Loss/scores/fake"] = gen_logits.detach().mean()
            stats["Loss/G/loss"] = loss_Gmain.detach().mean()
            self.backward(loss_Gmain.mean().mul(gain))

        # Greg: path-length regularization (StyleGAN2 eq. 4): E (||J_w^T y||_2 - a)^2 with y ~ N(0, I)/sqrt(HW),
        # a the running mean of the lengths.
        if do_Gpl:
            batch_size = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
            gen_img, gen_ws = self.run_G(gen_z[:batch_size], gen_c[:batch_size])
            pl_noise = torch.randn_like(gen_img) / np.sqrt(gen_img.shape[2] * gen_img.shape[3])
            pl_grads = self._grad(gen_img * pl_noise, gen_ws)
            pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
            # The running mean uses the lengths of all ranks, so that every rank keeps the same pl_mean.
            batch_mean = dist.all_reduce_mean(pl_lengths.detach().mean().to(self.pl_mean.dtype).clone())
            pl_mean = self.pl_mean.lerp(batch_mean, self.pl_decay)
            self.pl_mean.copy_(pl_mean)
            pl_penalty = (pl_lengths - pl_mean).square()
            loss_Gpl = pl_penalty * self.pl_weight
            stats["Loss/pl_penalty"] = pl_penalty.detach().mean()
            stats["Loss/pl_mean"] = pl_mean.detach()
            # The image term (times 0) keeps every synthesis parameter in the graph.
            self.backward((gen_img[:, 0, 0, 0] * 0 + loss_Gpl).mean().mul(gain))

        # Dmain, fake half: softplus(D(G(z))), relu(1 + D(G(z))) or D(G(z)).
        if do_Dmain:
            with torch.no_grad():
                gen_img, _ = self.run_G(gen_z, gen_c, update_emas=False)
            gen_logits = self.run_D(gen_img, gen_c, update_emas=True)
            loss_Dgen = d_loss_fake(self.loss_type, gen_logits)
            stats["Loss/D/loss_fake"] = loss_Dgen.detach().mean()
            self.backward(loss_Dgen.mean().mul(gain))

        # Dmain, real half: softplus(-D(x)), relu(1 - D(x)) or -D(x) + eps_drift * D(x)^2 (ProGAN, Karras et al. 2018,
        # sec. A.1); Dreg: R1 = gamma/2 * ||grad_x D(x)||^2 (Mescheder et al. 2018, eq. 9).
        if do_Dmain or do_Dr1:
            real_img_tmp = real_img.detach().requires_grad_(do_Dr1)
            real_logits = self.run_D(real_img_tmp, real_c)
            loss = torch.zeros_like(real_logits)
            if do_Dmain:
                loss_Dreal = d_loss_real(self.loss_type, real_logits)
                loss = loss + loss_Dreal
                stats["Loss/scores/real"] = real_logits.detach().mean()
                stats["Loss/D/loss_real"] = loss_Dreal.detach().mean()
                if self.loss_type == "wgan-gp" and self.wgan_drift != 0:
                    drift = real_logits.square()
                    loss = loss + drift * self.wgan_drift
                    stats["Loss/drift"] = drift.detach().mean()
                if self.on_real_logits is not None:
                    self.on_real_logits(real_logits.detach())
            if do_Dr1:
                r1_grads = self._grad(real_logits, real_img_tmp)
                r1_penalty = r1_grads.square().sum([1, 2, 3])
                loss = loss + r1_penalty.unsqueeze(1) * (self.r1_gamma / 2)
                stats["Loss/r1_penalty"] = r1_penalty.detach().mean()
            self.backward(loss.mean().mul(gain))

        # Dreg with wgan-gp: lambda * (||grad D(x_hat)||_2 - 1)^2 at x_hat = eps x + (1 - eps) G(z), eps ~ U[0, 1]
        # per sample (Gulrajani et al. 2017, Algorithm 1), with the reals' labels; replaces R1.
        if do_Dgp:
            with torch.no_grad():
                gen_img, _ = self.run_G(gen_z, gen_c, update_emas=False)
            real = real_img.detach().to(gen_img.dtype)
            eps = torch.rand([real.shape[0], 1, 1, 1], dtype=real.dtype, device=real.device)
            mixed = (eps * real + (1 - eps) * gen_img).requires_grad_(True)
            mixed_logits = self.run_D(mixed, real_c)
            gp_grads = self._grad(mixed_logits, mixed)
            gp_penalty = (gp_grads.flatten(1).norm(dim=1) - 1).square()
            stats["Loss/gp_penalty"] = gp_penalty.detach().mean()
            self.backward((gp_penalty * self.wgan_lambda).mean().mul(gain))
        return stats

