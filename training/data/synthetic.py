"""The embedded default dataset: procedurally drawn colored shapes on gradient backgrounds (no files, no download)."""
import operator
import threading

import numpy as np

from training.data.base import BaseDataset

# Shape classes, in label order; the first `num_classes` are used.
SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond")

# Bump when `render` changes its pixels, so caches keyed by content_hash (e.g. dataset FID statistics) expire.
RENDER_VERSION = 1

# render(): side of the pixel blocks tested as a whole, and the safety margin (in image widths) added to the
# distance bound; rounding in _inside is below 1e-6 image widths, and 1e-5 adds only ~1% of a pixel at 1024 px.
_BLOCK = 8
_MARGIN = 1e-5
_SQRT2 = 2.0 ** 0.5

# Cache generated images while the whole dataset stays below this many bytes.
_CACHE_MAX_BYTES = 256 << 20


# One reseeded RandomState per thread: constructing one costs ~75 us (it first seeds itself from OS entropy),
# reseeding ~7 us, and both give the same stream.
_local = threading.local()


# The legacy generator seeded with `key`, exactly as np.random.RandomState(key) would be.
def _rng(key: list[int]) -> np.random.RandomState:
    rng = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = np.random.RandomState()
    rng.seed(key)
    return rng


# Convert HSV components in [0, 1] to an RGB float array in [0, 1].
def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# Coverage mask (bool) of one shape at sample points (x, y) in [0, 1] image coordinates, y pointing down.
def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, h: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "disk":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * h
    if shape == "triangle":  # Apex at the top, base at the bottom of the bounding box.
        return (dy <= h) & (np.abs(dx) <= (dy + h) * 0.5)
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= h * h) & (r2 >= (0.55 * h) ** 2)
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= h / 3) & (ay <= h)) | ((ay <= h / 3) & (ax <= h))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    raise ValueError(f"unknown shape {shape!r}")


# A bound on the signed distance of points (dx, dy) from the shape's edge (<= 0 exactly where _inside holds) and
# its Lipschitz constant in the max norm: moving a point by at most `a` along each axis changes it by at most
# constant * a. render() uses it to skip supersampling wherever a whole box of sample points is on one side.
def _field(shape: str, dx: np.ndarray, dy: np.ndarray, h: float) -> tuple[np.ndarray, float]:
    if shape == "disk":
        return np.hypot(dx, dy) - h, _SQRT2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * h, 1.0
    if shape == "triangle":
        return np.maximum(dy - h, np.abs(dx) - 0.5 * (dy + h)), 1.5
    if shape == "ring":
        r = np.hypot(dx, dy)
        return np.maximum(r - h, 0.55 * h - r), _SQRT2
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return np.minimum(np.maximum(ax - h / 3, ay - h), np.maximum(ay - h / 3, ax - h)), 1.0
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) - h, 2.0
    raise ValueError(f"unknown shape {shape!r}")


# Float colors in [0, 1] to uint8, rounded as render() rounds every pixel.
def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def scene(index: int, num_classes: int = 4, seed: int = 0) -> tuple:
    """The scene of image `index` in resolution-free units: (shape, foreground RGB, top and bottom background RGB, the
    shape's half size, its centre x and y), all in [0, 1]."""
    rng = _rng([seed, index])
    shape = SHAPES[index % num_classes]
    fg = _hsv_to_rgb(rng.uniform(), rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0))
    top = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.45))
    bottom = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.45))
    half = 0.5 * rng.uniform(0.4, 0.7)
    cx, cy = 0.5 + rng.uniform(-0.1, 0.1, size=2)
    return shape, fg, top, bottom, half, cx, cy


