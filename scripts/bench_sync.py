"""Host reads and host-to-tensor copies in one training minibatch with every phase due, one and two processes."""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


import torch

from training import dist
from training.config import compose_config
from probes import CountMinibatch, run_with_probe

# The counted minibatch: r1_interval = pl_interval = 2 make Gmain, Greg, Dmain and Dreg all due at every even
# index; index 2 is past the first (state-initializing) steps and not at a tick.
BATCH_IDX = 2

# The target per minibatch (ADA on, every phase due): at most 2 host reads, no host-to-tensor copy.
TARGET_READS, TARGET_COPIES = 2, 0


def overrides(p: float, aug: str, run_dir: str, extra=()) -> list:
    """The overrides of the measured run: the tiny model at 32 px, ADA at a fixed start p and on its GPU path (a CPU
    would take the path that reads, free there), no metrics or tick output."""
    return ["model=tiny", "train=test", "model.channel_base=256", "model.channel_max=32", "data.num_images=256",
            "metrics=none", "log.progress=false", f"aug={aug}", f"aug.p={p}", "aug.sync_free=true",
            "train.r1_interval=2", "train.pl_interval=2", "train.tick_kimg=1", "train.kimg=1", "train.snap=0",
            "train.image_snap=0", "train.cpu_threads=1", f"run_dir={run_dir}", *extra]


def count(p: float, aug: str, extra=()) -> dict:
    """Run the loop in this process up to the counted minibatch; returns (reads, copies, top call sites)."""
    with tempfile.TemporaryDirectory() as tmp:
        c = run_with_probe(compose_config(overrides(p, aug, tmp, extra)), CountMinibatch(BATCH_IDX)).counter
    return {"reads": c.reads, "copies": c.copies, "sites": c.sites.most_common(8)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--sites", action="store_true", help="print the busiest call sites of each row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one rank of a multi-process row
    parser.add_argument("--p", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--aug", default="ada", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = count(args.p, args.aug)
        Path(f"{args.worker}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(row))
        dist.end_process(0)
    torch.set_num_threads(1)
    rows = []
    for procs in args.processes:
        for label, p, aug in (("ADA, p=0.5", 0.5, "ada"), ("ADA, p=0", 0.0, "ada"), ("no augmentation", 0.0, "noaug")):
            if procs == 1:
                row = count(p, aug)
            else:
                row = _launch(procs, p, aug)
            rows.append((procs, label, row))
            print(f"{procs} process{'es' if procs > 1 else ''} | {label:16s} | reads {row['reads']:4d} | "
                  f"copies {row['copies']:4d}", flush=True)
            if args.sites:
                for site, n in row["sites"]:
                    print(f"      {n:4d} {site}")
    print(f"\nper minibatch with Gmain, Greg, Dmain and Dreg due (index {BATCH_IDX}); target: at most "
          f"{TARGET_READS} host reads and {TARGET_COPIES} host-to-tensor copies (optimizer step counters excluded)")
    reads, copies = max(r["reads"] for _, _, r in rows), max(r["copies"] for _, _, r in rows)
    verdict = "meets" if reads <= TARGET_READS and copies <= TARGET_COPIES else "MISSES"
    print(f"worst row: {reads} reads, {copies} copies -> {verdict} the target")
    return 0


# One multi-process row: `procs` gloo processes under accelerate launch; the ranks' counts must agree.
def _launch(procs: int, p: float, aug: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row")
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
               str(procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), __file__, "--worker", out, "--p", str(p), "--aug", aug]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{procs}-process run failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(procs)]
    return max(ranks, key=lambda r: (r["reads"], r["copies"]))


if __name__ == "__main__":
    sys.exit(main())
