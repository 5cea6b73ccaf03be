"""Multi-scale sliced Wasserstein distance (SWD; Karras et al. 2018, sec. 5 and appendix D): needs no weights."""
import json
import math
import os
import shutil
import tempfile
import weakref
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from training.io.files import atomic_write

# The paper's settings: Laplacian pyramid from the full resolution down to 16 px, 128 random 7x7 neighbourhoods per
# image and level, 512 random directions drawn as 4 repeats of 128; values are reported x1e3.
MIN_RES = 16
NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIRS_PER_REPEAT = 128
DIR_REPEATS = 4
SCALE = 1e3

# Bump when the descriptors' meaning changes (cached real descriptors carry it in their key).
DESCRIPTOR_VERSION = 1

# The 5-tap binomial filter [1, 4, 6, 4, 1] / 16 of the pyramid (its 2-D outer product is the 5x5 Gaussian of the
# paper's pyramid).
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


# Separable 5x5 binomial blur with mirror padding (d c b | a b c d | c b a), times `gain`.
def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    c = x.shape[1]
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, (k * gain).view(1, 1, 1, 5).expand(c, 1, 1, 5).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1).contiguous(), groups=c)


# One pyramid step down: blur, then keep every second pixel.
def pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


# One step up: zeros between the pixels, then blur with gain 4 (the filter's DC gain over the kept quarter).
def pyr_up(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros([n, c, 2 * h, 2 * w])
    up[:, :, ::2, ::2] = x
    return _blur(up, 4.0)


def num_levels(resolution: int) -> int:
    """Pyramid levels for images of `resolution` px: one per octave from the full size down to MIN_RES (16 px), at
    least one."""
    return max(1, int(math.log2(int(resolution))) - int(math.log2(MIN_RES)) + 1)


def level_resolutions(resolution: int) -> list:
    """The size (px) of each pyramid level, finest first, e.g. [32, 16] for 32 px images."""
    return [int(resolution) >> i for i in range(num_levels(resolution))]


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list:
    """The Laplacian pyramid of float images [N, C, H, W]: `levels` tensors, finest first; every level but the last
    is the band-pass difference x - up(down(x)), the last the low-pass remainder."""
    pyramid = [images]
    for _ in range(levels - 1):
        low = pyr_down(pyramid[-1])
        pyramid[-1] = pyramid[-1] - pyr_up(low)
        pyramid.append(low)
    return pyramid


def nhood_centres(global_index: int, level: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """The NHOODS_PER_IMAGE neighbourhood centres (y, x) of one image at one level, int64 [128, 2]: uniform over the
    positions where a whole 7x7 neighbourhood fits, drawn from a generator seeded with (seed, level, image index),
    so that they depend neither on the batch nor on how images are split over processes."""
    half = NHOOD_SIZE // 2
    if height < NHOOD_SIZE or width < NHOOD_SIZE:
        raise ValueError(f"SWD: pyramid level {level} is {height}x{width} px, smaller than the {NHOOD_SIZE}x"
                         f"{NHOOD_SIZE} neighbourhoods (images must be at least {NHOOD_SIZE} px)")
    rng = np.random.default_rng([int(seed), int(level), int(global_index)])
    return np.stack([rng.integers(half, height - half, NHOODS_PER_IMAGE),
                     rng.integers(half, width - half, NHOODS_PER_IMAGE)], axis=1)


def descriptors(images: torch.Tensor, indices, seed: int = 0) -> list:
    """Raw (unnormalized) descriptors of uint8 images [N, C, H, W] with global indices `indices`: per pyramid level a
    float32 tensor [N * 128, C * 49], the 7x7 neighbourhoods of the level's pixel values (0..255 scale) around
    nhood_centres, image by image."""
    n, c, h, w = images.shape
    if len(indices) != n:
        raise ValueError(f"SWD descriptors: {n} images but {len(indices)} indices")
    pyramid = laplacian_pyramid(images.to(torch.float32), num_levels(min(h, w)))
    offsets = torch.arange(NHOOD_SIZE, device=images.device) - NHOOD_SIZE // 2
    out = []
    for level, band in enumerate(pyramid):
        centres = torch.from_numpy(np.stack([nhood_centres(i, level, band.shape[2], band.shape[3], seed)
                                             for i in indices]) if n else np.zeros([0, NHOODS_PER_IMAGE, 2], np.int64))
        centres = centres.to(images.device)
        ys = centres[:, :, 0, None, None] + offsets[:, None]              # [N, 128, 7, 1]
        xs = centres[:, :, 1, None, None] + offsets[None, :]              # [N, 128, 1, 7]
        img = torch.arange(n, device=images.device)[:, None, None, None]
        patches = band.permute(0, 2, 3, 1)[img, ys, xs]                    # [N, 128, 7, 7, C]
        out.append(patches.permute(0, 1, 4, 2, 3).reshape(n * NHOODS_PER_IMAGE, c * NHOOD_SIZE ** 2))
    return out


def normalize(desc: torch.Tensor, channels: int) -> torch.Tensor:
    """Descriptors [M, C * 49] with each colour channel's mean subtracted and divided by its standard deviation, over
    every descriptor and position of the set (the paper normalizes each set by its own statistics); float64 sums. The
    in-memory form of RowSet.normalized (which streams the set and folds the result into the directions)."""
    d = desc.to(torch.float64).view(desc.shape[0], channels, -1)
    mean = d.mean(dim=(0, 2), keepdim=True)
    std = (d - mean).square().mean(dim=(0, 2), keepdim=True).sqrt().clamp_min(1e-12)
    return ((d - mean) / std).view(desc.shape[0], -1)


# Bytes of projections held at once: the two sets' [k, M] float32 sorted projections for k directions at a time
# (k = this budget // (8 M), at most one repeat's 128): 512 MiB is 32 directions for swd16k's M = 2,048,000.
PROJECTION_BYTES = 512 << 20

# Descriptor rows read from a file or tensor at a time (37 MB of float32 rows of 147 values).
CHUNK_ROWS = 1 << 16


class RowSet:
    """One set of descriptors [count, dim] that can be read in chunks of float32 rows (`chunks()`: CPU tensors in
    order), from a tensor or a file; `shift` and `scale` ([dim] float64, or None) normalize the rows as
    (row - shift) * scale, applied to the directions instead of the rows (see _sorted_projections)."""
    def __init__(self, count: int, dim: int, chunks, shift=None, scale=None):
        self.count, self.dim, self.chunks, self.shift, self.scale = int(count), int(dim), chunks, shift, scale

    @classmethod
    def of_tensor(cls, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> "RowSet":
        """The rows of a [M, D] tensor (any device and float dtype), chunk by chunk as float32 on the CPU."""
        return cls(x.shape[0], x.shape[1], lambda: (c.to("cpu", torch.float32) for c in x.split(chunk_rows)))

    def normalized(self, channels: int) -> "RowSet":
        """The same rows normalized as `normalize` does (each channel's mean and standard deviation over the set),
        with the moments from one streamed pass in float64 (chunk moments merged as in Chan et al. 1979)."""
        n, mean, m2 = 0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
        for chunk in self.chunks():
            d = chunk.to(torch.float64).view(chunk.shape[0], channels, -1).transpose(0, 1).reshape(channels, -1)
            nb = d.shape[1]
            if nb == 0:
                continue
            mb = d.mean(1)
            m2b = (d - mb[:, None]).square().sum(1)
            delta = mb - mean
            mean = mean + delta * (nb / (n + nb))
            m2 = m2 + m2b + delta.square() * (n * nb / (n + nb))
            n += nb
        std = (m2 / max(n, 1)).sqrt().clamp_min(1e-12)
        per = self.dim // channels
        return RowSet(self.count, self.dim, self.chunks, mean.repeat_interleave(per),
                      (1.0 / std).repeat_interleave(per))


# Each direction's projections of a set, sorted: [k, M] float32 on `device` for directions dirs [k, D] (float64).
# A normalized set's (x - shift) * scale is projected as x . (dir * scale) - dir . (shift * scale): the rows are
# read as they are, chunk by chunk. Sorting: NumPy's vectorized sort in place on the CPU (14x faster than torch.sort
# there: scripts/bench_swd.py), torch's on other devices.
def _sorted_projections(rows: RowSet, dirs: torch.Tensor, device) -> torch.Tensor:
    w = dirs if rows.scale is None else dirs * rows.scale
    w32 = w.to(device, torch.float32)
    out = torch.empty([w.shape[0], rows.count], dtype=torch.float32, device=device)
    at = 0
    for chunk in rows.chunks():
        out[:, at:at + chunk.shape[0]] = w32 @ chunk.to(device).T
        at += chunk.shape[0]
    if at != rows.count:
        raise ValueError(f"SWD: a descriptor set gave {at} rows, expected {rows.count}")
    if rows.shift is not None:
        out -= (w @ rows.shift).to(device, torch.float32)[:, None]
    if out.device.type == "cpu":
        out.numpy().sort(axis=1)
        return out
    return torch.sort(out, dim=1).values


# Rows of sorted projections resampled to `m` values: the quantiles at ranks (i + 0.5) / m (the identity when the
# counts are equal), so that sets of different sizes can be compared.
def _quantiles(sorted_rows: torch.Tensor, m: int) -> torch.Tensor:
    n = sorted_rows.shape[1]
    if n == m:
        return sorted_rows
    rank = ((torch.arange(m, dtype=torch.float64) + 0.5) * (n / m)).long().clamp_max(n - 1)
    return sorted_rows[:, rank.to(sorted_rows.device)]


def sliced_wasserstein_sets(a: RowSet, b: RowSet, seed: int = 0, dir_repeats: int = DIR_REPEATS,
                            dirs_per_repeat: int = DIRS_PER_REPEAT, device="cpu",
                            budget_bytes: int = PROJECTION_BYTES) -> float:
    """Sliced Wasserstein distance between descriptor sets a [M, D] and b [M', D]: for dir_repeats x dirs_per_repeat
    random unit directions (Gaussian, seeded), the mean absolute difference of the sorted projections of the two sets
    (the 1-D Wasserstein-1 distance along each direction), averaged over directions. Unequal set sizes are compared
    at the smaller set's quantiles. Float32 projections, float64 sums. Memory: the directions are taken k at a time
    so that both sets' [k, M] projections fit in `budget_bytes`; the rows are read once per k directions."""
    if a.dim != b.dim or not a.count or not b.count:
        raise ValueError(f"sliced_wasserstein: expected non-empty [M, D] sets with equal D, got {(a.count, a.dim)} "
                         f"and {(b.count, b.dim)}")
    gen = torch.Generator().manual_seed(int(seed))
    m = min(a.count, b.count)
    per_dir = 4 * (a.count + b.count + (2 * m if a.count != b.count else 0))
    k = max(1, min(dirs_per_repeat, int(budget_bytes) // per_dir))
    total = 0.0
    for _ in range(dir_repeats):
        dirs = torch.randn([a.dim, dirs_per_repeat], generator=gen, dtype=torch.float64)
        dirs = (dirs / dirs.square().sum(0, keepdim=True).sqrt()).T
        repeat_sum = 0.0
        for s in range(0, dirs_per_repeat, k):
            pa = _quantiles(_sorted_projections(a, dirs[s:s + k], device), m)
            pb = _quantiles(_sorted_projections(b, dirs[s:s + k], device), m).sub_(pa).abs_()
            del pa
            repeat_sum += float(pb.numpy().sum(dtype=np.float64) if pb.device.type == "cpu"
                                else pb.sum(dtype=torch.float64))
        total += repeat_sum / (dirs_per_repeat * m)
    return total / dir_repeats


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, seed: int = 0, dir_repeats: int = DIR_REPEATS,
                       dirs_per_repeat: int = DIRS_PER_REPEAT) -> float:
    """sliced_wasserstein_sets of two in-memory sets a [M, D] and b [M', D] (as they are: not normalized), on their
    device."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"sliced_wasserstein: expected non-empty [M, D] sets with equal D, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return sliced_wasserstein_sets(RowSet.of_tensor(a), RowSet.of_tensor(b), seed, dir_repeats, dirs_per_repeat,
                                   a.device)


def multiscale_swd_sets(real_levels: list, fake_levels: list, channels: int, resolution: int, seed: int = 0,
                        device="cpu", budget_bytes: int = PROJECTION_BYTES) -> dict:
    """SWD x1e3 per pyramid level between two sets of raw descriptors (lists of RowSet [M, C * 49], finest first),
    each set normalized by its own statistics, one level at a time: {'levels': {'32': v, '16': v}, 'value': their
    mean}."""
    if len(real_levels) != len(fake_levels):
        raise ValueError(f"multiscale_swd: {len(real_levels)} real levels vs {len(fake_levels)} generated")
    values = {}
    for res, r, f in zip(level_resolutions(resolution), real_levels, fake_levels):
        values[str(res)] = SCALE * sliced_wasserstein_sets(r.normalized(channels), f.normalized(channels), seed,
                                                           device=device, budget_bytes=budget_bytes)
    return dict(levels=values, value=float(np.mean(list(values.values()))))


def multiscale_swd(real_levels: list, fake_levels: list, channels: int, resolution: int, seed: int = 0) -> dict:
    """multiscale_swd_sets of in-memory descriptor sets (lists of tensors [M, C * 49], finest first)."""
    return multiscale_swd_sets([RowSet.of_tensor(x) for x in real_levels], [RowSet.of_tensor(x) for x in fake_levels],
                               channels, resolution, seed, real_levels[0].device if real_levels else "cpu")


class SWDDescriptors:
    """The SWD 'detector': turns uint8 images and their global indices into one row per image holding all its
    descriptors (levels x 128 x C*49 values), so that metrics.py extracts, gathers and caches them as Inception
    features, collected in DescriptorFiles (new_stats) rather than in memory. Its id names everything that changes the
    descriptors (the cache key and metric records hold it)."""
    indexed = True  # features() takes the images' global indices

    def __init__(self, resolution: int, channels: int, device, seed: int = 0):
        self.resolution, self.channels, self.seed = int(resolution), int(channels), int(seed)
        self.device = torch.device(device)
        self.levels = num_levels(self.resolution)
        self.feature_dim = self.levels * NHOODS_PER_IMAGE * self.channels * NHOOD_SIZE ** 2
        self.kind = "swd"
        self.file_name = None
        self.sha256 = None
        self.id = (f"swd-v{DESCRIPTOR_VERSION}-min{MIN_RES}-nhood{NHOOD_SIZE}x{NHOODS_PER_IMAGE}-seed{self.seed}")
        self.resize = None

    @torch.no_grad()
    def features(self, images: torch.Tensor, indices) -> torch.Tensor:
        """[N, feature_dim] float32: the image's descriptors of every level, finest first."""
        levels = descriptors(images.to(self.device), indices, self.seed)
        return torch.cat([d.view(images.shape[0], -1) for d in levels], dim=1)

    def new_stats(self, keep: bool = True) -> "DescriptorFiles":
        """An empty DescriptorFiles for this detector's descriptors (metrics.py collects them there instead of in a
        FeatureStats); with keep=False it only counts them (the ranks that compute no distance)."""
        return DescriptorFiles(self.levels, self.channels, keep=keep)

    def load_stats(self, path: str, keep: bool = True):
        """(DescriptorFiles, meta) from a cache file written by DescriptorFiles.save (or FeatureStats.save)."""
        return DescriptorFiles.load(path, self.levels, self.channels, keep=keep)

    def split(self, rows) -> list:
        """Rows of features() ([N, feature_dim]) back to per-level descriptor sets [N * 128, C * 49]."""
        rows = torch.as_tensor(rows)
        per = rows.view(rows.shape[0], self.levels, NHOODS_PER_IMAGE * self.channels * NHOOD_SIZE ** 2)
        return [per[:, i].reshape(-1, self.channels * NHOOD_SIZE ** 2) for i in range(self.levels)]


# Removes a DescriptorFiles' folder (its finalizer: when it is closed, collected or the interpreter exits).
def _remove_folder(files: list, folder: str) -> None:
    for f in files:
        f.close()
    shutil.rmtree(folder, ignore_errors=True)


class DescriptorFiles:
    """SWD descriptors of one set, collected image by image on disk instead of in memory: one float32 file per
    pyramid level ([N * 128, C * 49] rows, in a temporary folder under TMPDIR, removed when the object is closed or
    collected), read back a chunk at a time (`level_sets`). Takes FeatureStats' place for SWD in metrics.py: append
    rows of SWDDescriptors.features, num_items, save/load as the same .npz cache file (written and read streaming)."""
    def __init__(self, levels: int, channels: int, keep: bool = True, folder=None):
        self.levels, self.channels, self.keep = int(levels), int(channels), bool(keep)
        self.dim = self.channels * NHOOD_SIZE ** 2
        self.num_features = self.levels * NHOODS_PER_IMAGE * self.dim
        self.num_items, self.files = 0, []
        self.folder = tempfile.mkdtemp(prefix="ganforge-swd-", dir=folder) if keep else None
        if keep:
            self.files = [open(os.path.join(self.folder, f"level{i}.f32"), "w+b") for i in range(self.levels)]
            self._finalizer = weakref.finalize(self, _remove_folder, self.files, self.folder)

    def append(self, rows) -> None:
        """Add images' rows [n, levels * 128 * C * 49] (SWDDescriptors.features) after those already held."""
        rows = torch.as_tensor(rows)
        if rows.ndim != 2 or rows.shape[1] != self.num_features:
            raise ValueError(f"DescriptorFiles.append: expected [n, {self.num_features}] rows, got {tuple(rows.shape)}")
        if self.keep and rows.shape[0]:
            per = rows.detach().to("cpu", torch.float32).view(rows.shape[0], self.levels, -1)
            for f, level in zip(self.files, per.unbind(1)):
                f.seek(0, os.SEEK_END)
                f.write(level.contiguous().numpy().tobytes())
        self.num_items += int(rows.shape[0])

    def _level_chunks(self, level: int, start: int, stop: int, chunk_rows: int):
        f, row_bytes = self.files[level], 4 * self.dim
        f.flush()
        for r in range(start * NHOODS_PER_IMAGE, stop * NHOODS_PER_IMAGE, chunk_rows):
            n = min(chunk_rows, stop * NHOODS_PER_IMAGE - r)
            f.seek(r * row_bytes)
            buf = bytearray(n * row_bytes)
            if f.readinto(buf) != len(buf):
                raise OSError(f"SWD descriptor file {f.name} is shorter than expected")
            yield torch.frombuffer(buf, dtype=torch.float32).view(n, self.dim)

    def level_sets(self, start: int = 0, stop=None, chunk_rows: int = CHUNK_ROWS) -> list:
        """Images [start, stop) as one RowSet per level (finest first), read from the files chunk by chunk."""
        if not self.keep:
            raise ValueError("DescriptorFiles: the descriptors were only counted (keep=False)")
        stop = self.num_items if stop is None else int(stop)
        return [RowSet((stop - start) * NHOODS_PER_IMAGE, self.dim,
                       lambda i=i: self._level_chunks(i, int(start), stop, chunk_rows)) for i in range(self.levels)]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Images [start, stop) as rows of SWDDescriptors.features, [n, num_features] float32."""
        out = np.empty([stop - start, self.levels, NHOODS_PER_IMAGE * self.dim], np.float32)
        for i, level in enumerate(self.level_sets(start, stop, chunk_rows=(stop - start) * NHOODS_PER_IMAGE)):
            for chunk in level.chunks():
                out[:, i] = chunk.numpy().reshape(stop - start, -1)
        return out.reshape(stop - start, -1)

    def close(self) -> None:
        """Delete the files now."""
        if self.keep:
            self._finalizer()

    def save(self, path: str, meta: dict, images_per_chunk: int = 256) -> None:
        """Write the FeatureStats cache file (.npz: the rows as `features`, capture_all) atomically, streaming."""
        small = {"meta": np.array(json.dumps(meta, sort_keys=True)), "num_items": np.array(self.num_items),
                 "num_features": np.array(self.num_features), "capture_all": np.array(True),
                 "capture_mean_cov": np.array(False)}

        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, value in small.items():
                    with z.open(f"{name}.npy", "w") as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
                with z.open("features.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, dict(
                        descr=np.lib.format.dtype_to_descr(np.dtype(np.float32)), fortran_order=False,
                        shape=(self.num_items, self.num_features)))
                    for i in range(0, self.num_items, images_per_chunk):
                        member.write(self.rows(i, min(i + images_per_chunk, self.num_items)).tobytes())
        atomic_write(path, write)

    @classmethod
    def load(cls, path: str, levels: int, channels: int, keep: bool = True, images_per_chunk: int = 256):
        """Read a cache file written by `save` (or FeatureStats.save with all features), streaming the rows into a
        new DescriptorFiles; returns (it, meta)."""
        with zipfile.ZipFile(path) as z:
            with z.open("meta.npy") as member:
                meta = json.loads(str(np.lib.format.read_array(member, allow_pickle=False)))
            out = cls(levels, channels, keep=keep)
            with z.open("features.npy") as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(member)
                if fortran or dtype != np.float32 or len(shape) != 2 or shape[1] != out.num_features:
                    raise ValueError(f"{path}: features are {dtype} {shape}, expected float32 [n, {out.num_features}]")
                if not keep:
                    out.num_items = int(shape[0])
                for i in range(0, int(shape[0]) if keep else 0, images_per_chunk):
                    n = min(images_per_chunk, int(shape[0]) - i)
                    buf = bytearray(n * out.num_features * 4)
                    if member.readinto(buf) != len(buf):
                        raise ValueError(f"{path}: features end after {i} of {shape[0]} rows")
                    out.append(np.frombuffer(buf, np.float32).reshape(n, -1))
        return out, meta
