"""Preemption: SIGTERM, SIGINT, SIGUSR1 or a dead launcher stop every rank at the next step boundary."""
import ctypes
import os
import signal
import sys
import threading
import time

import torch

from training.errors import RunTimeFailure


class NonFiniteError(RunTimeFailure, RuntimeError):
    """Training stopped after train.max_nonfinite minibatches in a row with non-finite gradients."""
    pass


# The signals that schedulers send before they kill a job (SLURM, Kubernetes) and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """The first stop signal sets a flag that the loop reads at every step boundary (all ranks agree through one all-
    reduce); a second signal restores the default action and re-raises itself, so the process exits at once. A
    repeat within `repeat_s` seconds counts as the same request: under SLURM a worker gets the scheduler's signal
    and, a moment later, the same signal forwarded by `accelerate launch`."""
    def __init__(self, repeat_s: float = 3.0):
        self.signum = None
        self.repeat_s = repeat_s
        self._at = None
        self._previous = {}

    def install(self) -> "StopRequest":
        """Install the handlers (main thread only: Python delivers signals there; elsewhere this is a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self._at < self.repeat_s:
                return
            sys.stderr.write(f"\nSecond stop signal ({name}): exiting now, without a checkpoint\n")
            sys.stderr.flush()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._at = signum, time.monotonic()
        sys.stderr.write(f"\nReceived {name}: stopping at the next step with a checkpoint (send it again to exit "
                         f"at once)\n")
        sys.stderr.flush()

    @property
    def name(self):
        """The signal's name, or None when none arrived."""
        return None if self.signum is None else signal.Signals(self.signum).name



# Prctl option: deliver a signal to this process when its parent dies (Linux, <sys/prctl.h>).
PR_SET_PDEATHSIG = 1

# Seconds a worker whose launcher died may spend writing its checkpoint before it exits regardless (a collective
# that waits for a peer that is already gone must not hold its GPU).
ORPHAN_GRACE_S = 60.0


class ParentWatch:
    """A worker started by a launcher (`accelerate launch`, torchrun: LOCAL_RANK is set) stops when the launcher dies,
    e.g. SIGKILLed by the out-of-memory killer or a scheduler: the workers run in sessions of their own, so nothing
    else would end them and they would hold their GPUs. The kernel sends SIGTERM when the parent dies (prctl
    PR_SET_PDEATHSIG; the stop handler then stops at the next step with a checkpoint), and `gone` compares the
    parent pid with the one at start (a parent that died before prctl, or a system without prctl). Once gone, a
    watchdog thread ends the process after ORPHAN_GRACE_S seconds in any case."""
    def __init__(self, enabled=None):
        if enabled is None:
            enabled = os.environ.get("LOCAL_RANK") is not None
        self.ppid = os.getppid() if enabled else None
        self._reported = False
        if self.ppid is not None and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            except (OSError, AttributeError):
                pass  # the pid check below still works

    def gone(self) -> bool:
        """True once the launcher is gone (checked at every step boundary; one getppid call): reparented, or the parent
        is dying (when a multi-threaded launcher is SIGKILLed, the thread that started the workers can die first:
        the kernel then sends the parent-death signal while the process, its other threads still exiting, keeps its
        pid)."""
        if self.ppid is None or (os.getppid() == self.ppid and not _dying(self.ppid)):
            return False
        if not self._reported:
            self._reported = True
            sys.stderr.write(f"\nThe launcher (pid {self.ppid}) is gone: stopping at the next step with a checkpoint, "
                             f"then exiting (at the latest in {ORPHAN_GRACE_S:.0f} s)\n")
            sys.stderr.flush()
            threading.Thread(target=_exit_after, args=(ORPHAN_GRACE_S,), daemon=True).start()
        return True

    def reason(self, wait_s: float = 1.0):
        """The stop reason when the launcher is gone, else None. After a stop signal it looks for up to `wait_s`
        seconds: the parent-death signal can arrive a moment before the launcher is seen dying."""
        deadline = time.monotonic() + (wait_s if self.ppid is not None else 0.0)
        while not self.gone() and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"the death of the launcher (pid {self.ppid})" if self.gone() else None


# Whether process `pid` is exiting: gone, a zombie, or with SIGKILL pending (Linux /proc; False elsewhere).
def _dying(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    state = status.get("State", "").strip()[:1]
    pending = int(status.get("ShdPnd", "0").strip() or "0", 16) | int(status.get("SigPnd", "0").strip() or "0", 16)
    return state in ("Z", "X") or bool(pending & (1 << (signal.SIGKILL - 1)))


# Exit the process after `seconds` (the orphaned worker's watchdog).
def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    sys.stderr.write(f"\nThe launcher is gone and the checkpoint did not finish within {seconds:.0f} s: exiting\n")
    sys.stderr.flush()
    os._exit(1)


def all_finite(modules, tensors=()) -> bool:
    """True when every floating-point parameter and buffer of the modules (and the extra tensors) is finite."""
    ts = [t for m in modules for t in list(m.parameters()) + list(m.buffers())] + list(tensors)
    return all(bool(torch.isfinite(t).all()) for t in ts if t.is_floating_point())
