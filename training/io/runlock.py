"""Run-directory ownership: an advisory fcntl lock beside the run directory, held by the process training in it."""
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

from training.errors import RunTimeFailure

# A numbered run folder, <NNNNN>-<description>: its lock is per number, so that two runs never share a number.
NUMBERED_RE = re.compile(r"^(\d{5})-.+$")


def lock_path(run_dir) -> Path:
    """The lock file of a run directory, beside it (so that the directory need not exist yet): `.<NNNNN>.lock` for a
    numbered run folder, `.<name>.lock` for any other."""
    run_dir = Path(run_dir)
    m = NUMBERED_RE.match(run_dir.name)
    return run_dir.parent / f".{m.group(1) if m else run_dir.name}.lock"


class RunLock:
    """An exclusive POSIX record lock (fcntl.lockf) on a run directory's lock file, with the holder's pid, host and
    start time written inside. The kernel releases it when the process ends, however it ends, so a killed run never
    leaves a stale lock; the file itself stays (removing it would race with a process about to lock it).

    POSIX locks belong to the process and are released when the process closes *any* descriptor of the file: only
    this object opens it in its process. Forked children (data-loader workers) do not inherit the lock.

    A start that ends before its run directory exists removes the lock file while still holding it, so a failed
    start leaves nothing behind; try_lock checks that the file it locked is still the one at the path (a process
    that opened it just before the removal tries again on a new file)."""

    def __init__(self, run_dir, fh):
        self.run_dir, self.path, self._fh = Path(run_dir), lock_path(run_dir), fh

    def release(self) -> None:
        """Give up the lock (also done by the kernel at exit)."""
        if self._fh is not None:
            if not self.run_dir.exists():  # Nothing was started: leave nothing behind (see the class comment).
                with contextlib.suppress(OSError):
                    self.path.unlink()
            fcntl.lockf(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def try_lock(run_dir):
    """Lock `run_dir` for this process without waiting: a RunLock, or None when another process holds it."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a+")
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):  # held by another process
                return None
            raise RunTimeFailure(f"{path}: cannot lock the run directory ({e.strerror or e}): this file system does "
                                 f"not support fcntl locks (Lustre: mount with -o flock; NFS: not with nolock); put "
                                 f"outdir= or run_dir= on one that does") from e
        try:
            if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                break  # The file at the path: ours.
        except FileNotFoundError:
            pass
        fh.close()  # Removed by a holder whose start failed, after this process opened it: try the new file.
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "run_dir": str(run_dir)}) + "\n")
    fh.flush()
    return RunLock(run_dir, fh)


def holder(run_dir) -> str:
    """Who holds `run_dir`'s lock, as 'pid <pid> on <host> since <time>', from what the holder wrote."""
    info = {}
    for _ in range(20):  # The holder writes it just after locking: an empty file is read again.
        try:
            info = json.loads(lock_path(run_dir).read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if info:
            break
        time.sleep(0.05)
    since = f" since {info['started']}" if info.get("started") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{since}"
