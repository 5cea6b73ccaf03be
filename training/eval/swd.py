"""Multi-scale sliced Wasserstein distance (SWD; Karras et al. 2018, sec. 5 and appendix D): needs no weights."""
import math

import numpy as np
import torch
import torch.nn.functional as F

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
    every descriptor and position of the set (the paper normalizes each set by its own statistics); float64 sums."""
    d = desc.to(torch.float64).view(desc.shape[0], channels, -1)
    mean = d.mean(dim=(0, 2), keepdim=True)
    std = (d - mean).square().mean(dim=(0, 2), keepdim=True).sqrt().clamp_min(1e-12)
    return ((d - mean) / std).view(desc.shape[0], -1)


# Each row sorted: NumPy's vectorized sort on the CPU (14x faster than torch.sort there: scripts/bench_swd.py),
# torch's on other devices.
def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values


# Rows of sorted projections resampled to `m` values: the quantiles at ranks (i + 0.5) / m (the identity when the
# counts are equal), so that sets of different sizes can be compared.
def _quantiles(sorted_rows: torch.Tensor, m: int) -> torch.Tensor:
    n = sorted_rows.shape[1]
    if n == m:
        return sorted_rows
    rank = ((torch.arange(m, dtype=torch.float64) + 0.5) * (n / m)).long().clamp_max(n - 1)
    return sorted_rows[:, rank.to(sorted_rows.device)]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, seed: int = 0, dir_repeats: int = DIR_REPEATS,
                       dirs_per_repeat: int = DIRS_PER_REPEAT) -> float:
    """Sliced Wasserstein distance between descriptor sets a [M, D] and b [M', D]: for dir_repeats x dirs_per_repeat
    random unit directions (Gaussian, seeded), the mean absolute difference of the sorted projections of the two sets
    (the 1-D Wasserstein-1 distance along each direction), averaged over directions. Unequal set sizes are compared
    at the smaller set's quantiles. Float32 projections of the (float64) normalized descriptors."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"sliced_wasserstein: expected non-empty [M, D] sets with equal D, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    m = min(len(a), len(b))
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    total = 0.0
    for _ in range(dir_repeats):
        dirs = torch.randn([a.shape[1], dirs_per_repeat], generator=gen, dtype=torch.float64)
        dirs = (dirs / dirs.square().sum(0, keepdim=True).sqrt()).T.to(a32.device, torch.float32)
        pa = _quantiles(_sort_rows((dirs @ a32.T).contiguous()), m)  # [dirs, M]: one sorted row per direction
        pb = _quantiles(_sort_rows((dirs @ b32.T).contiguous()), m)
        total += float((pa - pb).abs().to(torch.float64).mean())
    return total / dir_repeats


def multiscale_swd(real_levels: list, fake_levels: list, channels: int, resolution: int, seed: int = 0) -> dict:
    """SWD x1e3 per pyramid level between two sets of raw descriptors (lists of [M, C * 49], finest first), each set
    normalized by its own statistics: {'levels': {'32': v, '16': v}, 'value': their mean}."""
    if len(real_levels) != len(fake_levels):
        raise ValueError(f"multiscale_swd: {len(real_levels)} real levels vs {len(fake_levels)} generated")
    values = {}
    for res, r, f in zip(level_resolutions(resolution), real_levels, fake_levels):
        values[str(res)] = SCALE * sliced_wasserstein(normalize(r, channels), normalize(f, channels), seed=seed)
    return dict(levels=values, value=float(np.mean(list(values.values()))))


class SWDDescriptors:
    """The SWD 'detector': turns uint8 images and their global indices into one row per image holding all its
    descriptors (levels x 128 x C*49 values), so that metrics.py extracts, gathers and caches them as Inception
    features. Its id names everything that changes the descriptors (the cache key and metric records hold it)."""
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

    def split(self, rows) -> list:
        """Rows of features() ([N, feature_dim]) back to per-level descriptor sets [N * 128, C * 49]."""
        rows = torch.as_tensor(rows)
        per = rows.view(rows.shape[0], self.levels, NHOODS_PER_IMAGE * self.channels * NHOOD_SIZE ** 2)
        return [per[:, i].reshape(-1, self.channels * NHOOD_SIZE ** 2) for i in range(self.levels)]
