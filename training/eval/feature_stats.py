"""FID's and KID's mathematics: the Fréchet distance, the unbiased polynomial-kernel MMD, running feature stats."""
import json

import numpy as np
import scipy.linalg
import torch

from training.io.files import atomic_write


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2) (Heusel et al. 2017, eq. 6): ||mu1 - mu2||^2 + Tr(s1 + s2 - 2
    (s1 s2)^(1/2)), in float64 with scipy's sqrtm. A non-finite root (singular product) is retried with eps*I added
    to both covariances; imaginary parts from round-off are dropped, and a large imaginary diagonal (> 1e-3) is an
    error, as in the standard implementations."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        worst = np.max(np.abs(np.diagonal(covmean).imag))
        if worst > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component {worst:.3g} > 1e-3")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def kid(feat_r, feat_g, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y/d + 1)^3 (Bińkowski et al. 2018, eq. 4), averaged
    over `num_subsets` random subsets of m = min(n_r, n_g, max_subset_size) items from each set: MMD^2_u =
    [sum_{i!=j} k(g_i,g_j) + sum_{i!=j} k(r_i,r_j)] / (m(m-1)) - 2 sum_{i,j} k(g_i,r_j) / m^2."""
    feat_r, feat_g = np.asarray(feat_r, np.float64), np.asarray(feat_g, np.float64)
    if feat_r.ndim != 2 or feat_g.ndim != 2 or feat_r.shape[1] != feat_g.shape[1]:
        raise ValueError(f"kid: expected [n, d] feature arrays with equal d, got {feat_r.shape} and {feat_g.shape}")
    d = feat_r.shape[1]
    m = min(feat_r.shape[0], feat_g.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"kid: needs at least 2 items in each set, got {feat_r.shape[0]} and {feat_g.shape[0]}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = feat_g[rng.choice(feat_g.shape[0], m, replace=False)]
        y = feat_r[rng.choice(feat_r.shape[0], m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2.0 * kxy.sum() / (m * m)
    return float(total / num_subsets)


class FeatureStats:
    """Running feature statistics: mean and (population, 1/n) covariance merged batch by batch in float64
    (Chan et al. 1979 pairwise update, stabler than raw sums), and/or all features (float32) for KID."""
    def __init__(self, capture_all: bool = False, capture_mean_cov: bool = True):
        self.capture_all, self.capture_mean_cov = capture_all, capture_mean_cov
        self.num_items, self.num_features = 0, None
        self._mean = self._m2 = None
        self._all = []

    def append(self, x) -> None:
        x = torch.as_tensor(x)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.append expects [n, d] features, got {tuple(x.shape)}")
        if self.num_features is None:
            self.num_features = int(x.shape[1])
        elif x.shape[1] != self.num_features:
            raise ValueError(f"FeatureStats.append: feature dim {x.shape[1]} != earlier {self.num_features}")
        n = int(x.shape[0])
        if n == 0:
            return
        if self.capture_all:
            self._all.append(x.detach().to("cpu", torch.float32).numpy())
        if self.capture_mean_cov:
            x64 = x.detach().to(torch.float64)
            mb = x64.mean(0)
            xc = x64 - mb
            m2b = xc.T @ xc
            if self._mean is None:
                self._mean, self._m2 = mb, m2b
            else:
                na = self.num_items
                delta = (mb - self._mean).to(self._mean.device)
                self._mean = self._mean + delta * (n / (na + n))
                self._m2 = self._m2 + m2b.to(self._m2.device) + torch.outer(delta, delta) * (na * n / (na + n))
        self.num_items += n

    def get_all(self) -> np.ndarray:
        if not self.capture_all:
            raise ValueError("FeatureStats: all features were not captured (capture_all=False)")
        if not self._all:
            return np.zeros((0, self.num_features or 0), np.float32)
        return np.concatenate(self._all, axis=0)

    def get_mean_cov(self):
        if not self.capture_mean_cov:
            raise ValueError("FeatureStats: mean/cov were not captured (capture_mean_cov=False)")
        if self.num_items == 0:
            raise ValueError("FeatureStats: no items")
        return self._mean.cpu().numpy().copy(), (self._m2 / self.num_items).cpu().numpy()

    def save(self, path: str, meta: dict) -> None:
        """Write to `path` atomically (training.io.files.atomic_write); `meta` is stored as JSON."""
        arrays = {"meta": np.array(json.dumps(meta, sort_keys=True)), "num_items": np.array(self.num_items),
                  "num_features": np.array(self.num_features or 0),
                  "capture_all": np.array(self.capture_all), "capture_mean_cov": np.array(self.capture_mean_cov)}
        if self.capture_mean_cov and self.num_items:
            arrays["mean"] = self._mean.cpu().numpy()
            arrays["m2"] = self._m2.cpu().numpy()
        if self.capture_all:
            arrays["features"] = self.get_all()
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str):
        """Read a file written by `save`; returns (stats, meta)."""
        with np.load(path, allow_pickle=False) as z:
            s = cls(capture_all=bool(z["capture_all"]), capture_mean_cov=bool(z["capture_mean_cov"]))
            s.num_items, s.num_features = int(z["num_items"]), int(z["num_features"]) or None
            if "mean" in z:
                s._mean, s._m2 = torch.from_numpy(z["mean"].copy()), torch.from_numpy(z["m2"].copy())
            if "features" in z:
                s._all = [z["features"].copy()]
            meta = json.loads(str(z["meta"]))
        return s, meta
