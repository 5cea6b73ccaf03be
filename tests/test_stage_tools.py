"""Tests for the tools on progressive-stage generators: stage metrics, best tracking, generate.py, projector refusal."""
import importlib
import json
import os

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import _metrics_dist_worker as W
from helpers import counted_detector, save_tiny_detector
from networks.generator import Generator
from scripts import project as proj_script
from training import dist
from training.config import MetricsConfig
from training.eval import metrics
from training.eval.inception import load_detector
from training.eval.projector import project
from training.io.checkpoint import save_snapshot
from training.io.images import to_uint8
from training.report.metrics import evaluate_metrics
from training.schedule import stage_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test detectors are TorchScript (NVIDIA's file format), whose API warns that it is deprecated; no test may
# download or see a developer's cache (conftest.no_downloads).
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
              pytest.mark.usefixtures("no_downloads", "ref_ops_one_thread")]


# A tiny 16 px skip generator (it has a ToRGB at every resolution, so any stage works), in eval mode.
def make_G(seed=0):
    torch.manual_seed(seed)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, channel_base=64, channel_max=16)
    return G.eval().requires_grad_(False)


# Reals box-downsampled by hand: float64 area average (F.avg_pool2d), rounded half up to uint8.
def box_down(images: np.ndarray, factor: int) -> torch.Tensor:
    return torch.floor(F.avg_pool2d(torch.from_numpy(images).double(), factor) + 0.5).to(torch.uint8)


# G's first n images as compute_generator_stats draws them (latent i from default_rng([seed, 0, i])), as uint8.
def gen_uint8(G, n, seed=0):
    z = np.stack([np.random.default_rng([seed, 0, i]).standard_normal(G.z_dim) for i in range(n)])
    with torch.no_grad():
        img = G(torch.from_numpy(z.astype(np.float32)), torch.zeros(n, 0), noise_mode="const")
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8)


# Fréchet distance from two feature sets, written out: moments in float64, scipy's matrix square root.
def fid_by_hand(fr: np.ndarray, fg: np.ndarray) -> float:
    fr, fg = fr.astype(np.float64), fg.astype(np.float64)
    mr, mg = fr.mean(0), fg.mean(0)
    cr, cg = np.cov(fr, rowvar=False, bias=True), np.cov(fg, rowvar=False, bias=True)
    root = scipy.linalg.sqrtm(cr @ cg).real
    return float(((mr - mg) ** 2).sum() + np.trace(cr + cg - 2 * root))


# FID/KID of a G at stage 8 px of a 16 px dataset: the detector sees only 8x8 images, and the values equal the
# ones computed by hand from the box-downsampled reals and G's 8x8 images; the record names the stage.
def test_fid_and_kid_at_stage_equal_hand_computation(tmp_path):
    det = load_detector(save_tiny_detector(tmp_path, dim=16), device="cpu")
    inner = det.features
    sizes = []
    det.features = lambda img: (sizes.append(tuple(img.shape[2:])), inner(img))[1]
    images = W.make_images(24, res=16, seed=3)
    dataset = W.ArrayDataset(images)
    G = make_G()
    G.set_stage(8, 1.0)
    res = metrics.calc_metric("fid20", G, dataset, det, batch_size=8, cache_dir=False)
    assert set(sizes) == {(8, 8)}
    fr = inner(box_down(images[:20], 2)).numpy()
    fake = gen_uint8(G, 20)
    assert fake.shape == (20, 3, 8, 8)
    fg = inner(fake).numpy()
    want = fid_by_hand(fr, fg)
    assert want > 0.01 and res["value"] == pytest.approx(want, rel=1e-5)
    # Against the full-resolution reals (what the detector's own 8x8 pooling would see, unrounded) it differs.
    assert abs(fid_by_hand(inner(torch.from_numpy(images[:20])).numpy(), fg) - want) > 1e-4 * want
    assert (res["resolution"], res["stage_alpha"], res["dataset_resolution"], res["dataset"]) == \
        (8, 1.0, 16, "arrays@8px")
    assert (res["num_real"], res["num_gen"]) == (20, 20) and metrics.metric_label(res) == "fid20@8px"
    kid = metrics.calc_metric("kid24_full", G, dataset, det, batch_size=8, cache_dir=False, kid_subsets=3,
                              kid_subset_size=10)
    want_kid = metrics.kid(inner(box_down(images, 2)).numpy(), inner(gen_uint8(G, 24)).numpy(), 3, 10, 0)
    assert kid["value"] == pytest.approx(want_kid, rel=1e-5) and kid["resolution"] == 8
    # Mid-fade at 8 px: still 8 px reals, the fade recorded. Full stage: the record as for any generator.
    G.set_stage(8, 0.25)
    assert metrics.calc_metric("fid20", G, dataset, det, batch_size=8, cache_dir=False)["stage_alpha"] == 0.25
    G.set_stage(16, 1.0)
    full = metrics.calc_metric("fid20", G, dataset, det, batch_size=8, cache_dir=False)
    assert full["resolution"] == 16 and full["dataset"] == "arrays" and metrics.metric_label(full) == "fid20"
    assert "stage_alpha" not in full and "dataset_resolution" not in full


