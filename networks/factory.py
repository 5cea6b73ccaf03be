"""Builds G and D from the model config and the dataset's shape, and applies the official 'auto' preset rules."""
import copy

from networks.discriminator import Discriminator
from networks.generator import Generator
from networks.sn import SN_CHOICES


# The official 'auto' rules (StyleGAN2-ADA, train.py 'auto' spec) for a resolution and a process count: batch,
# minibatch-std group, channel base, learning rate, R1 gamma and EMA half-life.
def auto_settings(resolution: int, num_processes: int) -> dict:
    batch = max(min(num_processes * min(4096 // resolution, 32), 64), num_processes)
    return dict(batch_size=batch, mbstd_group=min(batch // num_processes, 4),
                channel_base=32768 if resolution >= 512 else 16384,
                lr=0.002 if resolution >= 1024 else 0.0025, r1_gamma=0.0002 * resolution ** 2 / batch,
                ema_kimg=batch * 10 / 32)


# Apply 'auto' to a plain config dict in place (only when model.auto is set).
def apply_auto(cfg: dict, resolution: int, num_processes: int) -> None:
    if not cfg["model"].get("auto"):
        return
    s = auto_settings(resolution, num_processes)
    cfg["model"]["mbstd_group"] = s["mbstd_group"]
    cfg["model"]["channel_base"] = s["channel_base"]
    cfg["train"].update(batch_size=s["batch_size"], glr=s["lr"], dlr=s["lr"], r1_gamma=s["r1_gamma"],
                        ema_kimg=s["ema_kimg"])


# G and D for a dataset of `resolution` px, `channels` channels and `c_dim` label dimensions. The issue-8 options
# (model.sn: spectral normalization, Miyato et al. 2018; model.attention_g/_d: SAGAN self-attention resolutions)
# enter the constructors' kwargs, hence `init_kwargs` and snapshots, only when set: with them off the networks
# and their recorded arguments are exactly the Foundation's. `grow` (the progressive schedule): the extra ToRGB /
# fromRGB layers that let the networks run at every stage resolution.
def build_networks(model_cfg: dict, resolution: int, channels: int, c_dim: int, grow: bool = False):
    m = model_cfg
    sn = m.get("sn", "none")
    if sn not in SN_CHOICES:
        raise ValueError(f"model.sn must be one of {SN_CHOICES}, got {sn!r}")
    attention_g = sorted({int(r) for r in (m.get("attention_g") or [])})
    attention_d = sorted({int(r) for r in (m.get("attention_d") or [])})
    mapping_kwargs = dict(num_layers=m["map_layers"], lr_multiplier=m["map_lr_mult"])
    synthesis_kwargs = dict(channel_base=m["channel_base"], channel_max=m["channel_max"],
                            num_fp16_res=m["num_fp16_res"], conv_clamp=m["conv_clamp"], architecture=m["g_arch"])
    if sn in ("g", "both"):
        mapping_kwargs["sn"] = synthesis_kwargs["sn"] = True
    if attention_g:
        synthesis_kwargs["attention"] = attention_g
    if grow and m["g_arch"] != "skip":  # A skip G has a ToRGB at every resolution already.
        synthesis_kwargs["grow"] = True
    G = Generator(z_dim=m["z_dim"], c_dim=c_dim, w_dim=m["w_dim"], img_resolution=resolution,
                  img_channels=channels, mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs)
    D = Discriminator(c_dim=c_dim, img_resolution=resolution, img_channels=channels, architecture=m["d_arch"],
                      channel_base=m["channel_base"], channel_max=m["channel_max"],
                      num_fp16_res=m["num_fp16_res"], conv_clamp=m["conv_clamp"],
                      mbstd_group_size=m["mbstd_group"], mbstd_num_channels=m["mbstd_channels"],
                      sn=sn in ("d", "both"), attention=attention_d, grow=grow and m["d_arch"] != "skip")
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    return G, D, G_ema
