"""Structured (dataclass) configs for Hydra: the schema and defaults of every config group, with units."""
import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from training.errors import UserError



class ConfigError(UserError, ValueError):
    """A config value that cannot work (bad input: one `error:` line naming the key, exit 2)."""


@dataclass
class ModelConfig:
    """Network architecture (model group); presets in conf/model/ mirror the official StyleGAN2-ADA configs."""
    name: str = "tiny"                 # preset name, used in the run directory name
    z_dim: int = 512                   # latent z dimensionality
    w_dim: int = 512                   # intermediate latent w dimensionality
    map_layers: int = 8                # mapping network depth (FC layers)
    map_lr_mult: float = 0.01          # learning-rate multiplier of the mapping network
    channel_base: Optional[int] = 32768  # channels at resolution r = min(channel_base / r, channel_max); null: auto
    channel_max: int = 512             # channel cap (feature maps)
    g_arch: str = "skip"               # generator architecture: orig | skip | resnet
    d_arch: str = "resnet"             # discriminator architecture: orig | skip | resnet
    mbstd_group: Optional[int] = 4     # minibatch-std group size (samples); must divide the per-device batch; null: auto
    mbstd_channels: int = 1            # minibatch-std feature maps appended
    conv_clamp: Optional[float] = 256  # clamp of conv outputs (absolute value); null = no clamp
    num_fp16_res: int = 0              # CUDA only: highest resolutions run in float16 (0 = off)
    auto: bool = False                 # derive batch, gamma, lr, ema from resolution and process count (official 'auto')
    sn: str = "none"                   # spectral normalization (Miyato et al. 2018) of every layer of: none|d|g|both
    attention_g: List[int] = field(default_factory=list)  # G resolutions (px) with SAGAN self-attention after conv1
    attention_d: List[int] = field(default_factory=list)  # D resolutions (px) with SAGAN self-attention before conv0


@dataclass
class DataConfig:
    """Training data (data group): a folder or zip of images, or the embedded synthetic dataset."""
    name: Optional[str] = "synthetic"  # dataset name for the run directory (folder/zip name when a path is given)
    path: Optional[str] = None         # folder or zip of images; null = embedded synthetic dataset
    resolution: Optional[int] = 32     # synthetic dataset only: image size (px, power of two); null for images
    num_images: Optional[int] = 4096   # synthetic dataset only: number of images; null for images
    use_labels: bool = False           # condition G and D on dataset.json labels (class-conditional)
    xflip: bool = False                # double the dataset with horizontal mirrors
    max_size: Optional[int] = None     # use a random subset of this many images (images); null = all
    num_workers: Optional[int] = None  # loader worker processes per rank; null = cores per process - 1 (max 8) on an
                                       # accelerator, 0 on the CPU; 0 = load in the main process


@dataclass
class TrainConfig:
    """Optimization, regularization, schedule and bookkeeping (train group)."""
    kimg: float = 25000                # training length (thousands of real images shown to D)
    batch_size: Optional[int] = 32     # total batch over all processes and accumulation rounds (images); null: auto
    batch_gpu: Optional[int] = None    # per-process batch of one accumulation round (images); null = all at once
    glr: Optional[float] = 0.002       # G learning rate (Adam step size); null: auto
    dlr: Optional[float] = 0.002       # D learning rate (Adam step size); null: auto
    beta1: float = 0.0                 # Adam beta1
    beta2: float = 0.99                # Adam beta2
    eps: float = 1e-8                  # Adam epsilon
    r1_gamma: Optional[float] = 10.0   # R1 weight gamma (StyleGAN2 eq.: gamma/2 * ||grad D||^2); null: auto
    r1_interval: int = 16              # lazy R1: every this many minibatches (0 = every minibatch, not lazy)
    pl_weight: float = 2.0             # path-length regularization weight (0 = off)
    pl_interval: int = 4               # lazy path length: every this many minibatches
    pl_batch_shrink: int = 2           # path length on batch / this
    pl_decay: float = 0.01             # decay of the running mean path length (per evaluation)
    style_mixing_prob: float = 0.9     # probability of mixing two latents per minibatch
    ema_kimg: Optional[float] = 10.0   # G_ema half-life (kimg); null: auto
    ema_rampup: Optional[float] = None # cap the EMA half-life at cur_nimg * this (fraction); null = no ramp-up
    tick_kimg: float = 4.0             # progress report interval (kimg)
    snap: int = 50                     # checkpoint interval (ticks)
    image_snap: int = 50               # image grid interval (ticks)
    grid_size: List[int] = field(default_factory=lambda: [8, 4])  # image grid columns, rows (images)
    seed: int = 0                      # global random seed
    mixed_precision: str = "no"        # Accelerate mixed precision: no | fp16 | bf16
    ops_impl: str = "auto"             # custom ops: auto (fused when built) | fused | ref
    deterministic: bool = False        # force deterministic algorithms (slower; exact reruns on one device)
    tf32: bool = False                 # CUDA: TF32 convs/matmuls (Ampere+; faster, ~1e-3 relative error; NVIDIA: off)
    cpu_threads: Optional[int] = None  # CPU only: torch threads per process; null = cores / local processes
    keep: int = 3                      # training states kept: the newest this many plus the best metric's (0 = all)
    max_nonfinite: int = 20            # stop after this many minibatches in a row with non-finite gradients (0 = never)
    loss: str = "ns"                   # adversarial loss: ns (non-saturating logistic) | hinge | wgan-gp
    wgan_lambda: float = 10.0          # wgan-gp only: gradient-penalty weight lambda (replaces R1; r1_gamma unused)
    wgan_drift: float = 0.001          # wgan-gp only: drift term eps_drift * D(x)^2 on reals (ProGAN)
    freeze_d: Optional[int] = None     # transfer learning: D's first this many layers, from the top resolution, stay
                                       # frozen (NVIDIA's --freezed; layers: fromRGB, conv0, conv1, skip per block);
                                       # null = the resumed run's or the resume= file's own count, else 0


