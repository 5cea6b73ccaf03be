"""Progressive resolution schedule (Karras et al. 2018): stages in kimg, linear fade-in, per-stage batch and lr."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ops.upfirdn2d import downsample2d, setup_filter, upsample2d
from training.config import ConfigError
from training.errors import ResumeError


@dataclass(frozen=True)
class Stage:
    """One stage at a point of training: index, resolution (px), fade-in weight alpha in [0, 1], its start (images) and
    its batch/learning-rate settings."""
    index: int
    resolution: int
    alpha: float
    start_nimg: int
    batch_size: int
    batch_gpu: Optional[int]
    glr: float
    dlr: float


class Schedule:
    """The stages of one run, checked at start-up against the dataset resolution; a pure function of cur_nimg, so a
    resumed run is at exactly the same stage and fade as the uninterrupted one."""
    def __init__(self, cfg, resolution: int, train):
        """The stages for `cfg` (a ScheduleConfig) at a dataset of `resolution` px; `train` (a TrainConfig) gives
        the batch sizes and learning rates of stages without their own."""
        name = cfg.name
        start = int(cfg.start_res)
        if cfg.target_res not in (None, resolution):
            raise ConfigError(f"schedule={name} is made for {cfg.target_res} px, but the dataset is {resolution} "
                             f"px: choose the preset for {resolution} px (schedule=prog{resolution}) or set "
                             f"schedule.target_res=null")
        if start < 4 or 2 ** int(math.log2(start)) != start or start > resolution:
            raise ConfigError(f"schedule.start_res={start} must be a power of two between 4 and the dataset "
                             f"resolution ({resolution} px)")
        self.resolutions = [start * 2 ** i for i in range(int(math.log2(resolution // start)) + 1)]
        n = len(self.resolutions)
        fade, stable = float(cfg.fade_kimg), float(cfg.stable_kimg)
        if fade < 0 or stable < 0:
            raise ConfigError(f"schedule.fade_kimg={fade} and schedule.stable_kimg={stable} must be >= 0")
        bounds = [float(b) for b in cfg.boundaries_kimg]
        if not bounds:
            bounds = [stable + i * (fade + stable) for i in range(n - 1)]
        if len(bounds) != n - 1:
            raise ConfigError(f"schedule.boundaries_kimg has {len(bounds)} entries; stages {self.resolutions} px "
                             f"need {n - 1} (the start of each stage after the first)")
        for a, b in zip([0.0] + bounds, bounds):
            if b < a + (fade if a > 0 else 0) or b <= 0:
                raise ConfigError(f"schedule.boundaries_kimg={bounds} must increase, start above 0 and leave each "
                                 f"fade (schedule.fade_kimg={fade}) room to finish before the next stage")
        self.starts = [0] + [round(b * 1000) for b in bounds]
        self.fade_nimg = fade * 1000

        def per_stage(key, default, kind):
            values = list(getattr(cfg, key))
            if not values:
                return [default] * n
            if len(values) != n:
                raise ConfigError(f"schedule.{key} has {len(values)} entries; it needs one per stage "
                                 f"({n}: {self.resolutions} px) or none")
            return [None if v is None else kind(v) for v in values]
        self.batch_size = per_stage("batch_size", int(train.batch_size), int)
        self.batch_gpu = per_stage("batch_gpu", train.batch_gpu, int)
        self.glr = per_stage("glr", float(train.glr), float)
        self.dlr = per_stage("dlr", float(train.dlr), float)

    def at(self, cur_nimg: int) -> Stage:
        """The stage at `cur_nimg`."""
        i = max(k for k, s in enumerate(self.starts) if s <= cur_nimg)
        alpha = 1.0 if i == 0 or self.fade_nimg == 0 else min(1.0, (cur_nimg - self.starts[i]) / self.fade_nimg)
        return Stage(i, self.resolutions[i], float(alpha), self.starts[i], self.batch_size[i], self.batch_gpu[i],
                     self.glr[i], self.dlr[i])

    def __len__(self):
        return len(self.resolutions)


# The schedule for a run (None when schedule.enabled is off).
def make_schedule(cfg, resolution: int, train) -> Optional[Schedule]:
    """The Schedule for `cfg` (a ScheduleConfig) and `train` (a TrainConfig), or None when it is not enabled."""
    return Schedule(cfg, resolution, train) if cfg.enabled else None


def stage_reals(img: torch.Tensor, resolution: int, alpha: float) -> torch.Tensor:
    """The reals for a stage (Karras et al. 2018, app. A.1): box-downsampled to the stage resolution and, during a
    fade, blended like the fakes: lerp(up(down(x)), x, alpha) with the networks' own [1,3,3,1] resampling filters.
    """
    factor = img.shape[-1] // resolution
    if factor > 1:
        img = F.avg_pool2d(img, factor)
    if alpha < 1 and resolution > 4:
        f = _filters.get(img.device)
        if f is None:  # made once per device: a filter built every step would be a host-to-device copy each time
            f = _filters[img.device] = setup_filter([1, 3, 3, 1], device=img.device)
        img = torch.lerp(upsample2d(downsample2d(img, f), f), img, alpha)
    return img


# The [1, 3, 3, 1] resampling filter of stage_reals, by device.
_filters = {}


def stage_meta(G) -> dict:
    """The stage a network is set to, as recorded in snapshots: {'resolution': px, 'alpha': fade}."""
    res, alpha = G.stage
    return {"resolution": int(res), "alpha": float(alpha)}


def set_stage(nets, phases, stage: Stage) -> None:
    """Put G, D and G_ema at `stage` and give each phase's optimizer the stage's learning rate (times the phase's lazy-
    regularization ratio)."""
    for net in nets:
        net.set_stage(stage.resolution, stage.alpha)
    for ph in phases:
        lr = (stage.glr if ph.network == "G" else stage.dlr) * ph.lr_ratio
        for group in ph.opt.param_groups:
            group["lr"] = lr


def check_stage_state(state: dict, schedule: Optional[Schedule], cur_nimg: int, source) -> None:
    """A training state written during a progressive run must be at the stage the schedule gives for its cur_nimg (the
    schedule is a pure function of cur_nimg and the config, which resume checks); a state without the schedule
    cannot continue with it and vice versa."""
    saved = state.get("stage")
    if schedule is None:
        if saved is not None:
            raise ResumeError(f"{source}: written during a progressive schedule (stage {saved}); resume it with the "
                             f"same schedule=... setting")
        return
    st = schedule.at(cur_nimg)
    if saved is None or int(saved["resolution"]) != st.resolution or abs(float(saved["alpha"]) - st.alpha) > 1e-9:
        raise ResumeError(f"{source}: holds stage {saved} at {cur_nimg / 1000:.3f} kimg, but the schedule puts "
                         f"{st.resolution} px, fade {st.alpha:.4f} there: resume with the schedule it was trained "
                         f"with")
