"""Building blocks shared by G and D: equalized-LR FC and conv layers, the mapping network, per-block helpers."""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from networks.sn import register_sn_buffers, sn_weight
from ops.bias_act import activation_funcs, bias_act
from ops.conv2d_resample import conv2d_resample
from ops.upfirdn2d import setup_filter


def check_stage(resolution, alpha, block_resolutions, who: str) -> tuple:
    """Check a progressive-growing stage (Karras et al. 2018, sec. 3) of network `who` ('G' or 'D'): a block
    resolution among `block_resolutions` and a fade-in weight in [0, 1]; returns them as (int, float)."""
    if int(resolution) not in block_resolutions:
        raise ValueError(f"{who}: stage resolution must be one of {block_resolutions}, got {resolution}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{who}: stage fade alpha must be in [0, 1], got {alpha}")
    return int(resolution), float(alpha)


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """Feature channels at resolution `res` (StyleGAN2-ADA's rule): min(channel_base / res, channel_max)."""
    return min(channel_base // res, channel_max)


def block_dtype(use_fp16: bool, x: Optional[torch.Tensor], force_fp32: bool) -> torch.dtype:
    """The dtype a G or D block computes in: float16 for the highest `num_fp16_res` resolutions (`use_fp16`),
    on CUDA only and unless `force_fp32`; float32 otherwise."""
    if use_fp16 and not force_fp32 and x is not None and x.device.type == "cuda":
        return torch.float16
    return torch.float32


def block_memory_format(dtype: torch.dtype) -> torch.memory_format:
    """The memory format of a block's activations: channels-last where it computes in float16 (as NVIDIA's fp16
    layers: cuDNN's tensor-core convolutions work on NHWC and would otherwise transpose every activation), else
    the default layout. G's and D's blocks look it up here at call time (`layers.block_memory_format`)."""
    return torch.channels_last if dtype == torch.float16 else torch.contiguous_format


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale by the inverse root-mean-square over `dim` (the "pixel norm" applied to z and embedded labels)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class FullyConnectedLayer(nn.Module):
    """Fully connected layer with equalized learning rate (Karras et al. 2018, sec. 4.1): weights stored as
    N(0, 1/lr_multiplier^2) and scaled at run time by lr_multiplier / sqrt(fan_in). With `sn`, spectral
    normalization (Miyato et al. 2018, eq. 8) replaces that scaling: W_SN = W / sigma(W)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0, sn: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.sn = sn
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = 1.0 if sn else lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        if sn:
            register_sn_buffers(self, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in_features] -> [N, out_features]."""
        if self.sn:
            w = sn_weight(self.weight, self.sn_u, self.sn_v, update=self.training).to(x.dtype)
        else:
            w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None and self.bias_gain != 1:
            b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.to(x.dtype).unsqueeze(0), x, w.t())
        x = x.matmul(w.t())
        # The bias in the product's dtype (bf16/fp16 under autocast, whatever the input's), so that the fused
        # bias_act gets one dtype.
        return bias_act(x, None if b is None else b.to(x.dtype), act=self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"
                + (", sn=True" if self.sn else ""))


class Conv2dLayer(nn.Module):
    """Convolution with equalized learning rate, optional FIR up/downsampling, activation and output clamp. With
    `sn`, W_SN = W / sigma(W) (Miyato et al. 2018, eq. 8; W as [out, in*k*k]) replaces the 1/sqrt(fan_in)
    scaling."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1, resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, channels_last: bool = False, sn: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.sn = sn
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1.0 if sn else 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = activation_funcs[activation].def_gain
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size])
                                   .to(memory_format=memory_format))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        if sn:
            register_sn_buffers(self, self.weight)

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        """x [N, in_channels, H, W] -> [N, out_channels, H * up / down, W * up / down]; `gain` scales the
        activation's gain and clamp."""
        if self.sn:
            w = sn_weight(self.weight, self.sn_u, self.sn_v, update=self.training).to(x.dtype)
        else:
            w = self.weight.to(x.dtype) * self.weight_gain
        flip_weight = self.up == 1  # Transposed convolution truly convolves; keep the tap order consistent.
        x = conv2d_resample(x, w, f=self.resample_filter.to(x.dtype), up=self.up, down=self.down,
                            padding=self.padding, flip_weight=flip_weight)
        b = self.bias.to(x.dtype) if self.bias is not None else None  # the conv output's dtype (autocast: bf16/fp16)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, b, act=self.activation, gain=act_gain, clamp=act_clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, activation={self.activation}, "
                f"up={self.up}, down={self.down}" + (", sn=True" if self.sn else ""))


class MappingNetwork(nn.Module):
    """Mapping network f: Z -> W (StyleGAN, sec. 2): normalized z, optionally concatenated with an embedded label,
    through `num_layers` FC layers with lr multiplier 0.01; tracks w_avg for the truncation trick. `sn`:
    spectrally normalized FC layers (Miyato et al. 2018)."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: Optional[int], num_layers: int = 8,
                 embed_features: Optional[int] = None, layer_features: Optional[int] = None,
                 activation: str = "lrelu", lr_multiplier: float = 0.01, w_avg_beta: Optional[float] = 0.995,
                 sn: bool = False):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features, sn=sn)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier, sn=sn)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z, c, truncation_psi: float = 1, truncation_cutoff: Optional[int] = None,
                update_emas: bool = False) -> torch.Tensor:
        """w [N, w_dim], or ws [N, num_ws, w_dim] when num_ws is set, from z [N, z_dim] and labels c [N, c_dim];
        `update_emas` updates w_avg, `truncation_psi` / `truncation_cutoff` apply the truncation trick."""
        x = None
        if self.z_dim > 0:
            if z is None or z.shape[1] != self.z_dim:
                raise ValueError(f"mapping: expected z of shape [N, {self.z_dim}], got "
                                 f"{None if z is None else tuple(z.shape)}")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None or c.shape[1] != self.c_dim:
                raise ValueError(f"mapping: expected c of shape [N, {self.c_dim}], got "
                                 f"{None if c is None else tuple(c.shape)}")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        # Track the running mean of w (for truncation), only while training G; in w_avg's float32 also when autocast
        # gives ws in bf16/fp16.
        if update_emas and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0, dtype=self.w_avg.dtype).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        # Truncation trick (StyleGAN, sec. 3.2): w' = w_avg + psi * (w - w_avg) for the first `cutoff` ws.
        if truncation_psi != 1:
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.to(x.dtype).lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.to(x.dtype).lerp(x[:, :truncation_cutoff], truncation_psi)
        return x

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters in a module (buffers excluded), for reports and parity with published
    counts."""
    return int(sum(np.prod(p.shape) for p in module.parameters()))
