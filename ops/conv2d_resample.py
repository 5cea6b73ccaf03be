"""conv2d_resample: 2-D convolution combined with FIR up/downsampling, done in the cheapest equivalent order."""
from typing import Optional

import torch
import torch.nn.functional as F

from ops.upfirdn2d import filter_size, parse_padding, upfirdn2d


# conv2d that correlates (flip_weight=True, PyTorch's convention) or truly convolves (False); optionally transposed.
def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


# Add the resampling filter's own padding to [px0, px1, py0, py1], so that up/downsampling stays centred.
def _filter_padding(padding, f, up: int, down: int):
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = parse_padding(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    return px0, px1, py0, py1


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, up: int = 1, down: int = 1,
                    padding=0, groups: int = 1, flip_weight: bool = True, flip_filter: bool = False) -> torch.Tensor:
    """Convolve x [N, C, H, W] with w [O, C/groups, kh, kw], upsampling by `up` before and/or downsampling by
    `down` after, with FIR filter f. The result equals: upfirdn2d(x, f, up, padding) -> conv ->
    upfirdn2d(f, down), with the filter's own padding added so that a k x k convolution with padding k//2 maps H
    to H*up/down."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d_resample: expected 4-D x and w, got {tuple(x.shape)} and {tuple(w.shape)}")
    if up > 1 or down > 1:
        if f is None:
            raise ValueError("conv2d_resample: a resampling filter is required when up or down > 1")
    out_channels, in_per_group, kh, kw = w.shape
    px0, px1, py0, py1 = _filter_padding(padding, f, up, down)

    # 1x1 kernel with downsampling: filter and decimate first (fewer pixels to convolve).
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)

    # 1x1 kernel with upsampling: convolve first (fewer pixels), then upsample.
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2, flip_filter=flip_filter)

    # Downsampling only: filter, then a strided convolution computes only the kept outputs.
    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    # Upsampling: a transposed strided convolution (zero insertion + convolution in one), then the filter.
    if up > 1:
        if groups == 1:
            wt = w.transpose(0, 1)
        else:
            wt = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
            wt = wt.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        px0, px1 = px0 - (kw - 1), px1 - (kw - up)
        py0, py1 = py0 - (kh - 1), py1 - (kh - up)
        # Crop symmetrically inside the transposed convolution where both sides crop; the rest in upfirdn2d.
        pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        # conv_transpose2d truly convolves; to correlate (flip_weight=True) the taps must be flipped.
        x = _conv(x, wt, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up ** 2,
                      flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x

    # No resampling: a plain convolution when the padding is symmetric and non-negative.
    if up == 1 and down == 1 and px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)

    return conv2d_resample_ref(x, w, f, up, down, [px0, px1, py0, py1], groups, flip_weight, flip_filter,
                               filter_padded=True)


def conv2d_resample_ref(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False,
                        filter_padded=False):
    """The general (slow) order: upsample with padding, convolve, then filter and downsample. `filter_padded`
    means the filter's own padding is already included in `padding`."""
    px0, px1, py0, py1 = parse_padding(padding) if filter_padded else _filter_padding(padding, f, up, down)
    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up ** 2,
                  flip_filter=flip_filter)
    x = _conv(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x
