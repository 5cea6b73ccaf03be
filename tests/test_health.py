"""Tests for the health warnings: each rule driven by synthetic per-tick stats, and the diversity measure."""
import json
import math

import numpy as np
import pytest
import torch

from training.config import HealthConfig
from training.report.health import DIVERSITY_FAKE, DIVERSITY_REAL, HealthMonitor, diversity
from training.report.tick import write_report


# A healthy tick at `kimg` (numbers of the order a tiny run shows), with `extra` keys overriding.
def tick(kimg, **extra):
    stats = {"Progress/kimg": float(kimg), "Loss/G/loss": 1.5, "Loss/D/loss_real": 0.45, "Loss/D/loss_fake": 0.45,
             "Loss/r1_penalty": 0.5, "Loss/scores/real": 0.4, "Loss/scores/fake": -0.4, "Progress/skipped_steps": 0,
             "Progress/augment_p": 0.1, "Progress/ada_rt": 0.6}
    stats.update({k.replace("__", "/"): v for k, v in extra.items()})
    return stats


# Feed ticks and return the kinds warned at each.
def kinds(monitor, ticks):
    return [sorted({w.kind for w in monitor.feed(t)}) for t in ticks]


def test_healthy_run_has_no_warnings():
    m = HealthMonitor(HealthConfig(warmup_kimg=2))
    ticks = [tick(k, **{DIVERSITY_FAKE.replace("/", "__"): 0.45, DIVERSITY_REAL.replace("/", "__"): 0.5})
             for k in range(40)]
    assert kinds(m, ticks) == [[]] * 40


def test_diversity_measures_spread_of_downsampled_images():
    rng = np.random.default_rng(0)
    same = torch.from_numpy(np.repeat(rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8), 8, axis=0))
    assert diversity(same) == 0.0
    # Two flat images at -1 and +1: every 8x8 pixel differs by 2, so the distance / sqrt(dim) is exactly 2.
    flat = torch.stack([torch.full([3, 16, 16], -1.0), torch.full([3, 16, 16], 1.0)])
    assert diversity(flat) == pytest.approx(2.0, rel=1e-12)
    # uint8 and [-1, 1] float inputs mean the same; varied images are more diverse than near-copies.
    varied = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    as_float = torch.from_numpy(varied).float() / 127.5 - 1
    assert diversity(torch.from_numpy(varied)) == pytest.approx(diversity(as_float), rel=1e-6)
    near = np.clip(varied[:1].astype(int) + rng.integers(-5, 6, (8, 3, 32, 32)), 0, 255).astype(np.uint8)
    assert diversity(torch.from_numpy(near)) < 0.2 * diversity(torch.from_numpy(varied))
    with pytest.raises(ValueError, match="at least 2"):
        diversity(as_float[:1])


def test_mode_collapse_by_ratio_and_by_falling_trend():
    cfg = HealthConfig(warmup_kimg=5, collapse_ratio=0.5, collapse_drop=0.3)
    m = HealthMonitor(cfg)
    fake, real = DIVERSITY_FAKE.replace("/", "__"), DIVERSITY_REAL.replace("/", "__")
    # Low diversity during warm-up is no warning (a new G is near-constant); after it, below half the reals' is.
    got = kinds(m, [tick(k, **{fake: 0.1, real: 0.5}) for k in range(8)])
    assert got[:5] == [[]] * 5 and got[5:] == [["mode_collapse"]] * 3
    w = m.feed(tick(9, **{fake: 0.1, real: 0.5}))[0]
    assert w.quantity == DIVERSITY_FAKE and w.value == pytest.approx(0.1) and "r1_gamma" in w.message
    assert not w.new  # the same kind as the previous tick: the status line does not repeat the message
    # A falling trend: 0.48 -> 0.30 is above half the reals' (0.25) but 37% below its peak.
    m = HealthMonitor(cfg)
    got = kinds(m, [tick(k, **{fake: v, real: 0.5}) for k, v in zip(range(5, 10), (0.4, 0.48, 0.45, 0.40, 0.30))])
    assert got == [[], [], [], [], ["mode_collapse"]]
    # Diversity above the reals' is never collapse, however far it fell.
    m = HealthMonitor(cfg)
    assert kinds(m, [tick(k, **{fake: v, real: 0.3}) for k, v in ((5, 0.9), (6, 0.4))]) == [[], []]


