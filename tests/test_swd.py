"""Tests for SWD: the pyramid, descriptors and distance against explicit NumPy, zero and known-shift values, caching."""
import os

import numpy as np
import pytest
import scipy.ndimage
import torch

import _metrics_dist_worker as W
from training.eval import metrics, swd
from training.eval.feature_stats import FeatureStats

# The paper's 5x5 Gaussian, written out: outer product of [1, 4, 6, 4, 1] / 16.
GAUSS = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


# The pyramid with scipy's 2-D convolution in float64 (mode 'mirror': d c b | a b c d | c b a), image by image.
def np_pyramid(images: np.ndarray, levels: int) -> list:
    def conv(x, gain=1.0):
        return np.stack([[scipy.ndimage.convolve(ch, GAUSS * gain, mode="mirror") for ch in img] for img in x])

    def down(x):
        return conv(x)[:, :, ::2, ::2]

    def up(x):
        u = np.zeros(x.shape[:2] + (2 * x.shape[2], 2 * x.shape[3]))
        u[:, :, ::2, ::2] = x
        return conv(u, 4.0)
    out = [images.astype(np.float64)]
    for _ in range(levels - 1):
        low = down(out[-1])
        out[-1] = out[-1] - up(low)
        out.append(low)
    return out


def test_level_counts_follow_the_paper():
    assert swd.level_resolutions(1024) == [1024, 512, 256, 128, 64, 32, 16]
    assert swd.level_resolutions(32) == [32, 16]
    assert swd.level_resolutions(16) == [16]
    assert swd.level_resolutions(8) == [8]


def test_pyramid_matches_scipy_and_collapses_back_to_the_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 32, 32)).astype(np.uint8)
    ours = swd.laplacian_pyramid(torch.from_numpy(images).double(), 3)
    ref = np_pyramid(images, 3)
    assert [tuple(x.shape) for x in ours] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-9)  # float64 both ways: round-off only
    # Collapsing (x = band + up(low), coarsest first) gives the image back exactly, whatever the filter.
    x = ours[-1]
    for band in reversed(ours[:-1]):
        x = band + swd.pyr_up(x)
    np.testing.assert_allclose(x.numpy(), images, rtol=0, atol=1e-9)


def test_descriptors_are_the_neighbourhoods_at_the_seeded_centres():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 3, 32, 32)).astype(np.uint8)
    indices = [7, 0, 12]
    desc = swd.descriptors(torch.from_numpy(images), indices, seed=5)
    ref = np_pyramid(images, 2)
    for level, d in enumerate(desc):
        assert d.shape == (3 * 128, 3 * 49) and d.dtype == torch.float32
        for k, i in enumerate(indices):
            centres = swd.nhood_centres(i, level, 32 >> level, 32 >> level, seed=5)
            assert centres.min() >= 3 and centres.max() <= (32 >> level) - 4
            for j in (0, 77, 127):
                y, x = centres[j]
                patch = ref[level][k, :, y - 3:y + 4, x - 3:x + 4].reshape(-1)
                np.testing.assert_allclose(d[k * 128 + j].numpy(), patch, rtol=1e-6, atol=1e-3)
    # The centres depend on the global index only: the same image at another batch position has the same rows.
    again = swd.descriptors(torch.from_numpy(images[[2]]), [12], seed=5)
    assert torch.equal(again[0], desc[0][256:384]) and torch.equal(again[1], desc[1][256:384])