# StageView items equal the hand downsampling; its stats are cached under a key per resolution (three resolutions,
# three files, and a repeat is a hit); a stage that does not divide the dataset's resolution is refused.
def test_stage_view_items_and_cache_key_per_resolution(tmp_path):
    det, counter = counted_detector(tmp_path, dim=8)
    images = W.make_images(6, res=16, seed=4)
    dataset = W.ArrayDataset(images)
    view = metrics.StageView(dataset, 4)
    assert (len(view), view.resolution, view.name) == (6, 4, "arrays@4px")
    np.testing.assert_array_equal(view[5][0], box_down(images[5:6], 4)[0].numpy())
    assert view[0][0].dtype == np.uint8
    cache = str(tmp_path / "stats")
    a = metrics.compute_dataset_stats(metrics.StageView(dataset, 8), det, cache_dir=cache)
    metrics.compute_dataset_stats(metrics.StageView(dataset, 4), det, cache_dir=cache)
    metrics.compute_dataset_stats(dataset, det, cache_dir=cache)
    assert counter["images"] == 18 and len(os.listdir(cache)) == 3
    b = metrics.compute_dataset_stats(metrics.StageView(W.ArrayDataset(images.copy()), 8), det, cache_dir=cache)
    assert counter["images"] == 18  # hit
    np.testing.assert_array_equal(a.get_mean_cov()[0], b.get_mean_cov()[0])
    with pytest.raises(ValueError, match=r"stage resolution 5 px.*'arrays'.*16 px"):
        metrics.StageView(dataset, 5)


# Best tracking across stages: same resolution compares values; a higher resolution replaces the best even with a
# worse value; a lower resolution never does.
def test_update_best_resolution_rules(tmp_path):
    run = str(tmp_path)
    base = dict(metric="fid50k_full", detector_hash="ab")

    def best():
        with open(os.path.join(run, "metric-fid50k_full-best.json")) as f:
            return json.load(f)
    assert metrics.update_best(run, dict(base, value=50.0, resolution=8, kimg=1))
    assert not metrics.update_best(run, dict(base, value=60.0, resolution=8, kimg=2))
    assert metrics.update_best(run, dict(base, value=40.0, resolution=8, kimg=3))
    assert metrics.update_best(run, dict(base, value=100.0, resolution=16, kimg=4))
    assert best()["kimg"] == 4
    assert not metrics.update_best(run, dict(base, value=1.0, resolution=8, kimg=5))
    assert not metrics.update_best(run, dict(base, value=1.0, resolution=8, detector_hash="other", kimg=6))
    assert not metrics.update_best(run, dict(base, value=120.0, resolution=16, kimg=7))
    assert metrics.update_best(run, dict(base, value=90.0, resolution=16, kimg=8))
    assert (best()["kimg"], best()["value"], best()["resolution"]) == (8, 90.0, 16)


# evaluate_metrics (the training loop's call) labels a stage metric with its resolution in the printout and the
# wandb key, and keeps the plain key at full resolution.
def test_evaluate_metrics_labels_stage(tmp_path, monkeypatch, capsys):
    det = load_detector(save_tiny_detector(tmp_path, dim=8), device="cpu")
    dataset = W.ArrayDataset(W.make_images(12, res=16))
    logged = []

    class Run:
        def log(self, data, step):
            logged.append((data, step))
    G = make_G()
    G.set_stage(8, 0.5)
    cfg = MetricsConfig(batch=6)
    evaluate_metrics(G, dataset, det, ["fid10"], tmp_path, 3000, cfg, None, Run(), 7)
    out = capsys.readouterr().out
    assert out.startswith("fid10@8px ") and "fade 0.50" in out
    assert list(logged[0][0]) == ["Metrics/fid10@8px"] and logged[0][1] == 7
    record = json.loads(open(tmp_path / "metric-fid10.jsonl").readline())
    assert logged[0][0]["Metrics/fid10@8px"] == record["value"] and record["resolution"] == 8
    G.set_stage(16, 1.0)
    evaluate_metrics(G, dataset, det, ["fid10"], tmp_path, 4000, cfg, None, Run(), 8)
    assert list(logged[1][0]) == ["Metrics/fid10"] and capsys.readouterr().out.startswith("fid10 ")


