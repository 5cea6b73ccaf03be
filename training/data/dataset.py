"""Image datasets read from a folder or a zip of images, with optional labels from dataset.json."""
import io
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image

from training.data.base import BaseDataset
from training.data.synthetic import SyntheticDataset
from training.errors import UserError

# File name endings (lower case) that are treated as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Datasets with at most this many files are fully validated when constructed; larger ones are checked on load.
VALIDATE_MAX_FILES = 10_000

# PIL modes kept as one grayscale channel, and modes converted to RGB without losing information that matters.
_GRAY_MODES = ("1", "L")
_COLOR_MODES = ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV")
# Modes that carry an alpha channel; these are refused (see ImageDataset's docstring).
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# How to fix a folder of images that is not in the expected form.
_TOOL_HINT = ("convert the images with scripts/dataset_tool.py --source <folder> --dest <out.zip> "
              "--resolution <power of two>")


class DatasetError(UserError, ValueError):
    """Raised for a dataset whose files are not in the expected form (bad input: one `error:` line, exit 2); a
    ValueError so callers can catch it broadly."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """Raised when the dataset path does not exist."""


# Uniform read access to a folder or a zip archive; names are relative paths with '/' separators.
class _FileSource:
    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise DatasetNotFound(f"dataset path {self.path!r} does not exist "
                                    f"(expected a folder or a .zip of images)")
        self.is_zip = os.path.isfile(self.path)
        if self.is_zip and not zipfile.is_zipfile(self.path):
            raise DatasetError(f"{self.path}: not a folder or a readable .zip archive")
        self._zip = None
        self._zip_pid = None

    def zip(self) -> zipfile.ZipFile:
        """The open archive; reopened in each process so that forked DataLoader workers never share a file offset.
        """
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def names(self) -> list[str]:
        """Every file name in the source, sorted; macOS resource forks and hidden files/folders are left out, and
        so are zip members whose path leaves the archive (`../`, absolute), which are listed in `self.outside`."""
        self.outside = []
        if self.is_zip:
            names = [n for n in self.zip().namelist() if not n.endswith("/")]
            self.outside = sorted(n for n in names if n.startswith("/") or ".." in n.replace("\\", "/").split("/"))
            names = [n for n in names if n not in self.outside]
        else:
            names = []
            for root, dirs, files in os.walk(self.path, followlinks=True):
                rel = os.path.relpath(root, self.path)
                for f in files:
                    names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
        return sorted(n for n in names if not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/")))

    def image_names(self) -> list[str]:
        """Sorted relative names of the image files."""
        return [n for n in self.names() if n.lower().endswith(IMAGE_EXTENSIONS)]

    def exists(self, name: str) -> bool:
        if self.is_zip:
            try:
                self.zip().getinfo(name)
                return True
            except KeyError:
                return False
        return os.path.isfile(os.path.join(self.path, name))

    def read(self, name: str) -> bytes:
        if self.is_zip:
            return self.zip().read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def where(self, name: str) -> str:
        """A human-readable location of one file, for error messages."""
        return f"{self.path}:{name}" if self.is_zip else os.path.join(self.path, name)

    # Drop the archive handle when pickled (spawned DataLoader workers reopen it).
    def __getstate__(self):
        return dict(self.__dict__, _zip=None, _zip_pid=None)


# Decode one image completely (so truncated files fail here) and return it with its channel kind (1 or 3).
def _decode(data: bytes, where: str) -> tuple[PIL.Image.Image, int]:
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except PIL.UnidentifiedImageError as e:
        raise DatasetError(f"{where}: not an image (no image format recognized in its {len(data)} bytes); remove it "
                           f"or replace it with the image it should be") from e
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...).
        raise DatasetError(f"{where}: unreadable, corrupt or truncated image ({type(e).__name__}: {e}); remove it or "
                           f"replace it with an intact copy") from e
    mode = img.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        raise DatasetError(f"{where}: image has an alpha channel (mode {mode}), which is not supported; "
                           f"flatten it to RGB, e.g. {_TOOL_HINT}")
    if mode in _GRAY_MODES:
        return img, 1
    if mode in _COLOR_MODES:
        return img, 3
    raise DatasetError(f"{where}: unsupported image mode {mode!r} (expected 8-bit grayscale or RGB); {_TOOL_HINT}")


# Raise unless a size is square with a power-of-two side.
def _check_square_pow2(size: tuple[int, int], where: str) -> None:
    w, h = size
    if w != h or w < 1 or (w & (w - 1)) != 0:
        raise DatasetError(f"{where}: image is {w}x{h}, but images must be square with a power-of-two side "
                           f"(e.g. 64x64); {_TOOL_HINT}")


# Pick a seeded random subset of `n` indices of size `max_size` (sorted), or all of them.
def _subset(n: int, max_size, seed: int) -> np.ndarray:
    idx = np.arange(n, dtype=np.int64)
    if max_size is None:
        return idx
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
    if max_size < n:
        np.random.RandomState(seed).shuffle(idx)
        idx = np.sort(idx[:max_size])
    return idx


# A dataset of square power-of-two images stored in a folder (searched recursively) or a zip archive.
class ImageDataset(BaseDataset):
    """Images from a folder or a .zip, returned as (uint8 [C,H,W] array, float32 [label_dim] label).

    Layout: image files (.png/.jpg/.jpeg/.bmp/.webp) anywhere below the root; an optional root
    `dataset.json` holds `{"labels": [["rel/path.png", label], ...]}` where each label is an int class
    index (returned one-hot, label_dim = max + 1) or a list of floats (all the same length); `"labels": null`
    means unlabeled. Labels are read only when `use_labels=True`; a labeled dataset must label every image.

    Channels: grayscale images give C = 1 only if every image is grayscale; otherwise grayscale images are
    converted to RGB and C = 3. Images with an alpha channel (RGBA, LA, palette with transparency) are
    refused with an error telling how to flatten them (scripts/dataset_tool.py does it), because silently
    dropping alpha can expose arbitrary colors under transparent pixels.

    Validation: with at most VALIDATE_MAX_FILES (10,000) files, the constructor calls `validate()`, which
    decodes every image in use and raises DatasetError naming the first bad file. Larger datasets are only
    checked as images are loaded in `__getitem__`, with the same messages; there the channel count comes
    from the first image, so a color image in a dataset whose first image is grayscale is an error.
    """

    def __init__(self, path, resolution=None, use_labels=False, xflip=False, max_size=None, random_seed=0):
        self._src = _FileSource(path)
        self.path = self._src.path
        base = os.path.basename(os.path.normpath(self.path))
        self.name = os.path.splitext(base)[0] if self._src.is_zip else base
        self._fnames = self._src.image_names()
        self.outside = self._src.outside  # zip members left out because their path leaves the archive
        if not self._fnames:
            raise DatasetError(f"{self.path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
                               f"{' in the archive' if self._src.is_zip else ' in the folder and its subfolders'})")
        self._raw_idx = _subset(len(self._fnames), max_size, random_seed)
        self.xflip = bool(xflip)

        # The first image fixes the size (and, for unvalidated datasets, the channel count).
        self._first = self._src.where(self._fnames[self._raw_idx[0]])
        first_img, first_kind = self._open(self._fnames[self._raw_idx[0]])
        _check_square_pow2(first_img.size, self._first)
        self._res = first_img.size[0]
        if resolution is not None and int(resolution) != self._res:
            raise DatasetError(f"{self.path}: images are {self._res}x{self._res} but resolution={resolution} "
                               f"was requested; resize them with scripts/dataset_tool.py --resolution {resolution}")
        self._num_channels = first_kind

        self._labels = self._load_labels() if use_labels else None
        if len(self._fnames) <= VALIDATE_MAX_FILES:
            kinds = self._scan(check_channels=None)
            self._num_channels = 3 if 3 in kinds else 1

    # Read and decode one file, checking its mode but not its size.
    def _open(self, fname: str) -> tuple[PIL.Image.Image, int]:
        where = self._src.where(fname)
        try:
            data = self._src.read(fname)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{where}: cannot read file ({type(e).__name__}: {e})") from e
        return _decode(data, where)

    # Open one file and apply every check; `check_channels` is the dataset's channel count, or None to skip that.
    def _open_checked(self, fname: str, check_channels) -> tuple[PIL.Image.Image, int]:
        img, kind = self._open(fname)
        where = self._src.where(fname)
        if img.size != (self._res, self._res):
            _check_square_pow2(img.size, where)
            raise DatasetError(f"{where}: image is {img.size[0]}x{img.size[1]}, but the first image {self._first} "
                               f"is {self._res}x{self._res}; all images must have the same size ({_TOOL_HINT})")
        if check_channels == 1 and kind == 3:
            raise DatasetError(f"{where}: color image (mode {img.mode}) in a dataset read as grayscale from its "
                               f"first image {self._first}; make all images RGB ({_TOOL_HINT})")
        return img, kind

    # Decode every image in use (a few threads, since PIL releases the GIL) and return the set of channel kinds.
    def _scan(self, check_channels) -> set[int]:
        fnames = [self._fnames[i] for i in self._raw_idx]
        if self._src.is_zip:
            self._src.zip()  # Open the archive before the threads share it.

        def check(fname):
            try:
                return self._open_checked(fname, check_channels)[1], None
            except DatasetError as e:
                return None, e

        kinds = set()
        pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
        try:
            for kind, err in pool.map(check, fnames):
                if err is not None:
                    raise err
                kinds.add(kind)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return kinds

    def validate(self) -> None:
        """Open every image in use and raise DatasetError naming the first bad file (see the class docstring)."""
        self._scan(check_channels=self._num_channels)

    # Read dataset.json (if any) into a float32 [raw_size, label_dim] array, or None for an unlabeled dataset.
    def _load_labels(self):
        jname = "dataset.json"
        where = self._src.where(jname)
        if not self._src.exists(jname):
            return None
        try:
            data = json.loads(self._src.read(jname).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{where}: not valid JSON ({e})") from e
        example = '{"labels": [["00000/img00000000.png", 3], ...]}'
        if not isinstance(data, dict) or "labels" not in data:
            raise DatasetError(f"{where}: expected an object with a 'labels' key, like {example}")
        entries = data["labels"]
        if entries is None:
            return None
        if not isinstance(entries, list):
            raise DatasetError(f"{where}: 'labels' must be a list of [path, label] pairs or null, "
                               f"got {type(entries).__name__}")
        table = {}
        for k, e in enumerate(entries):
            if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)):
                raise DatasetError(f"{where}: labels[{k}] is {e!r}; expected [\"relative/path.png\", label]")
            table[e[0].replace("\\", "/")] = e[1]
        for fname in self._fnames:
            if fname not in table:
                raise DatasetError(f"{self._src.where(fname)}: no label for this image in {where} "
                                   f"(a labeled dataset needs a label for every image)")
        values = [table[f] for f in self._fnames]

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        # The first label decides the kind (class index or vector); every other label must match it.
        dim = len(values[0]) if isinstance(values[0], list) else None
        for f, v in zip(self._fnames, values):
            if dim is None:
                ok = is_int(v) and v >= 0
            else:
                ok = isinstance(v, list) and len(v) == dim and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            if not ok:
                want = ("an int class index >= 0 (like the first label)" if dim is None else
                        f"a list of {dim} numbers (like the first label)")
                raise DatasetError(f"{where}: label of {f} is {v!r}; expected {want}")
        if dim is None:
            classes = np.asarray(values, dtype=np.int64)
            onehot = np.zeros([len(values), int(classes.max()) + 1], dtype=np.float32)
            onehot[np.arange(len(values)), classes] = 1
            return onehot
        return np.asarray(values, dtype=np.float32).reshape(len(values), dim)

    @property
    def raw_size(self) -> int:
        """Number of image files found (before max_size and xflip)."""
        return len(self._fnames)

    def _num_items(self) -> int:
        return len(self._raw_idx)

    def _raw_index(self, i: int) -> int:
        return self._raw_idx[i]

    # Decode one file in full, with every check, as uint8 [C,R,R] in the dataset's channel count.
    def _raw_image(self, raw: int) -> np.ndarray:
        img, _ = self._open_checked(self._fnames[raw], self._num_channels)
        if self._num_channels == 1:
            return np.asarray(img.convert("L"))[None]
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB")).transpose(2, 0, 1)

    def _label_size(self) -> int:
        return 0 if self._labels is None else int(self._labels.shape[1])

    def _raw_label(self, raw: int) -> np.ndarray:
        return self._labels[raw].copy()

    def get_fname(self, idx) -> str:
        """The relative file name behind item `idx`."""
        return self._fnames[self._raw(idx)]

    def file_list(self) -> list[tuple[str, int]]:
        """Every image file of the source (the whole set, before max_size) as (relative name, size in bytes)."""
        if self._src.is_zip:
            return [(n, self._src.zip().getinfo(n).file_size) for n in self._fnames]
        return [(n, os.path.getsize(os.path.join(self.path, n))) for n in self._fnames]


# dataset.json of a folder or zip, read without checks (None when absent or unreadable): for hints and class names;
# ImageDataset(use_labels=True) is what checks it.
def read_dataset_json(path) -> dict | None:
    """The parsed dataset.json of the dataset at `path`, or None."""
    try:
        src = _FileSource(path)
        if not src.exists("dataset.json"):
            return None
        data = json.loads(src.read("dataset.json").decode("utf-8"))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return data if isinstance(data, dict) else None


# The class-name -> index map that dataset_tool.py --labels from-folders stores in dataset.json.
def class_names(path) -> dict | None:
    """{class name: index} from dataset.json's 'class_names', or None."""
    names = (read_dataset_json(path) or {}).get("class_names")
    return names if isinstance(names, dict) else None


