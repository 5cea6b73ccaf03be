"""StyleGAN2 generator (Karras et al. 2020): mapping network plus a synthesis network of modulated convolutions."""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from networks import layers
from networks.attention import SelfAttention
from networks.layers import Conv2dLayer, FullyConnectedLayer, MappingNetwork
from networks.sn import register_sn_buffers, sn_weight
from ops.bias_act import activation_funcs, bias_act
from ops.modulated_conv import modulated_conv2d
from ops.upfirdn2d import setup_filter, upsample2d

NOISE_MODES = ("random", "const", "none")
# The synthesis layers of a block that can take noise, by module name within the block.
BLOCK_NOISE_LAYERS = ("conv0", "conv1")


class SynthesisLayer(nn.Module):
    """One modulated 3x3 conv layer of the synthesis network (StyleGAN2 fig. 2d): style from w through an affine
    layer, modulated/demodulated conv, per-pixel noise with learned strength, bias and leaky ReLU. With `sn`, the
    affine layer and the base weight are spectrally normalized (Miyato et al. 2018, eq. 8); demodulation
    (StyleGAN2 eq. 3) then removes the 1/sigma scale again, so SN here acts on the gradients, not on the output
    scale."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu", resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, sn: bool = False):
        super().__init__()
        self.sn = sn
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = activation_funcs[activation].def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1, sn=sn)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if sn:
            register_sn_buffers(self, self.weight)
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def effective_weight(self) -> torch.Tensor:
        """The conv weight used at run time: W, or W / sigma(W) with SN (one power iteration in training mode)."""
        return sn_weight(self.weight, self.sn_u, self.sn_v, update=self.training) if self.sn else self.weight

    # Refuse an explicit noise map this layer cannot take: one that is neither [res, res] nor [N or 1, 1, res, res].
    def _check_noise(self, noise: torch.Tensor, batch: int) -> None:
        if not self.use_noise:
            raise ValueError("SynthesisLayer: a noise map was given to a layer without noise input (use_noise=False)")
        res = self.resolution
        if tuple(noise.shape) != (res, res) and not (noise.ndim == 4 and noise.shape[0] in (1, batch)
                                                     and tuple(noise.shape[1:]) == (1, res, res)):
            raise ValueError(f"SynthesisLayer: a noise map for a {res} px layer must be [{res}, {res}] or "
                             f"[N, 1, {res}, {res}] with N 1 or {batch}, got {tuple(noise.shape)}")

    def forward(self, x, w, noise_mode: str = "random", fused_modconv: bool = True, gain: float = 1,
                noise: Optional[torch.Tensor] = None):
        """x [N, in_channels, H, W] and w [N, w_dim] -> [N, out_channels, res, res]. The noise map is `noise` when
        given ([res, res] or [N, 1, res, res], replacing `noise_mode`), else per `noise_mode`: 'random' (a fresh
        N(0, 1) map per sample), 'const' (the layer's noise_const buffer) or 'none'; it is scaled by the learned
        noise_strength and added after the convolution. `gain` scales the activation's gain and clamp."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise is not None:
            self._check_noise(noise, x.shape[0])
        styles = self.affine(w)
        noise_map = noise
        if noise_map is None and self.use_noise and noise_mode == "random":
            noise_map = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
        if noise_map is None and self.use_noise and noise_mode == "const":
            noise_map = self.noise_const
        scaled_noise = noise_map * self.noise_strength if noise_map is not None else None
        flip_weight = self.up == 1
        x = modulated_conv2d(x, self.effective_weight(), styles, noise=scaled_noise, up=self.up,
                             padding=self.padding, resample_filter=self.resample_filter, flip_weight=flip_weight,
                             fused_modconv=fused_modconv)
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain, clamp=act_clamp)


