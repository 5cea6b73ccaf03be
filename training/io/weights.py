"""Where pretrained weight files come from: explicit path, environment, cache, or an atomic download."""
import hashlib
import os
import zipfile

import torch

from training import dist
from training.io.files import atomic_open


def cache_root() -> str:
    """The cache root: $GANFORGE_CACHE or ~/.cache/ganforge."""
    return os.environ.get("GANFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ganforge")


def offline_env() -> bool:
    """Whether downloads are forbidden ($GANFORGE_OFFLINE set to anything but '', '0', 'false', 'no')."""
    return os.environ.get("GANFORGE_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (a zip holding code/ or constants.pkl) rather than a state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, cache_dir: str) -> str:
    """Download `url` into `cache_dir` under its own name, atomically (training.io.files.atomic_open); its path.

    The downloader writes the temporary file by path; a failed download leaves nothing behind and raises its own
    error, a failed commit (disk full, ...) a FileWriteError.
    """
    dst = os.path.join(cache_dir, os.path.basename(url.split("?")[0]))
    out = atomic_open(dst)
    try:
        torch.hub.download_url_to_file(url, os.fspath(out.temp_path), progress=dist.is_main())
    except BaseException:
        out.discard()
        raise
    out.commit()
    return dst
