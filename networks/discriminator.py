"""StyleGAN2 discriminator: resnet/skip/orig blocks, minibatch standard deviation, projection conditioning."""
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from networks import layers
from networks.attention import SelfAttention
from networks.layers import Conv2dLayer, FullyConnectedLayer, MappingNetwork
from ops.upfirdn2d import downsample2d, setup_filter


class DiscriminatorBlock(nn.Module):
    """One resolution of D: [fromRGB] -> conv0 -> conv1 (down 2), with a residual 1x1 skip (resnet) or image
    downsampling into the next block's fromRGB (skip) (StyleGAN2 fig. 7). `attention`: SAGAN self-attention (Zhang et
    al. 2018, eq. 1-3) on the block's input features at its own resolution (after fromRGB, before conv0 and the resnet
    skip); `sn`: spectral normalization of every conv (Miyato et al. 2018); `grow`: a fromRGB whatever the architecture,
    so that the block can take images as the entry block of a progressive stage. A block applies its fromRGB when it
    gets no features (x None: the entry block) or, with `skip`, always."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", activation: str = "lrelu", resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, use_fp16: bool = False, sn: bool = False,
                 attention: bool = False, grow: bool = False):
        super().__init__()
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"D architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        if in_channels == 0 or architecture == "skip" or grow:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, activation=activation,
                                       conv_clamp=conv_clamp, sn=sn)
        if attention:
            self.attn = SelfAttention(tmp_channels, sn=sn)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation=activation,
                                 conv_clamp=conv_clamp, sn=sn)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation=activation, down=2,
                                 resample_filter=resample_filter, conv_clamp=conv_clamp, sn=sn)
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    resample_filter=resample_filter, sn=sn)

    def forward(self, x, img, force_fp32: bool = False):
        """Features x (None for the entry block) and images img at the block's resolution -> (features at half
        the resolution, images downsampled for the next block's fromRGB with `skip`, else None)."""
        dtype = layers.block_dtype(self.use_fp16, img if img is not None else x, force_fp32)
        fmt = layers.block_memory_format(dtype)
        if x is not None:
            x = x.to(dtype=dtype, memory_format=fmt)
        if x is None or self.architecture == "skip":
            y = self.fromrgb(img.to(dtype=dtype, memory_format=fmt))
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None
        if hasattr(self, "attn"):
            x = self.attn(x)
        if self.architecture == "resnet":
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=np.sqrt(0.5))
            x = y + x
        else:
            x = self.conv1(self.conv0(x))
        return x, img


