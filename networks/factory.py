"""Builds G, D and G_ema from a model config (training.config.ModelConfig or alike) and the dataset's shape."""
import copy

from networks.discriminator import Discriminator
from networks.generator import Generator
from networks.sn import SN_CHOICES


# G and D for a dataset of `resolution` px, `channels` channels and `c_dim` label dimensions. The options beyond
# StyleGAN2 (model.sn: spectral normalization, Miyato et al. 2018; model.attention_g/_d: SAGAN self-attention
# resolutions) enter the constructors' kwargs, hence `init_kwargs` and snapshots, only when set: with them off the
# networks and their recorded arguments are the plain StyleGAN2 ones (same keys, same random draws). `grow` (the
# progressive schedule): the extra ToRGB / fromRGB layers that let the networks run at every stage resolution.
def build_networks(model, resolution: int, channels: int, c_dim: int, grow: bool = False):
    """G, D and G_ema (a deep copy of G in eval mode) for `model` (a ModelConfig) and the dataset's shape."""
    if model.sn not in SN_CHOICES:
        raise ValueError(f"model.sn must be one of {SN_CHOICES}, got {model.sn!r}")
    attention_g = sorted({int(r) for r in model.attention_g})
    attention_d = sorted({int(r) for r in model.attention_d})
    mapping_kwargs = dict(num_layers=model.map_layers, lr_multiplier=model.map_lr_mult)
    synthesis_kwargs = dict(channel_base=model.channel_base, channel_max=model.channel_max,
                            num_fp16_res=model.num_fp16_res, conv_clamp=model.conv_clamp, architecture=model.g_arch)
    if model.sn in ("g", "both"):
        mapping_kwargs["sn"] = synthesis_kwargs["sn"] = True
    if attention_g:
        synthesis_kwargs["attention"] = attention_g
    if grow and model.g_arch != "skip":  # A skip G has a ToRGB at every resolution already.
        synthesis_kwargs["grow"] = True
    G = Generator(z_dim=model.z_dim, c_dim=c_dim, w_dim=model.w_dim, img_resolution=resolution,
                  img_channels=channels, mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs)
    D = Discriminator(c_dim=c_dim, img_resolution=resolution, img_channels=channels, architecture=model.d_arch,
                      channel_base=model.channel_base, channel_max=model.channel_max,
                      num_fp16_res=model.num_fp16_res, conv_clamp=model.conv_clamp,
                      mbstd_group_size=model.mbstd_group, mbstd_num_channels=model.mbstd_channels,
                      sn=model.sn in ("d", "both"), attention=attention_d, grow=grow and model.d_arch != "skip")
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    return G, D, G_ema
