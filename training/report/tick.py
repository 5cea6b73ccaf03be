"""Each tick's report: stats averaged over ranks, the status line, the stats.jsonl line and its tracker scalars."""
import json
import resource
import time
from pathlib import Path

import torch

from ops import dispatch
from training import dist
from training.io.records import stats_path
from training.report.health import WARNINGS_KEY

# The stats.jsonl key of the fused-op self-check decisions (ops.dispatch.decisions()) made since the last line.
OPS_KEY = "Ops/decisions"


def peak_memory_gb(device) -> float:
    """Peak memory of this process in GB (CUDA allocator peak on GPU, max resident set size on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class TickStats:
    """Running sums of scalar stats over a tick, averaged over ranks at report time. Values may be Python numbers or
    0-dim device tensors: tensors are summed on the device (no host read per minibatch) and read once per tick."""
    def __init__(self):
        self.sums = {}

    def add(self, stats: dict):
        for k, v in stats.items():
            s = self.sums.get(k)
            if isinstance(v, torch.Tensor):
                v = v.detach().to(torch.float64)
            if s is None:
                self.sums[k] = [v, 1]
            else:
                s[0] = s[0] + v
                s[1] += 1

    def reduce(self, device) -> dict:
        keys = sorted(set().union(*dist.all_gather_object(sorted(self.sums))))
        zero = torch.zeros([], dtype=torch.float64, device=device)
        sums = [self.sums[k][0] if k in self.sums else zero for k in keys]
        sums = torch.stack([(s if isinstance(s, torch.Tensor) else zero + s).to(device) for s in sums]) \
            if keys else zero.new_zeros([0])
        counts = torch.tensor([float(self.sums.get(k, [0, 0])[1]) for k in keys], dtype=torch.float64,
                              device=device)
        t = torch.cat([sums, counts])
        dist.all_reduce_sum(t)
        self.sums = {}
        values = t.tolist()
        n = len(keys)
        return {k: s / c for k, s, c in zip(keys, values[:n], values[n:]) if c > 0}


def write_report(stats: dict, run_dir: Path, pbar, trackers, step: int) -> None:
    """Print the status line, append one JSON line to stats.jsonl and log its numbers to the trackers (a
    training.report.trackers.Trackers, or None) at `step` (cur_nimg) (rank 0)."""
    line = (f"tick {stats['Progress/tick']:<5d} kimg {stats['Progress/kimg']:<8.1f} "
            f"time {stats['Timing/total_sec']:<7.0f}s sec/kimg {stats['Timing/sec_per_kimg']:<7.2f} "
            f"mem {stats['Resources/peak_mem_gb']:.2f}GB")
    for key, label in (("Loss/G/loss", "G"), ("Loss/D/loss_real", "Dreal"), ("Loss/D/loss_fake", "Dfake"),
                       ("Loss/r1_penalty", "R1"), ("Loss/pl_penalty", "PL")):
        if key in stats:
            line += f" {label} {stats[key]:.3f}"
    warnings = stats.get(WARNINGS_KEY) or []
    kinds = list(dict.fromkeys(w["kind"] for w in warnings))
    if kinds:
        line += f" WARN {','.join(kinds)}"
    write = pbar.write if pbar is not None else print
    write(line)
    for w in warnings:  # the quantity and remedy in full when a kind begins
        if w.get("new", True):
            write(f"  warning ({w['kind']}): {w['message']}")
    for d in stats.get(OPS_KEY) or []:  # fused-op decisions, once each
        write(f"  ops: {dispatch.describe(d)}")
    stats = dict(stats, timestamp=time.time())
    with open(stats_path(run_dir), "a") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()
    if trackers:
        trackers.log_scalars(stats, step)
