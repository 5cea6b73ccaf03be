"""SWD's memory and time: peak RSS of a whole swd<N> evaluation, all descriptors in memory vs on disk; sort costs."""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from training.eval import metrics, swd

GIB = float(1 << 30)


class SmoothImages:
    """A synthetic real set made on the fly (it would not fit in memory at 16k x 256 px): image i is 8x8 colour
    noise seeded with i, bilinearly upsampled to the resolution, plus a fine checker of seeded amplitude."""
    def __init__(self, count: int, resolution: int):
        self.count, self.resolution, self.name = count, resolution, f"smooth{resolution}"

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        rng = np.random.default_rng([7, i])
        coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32))
        img = torch.nn.functional.interpolate(coarse, size=self.resolution, mode="bilinear", align_corners=False)[0]
        checker = torch.from_numpy(np.indices((self.resolution, self.resolution)).sum(0) % 2 * 2.0 - 1).float()
        img = (img * 0.8 + 0.2 * float(rng.uniform()) * checker).clamp(-1, 1)
        return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy(), np.zeros([0], np.float32)


class SmoothG(torch.nn.Module):
    """A stand-in generator, G(z, c) -> [-1, 1]: a fixed linear map of z to 8x8 colour noise, upsampled as the reals
    are, plus a fine checker whose amplitude follows z (another distribution than the reals')."""
    def __init__(self, resolution: int, z_dim: int = 16):
        super().__init__()
        self.resolution, self.z_dim, self.c_dim = resolution, z_dim, 0
        self.fc = torch.nn.Linear(z_dim, 3 * 8 * 8)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) * 0.35)
            self.fc.bias.copy_(torch.randn(self.fc.bias.shape, generator=g) * 0.1)

    def forward(self, z, c, truncation_psi=1, noise_mode="const"):
        coarse = torch.tanh(self.fc(z)).view(-1, 3, 8, 8)
        img = torch.nn.functional.interpolate(coarse, size=self.resolution, mode="bilinear", align_corners=False)
        r = self.resolution
        checker = (torch.arange(r)[:, None] + torch.arange(r)[None, :]) % 2 * 2.0 - 1
        return (img * 0.8 + 0.1 * torch.sigmoid(z[:, :1, None, None]) * checker).clamp(-1, 1)


# The SWD detector as it was before DescriptorFiles: metrics.py then keeps every row in a FeatureStats.
class InMemoryDescriptors(swd.SWDDescriptors):
    new_stats = None
    load_stats = None


# Today's algorithm before bounding its memory (the baseline): every row of both sets in memory, each set normalized
# as a whole in float64, one [128, M] projection matrix per repeat, sorted into a copy.
def swd_in_memory(det, real_rows, fake_rows, seed: int = 0) -> dict:
    values = {}
    real, fake = det.split(torch.from_numpy(real_rows)), det.split(torch.from_numpy(fake_rows))
    for res, r, f in zip(swd.level_resolutions(det.resolution), real, fake):
        a, b = swd.normalize(r, det.channels).float(), swd.normalize(f, det.channels).float()
        gen, total, m = torch.Generator().manual_seed(seed), 0.0, min(len(a), len(b))
        for _ in range(swd.DIR_REPEATS):
            dirs = torch.randn([a.shape[1], swd.DIRS_PER_REPEAT], generator=gen, dtype=torch.float64)
            dirs = (dirs / dirs.square().sum(0, keepdim=True).sqrt()).T.float()
            pa = swd._quantiles(torch.from_numpy(np.sort((dirs @ a.T).numpy(), axis=1)), m)
            pb = swd._quantiles(torch.from_numpy(np.sort((dirs @ b.T).numpy(), axis=1)), m)
            total += float((pa - pb).abs().to(torch.float64).mean())
        values[str(res)] = swd.SCALE * total / swd.DIR_REPEATS
    return dict(levels=values, value=float(np.mean(list(values.values()))))


# One evaluation in this process ("before": rows in memory, "after": metrics.calc_metric as it is); prints a JSON line.
def child(mode: str, resolution: int, images: int, batch: int) -> None:
    dataset, G = SmoothImages(images, resolution), SmoothG(resolution)
    t0 = time.perf_counter()
    if mode == "before":
        det = InMemoryDescriptors(resolution, 3, "cpu")
        real = metrics.compute_dataset_stats(dataset, det, max_items=images, batch_size=batch, cache_dir=False,
                                             capture_all=True, capture_mean_cov=False)
        gen = metrics.compute_generator_stats(G, det, images, batch_size=batch, capture_all=True,
                                              capture_mean_cov=False)
        result = swd_in_memory(det, real.get_all(), gen.get_all())
    else:
        result = metrics.calc_metric(f"swd{images}", G, dataset, None, batch_size=batch, cache_dir=False)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    print(json.dumps(dict(value=result["value"], levels=result["levels"], seconds=seconds, peak_rss_gib=rss)))


# A process's resident memory now (GiB), from /proc; 0 once it is gone.
def rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024 / GIB
    except (OSError, StopIteration):
        return 0.0


