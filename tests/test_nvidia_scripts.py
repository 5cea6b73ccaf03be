"""Tests for NVIDIA's conventions: mirrored reals in FID/KID, calc_metrics.py defaults, project.py options and video."""
import json
import os

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import pytest
import torch

import _metrics_dist_worker as W
from helpers import counted_detector, save_tiny_detector
from networks.generator import Generator
from scripts import calc_metrics, project as proj_script
from training import dist
from training.data.synthetic import SyntheticDataset
from training.eval import metrics
from training.io.checkpoint import save_snapshot

# The test detector is TorchScript (NVIDIA's file format), whose API warns that it is deprecated; no test may
# download or see a developer's cache (conftest.no_downloads).
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
              pytest.mark.usefixtures("no_downloads", "ref_ops_one_thread")]


# OMP_NUM_THREADS=1 for every process a test starts (the machine's cores are shared).
@pytest.fixture(autouse=True)
def _one_omp_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# --- mirrored reals in calc_metric ---------------------------------------------------------------------------

def test_mirrored_reals_use_2n_images_and_equal_manual_stats(tmp_path):
    det, counter = counted_detector(tmp_path)
    torch.manual_seed(0)
    G = W.TinyG()
    images = W.make_images(6)
    data = W.ArrayDataset(images)
    plain = metrics.calc_metric("fid8_full", G, data, det, batch_size=4, cache_dir=False)
    assert counter["images"] == 6 + 8 and plain["num_real"] == 6 and plain["mirror"] is False
    counter["images"] = 0
    rec = metrics.calc_metric("fid8_full", G, data, det, batch_size=4, cache_dir=False, mirror=True)
    assert counter["images"] == 12 + 8 and rec["num_real"] == 12 and rec["mirror"] is True
    # By hand: the originals' and their x-flips' features, population mean and covariance.
    both = torch.from_numpy(np.concatenate([images, images[:, :, :, ::-1]]).copy())
    feats = det.features(both).double().numpy()
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False, bias=True)
    gen = metrics.compute_generator_stats(G, det, 8)
    want = metrics.frechet_distance(mu, cov, *gen.get_mean_cov())
    assert rec["value"] == pytest.approx(want, rel=1e-6) and rec["value"] != pytest.approx(plain["value"])
    # Not _full: the first num_real items of originals-then-mirrors, as NVIDIA's sampler takes them.
    part = metrics.compute_dataset_stats(data, det, max_items=9, xflip=True, cache_dir=False, capture_all=True)
    np.testing.assert_allclose(part.get_all(), feats[:9], atol=1e-5)
    rec = metrics.calc_metric("kid9", G, data, det, cache_dir=False, mirror=True, kid_subsets=3)
    assert (rec["num_real"], rec["num_gen"], rec["mirror"]) == (9, 9, True)
    rec = metrics.calc_metric("kid8_full", G, data, det, cache_dir=False, mirror=True, kid_subsets=3)
    assert (rec["num_real"], rec["mirror"]) == (12, True)


# mirror=None follows the dataset's xflip (the training loop's dataset is opened with data.xflip): its own mirrored
# half is not used, the same 2N images are; mirror=False overrides it.
def test_mirror_follows_dataset_xflip(tmp_path):
    det, counter = counted_detector(tmp_path)
    torch.manual_seed(0)
    G = W.TinyG()
    flipped = SyntheticDataset(resolution=16, num_images=5, xflip=True)
    plain = SyntheticDataset(resolution=16, num_images=5)
    a = metrics.calc_metric("fid6_full", G, flipped, det, cache_dir=False)
    b = metrics.calc_metric("fid6_full", G, plain, det, cache_dir=False, mirror=True)
    c = metrics.calc_metric("fid6_full", G, flipped, det, cache_dir=False, mirror=False)
    assert (a["mirror"], a["num_real"], b["num_real"], c["mirror"], c["num_real"]) == (True, 10, 10, False, 5)
    assert a["value"] == pytest.approx(b["value"], rel=1e-9) and c["value"] != pytest.approx(a["value"])
    assert metrics.real_set_mirrored(flipped) and not metrics.real_set_mirrored(flipped, False)


