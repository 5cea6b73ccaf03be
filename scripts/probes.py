"""Training-loop probes (LoopHooks for training_loop(..., hooks=)): count host syncs in a minibatch, time a window of
minibatches; for the benchmarks, gpu_check and tests."""
import time
import warnings

import torch

from hostsync import HostSyncCounter
from training import dist
from training.loop import LoopHooks, training_loop
from training.report.tick import peak_memory_gb


class ProbeDone(Exception):
    """Raised by a probe to end a training run once it has what it measured."""
    pass


def run_with_probe(cfg, probe: LoopHooks):
    """Run the training loop for the config `cfg` (in cfg.run_dir) with `probe` as its hooks until the probe ends it
    (ProbeDone); returns the probe. The process's Accelerator is forgotten afterwards, so that the next run in this
    process starts its own."""
    try:
        training_loop(cfg, cfg.run_dir, hooks=probe)
    except ProbeDone:
        pass
    finally:
        dist.reset()
    return probe


class CountMinibatch(LoopHooks):
    """Count host syncs over minibatch `batch_idx` (its step boundary included) and end the run after it. `.counter`
    holds the HostSyncCounter; on CUDA, `.cuda_syncs` counts what torch.cuda.set_sync_debug_mode reports (every
    synchronizing CUDA call, also those made inside C++), with their messages in `.cuda_messages`."""
    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx
        self.counter = None
        self.cuda_syncs = None
        self.cuda_messages = []
        self._active = False
        self._caught = None

    def begin_minibatch(self, counters) -> None:
        if counters.batch_idx != self.batch_idx:
            return
        self.counter = HostSyncCounter()
        self.counter.__enter__()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._active = True

    def end_minibatch(self, counters) -> None:
        if not self._active:
            return
        self.counter.__exit__(None, None, None)
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self.cuda_messages = [str(w.message) for w in self._records if "synchroniz" in str(w.message)]
            self.cuda_syncs = len(self.cuda_messages)
        self._active = False
        raise ProbeDone()


class TimeMinibatches(LoopHooks):
    """Time minibatches `warmup` .. `warmup + count - 1` (one window, the device synchronized at both ends), then end
    the run. A window of 16 minibatches after 4 warm-up ones holds every lazy-regularization phase in its share
    (Greg every 4, Dreg every 16 with the default intervals). When `budget_s` (from the probe's creation) runs out
    first, the window ends early and the result says so (complete=False). `.result`: minibatches, images, seconds,
    sec_per_kimg, peak_mem_gb, startup_s, complete."""
    def __init__(self, warmup: int, count: int, budget_s: float, device: torch.device):
        self.warmup, self.count, self.budget_s, self.device = warmup, count, budget_s, device
        self.created = time.perf_counter()
        self.result = None
        self._t0 = self._nimg0 = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin_minibatch(self, counters) -> None:
        if counters.batch_idx == self.warmup and self._t0 is None:
            self._sync()
            self._t0, self._nimg0 = time.perf_counter(), counters.cur_nimg

    def end_minibatch(self, counters) -> None:
        over = time.perf_counter() - self.created > self.budget_s
        if self._t0 is None:
            if over:  # still warming up: nothing measured
                self.result = dict(minibatches=0, images=0, seconds=0.0, sec_per_kimg=None, complete=False,
                                   peak_mem_gb=peak_memory_gb(self.device), startup_s=None)
                raise ProbeDone()
            return
        done = counters.batch_idx - self.warmup
        if done >= self.count or over:
            self._sync()
            seconds = time.perf_counter() - self._t0
            images = counters.cur_nimg - self._nimg0
            self.result = dict(minibatches=done, images=images, seconds=seconds,
                               sec_per_kimg=seconds / (images / 1000), complete=done >= self.count,
                               peak_mem_gb=peak_memory_gb(self.device), startup_s=self._t0 - self.created)
            raise ProbeDone()
