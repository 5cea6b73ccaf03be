"""Tests for projection: explicit-noise synthesis, schedule, w recovery, W+, noise regularization, LPIPS, script."""
import json
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from networks.discriminator import Discriminator
from networks.generator import Generator
from scripts import generate, project as proj_script
from training.eval import lpips as L
from training.eval.projector import (FALLBACK_LABEL, compute_w_stats, latent_noise_scale, learning_rate,
                                     lpips_input, noise_regularization, project, psnr, ssim)
from training.io.checkpoint import save_snapshot
from training.io.images import to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Z = 32


pytestmark = pytest.mark.usefixtures("ref_ops_one_thread")


def make_G(res=16, seed=0, noise_strength=0.0, arch="skip", **synthesis_kwargs):
    """A small random G (z = w = 32, 2 mapping layers, 32 channels). ToRGB weights are scaled by 1/4 so that, like a
    trained G, its images stay mostly inside [-1, 1]; otherwise uint8 targets are clipped and not reachable."""
    torch.manual_seed(seed)
    sn = synthesis_kwargs.get("sn", False)
    G = Generator(Z, 0, Z, res, 3, mapping_kwargs=dict(num_layers=2, **(dict(sn=True) if sn else {})),
                  synthesis_kwargs=dict(channel_base=512, channel_max=32, architecture=arch,
                                        **synthesis_kwargs)).eval()
    for name, m in G.named_modules():
        if name.endswith("torgb"):
            m.weight.data *= 0.25
    for _, layer in G.synthesis.noise_layers():
        layer.noise_strength.data.fill_(noise_strength)
    return G.requires_grad_(False)


def render(G, ws):
    """uint8 [N, 3, H, W] images of G at ws (constant noise)."""
    return torch.from_numpy(to_uint8(G.synthesis(ws, noise_mode="const")).transpose(0, 3, 1, 2).copy())


def known_ws(G, w_avg, n, seed):
    """ws [N, num_ws, w_dim] halfway between w_avg and mapped z (close to w_avg, where real images project)."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(n, Z)).float()
    w = G.mapping(z, torch.zeros(n, 0))
    return w_avg + 0.5 * (w - w_avg)


class RecordingLoss:
    """LPIPS's stand-in for the projector tests: records every image it is given (the targets first, then each step's
    rendering) and compares them by mean squared difference."""

    def __init__(self):
        self.seen = []

    def features(self, img):
        """Record img; its features are the image itself."""
        self.seen.append(img.detach().clone())
        return img

    def distance(self, a, b):
        """Mean squared difference per sample [N]."""
        return (a - b).square().mean(dim=[1, 2, 3])


def first_step_inputs(G, n, seed, w_stats):
    """The ws [N, num_ws, w_dim] and noise maps {name: [N, 1, res, res]} that project() renders at its first step, drawn
    as it draws them: per target, a torch.Generator seeded by seed + index gives first the initial noise maps (layer by
    layer) and then the step's latent noise (W mode: one w, broadcast to all layers)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    noise = {name: torch.stack([torch.randn([1, layer.resolution, layer.resolution], generator=g) for g in gens])
             for name, layer in G.synthesis.noise_layers()}
    w_avg, w_std = w_stats
    w_opt = w_avg.reshape(1, 1, -1).repeat(n, 1, 1)
    w_noise = torch.stack([torch.randn(w_opt.shape[1:], generator=g) for g in gens]) * latent_noise_scale(0, w_std)
    return (w_opt + w_noise).expand(n, G.num_ws, -1), noise


@pytest.mark.parametrize("arch,extra", [("skip", {}), ("resnet", {}), ("orig", {}), ("skip", dict(attention=[8])),
                                        ("resnet", dict(sn=True, attention=[8]))])
