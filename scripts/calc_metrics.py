"""Compute FID/KID/SWD of a snapshot's G_ema: `[accelerate launch] scripts/calc_metrics.py --network S [--data D]`."""
import argparse
import json
import os
import re
from pathlib import Path
import sys

from tqdm import tqdm

from training import dist
from training.config import parse_bool
from training.data.dataset import open_dataset
from training.errors import UserError, report, run_cli
from training.eval.inception import DetectorNotFound, load_detector
from training.eval.metrics import (append_metric_jsonl, calc_metric, fid_floor, generator_stage, parse_metric,
                                   swd_floor)
from training.io.checkpoint import load_snapshot
from training.io.records import stats_path
from training.report.page import ReportPage


def parse_args(argv=None):
    """Command-line arguments (see --help)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--network", required=True, help="snapshot (.safetensors, or an official .pkl)")
    p.add_argument("--data", default=None,
                   help="dataset folder or zip (or 'synthetic[:<res>]'); default: the snapshot's training data "
                        "(its config's data.path, or the synthetic set it trained on)")
    p.add_argument("--mirror", type=parse_bool, default=None, metavar="BOOL",
                   help="reals include their x-flips (2N images), true|false; default: the snapshot config's "
                        "data.xflip (an official .pkl: its training_set_kwargs.xflip)")
    p.add_argument("--metrics", default="fid50k_full",
                   help="comma-separated: fid50k_full, kid50k_full, swd16k (needs no Inception file), "
                        "(fid|kid|swd)<N>[k][_full]")
    p.add_argument("--detector", default=None,
                   help="Inception file (inception-2015-12-05-nvidia-names.safetensors from scripts/get_inception.py, "
                        "NVIDIA's inception-2015-12-05.pt or pytorch-fid's pt_inception-...pth) or URL; default: "
                        "$GANFORGE_INCEPTION, then the cache, then the package index, then NVIDIA's URL")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per detector call")
    p.add_argument("--cache-dir", default=None, help="dataset-stats cache (default <GANFORGE_CACHE>/dataset-stats)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write dataset-stats cache files")
    p.add_argument("--run-dir", default=None,
                   help="append results to <run-dir>/metric-<name>.jsonl (default: the snapshot's folder)")
    p.add_argument("--no-log", action="store_true", help="print results only, write no metric-*.jsonl")
    p.add_argument("--truncation-psi", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated latents (and KID subsets)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per process for reals")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-floor", action="store_true",
                   help="SWD only: skip the floor (the SWD of two disjoint halves of the reals at the same count)")
    p.add_argument("--fid-floor", action="store_true",
                   help="FID only: also the FID of two disjoint halves of the reals at the same count, in each "
                        "convention (costs twice the reals' features)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    return p.parse_args(argv)


def snapshot_kimg(snap: dict, path: str):
    """The snapshot's training progress in kimg: its recorded cur_nimg, else the number in its file name."""
    nimg = (snap.get("meta") or {}).get("cur_nimg")
    if nimg is not None:
        return nimg / 1000
    m = re.search(r"(\d{6})", os.path.basename(path))
    return int(m.group(1)) if m else None


def training_data(config: dict):
    """The training data a snapshot's config records, as (path or None for the synthetic set, open_dataset keyword
    arguments that rebuild the same images, xflip); None when it records none. A ganforge config gives data.path
    (or the synthetic set's data.resolution and data.num_images), data.max_size with train.seed (the subset's seed)
    and data.xflip; an official pickle its training_set_kwargs (path, max_size, random_seed, xflip)."""
    config = config or {}
    d = config.get("data")
    if isinstance(d, dict):
        kwargs = {"max_size": d.get("max_size"), "random_seed": (config.get("train") or {}).get("seed", 0)}
        if d.get("path") is None:
            kwargs.update(resolution=d.get("resolution", 32), num_images=d.get("num_images", 4096))
        return d.get("path"), kwargs, bool(d.get("xflip", False))
    t = config.get("training_set_kwargs")
    if isinstance(t, dict) and t.get("path"):
        kwargs = {"max_size": t.get("max_size"), "random_seed": t.get("random_seed", 0)}
        return str(t["path"]), kwargs, bool(t.get("xflip", False))
    return None


