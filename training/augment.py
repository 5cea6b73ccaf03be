"""Adaptive discriminator augmentation (Karras et al. 2020): the augmentation pipe, its presets and the p heuristic."""
import math
from typing import Optional

import numpy as np
import torch

from ops import upfirdn2d
from training import augment_ops as ops
from training.config import ConfigError


# The published multiplier presets (paper §4 / app. B): blit, geometric, colour, filter, noise and cutout groups.
_GROUPS = {
    "b": dict(xflip=1, rotate90=1, xint=1),
    "g": dict(scale=1, rotate=1, aniso=1, xfrac=1),
    "c": dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1),
    "f": dict(imgfilter=1),
    "n": dict(noise=1),
    "c2": dict(cutout=1),
}
PRESETS = {
    "blit": ["b"], "geom": ["g"], "color": ["c"], "filter": ["f"], "noise": ["n"], "cutout": ["c2"],
    "bg": ["b", "g"], "bgc": ["b", "g", "c"], "bgcf": ["b", "g", "c", "f"], "bgcfn": ["b", "g", "c", "f", "n"],
    "bgcfnc": ["b", "g", "c", "f", "n", "c2"],
}


def presets(name: str) -> dict:
    """Constructor keyword arguments (multipliers) of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"aug.preset: unknown augmentation preset {name!r}; choose from {sorted(PRESETS)}")
    out = {}
    for group in PRESETS[name]:
        out.update(_GROUPS[group])
    return out


class AugmentPipe(torch.nn.Module):
    """The augmentation pipe: every transform of app. B, each applied to a sample with probability p * multiplier, in
    the paper's order (blit, geometric, colour, filter, noise, cutout). Differentiable to second order w.r.t. the
    images, so it can sit in front of D for every image D sees, R1 reals included. With `sync_free` (the default on
    a GPU) nothing in forward reads a value back from the device or copies a host number into a tensor: p is a
    device buffer, every "apply with probability p" is a per-sample torch.where, each stage transforms the whole
    batch and keeps the untouched samples bit for bit, and the geometric padding is fixed
    (augment_ops.geometric_margin). On a CPU, where a read costs nothing, the geometric and filter stages transform
    only the samples drawn for them, with the padding they need (the same images for the same draws, several times
    cheaper at small p). `p_host` is p as the host last set it (set_p; None when unknown): p_host == 0 skips the
    whole pipe."""
    def __init__(self, xflip=0, rotate90=0, xint=0, xint_max=0.125,
                 scale=0, rotate=0, aniso=0, xfrac=0, scale_std=0.2, rotate_max=1, aniso_std=0.2, xfrac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0,
                 brightness_std=0.2, contrast_std=0.5, hue_max=1, saturation_std=1,
                 imgfilter=0, imgfilter_bands=(1, 1, 1, 1), imgfilter_std=1,
                 noise=0, cutout=0, noise_std=0.1, cutout_size=0.5, sync_free=None):
        super().__init__()
        self.register_buffer("p", torch.zeros([]))  # overall strength; set by AdaptiveP or the config
        self.p_host = None
        self.sync_free = sync_free  # None: on every device but the CPU
        # Multipliers of p and the parameters' spreads (units: fractions of the image size, log2 units, radians/pi).
        self.xflip, self.rotate90, self.xint, self.xint_max = float(xflip), float(rotate90), float(xint), xint_max
        self.scale, self.rotate, self.aniso, self.xfrac = float(scale), float(rotate), float(aniso), float(xfrac)
        self.scale_std, self.rotate_max, self.aniso_std, self.xfrac_std = scale_std, rotate_max, aniso_std, xfrac_std
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.brightness_std, self.contrast_std = brightness_std, contrast_std
        self.hue_max, self.saturation_std = hue_max, saturation_std
        self.imgfilter, self.imgfilter_bands, self.imgfilter_std = float(imgfilter), list(imgfilter_bands), imgfilter_std
        self.noise, self.cutout, self.noise_std, self.cutout_size = float(noise), float(cutout), noise_std, cutout_size
        # Fixed filters and constants (not saved in checkpoints): sym6 around the resampling and its delay, the sym2
        # band-pass bank with the bands' expected power, the luma axis.
        self.register_buffer("hz_geom", upfirdn2d.setup_filter(ops.SYM6), persistent=False)
        self.hz_delay = ops.filter_delay(ops.SYM6)
        self.register_buffer("hz_bank", ops.bandpass_bank(ops.SYM2), persistent=False)
        self.register_buffer("band_power", torch.tensor(ops.BAND_EXPECTED_POWER), persistent=False)
        self.register_buffer("luma", ops.luma_axis(), persistent=False)
        self.last_geom = None  # the inverse matrices of the last geometric stage (for tests and visualisation)

    def set_p(self, p: float) -> None:
        """Set p from the host (a fill of the buffer, no copy); p_host remembers it for the p == 0 shortcut."""
        self.p.fill_(float(p))
        self.p_host = float(p)

    # A checkpoint's p enters the buffer; the host learns it with one read (at load time, not in the step).
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "p" in state_dict:
            self.p_host = float(self.p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Augment float images [N, C, H, W] (C = 1 or 3, values around [-1, 1]); p = 0 returns them untouched."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"AugmentPipe expects [N, 1 or 3, H, W] images, got {tuple(images.shape)}")
        self.last_geom = None
        if self.p_host == 0:
            return images
        # In the images' own precision, also under mixed-precision autocast (whose half-precision convs would
        # misplace the resampling and mix dtypes in the grid_sample backward).
        sync_free = self.sync_free if self.sync_free is not None else images.device.type != "cpu"
        with torch.autocast(device_type=images.device.type, enabled=False):
            p = self.p.to(torch.float32)
            x = self._blit(images, p)
            x = self._geometric(x, p, sync_free)
            x = self._color(x, p, sync_free)
            x = self._filter(x, p, sync_free)
            return self._noise_cutout(x, p)

    # A per-sample Bernoulli draw: true with probability `prob` (a device tensor).
    @staticmethod
    def _coin(n, prob, device):
        return torch.rand([n], device=device) < prob

    # Blit group (app. B): xflip (i ~ U{0,1}), rotate90 (k ~ U{0..3}), integer translation (U(-xint_max,
    # xint_max) of the size, rounded to pixels, reflected) -- exact pixel permutations.
    def _blit(self, x, p):
        n, _, h, w = x.shape
        dev = x.device
        if self.xflip > 0:
            i = torch.randint(0, 2, [n], device=dev)
            x = ops.xflip(x, (i == 1) & self._coin(n, p * self.xflip, dev))
        if self.rotate90 > 0:
            k = torch.randint(0, 4, [n], device=dev)
            x = ops.rotate90(x, torch.where(self._coin(n, p * self.rotate90, dev), k, 0))
        if self.xint > 0:
            t = (torch.rand([n, 2], device=dev) * 2 - 1) * self.xint_max
            t = torch.where(self._coin(n, p * self.xint, dev)[:, None], t, 0)
            x = ops.integer_translate(x, torch.round(t[:, 0] * w).long(), torch.round(t[:, 1] * h).long())
        return x

    # Geometric group (app. B), composed into one inverse matrix per sample and resampled once: isotropic scale
    # 2^N(0, scale_std); rotation U(-pi, pi) * rotate_max before and after the anisotropic scale, each with
    # probability 1 - sqrt(1 - p*rotate) so that either happens with p*rotate; anisotropic scale 2^N(0, aniso_std);
    # fractional translation N(0, xfrac_std) of the size. Samples without a transform keep their pixels.
    def _geometric(self, x, p, sync_free):
        if self.scale <= 0 and self.rotate <= 0 and self.aniso <= 0 and self.xfrac <= 0:
            return x
        n, _, h, w = x.shape
        dev = x.device
        G = torch.eye(3, device=dev).repeat(n, 1, 1)
        touched = torch.zeros([n], dtype=torch.bool, device=dev)
        one = torch.ones([n], device=dev)
        p_rot = 1 - (1 - (p * self.rotate).clamp(max=1)).clamp(min=0).sqrt()

        def rotate(G, touched):  # drawn twice: before and after the anisotropic scale
            theta = (torch.rand([n], device=dev) * 2 - 1) * math.pi * self.rotate_max
            m = self._coin(n, p_rot, dev)
            return G @ ops.rotate2d_inv(torch.where(m, theta, 0), n, dev), touched | m

        if self.scale > 0:
            s = torch.exp2(torch.randn([n], device=dev) * self.scale_std)
            m = self._coin(n, p * self.scale, dev)
            G = G @ ops.scale2d_inv(torch.where(m, s, one), torch.where(m, s, one), n, dev)
            touched |= m
        if self.rotate > 0:
            G, touched = rotate(G, touched)
        if self.aniso > 0:
            s = torch.exp2(torch.randn([n], device=dev) * self.aniso_std)
            m = self._coin(n, p * self.aniso, dev)
            G = G @ ops.scale2d_inv(torch.where(m, s, one), torch.where(m, 1 / s, one), n, dev)
            touched |= m
        if self.rotate > 0:
            G, touched = rotate(G, touched)
        if self.xfrac > 0:
            t = torch.randn([n, 2], device=dev) * self.xfrac_std
            m = self._coin(n, p * self.xfrac, dev)
            t = torch.where(m[:, None], t, 0)
            G = G @ ops.translate2d_inv(t[:, 0] * w, t[:, 1] * h, n, dev)
            touched |= m
        self.last_geom = G
        if sync_free:  # the whole batch, with the fixed margin
            y = ops.geometric_transform(x, G, self.hz_geom, delay=self.hz_delay)
            return torch.where(touched[:, None, None, None], y, x)
        idx = touched.nonzero()[:, 0]
        if idx.numel() == 0:
            return x
        whole = idx.numel() == n
        G_sel = G if whole else G.index_select(0, idx)
        margin = ops.needed_margin(G_sel, h, w, self.hz_geom.numel(), self.hz_delay)
        y = ops.geometric_transform(x if whole else x.index_select(0, idx), G_sel, self.hz_geom, margin,
                                    self.hz_delay)
        return y if whole else x.index_copy(0, idx, y)

    # Colour group (app. B), composed into one 4x4 matrix per sample: brightness + N(0, brightness_std), contrast
    # x 2^N(0, contrast_std), luma flip (i ~ U{0,1}), hue rotation U(-pi, pi) * hue_max about the luma axis,
    # saturation x 2^N(0, saturation_std) of the chroma; hue and saturation are skipped for one-channel images.
    # A sample without a colour transform passes through bit for bit.
    def _color(self, x, p, sync_free):
        if max(self.brightness, self.contrast, self.lumaflip, self.hue, self.saturation) <= 0:
            return x
        n, c = x.shape[0], x.shape[1]
        dev = x.device
        eye = torch.eye(4, device=dev).repeat(n, 1, 1)
        C = eye
        touched = torch.zeros([n], dtype=torch.bool, device=dev)
        v = self.luma

        def compose(C, touched, prob, mat):
            m = self._coin(n, prob, dev)
            return torch.where(m[:, None, None], mat, eye) @ C, touched | m

        if self.brightness > 0:
            b = torch.randn([n], device=dev) * self.brightness_std
            C, touched = compose(C, touched, p * self.brightness, ops.translate3d(b, n, dev))
        if self.contrast > 0:
            s = torch.exp2(torch.randn([n], device=dev) * self.contrast_std)
            C, touched = compose(C, touched, p * self.contrast, ops.scale3d(s, n, dev))
        if self.lumaflip > 0:
            i = torch.randint(0, 2, [n], device=dev).float()
            flip = eye - 2 * torch.outer(v, v)[None] * i[:, None, None]
            C, touched = compose(C, touched, p * self.lumaflip, flip)
        if self.hue > 0 and c > 1:
            theta = (torch.rand([n], device=dev) * 2 - 1) * math.pi * self.hue_max
            C, touched = compose(C, touched, p * self.hue, ops.rotate3d(v, theta, dev))
        if self.saturation > 0 and c > 1:
            s = torch.exp2(torch.randn([n], device=dev) * self.saturation_std)
            vv = torch.outer(v, v)[None]
            C, touched = compose(C, touched, p * self.saturation, vv + (eye - vv) * s[:, None, None])
        if not sync_free and not bool(touched.any()):
            return x
        return torch.where(touched[:, None, None, None], ops.apply_color(x, C), x)

    # Image-space filtering (app. B): each of the four bands gets, with probability p * imgfilter * band weight,
    # a gain 2^N(0, imgfilter_std); the gains are then normalised so that the expected image power is unchanged.
    def _filter(self, x, p, sync_free):
        if self.imgfilter <= 0:
            return x
        n, dev = x.shape[0], x.device
        gains = torch.ones([n, 4], device=dev)
        for b, weight in enumerate(self.imgfilter_bands):
            if weight > 0:
                g = torch.exp2(torch.randn([n], device=dev) * self.imgfilter_std)
                gains[:, b] = torch.where(self._coin(n, p * self.imgfilter * weight, dev), g, 1)
        touched = (gains != 1).any(dim=1)
        gains = gains / (gains.square() * self.band_power).sum(dim=1, keepdim=True).sqrt()
        f = gains @ self.hz_bank  # [n, taps]: one zero-phase 1-D filter per sample
        if sync_free:
            return torch.where(touched[:, None, None, None], ops.filter_per_sample(x, f), x)
        idx = touched.nonzero()[:, 0]
        if idx.numel() == 0:
            return x
        return x.index_copy(0, idx, ops.filter_per_sample(x.index_select(0, idx), f.index_select(0, idx)))

    # Additive noise N(0, sigma^2) with sigma = |N(0, noise_std^2)| per sample, then cutout (app. B): a zero
    # box of cutout_size times the image at a uniformly random centre.
    def _noise_cutout(self, x, p):
        n, dev = x.shape[0], x.device
        if self.noise > 0:
            sigma = torch.randn([n], device=dev).abs() * self.noise_std
            sigma = torch.where(self._coin(n, p * self.noise, dev), sigma, 0).to(x.dtype)
            x = x + torch.randn_like(x) * sigma[:, None, None, None]
        if self.cutout > 0:
            centre = torch.rand([n, 2], device=dev)
            x = ops.cutout(x, centre[:, 0], centre[:, 1], self.cutout_size, self._coin(n, p * self.cutout, dev))
        return x


def make_augment_pipe(cfg) -> Optional[AugmentPipe]:
    """The pipe for an `aug` config, with pipe.p set to cfg.p; None for mode 'noaug' (then D sees raw images)."""
    mode = cfg.mode
    if mode not in ("ada", "fixed", "noaug"):
        raise ConfigError(f"aug.mode must be 'ada', 'fixed' or 'noaug', got {mode!r}")
    if mode == "noaug":
        return None
    pipe = AugmentPipe(**presets(cfg.preset), sync_free=cfg.sync_free)
    pipe.set_p(float(cfg.p))
    return pipe


class AdaptiveP:
    """The ADA heuristic (paper §3): r_t = E[sign(D(augmented reals))] over every accumulation round and rank of the
    last `interval` minibatches; then p += sign(r_t - target) * batch_size * interval / (ada_kimg * 1000), clamped
    to [0, 1], so p can cross 0 -> 1 in ada_kimg thousand images. `batch_size` is the global minibatch (all ranks).
    p itself is the pipe's (held once, there); the sum of signs stays on the device (no read per round), and the
    training loop reads it with its other per-step values (`pending`, then `update` with the sums over ranks)."""
    def __init__(self, pipe: AugmentPipe, target: float = 0.6, interval: int = 4, ada_kimg: float = 500,
                 batch_size: int = 64):
        self.pipe, self.target, self.interval = pipe, float(target), int(interval)
        self.ada_kimg, self.batch_size = float(ada_kimg), int(batch_size)
        self.r_t = float("nan")  # the last measured r_t (nan before the first update)
        self._acc_sum = 0.0  # sum of signs since the last update: a Python float until a device tensor takes over
        self._acc_count = 0  # number of logits since the last update (known on the host)

    @property
    def p(self) -> float:
        """Current p: the pipe's, as the host set it (its buffer holds the same value in float32)."""
        return self.pipe.p_host if self.pipe.p_host is not None else float(self.pipe.p)

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Add D's raw logits on augmented reals (any shape) to the statistic; call after every D-main round. No sync.
        """
        d = real_logits.detach()
        signs = torch.sign(d).sum(dtype=torch.float64)
        if not isinstance(self._acc_sum, torch.Tensor) or self._acc_sum.device != d.device:
            self._acc_sum = torch.zeros([], dtype=torch.float64, device=d.device) + self._acc_sum
        self._acc_sum += signs
        self._acc_count += d.numel()

    def due(self, batch_idx: int) -> bool:
        """Whether p is updated after minibatch `batch_idx` (0-based; the same on every rank)."""
        return (batch_idx + 1) % self.interval == 0

    def pending(self) -> list:
        """This rank's [sum of signs, count] since the last update, for the caller's sum over ranks."""
        return [self._acc_sum, self._acc_count]

    def update(self, total: float, count: float) -> bool:
        """Update p from the statistic summed over ranks (`pending` of every rank) and reset it. Returns True when p
        was updated (False when nothing was accumulated)."""
        if isinstance(self._acc_sum, torch.Tensor):
            self._acc_sum.zero_()
        else:
            self._acc_sum = 0.0
        self._acc_count = 0
        if count == 0:
            return False
        self.r_t = total / count
        adjust = float(np.sign(self.r_t - self.target)) * self.batch_size * self.interval / (self.ada_kimg * 1000)
        self.pipe.set_p(min(max(self.p + adjust, 0.0), 1.0))
        return True

    def state_dict(self) -> dict:
        """Checkpoint state: p as the host holds it (the pipe's buffer is float32), the last r_t and the pending
        accumulators."""
        return {"p": self.p, "r_t": self.r_t, "acc_sum": float(self._acc_sum), "acc_count": float(self._acc_count)}

    def load_state_dict(self, state: dict) -> None:
        self.pipe.set_p(float(state["p"]))
        self.r_t = float(state.get("r_t", float("nan")))
        self._acc_sum = float(state.get("acc_sum", 0.0))
        self._acc_count = int(state.get("acc_count", 0))


def make_adaptive_p(cfg, pipe: Optional[AugmentPipe], batch_size: int,
                    from_weights: bool = False) -> Optional[AdaptiveP]:
    """The heuristic for an `aug` config in mode 'ada' (None otherwise); `from_weights` (a run starting from another
    run's weights, not a full resume) takes the faster ada_kimg_resume."""
    if pipe is None or cfg.mode != "ada":
        return None
    kimg = cfg.ada_kimg_resume if from_weights else cfg.ada_kimg
    return AdaptiveP(pipe, target=cfg.ada_target, interval=cfg.ada_interval, ada_kimg=kimg,
                     batch_size=batch_size)
