"""Metrics at snapshots as the training loop reports them: computed, printed, and logged to the trackers."""
from training import dist
from training.eval.metrics import evaluate_snapshot, parse_metric, swd_floor
from training.io.records import metric_label


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