@dataclass
class LogConfig:
    """Logging (log group)."""
    wandb: str = "disabled"            # wandb mode: disabled | offline | online
    wandb_project: str = "ganforge"    # wandb project name
    progress: Optional[bool] = None    # progress bar (rank 0): null = only when stdout is a terminal
    trackers: List[str] = field(default_factory=list)  # Accelerate trackers: wandb, tensorboard ([] = only stats.jsonl)


@dataclass
class MetricsConfig:
    """Evaluation during training (metrics group): FID/KID of G_ema with the standard Inception features, SWD."""
    names: List[str] = field(default_factory=lambda: ["fid50k_full"])  # fid50k_full, kid50k_full, swd16k, fid<N>k...
    fallback: Optional[str] = "swd16k"  # used instead of FID/KID when no Inception file is found (needs no weights);
                                       # null = those metrics are off then
    every_kimg: Optional[float] = None  # evaluation interval (kimg); null = at every snapshot
    detector: Optional[str] = None     # Inception file or URL; null = GANFORGE_INCEPTION, the cache, then download
    batch: int = 32                    # images per process per feature-extraction batch
    mirror: Optional[bool] = None      # reals include their x-flips (2N, as NVIDIA's with --mirror); null = data.xflip


@dataclass
class HealthConfig:
    """Health warnings (training/report/health.py) in the status line, stats.jsonl and report.html: their thresholds."""
    enabled: bool = True              # watch the run and warn
    warmup_kimg: float = 10.0          # no collapse or overfitting warning before this (kimg)
    collapse_ratio: float = 0.5        # mode collapse: G_ema grid diversity below this fraction of the reals' grid
    collapse_drop: float = 0.3         # ... or fallen by this fraction from its peak (fraction) while below the reals'
    overfit_rt: float = 0.9            # D overfitting: ADA r_t at or above this with augment p >= 0.95 ...
    overfit_gap: float = 4.0           # ... or mean real minus mean fake D logit above this (logits; loss=ns only)
    overfit_ticks: int = 5             # ... for this many ticks in a row (ticks)
    diverge_factor: float = 1000.0     # divergence: 3-tick median of R1 or G loss this many times its smallest (ratio)


@dataclass
class AugConfig:
    """Hydra schema of the `aug` config group (conf/aug/*.yaml mirror these keys)."""
    mode: str = "ada"              # 'ada' (p adapts), 'fixed' (p stays at `p`) or 'noaug' (no pipe at all)
    preset: str = "bgc"            # multiplier preset, see PRESETS
    p: float = 0.0                 # initial p for 'ada', the constant p for 'fixed' (probability, 0..1)
    ada_target: float = 0.6        # target of r_t = E[sign(D(real))] (dimensionless, 0..1)
    ada_interval: int = 4          # minibatches between p updates
    ada_kimg: float = 500          # thousands of images for p to move 0 -> 1 at full speed
    ada_kimg_resume: float = 100   # ada_kimg to use after resuming from a checkpoint (kimg)
    sync_free: Optional[bool] = None  # never read values back (the GPU path); null = on GPUs only