def test_mirror_is_part_of_the_cache_key_and_best_tracking(tmp_path):
    det, counter = counted_detector(tmp_path)
    torch.manual_seed(0)
    G = W.TinyG()
    data = W.ArrayDataset(W.make_images(5))
    cache = tmp_path / "stats"
    metrics.calc_metric("fid4_full", G, data, det, cache_dir=str(cache))
    metrics.calc_metric("fid4_full", G, data, det, cache_dir=str(cache), mirror=True)
    assert counter["images"] == (5 + 4) + (10 + 4)
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and sum("-mirror-" in f for f in files) == 1
    metrics.calc_metric("fid4_full", G, data, det, cache_dir=str(cache), mirror=True)
    metrics.calc_metric("fid4_full", G, data, det, cache_dir=str(cache))
    assert counter["images"] == 9 + 14 + 4 + 4  # both hits: only the generated images ran
    # The loop's call: evaluate_snapshot(mirror=...) logs the set; a best against the other set is not comparable.
    run = str(tmp_path / "run")
    recs = metrics.evaluate_snapshot(G, data, det, ["fid4_full"], run, "snap.safetensors", 1, mirror=True,
                                     cache_dir=str(cache))
    assert recs[0]["mirror"] is True and recs[0]["num_real"] == 10 and recs[0]["is_best"]
    line = json.loads(open(os.path.join(run, "metric-fid4_full.jsonl")).readline())
    assert (line["mirror"], line["num_real"]) == (True, 10)
    worse = dict(recs[0], value=recs[0]["value"] + 1)
    assert not metrics.update_best(run, worse)
    assert metrics.update_best(run, dict(worse, mirror=False))  # another real set replaces the best


# --- scripts/calc_metrics.py -----------------------------------------------------------------------------------

def _tiny_snapshot(path, config):
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3, channel_base=64, channel_max=16)
    save_snapshot(path, G, None, G, config)
    return path


def _run_calc(monkeypatch, capsys, det, snap, *extra):
    monkeypatch.setattr(dist, "init", lambda **kw: None)  # no Accelerator in the test process
    capsys.readouterr()
    args = ["--network", str(snap), "--cpu", "--metrics", "fid6_full", "--detector", det, "--no-cache",
            "--num-workers", "0", "--batch-size", "8", "--no-log", *extra]
    assert calc_metrics.main(args) == 0
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]), out


def test_calc_metrics_takes_data_and_mirror_from_the_snapshot(tmp_path, monkeypatch, capsys):
    det = save_tiny_detector(tmp_path, dim=16)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(W.make_images(7, res=8, seed=4)):
        PIL.Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i}.png")
    config = {"data": {"path": str(folder), "xflip": False, "max_size": None}, "train": {"seed": 0}}
    snap = _tiny_snapshot(tmp_path / "a" / "network-snapshot-000001.safetensors", config)
    rec, out = _run_calc(monkeypatch, capsys, det, snap)
    assert (rec["dataset"], rec["resolution"], rec["num_real"], rec["mirror"]) == ("pngs", 8, 7, False)
    assert "fid6_full reals" in out.err and "fid6_full generated" in out.err  # tqdm's bars (stderr)
    rec2, _ = _run_calc(monkeypatch, capsys, det, snap, "--mirror", "true")
    assert (rec2["num_real"], rec2["mirror"]) == (14, True) and rec2["value"] != pytest.approx(rec["value"])
    # The synthetic set it trained on (data.path null), mirrored as the run was; --mirror false overrides.
    config = {"data": {"path": None, "resolution": 8, "num_images": 9, "xflip": True}, "train": {"seed": 0}}
    snap = _tiny_snapshot(tmp_path / "b" / "network-snapshot-000001.safetensors", config)
    rec, out = _run_calc(monkeypatch, capsys, det, snap, "--no-progress")
    assert (rec["dataset"], rec["resolution"], rec["num_real"], rec["mirror"]) == ("synthetic", 8, 18, True)
    assert "data.xflip=true" in out.out and "fid6_full reals" not in out.err
    rec, _ = _run_calc(monkeypatch, capsys, det, snap, "--mirror", "0")
    assert (rec["num_real"], rec["mirror"]) == (9, False)
    # --data wins over the config; a snapshot without a recorded dataset needs it.
    rec, _ = _run_calc(monkeypatch, capsys, det, snap, "--data", str(folder), "--mirror", "false")
    assert (rec["dataset"], rec["num_real"]) == ("pngs", 7)
    with pytest.raises(SystemExit, match="dataset is 16 px"):
        _run_calc(monkeypatch, capsys, det, snap, "--data", "synthetic:16")
    bare = _tiny_snapshot(tmp_path / "c" / "network-snapshot-000001.safetensors", None)
    with pytest.raises(SystemExit, match="pass --data"):
        _run_calc(monkeypatch, capsys, det, bare)
    with pytest.raises(SystemExit):
        calc_metrics.parse_args(["--network", "x", "--mirror", "maybe"])