def test_sliced_wasserstein_matches_numpy_and_known_values():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 12))
    b = rng.standard_normal((300, 12)) * 1.5 + 0.2
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ours = swd.sliced_wasserstein(ta, tb, seed=3, dir_repeats=2, dirs_per_repeat=16)
    # The same directions (the same seeded draws), then sort / compare / average in float64 NumPy.
    gen = torch.Generator().manual_seed(3)
    total = 0.0
    for _ in range(2):
        dirs = torch.randn([12, 16], generator=gen, dtype=torch.float64).numpy()
        dirs /= np.sqrt((dirs ** 2).sum(0, keepdims=True))
        total += np.abs(np.sort(a @ dirs, axis=0) - np.sort(b @ dirs, axis=0)).mean()
    ref = total / 2
    # Float32 projections of O(1) values: relative error ~1e-6 per value, far below 1e-4 of the mean.
    assert ours == pytest.approx(ref, rel=1e-4)
    # Identical sets: exactly zero. A set shifted by v: every projection shifts by d.v, so W1 = |d.v| per direction.
    assert swd.sliced_wasserstein(ta, ta.flip(0), seed=3) == 0.0
    v = rng.standard_normal(12)
    gen = torch.Generator().manual_seed(4)
    expected = np.mean([np.abs(v @ (d / np.linalg.norm(d, axis=0)))
                        for d in (torch.randn([12, 16], generator=gen, dtype=torch.float64).numpy()
                                  for _ in range(3))])
    shifted = swd.sliced_wasserstein(ta, ta + torch.from_numpy(v), seed=4, dir_repeats=3, dirs_per_repeat=16)
    assert shifted == pytest.approx(expected, rel=1e-4)
    # Unequal counts compare quantiles: a set against itself repeated twice is still at distance zero.
    assert swd.sliced_wasserstein(ta, torch.cat([ta, ta]), seed=1) == pytest.approx(0.0, abs=1e-6)


def test_normalize_per_channel_over_the_set():
    rng = np.random.default_rng(3)
    d = torch.from_numpy(rng.standard_normal((50, 2 * 49)) * [[3.0] * 49 + [0.5] * 49] + 7.0).float()
    n = swd.normalize(d, 2).numpy().reshape(50, 2, 49)
    np.testing.assert_allclose(n.mean(axis=(0, 2)), 0, atol=1e-9)
    np.testing.assert_allclose(n.std(axis=(0, 2)), 1, atol=1e-6)


def test_multiscale_swd_zero_for_identical_and_growing_with_a_known_perturbation():
    images = W.make_images(24, res=32, seed=4)
    det = swd.SWDDescriptors(32, 3, "cpu")
    rows = det.features(torch.from_numpy(images), list(range(24)))
    assert rows.shape == (24, det.feature_dim) and det.feature_dim == 2 * 128 * 147
    same = metrics.swd_between(det, rows.numpy(), rows.numpy())
    assert set(same["levels"]) == {"32", "16"} and same["value"] == 0.0
    # Blending the images towards a fixed pattern moves every descriptor distribution further: monotone growth.
    pattern = np.indices((32, 32)).sum(0) % 2 * 255
    values = []
    for t in (0.1, 0.3, 0.6):
        other = np.clip(np.rint(images * (1 - t) + pattern * t), 0, 255).astype(np.uint8)
        values.append(metrics.swd_between(det, rows.numpy(),
                                          det.features(torch.from_numpy(other), list(range(24))).numpy())["value"])
    assert 0 < values[0] < values[1] < values[2]


# A generator that returns dataset images, as G(z, c) -> [-1, 1]; `offset` perturbs them.
class ReplayG(torch.nn.Module):
    def __init__(self, images, offset=0.0):
        super().__init__()
        self.images, self.offset, self.z_dim, self.c_dim, self.i = images, offset, 4, 0, 0

    def forward(self, z, c, truncation_psi=1, noise_mode="const"):
        n = z.shape[0]
        out = torch.from_numpy(self.images[self.i:self.i + n]).float() / 127.5 - 1
        self.i += n
        return (out + self.offset * torch.linspace(-1, 1, 16).view(1, 1, 1, 16)).clamp(-1, 1)


