"""Tests of ADA: exact blits, analytic colours, resampling vs scipy, rates, double backward, the p heuristic."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ops import upfirdn2d
from ops.grid_sample_gradfix import grid_sample
from training import augment_ops
from training.augment import (AdaptiveP, AugmentPipe, make_adaptive_p, make_augment_pipe,
                              presets)
from training.config import AugConfig

ROOT = Path(__file__).resolve().parents[1]


# A pipe with the given multipliers and p.
def _pipe(p, **mult):
    pipe = AugmentPipe(**mult)
    pipe.p.fill_(p)
    return pipe


# A smooth 2-D test pattern (wavelengths >= 16 px), evaluated at pixel coordinates (x, y).
def _smooth(x, y):
    return np.sin(2 * np.pi * x / 16 + 0.3) * np.cos(2 * np.pi * y / 21 + 1.0) + 0.5 * np.sin(2 * np.pi * (x + y) / 29)


# p = 0: the full pipeline returns its input bit for bit (RGB and grey).
def test_p0_is_identity_bit_for_bit():
    torch.manual_seed(0)
    pipe = _pipe(0.0, **presets("bgcfnc"))
    for c in (1, 3):
        x = torch.randn(4, c, 16, 16)
        assert torch.equal(pipe(x), x)


# xflip at p = 1: every sample is exactly x or torch.flip(x) (the flip bit i ~ U{0,1}, app. B), and both occur.
def test_xflip_is_exact_flip():
    torch.manual_seed(1)
    x = torch.randn(64, 3, 16, 16)
    y = _pipe(1.0, xflip=1)(x)
    flipped = [torch.equal(y[n], torch.flip(x[n], dims=[2])) for n in range(64)]
    same = [torch.equal(y[n], x[n]) for n in range(64)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 16 <= sum(flipped) <= 48


# rotate90 at p = 1: every sample equals torch.rot90(x, k) for some k in 0..3, and every k occurs.
def test_rotate90_is_exact_rot90():
    torch.manual_seed(2)
    x = torch.randn(64, 3, 16, 16)
    y = _pipe(1.0, rotate90=1)(x)
    ks = []
    for n in range(64):
        match = [k for k in range(4) if torch.equal(y[n], torch.rot90(x[n], k, dims=(1, 2)))]
        assert len(match) == 1
        ks.append(match[0])
    assert set(ks) == {0, 1, 2, 3}


# xint at p = 1: every sample equals an integer roll with reflect padding (built independently with np.pad) by
# some shift within +-0.125 of the size, and non-zero shifts occur.
def test_xint_is_exact_reflect_roll():
    torch.manual_seed(3)
    x = torch.randn(32, 3, 16, 16)
    y = _pipe(1.0, xint=1)(x).numpy()
    xp = np.pad(x.numpy(), [(0, 0), (0, 0), (2, 2), (2, 2)], mode="reflect")
    shifts = []
    for n in range(32):
        match = [(tx, ty) for tx in range(-2, 3) for ty in range(-2, 3)
                 if np.array_equal(y[n], xp[n, :, 2 - ty:18 - ty, 2 - tx:18 - tx])]
        assert len(match) == 1
        shifts.append(match[0])
    assert len(set(shifts)) > 5


# Brightness on a constant image: each sample is shifted by one value on every pixel and channel, and the
# shifts have the published spread N(0, 0.2^2) (chi-square bound on the sample std, 2000 samples: +-10%).
def test_brightness_on_constant_image():
    torch.manual_seed(4)
    x = torch.full([2000, 3, 4, 4], 0.1)
    d = _pipe(1.0, brightness=1)(x) - x
    assert torch.allclose(d, d[:, :1, :1, :1].expand_as(d), atol=1e-6)
    assert abs(d[:, 0, 0, 0].std().item() - 0.2) < 0.02


# Contrast scales around mid-grey: a 0 image is a fixed point, a grey 0.3 image becomes 0.3 * 2^N(0, 0.5^2).
def test_contrast_fixed_point_and_spread():
    torch.manual_seed(5)
    pipe = _pipe(1.0, contrast=1)
    assert torch.equal(pipe(torch.zeros(8, 3, 4, 4)), torch.zeros(8, 3, 4, 4))
    y = pipe(torch.full([2000, 3, 4, 4], 0.3))
    assert torch.allclose(y, y[:, :1, :1, :1].expand_as(y), atol=1e-6)
    assert abs(torch.log2(y[:, 0, 0, 0] / 0.3).std().item() - 0.5) < 0.05


# Saturation leaves any grey fixed and keeps luma (the channel mean) of coloured pixels, changing their chroma.
def test_saturation_grey_fixed_point_and_luma():
    torch.manual_seed(6)
    pipe = _pipe(1.0, saturation=1)
    grey = torch.full([16, 3, 4, 4], 0.3)
    assert torch.allclose(pipe(grey), grey, atol=1e-6)
    x = torch.rand(64, 3, 4, 4) * 2 - 1
    y = pipe(x)
    assert torch.allclose(y.mean(1), x.mean(1), atol=1e-5)
    chroma_ratio = (y - y.mean(1, keepdim=True)).norm(dim=1) / (x - x.mean(1, keepdim=True)).norm(dim=1)
    assert torch.allclose(chroma_ratio, chroma_ratio[:, :1, :1].expand_as(chroma_ratio), rtol=1e-4)
    assert chroma_ratio.std() > 0.1


# Hue rotation preserves luma and the chroma length of each pixel while changing the colour.
def test_hue_preserves_luma_and_chroma_norm():
    torch.manual_seed(7)
    x = torch.rand(64, 3, 4, 4) * 2 - 1
    y = _pipe(1.0, hue=1)(x)
    assert torch.allclose(y.mean(1), x.mean(1), atol=1e-5)
    cx, cy = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    assert torch.allclose(cx.norm(dim=1), cy.norm(dim=1), atol=1e-5)
    assert (y - x).abs().amax() > 0.5


# Luma flip: each sample is unchanged or has its luma negated with its chroma kept (i ~ U{0,1}).
def test_lumaflip_negates_luma():
    torch.manual_seed(8)
    x = torch.rand(64, 3, 4, 4) * 2 - 1
    y = _pipe(1.0, lumaflip=1)(x)
    flipped = 0
    for n in range(64):
        if not torch.allclose(y[n], x[n], atol=1e-6):
            assert torch.allclose(y[n].mean(0), -x[n].mean(0), atol=1e-5)
            assert torch.allclose(y[n] - y[n].mean(0), x[n] - x[n].mean(0), atol=1e-5)
            flipped += 1
    assert 16 <= flipped <= 48


# One-channel images: brightness/contrast act on the grey value; hue and saturation are skipped (exact no-op).
def test_one_channel_colour():
    torch.manual_seed(9)
    x = torch.rand(32, 1, 4, 4)
    assert torch.equal(_pipe(1.0, hue=1, saturation=1)(x), x)
    y = _pipe(1.0, brightness=1)(x)
    d = y - x
    assert torch.allclose(d, d[:, :, :1, :1].expand_as(d), atol=1e-6) and d.abs().amax() > 0


# The up -> down wavelet pair is an exact identity for an identity matrix (orthonormal sym6), so resampling
# adds no blur of its own; tolerance: the float32-rounded taps.
def test_geometric_identity_matrix_is_lossless():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    hz = upfirdn2d.setup_filter(augment_ops.SYM6)
    y = augment_ops.geometric_transform(x, torch.eye(3, dtype=torch.float64).repeat(2, 1, 1), hz)
    assert torch.allclose(y, x, atol=1e-5)


# Geometric transforms (scale, rotations, anisotropy, fractional translation at p = 1) of a smooth image agree with
# scipy.ndimage.affine_transform (cubic spline, mirror = the same reflection) of the same matrix wherever the source
# point lies 3 px inside the image. Tolerance 0.03 on a signal of range ~3: bilinear sampling on the 2x grid errs
# by about (pi * 0.5 / 16)^2 / 2 ~ 0.5 % of the amplitude for 16-px wavelengths, plus the sym6 pass-band droop and
# its residual phase; a wrong matrix (the inverse) errs by > 0.3.
def test_geometric_matches_scipy_affine_transform():
    import scipy.ndimage as ndi
    torch.manual_seed(10)
    h = w = 32
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = _smooth(xx, yy)
    x = torch.tensor(img)[None, None].repeat(6, 3, 1, 1)
    pipe = _pipe(1.0, **presets("geom"))
    y = pipe(x)[:, 0].numpy()
    cx, cy = (w - 1) / 2, (h - 1) / 2
    for n in range(6):
        for G, expect_match in ((pipe.last_geom[n].double().numpy(), True),
                                (np.linalg.inv(pipe.last_geom[n].double().numpy()), False)):
            m = np.array([[G[1, 1], G[1, 0]], [G[0, 1], G[0, 0]]])  # scipy works in (row, col)
            off = np.array([cy - G[1, 1] * cy - G[1, 0] * cx + G[1, 2], cx - G[0, 0] * cx - G[0, 1] * cy + G[0, 2]])
            ref = ndi.affine_transform(img, m, offset=off, order=3, mode="mirror")
            src = np.einsum("ij,jhw->ihw", m, np.stack([yy, xx]).astype(float)) + off[:, None, None]
            inside = (src[0] > 3) & (src[0] < h - 4) & (src[1] > 3) & (src[1] < w - 4)
            if not expect_match:
                assert np.abs(y[n] - ref)[inside].max() > 0.3
                continue
            assert inside.sum() > 50
            assert np.abs(y[n] - ref)[inside].max() < 0.03


# Each transform alone at p = 0.3 changes a sample at the rate p * multiplier (times the chance that its draw is
# not an identity: 1/2 for the flip bits, 3/4 for rotate90's k != 0, 15/16 for a 16-px integer shift, and
# 1 - (1 - p)^4 for the four independently drawn filter bands); 5-sigma binomial bounds.
@pytest.mark.parametrize("name,rate", [
    ("xflip", 0.5), ("rotate90", 0.75), ("xint", 15 / 16), ("scale", 1), ("rotate", 1), ("aniso", 1),
    ("xfrac", 1), ("brightness", 1), ("contrast", 1), ("lumaflip", 0.5), ("hue", 1), ("saturation", 1),
    ("imgfilter", None), ("noise", 1), ("cutout", 1)])
def test_rate_of_application(name, rate):
    torch.manual_seed(11)
    p, n = 0.3, 3000
    expected = 1 - (1 - p) ** 4 if rate is None else p * rate
    x = torch.rand(n, 3, 16, 16) * 2 - 1
    y = _pipe(p, **{name: 1})(x)
    changed = ((y - x).abs().flatten(1).amax(1) > 1e-4).float().mean().item()
    assert abs(changed - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


# Second-order gradients through the whole pipeline (every transform, p = 0.7 so that some samples skip some
# stages), checked numerically in float64 (fast mode: random projections of the Jacobians, to keep it ~1 s);
# the seed is re-set inside the function so that every call draws the same augmentation.
def test_gradgradcheck_full_pipeline():
    pipe = _pipe(0.7, **presets("bgcfnc"))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(inp):
        torch.manual_seed(12)
        return pipe(inp)

    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-4, fast_mode=True)


# grid_sample_gradfix: same values and first-order grads as PyTorch's grid_sample, a correct double backward
# w.r.t. the input (gradgradcheck, float64), and a clear error for second derivatives involving the grid.
def test_grid_sample_gradfix():
    torch.manual_seed(13)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(2, 4, 3, 2, dtype=torch.float64) * 2.4 - 1.2  # some points outside: zeros padding
    ref = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.allclose(grid_sample(x, grid), ref)
    assert torch.autograd.gradgradcheck(lambda inp: grid_sample(inp, grid), (x,))
    g = grid.clone().requires_grad_()
    mine = torch.autograd.grad(grid_sample(x, g).square().sum(), g)[0]
    theirs = torch.autograd.grad(torch.nn.functional.grid_sample(x, g, align_corners=False).square().sum(), g)[0]
    assert torch.allclose(mine, theirs)
    gx = torch.autograd.grad(grid_sample(x, g).square().sum(), x, create_graph=True)[0]
    with pytest.raises(NotImplementedError):
        gx.sum().backward()


# The loop's use of AdaptiveP at a step boundary: when an update is due after minibatch `batch_idx`, the
# statistic summed over ranks (one host read) moves p. Returns True when p was updated.
def _step(ada, batch_idx):
    from training import dist
    return ada.due(batch_idx) and ada.update(*dist.sum_to_host(ada.pending()))


# AdaptiveP with D's sign fixed at +1: p rises by exactly batch * interval / (ada_kimg * 1000) per update, only
# every `interval` minibatches, and r_t reads 1; the pipe's buffer follows.
def test_adaptive_p_rises_at_specified_rate():
    pipe = _pipe(0.0)
    ada = AdaptiveP(pipe, target=0.6, interval=4, ada_kimg=500, batch_size=32)
    delta = 32 * 4 / (500 * 1000)
    for batch_idx in range(40):
        for _ in range(2):  # two accumulation rounds per minibatch
            ada.accumulate(torch.rand(16, 1) + 0.1)
        updated = _step(ada, batch_idx)
        assert updated == ((batch_idx + 1) % 4 == 0)
        assert ada.p == pytest.approx(delta * ((batch_idx + 1) // 4), abs=1e-12)
    assert ada.r_t == 1.0
    assert pipe.p.item() == pytest.approx(10 * delta, rel=1e-6)


# With sign -1, p falls and clamps at 0 (it never goes negative); a new ada_kimg changes the step size.
def test_adaptive_p_falls_and_clamps_at_zero():
    pipe = _pipe(0.01)
    ada = AdaptiveP(pipe, target=0.6, interval=1, ada_kimg=100, batch_size=64)
    ada.ada_kimg = 200.0
    p0 = ada.p  # 0.01 as stored in the pipe's float32 buffer
    for batch_idx in range(3):
        ada.accumulate(-torch.rand(8) - 0.1)
        _step(ada, batch_idx)
        assert ada.p == pytest.approx(p0 - (batch_idx + 1) * 64 / 200_000, abs=1e-12)
    ada.ada_kimg = 1.0  # steps of 0.064: the next update would take p below 0
    for batch_idx in range(3, 6):
        ada.accumulate(-torch.ones(8))
        _step(ada, batch_idx)
        assert ada.p == 0.0 and pipe.p.item() == 0.0 and ada.r_t == -1.0


# The checkpoint state restores p, r_t and the pending accumulators (a resumed run updates like an unbroken one).
def test_adaptive_p_state_dict_round_trip():
    a = AdaptiveP(_pipe(0.25), interval=4, ada_kimg=10, batch_size=100)
    for i in range(6):  # one update (r_t = 1) after minibatch 3, then two minibatches pending
        a.accumulate(torch.ones(3))
        _step(a, i)
    b = AdaptiveP(_pipe(0.0), interval=4, ada_kimg=10, batch_size=100)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.p == a.p == pytest.approx(0.29) and b.r_t == a.r_t == 1.0 and float(b.pipe.p) == pytest.approx(0.29)
    for ada in (a, b):
        ada.accumulate(-torch.ones(1))  # with the 6 pending +1s: r_t = 5/7 > 0.6 (without them it would be -1)
        _step(ada, 6), _step(ada, 7)
    assert a.p == b.p == pytest.approx(0.33) and a.r_t == b.r_t == pytest.approx(5 / 7)


# R1 through augmentation: the gradient of D(pipe(x)) w.r.t. the reals exists with create_graph, the penalty is
# finite and non-zero, and its backward reaches every parameter of D.
def test_r1_through_augmentation():
    torch.manual_seed(14)
    D = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.LeakyReLU(0.2),
                            torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.LeakyReLU(0.2),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 1))
    pipe = _pipe(1.0, **presets("bgc"))
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_()
    logits = D(pipe(x))
    (r1_grads,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    penalty = r1_grads.square().sum(dim=[1, 2, 3]).mean()
    assert torch.isfinite(penalty) and penalty.item() > 0
    penalty.backward()
    for param in D.parameters():
        if param.ndim > 1:
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
        else:  # biases only move ReLU kinks, so R1 (a gradient w.r.t. x) does not depend on them
            assert param.grad is None or torch.isfinite(param.grad).all()


# conf/aug/*.yaml mirror AugConfig's fields, build the right objects, and every preset is constructible.
def test_configs_and_presets():
    from omegaconf import OmegaConf
    fields = {f.name for f in __import__("dataclasses").fields(AugConfig)}
    built = {}
    for path in sorted((ROOT / "conf" / "aug").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert set(cfg.keys()) == fields, path.name
        pipe = make_augment_pipe(cfg)
        built[cfg.mode] = (pipe, make_adaptive_p(cfg, pipe, batch_size=32))
    assert built["noaug"] == (None, None)
    assert isinstance(built["ada"][1], AdaptiveP) and built["fixed"][1] is None
    assert float(built["fixed"][0].p) == pytest.approx(0.2)
    assert make_adaptive_p(AugConfig(), make_augment_pipe(AugConfig()), 32, from_weights=True).ada_kimg == 100
    assert presets("bgc") == dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
                                  brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    for name in ("blit", "geom", "color", "filter", "noise", "cutout", "bg", "bgc", "bgcf", "bgcfn", "bgcfnc"):
        AugmentPipe(**presets(name))
    with pytest.raises(ValueError):
        presets("nope")


# Worker of the two-process test: rank 0 sees only positive logits, rank 1 only negative ones; the global
# r_t = 0 < 0.6 makes p fall on both ranks (rank 0's own r_t = 1 would make it rise).
def _worker(out_dir):
    from training import dist
    dist.init(cpu=True)
    pipe = _pipe(0.5)
    ada = AdaptiveP(pipe, target=0.6, interval=2, ada_kimg=1, batch_size=20)
    sign = 1.0 if dist.get_rank() == 0 else -1.0
    for batch_idx in range(4):
        ada.accumulate(sign * (torch.rand(10) + 0.1))
        _step(ada, batch_idx)
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"p": ada.p, "r_t": ada.r_t, "pipe_p": float(pipe.p)}, f)
    dist.end_process(0)  # a gloo rank can abort in the interpreter's teardown ("terminate called without ...")


# Two gloo processes under `accelerate launch`: p and r_t are identical on both ranks and use the global statistic.
@pytest.mark.slow
def test_adaptive_p_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), __file__]
    env = dict(os.environ, PYTHONPATH=str(ROOT), ADA_TEST_OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["r_t"] == 0.0 and r0["p"] == pytest.approx(0.5 - 2 * 20 * 2 / 1000, abs=1e-12)


if __name__ == "__main__":
    _worker(os.environ["ADA_TEST_OUT"])