def test_projector_renders_g_synthesis(arch, extra):
    """The image the projector optimizes is G.synthesis(ws, noise=maps) for its ws and per-sample noise maps,
    exactly, for every architecture, with self-attention (open gate) and with spectral norm (model.sn=g: SN mapping
    and synthesis). Before the projector called G.synthesis, its own copy of the walk used the raw conv weights W
    instead of W / sigma(W), which demodulation almost cancels: the SN case differed by about 1e-6."""
    G = make_G(arch=arch, noise_strength=0.3, **extra)
    if "attention" in extra:
        G.synthesis.b8.attn.gamma.data.fill_(0.5)
    stats = compute_w_stats(G, 500)
    targets = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    rec = RecordingLoss()
    project(G, targets, num_steps=1, loss="lpips", perceptual=rec, w_stats=stats, seed=4)
    assert len(rec.seen) == 2  # the targets, then the one step's rendering
    ws, noise = first_step_inputs(G, 2, 4, stats)
    with torch.no_grad():
        img = G.synthesis(ws, noise=noise, noise_mode="none", fused_modconv=False)
    assert torch.equal(rec.seen[1], lpips_input((img + 1) * 127.5))


def test_projector_noise_maps_get_gradients_through_g_synthesis():
    """The projector's noise maps are the tensors G.synthesis gets as `noise` (every noise layer, one map per target),
    and they receive gradients through it: after the last step a layer's map has a nonzero gradient exactly when the
    layer's noise_strength is nonzero."""
    G = make_G(noise_strength=0.5)
    G.synthesis.b8.conv0.noise_strength.data.zero_()
    calls = []
    hook = G.synthesis.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["noise"]),
                                                 with_kwargs=True)
    try:
        r = project(G, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), num_steps=3, loss="fallback",
                    w_stats=compute_w_stats(G, 500), regularize_noise_weight=0)
    finally:
        hook.remove()
    assert len(calls) == 3 and all(noise is calls[0] for noise in calls)
    names = [name for name, _ in G.synthesis.noise_layers()]
    assert list(calls[0]) == names == list(r["noise"])
    for name, layer in G.synthesis.noise_layers():
        v = calls[0][name]
        assert v.shape == (2, 1, layer.resolution, layer.resolution) and v.is_leaf and v.requires_grad
        assert torch.equal(v.detach(), r["noise"][name])
        assert (v.grad.abs().sum() > 0) == (name != "b8.conv0"), name


def test_schedule():
    """The published schedule: lr ramps up linearly over 5%, down by a cosine over the last 25%; latent noise fades
    quadratically to zero at 75%."""
    assert learning_rate(0.0) == 0
    assert learning_rate(0.025) == pytest.approx(0.05)
    assert learning_rate(0.5) == pytest.approx(0.1)
    assert learning_rate(0.875) == pytest.approx(0.05)
    assert learning_rate(1.0) == pytest.approx(0.0, abs=1e-12)
    assert latent_noise_scale(0.0, 2.0) == pytest.approx(0.1)
    assert latent_noise_scale(0.375, 2.0) == pytest.approx(0.1 * 0.25)
    assert latent_noise_scale(0.8, 2.0) == 0


def test_project_recovers_known_w():
    """An image generated from a known w (W mode) is projected back. Threshold: the w_avg image reaches 24-28 dB on
    these targets and 8-bit quantization caps an exact match near 59 dB (80 steps reach 57-59 dB); we ask for 40 dB and
    15 dB above w_avg's image, i.e. the optimization found the target rather than a blur of it, and for a w 4x closer to
    the true one than w_avg is (80 steps give 20-50x)."""
    G = make_G()
    w_avg, w_std = stats = compute_w_stats(G, 2000)
    ws = known_ws(G, w_avg, 3, seed=1)
    targets = render(G, ws)
    r = project(G, targets, num_steps=80, loss="fallback", w_stats=stats, seed=0)
    assert r["w"].shape == (3, G.num_ws, G.w_dim) and r["loss_kind"] == FALLBACK_LABEL
    assert torch.equal(r["w"][:, 0], r["w"][:, -1])  # W mode: one w broadcast to all layers
    avg_psnr = psnr(render(G, w_avg.reshape(1, 1, -1).repeat(3, G.num_ws, 1)).numpy(), targets.numpy())
    proj_psnr = psnr(render(G, r["w"]).numpy(), targets.numpy())
    assert (proj_psnr > 40).all() and (proj_psnr > avg_psnr + 15).all(), (proj_psnr, avg_psnr)
    err = (r["w"][:, 0] - ws[:, 0]).norm(dim=1)
    err_avg = (w_avg - ws[:, 0]).norm(dim=1)
    assert (err < 0.25 * err_avg).all(), (err, err_avg)


