"""FID and KID on Inception features, SWD on pyramid descriptors: distributed extraction, dataset cache, JSONL logs."""
import hashlib
import json
import os
import re
import time
from typing import Optional

import numpy as np
import torch

from training import dist
from training.eval.content_hash import dataset_content_hash, num_unmirrored
from training.eval.feature_stats import FeatureStats, frechet_distance, kid
from training.eval.inception import cache_root, full_fp32
from training.eval.swd import DescriptorFiles, RowSet, SWDDescriptors, multiscale_swd_sets
from training.io.records import append_metric_jsonl, metric_label, update_best  # noqa: F401 (re-exported)

# Bump when the cached statistics' meaning changes, so old cache files are never reused.
STATS_VERSION = 1


# Real descriptors of SWD are cached only up to this size (bytes): they are large (37,632 floats per 32 px image).
SWD_CACHE_MAX_BYTES = 2 << 30


def parse_metric(name: str):
    """Parse a metric name: fid50k_full, kid50k_full, swd16k, (fid|kid|swd)<N>[k][_full] -> (kind, num_gen,
    num_real). num_real is None for `_full` (all real images), else N."""
    m = re.fullmatch(r"(fid|kid|swd)(\d+)(k?)(_full)?", name)
    if m is None or int(m.group(2)) == 0:
        raise ValueError(f"unknown metric {name!r}: expected fid<N>, kid<N>, swd<N>, or with k (thousands), "
                         f"optionally with _full (all reals), e.g. fid50k_full, kid50k_full, swd16k, fid10k")
    n = int(m.group(2)) * (1000 if m.group(3) else 1)
    return m.group(1), n, (None if m.group(4) else n)


class StageView:
    """A dataset seen at a lower resolution, for metrics of a generator at a progressive stage: each item is the
    dataset's uint8 [C,H,W] image box-downsampled by the integer factor H // resolution (the area average over each
    factor x factor block, as F.avg_pool2d and training/schedule.stage_reals do), rounded half up to uint8: (sum +
    f*f // 2) // (f*f), exact in integers. Labels, length and mirroring are the dataset's; the stats cache key gets
    the resolution and the dataset's own content hash plus the factor."""
    def __init__(self, dataset, resolution: int):
        full = getattr(dataset, "resolution", None) or int(np.asarray(dataset[0][0]).shape[-1])
        name = getattr(dataset, "name", "dataset")
        resolution = int(resolution)
        if resolution < 1 or resolution > full or full % resolution:
            raise ValueError(f"StageView: stage resolution {resolution} px must divide dataset {name!r}'s "
                             f"resolution {full} px")
        self.dataset, self.resolution, self.full_resolution = dataset, resolution, int(full)
        self.factor = int(full) // resolution
        self.name = f"{name}@{resolution}px"
        self.xflip, self.label_dim = getattr(dataset, "xflip", False), getattr(dataset, "label_dim", 0)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        img = np.asarray(img)
        f, full = self.factor, self.full_resolution
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[1:] != (full, full):
            raise ValueError(f"dataset {getattr(self.dataset, 'name', '?')}[{i}]: expected a uint8 "
                             f"[C,{full},{full}] image, got {img.dtype} {img.shape}")
        r = self.resolution
        sums = img.reshape(img.shape[0], r, f, r, f).sum(axis=(2, 4), dtype=np.int64)
        return ((sums + f * f // 2) // (f * f)).astype(np.uint8), label

    def get_label(self, i):
        get_label = getattr(self.dataset, "get_label", None)
        return get_label(i) if get_label is not None else self.dataset[i][1]

    def content_hash(self) -> str:
        """The underlying dataset's content key plus the downsampling (see dataset_content_hash)."""
        return f"{dataset_content_hash(self.dataset)}|box{self.factor}-round-half-up"


def generator_stage(G, dataset_resolution):
    """The stage G outputs when it is below the dataset's resolution or mid-fade, as (resolution, alpha); None for a
    full-resolution generator (no `stage` attribute, or the default (full, 1.0))."""
    stage = getattr(G, "stage", None)
    if stage is None:
        return None
    res, alpha = int(stage[0]), float(stage[1])
    if dataset_resolution is not None and res >= int(dataset_resolution) and alpha >= 1:
        return None
    return res, alpha


# The real images metrics use as a torch Dataset of uint8 images: the n unmirrored items, then, with xflip, their
# mirrors (index >= n is the mirror of index - n): NVIDIA's order for a dataset opened with xflip, so the first
# max_items of it are the same images as theirs.
class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset, xflip: bool):
        self.dataset, self.xflip, self.n = dataset, xflip, num_unmirrored(dataset)

    def __len__(self):
        return self.n * (2 if self.xflip else 1)

    def __getitem__(self, i):
        img = np.asarray(self.dataset[i % self.n][0])
        if img.dtype != np.uint8 or img.ndim != 3:
            raise ValueError(f"dataset {getattr(self.dataset, 'name', '?')}[{i % self.n}]: expected uint8 "
                             f"[C,H,W] image, got {img.dtype} {img.shape}")
        if i >= self.n:
            img = img[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img))