class ToRGBLayer(nn.Module):
    """1x1 modulated conv to RGB, without demodulation (StyleGAN2 fig. 7 "skip" outputs). With `sn`, W / sigma(W)
    (Miyato et al. 2018, eq. 8) replaces the equalized-LR gain 1/sqrt(fan_in) on the styles."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: Optional[float] = None, sn: bool = False):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.sn = sn
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1, sn=sn)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1.0 if sn else 1 / math.sqrt(in_channels * kernel_size ** 2)
        if sn:
            register_sn_buffers(self, self.weight)

    def effective_weight(self) -> torch.Tensor:
        """The conv weight used at run time: W, or W / sigma(W) with SN (one power iteration in training mode)."""
        return sn_weight(self.weight, self.sn_u, self.sn_v, update=self.training) if self.sn else self.weight

    def forward(self, x, w, fused_modconv: bool = True):
        """Features x [N, in_channels, H, W] and w [N, w_dim] -> an image [N, out_channels, H, W]."""
        styles = self.affine(w)
        if not self.sn:
            styles = styles * self.weight_gain
        x = modulated_conv2d(x, self.effective_weight(), styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: [const | conv0 (up 2)] -> conv1 -> ToRGB, with `skip` (RGB outputs
    summed across resolutions) or `resnet` (residual 1x1 skip connection) architecture (StyleGAN2 fig. 7).
    `attention`: a SAGAN self-attention block (Zhang et al. 2018, eq. 1-3) on the features after conv1 (before
    ToRGB); `sn`: spectral normalization of every conv and affine layer (Miyato et al. 2018); `grow`: a ToRGB at
    every resolution whatever the architecture, so that the progressive schedule can output any stage (skip has
    them all)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter=(1, 3, 3, 1),
                 conv_clamp: Optional[float] = None, use_fp16: bool = False, sn: bool = False,
                 attention: bool = False, grow: bool = False, **layer_kwargs):
        super().__init__()
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"G architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp, sn=sn,
                                        **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, sn=sn, **layer_kwargs)
        self.num_conv += 1
        if attention:
            self.attn = SelfAttention(out_channels, sn=sn)
        if is_last or architecture == "skip" or grow:
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp, sn=sn)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter, sn=sn)

    def noise_layers(self) -> list:
        """The block's layers that take noise, in order: [(name, layer)], name 'conv0' / 'conv1'."""
        out = []
        for name in BLOCK_NOISE_LAYERS:
            layer = getattr(self, name, None)
            if layer is not None and layer.use_noise:
                out.append((name, layer))
        return out

    def forward(self, x, img, ws, force_fp32: bool = False, fused_modconv: Optional[bool] = None,
                noise_mode: str = "random", rgb: bool = True, noise: Optional[dict] = None):
        """Features x (None for the first block), the image so far img (or None) and the block's ws
        [N, num_conv + num_torgb, w_dim] -> (features, image). `rgb`: run the ToRGB layer (a growing non-skip
        network needs only the last one or two). `noise`: explicit noise maps {'conv0' | 'conv1': map} for
        SynthesisLayer.forward; the block's other layers follow `noise_mode`."""
        noise = noise or {}
        if noise:
            names = [name for name, _ in self.noise_layers()]
            if not set(noise) <= set(names):
                raise ValueError(f"SynthesisBlock {self.resolution} px: no noise layer named "
                                 f"{sorted(set(noise) - set(names))}; its noise layers are {names}")
        w_iter = iter(ws.unbind(dim=1))
        dtype = layers.block_dtype(self.use_fp16, ws, force_fp32)
        fmt = layers.block_memory_format(dtype)
        if fused_modconv is None:  # Grouped conv is faster for inference; split path is cheaper to backprop.
            fused_modconv = (not self.training) and (dtype == torch.float32 or ws.shape[0] == 1)
        conv_kwargs = dict(noise_mode=noise_mode, fused_modconv=fused_modconv)

        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1]).to(memory_format=fmt)
            x = self.conv1(x, next(w_iter), noise=noise.get("conv1"), **conv_kwargs)
        elif self.architecture == "resnet":
            x = x.to(dtype=dtype, memory_format=fmt)
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x, next(w_iter), noise=noise.get("conv0"), **conv_kwargs)
            x = self.conv1(x, next(w_iter), noise=noise.get("conv1"), gain=np.sqrt(0.5), **conv_kwargs)
            x = y + x
        else:
            x = x.to(dtype=dtype, memory_format=fmt)
            x = self.conv0(x, next(w_iter), noise=noise.get("conv0"), **conv_kwargs)
            x = self.conv1(x, next(w_iter), noise=noise.get("conv1"), **conv_kwargs)
        if hasattr(self, "attn"):
            x = self.attn(x)

        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if rgb and hasattr(self, "torgb"):
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """The synthesis network g: W+ -> image, a learned 4x4 constant followed by one block per octave;
    `attention` lists the resolutions whose blocks end with SAGAN self-attention. The stage (set_stage) makes it
    output a lower resolution, the progressive schedule's (Karras et al. 2018): the stage's block's RGB, faded in
    over the previous stage's RGB upsampled, img = lerp(up(rgb_prev), rgb_new, alpha); at full resolution and
    alpha 1 (the default) it is the plain StyleGAN2 network."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0, attention=(), **block_kwargs):
        super().__init__()
        self.architecture = block_kwargs.get("architecture", "skip")
        self.stage_res, self.stage_alpha = img_resolution, 1.0
        log2 = int(np.log2(img_resolution))
        if img_resolution < 4 or 2 ** log2 != img_resolution:
            raise ValueError(f"G img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        attention = {int(r) for r in attention}
        if not attention <= set(self.block_resolutions):
            raise ValueError(f"G attention resolutions {sorted(attention)} must be among the block resolutions "
                             f"{self.block_resolutions}")
        channels = {res: layers.channels_at(res, channel_base, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            is_last = res == img_resolution
            block = SynthesisBlock(in_channels, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=is_last, attention=res in attention,
                                   use_fp16=(res >= fp16_resolution) and num_fp16_res > 0, **block_kwargs)
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def set_stage(self, resolution: int, alpha: float = 1.0) -> None:
        """Output `resolution` px, fading its block in with weight `alpha` (both plain attributes, not state: the
        training loop sets them every step, a snapshot records them in its metadata)."""
        res, alpha = layers.check_stage(resolution, alpha, self.block_resolutions, "G")
        needed = [res] + ([res // 2] if alpha < 1 and res > 4 else [])
        lacking = [r for r in needed if not hasattr(getattr(self, f"b{r}"), "torgb")]
        if lacking:
            raise ValueError(f"G: a {self.architecture} generator has no ToRGB at {lacking} px; build it with "
                             f"grow=True (the progressive schedule does) to output stage {res} px")
        self.stage_res, self.stage_alpha = res, alpha

    def noise_layers(self) -> list:
        """The layers that take noise, in order (lowest resolution first): [(name, layer)] with name
        'b{res}.conv{0,1}', the layer's module name in this network (its buffer is '<name>.noise_const'); these
        names are the keys of forward's `noise`."""
        return [(f"b{res}.{name}", layer) for res in self.block_resolutions
                for name, layer in getattr(self, f"b{res}").noise_layers()]

    # An explicit noise dict {'b{res}.conv{0,1}': map} split by block: {res: {'conv0' | 'conv1': map}}; an unknown
    # name is refused.
    def _noise_by_block(self, noise: dict) -> dict:
        names = [name for name, _ in self.noise_layers()]
        unknown = sorted(set(noise) - set(names))
        if unknown:
            raise ValueError(f"synthesis: no noise layer named {unknown}; the noise layers are {names}")
        out = {}
        for name, value in noise.items():
            block, layer = name.split(".")
            out.setdefault(int(block[1:]), {})[layer] = value
        return out

    def forward(self, ws, noise: Optional[dict] = None, **block_kwargs):
        """ws [N, num_ws, w_dim] -> images [N, img_channels, res, res] at the stage resolution. `noise`: explicit
        noise maps {'b{res}.conv{0,1}': [res, res] or [N, 1, res, res]} (names from noise_layers()), each used by
        its layer instead of the `noise_mode` noise and scaled by the layer's noise_strength like it; layers left
        out follow `noise_mode`. Other keyword arguments go to every block (noise_mode, fused_modconv,
        force_fp32)."""
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"synthesis: expected ws of shape [N, {self.num_ws}, {self.w_dim}], "
                             f"got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        block_noise = self._noise_by_block(noise) if noise else {}
        # Each block takes its convs' ws plus the next one for its ToRGB (shared with the next block's conv0).
        block_ws = []
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws.append(ws.narrow(1, w_idx, block.num_conv + block.num_torgb))
            w_idx += block.num_conv
        out_res, alpha = self.stage_res, self.stage_alpha
        fade = alpha < 1 and out_res > 4
        skip = self.architecture == "skip"
        x = img = prev = None
        for res, cur_ws in zip(self.block_resolutions, block_ws):
            if res > out_res:
                break
            if fade and res == out_res:
                prev = img
            rgb = skip or res == out_res or (fade and res * 2 == out_res)
            x, img = getattr(self, f"b{res}")(x, img if skip else None, cur_ws, rgb=rgb,
                                              noise=block_noise.get(res), **block_kwargs)
        if fade:  # Karras et al. 2018, fig. 2: the new block's RGB blended with the previous RGB upsampled.
            img = torch.lerp(upsample2d(prev, getattr(self, f"b{out_res}").resample_filter), img, alpha)
        return img


