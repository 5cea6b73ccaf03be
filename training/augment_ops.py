"""Building blocks of the ADA pipeline (Karras et al. 2020, appendix B): wavelets, blits, resampling, colour, filters."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from ops import upfirdn2d
from ops.filters import SYM2, SYM6  # noqa: F401 - ADA's filter taps, re-exported
from ops.grid_sample_gradfix import grid_sample

# Expected fraction of image power in the four filter bands (low to high): natural images have ~1/f^2 spectra,
# i.e. about equal power per octave, and the lowest band holds DC plus every octave below pi/8 (app. B).
BAND_EXPECTED_POWER = [10 / 13, 1 / 13, 1 / 13, 1 / 13]


def reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map integer indices onto [0, n) by mirror reflection without repeating the edge (d c b | a b c d | c b a), for
    any distance outside the image (the pattern repeats with period 2(n-1))."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def reflect_pad(x: torch.Tensor, px0: int, px1: int, py0: int, py1: int) -> torch.Tensor:
    """Reflect-pad [N, C, H, W] by arbitrary amounts: torch's native 'reflect' (fast) when every pad is below the size,
    else index gathering with reflect_index (the same pattern, any distance)."""
    h, w = x.shape[2], x.shape[3]
    if max(px0, px1) < w and max(py0, py1) < h:
        return F.pad(x, [px0, px1, py0, py1], mode="reflect")
    ix = reflect_index(torch.arange(-px0, w + px1, device=x.device), w)
    iy = reflect_index(torch.arange(-py0, h + py1, device=x.device), h)
    return x.index_select(3, ix).index_select(2, iy)


def xflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Blit xflip: mirror the samples where `flip` [N] is true (exact pixel permutation)."""
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def rotate90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Blit rotate90: rotate sample n by k[n] quarter turns (torch.rot90 convention; square images only)."""
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"rotate90 needs square images, got {tuple(x.shape[2:])}")
    out = x
    for j in (1, 2, 3):
        out = torch.where((k == j)[:, None, None, None], torch.rot90(x, j, dims=(2, 3)), out)
    return out


def integer_translate(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Blit integer translation: out[n, :, y, x] = in[n, :, reflect(y - ty[n]), reflect(x - tx[n])] (exact gathers).
    """
    n, c, h, w = x.shape
    ix = reflect_index(torch.arange(w, device=x.device)[None, :] - tx[:, None], w)
    iy = reflect_index(torch.arange(h, device=x.device)[None, :] - ty[:, None], h)
    x = x.gather(3, ix[:, None, None, :].expand(n, c, h, w))
    return x.gather(2, iy[:, None, :, None].expand(n, c, h, w))


# Stack per-sample matrix entries (tensors [N] or numbers) given row by row into [N, R, R]. Numbers enter as
# `zeros + number` (a fill with the number as a kernel argument): no host-to-device copy, nothing read back.
def _matrix(rows, n, device, dtype):
    zeros = torch.zeros([n], device=device, dtype=dtype)
    flat = [e.to(dtype).expand(n) if isinstance(e, torch.Tensor) else zeros + e for row in rows for e in row]
    return torch.stack(flat, dim=1).reshape(n, len(rows), len(rows))


def translate2d_inv(tx, ty, n, device, dtype=torch.float32):
    """Inverse 2-D similarity blocks (output -> input coordinates) for the geometric group (app. B): the pipeline
    composes G = G @ inverse(op) in application order, so G maps an output pixel to where it samples the input."""
    return _matrix([[1, 0, -tx], [0, 1, -ty], [0, 0, 1]], n, device, dtype)


def scale2d_inv(sx, sy, n, device, dtype=torch.float32):
    return _matrix([[1 / sx, 0, 0], [0, 1 / sy, 0], [0, 0, 1]], n, device, dtype)


def rotate2d_inv(theta, n, device, dtype=torch.float32):
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, s, 0], [-s, c, 0], [0, 0, 1]], n, device, dtype)


def filter_delay(f) -> float:
    """Centroid offset of a 1-D filter from its geometric centre, in taps: symlets are only nearly linear-phase, and
    this is their delay at low frequencies, which the resampler compensates in its sampling grid."""
    f = np.asarray(f, dtype=np.float64)
    return float((np.arange(len(f)) * f).sum() / f.sum() - (len(f) - 1) / 2)


