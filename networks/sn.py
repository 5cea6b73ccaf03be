"""Spectral normalization (Miyato et al. 2018): W_SN = W / sigma(W), sigma estimated by power iteration."""
import torch
import torch.nn as nn
import torch.nn.functional as F

# The `model.sn` choices: which networks have spectrally normalized layers.
SN_CHOICES = ("none", "d", "g", "both")

# Initialization: an SN layer stores its weight exactly as the equalized-LR layer does, N(0, 1/lr_multiplier^2),
# from the same random draws. W / sigma(W) does not depend on the scale of W, so this is the Gaussian init of
# SN-GAN/SAGAN up to a factor, and that factor only sets Adam's step relative to the weights: at unit scale the
# presets' learning rates keep their equalized-LR meaning (lr 0.0025 moves a weight ~0.25% of its scale per step;
# SAGAN's lr 1e-4 / 4e-4 on Glorot-scaled 256-channel 3x3 convs, std ~0.02, is ~0.5% / 2%; Glorot scale with
# lr 0.0025 would be ~12%), and the mapping network's lr multiplier 0.01 still slows it 100x.


def register_sn_buffers(module: nn.Module, weight: torch.Tensor) -> None:
    """The power-iteration vectors of a weight [out, in, ...] as buffers (saved in checkpoints): sn_u in R^out and sn_v
    in R^(in*kh*kw). Miyato et al. (Algorithm 1) start u at random and let one iteration per step converge over training
    (torch's parametrization runs 15 iterations first); from a random start the estimate of a small, nearly square
    matrix can still be several % low after 100 iterations, so here u and v start at the exact top singular vectors of
    the initial W (one SVD per layer at construction, without randomness), and one iteration per training step then
    tracks them as W changes."""
    with torch.no_grad():
        mat = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
        left, _, right_t = torch.linalg.svd(mat, full_matrices=False)
    module.register_buffer("sn_u", left[:, 0].contiguous())
    module.register_buffer("sn_v", right_t[0].contiguous())


def sn_weight(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, update: bool) -> torch.Tensor:
    """W_SN = W / sigma(W) (Miyato et al. 2018, eq. 8) with W reshaped to [out, in*kh*kw]. With `update` (training
    mode), one power iteration first (Algorithm 1): v <- W^T u / ||W^T u||, u <- W v / ||W v||, written into the
    buffers; in eval mode the stored vectors are used as they are. sigma = u^T W v with u and v constants, as in
    torch.nn.utils.spectral_norm: gradients (and R1's second-order gradients) flow through W only. Computed in at least
    float32 with autocast off, so that mixed precision never runs the iteration in half precision."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        w = weight.to(dtype)
        mat = w.reshape(w.shape[0], -1)
        if update:
            with torch.no_grad():
                v.copy_(F.normalize(torch.mv(mat.t(), u.to(dtype)), dim=0, eps=1e-12))
                u.copy_(F.normalize(torch.mv(mat, v.to(dtype)), dim=0, eps=1e-12))
        # Clones: later in-place iterations must not change the vectors saved for this graph's backward.
        sigma = torch.dot(u.to(dtype).clone(), torch.mv(mat, v.to(dtype).clone()))
        return w / sigma