class Generator(nn.Module):
    """The generator G(z, c) = synthesis(mapping(z, c)). `init_kwargs` records the constructor arguments so that a
    snapshot (tensors plus JSON) can rebuild the network without pickling code."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: Optional[dict] = None, synthesis_kwargs: Optional[dict] = None, **kwargs):
        super().__init__()
        mapping_kwargs = dict(mapping_kwargs or {})
        synthesis_kwargs = dict(synthesis_kwargs or {}, **kwargs)
        self.init_kwargs = dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                                img_channels=img_channels, mapping_kwargs=mapping_kwargs,
                                synthesis_kwargs=synthesis_kwargs)
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    def set_stage(self, resolution: int, alpha: float = 1.0) -> None:
        """The progressive stage G outputs: `resolution` px with fade-in weight `alpha` (see SynthesisNetwork)."""
        self.synthesis.set_stage(resolution, alpha)

    @property
    def stage(self) -> tuple:
        """(resolution, alpha) of the stage G outputs."""
        return self.synthesis.stage_res, self.synthesis.stage_alpha

    def forward(self, z, c, truncation_psi: float = 1, truncation_cutoff: Optional[int] = None,
                update_emas: bool = False, **synthesis_kwargs):
        """Images from z [N, z_dim] and labels c [N, c_dim]: mapping (with truncation) then synthesis, which takes
        the other keyword arguments (noise_mode, noise, fused_modconv, force_fp32)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, **synthesis_kwargs)
