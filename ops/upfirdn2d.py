"""upfirdn2d: upsample by zero insertion, pad, FIR-filter and downsample an image batch; reference and fused."""
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ops import dispatch

Padding = Union[int, Sequence[int]]

# CPU kernel choice: 0 = fastest, 1 = direct 2-D loops, 2 = the GPU's general kernel emulated, 3 = the GPU's tiled
# kernels emulated (the variant CUDA would pick); tests set it.
upfirdn2d_cpu_path = 0


def parse_padding(padding: Padding):
    """`padding` as [px0, px1, py0, py1] (int: the same on every side; two values: x and y)."""
    if isinstance(padding, (int, np.integer)):
        padding = [padding, padding]
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        px, py = padding
        padding = [px, px, py, py]
    if len(padding) != 4:
        raise ValueError(f"upfirdn2d: padding must be an int or 2 or 4 ints, got {padding}")
    return padding


# Normalize up/down factors to (x, y).
def _parse_scaling(s):
    if isinstance(s, (int, np.integer)):
        s = [s, s]
    sx, sy = int(s[0]), int(s[1])
    if sx < 1 or sy < 1:
        raise ValueError(f"upfirdn2d: scaling factors must be >= 1, got {s}")
    return sx, sy


# The [1, 1] identity filter of each device, made once (not a fill kernel per pad-only call), as a normal tensor
# even when first asked for under inference mode (autograd may save it later).
_identity = {}


def _identity_filter(device):
    f = _identity.get(device)
    if f is None:
        with torch.inference_mode(False):
            f = _identity[device] = torch.ones([1, 1], dtype=torch.float32, device=device)
    return f


def filter_size(f: Optional[torch.Tensor]):
    """Filter size (width, height) of a 1-D (separable) or 2-D filter; None means the identity filter [1]."""
    if f is None:
        return 1, 1
    if f.ndim == 1:
        return f.shape[0], f.shape[0]
    return f.shape[1], f.shape[0]


def setup_filter(f=None, device=torch.device("cpu"), normalize=True, flip_filter=False, gain=1, separable=None):
    """Build a filter tensor from taps: normalized to unit sum, optionally flipped, scaled by gain**(ndim/2); 1-D
    taps become the 2-D outer product unless `separable` (default: separable only for 8 taps or more)."""
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[np.newaxis]
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f"setup_filter: expected 1-D or 2-D taps, got shape {tuple(f.shape)}")
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def upfirdn2d(x: torch.Tensor, f: Optional[torch.Tensor], up=1, down=1, padding: Padding = 0,
              flip_filter: bool = False, gain: float = 1, impl: Optional[str] = None) -> torch.Tensor:
    """Pad/crop, filter and downsample; up/down are ints or (x, y); `f` true-convolves unless `flip_filter`."""
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d: expected x of shape [N, C, H, W], got {tuple(x.shape)}")
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = parse_padding(padding)
    if f is None:
        f = _identity_filter(x.device)
    fw, fh = filter_size(f)
    out_w = (x.shape[3] * upx + px0 + px1 - fw) // downx + 1
    out_h = (x.shape[2] * upy + py0 + py1 - fh) // downy + 1
    if out_w < 1 or out_h < 1:
        raise ValueError(f"upfirdn2d: output would be empty for input {tuple(x.shape)}, filter {tuple(f.shape)}, "
                         f"up {up}, down {down}, padding {padding}")
    args = (x, f, (upx, upy), (downx, downy), (px0, px1, py0, py1), flip_filter, gain)
    # The kernel takes a filter on x's device that needs no gradient; anything else goes to the reference.
    takes = f.device == x.device and not (f.requires_grad and torch.is_grad_enabled())
    ext = dispatch.kernel("upfirdn2d", x, impl, upfirdn2d_ref, upfirdn2d_fused, args, takes=takes, linear=True,
                          variant=f"up{upx}x{upy} down{downx}x{downy} f{fw}x{fh}{'' if f.ndim == 2 else ' sep'}")
    if ext is not None:
        return upfirdn2d_fused(ext, *args)
    return upfirdn2d_ref(*args)