def geometric_margin(h: int, w: int) -> tuple:
    """The reflect padding around the geometric resampling (pixels: x0, x1, y0, y1): NVIDIA's rule caps the margin that
    the transformed corners need at the image size minus one; a fixed margin at that cap needs no read of the random
    transforms (a host sync on a GPU) and covers everything the capped rule covers. Sample points beyond it read
    zeros, as there."""
    return w - 1, w - 1, h - 1, h - 1


def needed_margin(G: torch.Tensor, h: int, w: int, taps: int, delay: float) -> tuple:
    """The margin (x0, x1, y0, y1) that the matrices G actually need: where the extreme output points land in the
    input, plus the up-filter and bilinear support, capped as geometric_margin. Reads G back (for the CPU path,
    where that is free): the same images as the fixed margin, on a smaller padded image."""
    q = taps // 2 - 1
    x0, x1 = -q / 2 - 0.25 - delay / 2 - (w - 1) / 2, (2 * w + q - 1) / 2 - 0.25 - delay / 2 - (w - 1) / 2
    y0, y1 = -q / 2 - 0.25 - delay / 2 - (h - 1) / 2, (2 * h + q - 1) / 2 - 0.25 - delay / 2 - (h - 1) / 2
    corners = torch.tensor([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], dtype=torch.float64)
    pc = torch.einsum("nij,kj->nki", G[:, :2, :].detach().to("cpu", torch.float64), corners)  # [N, 4, 2]
    lo = (pc.amin(dim=(0, 1)) + torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)).tolist()
    hi = (pc.amax(dim=(0, 1)) + torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)).tolist()
    support = taps / 4 + 1
    cap = geometric_margin(h, w)
    need = (support - lo[0], hi[0] + support - (w - 1), support - lo[1], hi[1] + support - (h - 1))
    return tuple(min(max(0, math.ceil(m)), c) for m, c in zip(need, cap))


def geometric_transform(x: torch.Tensor, G: torch.Tensor, hz: torch.Tensor, margin=None, delay=None) -> torch.Tensor:
    """Apply the inverse affine matrices G [N, 3, 3] (output -> input, pixel units, origin at the image centre, x
    right, y down) to x [N, C, H, W]: reflect-pad by `margin` (x0, x1, y0, y1; default geometric_margin), upsample
    2x with the wavelet low-pass `hz` (1-D, even length), sample bilinearly on a 2x output grid, low-pass +
    downsample 2x with the time-reversed filter (an orthonormal wavelet makes up -> down an exact identity), output
    H x W (app. B). `delay` is filter_delay(hz) (computed once by the caller, so that nothing here reads the filter
    back from the device)."""
    if x.dtype in (torch.float16, torch.bfloat16):  # half-precision grid coordinates would be off by ~0.1 px
        return geometric_transform(x.float(), G, hz, margin, delay).to(x.dtype)
    n, c, h, w = x.shape
    taps = hz.numel()
    if delay is None:
        delay = filter_delay(hz.detach().cpu().numpy())
    px0, px1, py0, py1 = margin if margin is not None else geometric_margin(h, w)
    q = taps // 2 - 1  # extra 2x samples each side so that the 'valid' downsampling returns exactly H x W
    G = G.to(torch.float64)
    # Output 2x grid in centred low-res pixel units; sample k sits at k/2 - 1/4, shifted by the filter delay.
    kx = torch.arange(-q, 2 * w + q, device=x.device, dtype=torch.float64)
    ky = torch.arange(-q, 2 * h + q, device=x.device, dtype=torch.float64)
    ux = kx / 2 - 0.25 - delay / 2 - (w - 1) / 2
    uy = ky / 2 - 0.25 - delay / 2 - (h - 1) / 2
    xp = reflect_pad(x, px0, px1, py0, py1)
    up = upfirdn2d.upsample2d(xp, hz.to(x.dtype))
    # Input position P (centred) -> padded low-res index -> 2x index (inverse of the up-filter delay) -> [-1, 1].
    pts = torch.stack(torch.broadcast_tensors(ux[None, :], uy[:, None], torch.ones_like(uy)[:, None]), dim=-1)
    pos = torch.einsum("nij,hwj->nhwi", G[:, :2, :], pts)
    kin_x = 2 * (pos[..., 0] + (w - 1) / 2 + px0) + 0.5 + delay
    kin_y = 2 * (pos[..., 1] + (h - 1) / 2 + py0) + 0.5 + delay
    grid = torch.stack([(2 * kin_x + 1) / up.shape[3] - 1, (2 * kin_y + 1) / up.shape[2] - 1], dim=-1)
    y = grid_sample(up, grid.to(x.dtype))
    return upfirdn2d.upfirdn2d(y, hz.to(x.dtype), down=2, flip_filter=True)


