"""Project images into G's latent space (W or W+) with the published projector schedule, batched, plus PSNR/SSIM."""
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from training.eval.lpips import load_lpips

LOSS_KINDS = ("lpips", "fallback")
W_SPACES = ("w", "w+")
# The label the output carries when the fallback loss was used, so nobody mistakes it for LPIPS.
FALLBACK_LABEL = "fallback (pixel+D features), not LPIPS"
# Seed of the z samples that estimate w_avg / w_std (the published projector's choice).
W_STATS_SEED = 123


@torch.no_grad()
def compute_w_stats(G, num_samples: int = 10000, c: Optional[torch.Tensor] = None, device=None,
                    chunk: int = 2000):
    """w_avg [w_dim] and the scalar w_std (RMS distance to w_avg) from `num_samples` mapped z (RandomState(123))."""
    device = device or next(G.parameters()).device
    z = torch.from_numpy(np.random.RandomState(W_STATS_SEED).randn(num_samples, G.z_dim)).float()
    ws = []
    for zc in z.split(chunk):
        cc = torch.zeros([zc.shape[0], G.c_dim], device=device) if c is None else \
            c.reshape(1, -1).to(device).float().repeat(zc.shape[0], 1)
        ws.append(G.mapping(zc.to(device), cc)[:, 0].float())
    ws = torch.cat(ws)
    w_avg = ws.mean(dim=0)
    w_std = float(((ws - w_avg).square().sum() / num_samples).sqrt())
    return w_avg, w_std


def learning_rate(t: float, initial_lr: float = 0.1, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """Learning rate at t = step / num_steps: linear ramp-up over `rampup`, cosine ramp-down over the last
    `rampdown`."""
    ramp = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * (min(1.0, t / rampup) if rampup > 0 else 1.0)
    return initial_lr * ramp


def latent_noise_scale(t: float, w_std: float, initial_noise_factor: float = 0.05,
                       noise_ramp_length: float = 0.75) -> float:
    """Latent noise scale at t: w_std * initial_noise_factor * max(0, 1 - t / noise_ramp_length)^2."""
    return w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp_length) ** 2


def noise_regularization(noise_maps) -> torch.Tensor:
    """Per-sample noise regularization [N]: squared autocorrelation at shift 1 in x and y, over a pyramid of the maps
    (average-pooled by 2 until 8 px), summed over layers and levels."""
    total = 0
    for v in (noise_maps.values() if isinstance(noise_maps, dict) else noise_maps):
        x = v
        while True:
            total = total + (x * torch.roll(x, shifts=1, dims=3)).mean(dim=[1, 2, 3]).square()
            total = total + (x * torch.roll(x, shifts=1, dims=2)).mean(dim=[1, 2, 3]).square()
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, kernel_size=2)
    return total


@torch.no_grad()
def renormalize_noise_(noise_maps: dict) -> None:
    """Make each sample's noise map zero-mean, unit-variance, in place."""
    for v in noise_maps.values():
        v.sub_(v.mean(dim=[1, 2, 3], keepdim=True))
        v.mul_(v.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt())


def d_block_features(D, img: torch.Tensor) -> list:
    """Activations of D's resolution blocks (not the epilogue, whose minibatch-std mixes samples), for feature
    matching."""
    feats = []
    x = None
    for res in D.block_resolutions:
        x, img = getattr(D, f"b{res}")(x, img)
        feats.append(x.float())
    return feats


class FallbackLoss:
    """The documented fallback loss, per sample [N]: sum over a pyramid (average-pooled by 2 down to 8 px) of pixel MSE
    + L1 on [-1, 1] images, plus, when D is given, the mean over D's blocks of the feature MSE."""

    def __init__(self, D=None):
        self.D = D

    def features(self, img: torch.Tensor) -> dict:
        """What distance compares, for images in [-1, 1]: the images and D's block activations."""
        return {"img": img, "d": d_block_features(self.D, img) if self.D is not None else []}

    def distance(self, a: dict, b: dict) -> torch.Tensor:
        """The loss [N] between two results of features."""
        x, y = a["img"], b["img"]
        total = 0
        while True:
            diff = x - y
            total = total + diff.square().mean(dim=[1, 2, 3]) + diff.abs().mean(dim=[1, 2, 3])
            if min(x.shape[2], x.shape[3]) <= 8:
                break
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        if a["d"]:
            total = total + sum((fa - fb).square().mean(dim=[1, 2, 3]) for fa, fb in zip(a["d"], b["d"])) \
                / len(a["d"])
        return total