def test_calc_metric_swd_and_floor_and_cache(tmp_path):
    images = W.make_images(80, res=16, seed=6)
    dataset = W.ArrayDataset(images)
    # A G replaying the 40 reals it is compared with gives the very same descriptors (the centres follow the index).
    rec = metrics.calc_metric("swd40", ReplayG(images[:40]), dataset, None, batch_size=16, cache_dir=str(tmp_path))
    assert rec["detector_kind"] == "swd" and rec["num_real"] == 40 and rec["num_gen"] == 40
    assert rec["value"] == 0.0 and set(rec["levels"]) == {"16"}
    # The floor: the first 40 reals against the next 40, the distance of two samples of one distribution.
    floor = metrics.swd_floor(dataset, 40, batch_size=16, cache_dir=str(tmp_path))
    halves = swd.SWDDescriptors(16, 3, "cpu")
    ref = metrics.swd_between(halves, halves.features(torch.from_numpy(images[:40]), list(range(40))).numpy(),
                              halves.features(torch.from_numpy(images[40:]), list(range(40, 80))).numpy())
    assert floor["num_real"] == 40 and floor["value"] == pytest.approx(ref["value"], rel=1e-6)
    # A G replaying the other half is about as far as the floor; one adding a horizontal ramp is much further.
    other = metrics.calc_metric("swd40", ReplayG(images[40:]), dataset, None, batch_size=16, cache_dir=str(tmp_path))
    worse = metrics.calc_metric("swd40", ReplayG(images[40:], offset=0.5), dataset, None, batch_size=16,
                                cache_dir=str(tmp_path))
    assert 0.7 * floor["value"] < other["value"] < 1.3 * floor["value"]
    assert worse["value"] > 2 * other["value"]
    # The reals' descriptors were cached (one file per count) and a cache hit gives the same number.
    cached = sorted(os.listdir(tmp_path))
    assert len(cached) == 2 and all(f.endswith(".npz") for f in cached)
    again = metrics.calc_metric("swd40", ReplayG(images[40:]), dataset, None, batch_size=16, cache_dir=str(tmp_path))
    assert again["value"] == other["value"] and sorted(os.listdir(tmp_path)) == cached


# SWD x1e3 per level in float64 NumPy, written out: each set normalized per channel over the set, the seeded unit
# directions, sorted projections compared at the smaller set's quantiles, mean over directions.
def np_multiscale_swd(a_levels, b_levels, channels: int, seed: int = 0) -> list:
    def norm(d):
        d = d.reshape(len(d), channels, -1)
        mean = d.mean(axis=(0, 2), keepdims=True)
        return ((d - mean) / np.sqrt(((d - mean) ** 2).mean(axis=(0, 2), keepdims=True))).reshape(len(d), -1)

    def quantiles(s, m):
        rank = np.minimum(((np.arange(m) + 0.5) * (len(s) / m)).astype(np.int64), len(s) - 1)
        return s[rank]
    out = []
    for a, b in zip(a_levels, b_levels):
        a, b, m = norm(np.asarray(a, np.float64)), norm(np.asarray(b, np.float64)), min(len(a), len(b))
        gen, total = torch.Generator().manual_seed(seed), 0.0
        for _ in range(swd.DIR_REPEATS):
            dirs = torch.randn([a.shape[1], swd.DIRS_PER_REPEAT], generator=gen, dtype=torch.float64).numpy()
            dirs /= np.sqrt((dirs ** 2).sum(0, keepdims=True))
            total += np.abs(quantiles(np.sort(a @ dirs, axis=0), m) - quantiles(np.sort(b @ dirs, axis=0), m)).mean()
        out.append(swd.SCALE * total / swd.DIR_REPEATS)
    return out


