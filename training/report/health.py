"""Run health: warnings of mode collapse, D overfitting and divergence from the per-tick stats the loop has anyway."""
import math
from dataclasses import dataclass
from statistics import median

import torch
import torch.nn.functional as F

# Key of the warnings in a stats.jsonl line (a list of {kind, quantity, value, message}), and of the diversities.
WARNINGS_KEY = "Health/warnings"
DIVERSITY_FAKE = "Health/diversity_fake"
DIVERSITY_REAL = "Health/diversity_real"

# Diversity is measured on images area-downsampled to this size (px): colours and layout, not pixel noise.
DIVERSITY_RES = 8


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise distance of images [N, C, H, W] (float in [-1, 1], or uint8 in 0..255, mapped to [-1, 1]) after
    area downsampling to 8x8, divided by sqrt(C * 64): about 0 for identical images, ~0.8 for independent uniform
    noise. A mode-collapsed generator makes a grid of near-identical images, far below the reals' value."""
    x = images.detach().to(torch.float32)
    if images.dtype == torch.uint8:
        x = x / 127.5 - 1
    if x.shape[0] < 2:
        raise ValueError(f"diversity: needs at least 2 images, got {x.shape[0]}")
    x = F.adaptive_avg_pool2d(x, DIVERSITY_RES).flatten(1)
    d = torch.cdist(x[None].double(), x[None].double())[0]
    n = x.shape[0]
    return float(d.sum() / (n * (n - 1)) / math.sqrt(x.shape[1]))


@dataclass
class HealthWarning:
    """One health warning: what went wrong (kind), the quantity that shows it, its value, and a remedy (message)."""
    kind: str       # mode_collapse | d_overfit | divergence
    quantity: str   # the stats key (or expression) that shows it
    value: float
    message: str
    new: bool = True  # not warned of (this kind) at the previous tick: the status line prints the message in full

    def as_dict(self) -> dict:
        return dict(kind=self.kind, quantity=self.quantity, value=self.value, message=self.message, new=self.new)