def render(index: int, resolution: int, num_classes: int = 4, seed: int = 0) -> np.ndarray:
    """Draw image `index` for `seed` at `resolution` as uint8 [3, R, R]; parameters are drawn in resolution-free units,
    so the same index shows the same scene at every resolution."""
    shape, fg, top, bottom, half, cx, cy = scene(index, num_classes, seed)

    # The pixels are those of a 4x4 supersampled shape mask (2x2 above 256 px to bound memory), averaged for
    # anti-aliasing and blended over the gradient; but only pixels near the edge are sampled. A pixel whose
    # samples are all inside (outside) the shape is exactly the foreground (background) color, so blocks of
    # B x B pixels and then single pixels whose sample box lies provably on one side (the field's bound with a
    # margin far above rounding errors) are filled directly, which gives the same bytes as sampling everything.
    r = resolution
    ss = 4 if r <= 256 else 2
    t = (np.arange(r * ss, dtype=np.float32) + 0.5) / (r * ss)  # Sample coordinates (exact: r * ss is 2**k).
    yc = (np.arange(r, dtype=np.float32) + 0.5) / r
    bg = top[:, None] * (1.0 - yc[None, :]) + bottom[:, None] * yc[None, :]  # [3, R], one color per row.
    fg8 = _to_u8(fg)
    img = np.empty([3, r, r], dtype=np.uint8)
    img[:] = _to_u8(bg)[:, :, None]

    b = min(_BLOCK, r)
    nb = r // b
    centers = (np.arange(nb) + 0.5) * (b / r)
    f, lip = _field(shape, centers[None, :] - cx, centers[:, None] - cy, half)
    margin = lip * (b * ss - 1) / (2 * r * ss) + _MARGIN
    blocks = img.reshape(3, nb, b, nb, b).transpose(1, 3, 0, 2, 4)  # A view: [block y, block x, 3, b, b].
    blocks[f < -margin] = fg8[:, None, None]
    by, bx = np.nonzero(np.abs(f) <= margin)

    # Every pixel of the blocks on the edge, then the samples of the pixels on the edge.
    k = np.arange(b)
    iy = np.broadcast_to(by[:, None, None] * b + k[:, None], (len(by), b, b)).ravel()
    ix = np.broadcast_to(bx[:, None, None] * b + k, (len(bx), b, b)).ravel()
    f, lip = _field(shape, (ix + 0.5) / r - cx, (iy + 0.5) / r - cy, half)
    margin = lip * (ss - 1) / (2 * r * ss) + _MARGIN
    inside = f < -margin
    img[:, iy[inside], ix[inside]] = fg8[:, None]
    edge = np.abs(f) <= margin
    ey, ex = iy[edge], ix[edge]
    j = np.arange(ss)
    sx, sy = t[ex[:, None] * ss + j][:, None, :], t[ey[:, None] * ss + j][:, :, None]
    hits = _inside(shape, sx, sy, cx, cy, half).sum(axis=(1, 2))
    cover = hits.astype(np.float32) / np.float32(ss * ss)  # Exact (k / 16 or k / 4), as a mean of the mask is.
    img[:, ey, ex] = _to_u8(bg[:, ey] * (1.0 - cover) + fg[:, None] * cover)
    return img


# The synthetic dataset with the same interface as ImageDataset: one large anti-aliased shape per image.
class SyntheticDataset(BaseDataset):
    """Deterministic procedurally generated RGB images, meant to be easy for a tiny GAN to learn.

    Image i shows shape class `i % num_classes` (disk, square, triangle, ring, cross, diamond) in a random
    saturated color, 40-70% of the image wide, jittered around the center, on a dark vertical two-color
    gradient. Its pixels depend only on (seed, i, resolution, num_classes), not on num_images, use_labels,
    xflip or max_size. Images are i.i.d., so `max_size` keeps the first `max_size` images.
    Labels are the shape class, one-hot when `use_labels`.
    """

    def __init__(self, resolution=32, num_images=4096, num_classes=4, use_labels=False, xflip=False, seed=0,
                 max_size=None):
        resolution = operator.index(resolution)
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"SyntheticDataset: resolution must be a power of two >= 8, got {resolution}")
        if not 1 <= operator.index(num_classes) <= len(SHAPES):
            raise ValueError(f"SyntheticDataset: num_classes must be between 1 and {len(SHAPES)}, got {num_classes}")
        if operator.index(num_images) < 1:
            raise ValueError(f"SyntheticDataset: num_images must be >= 1, got {num_images}")
        if not 0 <= operator.index(seed) < 2**32:
            raise ValueError(f"SyntheticDataset: seed must be in [0, 2**32), got {seed}")
        if max_size is not None and operator.index(max_size) < 1:
            raise ValueError(f"SyntheticDataset: max_size must be a positive int or None, got {max_size}")
        self.name = "synthetic"
        self._res = resolution
        self._num_channels = 3
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self._raw_size = int(num_images)
        self._n = self._raw_size if max_size is None else min(self._raw_size, int(max_size))
        self.use_labels = bool(use_labels)
        self.xflip = bool(xflip)
        cacheable = self._n * 3 * resolution * resolution <= _CACHE_MAX_BYTES
        self._cache = [None] * self._n if cacheable else None

    @property
    def raw_size(self) -> int:
        return self._raw_size

    def _num_items(self) -> int:
        return self._n

    def _label_size(self) -> int:
        return self.num_classes if self.use_labels else 0

    @property
    def content_hash(self) -> str:
        """A short string that changes whenever the images would (used by training/eval/metrics.py as a cache key).
        """
        return (f"synthetic-v{RENDER_VERSION}-seed{self.seed}-res{self._res}-cls{self.num_classes}"
                f"-n{self._n}")

    def validate(self) -> None:
        """Nothing on disk to check; present for interface parity with ImageDataset."""
        return None

    def get_class(self, idx) -> int:
        """The shape class of item `idx`."""
        return self._raw(idx) % self.num_classes

    # One-hot float32 [num_classes] of the image's shape class.
    def _raw_label(self, raw: int) -> np.ndarray:
        label = np.zeros([self.num_classes], dtype=np.float32)
        label[raw % self.num_classes] = 1
        return label

    # Pickled (for spawned DataLoader workers) without the cached images, which each process re-renders cheaply.
    def __getstate__(self):
        state = dict(self.__dict__)
        if state["_cache"] is not None:
            state["_cache"] = [None] * len(state["_cache"])
        return state

    # The image (rendered once, then cached while the dataset is small enough); items are copies of it.
    def _raw_image(self, raw: int) -> np.ndarray:
        img = None if self._cache is None else self._cache[raw]
        if img is None:
            img = render(raw, self._res, self.num_classes, self.seed)
            if self._cache is not None:
                self._cache[raw] = img
        return img
