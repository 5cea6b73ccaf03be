"""Benchmark the ADA pipe's forward+backward cost per batch against D-like baselines measured in the same process."""
import argparse
import time

import torch

from training.augment import AugmentPipe, presets

# Channels per resolution of a StyleGAN2 D at 256 px with cbase 16384 (the ADA paper's 256-px setting).
D_CHANNELS = {256: 64, 128: 128, 64: 256, 32: 512, 16: 512, 8: 512, 4: 512}


def timeit(fn, reps, device):
    """Median wall time (ms) of fn() over `reps` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def d_macs(batch, res):
    """Multiply-accumulates of the 3x3 convolutions of the whole D (two per block, the second one downsampling)."""
    total, r = 0, res
    while r > 4:
        cin, cout = D_CHANNELS.get(r, 512), D_CHANNELS.get(r // 2, 512)
        total += batch * r * r * cin * cin * 9 + batch * (r // 2) ** 2 * cin * cout * 9
        r //= 2
    return total


def d_block(res, device):
    """The first (highest-resolution) D block: fromRGB 1x1, 3x3 conv, 3x3 stride-2 conv, LeakyReLUs."""
    c0, c1 = D_CHANNELS.get(res, 64), D_CHANNELS.get(res // 2, 128)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, c0, 1), torch.nn.LeakyReLU(0.2),
                              torch.nn.Conv2d(c0, c0, 3, padding=1), torch.nn.LeakyReLU(0.2),
                              torch.nn.Conv2d(c0, c1, 3, stride=2, padding=1), torch.nn.LeakyReLU(0.2))
    macs_block = lambda b: b * res * res * (3 * c0 + c0 * c0 * 9) + b * (res // 2) ** 2 * c0 * c1 * 9
    return net.to(device), macs_block


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32, help="images per batch")
    ap.add_argument("--res", type=int, default=256, help="image side (px)")
    ap.add_argument("--reps", type=int, default=2,
                    help="timed runs per row after one warm-up run (the median is printed)")
    ap.add_argument("--block_div", type=int, default=16, help="CPU: time the D block on batch/block_div images")
    ap.add_argument("--device", default="cpu", help="torch device to time on (cpu, cuda)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = (torch.rand(args.batch, 3, args.res, args.res, device=device) * 2 - 1).requires_grad_()

    # Forward + backward of f(inp), as D's loss would backpropagate into the images.
    def fwd_bwd(f, inp):
        def run():
            y = f(inp)
            y.backward(torch.ones_like(y))
            inp.grad = None
        return run

    rows = []
    copy_ms = timeit(fwd_bwd(lambda t: t * 1.0, x), args.reps, device)
    rows.append(("identity copy (baseline)", copy_ms))
    # The D block is measured on batch / block_div images and scaled up (convolutions are linear in the batch),
    # to keep the CPU run short.
    block, macs_block = d_block(args.res, device)
    div = args.block_div if device.type == "cpu" else 1
    xb = x[: max(1, args.batch // div)].detach().clone().requires_grad_()
    block_ms = timeit(fwd_bwd(block, xb), args.reps, device) * args.batch / xb.shape[0]
    rows.append((f"D block at {args.res}px (baseline)", block_ms))
    aug = {}
    for preset in ("bgc",):
        for p in (1.0, 0.5, 0.2):
            pipe = AugmentPipe(**presets(preset)).to(device)
            pipe.p.fill_(p)
            aug[p] = timeit(fwd_bwd(pipe, x), args.reps, device)
            rows.append((f"{preset}, p={p:g}", aug[p]))

    print(f"ADA pipe forward+backward, {args.batch} x 3 x {args.res}^2, device={device}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'workload':<32}{'ms/batch':>12}{'x copy':>10}{'x D block':>12}")
    for name, ms in rows:
        print(f"{name:<32}{ms:>12.1f}{ms / copy_ms:>10.1f}{ms / block_ms:>12.2f}")
    # Rough training-step proxy: the whole D costs d_macs/macs_block times the measured block; one step runs D
    # forward+backward on fakes and reals (D step) and on fakes (G step), plus G itself (~ one more D), i.e. ~4 D
    # passes, while the pipe runs on 3 batches (R1's every-16-steps reals ignored).
    step_ms = 4 * block_ms * d_macs(args.batch, args.res) / macs_block(args.batch)
    print(f"training-step proxy (4 x full D fwd+bwd, scaled from the block by MACs): {step_ms / 1000:.1f} s")
    for p, ms in aug.items():
        print(f"bgc p={p:g}: 3 pipe passes per step = {3 * ms / step_ms * 100:.1f}% of the step proxy")


if __name__ == "__main__":
    main()