class Progress:
    """calc_metric's progress callback: on rank 0, one tqdm bar per metric and image set (reals, generated) over the
    images processed by all processes together; nothing on the other ranks or when disabled."""
    def __init__(self, metric: str, enabled: bool = True):
        self.metric, self.enabled, self.bars = metric, enabled and dist.is_main(), {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(what)
        if bar is None:
            bar = self.bars[what] = tqdm(total=total, desc=f"{self.metric} {what}", unit="img", leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        """Close the bars left open."""
        for bar in self.bars.values():
            bar.close()


def open_data(args, snap: dict, use_labels: bool):
    """The dataset to compare with and whether to mirror it (see --data and --mirror), with a line saying which."""
    recorded = training_data(snap.get("config"))
    xflip = recorded[2] if recorded is not None else False
    mirror = xflip if args.mirror is None else args.mirror
    if args.data is not None:
        dataset = open_dataset(args.data, use_labels=use_labels)
        where = f"--data {args.data}"
    elif recorded is None:
        raise SystemExit(f"{args.network}: the snapshot records no training data; pass --data")
    else:
        path, kwargs, _ = recorded
        try:
            dataset = open_dataset(path, use_labels=use_labels, **kwargs)
        except (FileNotFoundError, OSError) as e:
            raise SystemExit(f"{args.network}: its training data {path!r} cannot be opened ({e}); pass --data")
        where = f"the snapshot's training data ({path if path is not None else 'synthetic'})"
    how = "--mirror" if args.mirror is not None else f"the snapshot's data.xflip={str(xflip).lower()}"
    dist.print0(f"Reals: {where}, {dataset.resolution} px, {len(dataset)} images"
                f"{f' and their {len(dataset)} x-flips' if mirror else ''} (mirror={str(mirror).lower()}, from {how})")
    return dataset, mirror


def summary(record: dict) -> str:
    """One readable line for a record: the value in each FID/KID convention, and the floor when there is one."""
    line = f"{record['metric']}: {record['value']:.4g}"
    for convention, v in (record.get("conventions") or {}).items():
        if convention != record.get("convention"):
            line += f" ({record.get('convention')} convention); {convention}: {v['value']:.4g} ({v['resize']})"
    if "floor" in record:
        floors = record.get("floor_conventions")
        floor = ", ".join(f"{c} {v:.4g}" for c, v in floors.items()) if floors else f"{record['floor']:.4g}"
        line += f"; floor (two halves of the reals, {record['floor_num_real']} each): {floor}"
    return line


def main(argv=None) -> int:
    """Compute the metrics and print (and log) one JSON record per metric; returns the exit status."""
    args = parse_args(argv)
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    for name in names:
        try:
            parse_metric(name)  # fail on a bad name before any heavy work
        except ValueError as e:
            raise UserError(f"--metrics {name}: {e}") from None
    dist.init(cpu=args.cpu)
    detector = None
    if any(parse_metric(name)[0] != "swd" for name in names):  # SWD needs no Inception file
        try:
            detector = load_detector(args.detector)
        except DetectorNotFound as e:
            return report(UserError(f"{e} (SWD needs no Inception file: --metrics swd16k)"))
    snap = load_snapshot(args.network, device=dist.device())
    G = snap.get("G_ema")
    if G is None:
        raise SystemExit(f"{args.network}: the snapshot holds no G_ema")
    G = G.eval().requires_grad_(False).to(dist.device())
    dataset, mirror = open_data(args, snap, use_labels=G.c_dim > 0)
    if dataset.resolution != G.img_resolution:  # (a G at a progressive stage is still built at full resolution)
        raise SystemExit(f"the dataset is {dataset.resolution} px but {args.network} makes {G.img_resolution}-px "
                         f"images; pass --data with a dataset at {G.img_resolution} px")
    stage = generator_stage(G, dataset.resolution)
    if stage is not None:
        res, alpha = stage
        where = (f"evaluating {res}x{res} px against the reals box-downsampled to {res} px"
                 if res < dataset.resolution else f"evaluating at the full {res} px mid-fade")
        dist.print0(f"{args.network}: taken during the progressive schedule at stage {res} px (fade {alpha:.2f}) "
                    f"of {dataset.resolution} px; {where}")
    run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.network))
    kimg = snapshot_kimg(snap, args.network)
    for name in names:
        progress = Progress(name, enabled=not args.no_progress)
        try:
            result = calc_metric(name, G, dataset, detector, batch_size=args.batch_size,
                                 cache_dir=False if args.no_cache else args.cache_dir, seed=args.seed,
                                 truncation_psi=args.truncation_psi, num_workers=args.num_workers, mirror=mirror,
                                 progress=progress)
        finally:
            progress.close()
        if parse_metric(name)[0] == "swd" and not args.no_floor:  # what a perfect G would get at this count
            floor = swd_floor(dataset, result["num_gen"], batch_size=args.batch_size,
                              cache_dir=False if args.no_cache else args.cache_dir, seed=args.seed, mirror=mirror)
            result.update(floor=floor["value"], floor_levels=floor["levels"], floor_num_real=floor["num_real"])
        if parse_metric(name)[0] == "fid" and args.fid_floor:
            floor = fid_floor(dataset, detector, result["num_gen"], batch_size=args.batch_size,
                              cache_dir=False if args.no_cache else args.cache_dir, mirror=mirror)
            result.update(floor=floor["value"], floor_conventions=floor["conventions"],
                          floor_num_real=floor["num_real"])
        if dist.is_main():
            if not args.no_log:
                result = append_metric_jsonl(run_dir, result, args.network, kimg)
            print(json.dumps(result, sort_keys=True), flush=True)
            print(summary(result), file=sys.stderr, flush=True)
    if dist.is_main() and not args.no_log and stats_path(run_dir).is_file():
        ReportPage(Path(run_dir), None).update()  # A training run's report page shows the new records.
    dist.barrier()
    return 0


if __name__ == "__main__":
    run_cli(main, dist.end_process)
