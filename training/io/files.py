"""The mechanisms every file goes through: atomic writes (temporary file, fsync, rename), loads without code and
strict state-dict loads."""
import errno
import os
import pickle
import re
import secrets
import warnings
from pathlib import Path

import torch

from training.errors import RunTimeFailure

# Temporary files of an atomic write are named ".<target name>.<random>.tmp", beside the target.
TEMP_SUFFIX = ".tmp"
# Keys of each kind listed in a load_strict error (the count of the rest follows).
LIST_KEYS = 8


class FileWriteError(RunTimeFailure, OSError):
    """Writing a file failed (disk full, permissions, I/O error); whatever was at its path before is intact."""


def temp_pattern(names: str) -> re.Pattern:
    """The pattern of the temporary names that atomic writes of files named by the regex `names` use.

    A write killed before its rename leaves such a file behind; it is never a complete file, so cleanups
    (training.io.checkpoint.remove_stale_temps) may delete whatever matches. Group 1 is the target's name.
    """
    return re.compile(rf"^\.({names})\..*{re.escape(TEMP_SUFFIX)}$")


# The FileWriteError, naming `path`, that an OSError met while writing it becomes.
def _write_error(path, e: OSError) -> FileWriteError:
    what = "disk full" if e.errno == errno.ENOSPC else "write failed"
    message = (f"{path}: {what} ({e.strerror or e}); this file was not written (its previous version, if any, "
               f"and the files written before it are intact)")
    return FileWriteError(e.errno, message) if e.errno is not None else FileWriteError(message)


class AtomicFile:
    """A file that appears at `path` complete or not at all; make one with `atomic_open`.

    It is written at a temporary path in the same folder (`temp_path`, opened as `file` with the mode a plain
    `open` gives a new file: 0o666 & ~umask), then `commit()` flushes and fsyncs it and renames it over `path`,
    and `discard()` removes it. The temporary file may also be written by path (`temp_path`), by a tool that
    writes or replaces the file there (a downloader): commit syncs and renames whatever is at that path, with
    the same mode. Used as a context manager it yields `file` and commits when the block ends normally, else
    discards; an OSError raised in the block becomes FileWriteError naming `path`, as do errors of its own.
    """

    def __init__(self, path, mode: str = "wb"):
        if mode not in ("wb", "w"):
            raise ValueError(f"atomic_open: mode must be 'wb' or 'w' (text, UTF-8), got {mode!r}")
        self.path, self.file, self.temp_path, self._perms = Path(path), None, None, None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(100):
                temp = self.path.parent / f".{self.path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
                try:  # 'x' creates the file (or fails if it exists) with the permissions any new file gets.
                    self.file = open(str(temp), "x" + mode[1:], **({} if "b" in mode else {"encoding": "utf-8"}))
                except FileExistsError:
                    continue
                self.temp_path = temp
                self._perms = os.fstat(self.file.fileno()).st_mode & 0o7777
                break
            else:
                raise FileExistsError(errno.EEXIST, "no free temporary name", str(self.path.parent))
        except OSError as e:
            raise _write_error(self.path, e) from e

    def commit(self) -> None:
        """Close the temporary file, fsync it, give it the new-file mode and rename it over `path`."""
        try:
            self.file.close()  # (flushes)
            fd = os.open(self.temp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(self.temp_path, self._perms)
            os.replace(self.temp_path, self.path)
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError) and not isinstance(e, FileWriteError):
                raise _write_error(self.path, e) from e
            raise

    def discard(self) -> None:
        """Close and delete the temporary file; `path` keeps what it had."""
        try:
            self.file.close()
        except OSError:
            pass  # (a flush that fails again: the file is deleted anyway)
        if self.temp_path is not None:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.commit()
            return False
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, FileWriteError):
            raise _write_error(self.path, exc) from exc
        return False


def atomic_open(path, mode: str = "wb") -> AtomicFile:
    """Start writing `path` atomically: `with atomic_open(path) as f: ...` (see AtomicFile).

    `mode` is 'wb' (binary) or 'w' (text, UTF-8). The folder is created if needed.
    """
    return AtomicFile(path, mode)


def atomic_write(path, write_fn, mode: str = "wb") -> None:
    """Write `path` by calling `write_fn(f)` on a file opened with `atomic_open(path, mode)`.

    A crash leaves the old file or the complete new one; if write_fn raises, the old file stays and no temporary
    file is left. OSErrors (disk full, ...) are raised as FileWriteError naming the file.
    """
    with atomic_open(path, mode) as f:
        write_fn(f)


def load_dict(path, unreadable: str, expected: str, error=ValueError, refuse_code: bool = False) -> dict:
    """A dict of tensors and plain data saved with torch.save, loaded on the CPU without executing code
    (`torch.load(weights_only=True)` refuses any pickle that carries code).

    Failures raise `error` naming the file: "<path>: <unreadable> (<exception type>: <message>)" when torch cannot
    load it, "<path>: expected <expected>, got <type>" when it holds something else than a dict. With
    `refuse_code`, a pickle refused by the weights-only unpickler says that it could run code instead.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not refuse_code:
            raise error(f"{path}: {unreadable} ({type(e).__name__}: {e})") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{path}: refused to load: it holds objects other than tensors and plain data, which could run "
                    f"code ({first})") from e
    except Exception as e:
        raise error(f"{path}: {unreadable} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise error(f"{path}: expected {expected}, got {type(state).__name__}")
    return state


def load_torchscript(path):
    """A TorchScript archive loaded on the CPU. torch deprecates TorchScript (a FutureWarning on every load), but
    NVIDIA's detector and LPIPS files and the Inception wheel's file are TorchScript: that warning is not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu")


# Up to LIST_KEYS keys for a message, and how many more there are.
def _listed(keys: list) -> str:
    more = f" (+{len(keys) - LIST_KEYS} more)" if len(keys) > LIST_KEYS else ""
    return f"[{', '.join(keys[:LIST_KEYS])}]{more}"


def load_strict(module, state_dict, where: str, error=ValueError):
    """Load `state_dict` into `module` only if its keys and shapes are exactly the module's; returns `module`.

    Otherwise nothing is loaded and `error` (an exception type) is raised with a message that starts with
    `where` and lists the missing, unexpected and mis-shaped keys (at most LIST_KEYS of each). Values of
    another dtype are converted by load_state_dict.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(v.shape)} vs network {tuple(expected[k].shape)}" for k, v in state_dict.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise error(f"{where}: the state dict does not match the network: missing keys {_listed(missing)}, "
                    f"unexpected keys {_listed(unexpected)}, mis-shaped keys {_listed(shapes)}")
    module.load_state_dict(state_dict, strict=True)
    return module