@dataclass
class ScheduleConfig:
    """The schedule config group (conf/schedule/): off by default; presets per target resolution. Stage i trains at
    start_res * 2^i px; it starts at boundaries_kimg[i-1] (or, when that list is empty, after stable_kimg of the
    first stage and then every fade_kimg + stable_kimg), fades its new blocks in linearly over fade_kimg, and lasts
    until the next stage starts; the last stage (the dataset's resolution) lasts until train.kimg."""
    name: str = "none"                 # preset name (none = no progressive growing)
    enabled: bool = False              # grow progressively (false = the plain full-resolution networks)
    target_res: Optional[int] = None   # dataset resolution the preset is made for (px); null = any
    start_res: int = 8                 # resolution of the first stage (px, power of two >= 4)
    stable_kimg: float = 600.0         # training at each stage's resolution after its fade (kimg)
    fade_kimg: float = 600.0           # linear fade-in of each new resolution (kimg)
    boundaries_kimg: List[float] = field(default_factory=list)  # start of each stage after the first (kimg); [] = from stable/fade
    batch_size: List[int] = field(default_factory=list)   # total batch per stage (images), first stage first; [] = train.batch_size
    batch_gpu: List[int] = field(default_factory=list)    # per-process batch per stage (images); [] = train.batch_gpu
    glr: List[float] = field(default_factory=list)        # G learning rate per stage; [] = train.glr
    dlr: List[float] = field(default_factory=list)        # D learning rate per stage; [] = train.dlr


@dataclass
class Config:
    """The whole run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    outdir: str = "runs"               # parent folder of numbered run directories
    run_dir: Optional[str] = None      # explicit run directory (resumes when it holds a checkpoint)
    resume: Optional[str] = None       # training state or run dir (all), .safetensors/.pkl (weights only), none


# Register the schema so that conf/config.yaml can extend it and unknown keys are refused.
def register_configs() -> None:
    """Store the structured schema as Hydra's `base_config` (conf/config.yaml builds on it)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


