"""Benchmark projection: time per target per 100 steps at 64 px for batch 1 vs larger batches, same process."""
import argparse
import time


import torch

from networks.generator import Generator
from training.eval.lpips import Perceptual, VGG16LPIPS
from training.eval.projector import compute_w_stats, project


def tiny_G(res: int) -> Generator:
    """A random G with the `tiny` preset's shape (z = w = 64, 2 mapping layers, channel_base 2048, channel_max 128).
    """
    torch.manual_seed(0)
    return Generator(64, 0, 64, res, 3, mapping_kwargs=dict(num_layers=2),
                     synthesis_kwargs=dict(channel_base=2048, channel_max=128)).eval().requires_grad_(False)


def time_per_step(G, batch, steps, repeats, loss, perceptual, w_stats) -> float:
    """Seconds per step of projecting `batch` targets (best of `repeats` timed runs of `steps` steps, after a warm-up).
    """
    g = torch.Generator().manual_seed(batch)
    targets = torch.randint(0, 256, (batch, 3, G.img_resolution, G.img_resolution), generator=g, dtype=torch.uint8)
    kw = dict(loss=loss, perceptual=perceptual, w_stats=w_stats, seed=0)
    project(G, targets, num_steps=2, **kw)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        project(G, targets, num_steps=steps, **kw)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--res", type=int, default=64, help="generator resolution (px)")
    p.add_argument("--batches", default="1,4,8", help="targets projected together, comma-separated; the first is "
                   "the baseline")
    p.add_argument("--losses", default="lpips,fallback", help="lpips uses a VGG16 with random weights (same cost)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row (the best is printed)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    G = tiny_G(args.res)
    w_stats = compute_w_stats(G, 10000)
    perceptual = Perceptual(VGG16LPIPS(), "state_dict", "random weights")
    print(f"Projection on CPU, {args.res} px tiny-shaped G, {torch.get_num_threads()} thread(s), "
          f"best of {args.repeats} x {args.steps} steps")
    print(f"{'loss':<9} {'batch':>5} {'s/step':>8} {'s/target/100 steps':>19} {'speed-up vs batch 1':>20}")
    for loss in args.losses.split(","):
        base = None
        for b in batches:
            per_step = time_per_step(G, b, args.steps, args.repeats, loss, perceptual, w_stats)
            per_target_100 = per_step * 100 / b
            base = per_target_100 if base is None else base
            print(f"{loss:<9} {b:>5} {per_step:>8.3f} {per_target_100:>19.2f} {base / per_target_100:>19.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