class MinibatchStdLayer(nn.Module):
    """Minibatch standard deviation (Karras et al. 2018, sec. 3): the std over groups of `group_size` samples, averaged
    over channels and pixels within `num_channels` splits, appended as extra feature maps."""

    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x):
        """x [N, C, H, W] -> [N, C + num_channels, H, W]."""
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g != 0:
            raise ValueError(f"minibatch-std: batch {n} is not divisible by the group size {g}")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)        # [G, M, F, c, H, W], sample n = g_idx * M + m.
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # Std over the group: [M, F, c, H, W].
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)
        y = y.repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 head of D: [fromRGB] -> minibatch std -> conv -> fc -> out, with projection onto the label embedding
    (Miyato & Koyama 2018) when conditional: D(x, c) = <out(x), cmap(c)> / sqrt(cmap_dim). `sn`: spectrally normalized
    conv and FC layers (Miyato et al. 2018); `grow`: a fromRGB for a progressive stage at 4 px."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: Optional[int] = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: Optional[float] = None, sn: bool = False,
                 grow: bool = False):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.architecture = architecture
        if architecture == "skip" or grow:
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation, sn=sn)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3,
                                activation=activation, conv_clamp=conv_clamp, sn=sn)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation=activation, sn=sn)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim, sn=sn)

    def forward(self, x, img, cmap, force_fp32: bool = False):
        """Features x at 4 px (None: the images img enter here), images img and the label embedding cmap ->
        logits [N, 1]."""
        if x is None:  # A progressive stage at 4 px: the images enter here.
            x = self.fromrgb(img.to(torch.float32))
        else:
            x = x.to(torch.float32)
            if self.architecture == "skip":
                x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """The discriminator D(img, c) -> logits [N, 1]; `init_kwargs` records the constructor arguments for snapshots (`sn`
    and `attention` only when set, so that default networks record the plain StyleGAN2 arguments). `sn`: spectral
    normalization of every layer, label mapping included (Miyato et al. 2018); `attention`: the block resolutions with
    SAGAN self-attention (Zhang et al. 2018); `grow`: fromRGB layers at every resolution, for the progressive schedule
    (set_stage: see forward)."""

    def __init__(self, c_dim: int, img_resolution: int, img_channels: int, architecture: str = "resnet",
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 conv_clamp: Optional[float] = None, cmap_dim: Optional[int] = None,
                 mbstd_group_size: Optional[int] = 4, mbstd_num_channels: int = 1,
                 mapping_kwargs: Optional[dict] = None, block_kwargs: Optional[dict] = None, sn: bool = False,
                 attention=(), grow: bool = False):
        super().__init__()
        mapping_kwargs = dict(mapping_kwargs or {})
        block_kwargs = dict(block_kwargs or {})
        self.init_kwargs = dict(c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels,
                                architecture=architecture, channel_base=channel_base, channel_max=channel_max,
                                num_fp16_res=num_fp16_res, conv_clamp=conv_clamp, cmap_dim=cmap_dim,
                                mbstd_group_size=mbstd_group_size, mbstd_num_channels=mbstd_num_channels,
                                mapping_kwargs=mapping_kwargs, block_kwargs=block_kwargs)
        attention = sorted({int(r) for r in attention})
        if sn:
            self.init_kwargs["sn"] = True
        if attention:
            self.init_kwargs["attention"] = attention
        if grow:
            self.init_kwargs["grow"] = True
        log2 = int(np.log2(img_resolution))
        if img_resolution < 4 or 2 ** log2 != img_resolution:
            raise ValueError(f"D img_resolution must be a power of two >= 4, got {img_resolution}")
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(log2, 2, -1)]
        self.architecture = architecture
        self.stage_res, self.stage_alpha = img_resolution, 1.0
        if not set(attention) <= set(self.block_resolutions):
            raise ValueError(f"D attention resolutions {attention} must be among the block resolutions "
                             f"{self.block_resolutions}")
        channels = {res: layers.channels_at(res, channel_base, channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        if cmap_dim is None:
            cmap_dim = channels[4]
        if c_dim == 0:
            cmap_dim = 0
        for res in self.block_resolutions:
            in_channels = channels[res] if res < img_resolution else 0
            block = DiscriminatorBlock(in_channels, channels[res], channels[res // 2], resolution=res,
                                       img_channels=img_channels, architecture=architecture,
                                       conv_clamp=conv_clamp, sn=sn, attention=res in attention, grow=grow,
                                       use_fp16=(res >= fp16_resolution) and num_fp16_res > 0, **block_kwargs)
            setattr(self, f"b{res}", block)
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **(dict(mapping_kwargs, sn=True) if sn else mapping_kwargs))
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4, img_channels=img_channels,
                                        architecture=architecture, mbstd_group_size=mbstd_group_size,
                                        mbstd_num_channels=mbstd_num_channels, conv_clamp=conv_clamp, sn=sn,
                                        grow=grow)

    def set_stage(self, resolution: int, alpha: float = 1.0) -> None:
        """Take images of `resolution` px, fading the stage's block in with weight `alpha` (plain attributes, like
        G's)."""
        res, alpha = layers.check_stage(resolution, alpha, self.block_resolutions + [4], "D")
        needed = [res] + ([res // 2] if alpha < 1 and res > 4 else [])
        lacking = [r for r in needed if r < self.img_resolution and not hasattr(getattr(self, f"b{r}"), "fromrgb")]
        if lacking:
            raise ValueError(f"D: a {self.architecture} discriminator has no fromRGB at {lacking} px; build it with "
                             f"grow=True (the progressive schedule does) to take stage {res} px")
        self.stage_res, self.stage_alpha = res, alpha

    @property
    def stage(self) -> tuple:
        """(resolution, alpha) of the stage D takes."""
        return self.stage_res, self.stage_alpha

    def freezable_layers(self) -> list:
        """D's layers in the order Freeze-D counts them (NVIDIA's --freezed, Mo et al. 2020): layer i (from 0) is
        frozen by freeze_d > i. Per block, from the highest resolution down: its fromRGB where the plain architecture
        has one (the entry block; every block with skip), conv0, conv1 and, with resnet, the skip; so 4 + 3 per
        lower block (resnet), 3 per block (skip), 3 + 2 per lower block (orig). The 4x4 epilogue (b4) and the label
        mapping are not counted and never frozen. Returns [(layer name, [module names])]: the modules ganforge adds to
        NVIDIA's D count as no layer and go with their block's conv0 (the self-attention, which sits just before
        conv0, and the extra fromRGB of `grow`)."""
        out = []
        for res in self.block_resolutions:
            name, block = f"b{res}", getattr(self, f"b{res}")
            has_rgb = block.in_channels == 0 or self.architecture == "skip"
            attached = [f"{name}.{m}" for m in ("attn", "fromrgb")
                        if hasattr(block, m) and (m == "attn" or not has_rgb)]
            if has_rgb:
                out.append((f"{name}.fromrgb", [f"{name}.fromrgb"]))
            out.append((f"{name}.conv0", [f"{name}.conv0"] + attached))
            out.append((f"{name}.conv1", [f"{name}.conv1"]))
            if self.architecture == "resnet":
                out.append((f"{name}.skip", [f"{name}.skip"]))
        return out

    def frozen_parameters(self, freeze_d: int) -> dict:
        """{name: parameter} of D's first `freeze_d` layers (freezable_layers), in named_parameters order; a count
        beyond the number of layers freezes every block, never the epilogue or the label mapping."""
        if isinstance(freeze_d, bool) or not isinstance(freeze_d, int) or freeze_d < 0:
            raise ValueError(f"freeze_d must be a non-negative integer, got {freeze_d!r}")
        modules = [m for _, names in self.freezable_layers()[:freeze_d] for m in names]
        prefixes = tuple(m + "." for m in modules)
        return {n: p for n, p in self.named_parameters() if n.startswith(prefixes)}

    def forward(self, img, c, update_emas: bool = False, force_fp32: bool = False):
        """Logits for images at the stage resolution. During a fade (Karras et al. 2018, fig. 2) the stage's new block
        output is blended with the images downsampled into the previous stage's entry: x = lerp(fromRGB(down(img)),
        block(img), alpha) (skip: the new block's output scaled by alpha, beside the skip fromRGB of down(img))."""
        res_in, alpha = self.stage_res, self.stage_alpha
        if img.ndim != 4 or img.shape[1:] != (self.img_channels, res_in, res_in):
            stage = "" if res_in == self.img_resolution else f" (progressive stage {res_in} px)"
            raise ValueError(f"D: expected images of shape [N, {self.img_channels}, {res_in}, {res_in}]{stage}, "
                             f"got {tuple(img.shape)}")
        fade = alpha < 1 and res_in > 4
        x = None
        for res in self.block_resolutions:
            if res > res_in:
                continue
            block = getattr(self, f"b{res}")
            x_new, img_new = block(x, img, force_fp32=force_fp32)
            if fade and res == res_in:
                img_down = img_new if self.architecture == "skip" else downsample2d(img, block.resample_filter)
                if self.architecture == "skip":  # The next block adds fromRGB(down(img)) itself.
                    x = x_new * alpha if alpha > 0 else None
                else:
                    prev = getattr(self, f"b{res // 2}").fromrgb(img_down.to(torch.float32))
                    x = torch.lerp(prev, x_new.to(torch.float32), alpha)
                img = img_down
            else:
                x, img = x_new, img_new
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, img, cmap, force_fp32=force_fp32)