def lpips_input(img_0_255: torch.Tensor) -> torch.Tensor:
    """Images in [0, 255] as LPIPS wants them: RGB, area-downsampled to 256 px when larger (as the published
    projector)."""
    if img_0_255.shape[1] == 1:
        img_0_255 = img_0_255.repeat(1, 3, 1, 1)
    if img_0_255.shape[2] > 256:
        img_0_255 = F.interpolate(img_0_255, size=(256, 256), mode="area")
    return img_0_255


def check_full_resolution(G, source: str = "G") -> None:
    """Refuse a generator at a progressive stage below full resolution or mid-fade (e.g. from a snapshot taken during
    the schedule): the projector renders the full-resolution synthesis, which such a G is not trained to match. `source`
    names where G came from (the snapshot) in the error."""
    res, alpha = getattr(G, "stage", (G.img_resolution, 1.0))
    if res < G.img_resolution or alpha < 1:
        raise ValueError(f"{source}: taken during the progressive schedule at stage {res} px (fade {alpha:.2f}) of "
                         f"{G.img_resolution} px; projection needs the full-resolution generator: use a "
                         f"full-resolution snapshot (one taken after the schedule reached {G.img_resolution} px and "
                         f"finished its fade, or from a run without the schedule)")


# Check and convert targets (uint8, or float in [0, 255]) of shape [N, C, res, res] to float [0, 255].
def _prepare_targets(G, targets) -> torch.Tensor:
    t = torch.as_tensor(targets)
    want = (G.img_channels, G.img_resolution, G.img_resolution)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or tuple(t.shape[1:]) != want:
        raise ValueError(f"project: targets must have shape [N, {want[0]}, {want[1]}, {want[2]}] (G's channels "
                         f"and resolution), got {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = t.float()
        if t.min() < -0.5 or t.max() > 255.5:
            raise ValueError(f"project: float targets must be in [0, 255] (like uint8), got values in "
                             f"[{float(t.min()):.3g}, {float(t.max()):.3g}]")
    return t.float()


def project(G, targets, num_steps: int = 1000, w_space: str = "w", initial_lr: float = 0.1,
            lr_rampup: float = 0.05, lr_rampdown: float = 0.25, initial_noise_factor: float = 0.05,
            noise_ramp_length: float = 0.75, regularize_noise_weight: float = 1e5, w_avg_samples: int = 10000,
            loss: str = "lpips", perceptual=None, D=None, seed: int = 0, indices=None, c=None, device=None,
            progress: Optional[Callable] = None, w_stats=None, fused_modconv: bool = False) -> dict:
    """Optimize one w (W: one w broadcast to all num_ws; W+: one per layer) and per-layer noise maps per target so that
    G reproduces the targets, with the published schedule. All N targets are optimized together, each with its own
    parameters and its own RNG (torch.Generator seeded by seed + indices[i]), so a batch equals single runs. Returns
    dict(w [N, num_ws, w_dim], noise {name: [N,1,r,r]}, dist [N], reg [N], w_avg, w_std, loss_kind), the noise
    keyed as G.synthesis's `noise` (each step renders G.synthesis(ws, noise=noise), so spectral norm, attention and
    every architecture are G's own). fused_modconv defaults to False: the backward of the grouped
    convolution is ~30x slower on CPU."""
    check_full_resolution(G, "project: G")
    if w_space not in W_SPACES:
        raise ValueError(f"project: w_space must be one of {W_SPACES}, got {w_space!r}")
    if loss not in LOSS_KINDS:
        raise ValueError(f"project: loss must be one of {LOSS_KINDS}, got {loss!r}")
    if G.c_dim > 0 and c is None:
        raise ValueError(f"project: G is conditional ({G.c_dim} classes); pass c, a label of shape [{G.c_dim}]")
    device = torch.device(device) if device is not None else next(G.parameters()).device
    target = _prepare_targets(G, targets).to(device)
    n = target.shape[0]
    indices = list(range(n)) if indices is None else list(indices)
    if len(indices) != n:
        raise ValueError(f"project: {len(indices)} indices for {n} targets")
    gens = [torch.Generator().manual_seed(int(seed) + int(i)) for i in indices]

    if loss == "lpips":
        if perceptual is None:
            perceptual = load_lpips(device=device)
        crit = perceptual
        to_input = lambda img_m1_1: lpips_input((img_m1_1 + 1) * 127.5)  # noqa: E731
    else:
        crit = FallbackLoss(D)
        to_input = lambda img_m1_1: img_m1_1  # noqa: E731
    loss_kind = "lpips" if loss == "lpips" else FALLBACK_LABEL

    requires_grad = [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)
    if D is not None and loss == "fallback":
        d_requires_grad = [p.requires_grad for p in D.parameters()]
        D.requires_grad_(False)
    try:
        w_avg, w_std = w_stats if w_stats is not None else compute_w_stats(G, w_avg_samples, c, device)
        w_avg = w_avg.to(device).float()
        num_w = 1 if w_space == "w" else G.num_ws
        w_opt = w_avg.reshape(1, 1, -1).repeat(n, num_w, 1).clone().requires_grad_(True)
        noise = {}  # The optimized per-sample maps, {'b{res}.conv{0,1}': [N, 1, res, res]} as G.synthesis takes them.
        for name, layer in G.synthesis.noise_layers():
            r = layer.resolution
            noise[name] = torch.stack([torch.randn([1, r, r], generator=g) for g in gens]).to(device)
            noise[name].requires_grad_(True)
        with torch.no_grad():
            target_feats = crit.features(to_input(target / 127.5 - 1))
        opt = torch.optim.Adam([w_opt] + list(noise.values()), betas=(0.9, 0.999), lr=initial_lr)

        dist = reg = None
        for step in range(num_steps):
            t = step / num_steps
            lr = learning_rate(t, initial_lr, lr_rampup, lr_rampdown)
            for group in opt.param_groups:
                group["lr"] = lr
            scale = latent_noise_scale(t, w_std, initial_noise_factor, noise_ramp_length)
            w_noise = torch.stack([torch.randn(w_opt.shape[1:], generator=g) for g in gens]).to(device) * scale
            ws = (w_opt + w_noise).expand(n, G.num_ws, -1) if num_w == 1 else w_opt + w_noise
            synth = G.synthesis(ws, noise=noise, noise_mode="none", fused_modconv=fused_modconv)
            dist = crit.distance(target_feats, crit.features(to_input(synth)))
            reg = noise_regularization(noise)
            total = dist + reg * regularize_noise_weight
            opt.zero_grad(set_to_none=True)
            total.sum().backward()
            opt.step()
            renormalize_noise_(noise)
            if progress is not None:
                w_now = w_opt.detach().expand(n, G.num_ws, -1) if num_w == 1 else w_opt.detach()
                progress(step, dict(num_steps=num_steps, dist=dist.detach(), reg=reg.detach(), lr=lr, w=w_now))
    finally:
        for p, rg in zip(G.parameters(), requires_grad):
            p.requires_grad_(rg)
        if D is not None and loss == "fallback":
            for p, rg in zip(D.parameters(), d_requires_grad):
                p.requires_grad_(rg)

    w_final = w_opt.detach().expand(n, G.num_ws, -1) if num_w == 1 else w_opt.detach()
    return dict(w=w_final.float().cpu().clone(), noise={k: v.detach().cpu() for k, v in noise.items()},
                dist=dist.detach().cpu() if dist is not None else torch.zeros(n),
                reg=reg.detach().cpu() if reg is not None else torch.zeros(n),
                w_avg=w_avg.cpu(), w_std=w_std, loss_kind=loss_kind)


def psnr(a, b) -> np.ndarray:
    """PSNR in dB per image [N] of uint8 images (255 peak); identical images give 10*log10(255^2 / 1e-10)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


# Normalized 1-D gaussian of `size` taps and width `sigma`.
def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, win: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM (Wang et al. 2004) per image [N] of uint8 [N, C, H, W] images: gaussian window 11 (sigma 1.5), K1 0.01, K2
    0.03, L 255, population statistics, over the valid region (no padding), averaged over channels; this is skimage's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255). Images smaller
    than 11 px use the largest odd window that fits."""
    x = torch.tensor(np.asarray(a), dtype=torch.float64)
    y = torch.tensor(np.asarray(b), dtype=torch.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim: expected two [N, C, H, W] arrays of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    n, ch, h, w = x.shape
    win = min(win, h - (1 - h % 2), w - (1 - w % 2))
    g = _gaussian(win, sigma)
    kernel = (g[:, None] * g[None, :]).reshape(1, 1, win, win).repeat(ch, 1, 1, 1)
    filt = lambda t: F.conv2d(t, kernel, groups=ch)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=[1, 2, 3]).numpy()