# --- scripts/project.py ------------------------------------------------------------------------------------------

# A snapshot of a small 16-px G and one target image (G's own image at a random w, so it is reachable).
def _projection_setup(tmp_path):
    torch.manual_seed(1)
    G = Generator(16, 0, 16, 16, 3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=256, channel_max=16)).eval().requires_grad_(False)
    snap = tmp_path / "snap.safetensors"
    save_snapshot(snap, G, None, G, {})
    img = G(torch.randn(1, 16), torch.zeros(1, 0), noise_mode="const")
    target = tmp_path / "face.png"
    PIL.Image.fromarray(((img[0].permute(1, 2, 0) * 127.5 + 128).clamp(0, 255)).to(torch.uint8).numpy()).save(target)
    return snap, target


def _project(snap, target, outdir, *extra):
    proj_script.main(["--network", str(snap), "--target", str(target), "--outdir", str(outdir), "--num-steps", "2",
                      "--loss", "fallback", "--w-avg-samples", "200", "--device", "cpu", *extra])
    return np.load(outdir / "face_w.npz")["w"]


def test_project_nvidia_options_video_and_seed(tmp_path):
    snap, target = _projection_setup(tmp_path)
    out = tmp_path / "video"
    w = _project(snap, target, out, "--save-video", "true", "--seed", "303")
    reader = imageio.get_reader(out / "face_proj.mp4")
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 2 and frames[0].shape == (16, 32, 3)  # one frame per step here, target | projection
    assert PIL.Image.open(out / "face_progress.gif").n_frames == 2
    for nvidia, ours in (("target.png", "face_target.png"), ("proj.png", "face_proj.png"),
                         ("projected_w.npz", "face_w.npz"), ("proj.mp4", "face_proj.mp4")):
        assert (out / nvidia).read_bytes() == (out / ours).read_bytes(), nvidia
    doc = json.loads((out / "projection.json").read_text())
    assert doc["settings"]["steps"] == 2 and doc["settings"]["seed"] == 303
    # --save-video false: neither video; the default seed is NVIDIA's 303; another seed, another (repeatable) w.
    w_default = _project(snap, target, tmp_path / "novideo", "--save-video", "false")
    assert not list((tmp_path / "novideo").glob("*.mp4")) and not list((tmp_path / "novideo").glob("*.gif"))
    np.testing.assert_array_equal(w_default, w)
    w7 = _project(snap, target, tmp_path / "seed7", "--seed", "7")
    w7_again = _project(snap, target, tmp_path / "seed7b", "--seed", "7")
    np.testing.assert_array_equal(w7, w7_again)
    assert not np.allclose(w7, w)
    with pytest.raises(SystemExit):
        _project(snap, target, tmp_path / "bad", "--save-video", "maybe")