def test_w_plus_reaches_lower_loss_than_w():
    """Targets made with a different w for every layer are outside W: W+ fits them clearly better (at 50 steps its loss
    is about half of W's; we ask for below 3/4)."""
    G = make_G(seed=1)
    stats = compute_w_stats(G, 2000)
    mixed = torch.stack([known_ws(G, stats[0], G.num_ws, seed=10 + i)[:, 0] for i in range(2)])
    targets = render(G, mixed)
    rw = project(G, targets, num_steps=50, w_space="w", loss="fallback", w_stats=stats)
    rp = project(G, targets, num_steps=50, w_space="w+", loss="fallback", w_stats=stats)
    assert (rp["dist"] < 0.75 * rw["dist"]).all(), (rp["dist"], rw["dist"])
    assert not torch.equal(rp["w"][:, 0], rp["w"][:, -1])


def test_noise_regularization_lowers_autocorrelation():
    """With noise that matters (strength 1), the image loss pushes structure into the noise maps; the regularization
    keeps their autocorrelation (measured over the same pyramid) lower. Same seed, so the same starting maps."""
    G = make_G(seed=2, noise_strength=1.0)
    stats = compute_w_stats(G, 2000)
    targets = render(G, known_ws(G, stats[0], 2, seed=4)).flip(3)  # mirrored: not reachable by w alone
    kw = dict(num_steps=20, loss="fallback", w_stats=stats, seed=5)
    free = project(G, targets, regularize_noise_weight=0, **kw)
    reg = project(G, targets, regularize_noise_weight=1e5, **kw)
    ac_free, ac_reg = noise_regularization(free["noise"]), noise_regularization(reg["noise"])
    assert (ac_reg < 0.5 * ac_free).all(), (ac_reg, ac_free)
    for v in reg["noise"].values():  # renormalized every step: zero mean, unit variance per target
        assert v.mean(dim=[1, 2, 3]).abs().max() < 1e-5
        assert (v.square().mean(dim=[1, 2, 3]) - 1).abs().max() < 1e-4


def test_batched_equals_single():
    """Four targets in one batch give the same result as four single projections with the same per-target seeds."""
    G = make_G(seed=3, noise_strength=0.2)
    stats = compute_w_stats(G, 1000)
    targets = render(G, known_ws(G, stats[0], 4, seed=6))
    kw = dict(num_steps=20, loss="fallback", w_stats=stats, seed=7)
    batch = project(G, targets, indices=[0, 1, 2, 3], **kw)
    for i in range(4):
        single = project(G, targets[i:i + 1], indices=[i], **kw)
        assert torch.allclose(single["w"], batch["w"][i:i + 1], atol=1e-5, rtol=0)
        assert torch.allclose(single["dist"], batch["dist"][i:i + 1], rtol=1e-5, atol=1e-7)
        for k, v in single["noise"].items():
            assert torch.allclose(v, batch["noise"][k][i:i + 1], atol=1e-5, rtol=0)
    other = project(G, targets[:1], indices=[1], **kw)  # another index means another seed
    assert not torch.allclose(other["w"], batch["w"][:1], atol=1e-3, rtol=0)


# --- LPIPS --------------------------------------------------------------------------------------------------

class ScriptedVGG(nn.Module):
    """The test's own stand-in for NVIDIA's vgg16.pt: the same calling convention, written separately from
    training/eval/lpips.py: per tapped layer, channel-normalized features * sqrt(w / (H*W)), flattened and
    concatenated."""

    def __init__(self, features: nn.Sequential, lins):
        super().__init__()
        self.features = features
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, img: torch.Tensor, resize_images: bool = True, return_lpips: bool = False) -> torch.Tensor:
        """Concatenated, weighted and normalized VGG features of images in [0, 255] (NVIDIA's calling convention)."""
        x = (img / 127.5 - 1.0 - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == 3 or i == 8 or i == 15 or i == 22 or i == 29:
                taps.append(x)
        lins = [self.lin0, self.lin1, self.lin2, self.lin3, self.lin4]
        out = []
        for f, w in zip(taps, lins):
            n = f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + 1e-10)
            out.append((n * torch.sqrt(w / float(f.shape[2] * f.shape[3]))).reshape(f.shape[0], -1))
        return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    """Random VGG16 weights written three ways: a TorchScript file, a torchvision-style state dict, the lin layers."""
    d = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    features = make_layers(cfgs["D"], batch_norm=False)[:30]
    for m in features:
        if isinstance(m, nn.Conv2d):  # keep activations O(1) through 13 layers
            nn.init.normal_(m.weight, std=(2 / (m.in_channels * 9)) ** 0.5)
            nn.init.normal_(m.bias, std=0.1)
    lins = [torch.rand(1, c, 1, 1) for c in L.TAP_CHANNELS]
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but NVIDIA's file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.script(ScriptedVGG(features, lins).eval())
    ts.save(str(d / "vgg16.pt"))
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored, as in torchvision's file
    torch.save(state, d / L.TV_FILE)
    torch.save({f"lin{i}.model.1.weight": w for i, w in enumerate(lins)}, d / L.LIN_FILE)
    return d