def upfirdn2d_ref(x, f, up, down, padding, flip_filter=False, gain=1):
    """The reference path: zero insertion by reshape, pad (negative = crop), depthwise conv2d, strided slice."""
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, padding
    n, c, h, w = x.shape
    if upx > 1 or upy > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
        x = x.reshape(n, c, h * upy, w * upx)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    f = f.to(x.dtype)
    f = f * (gain ** (f.ndim / 2))
    if not flip_filter:  # conv2d correlates; flipping the taps makes it a true convolution.
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), groups=c)
    else:
        x = F.conv2d(x, f[None, None, None, :].repeat(c, 1, 1, 1), groups=c)
        x = F.conv2d(x, f[None, None, :, None].repeat(c, 1, 1, 1), groups=c)
    return x[:, :, ::downy, ::downx]


def filter2d(x, f, padding: Padding = 0, flip_filter=False, gain=1, impl=None):
    """Filter without resampling; the padding keeps the size by default ("same" for odd and even taps alike)."""
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    p = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding: Padding = 0, flip_filter=False, gain=1, impl=None):
    """Upsample by `up` with filter f; output size in*up (+ padding); gain up**2 keeps the mean brightness."""
    upx, upy = _parse_scaling(up)
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    p = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding: Padding = 0, flip_filter=False, gain=1, impl=None):
    """Downsample by `down` with filter f; output size in/down (+ padding)."""
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    p = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2, py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


# One kernel call; the kernels read a channels-last input in place and write a channels-last output, as the
# reference gives.
def _upfirdn2d_call(ext, x, f, up, down, padding, flip, gain):
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, padding
    return ext.upfirdn2d(x, f, upx, upy, downx, downy, px0, px1, py0, py1, flip, gain,
                         upfirdn2d_cpu_path if x.device.type == "cpu" else 0)


# upfirdn2d in one kernel pass; the backward is the same op with up/down swapped, the filter flipped and the
# padding mirrored, so it is differentiable to any order.
class _UpFirDn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, ext, up, down, padding, flip, gain):
        y = _upfirdn2d_call(ext, x, f, up, down, padding, flip, gain)
        ctx.save_for_backward(f)
        ctx.args = (ext, up, down, padding, flip, gain, x.shape[2], x.shape[3])
        return y

    @staticmethod
    def backward(ctx, gy):
        (f,) = ctx.saved_tensors
        ext, (upx, upy), (downx, downy), (px0, px1, py0, py1), flip, gain, h, w = ctx.args
        fw, fh = filter_size(f)
        oh, ow = gy.shape[2], gy.shape[3]
        padding = (fw - 1 - px0, w * upx - ow * downx + px0 - upx + 1,
                   fh - 1 - py0, h * upy - oh * downy + py0 - upy + 1)
        args = ((downx, downy), (upx, upy), padding, not flip, gain)
        if torch.is_grad_enabled():  # create_graph: keep the gradient differentiable
            gx = _UpFirDn2d.apply(gy, f, ext, *args)
        else:
            gx = _upfirdn2d_call(ext, gy, f, *args)
        return gx, None, None, None, None, None, None, None


def upfirdn2d_fused(ext, x, f, up, down, padding, flip_filter=False, gain=1):
    """upfirdn2d by the kernel of extension `ext` (from ops.dispatch.kernel, which checked that it takes these
    arguments), with the reference signature after it (parsed up, down and padding)."""
    args = (tuple(up), tuple(down), tuple(padding), bool(flip_filter), float(gain))
    if torch.is_grad_enabled() and x.requires_grad:
        return _UpFirDn2d.apply(x, f, ext, *args)
    return _upfirdn2d_call(ext, x, f, *args)  # nothing to differentiate: skip the autograd Function
