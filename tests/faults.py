"""Fault injection for the tests (LoopHooks): a rank killed at a step boundary, gradients poisoned from some point on."""
import os
import signal

from training.loop import LoopHooks

# The environment variables that switch faults on (tests/train_with_faults.py reads them).
KILL_AT = "GANFORGE_TEST_KILL_AT_NIMG"        # SIGKILL at the first step boundary at or after N images
KILL_RANK = "GANFORGE_TEST_KILL_RANK"         # the rank that kills itself (default 0)
NONFINITE_FROM = "GANFORGE_TEST_NONFINITE_FROM_NIMG"  # gradients become NaN from N images on
FAULT_VARS = (KILL_AT, KILL_RANK, NONFINITE_FROM)


class Faults(LoopHooks):
    """Rank `kill_rank` dies like a killed process (SIGKILL) at the first step boundary at or after `kill_at` images;
    from `nan_from` images on, every phase's first gradient is NaN (a non-finite step)."""
    def __init__(self, rank: int, kill_at=None, kill_rank: int = 0, nan_from=None):
        self.kill_at, self.nan_from = kill_at, nan_from
        self.kill = kill_at is not None and rank == kill_rank

    @classmethod
    def from_env(cls, env=os.environ) -> "Faults":
        """The faults the GANFORGE_TEST_* variables ask for, for this process's rank (RANK under a launcher)."""
        def number(name):
            return int(env[name]) if env.get(name) else None
        return cls(int(env.get("RANK", "0")), number(KILL_AT), number(KILL_RANK) or 0, number(NONFINITE_FROM))

    def begin_minibatch(self, counters) -> None:
        if self.kill and counters.cur_nimg >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_backward(self, phase, params, counters) -> None:
        if self.nan_from is not None and counters.cur_nimg >= self.nan_from:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    break


def train_script(root, env) -> str:
    """The training entry point for a test run: tests/train_with_faults.py when `env` asks for a fault, else
    scripts/train.py."""
    faulty = any(env.get(name) for name in FAULT_VARS)
    return str(root / ("tests/train_with_faults.py" if faulty else "scripts/train.py"))
