"""Self-attention block of SAGAN (Zhang et al. 2018, arXiv 1805.08318) computed with scaled_dot_product_attention."""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from networks.layers import Conv2dLayer


# The SDPA backend context: the math path whenever autograd records, because the fused CPU (flash) and CUDA
# (flash / memory-efficient) backward kernels are not differentiable again, and R1 / gradient penalties
# differentiate D's input gradient a second time; the math path is plain differentiable ops (twice
# differentiable; checked with gradgradcheck in tests/test_sn_attention.py). Without grad (generation,
# metrics) the fastest available kernel is used.
def _sdpa_context():
    return sdpa_kernel(SDPBackend.MATH) if torch.is_grad_enabled() else contextlib.nullcontext()


class SelfAttention(nn.Module):
    """SAGAN self-attention (sec. 3, eq. 1-3) on feature maps x [N, C, H, W] with positions i, j = 1..HW:
        s_ij = f(x_i)^T g(x_j),  beta_{j,i} = softmax_i(s_ij),  o_j = v(sum_i beta_{j,i} h(x_i)),  y = gamma * o + x,
    f, g: 1x1 convs to C/8 channels, h: 1x1 conv to C/2 channels and v: 1x1 conv back to C (as SAGAN's released
    code), gamma a learned scalar gate initialized at 0 so that the block starts as the identity. The attention is
    unscaled as in eq. 1 (SDPA scale=1). The convs are equalized-LR Conv2dLayers, spectrally normalized with `sn`."""

    def __init__(self, channels: int, sn: bool = False, key_divisor: int = 8, value_divisor: int = 2):
        super().__init__()
        self.channels = channels
        self.key_channels = max(channels // key_divisor, 1)
        self.value_channels = max(channels // value_divisor, 1)
        self.f = Conv2dLayer(channels, self.key_channels, kernel_size=1, sn=sn)
        self.g = Conv2dLayer(channels, self.key_channels, kernel_size=1, sn=sn)
        self.h = Conv2dLayer(channels, self.value_channels, kernel_size=1, sn=sn)
        self.v = Conv2dLayer(self.value_channels, channels, kernel_size=1, sn=sn)
        self.gamma = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x + gamma * o for x [N, C, H, W] (same shape)."""
        n, c, height, width = x.shape
        keys = self.f(x).flatten(2).transpose(1, 2).unsqueeze(1)     # f(x_i): [N, 1, HW, C/8]
        queries = self.g(x).flatten(2).transpose(1, 2).unsqueeze(1)  # g(x_j): [N, 1, HW, C/8]
        values = self.h(x).flatten(2).transpose(1, 2).unsqueeze(1)   # h(x_i): [N, 1, HW, C/2]
        with _sdpa_context():
            o = F.scaled_dot_product_attention(queries, keys, values, scale=1.0)
        o = o.squeeze(1).transpose(1, 2).reshape(n, self.value_channels, height, width)
        return x + self.gamma.to(x.dtype) * self.v(o).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, key_channels={self.key_channels}, value_channels={self.value_channels}"