# A snapshot of make_G() set to `stage`, recorded in its metadata as the training loop does.
def stage_snapshot(tmp_path, resolution, alpha, name="network-snapshot-000004.safetensors"):
    G = make_G()
    G.set_stage(resolution, alpha)
    path = tmp_path / name
    save_snapshot(path, G, None, G, extra={"stage": stage_meta(G)})
    return G, path


# scripts/generate.py on a stage snapshot: says so, and every output (seeds, style mixing, projected ws) is at the
# stage resolution with G's stage images; a full-resolution snapshot prints no stage line.
def test_generate_script_on_stage_snapshot(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    generate = importlib.import_module("generate")
    G, snap = stage_snapshot(tmp_path, 8, 0.5)
    out = tmp_path / "out"
    generate.main(["--network", str(snap), "--outdir", str(out), "--seeds", "0-1", "--device", "cpu"])
    text = capsys.readouterr().out
    assert f"{snap}: taken during the progressive schedule at stage 8 px (fade 0.50) of 16 px; generating 8x8 " \
           f"images" in text
    for seed in (0, 1):
        got = np.asarray(PIL.Image.open(out / f"seed{seed:04d}.png"))
        with torch.no_grad():
            want = to_uint8(G(generate.seed_to_z(seed, 8), torch.zeros(1, 0), noise_mode="const"))[0]
        assert got.shape == (8, 8, 3)
        np.testing.assert_array_equal(got, want)
    generate.main(["--network", str(snap), "--outdir", str(out), "--mix-rows", "0-1", "--mix-cols", "2-4",
                   "--mix-styles", "0-1", "--device", "cpu"])
    assert np.asarray(PIL.Image.open(out / "stylemix.png")).shape == (3 * 8, 4 * 8, 3)
    ws = G.mapping(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 0))
    np.savez(tmp_path / "w.npz", w=ws.numpy())
    generate.main(["--network", str(snap), "--outdir", str(out), "--projected-w", str(tmp_path / "w.npz"),
                   "--device", "cpu"])
    with torch.no_grad():
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "proj01.png")),
                                      to_uint8(G.synthesis(ws[1:], noise_mode="const"))[0])
    capsys.readouterr()
    _, full = stage_snapshot(tmp_path, 16, 1.0, name="full.safetensors")
    generate.main(["--network", str(full), "--outdir", str(tmp_path / "f"), "--seeds", "3", "--device", "cpu"])
    assert "progressive" not in capsys.readouterr().out
    assert np.asarray(PIL.Image.open(tmp_path / "f" / "seed0003.png")).shape == (16, 16, 3)


# scripts/calc_metrics.py on a stage snapshot says which resolution it evaluated and logs the stage record.
def test_calc_metrics_script_on_stage_snapshot(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    calc_metrics = importlib.import_module("calc_metrics")
    monkeypatch.setattr(dist, "init", lambda **kw: None)  # no Accelerator in the test process
    _, snap = stage_snapshot(tmp_path, 8, 1.0)
    det = save_tiny_detector(tmp_path, dim=8)
    assert calc_metrics.main(["--network", str(snap), "--data", "synthetic:16", "--cpu", "--metrics", "fid10",
                              "--detector", det, "--no-cache", "--num-workers", "0", "--batch-size", "5"]) == 0
    text = capsys.readouterr().out
    assert "at stage 8 px (fade 1.00) of 16 px; evaluating 8x8 px against the reals box-downsampled" in text
    record = json.loads(open(tmp_path / "metric-fid10.jsonl").readline())
    assert (record["resolution"], record["dataset_resolution"], record["stage_alpha"]) == (8, 16, 1.0)


# The projector refuses a stage generator (below full resolution, or mid-fade) before any work, naming the
# snapshot, its stage and what to use instead.
def test_projector_refuses_stage_generator(tmp_path, monkeypatch):
    G = make_G()
    for stage in ((8, 1.0), (16, 0.5)):
        G.set_stage(*stage)
        with pytest.raises(ValueError, match=rf"stage {stage[0]} px \(fade {stage[1]:.2f}\) of 16 px.*"
                                             r"full-resolution snapshot"):
            project(G, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), num_steps=1, loss="fallback")
    _, snap = stage_snapshot(tmp_path, 8, 0.5)
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "t.png")

    def no_work(*a, **k):
        raise AssertionError("work started before the stage was checked")
    monkeypatch.setattr(proj_script, "load_lpips", no_work)
    monkeypatch.setattr(proj_script, "compute_w_stats", no_work)
    with pytest.raises(SystemExit) as e:
        proj_script.main(["--network", str(snap), "--target", str(tmp_path / "t.png"), "--outdir",
                          str(tmp_path / "out"), "--loss", "fallback", "--device", "cpu"])
    msg = str(e.value)
    assert msg.startswith(f"{snap}: taken during the progressive schedule at stage 8 px (fade 0.50) of 16 px")
    assert "use a full-resolution snapshot" in msg and not (tmp_path / "out").exists()