def luma_axis(device=None, dtype=torch.float32):
    """The luma axis v = [1, 1, 1, 0] / sqrt(3) in homogeneous RGB (app. B: luma flip, hue and saturation act around
    it); the pipe keeps it as a buffer, made once."""
    return torch.tensor([1, 1, 1, 0], device=device, dtype=dtype) / math.sqrt(3)


def translate3d(t, n, device, dtype=torch.float32):
    """Per-sample 4x4 colour blocks (homogeneous RGB, acting on column vectors)."""
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n, device, dtype)


def scale3d(s, n, device, dtype=torch.float32):
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n, device, dtype)


def rotate3d(v, theta, device, dtype=torch.float32):
    """Rotation by theta [N] around the unit axis v (first three entries), by Rodrigues' formula."""
    n = theta.shape[0]
    vx, vy, vz = v[0], v[1], v[2]
    c, s = torch.cos(theta), torch.sin(theta)
    cc = 1 - c
    return _matrix([[vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                    [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
                    [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
                    [0, 0, 0, 1]], n, device, dtype)


def apply_color(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Apply colour matrices M [N, 4, 4] to x: RGB uses the full affine map; a one-channel image is treated as grey (r
    = g = b), mapped, and averaged back to one channel."""
    M = M.to(x.dtype)
    if x.shape[1] == 3:
        return torch.einsum("nij,njhw->nihw", M[:, :3, :3], x) + M[:, :3, 3, None, None]
    if x.shape[1] == 1:
        gain = M[:, :3, :3].sum(dim=2).mean(dim=1)
        bias = M[:, :3, 3].mean(dim=1)
        return x * gain[:, None, None, None] + bias[:, None, None, None]
    raise ValueError(f"colour transforms need 1 or 3 channels, got {x.shape[1]}")


def bandpass_bank(h) -> torch.Tensor:
    """Four zero-phase 1-D band filters (low to high: [0, pi/8], [pi/8, pi/4], [pi/4, pi/2], [pi/2, pi]) that sum to a
    unit impulse, built from the wavelet `h`: its autocorrelation a is a half-band low-pass (orthonormality makes
    a[2k] = 0 for k != 0), dilating a by 2 and 4 and cascading halves the cut-off, and the bands are differences."""
    h = np.asarray(h, dtype=np.float64)
    a = np.convolve(h, h[::-1])
    a = a / a.sum()

    def dilate(f, s):
        out = np.zeros((len(f) - 1) * s + 1)
        out[::s] = f
        return out

    lows = [a, np.convolve(a, dilate(a, 2))]
    lows.append(np.convolve(lows[1], dilate(a, 4)))
    size = len(lows[2])
    centre = np.zeros(size)
    centre[size // 2] = 1
    lows = [np.pad(f, (size - len(f)) // 2) for f in lows]
    bands = [lows[2], lows[1] - lows[2], lows[0] - lows[1], centre - lows[0]]
    return torch.tensor(np.stack(bands), dtype=torch.float32)


def filter_per_sample(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Filter sample n of x with its own symmetric odd-length 1-D filter f[n] along x and then y (reflect padding)."""
    n, c, h, w = x.shape
    r = f.shape[1] // 2
    x = reflect_pad(x, r, r, r, r).reshape(1, n * c, h + 2 * r, w + 2 * r)
    k = f.to(x.dtype).repeat_interleave(c, dim=0)
    x = F.conv2d(x, k[:, None, None, :], groups=n * c)
    x = F.conv2d(x, k[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


def cutout(x: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: float, apply: torch.Tensor) -> torch.Tensor:
    """Cutout: zero a box of `size` (fraction of the image) centred at (cx, cy) [N] (fractions), where `apply` [N]."""
    n, _, h, w = x.shape
    gx = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w
    gy = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h
    inside_x = (gx[None, :] - cx[:, None]).abs() < size / 2
    inside_y = (gy[None, :] - cy[:, None]).abs() < size / 2
    box = inside_y[:, :, None] & inside_x[:, None, :] & apply[:, None, None]
    return x * (~box).to(x.dtype)[:, None, :, :]