# Image pairs in [0, 255] (48 px: every VGG stage keeps >= 3x3).
def _pairs():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 3, 48, 48, generator=g) * 255
    b = (a + torch.randn(3, 3, 48, 48, generator=g) * 40).clamp(0, 255)
    return a, b


def test_lpips_torchscript_equals_state_dict(vgg_files):
    """The same LPIPS from the TorchScript file and from the state dict + lin layers; equal too to the formula written
    as in the paper (normalize, squared difference, linear weights, spatial mean, sum)."""
    ts = L.load_files("torchscript", str(vgg_files / "vgg16.pt"))
    sd = L.load_files("state_dict", str(vgg_files / L.TV_FILE), str(vgg_files / L.LIN_FILE))
    a, b = _pairs()
    with torch.no_grad():
        d_ts, d_sd, d_paper = ts(a, b), sd(a, b), sd.net.lpips(a, b)
    assert (d_ts > 1e-3).all() and not torch.allclose(d_ts[0], d_ts[1])
    assert torch.allclose(d_ts, d_sd, rtol=1e-4, atol=1e-7)
    assert torch.allclose(d_sd, d_paper, rtol=1e-4, atol=1e-7)
    assert torch.allclose(sd(a, a), torch.zeros(3), atol=1e-8)


def test_lpips_weight_resolution(vgg_files, tmp_path, monkeypatch):
    """Resolution order: explicit path -> environment -> cache dir -> (download) -> a clear error offline."""
    for k in ("GANFORGE_VGG16", "GANFORGE_LPIPS_LIN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GANFORGE_OFFLINE", "1")
    monkeypatch.setenv("GANFORGE_CACHE", str(tmp_path / "empty"))
    ts, tv, lin = str(vgg_files / "vgg16.pt"), str(vgg_files / L.TV_FILE), str(vgg_files / L.LIN_FILE)
    assert L.resolve_weights(ts) == ("torchscript", ts, None)
    assert L.resolve_weights(tv, lin) == ("state_dict", tv, lin)
    with pytest.raises(L.PerceptualWeightsNotFound) as e:  # a state dict without lin layers, offline
        L.resolve_weights(tv)
    assert L.LIN_URL in str(e.value)
    monkeypatch.setenv("GANFORGE_VGG16", tv)
    monkeypatch.setenv("GANFORGE_LPIPS_LIN", lin)
    assert L.resolve_weights() == ("state_dict", tv, lin)
    assert L.resolve_weights(ts) == ("torchscript", ts, None)  # explicit beats environment
    monkeypatch.delenv("GANFORGE_VGG16")
    monkeypatch.delenv("GANFORGE_LPIPS_LIN")
    with pytest.raises(L.PerceptualWeightsNotFound) as e:
        L.resolve_weights()
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for s in (L.NVIDIA_URL, L.TV_URL, L.LIN_URL, "GANFORGE_VGG16", "GANFORGE_LPIPS_LIN", "GANFORGE_OFFLINE",
              "--loss fallback", str(tmp_path / "empty")):
        assert s in msg, s
    with pytest.raises(L.PerceptualWeightsNotFound, match="nope.pt"):
        L.resolve_weights(str(tmp_path / "nope.pt"))
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("GANFORGE_CACHE", str(cache))
    for name in (L.TV_FILE, L.LIN_FILE):
        (cache / name).write_bytes((vgg_files / name).read_bytes())
    assert L.resolve_weights() == ("state_dict", str(cache / L.TV_FILE), str(cache / L.LIN_FILE))
    (cache / L.NVIDIA_FILE).write_bytes((vgg_files / "vgg16.pt").read_bytes())
    assert L.resolve_weights() == ("torchscript", str(cache / L.NVIDIA_FILE), None)