def test_descriptor_files_give_the_in_memory_distance_within_the_projection_budget(tmp_path, monkeypatch):
    images = W.make_images(36, res=32, seed=8)
    det = swd.SWDDescriptors(32, 3, "cpu")
    rows_a = det.features(torch.from_numpy(images[:20]), list(range(20)))
    rows_b = det.features(torch.from_numpy(255 - images[20:]), list(range(20, 36)))  # 16 images: unequal counts
    stores = []
    for rows in (rows_a, rows_b):
        store = swd.DescriptorFiles(2, 3, folder=str(tmp_path))
        for i in range(0, len(rows), 6):  # appended in batches, read back in chunks that cut images
            store.append(rows[i:i + 6])
        assert store.num_items == len(rows) and np.array_equal(store.rows(0, len(rows)), rows.numpy())
        stores.append(store)
    # Record how many directions are projected at once: both sets' [k, M] float32 projections fit the budget.
    shapes, project = [], swd._sorted_projections
    monkeypatch.setattr(swd, "_sorted_projections", lambda r, d, dev: shapes.append((len(d), r.count)) or
                        project(r, d, dev))
    budget = 4 * 40 * (20 + 16 + 2 * 16) * 128  # 40 directions at a time (not a divisor of 128: a short last chunk)
    bounded = swd.multiscale_swd_sets(stores[0].level_sets(chunk_rows=500), stores[1].level_sets(chunk_rows=333), 3,
                                      32, budget_bytes=budget)
    assert sorted({k for k, _ in shapes}) == [8, 40] and sum(k for k, _ in shapes) == 2 * 2 * 4 * 128
    assert all(k * 4 * (20 + 16 + 2 * 16) * 128 <= budget for k, _ in shapes)
    # The in-memory computation of the same rows (one chunk, all 128 directions of a repeat at once): float32
    # projections of the same float32 rows in other BLAS blocks, ~1e-7 relative each, averaged over 10^6 values.
    in_memory = metrics.swd_between(det, rows_a.numpy(), rows_b.numpy())
    assert bounded["levels"] == pytest.approx(in_memory["levels"], rel=1e-6)
    # Float64 NumPy: float32 projections of O(1) normalized values (the 16-px level's raw values ~128 with the
    # normalization folded into the directions: ~3x the rounding), relative error ~1e-6 per value.
    ref = np_multiscale_swd(det.split(rows_a), det.split(rows_b), 3)
    assert [bounded["levels"]["32"], bounded["levels"]["16"]] == pytest.approx(ref, rel=1e-5)
    assert bounded["value"] == pytest.approx(np.mean(ref), rel=1e-5)
    # Halves of one store (swd_floor's case) read only their images.
    halves = swd.multiscale_swd_sets(stores[0].level_sets(0, 10), stores[0].level_sets(10, 20), 3, 32)
    split = det.split(rows_a)
    assert [halves["levels"]["32"], halves["levels"]["16"]] == pytest.approx(
        np_multiscale_swd([x[:10 * 128] for x in split], [x[10 * 128:] for x in split], 3), rel=1e-5)
    # Closing (or collecting) a store deletes its files.
    folders = [s.folder for s in stores]
    assert all(os.path.isdir(f) for f in folders)
    stores[0].close()
    del stores, store
    assert not any(os.path.exists(f) for f in folders) and os.listdir(tmp_path) == []


def test_descriptor_files_cache_round_trip(tmp_path):
    images = W.make_images(12, res=16, seed=9)
    det = swd.SWDDescriptors(16, 3, "cpu")
    rows = det.features(torch.from_numpy(images), list(range(12)))
    store = det.new_stats()
    store.append(rows[:5])
    store.append(rows[5:])
    path = str(tmp_path / "reals.npz")
    store.save(path, dict(count=12, detector=det.id), images_per_chunk=5)
    # The file is FeatureStats' cache format: rows as `features`, all captured, no moments.
    stats, meta = FeatureStats.load(path)
    assert meta == dict(count=12, detector=det.id) and stats.num_items == 12
    assert np.array_equal(stats.get_all(), rows.numpy())
    back, meta = det.load_stats(path)
    assert meta == dict(count=12, detector=det.id) and back.num_items == 12
    assert np.array_equal(back.rows(0, 12), rows.numpy())
    # FeatureStats' own file of the same rows loads too; a rank that computes no distance only counts the rows.
    stats.save(str(tmp_path / "old.npz"), meta)
    assert np.array_equal(det.load_stats(str(tmp_path / "old.npz"))[0].rows(3, 9), rows[3:9].numpy())
    counted, _ = det.load_stats(path, keep=False)
    assert counted.num_items == 12 and counted.folder is None
    with pytest.raises(ValueError, match="only counted"):
        counted.level_sets()
    # Rows of another detector's width are refused, naming the file.
    with pytest.raises(ValueError, match="reals.npz: features are float32 \\(12, 18816\\)"):
        swd.DescriptorFiles.load(path, 2, 3)