# This rank's share of range(num_items) (rank::world_size) in batches; every rank yields the same number of
# batches (the last ones may be empty), because each batch ends in a collective gather.
def _rank_batches(num_items: int, batch_size: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    share = list(range(rank, num_items, world))
    num_batches = -(-(-(-num_items // world)) // batch_size)
    return [share[k * batch_size:(k + 1) * batch_size] for k in range(num_batches)]


# A new collector of the detector's features: FeatureStats, or the detector's own (SWD's DescriptorFiles, on disk;
# only counting on the ranks that compute no distance). _load_stats reads a cache file into the same kind.
def _new_stats(detector, capture_all: bool, capture_mean_cov: bool):
    new_stats = getattr(detector, "new_stats", None)
    return FeatureStats(capture_all, capture_mean_cov) if new_stats is None else new_stats(keep=dist.is_main())


def _load_stats(detector, path: str):
    load_stats = getattr(detector, "load_stats", None)
    return FeatureStats.load(path) if load_stats is None else load_stats(path, keep=dist.is_main())


# Run the detector over batches of global indices on every rank, once per input convention (the keys of `stats`,
# None: the detector's default); gather features and indices from all ranks and append each gathered batch in
# global index order, so the statistics (and KID's subsets) match one process. Every convention sees the same
# images. progress(done, total), when given, is called on every rank after each gathered batch with global counts.
def _extract(stats: dict, detector, batches, images_iter, progress=None, total=None) -> dict:
    dev = dist.device() if dist.get_world_size() > 1 else detector.device  # collectives run on dist.device()
    indexed = getattr(detector, "indexed", False)  # SWD's descriptors depend on the images' global indices
    for idx in batches:
        images = next(images_iter) if idx else None
        order = torch.argsort(dist.all_gather_cat(torch.tensor(idx, dtype=torch.long, device=dev)))
        for convention, s in stats.items():
            if not idx:
                feats = torch.zeros((0, detector.feature_dim), dtype=torch.float32, device=dev)
            elif indexed:
                feats = detector.features(images, idx).to(dev)
            elif convention is None or convention == getattr(detector, "convention", None):
                feats = detector.features(images).to(dev)
            else:
                feats = detector.features(images, convention=convention).to(dev)
            s.append(dist.all_gather_cat(feats)[order])
        if progress is not None:
            progress(next(iter(stats.values())).num_items, total)
    return stats


# The resize a cache key and a record name for `convention` (None: the detector's default).
def _resize(detector, convention):
    return detector.resize if convention is None else detector.resize_of(convention)


def compute_dataset_stats(dataset, detector, max_items=None, batch_size: int = 64, xflip: bool = False,
                          cache_dir=None, capture_all: bool = False, capture_mean_cov: bool = True,
                          num_workers: int = 0, progress=None, conventions=None):
    """Features of the real set as FeatureStats: the N unmirrored images, followed with xflip by their N mirrors (2N
    items), of which the first `max_items` (all if None). With `conventions` (names the detector computes, see
    Detector.conventions), a dict convention -> FeatureStats of the same images, one pass over them. Each is cached
    in `cache_dir` (default <GANFORGE_CACHE>/dataset-stats; False disables) under a key of dataset content
    (dataset_content_hash), resolution, mirroring, count, detector id and resize (the convention's); only the
    conventions not cached are computed. progress(done, total) is called as batches finish (once with done = total
    on a cache hit)."""
    images = _Images(dataset, xflip)
    count = len(images) if max_items is None else min(len(images), int(max_items))
    if count == 0:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')} is empty")
    resolution = getattr(dataset, "resolution", None) or int(np.asarray(dataset[0][0]).shape[-1])
    wanted = [None] if conventions is None else list(conventions)
    paths, found = {c: None for c in wanted}, {}
    if cache_dir is not False:
        keys = None
        if dist.is_main():
            base = dict(version=STATS_VERSION, content=dataset_content_hash(dataset), resolution=int(resolution),
                        xflip=bool(xflip), count=count, detector=detector.id, capture_all=bool(capture_all),
                        capture_mean_cov=bool(capture_mean_cov))
            keys = {c: dict(base, resize=_resize(detector, c)) for c in wanted}
        keys = dist.broadcast_object(keys)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(dataset, "name", "dataset")))
        hits = []
        for c in wanted:
            digest = hashlib.sha256(json.dumps(keys[c], sort_keys=True).encode()).hexdigest()[:20]
            paths[c] = os.path.join(cache_dir or os.path.join(cache_root(), "dataset-stats"),
                                    f"{name}-{resolution}-{count}{'-mirror' if xflip else ''}-{digest}.npz")
            # A hit needs a valid file on the main rank (its stored key must equal ours) and the file on every rank.
            hit = os.path.isfile(paths[c])
            if hit and dist.is_main():
                try:
                    found[c], meta = _load_stats(detector, paths[c])
                    hit = meta == keys[c]
                except Exception as e:  # unreadable cache file: recompute and overwrite it
                    dist.print0(f"dataset-stats cache {paths[c]} unreadable ({e}); recomputing")
                    hit = False
            hits.append(float(hit))
        votes = dist.all_reduce_sum(torch.tensor(hits, device=dist.device()))
        for c, v in zip(wanted, votes.tolist()):
            if int(v) == dist.get_world_size():
                found[c] = found[c] if found.get(c) is not None else _load_stats(detector, paths[c])[0]
            else:
                found.pop(c, None)
    missing = [c for c in wanted if c not in found]
    if missing:
        batches = _rank_batches(count, batch_size)
        mine = [i for b in batches for i in b]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, mine), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers)
        fresh = _extract({c: _new_stats(detector, capture_all, capture_mean_cov) for c in missing}, detector, batches,
                         iter(loader), progress, count)
        for c, stats in fresh.items():
            if paths[c] is not None and dist.is_main():
                stats.save(paths[c], keys[c])
            found[c] = stats
        dist.barrier()
    elif progress is not None:
        progress(count, count)
    return found[None] if conventions is None else {c: found[c] for c in wanted}