def test_lpips_bad_lin_file(vgg_files, tmp_path):
    """A lin-layers file with a wrong key or negative weights is refused with the file's name."""
    bad = tmp_path / "bad.pth"
    torch.save({"lin0.weight": torch.ones(1, 64, 1, 1)}, bad)
    with pytest.raises(ValueError, match="bad.pth.*lin0.model.1.weight"):
        L.load_files("state_dict", str(vgg_files / L.TV_FILE), str(bad))
    torch.save({f"lin{i}.model.1.weight": -torch.ones(1, c, 1, 1) for i, c in enumerate(L.TAP_CHANNELS)}, bad)
    with pytest.raises(ValueError, match="negative"):
        L.load_files("state_dict", str(vgg_files / L.TV_FILE), str(bad))


# --- metrics ------------------------------------------------------------------------------------------------

# SSIM written out pixel by pixel: 11x11 gaussian (sigma 1.5) weighted means/variances over each valid window.
def _ssim_explicit(a, b):
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(a.shape[0]):
        x, y = a[ch].astype(np.float64), b[ch].astype(np.float64)
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                mx, my = (k * px).sum(), (k * py).sum()
                vx, vy = (k * (px - mx) ** 2).sum(), (k * (py - my) ** 2).sum()
                cxy = (k * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_psnr_explicit():
    """Our SSIM and PSNR against explicit computations; identical images give SSIM 1."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 3, 16, 20), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    s = ssim(a, b)
    for n in range(2):
        assert s[n] == pytest.approx(_ssim_explicit(a[n], b[n]), abs=1e-9)
    assert ssim(a, a) == pytest.approx([1.0, 1.0])
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(1)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))


def test_ssim_matches_skimage():
    """Against scikit-image when it is installed."""
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    ref = metrics.structural_similarity(a[0], b[0], channel_axis=0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=255)
    assert ssim(a, b)[0] == pytest.approx(ref, abs=1e-6)


# --- scripts/project.py -------------------------------------------------------------------------------------

# A snapshot of a small G (+ D) and a folder of `n` target images (G's images at known ws, as 24 px PNGs with
# a 4-px margin on one side, so center-crop and Lanczos resize are exercised).
def _setup(tmp_path, n):
    G = make_G(seed=4, noise_strength=0.1)
    torch.manual_seed(5)
    D = Discriminator(0, 16, 3, channel_base=512, channel_max=32)
    snap = tmp_path / "snap.safetensors"
    save_snapshot(snap, G, D, G, {"test": True})
    imgs = render(G, known_ws(G, compute_w_stats(G, 1000)[0], n, seed=8))
    folder = tmp_path / "targets"
    folder.mkdir()
    for i in range(n):
        big = PIL.Image.fromarray(imgs[i].numpy().transpose(1, 2, 0)).resize((24, 24), PIL.Image.LANCZOS)
        canvas = PIL.Image.new("RGB", (28, 24), (0, 0, 0))
        canvas.paste(big, (2, 0))
        canvas.save(folder / f"img{i}.png")
    return snap, folder


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", GANFORGE_OFFLINE="1", GANFORGE_OPS_IMPL="ref",
                GANFORGE_CACHE="/nonexistent-ganforge-cache")


def test_project_script_outputs_generate_and_resume(tmp_path, monkeypatch):
    """The script end to end: outputs per target, projection.json, the .npz rendering to the same PNG through
    generate.py, and a resumed run redoing only the interrupted target."""
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    snap, folder = _setup(tmp_path, 3)
    out = tmp_path / "out"
    args = ["--network", str(snap), "--target", str(folder), "--outdir", str(out), "--steps", "20",
            "--batch", "2", "--loss", "fallback", "--w-avg-samples", "1000", "--save-video", "--video-every", "5"]
    proj_script.main(args)
    doc = json.loads((out / "projection.json").read_text())
    assert [r["name"] for r in doc["images"]] == ["img0", "img1", "img2"]
    assert doc["settings"]["loss"] == FALLBACK_LABEL and doc["settings"]["steps"] == 20
    for r in doc["images"]:
        assert r["psnr"] > 20 and 0 < r["ssim"] <= 1 and r["lpips"] is None and not r["resumed"]
        for suffix in ("_target.png", "_proj.png", "_w.npz", "_progress.gif"):
            assert (out / f"{r['name']}{suffix}").is_file()
        w = np.load(out / f"{r['name']}_w.npz")["w"]
        assert w.shape == (1, 6, Z) and w.dtype == np.float32
    gif = PIL.Image.open(out / "img0_progress.gif")
    assert gif.size == (32, 16) and gif.n_frames == 5
    assert np.asarray(PIL.Image.open(out / "img0_target.png")).shape == (16, 16, 3)

    gen_dir = tmp_path / "gen"
    generate.main(["--network", str(snap), "--outdir", str(gen_dir), "--projected-w", str(out / "img1_w.npz"),
                   "--device", "cpu"])
    assert np.array_equal(np.asarray(PIL.Image.open(gen_dir / "proj00.png")),
                          np.asarray(PIL.Image.open(out / "img1_proj.png")))

    (out / "img1_w.npz").unlink()  # as if interrupted while projecting img1
    before = {n: (out / f"{n}_proj.png").stat().st_mtime_ns for n in ("img0", "img2")}
    proj_script.main(args)
    doc2 = json.loads((out / "projection.json").read_text())
    assert [(r["name"], r["resumed"]) for r in doc2["images"]] == [("img0", True), ("img1", False),
                                                                   ("img2", True)]
    assert {n: (out / f"{n}_proj.png").stat().st_mtime_ns for n in ("img0", "img2")} == before
    for r0, r1 in zip(doc["images"], doc2["images"]):
        assert r1["psnr"] == pytest.approx(r0["psnr"]) and r1["loss"] == pytest.approx(r0["loss"], rel=1e-4)


def test_project_script_lpips(tmp_path, monkeypatch, vgg_files):
    """--loss lpips with weights from --vgg16/--lpips-lin files projects and reports LPIPS; without weights offline the
    script stops with the error that says where to get them."""
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    snap, folder = _setup(tmp_path, 1)
    out = tmp_path / "out"
    base = ["--network", str(snap), "--target", str(folder / "img0.png"), "--outdir", str(out), "--steps", "4",
            "--w-avg-samples", "500"]
    proj_script.main(base + ["--vgg16", str(vgg_files / L.TV_FILE), "--lpips-lin", str(vgg_files / L.LIN_FILE)])
    doc = json.loads((out / "projection.json").read_text())
    assert doc["settings"]["loss"] == "lpips" and L.TV_FILE in doc["settings"]["lpips_weights"]
    assert doc["images"][0]["lpips"] > 0
    with pytest.raises(SystemExit, match="LPIPS weights not found"):
        proj_script.main(base + ["--outdir", str(tmp_path / "out2")])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_project_two_processes(tmp_path, monkeypatch):
    """Two processes share a folder of 4 targets: each target is projected exactly once (2 per rank), and the results
    equal a single-process run (per-target seeds do not depend on the process count)."""
    snap, folder = _setup(tmp_path, 4)
    args = ["--network", str(snap), "--target", str(folder), "--steps", "10", "--batch", "2", "--loss",
            "fallback", "--w-avg-samples", "1000"]
    bindir = os.path.dirname(sys.executable)
    launch = [os.path.join(bindir, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), os.path.join(ROOT, "scripts", "project.py"),
              *args, "--outdir", str(tmp_path / "two")]
    proc = subprocess.run(launch, env=_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "two" / "projection.json").read_text())
    names = [r["name"] for r in doc["images"]]
    assert names == ["img0", "img1", "img2", "img3"] and doc["settings"]["world_size"] == 2
    assert {r["name"]: r["rank"] for r in doc["images"]} == {"img0": 0, "img1": 1, "img2": 0, "img3": 1}
    assert not list((tmp_path / "two").glob(".projection-*"))  # the ranks' result parts were merged and removed
    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    proj_script.main(args + ["--outdir", str(tmp_path / "one")])
    for n in names:
        w2 = np.load(tmp_path / "two" / f"{n}_w.npz")["w"]
        w1 = np.load(tmp_path / "one" / f"{n}_w.npz")["w"]
        assert np.allclose(w1, w2, atol=1e-4), n
