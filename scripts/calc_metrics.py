"""Compute FID/KID of a snapshot's G_ema: `[accelerate launch] scripts/calc_metrics.py --network S --data D`."""
import argparse
import json
import os
import re

from training import dist
from training.data.dataset import open_dataset
from training.eval.inception import DetectorNotFound, load_detector
from training.eval.metrics import append_metric_jsonl, calc_metric, generator_stage, parse_metric
from training.io.checkpoint import load_snapshot


def parse_args(argv=None):
    """Command-line arguments (see --help)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--network", required=True, help="snapshot (.safetensors, or an official .pkl)")
    p.add_argument("--data", required=True, help="dataset folder or zip (or 'synthetic[:<res>]')")
    p.add_argument("--metrics", default="fid50k_full",
                   help="comma-separated: fid50k_full, kid50k_full, fid<N>[k][_full], kid<N>[k][_full]")
    p.add_argument("--detector", default=None,
                   help="Inception file (NVIDIA inception-2015-12-05.pt or pytorch-fid pt_inception-...pth) or "
                        "URL; default: $GANFORGE_INCEPTION, then the cache, then download")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per detector call")
    p.add_argument("--cache-dir", default=None, help="dataset-stats cache (default <GANFORGE_CACHE>/dataset-stats)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write dataset-stats cache files")
    p.add_argument("--run-dir", default=None,
                   help="append results to <run-dir>/metric-<name>.jsonl (default: the snapshot's folder)")
    p.add_argument("--no-log", action="store_true", help="print results only, write no metric-*.jsonl")
    p.add_argument("--truncation-psi", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated latents (and KID subsets)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per process for reals")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    return p.parse_args(argv)


def snapshot_kimg(snap: dict, path: str):
    """The snapshot's training progress in kimg: its recorded cur_nimg, else the number in its file name."""
    nimg = (snap.get("meta") or {}).get("cur_nimg")
    if nimg is not None:
        return nimg / 1000
    m = re.search(r"(\d{6})", os.path.basename(path))
    return int(m.group(1)) if m else None


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    for name in names:
        parse_metric(name)  # fail on a bad name before any heavy work
    dist.init(cpu=args.cpu)
    try:
        detector = load_detector(args.detector)
    except DetectorNotFound as e:
        dist.print0(str(e))
        return 2
    snap = load_snapshot(args.network, device=dist.device())
    G = snap.get("G_ema")
    if G is None:
        raise SystemExit(f"{args.network}: the snapshot holds no G_ema")
    G = G.eval().requires_grad_(False).to(dist.device())
    dataset = open_dataset(args.data, use_labels=G.c_dim > 0)
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
        result = calc_metric(name, G, dataset, detector, batch_size=args.batch_size,
                             cache_dir=False if args.no_cache else args.cache_dir, seed=args.seed,
                             truncation_psi=args.truncation_psi, num_workers=args.num_workers)
        if dist.is_main():
            if not args.no_log:
                result = append_metric_jsonl(run_dir, result, args.network, kimg)
            print(json.dumps(result, sort_keys=True), flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    dist.end_process(status)