# Open a dataset by name: None, 'synthetic' or 'synthetic:<resolution>' give the embedded SyntheticDataset,
# anything else is a folder or zip path for ImageDataset. Use './synthetic' for a folder of that name.
def open_dataset(path: str | None, **kwargs):
    """Return SyntheticDataset for None/'synthetic'/'synthetic:64', else ImageDataset(path, **kwargs).

    Keyword arguments are passed on; `random_seed` (ImageDataset's subset seed) is ignored for the synthetic
    dataset, whose own `seed`, `num_images` and `num_classes` are accepted only for it.
    """
    spec = None if path is None else os.fspath(path)
    if spec is None or spec == "synthetic" or spec.startswith("synthetic:"):
        kwargs.pop("random_seed", None)
        if spec is not None and ":" in spec:
            text = spec.split(":", 1)[1]
            if not text.isdigit():
                raise ValueError(f"dataset {spec!r}: expected 'synthetic' or 'synthetic:<resolution>', e.g. 'synthetic:64'")
            res = int(text)
            if kwargs.get("resolution") not in (None, res):
                raise ValueError(f"dataset {spec!r} has resolution {res} but resolution={kwargs['resolution']} was given")
            kwargs["resolution"] = res
        if kwargs.get("resolution") is None:
            kwargs.pop("resolution", None)
        return SyntheticDataset(**kwargs)
    extra = sorted(set(kwargs) & {"seed", "num_images", "num_classes"})
    if extra:
        raise TypeError(f"open_dataset({spec!r}): {', '.join(extra)} only apply to the synthetic dataset")
    return ImageDataset(spec, **kwargs)
