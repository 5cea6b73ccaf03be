"""The dataset-content part of the dataset-stats cache key: hashes of files, folders, zips and image arrays."""
import hashlib
import os
import zipfile

import numpy as np

# Datasets (files or arrays) up to this many bytes are hashed in full; larger ones are sampled (see content_hash).
FULL_HASH_BYTES = 256 << 20
# Number of evenly spaced files/items whose bytes are hashed when a dataset is too large to hash in full.
SAMPLE_COUNT = 64


# Hash of a file or folder on disk. Up to FULL_HASH_BYTES every byte is hashed (names + contents, so a copy
# elsewhere still matches). Larger: a zip contributes each member's name, size and CRC-32 (content-based
# and cheap); a large folder or other file contributes names, sizes and mtimes plus the bytes of
# SAMPLE_COUNT evenly spaced files -- an in-place edit that keeps size and mtime and misses the sample
# would go unnoticed (documented limitation).
def _path_hash(path: str) -> str:
    h = hashlib.sha256()
    if os.path.isfile(path):
        files, root = [path], os.path.dirname(path)
    else:
        root = path
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    sizes = [os.path.getsize(f) for f in files]
    full = sum(sizes) <= FULL_HASH_BYTES
    sample = set(files if full else files[:: max(1, len(files) // SAMPLE_COUNT)])
    for f, size in zip(files, sizes):
        h.update(f"{os.path.relpath(f, root)}\0{size}\0".encode())
        if f.endswith(".zip") and zipfile.is_zipfile(f) and not full:
            with zipfile.ZipFile(f) as z:
                for info in z.infolist():
                    h.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\0".encode())
            continue
        if not full:
            h.update(f"{os.stat(f).st_mtime_ns}\0".encode())
        if f in sample:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def num_unmirrored(dataset) -> int:
    """Number of unmirrored items: datasets opened with xflip=True (ImageDataset, SyntheticDataset) hold the mirrored
    copies at indices >= len // 2; metrics mirror the originals themselves when asked to (metrics' `mirror`)."""
    return len(dataset) // 2 if getattr(dataset, "xflip", False) else len(dataset)


def dataset_content_hash(dataset) -> str:
    """The dataset-content part of the cache key, in order of preference: the dataset's own `content_hash` (method or
    string), else the files under `dataset.path` (see _path_hash) plus which files the items are (`get_fname`, so a
    max_size subset is another key) or, lacking that, the arrays of SAMPLE_COUNT evenly spaced items; else the raw
    image arrays -- all items if they total at most FULL_HASH_BYTES, else SAMPLE_COUNT evenly spaced items. The item
    count (unmirrored) is always part of it; mirroring is a separate part of the key."""
    n = num_unmirrored(dataset)
    own = getattr(dataset, "content_hash", None)
    if own is not None:
        return f"own:{own() if callable(own) else own}:n{n}"
    first = np.ascontiguousarray(dataset[0][0]) if n else np.zeros(0, np.uint8)
    h = hashlib.sha256(f"{n}\0{first.shape}\0{first.dtype}\0".encode())
    sample = range(0, n, max(1, n // SAMPLE_COUNT))
    path = getattr(dataset, "path", None)
    if isinstance(path, (str, os.PathLike)) and os.path.exists(path):
        h.update(_path_hash(os.fspath(path)).encode())
        get_fname = getattr(dataset, "get_fname", None)
        if get_fname is not None:
            h.update("\0".join(str(get_fname(i)) for i in range(n)).encode())
            sample = ()
        kind = "files"
    else:
        kind = "arrays"
        if first.nbytes * n <= FULL_HASH_BYTES:
            sample = range(n)
    for i in sample:
        h.update(np.ascontiguousarray(dataset[i][0]).tobytes())
    return f"{kind}:{h.hexdigest()}"