def dataset_label_sampler(dataset, seed: int = 0):
    """Labels for generated images drawn from the dataset's labels: global index i -> label of a dataset item picked by
    a generator seeded with (seed, i), so the draw does not depend on how items are split across ranks."""
    get_label = getattr(dataset, "get_label", None) or (lambda j: dataset[j][1])

    def sample(indices):
        picks = [int(np.random.default_rng([seed, 1, int(i)]).integers(num_unmirrored(dataset))) for i in indices]
        return np.stack([np.asarray(get_label(j), np.float32) for j in picks])
    return sample


def compute_generator_stats(G, detector, num_gen: int, batch_size: int = 32, c_sampler=None,
                            truncation_psi: float = 1, noise_mode: str = "const", seed: int = 0,
                            capture_all: bool = False, capture_mean_cov: bool = True, progress=None,
                            conventions=None):
    """Features of `num_gen` images from G(z, c, truncation_psi, noise_mode) (float NCHW in [-1,1], quantized to uint8
    as saved images are). Latent i is drawn from a generator seeded with (seed, i): each rank makes its share, and
    the images do not depend on the number of processes. Labels come from c_sampler(global indices) when
    G.c_dim > 0. FeatureStats, or with `conventions` a dict convention -> FeatureStats of the same images (each
    image made once); progress(done, total) as in compute_dataset_stats."""
    c_dim = int(getattr(G, "c_dim", 0) or 0)
    if c_dim > 0 and c_sampler is None:
        raise ValueError(f"compute_generator_stats: G.c_dim={c_dim} needs c_sampler (e.g. dataset_label_sampler)")
    params = list(G.parameters()) if isinstance(G, torch.nn.Module) else []
    dev = params[0].device if params else dist.device()
    batches = _rank_batches(int(num_gen), batch_size)

    def images():
        for idx in batches:
            if not idx:
                return
            z = np.stack([np.random.default_rng([seed, 0, i]).standard_normal(G.z_dim) for i in idx])
            z = torch.from_numpy(z.astype(np.float32)).to(dev)
            c = (torch.from_numpy(np.asarray(c_sampler(idx), np.float32)) if c_dim > 0
                 else torch.zeros((len(idx), 0))).to(dev)
            with torch.no_grad():
                img = G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)
            yield (img.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    wanted = [None] if conventions is None else list(conventions)
    stats = _extract({c: _new_stats(detector, capture_all, capture_mean_cov) for c in wanted}, detector, batches,
                     images(), progress, int(num_gen))
    return stats[None] if conventions is None else stats


def real_set_mirrored(dataset, mirror=None) -> bool:
    """Whether the reals include their x-flips: `mirror` when given, else the dataset's own `xflip` (how it was
    opened; the training loop opens it with data.xflip, so a mirrored run is measured against its mirrored set)."""
    return bool(getattr(dataset, "xflip", False)) if mirror is None else bool(mirror)


def calc_metric(name: str, G, dataset, detector, batch_size: int = 32, cache_dir=None, seed: int = 0,
                truncation_psi: float = 1, noise_mode: str = "const", c_sampler=None, num_workers: int = 0,
                kid_subsets: int = 100, kid_subset_size: int = 1000, mirror: Optional[bool] = None,
                progress=None) -> dict:
    """One metric (see parse_metric) for G against `dataset`; the same call on every rank, same result everywhere.

    The reals are the dataset's N unmirrored images, and with `mirror` (None: the dataset's own xflip, see
    real_set_mirrored) also their N x-flips, as NVIDIA's metrics use the training set as it was mirrored: `_full`
    metrics use all N (2N) of them, the others the first num_real of that sequence (originals first). Returns
    {metric, value, num_gen, num_real, mirror, detector, detector_hash, resolution, dataset, ...}. FID and KID are
    computed in every input convention the detector has (Detector.conventions) from the same generated and real
    images: `value` in its default one (`convention`, `resize`: NVIDIA's for NVIDIA's weights), `fid_clean` /
    `kid_clean` in clean-fid's, and `conventions` maps each to {value, resize}. A G at a
    progressive stage below the dataset's resolution is compared with the reals box-downsampled to the stage
    (StageView; not fade-blended: the fade is G's own state); such a record (and one of a full-resolution G mid-fade)
    also carries stage_alpha and dataset_resolution, with resolution = the stage's. progress(what, done, total), when
    given, is called on every rank as images are processed, `what` being "reals" or "generated"."""
    kind, num_gen, num_real = parse_metric(name)
    t0 = time.time()
    want_all, want_moments = kind != "fid", kind == "fid"
    mirror = real_set_mirrored(dataset, mirror)
    if c_sampler is None and int(getattr(G, "c_dim", 0) or 0) > 0:
        c_sampler = dataset_label_sampler(dataset, seed)
    full_res = getattr(dataset, "resolution", None) or int(np.asarray(dataset[0][0]).shape[-1])
    stage = generator_stage(G, full_res)
    reals = StageView(dataset, stage[0]) if stage is not None and stage[0] < full_res else dataset
    if kind == "swd":  # SWD needs no detector: descriptors of the reals' (stage's) resolution
        detector = swd_detector(reals, seed)
        cache_dir = _swd_cache_dir(detector, num_real or len(reals), cache_dir)

    def report(what):  # calc_metric's progress(what, done, total) as the stats functions' progress(done, total)
        return None if progress is None else (lambda done, total: progress(what, done, total))

    conventions = None if kind == "swd" else list(getattr(detector, "conventions", None) or [None])
    real = compute_dataset_stats(reals, detector, max_items=num_real, batch_size=batch_size, xflip=mirror,
                                 cache_dir=cache_dir, capture_all=want_all, capture_mean_cov=want_moments,
                                 num_workers=num_workers, progress=report("reals"), conventions=conventions)
    with full_fp32():  # G's images too, not only the detector's features
        gen = compute_generator_stats(G, detector, num_gen, batch_size=batch_size, c_sampler=c_sampler,
                                      truncation_psi=truncation_psi, noise_mode=noise_mode, seed=seed,
                                      capture_all=want_all, capture_mean_cov=want_moments,
                                      progress=report("generated"), conventions=conventions)
    if conventions is None:
        real, gen = {None: real}, {None: gen}
    value = None
    if dist.is_main():  # the matrix square root / KID subsets / SWD run once, then the numbers are shared
        if kind == "fid":
            value = {c: frechet_distance(*real[c].get_mean_cov(), *gen[c].get_mean_cov()) for c in real}
        elif kind == "kid":
            value = {c: kid(real[c].get_all(), gen[c].get_all(), kid_subsets, kid_subset_size, seed) for c in real}
        else:
            value = {None: swd_between(detector, real[None], gen[None], seed)}
    value = dist.broadcast_object(value)
    first = next(iter(real))
    extra = dict(convention=first) if first is not None else {}
    if kind == "swd":
        extra.update(levels=value[None]["levels"])
        value = {None: value[None]["value"]}
    elif first is not None:
        extra["conventions"] = {c: dict(value=v, resize=_resize(detector, c)) for c, v in value.items()}
        if "clean" in value and first != "clean":
            extra[f"{kind}_clean"] = value["clean"]
    real, gen = real[first], gen[first]
    record = dict(metric=name, value=value[first], **extra, num_gen=gen.num_items, num_real=real.num_items,
                  mirror=mirror, detector=detector.file_name, detector_hash=detector.sha256, detector_id=detector.id,
                  detector_kind=detector.kind, resize=_resize(detector, first),
                  resolution=getattr(reals, "resolution", None),
                  dataset=getattr(reals, "name", None), truncation_psi=truncation_psi, seed=seed,
                  world_size=dist.get_world_size(), time_sec=time.time() - t0)
    if stage is not None:
        record.update(resolution=stage[0], stage_alpha=stage[1], dataset_resolution=int(full_res))
    return record


def swd_detector(dataset, seed: int = 0) -> SWDDescriptors:
    """SWD's descriptor extractor for a dataset's resolution and channels, on this process's device."""
    image = np.asarray(dataset[0][0])
    return SWDDescriptors(getattr(dataset, "resolution", None) or image.shape[-1], image.shape[0], dist.device(), seed)


# The cache folder for `count` images' SWD descriptors: `cache_dir`, or False (no cache) above SWD_CACHE_MAX_BYTES.
def _swd_cache_dir(detector: SWDDescriptors, count: int, cache_dir):
    return False if count * detector.feature_dim * 4 > SWD_CACHE_MAX_BYTES else cache_dir


def swd_between(detector: SWDDescriptors, real_rows, fake_rows, seed: int = 0) -> dict:
    """Multi-scale SWD (x1e3) of two sets of descriptors, each a DescriptorFiles (read from disk a level and a chunk
    at a time), a list of RowSet per level, or rows of SWDDescriptors.features, projected on this process's device:
    {'levels': {px: value}, 'value': mean}."""
    def level_sets(x):
        if isinstance(x, DescriptorFiles):
            return x.level_sets()
        if isinstance(x, list) and all(isinstance(r, RowSet) for r in x):
            return x
        return [RowSet.of_tensor(d) for d in detector.split(torch.from_numpy(np.asarray(x)))]
    return multiscale_swd_sets(level_sets(real_rows), level_sets(fake_rows), detector.channels, detector.resolution,
                               seed, dist.device())


def swd_floor(dataset, num: int, batch_size: int = 32, cache_dir=None, seed: int = 0, mirror=None) -> dict:
    """SWD between two disjoint halves of the reals, num images each (less when the set has fewer than 2 num: its
    halves): the value a perfect generator would get at this sample size (the metric's noise floor). Same call on
    every rank; the reals' descriptors are cached as the metric's. Returns multiscale_swd's dict plus num_real."""
    detector, mirror = swd_detector(dataset, seed), real_set_mirrored(dataset, mirror)
    total = len(_Images(dataset, mirror))
    count = min(2 * int(num), total - total % 2)
    real = compute_dataset_stats(dataset, detector, max_items=count, batch_size=batch_size, xflip=mirror,
                                 cache_dir=_swd_cache_dir(detector, count, cache_dir), capture_all=True,
                                 capture_mean_cov=False)
    value = None
    if dist.is_main():
        halves = real.level_sets(0, count // 2), real.level_sets(count // 2, count)
        value = dict(swd_between(detector, *halves, seed), num_real=count // 2)
    return dist.broadcast_object(value)


def fid_floor(dataset, detector, num: int, batch_size: int = 32, cache_dir=None, mirror=None) -> dict:
    """FID between two disjoint halves of the reals, num images each (less when the set has fewer than 2 num: its
    halves), in every convention of the detector: the value a perfect generator would get at this sample size (the
    metric's noise floor). Same call on every rank. Returns {conventions: {name: value}, value (the default
    convention's), num_real}."""
    mirror = real_set_mirrored(dataset, mirror)
    total = len(_Images(dataset, mirror))
    count = min(2 * int(num), total - total % 2)
    conventions = list(getattr(detector, "conventions", None) or [detector.convention])
    real = compute_dataset_stats(dataset, detector, max_items=count, batch_size=batch_size, xflip=mirror,
                                 cache_dir=cache_dir, capture_all=True, capture_mean_cov=False,
                                 conventions=conventions)
    value = None
    if dist.is_main():
        values = {}
        for c, stats in real.items():
            rows = stats.get_all().astype(np.float64)
            a, b = rows[: count // 2], rows[count // 2:]
            values[c] = frechet_distance(a.mean(0), np.cov(a, rowvar=False, bias=True),
                                         b.mean(0), np.cov(b, rowvar=False, bias=True))
        value = dict(conventions=values, value=values[conventions[0]], num_real=count // 2)
    return dist.broadcast_object(value)


def evaluate_snapshot(G, dataset, detector, metrics, run_dir: str, snapshot, kimg, mirror: Optional[bool] = None,
                      **kwargs) -> list:
    """For the training loop, every `metrics_every` kimg, on every rank: compute `metrics` for G_ema, append each to
    metric-<name>.jsonl and track the best (main rank). `mirror` (metrics.mirror; None: the dataset's xflip) and the
    other keyword arguments go to calc_metric. Returns the records (with is_best) on every rank."""
    records = []
    for name in metrics:
        result = calc_metric(name, G, dataset, detector, mirror=mirror, **kwargs)
        if dist.is_main():
            record = append_metric_jsonl(run_dir, result, snapshot, kimg)
            record["is_best"] = update_best(run_dir, record)
            records.append(record)
    return dist.broadcast_object(records)
