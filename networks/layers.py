"""Building blocks shared by G and D: equalized-LR fully connected and conv layers, and the mapping network."""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ops.bias_act import activation_funcs, bias_act
from ops.conv2d_resample import conv2d_resample
from ops.upfirdn2d import setup_filter
from networks.sn import register_sn_buffers, sn_weight


# Scale by the inverse root-mean-square over `dim` (the "pixel norm" applied to z and embedded labels).
def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# Fully connected layer with equalized learning rate (Karras et al. 2018, sec. 4.1): weights stored as
# N(0, 1/lr_multiplier^2) and scaled at run time by lr_multiplier / sqrt(fan_in). With `sn`, spectral
# normalization (Miyato et al. 2018, eq. 8) replaces that scaling: W_SN = W / sigma(W).
class FullyConnectedLayer(nn.Module):
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
        if self.sn:
            w = sn_weight(self.weight, self.sn_u, self.sn_v, update=self.training).to(x.dtype)
        else:
            w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        x = x.matmul(w.t())
        return bias_act(x, b, act=self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"
                + (", sn=True" if self.sn else ""))


# Convolution with equalized learning rate, optional FIR up/downsampling, activation and output clamp. With `sn`,
# W_SN = W / sigma(W) (Miyato et al. 2018, eq. 8; W as [out, in*k*k]) replaces the 1/sqrt(fan_in) scaling.
class Conv2dLayer(nn.Module):
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
        if self.sn:
            w = sn_weight(self.weight, self.sn_u, self.sn_v, update=self.training).to(x.dtype)
        else:
            w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        flip_weight = self.up == 1  # Transposed convolution truly convolves; keep the tap order consistent.
        x = conv2d_resample(x, w, f=self.resample_filter.to(x.dtype), up=self.up, down=self.down,
                            padding=self.padding, flip_weight=flip_weight)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, b, act=self.activation, gain=act_gain, clamp=act_clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, activation={self.activation}, "
                f"up={self.up}, down={self.down}" + (", sn=True" if self.sn else ""))


# Mapping network f: Z -> W (StyleGAN, sec. 2): normalized z, optionally concatenated with an embedded label,
# through `num_layers` FC layers with lr multiplier 0.01; tracks w_avg for the truncation trick. `sn`: spectrally
# normalized FC layers (Miyato et al. 2018).
class MappingNetwork(nn.Module):
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

        # Track the running mean of w (for truncation), only while training G.
        if update_emas and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        # Truncation trick (StyleGAN, sec. 3.2): w' = w_avg + psi * (w - w_avg) for the first `cutoff` ws.
        if truncation_psi != 1:
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


# Number of trainable parameters in a module (buffers excluded), for reports and parity with published counts.
def count_params(module: nn.Module) -> int:
    return int(sum(np.prod(p.shape) for p in module.parameters()))