def test_d_overfit_from_ada_at_its_ceiling_and_from_separated_logits():
    cfg = HealthConfig(warmup_kimg=0, overfit_ticks=3)
    m = HealthMonitor(cfg)
    pinned = [tick(k, Progress__augment_p=1.0, Progress__ada_rt=0.95) for k in range(4)]
    assert kinds(m, pinned) == [[], [], ["d_overfit"], ["d_overfit"]]
    assert kinds(m, [tick(5, Progress__augment_p=0.8, Progress__ada_rt=0.95)]) == [[]]  # p not at its ceiling
    m = HealthMonitor(cfg)
    sep = [tick(k, Loss__scores__real=3.0, Loss__scores__fake=-2.5) for k in range(3)]
    got = m.feed(sep[0]), m.feed(sep[1]), m.feed(sep[2])
    assert [bool(g) for g in got] == [False, False, True]
    assert got[2][0].kind == "d_overfit" and got[2][0].value == pytest.approx(5.5) and "aug=ada" in got[2][0].message
    # A gap past its widest is D's early lead in a healthy run closing (make train: 6.3 at 12 kimg, 4.2 at 24).
    m = HealthMonitor(cfg)
    closing = [tick(k, Loss__scores__real=g / 2, Loss__scores__fake=-g / 2)
               for k, g in enumerate((6.3, 5.3, 5.5, 4.9, 4.2))]
    assert kinds(m, closing) == [[]] * 5
    # A separation that breaks off resets the streak; hinge or WGAN logits are not judged by this rule.
    assert kinds(m, [tick(4, Loss__scores__real=0.5)]) == [[]]
    m = HealthMonitor(cfg, loss_type="wgan-gp")
    assert kinds(m, sep) == [[], [], []]


def test_divergence_from_growth_nonfinite_losses_and_skipped_steps():
    cfg = HealthConfig(warmup_kimg=2, diverge_factor=1000)
    m = HealthMonitor(cfg)
    r1 = [0.001, 0.001, 0.002, 0.01, 0.01, 0.02, 0.03, 5.0, 40.0, 60.0]
    got = kinds(m, [tick(k, Loss__r1_penalty=v) for k, v in enumerate(r1)])
    # Growth before the warm-up (0.001 -> 0.01 is normal: R1 starts near 0) is no reference; from 0.01 (the smallest
    # 3-tick median after warm-up) to a median of 40 is 4000x.
    assert got[:9] == [[]] * 9 and got[9] == ["divergence"]
    w = m.feed(tick(11, Loss__r1_penalty=80.0))[0]
    assert w.quantity == "Loss/r1_penalty" and w.value == pytest.approx(60.0) and "train.glr" in w.message
    m = HealthMonitor(cfg)
    assert kinds(m, [tick(0, Loss__G__loss=math.nan)]) == [["divergence"]]
    m = HealthMonitor(cfg)
    got = kinds(m, [tick(0), tick(1, Progress__skipped_steps=3), tick(2, Progress__skipped_steps=3)])
    assert got == [[], ["divergence"], []]


def test_status_line_and_stats_jsonl_carry_the_warnings(tmp_path, capsys):
    m = HealthMonitor(HealthConfig(warmup_kimg=0))
    stats = tick(3, Loss__G__loss=math.inf)
    stats.update({"Progress/tick": 3, "Timing/total_sec": 10.0, "Timing/sec_per_kimg": 3.0,
                  "Resources/peak_mem_gb": 0.5})
    stats["Health/warnings"] = [w.as_dict() for w in m.feed(stats)]
    write_report(stats, tmp_path, None, None, 3000)
    out = capsys.readouterr().out
    assert "WARN divergence" in out and "warning (divergence): Loss/G/loss is inf" in out
    line = json.loads((tmp_path / "stats.jsonl").read_text())
    assert line["Health/warnings"][0]["kind"] == "divergence"
    assert line["Health/warnings"][0]["quantity"] == "Loss/G/loss"
