"""Reporting from the training loop: per-tick stats over ranks, the status line, stats.jsonl, metrics, trackers."""
import json
import resource
import time
from pathlib import Path

import torch

from ops import dispatch
from training import dist
from training.eval.metrics import evaluate_snapshot, metric_label, parse_metric, swd_floor
from training.health import WARNINGS_KEY
from training.io.images import make_grid, to_uint8
from training.io.run_report import write_run_report

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
    training.trackers.Trackers, or None) at `step` (cur_nimg) (rank 0)."""
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
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()
    if trackers:
        trackers.log_scalars(stats, step)


def evaluate_metrics(G_ema, dataset, detector, names, run_dir, cur_nimg, metrics, pbar, trackers, step,
                     final: bool = False) -> None:
    """Compute the metrics `names` for G_ema at `cur_nimg` (`metrics`: the MetricsConfig), print them and log them as
    'Metrics/<label>' at `step` to `trackers` (anything with log(values, step=...), or None); the records are written
    by the metrics module. At a progressive stage below full resolution a metric is labelled with it
    (fid50k_full@16px) in the printout and the tracker key, so stage values never share a curve with full-resolution
    ones. With `final` (the end of training), an SWD metric is printed with its floor: the SWD between two disjoint
    halves of the reals at the same count, the value a perfect generator would get."""
    kimg = cur_nimg // 1000
    records = evaluate_snapshot(G_ema, dataset, detector, names, str(run_dir),
                                f"network-snapshot-{kimg:06d}.safetensors", cur_nimg / 1000, batch_size=metrics.batch,
                                mirror=metrics.mirror)
    for r in records:
        label = metric_label(r)
        fade = f", fade {r['stage_alpha']:.2f}" if r.get("stage_alpha", 1.0) < 1 else ""
        msg = (f"{label} {r['value']:.4f} ({r['num_gen']} generated, {r['time_sec']:.0f}s, "
               f"{r['detector'] or r['detector_id']}"
               f"{fade})")
        if dist.is_main():
            (pbar.write if pbar is not None else print)(msg + (" best so far" if r.get("is_best") else ""))
        if trackers:
            trackers.log({f"Metrics/{label}": r["value"]}, step=step)
        if final and parse_metric(r["metric"])[0] == "swd":
            floor = swd_floor(dataset, r["num_gen"], batch_size=metrics.batch, mirror=metrics.mirror)
            if dist.is_main():
                levels = ", ".join(f"{px} px {v:.1f}" for px, v in r["levels"].items())
                (pbar.write if pbar is not None else print)(
                    f"SWD (x1e3) of the final G_ema against the reals: {label} {r['value']:.2f} ({levels}); floor, "
                    f"two disjoint halves of the reals ({floor['num_real']} images each): {floor['value']:.2f}")


def log_grid(trackers, images, grid_size, step: int) -> None:
    """Log an image grid (float images in [-1, 1]) as 'fakes' to the trackers at `step` (nothing without any)."""
    if trackers:
        trackers.log_images("fakes", make_grid(to_uint8(images), *grid_size), step)


class ReportPage:
    """One run's report.html (training.io.run_report), rewritten by update() (rank 0): a failure is printed once per
    run and training goes on."""
    def __init__(self, run_dir: Path, pbar):
        self.run_dir, self.pbar, self.failed = run_dir, pbar, False

    def update(self) -> None:
        try:
            write_run_report(self.run_dir)
        except Exception as e:  # noqa: BLE001 - the page is a convenience, the run is not
            if not self.failed:
                self.failed = True
                (self.pbar.write if self.pbar is not None else print)(
                    f"Warning: report.html not written ({type(e).__name__}: {e}); training goes on")