class HealthMonitor:
    """Reads one stats line per tick (feed) and says what looks wrong (check). Rules, each after `warmup_kimg`:
    - mode collapse: the diversity of G_ema's grid below collapse_ratio x the reals' grid, or fallen by collapse_drop
      from its peak while below the reals';
    - D overfitting: ADA's r_t >= overfit_rt with p >= 0.95 (at its ceiling), or (non-saturating loss) the mean real
      logit above the mean fake logit by overfit_gap for overfit_ticks ticks in a row, and now at its widest;
    - divergence: a non-finite loss, skipped (non-finite) steps in the tick, or the 3-tick median of the R1 penalty or
      G loss grown by diverge_factor over its smallest value so far (and above 1).
    `cfg` is the config's HealthConfig; `loss_type` train.loss."""
    def __init__(self, cfg, loss_type: str = "ns"):
        self.cfg, self.loss_type = cfg, loss_type
        self.history = {k: [] for k in ("Loss/r1_penalty", "Loss/G/loss")}
        self.min_median = {}
        self.overfit_streak = self.gap_streak = 0
        self.gaps = []
        self.peak_diversity = None
        self.diversity_fake = self.diversity_real = None
        self.skipped = None
        self.last_kinds = set()

    def feed(self, stats: dict) -> list:
        """Take one tick's stats (a stats.jsonl line) and return its warnings as a list of HealthWarning."""
        c = self.cfg
        kimg = float(stats.get("Progress/kimg", 0.0))
        warm = kimg >= c.warmup_kimg
        out = []

        def add(kind, quantity, value, message):
            out.append(HealthWarning(kind, quantity, float(value), message))

        # Divergence: non-finite losses, steps skipped in this tick, and losses grown by orders of magnitude.
        for key, value in stats.items():
            if key.startswith("Loss/") and isinstance(value, float) and not math.isfinite(value):
                add("divergence", key, value, f"{key} is {value}: training diverged; lower the "
                    f"learning rates (train.glr, train.dlr) or raise train.r1_gamma, and resume from "
                    f"the last good snapshot")
                break
        skipped = stats.get("Progress/skipped_steps")
        if skipped is not None and self.skipped is not None and skipped > self.skipped:
            add("divergence", "Progress/skipped_steps", float(skipped - self.skipped),
                f"{skipped - self.skipped:g} steps had non-finite gradients this tick (skipped): lower "
                f"the learning rates (train.glr, train.dlr) or raise train.r1_gamma")
        self.skipped = skipped if skipped is not None else self.skipped
        for key, hist in self.history.items():
            value = stats.get(key)
            if not warm or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # values before the warm-up (R1 starts near 0) are no reference
            hist.append(float(value))
            del hist[:-3]
            if len(hist) < 3:
                continue
            m = median(hist)
            low = self.min_median.get(key)
            self.min_median[key] = m if low is None else min(low, m)
            if low is not None and m > 1 and m >= c.diverge_factor * max(low, 1e-12):
                add("divergence", key, m, f"{key} grew {m / max(low, 1e-12):.3g}x (from {low:.3g} "
                    f"to {m:.3g}, 3-tick medians): training is diverging; lower the learning "
                    f"rates (train.glr, train.dlr) or raise train.r1_gamma")

        # D overfitting: ADA at its ceiling and still losing, or D's logits separating reals from fakes.
        p, rt = stats.get("Progress/augment_p"), stats.get("Progress/ada_rt")
        pinned = p is not None and rt is not None and p >= 0.95 and rt >= c.overfit_rt
        self.overfit_streak = self.overfit_streak + 1 if pinned else 0
        if warm and self.overfit_streak >= c.overfit_ticks:
            add("d_overfit", "Progress/ada_rt", float(rt), f"ADA's r_t = {rt:.2f} with augment p = "
                f"{p:.2f} at its ceiling for {self.overfit_streak} ticks: D overfits the reals even "
                f"with full augmentation; use more data (data.xflip=true), raise train.r1_gamma, or "
                f"keep the best snapshot so far")
        real, fake = stats.get("Loss/scores/real"), stats.get("Loss/scores/fake")
        gap = real - fake if real is not None and fake is not None and self.loss_type == "ns" else None
        self.gap_streak = self.gap_streak + 1 if gap is not None and gap >= c.overfit_gap else 0
        self.gaps = (self.gaps + [gap])[-c.overfit_ticks:]
        # (Early in a healthy run D leads for a while and the gap then closes: only a gap still at its widest counts.)
        if warm and self.gap_streak >= c.overfit_ticks and gap >= max(self.gaps):
            add("d_overfit", "Loss/scores/real - Loss/scores/fake", float(gap),
                f"D's mean logit on reals exceeds that on fakes by {gap:.2f} for {self.gap_streak} "
                f"ticks: D separates them and G gets little signal; enable ADA (aug=ada), raise "
                f"train.r1_gamma, or lower train.dlr")

        # Mode collapse: the fakes' grid far less diverse than the reals', or falling away from its peak.
        if stats.get(DIVERSITY_REAL) is not None:
            self.diversity_real = float(stats[DIVERSITY_REAL])
        fresh = stats.get(DIVERSITY_FAKE)
        if fresh is not None:
            self.diversity_fake = float(fresh)
            if warm:
                self.peak_diversity = max(self.peak_diversity or 0.0, self.diversity_fake)
        dv, dr = self.diversity_fake, self.diversity_real
        if warm and dv is not None and dr:
            remedy = ("possible mode collapse; raise train.r1_gamma, enable ADA (aug=ada), or lower the learning "
                      "rates (train.glr, train.dlr)")
            if dv < c.collapse_ratio * dr:
                add("mode_collapse", DIVERSITY_FAKE, dv, f"G_ema's grid diversity {dv:.3f} is "
                    f"{dv / dr:.0%} of the reals' {dr:.3f} (mean pairwise distance at 8x8 px): "
                    f"{remedy}")
            elif self.peak_diversity and dv < (1 - c.collapse_drop) * self.peak_diversity and dv < dr:
                add("mode_collapse", DIVERSITY_FAKE, dv, f"G_ema's grid diversity fell to {dv:.3f} "
                    f"from its peak {self.peak_diversity:.3f} (the reals': {dr:.3f}): {remedy}")
        for w in out:
            w.new = w.kind not in self.last_kinds
        self.last_kinds = {w.kind for w in out}
        return out

