"""Cost of SWD's parts at a metric's real size (swd2k at 32 px by default), against torch.sort of the projections."""
import argparse
import time

import numpy as np
import torch

from training.eval import swd


def best_seconds(fn, rounds: int) -> float:
    """Best wall time of `rounds` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=2000, help="images per set (swd2k: 2000)")
    p.add_argument("--resolution", type=int, default=32, help="image side (px)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed calls per row after one warm-up call (the best is printed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    cases = [
        (f"torch.sort of 128 x {m} projections (baseline)", lambda: torch.sort(proj, dim=1)),
        ("np.sort of the same (used on the CPU)", lambda: np.sort(proj.numpy(), axis=1)),
        (f"descriptors of {args.images} images, {det.levels} levels",
         lambda: det.features(images, range(args.images))),
        (f"normalize one level ({m} x {finest.shape[1]})", lambda: swd.normalize(det.split(rows)[0], 3)),
        ("sliced_wasserstein one level, 4 x 128 dirs", lambda: swd.sliced_wasserstein(finest, finest.flip(0))),
    ]
    times = [best_seconds(fn, args.rounds) for _, fn in cases]
    print(f"threads={torch.get_num_threads()} images={args.images} resolution={args.resolution} rounds={args.rounds}")
    print(f"{'case':<52s} {'seconds':>9s} {'ratio':>7s}")
    for (name, _), t in zip(cases, times):
        print(f"{name:<52s} {t:>9.3f} {t / times[0]:>7.3f}")


if __name__ == "__main__":
    main()