# The conf/ folder of Hydra presets (beside the packages in the repository).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# The resolved, typed config for `overrides` (Hydra syntax, as after scripts/train.py), composed in this process as
# the script composes it: for benchmarks, scripts/gpu_check.py and tests that run the loop in-process.
def compose_config(overrides=()) -> Config:
    """Compose conf/ with Hydra overrides and return the typed Config (nested dataclasses)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


# A config as plain nested data (what checkpoints, config.json/yaml, wandb and resume diffs hold).
def config_dict(cfg: Config) -> dict:
    """The config as nested dicts and lists (JSON-ready)."""
    return dataclasses.asdict(cfg)


# The official 'auto' rules (StyleGAN2-ADA, train.py 'auto' spec) for a resolution and a process count: batch,
# minibatch-std group, channel base, learning rate, R1 gamma and EMA half-life.
def auto_settings(resolution: int, num_processes: int) -> dict:
    """NVIDIA's 'auto' hyperparameters for a dataset resolution (px) and a number of processes."""
    batch = max(min(num_processes * min(4096 // resolution, 32), 64), num_processes)
    return dict(batch_size=batch, mbstd_group=min(batch // num_processes, 4),
                channel_base=32768 if resolution >= 512 else 16384,
                lr=0.002 if resolution >= 1024 else 0.0025, r1_gamma=0.0002 * resolution ** 2 / batch,
                ema_kimg=batch * 10 / 32)


# The keys model.auto derives, as (group, key, auto_settings name): null in conf/model/auto.yaml, so that a value
# given on the command line stays.
AUTO_KEYS = (("model", "mbstd_group", "mbstd_group"), ("model", "channel_base", "channel_base"),
             ("train", "batch_size", "batch_size"), ("train", "glr", "lr"), ("train", "dlr", "lr"),
             ("train", "r1_gamma", "r1_gamma"), ("train", "ema_kimg", "ema_kimg"))


def apply_auto(cfg: Config, resolution: int, num_processes: int) -> Config:
    """Return `cfg` with NVIDIA's 'auto' rules filling the derived keys that are null (a new Config; with
    model.auto off, `cfg` itself). A derived key left null without model.auto is an error naming it."""
    groups = {"model": cfg.model, "train": cfg.train}
    if cfg.model.auto:
        s = auto_settings(resolution, num_processes)
        for group, key, name in AUTO_KEYS:
            if getattr(groups[group], key) is None:
                groups[group] = dataclasses.replace(groups[group], **{key: s[name]})
        cfg = dataclasses.replace(cfg, **groups)
    unset = [f"{group}.{key}" for group, key, _ in AUTO_KEYS if getattr(getattr(cfg, group), key) is None]
    if unset:
        raise ConfigError(f"{', '.join(unset)} {'is' if len(unset) == 1 else 'are'} null, which only model.auto "
                         f"fills in: give {'a value' if len(unset) == 1 else 'values'} or use model=auto")
    return cfg


# Start-up checks of values that no schema type catches: each error names the key, the value and what works.
def check_settings(cfg: Config) -> None:
    """Refuse a negative training length (0 sets the run up and stops) and a tick that is not positive."""
    if not cfg.train.kimg >= 0:
        raise ConfigError(f"train.kimg={cfg.train.kimg:g} must be positive (thousands of real images shown to D, e.g. "
                          f"train.kimg=1000; 0 sets the run up and stops)")
    if not cfg.train.tick_kimg > 0:
        raise ConfigError(f"train.tick_kimg={cfg.train.tick_kimg:g} must be positive (kimg between progress lines, "
                          f"e.g. train.tick_kimg=4)")


def is_image_dataset(path) -> bool:
    """Whether data.path names a folder or zip of images (not the embedded synthetic dataset)."""
    return path is not None and not (str(path) == "synthetic" or str(path).startswith("synthetic:"))


# data.resolution and data.num_images size the synthetic dataset; an image dataset has its files' own.
def drop_synthetic_keys(cfg: Config) -> tuple:
    """For an image dataset, `cfg` with data.resolution and data.num_images null (so that config.yaml records what
    is true) and a note naming those that were given; else (cfg, None)."""
    if not is_image_dataset(cfg.data.path):
        return cfg, None
    given = [f"data.{k}={v}" for k in ("resolution", "num_images") if (v := getattr(cfg.data, k)) is not None]
    if not given:
        return cfg, None
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=None, num_images=None))
    return cfg, (f"Note: {' and '.join(given)} ignored: data.resolution and data.num_images size the synthetic "
                 f"dataset only; {cfg.data.path} has "
                 f"its files' resolution and count (data.max_size=N trains on N of them; scripts/dataset_tool.py "
                 f"--resolution resizes them)")


# Batch divisibility, checked at start-up for the run and for every stage of a progressive schedule.
def check_batch(batch_size: int, batch_gpu, world: int, mbstd_group: int) -> tuple:
    """Check batch divisibility at start-up; return (batch_gpu, accumulation rounds). Errors (ConfigError) name the
    keys and a value that works."""
    if batch_size <= 0:
        raise ConfigError(f"train.batch_size={batch_size} must be a positive number of images (total over all "
                          f"processes, e.g. train.batch_size=32)")
    if batch_gpu is not None and batch_gpu <= 0:
        raise ConfigError(f"train.batch_gpu={batch_gpu} must be a positive number of images per process, or null "
                          f"(train.batch_size / processes)")
    if batch_gpu is None:
        if batch_size % world != 0:
            raise ConfigError(f"train.batch_size={batch_size} is not divisible by the number of processes ({world})")
        batch_gpu = batch_size // world
    if batch_size % (batch_gpu * world) != 0:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of train.batch_gpu={batch_gpu} times "
                          f"the number of processes ({world})")
    if mbstd_group < 1:
        raise ConfigError(f"model.mbstd_group={mbstd_group} must be at least 1 (images per minibatch-std group)")
    group = min(mbstd_group, batch_gpu)
    if batch_gpu % group != 0:
        raise ConfigError(f"train.batch_gpu={batch_gpu} must be divisible by model.mbstd_group={mbstd_group} (the "
                          f"minibatch-std group); pick a group that divides it, e.g. model.mbstd_group="
                          f"{max(g for g in range(1, group + 1) if batch_gpu % g == 0)}")
    return batch_gpu, batch_size // (batch_gpu * world)


# The spellings parse_bool accepts (any case): click's BOOL (NVIDIA's train.py) and the usual true/false words.
TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "f", "no", "n", "off")


class BoolError(argparse.ArgumentTypeError, ValueError):
    """A value given for a boolean option that is none of TRUE_WORDS / FALSE_WORDS. argparse prints its message
    after the option's name; a caller that catches ValueError (NVIDIA option translation) gets it too."""


def parse_bool(text) -> bool:
    """1/0, true/false, t/f, yes/no, y/n, on/off (any case) as a bool: for options written as NVIDIA's scripts take
    them (`--mirror 1`, `--save-video true`); anything else is a BoolError naming the value."""
    value = str(text).strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise BoolError(f"expects a boolean (1/0, true/false, yes/no, on/off), got {text!r}")