# Runs `child` in a subprocess, killed when its resident memory passes cap_gib (polled every 20 ms: an address-space
# limit would count torch's ~3.4 GB of mapped libraries); the child's JSON result, or None when it was killed.
def run_child(mode: str, resolution: int, images: int, batch: int, cap_gib: float, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--resolution", str(resolution), "--images",
           str(images), "--batch", str(batch)] + (["--threads", str(threads)] if threads else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, t0 = 0.0, time.perf_counter()
    while proc.poll() is None:
        peak = max(peak, rss_gib(proc.pid))
        if peak > cap_gib:
            proc.kill()
            proc.communicate()
            print(f"  {mode} at {resolution} px, {images} images: killed at {peak:.2f} GiB resident (cap {cap_gib:g} "
                  f"GiB) after {time.perf_counter() - t0:.0f} s")
            return None
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        print(f"  {mode} at {resolution} px, {images} images: exit {proc.returncode}: "
              f"{(err.strip().splitlines() or [''])[-1]}")
        return None
    result = json.loads(out.strip().splitlines()[-1])
    print(f"  {mode} at {resolution} px, {images} images: {json.dumps(result)}", flush=True)
    return result


def memory_table(args) -> None:
    print(f"swd{args.images} evaluations (N real + N generated, {args.batch} per batch), each in a subprocess killed "
          f"above {args.cap_gib:g} GiB resident; threads={args.threads or 'torch default'}", flush=True)
    rows = []
    for res in args.resolutions:
        before = None if args.skip_before else run_child("before", res, args.images, args.batch, args.cap_gib,
                                                          args.threads)
        after = run_child("after", res, args.images, args.batch, args.cap_gib, args.threads)
        rows.append((res, before, after))
    print(f"{'px':>4s} {'mode':<7s} {'peak RSS GiB':>12s} {'seconds':>8s} {'SWD x1e3':>12s} {'RSS ratio':>9s} "
          f"{'SWD rel. diff':>13s}")
    for res, before, after in rows:
        for name, r in (("before", before), ("after", after)):
            if r is None:
                print(f"{res:>4d} {name:<7s} {'(failed)':>12s}")
                continue
            ratio = f"{r['peak_rss_gib'] / before['peak_rss_gib']:.3f}" if before else "-"
            diff = f"{r['value'] / before['value'] - 1:+.2e}" if before else "-"
            print(f"{res:>4d} {name:<7s} {r['peak_rss_gib']:>12.2f} {r['seconds']:>8.1f} {r['value']:>12.6f} "
                  f"{ratio:>9s} {diff:>13s}")


def best_seconds(fn, rounds: int) -> float:
    """Best wall time of `rounds` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# The cost of SWD's parts at one level's real size, against torch.sort of the projections.
def parts_table(args) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=g)
    det = swd.SWDDescriptors(args.resolution, 3, "cpu")
    rows = torch.cat([det.features(images[i:i + 64], list(range(i, min(i + 64, args.images))))
                      for i in range(0, args.images, 64)])
    finest = swd.normalize(det.split(rows)[0], 3)
    m = finest.shape[0]
    # One repeat's projections: 128 directions x M descriptors, a row per direction (what the distance sorts).
    dirs = torch.randn([finest.shape[1], swd.DIRS_PER_REPEAT], generator=g)
    proj = (dirs.T @ finest.float().T).contiguous()
    raw = swd.RowSet.of_tensor(det.split(rows)[0])
    cases = [
        (f"torch.sort of 128 x {m} projections (baseline)", lambda: torch.sort(proj, dim=1)),
        ("np.sort of the same (used on the CPU)", lambda: np.sort(proj.numpy(), axis=1)),
        (f"descriptors of {args.images} images, {det.levels} levels",
         lambda: det.features(images, range(args.images))),
        (f"normalize one level ({m} x {finest.shape[1]})", lambda: swd.normalize(det.split(rows)[0], 3)),
        ("streamed moments of one level (RowSet)", lambda: raw.normalized(3)),
        ("sliced_wasserstein one level, 4 x 128 dirs", lambda: swd.sliced_wasserstein(finest, finest.flip(0))),
    ]
    times = [best_seconds(fn, args.rounds) for _, fn in cases]
    print(f"threads={torch.get_num_threads()} images={args.images} resolution={args.resolution} rounds={args.rounds}")
    print(f"{'case':<52s} {'seconds':>9s} {'ratio':>7s}")
    for (name, _), t in zip(cases, times):
        print(f"{name:<52s} {t:>9.3f} {t / times[0]:>7.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--parts", action="store_true", help="time SWD's parts (sort, descriptors, distance) instead")
    p.add_argument("--images", type=int, default=16000, help="images per set (swd16k: 16000; --parts: 2000)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 256], help="image sides (px), one row each")
    p.add_argument("--resolution", type=int, default=32, help="--parts and --child: the one resolution")
    p.add_argument("--batch", type=int, default=64, help="images per extraction batch")
    p.add_argument("--cap-gib", type=float, default=7.0, help="resident memory at which an evaluation is killed")
    p.add_argument("--skip-before", action="store_true", help="only the current code (no in-memory baseline)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--parts: timed calls per row after one warm-up call (the best is printed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.resolution, args.images, args.batch)
    elif args.parts:
        parts_table(args)
    else:
        memory_table(args)


if __name__ == "__main__":
    main()
