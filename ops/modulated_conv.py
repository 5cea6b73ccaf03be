"""Modulated convolution (StyleGAN2, Karras et al. 2020, eq. 1-3): per-sample weight modulation and demodulation."""
from typing import Optional

import torch

from ops.conv2d_resample import conv2d_resample


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, noise: Optional[torch.Tensor] = None,
                     up: int = 1, down: int = 1, padding: int = 0, resample_filter: Optional[torch.Tensor] = None,
                     demodulate: bool = True, flip_weight: bool = True, fused_modconv: bool = True) -> torch.Tensor:
    """Convolve each sample with w'_{ijk} = s_i * w_{ijk} (eq. 1), demodulated by 1/sqrt(sum_{i,k} w'^2 + eps)
    (eq. 3), plus optional noise. `fused_modconv` folds the batch into groups of one grouped convolution;
    otherwise the styles scale the activations and demodulation scales the output, which gives the same result."""
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (batch_size, in_channels):
        raise ValueError(f"modulated_conv2d: styles {tuple(styles.shape)} do not match [batch {batch_size}, "
                         f"in_channels {in_channels}]")

    # In reduced precision, pre-normalize weight and styles so that the products below cannot overflow; the
    # demodulation removes the scale again, so the result is unchanged.
    if x.dtype in (torch.float16, torch.bfloat16) and demodulate:
        weight = weight * (1 / (in_channels * kh * kw) ** 0.5 / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)  # [N, O, I, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N, O]

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight)
        if demodulate and noise is not None:
            # x * dcoefs + noise in one op.
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        if noise is not None:
            return x.add(noise.to(x.dtype))
        return x

    if demodulate:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                        groups=batch_size, flip_weight=flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x.add(noise.to(x.dtype))
    return x
